"""Elastic resume: a checkpoint saved at one layout (world size, ZeRO stage) continues at another.

What a layout change touches, and how each part carries over:
- the data: the loader's lanes (data/loader.py) give one global sequence of micro-batches
  whatever the world size; the run keeps its global batch, and gradient accumulation is
  derived from it (`plan`);
- the model and optimizer: the checkpoint is read once into its *logical* state, per
  parameter under the plain model's names: the fp32 master weight, Adam's two moments and its
  step, whatever the layout that wrote it (`logical_state`). It is written to
  `checkpoints/<tag>.logical/` with a COMPLETE marker of its own, next to the checkpoint it was
  read from (never modified), and pruned with it. Each rank then writes its share of every
  parameter into the new engine (`load_logical`): DeepSpeed's `safe_set_full_*` under
  ZeRO-1/2/3, the optimizer's own state at ZeRO-0.

Why not DeepSpeed's universal checkpoint alone: `ds_to_universal` + `load_universal` resume
ZeRO-1/2/3 at another world size, but (0.19.8, measured) not ZeRO-1/2 <-> 3, not into ZeRO-0, and
its ZeRO-3 output differs in format from its ZeRO-1/2 output. The logical state reads ZeRO
shards with DeepSpeed's own merge (zero_to_fp32, shims.py) and covers every pair of
data-parallel layouts the trainer supports.

A resume at the same layout never comes here: DeepSpeed's own load stays bit-exact.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from blt_dist import shims
from blt_dist.config import Config
from blt_dist.errors import UserError
from blt_dist.parallel.pipeline import to_model_state_dict

MOMENTS = ("exp_avg", "exp_avg_sq")
LOGICAL_SUFFIX = ".logical"
LOGICAL_FORMAT = "blt-dist/logical-state/v1"


@dataclass(frozen=True)
class Layout:
    world_size: int
    zero_stage: int
    pipeline_stages: int
    grad_accum: int

    @classmethod
    def saved(cls, marker: dict) -> "Layout":
        return cls(marker["world_size"], marker["zero_stage"], marker.get("pipeline_stages", 1), marker["grad_accum"])

    def same_shards(self, other: "Layout") -> bool:
        """Whether DeepSpeed's own checkpoint files load as they are."""
        return (self.world_size, self.zero_stage, self.pipeline_stages) == (
            other.world_size, other.zero_stage, other.pipeline_stages)

    def __str__(self) -> str:
        text = f"{self.world_size} rank{'s' if self.world_size != 1 else ''} ZeRO-{self.zero_stage}"
        return text + (f" x {self.pipeline_stages} pipeline stages" if self.pipeline_stages > 1 else "")


@dataclass(frozen=True)
class LayoutChange:
    saved: Layout
    now: Layout

    def describe(self, step: int) -> str:
        text = f"resumed step {step} saved at {self.saved} on {self.now}"
        if self.saved.grad_accum != self.now.grad_accum:
            text += f", grad_accum {self.saved.grad_accum} -> {self.now.grad_accum}"
        return text


