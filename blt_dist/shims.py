"""Where blt-dist leans on another package's private code, all in one place.

Each entry of UPSTREAM names a shim, the package version it was written against, and the
upstream functions whose behaviour it depends on, with a hash of their source as read then.
tests/test_shims.py recomputes the hashes against what is installed: an upgrade that changes
any of that code fails the test, which says which shim to re-read. pyproject.toml pins these
packages to the ranges tested.

The shims:
  pipeline_module_class   DeepSpeed's PipelineModule cut at explicit (FLOP-balanced) boundaries:
                          overrides `_partition_layers`, calls `_set_bounds`; build_pipeline also
                          trims `_layer_specs` and calls `_precompute_checkpointable_values`.
  local_mds_writer        streaming's MDSWriter without the 1 s poll in `_write_index` for local
                          output directories.
  save_checkpoint         a fact, not code: DeepSpeedEngine.save_checkpoint has no collective
                          after its writes but one final barrier (checkpoint.save relies on it to
                          release the other ranks when one rank's write raises).
  sbatch_script           submitit's `_make_sbatch_string`, the script `launch --dry-run` prints.
  zero_to_fp32            deepspeed.utils.zero_to_fp32's consolidation of ZeRO checkpoints.
  optimizer_masters       where the fp32 master weights sit in the checkpoints of DeepSpeed's
                          mixed-precision optimizers that zero_to_fp32 does not read: the unfused
                          FP16/bf16 optimizer (ZeRO-0) and BF16_Optimizer (pipelines).
  unfused_optimizer_init  undoes the optimizer step FP16_UnfusedOptimizer takes at construction.
  logical_state           a ZeRO checkpoint's per-parameter fp32 weights and Adam moments, merged
                          by zero_to_fp32's own (private) merge functions; and the same written
                          into a live ZeRO-0/1/2/3 optimizer's partitions (elastic resume).

Ground layer. The imports are inside the functions: each shim is needed by one wing only, and
`import streaming` costs 2 s, `import deepspeed` 0.3 s over torch.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Upstream:
    package: str
    version: str  # written against
    functions: tuple[str, ...]  # "module:qualname" whose source the shim relies on
    source_sha256: str  # of those functions' source, joined in this order


UPSTREAM = {
    "pipeline_module_class": Upstream("deepspeed", "0.19.8", (
        "deepspeed.runtime.pipe.module:PipelineModule.__init__",
        "deepspeed.runtime.pipe.module:PipelineModule._partition_layers",
        "deepspeed.runtime.pipe.module:PipelineModule._set_bounds",
        "deepspeed.runtime.pipe.module:PipelineModule._precompute_checkpointable_values",
    ), "92cdbb68a650a81ff056dfff7e61276b3aba48af066d4c4ec5c6ca75502a6390"),
    "local_mds_writer": Upstream("mosaicml-streaming", "0.13.0", (
        "streaming.base.format.base.writer:Writer._write_index",
        "streaming.base.format.base.writer:Writer.finish",
    ), "ea7f8ef91a5b5a64a3f9a54264f495552bd7def211bcc3c6c2c46ba3f6e053bc"),
    "save_checkpoint": Upstream("deepspeed", "0.19.8", (
        "deepspeed.runtime.engine:DeepSpeedEngine.save_checkpoint",
    ), "c92409217281487c42bc7a932fcbe10c96fd92b144a4060d8fef89c299f1a40b"),
    "sbatch_script": Upstream("submitit", "1.5.4", (
        "submitit.slurm.slurm:_make_sbatch_string",
    ), "e9538757589214064e00b9c2fa2e77afba86f6086a434a5ceb5ad36f3589fa63"),
    "zero_to_fp32": Upstream("deepspeed", "0.19.8", (
        "deepspeed.utils.zero_to_fp32:get_fp32_state_dict_from_zero_checkpoint",
    ), "c505a9abfd9aa0257caace8a9fe724d6dc9d089c3d9c80abaf622a88e07f8ca6"),
    "optimizer_masters": Upstream("deepspeed", "0.19.8", (
        "deepspeed.runtime.fp16.unfused_optimizer:FP16_UnfusedOptimizer.state_dict",
        "deepspeed.runtime.bf16_optimizer:BF16_Optimizer.state_dict",
        "deepspeed.runtime.bf16_optimizer:BF16_Optimizer._create_param_mapping",
    ), "5dabf7b4bc3f7bfb9ffe1a66681d356f03d11332463a2853b0b5a4c642c17024"),
    "unfused_optimizer_init": Upstream("deepspeed", "0.19.8", (
        "deepspeed.runtime.fp16.unfused_optimizer:FP16_UnfusedOptimizer.__init__",
        "deepspeed.runtime.fp16.unfused_optimizer:FP16_UnfusedOptimizer.initialize_optimizer_states",
        "deepspeed.runtime.fp16.unfused_optimizer:FP16_UnfusedOptimizer.refresh_fp32_params",
    ), "13c1cdcfd466540befd1c3e0dc60a5f3f7b9ecaa56dcbb2c1e821c146989f822"),
    "logical_state": Upstream("deepspeed", "0.19.8", (
        "deepspeed.utils.zero_to_fp32:parse_model_states",
        "deepspeed.utils.zero_to_fp32:parse_optim_states",
        "deepspeed.utils.zero_to_fp32:_zero2_merge_trainable_params",
        "deepspeed.utils.zero_to_fp32:_zero3_merge_trainable_params",
        "deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer.update_lp_params",
        "deepspeed.runtime.zero.stage3:DeepSpeedZeroOptimizer_Stage3._get_fp32_opt_state_partition",
        "deepspeed.runtime.zero.stage3:DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3",
        "deepspeed.utils.tensor_fragment:tensor_fragment.get_hp_fragment_address",
        "deepspeed.runtime.bf16_optimizer:BF16_Optimizer.update_lp_params",
    ), "c80a2bdc7546d388a76fd145b327cd0c00a5a1d90aed0d178c8dfbcd227a2471"),
}


def upstream_source(function: str) -> str:
    """The installed source of "module:qualname"."""
    module_name, qualname = function.split(":")
    obj = __import__(module_name, fromlist=["_"])
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return inspect.getsource(obj)


def source_sha256(functions: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for function in functions:
        digest.update(upstream_source(function).encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# DeepSpeed


def pipeline_module_class():
    """A PipelineModule subclass cut at explicit boundaries (DeepSpeed's `partition_method` only
    knows parameters / uniform / type:regex). `_partition_layers` runs inside
    PipelineModule.__init__, before any layer is built, so the boundaries are passed in via the
    class attribute `pending_boundaries`, set just before construction."""
    from deepspeed.pipe import PipelineModule  # lazy: deepspeed, only pipelines need this

    class FlopBalancedPipelineModule(PipelineModule):
        pending_boundaries: Optional[list[int]] = None

        def _partition_layers(self, method="flops"):
            bounds = type(self).pending_boundaries
            if bounds is None or len(bounds) != self.num_stages + 1 or bounds[-1] != len(self._layer_specs):
                raise ValueError(f"pipeline boundaries {bounds} do not fit {len(self._layer_specs)} layers "
                                 f"in {self.num_stages} stages")
            self.parts = list(bounds)
            stage = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    return FlopBalancedPipelineModule


def zero_to_fp32_state_dict(checkpoint_dir: str, tag: str) -> dict:
    """The fp32 master weights of a ZeRO-1/2/3 checkpoint, gathered from every rank's shard."""
    # lazy: deepspeed, only a ZeRO export needs it
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=tag)


