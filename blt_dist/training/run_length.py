"""How long a run is, and whether it fits: the step count from train.max_steps, or from a byte
or FLOP budget measured on the run's own data; the FLOPs a batch really holds; a memory check
before anything is allocated.
"""
from __future__ import annotations

import os

import torch

from blt_dist.config import Config
from blt_dist.data.loader import Loader
from blt_dist.errors import UserError
from blt_dist.flops import SampleShape, batch_train_flops, params_by_component
from blt_dist.flops import train_flops_per_byte as nominal_flops_per_byte
from blt_dist.parallel.collectives import all_reduce


def measure_per_sample(cfg: Config, spec, rank: int, world_size: int, lanes: int | None = None,
                       probe_bytes: float = 8e6, max_batches: int = 4000) -> tuple[float, float]:
    """(raw bytes, useful training FLOPs) one sample holds, measured on this rank's own data
    stream (a separate loader: the training loader's state is untouched) over about `probe_bytes`
    (documents are up to tens of KB: a short probe sees only a few of them). Deterministic, so a
    resumed run derives the same step count. BLT samples hold fewer bytes and patches than their
    slots (whole patches only) and a BPE token covers a data-dependent number of bytes: a guess
    from the config (assumed patch size, bytes per token) would miss a FLOP budget by the
    difference, and unequally for the two families."""
    probe = Loader(spec, rank, world_size, lanes=lanes)
    total, flops, batches = 0, 0.0, 0
    while total < probe_bytes and batches < max_batches:
        batch = next(probe)
        total += int(batch["target_bytes"].sum())
        flops += batch_flops(cfg, batch).useful
        batches += 1
    measured = torch.tensor([total, flops, batches * spec.micro_batch_size], dtype=torch.float64)
    measured = all_reduce(measured)  # every rank must derive the same step count
    return float(measured[0] / measured[2]), float(measured[1] / measured[2])


def train_flops_per_byte(cfg: Config) -> float:
    """Training FLOPs per byte at the config's nominal shape (assumed patch size or bytes per
    token): the log header's figure; the FLOPs counted per step come from `batch_flops`."""
    return nominal_flops_per_byte(cfg.model, SampleShape.from_data(cfg.data))


def batch_flops(cfg: Config, batch: dict):
    """(useful, executed) training FLOPs of one micro-batch from what its samples really hold:
    filled byte slots (or tokens) and, for BLT, patches; executed counts every slot, padding
    included (flops.batch_train_flops). The assumed mean patch size plays no part."""
    positions = (batch["doc_ids"] >= 0).sum(dim=1).tolist()  # padding has doc id -1
    patches = (batch["patch_lengths"] > 0).sum(dim=1).tolist() if cfg.model.family == "blt" else None
    return batch_train_flops(cfg.model, SampleShape.from_data(cfg.data), positions, patches)


def params_total(cfg: Config) -> int:
    return sum(params_by_component(cfg.model).values())


def total_steps_for(cfg: Config, dp_size: int, measure) -> tuple[int, str]:
    """(steps, how they were derived): train.max_steps if set, else the steps whose bytes meet
    train.max_bytes or whose useful training FLOPs meet train.flops, from `measure()` -> (bytes,
    useful FLOPs) per sample, measured on the run's data (only called then). The LR schedule
    needs the count up front; the log reports the FLOPs and bytes actually spent."""
    t = cfg.train
    if t.max_steps:
        return t.max_steps, "train.max_steps"
    if not (t.max_bytes or t.flops):
        raise UserError("train: set one of max_steps, max_bytes or flops to define the run length")
    bytes_per_sample, flops_per_sample = measure()
    samples_per_step = t.micro_batch_size * t.grad_accum * dp_size
    if t.max_bytes:
        steps = max(1, round(t.max_bytes / (bytes_per_sample * samples_per_step)))
        return steps, f"train.max_bytes={t.max_bytes:.3g} at {bytes_per_sample:.1f} measured bytes/sample"
    steps = max(1, round(t.flops / (flops_per_sample * samples_per_step)))
    return steps, (f"train.flops={t.flops:.3g} at {flops_per_sample:.3g} measured useful FLOPs/sample "
                   f"({bytes_per_sample:.1f} bytes, {flops_per_sample / bytes_per_sample:.3g} FLOPs/byte)")


def check_memory(cfg: Config, world_size: int, device) -> None:
    """Fails fast, before allocating, when weights + gradients + AdamW state cannot fit on CPU."""
    if device.type != "cpu":
        return
    params = params_total(cfg)
    shard = world_size if cfg.parallel.zero_stage >= 1 else 1
    # fp32 weights 4 B + grads 4 B (sharded at ZeRO-2+) + Adam moments 8 B (sharded at ZeRO-1+)
    per_param = 4 + (4 / shard if cfg.parallel.zero_stage >= 2 else 4) + 8 / shard
    if cfg.parallel.zero_stage >= 3:
        per_param = 16 / shard
    needed = params * per_param * (world_size if device.type == "cpu" else 1)  # all ranks share this machine
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if needed > 0.9 * available:
        raise UserError(
            f"model: {params / 1e9:.2f}B parameters need about {needed / 1e9:.1f} GB for weights, gradients and "
            f"AdamW state on this machine ({world_size} ranks, ZeRO-{cfg.parallel.zero_stage}), before activations; "
            f"{available / 1e9:.1f} GB is free. Use a smaller config, more machines, or a GPU cluster."
        )