def plan(cfg: Config, world_size: int, marker: dict,
         tag_dir: Optional[Path] = None) -> tuple[Config, Optional[LayoutChange]]:
    """The config to resume a checkpoint with at this world size (grad_accum derived so that the
    global batch is the checkpoint's), and the layout change, None when the shards load as they
    are. Refuses, before any state is touched, what would not continue the same run."""
    for key in ("lanes", "grad_accum", "micro_batch_size", "total_steps"):
        if key not in marker:
            raise UserError(
                f"checkpoint marker has no {key!r}: it was written before elastic resume (data lanes) existed; "
                "resume it with the blt-dist version that wrote it, or start a new run from its export"
            )
    t, p = cfg.train, cfg.parallel
    if t.micro_batch_size != marker["micro_batch_size"]:
        raise UserError(f"train.micro_batch_size: the checkpoint has {marker['micro_batch_size']}, this run "
                        f"{t.micro_batch_size}; the micro-batch is the unit of the data order and cannot change")
    if cfg.data.lanes and cfg.data.lanes != marker["lanes"]:
        raise UserError(f"data.lanes: the checkpoint has {marker['lanes']}, this run {cfg.data.lanes}; the lanes are "
                        "fixed when a run starts (leave data.lanes unset to take the saved value)")
    if world_size % p.pipeline_stages:
        raise UserError(f"parallel.pipeline_stages: {p.pipeline_stages} does not divide the world size {world_size}")
    saved = Layout.saved(marker)
    dp = world_size // p.pipeline_stages
    global_batch = marker["global_batch"]
    per_rank_step = t.micro_batch_size * dp
    moved = (world_size, p.pipeline_stages) != (saved.world_size, saved.pipeline_stages)
    if moved and t.grad_accum == saved.grad_accum:  # the user left grad_accum alone: derive it
        if global_batch % per_rank_step:
            raise UserError(
                f"the checkpoint's global batch of {global_batch} samples ({global_batch // t.micro_batch_size} "
                f"micro-batches of {t.micro_batch_size}) does not split over {dp} data-parallel ranks; resume on a "
                f"world size that divides it"
            )
        grad_accum = global_batch // per_rank_step
    else:
        grad_accum = t.grad_accum
        if grad_accum * per_rank_step != global_batch:
            raise UserError(
                f"train.grad_accum={grad_accum} gives a global batch of {grad_accum * per_rank_step} samples on "
                f"{dp} data-parallel ranks; the checkpoint's is {global_batch} (a resumed run keeps its global "
                "batch: leave train.grad_accum as it was and it is derived)"
            )
    now = Layout(world_size, p.zero_stage, p.pipeline_stages, grad_accum)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(t, grad_accum=grad_accum))
    if now.same_shards(saved):
        return cfg, None
    if tag_dir is not None and saved.pipeline_stages > 1 and not _pipeline_masters_readable(tag_dir):
        raise UserError(
            f"checkpoint saved at {saved}, this run is {now}: a pipeline checkpoint in fp32 at ZeRO-0 keeps its "
            "optimizer state in a layout the conversion does not read; resume it at the same layout (pipelines "
            "at ZeRO-1, and bf16 pipelines, convert)"
        )
    return cfg, LayoutChange(saved, now)


def _pipeline_masters_readable(tag_dir: Path) -> bool:
    return any(tag_dir.glob("bf16_zero_pp_rank_*_optim_states.pt")) or any(tag_dir.glob("zero_pp_rank_*_optim_states.pt"))


# ---------------------------------------------------------------------------------------------
# The logical state of a checkpoint: per parameter, fp32 weight + Adam moments + step


def logical_dir(tag_dir: Path) -> Path:
    return tag_dir.with_name(tag_dir.name + LOGICAL_SUFFIX)


def logical_state(tag_dir: Path, marker: dict) -> dict[str, dict[str, torch.Tensor]]:
    """{parameter name: {"fp32", "exp_avg", "exp_avg_sq", "step"}} of a checkpoint under the
    plain model's names, from the files of whatever layout wrote it."""
    if marker.get("pipeline_stages", 1) > 1:
        bf16 = sorted(tag_dir.glob("bf16_zero_pp_rank_*_optim_states.pt"))
        if bf16:  # BF16_Optimizer, one file per (data rank, stage); a parameter lives in one stage
            state = shims.bf16_optimizer_logical_state(bf16)
            for name, values in state.items():
                shape = _pipeline_shapes(tag_dir)[name]
                state[name] = {k: v.view(shape) if k != "step" else v for k, v in values.items()}
            return to_model_state_dict(state)
        state = {}
        for stage in range(marker["pipeline_stages"]):  # ZeRO-1 per stage
            files = sorted(tag_dir.glob(f"zero_pp_rank_*_mp_rank_{stage:02d}_optim_states.pt"), key=_data_rank)
            with contextlib.redirect_stdout(io.StringIO()):  # zero_to_fp32 prints its progress
                state.update(shims.zero_logical_state(tag_dir / f"mp_rank_{stage:02d}_model_states.pt", files))
        return to_model_state_dict(state)
    if marker["zero_stage"] >= 1:
        with contextlib.redirect_stdout(io.StringIO()):
            from deepspeed.utils.zero_to_fp32 import get_model_state_files, get_optim_files  # lazy: deepspeed

            model_files = get_model_state_files(str(tag_dir))
            return shims.zero_logical_state(model_files[0], get_optim_files(str(tag_dir)))
    return _zero0_logical_state(tag_dir)


def _data_rank(path: Path) -> int:
    return int(path.name.split("_pp_rank_")[1].split("_")[0])


def _pipeline_shapes(tag_dir: Path) -> dict[str, torch.Size]:
    """'{layer}.{name}' -> shape, from the stages' model-states files."""
    shapes = {}
    for path in sorted(tag_dir.glob("mp_rank_*_model_states.pt")):
        for group in torch.load(path, map_location="cpu", weights_only=False)["param_shapes"]:
            shapes.update(group)
    return shapes