def zero_logical_state(model_file, optim_files: list) -> dict:
    """{name: {"fp32", "exp_avg", "exp_avg_sq", "step"}} of a ZeRO-1/2/3 checkpoint (or of one
    pipeline stage's ZeRO-1 files), names as the module had them. Adam's moments are partitioned
    exactly as the fp32 masters are (one flat tensor per param group and rank), so
    zero_to_fp32's merge of the masters, given the moments instead, merges them."""
    import torch  # lazy: this ground-layer module imports nothing at the top (see above)
    from deepspeed.checkpoint import constants as c  # lazy: deepspeed
    from deepspeed.utils import zero_to_fp32 as z

    states = torch.load(model_file, map_location="cpu", weights_only=False)
    # zero_to_fp32's parse_model_states also reads the module's buffers, which a pipeline
    # stage's file does not hold; the merges below read the parameter shapes only
    model_states = [z.zero_model_state(buffers={}, param_shapes=states[c.PARAM_SHAPES], shared_params=[],
                                       ds_version=states.get(c.DS_VERSION), frozen_param_shapes=None,
                                       frozen_param_fragments=None)]
    optim = [torch.load(f, map_location="cpu", weights_only=False)[c.OPTIMIZER_STATE_DICT] for f in optim_files]
    stage = optim[0][c.ZERO_STAGE]
    world = optim[0][c.PARTITION_COUNT]
    world = max(world) if isinstance(world, list) else world
    if world != len(optim_files):
        raise ValueError(f"{len(optim_files)} optimizer files for {world} partitions")
    masters_key = c.SINGLE_PARTITION_OF_FP32_GROUPS if stage <= 2 else c.FP32_FLAT_GROUPS
    inner_key = "base_optimizer_state" if stage <= 2 else c.OPTIMIZER_STATE_DICT
    groups = len(optim[0][masters_key])

    def merged(flat_groups) -> dict:
        out: dict = {}
        if stage <= 2:
            z._zero2_merge_trainable_params(out, world, flat_groups, model_states,
                                            optim[0].get(c.PARAM_ALIGNMENT_PADDINGS))
            return out
        z._zero3_merge_trainable_params(out, world, flat_groups, model_states)
        return z.to_torch_tensor(out)

    values = {"fp32": merged([o[masters_key] for o in optim])}
    for key in ("exp_avg", "exp_avg_sq"):
        values[key] = merged([[o[inner_key]["state"][g][key] for g in range(groups)] for o in optim])
    step = torch.as_tensor(optim[0][inner_key]["state"][0]["step"], dtype=torch.float32)
    return {name: {**{k: values[k][name].float().clone() for k in values}, "step": step.clone()}
            for name in values["fp32"]}


