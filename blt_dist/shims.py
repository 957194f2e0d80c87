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