def _zero0_logical_state(tag_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """ZeRO-0: one model-states file. The optimizer's parameters follow the trainer's groups
    (engine.optimizer_groups: the decay group, then the rest, each in parameter order); in bf16
    its masters are FP16_UnfusedOptimizer's fp32 groups."""
    from blt_dist.parallel.engine import decays  # lazy: engine imports deepspeed

    states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    buffers = set(states.get("buffer_names") or ())
    params = [(name, t) for name, t in states["module"].items() if name not in buffers]
    order = [name for name, t in params if decays(name, t.dim())] + [name for name, t in params if not decays(name, t.dim())]
    module = dict(params)
    bf16 = any(t.dtype == torch.bfloat16 for _, t in params)
    optimizer = states["optimizer"]
    if bf16:
        masters = [t for group in shims.unfused_optimizer_masters(states) for t in group]
        inner = optimizer["optimizer_state_dict"]
    else:
        masters = [module[name] for name in order]
        inner = optimizer
    indexes = [i for group in inner["param_groups"] for i in group["params"]]
    if len(indexes) != len(order) or len(masters) != len(order):
        raise UserError(f"{tag_dir}: optimizer of {len(indexes)} parameters, model of {len(order)} (another trainer version?)")
    out = {}
    for name, index, master in zip(order, indexes, masters):
        state = inner["state"].get(index)
        if state is None:
            raise UserError(f"{tag_dir}: no optimizer state for {name!r} (saved before the first step?)")
        out[name] = {"fp32": master.float().view(module[name].shape),
                     **{k: state[k].float().view(module[name].shape) for k in MOMENTS},
                     "step": torch.as_tensor(state["step"], dtype=torch.float32)}
    return out


def convert_once(tag_dir: Path, marker: dict, is_main: bool, log=print) -> Path:
    """The checkpoint's logical state on disk (rank 0 writes it, unless a complete one is there;
    loop.convert_agreed holds the other ranks until it has)."""
    out = logical_dir(tag_dir)
    if not is_main or (out / "COMPLETE").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)  # a conversion killed half-way
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        state = logical_state(tag_dir, marker)
        torch.save(state, tmp / "state.pt")
        (tmp / "COMPLETE").write_text(json.dumps({"format": LOGICAL_FORMAT, "source": tag_dir.name,
                                                  "step": marker["step"], "parameters": len(state)}) + "\n")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"checkpoint {tag_dir.name}: converted to its logical state ({len(state)} parameters) in {out}")
    return out


def read_logical(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    if not (path / "COMPLETE").is_file():
        raise UserError(f"{path}: incomplete logical state (no COMPLETE marker)")
    # mmap: every rank of a node reads the same pages (a 3B model's state is 36 GB)
    return torch.load(path / "state.pt", map_location="cpu", weights_only=False, mmap=True)


# ---------------------------------------------------------------------------------------------
# Writing a logical state into a live engine


def load_logical(engine, state: dict[str, dict[str, torch.Tensor]], step: int) -> None:
    """Every rank: the fp32 weights and Adam state of `state` into this engine's optimizer and
    module, then DeepSpeed's step counters as if it had loaded its own checkpoint at `step`."""
    named = dict(engine.module.named_parameters())
    pipelined = hasattr(engine, "is_last_stage")
    if pipelined:  # this stage's parameters, under the plain model's names
        named = to_model_state_dict(named)
    missing = sorted(set(named) - set(state))
    unexpected = [] if pipelined else sorted(set(state) - set(named))
    if missing or unexpected:
        raise UserError(f"logical state does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, param in named.items():
        if tuple(state[name]["fp32"].shape) != tuple(shims.full_shape(param)):
            raise UserError(f"logical state: {name!r} is {tuple(state[name]['fp32'].shape)}, "
                            f"the model's {tuple(shims.full_shape(param))}")
    with torch.no_grad():
        partitioned = ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition")
        if any(hasattr(engine.optimizer, a) for a in partitioned):  # ZeRO-1/2/3, BF16_Optimizer
            shims.zero_set_logical_state(engine.optimizer, named, state)
        else:
            shims.zero0_set_logical_state(engine.optimizer, named, state)
    engine.global_steps = step
    engine.global_samples = step * engine.train_batch_size()
    engine.micro_steps = step * engine.gradient_accumulation_steps()