def bf16_optimizer_logical_state(optim_files: list) -> dict:
    """The same from BF16_Optimizer files (pipelines in bf16): each rank's fragment of a
    parameter's master and moments, at its `param_slice_mappings` address, joined in data-rank
    order (the files' order); names as the module had them, flattened."""
    import torch  # lazy: as above

    fragments: dict[str, dict[str, list]] = {}
    step = None
    for path in optim_files:
        state = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        inner = state["base_optimizer_state"]["state"]
        for group, (partition, mapping) in enumerate(zip(state["single_partition_of_fp32_groups"],
                                                         state["param_slice_mappings"])):
            tensors = {"fp32": partition, "exp_avg": inner[group]["exp_avg"], "exp_avg_sq": inner[group]["exp_avg_sq"]}
            step = inner[group]["step"]
            for name, address in mapping.items():
                for key, flat in tensors.items():
                    fragments.setdefault(name, {}).setdefault(key, []).append(flat.narrow(0, address.start, address.numel))
    step = torch.as_tensor(step, dtype=torch.float32)
    return {name: {**{k: torch.cat(parts).float() for k, parts in keys.items()}, "step": step.clone()}
            for name, keys in fragments.items()}


def full_shape(param) -> tuple:
    """A parameter's unpartitioned shape (ZeRO-3 keeps an empty tensor in its place)."""
    return tuple(param.ds_shape) if hasattr(param, "ds_shape") else tuple(param.shape)


def _adam_state(flat, step):
    import torch  # lazy: as above

    return {"step": step.clone(), "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}


def zero_set_logical_state(optimizer, named: dict, state: dict) -> None:
    """Writes each parameter's full fp32 weight and Adam moments into this rank's partitions of
    a ZeRO-1/2 or ZeRO-3 optimizer, then refreshes the module weights from the masters. The
    optimizer state is made here (torch's AdamW makes it lazily at the first step)."""
    import torch  # lazy: as above

    step = next(iter(state.values()))["step"]
    if hasattr(optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3
        flats = optimizer.fp32_partitioned_groups_flat
        for flat in flats:
            optimizer.optimizer.state[flat] = _adam_state(flat, step)
        rank, world = optimizer.dp_process_group.rank(), optimizer.dp_process_group.size()
        for name, param in named.items():
            group, offset, numel = optimizer.grad_position[optimizer.get_param_id(param)]
            for key, target in (("fp32", flats[group]), *((k, optimizer.optimizer.state[flats[group]][k])
                                                           for k in ("exp_avg", "exp_avg_sq"))):
                value = state[name][key].flatten().to(target.device)
                padded = torch.zeros(numel * world, dtype=value.dtype, device=value.device)
                padded[: value.numel()] = value
                target.narrow(0, offset, numel).copy_(padded.narrow(0, numel * rank, numel))
        for group, flat in enumerate(flats):  # masters -> the partitioned module weights
            optimizer.fp16_partitioned_groups_flat[group].data.copy_(flat.data)
            updated = optimizer.unflatten(optimizer.fp16_partitioned_groups_flat[group],
                                          optimizer.fp16_partitioned_groups[group])
            for partitioned, value in zip(optimizer.fp16_partitioned_groups[group], updated):
                partitioned.data = value.data
        return
    # ZeRO-1/2, and BF16_Optimizer (pipelines in bf16): fragments addressed by each param's _hp_mapping
    flats = getattr(optimizer, "single_partition_of_fp32_groups", None) or optimizer.fp32_groups_flat_partition
    for flat in flats:
        optimizer.optimizer.state[flat] = _adam_state(flat, step)
    for name, param in named.items():
        mapping = param._hp_mapping
        if mapping is None:  # no part of this parameter lives in this rank's partition
            continue
        lp, hp = mapping.lp_fragment_address, mapping.get_hp_fragment_address()
        flat = flats[mapping.param_group_index]
        for key, target in (("fp32", flat), ("exp_avg", optimizer.optimizer.state[flat]["exp_avg"]),
                            ("exp_avg_sq", optimizer.optimizer.state[flat]["exp_avg_sq"])):
            value = state[name][key].flatten().to(target.device)
            target.narrow(0, hp.start, hp.numel).copy_(value.narrow(0, lp.start, lp.numel))
    # a parameter split over data-parallel ranks has its fragments in several ranks' partitions:
    # the masters of the others reach the module weights through update_lp_params' all-gather
    optimizer.update_lp_params()


def zero0_set_logical_state(optimizer, named: dict, state: dict) -> None:
    """The same for ZeRO-0: torch's AdamW on the module weights (fp32), or DeepSpeed's unfused
    mixed-precision optimizer with its fp32 master groups (bf16)."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer  # lazy: deepspeed

    if isinstance(optimizer, FP16_UnfusedOptimizer):
        masters = {id(p): m for low, high in zip(optimizer.fp16_groups, optimizer.fp32_groups) for p, m in zip(low, high)}
        inner = optimizer.optimizer
    else:
        masters, inner = {}, optimizer
    for name, param in named.items():
        master = masters.get(id(param), param)
        master.data.copy_(state[name]["fp32"].to(master.device))
        inner.state[master] = {"step": state[name]["step"].clone(),
                               **{k: state[name][k].to(master.device).clone() for k in ("exp_avg", "exp_avg_sq")}}
        if master is not param:
            param.data.copy_(master.data)


def undo_unfused_optimizer_init_step(optimizer) -> bool:
    """DeepSpeed's unfused mixed-precision optimizer (what ZeRO-0 with bf16 runs) creates its
    state at construction by taking one real step on zero gradients: Adam's step count starts
    at 1, so every later bias correction is one step off, and AdamW decays the fp32 masters once
    with the config's lr. A ZeRO-0 run then trained a different model from a ZeRO-1/2/3 or
    pipeline run of the same seed (first update 0.74 lr instead of lr, measured). Clearing the
    state (torch optimizers create it lazily at the first real step) and copying the untouched
    bf16 weights back into the masters restores the optimizer DeepSpeed was asked for. Returns
    whether there was anything to undo."""
    # lazy: deepspeed, only the trainer's engine set-up needs it
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if not isinstance(optimizer, FP16_UnfusedOptimizer):
        return False
    optimizer.optimizer.state.clear()
    optimizer.refresh_fp32_params()
    return True


def unfused_optimizer_masters(model_states: dict) -> list[list]:
    """The fp32 master weights of a ZeRO-0 mixed-precision run (FP16_UnfusedOptimizer, which
    DeepSpeed also uses for bf16 without ZeRO): one list of tensors per optimizer param group,
    in the group's parameter order. They sit in `mp_rank_00_model_states.pt` under "optimizer"."""
    optimizer = model_states.get("optimizer")
    if not isinstance(optimizer, dict) or "fp32_groups" not in optimizer:
        raise KeyError("no 'fp32_groups' in the model states' optimizer entry (not DeepSpeed's unfused "
                       "mixed-precision optimizer: a fused Adam keeps 'fp32_groups_flat', which is not read here)")
    return optimizer["fp32_groups"]


def bf16_optimizer_fragments(optim_states: dict) -> list[dict]:
    """This rank's slices of the fp32 master weights in a BF16_Optimizer checkpoint file
    (`bf16_zero_pp_rank_D_mp_rank_SS_optim_states.pt`, written by pipelines): per param group,
    {parameter name (the module's, pipeline-layer prefix included): flat fp32 fragment}. A
    parameter split over data-parallel ranks has one fragment per rank, in rank order."""
    state = optim_states["optimizer_state_dict"]
    partitions, mappings = state["single_partition_of_fp32_groups"], state["param_slice_mappings"]
    return [{name: partition.narrow(0, address.start, address.numel) for name, address in mapping.items()}
            for partition, mapping in zip(partitions, mappings)]


# ---------------------------------------------------------------------------------------------
# mosaicml-streaming


def local_mds_writer(out_dir: str, columns: dict, shard_size, hashes: list[str] | None = None):
    """An MDSWriter for a local directory, without the 1 s stall at finish().

    MDSWriter._write_index (streaming 0.13) polls its upload queue with sleep(1) before writing
    index.json; for a local directory the queued "uploads" are no-ops, but the poll runs right
    after the last one is queued and usually loses the race: one second per part directory,
    which dominates small runs and tests. Here the queue is drained by shutting the executor
    down (waiting for it), then index.json is written exactly as upstream writes it."""
    # lazy: `import streaming` costs 2 s over torch (measured); only shard I/O needs it
    from streaming import MDSWriter
    from streaming.base.util import get_index_basename

    class LocalMDSWriter(MDSWriter):
        def _write_index(self) -> None:
            if self.remote is not None:
                return super()._write_index()
            if self.new_samples:
                raise RuntimeError("internal error: not all samples have been written")
            self.executor.shutdown(wait=True)
            if self.event.is_set():
                raise RuntimeError(f"{self.local}: writing a shard failed (see the traceback above)")
            with open(os.path.join(self.local, get_index_basename()), "w") as f:
                json.dump({"version": 2, "shards": self.shards}, f, sort_keys=True)

    return LocalMDSWriter(out=str(out_dir), columns=columns, size_limit=shard_size, hashes=hashes)


# ---------------------------------------------------------------------------------------------
# submitit


def sbatch_script(command: str, folder, **parameters) -> str:
    """The sbatch script submitit writes for these executor parameters (no Slurm needed)."""
    from submitit.slurm.slurm import _make_sbatch_string  # lazy: only launch/ renders scripts

    return _make_sbatch_string(command=command, folder=folder, **parameters)

