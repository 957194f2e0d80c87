"""Learning rate as a pure function of the step (nothing to checkpoint, nothing to drift).

    cosine:   linear warmup to lr, cosine decay to lr * min_lr_ratio at the last step
    wsd:      warmup, stable at lr, then linear decay to lr * min_lr_ratio over the last
              decay_fraction of the steps (warmup-stable-decay)
    constant: warmup, then lr
"""
from __future__ import annotations

import math

from blt_dist.config import OptimConfig


def lr_at(step: int, total_steps: int, o: OptimConfig) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`."""
    if o.warmup_steps > 0 and step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    floor = o.lr * o.min_lr_ratio
    if o.schedule == "constant":
        return o.lr
    if o.schedule == "cosine":
        span = max(total_steps - 1 - o.warmup_steps, 1)
        progress = min(max(step - o.warmup_steps, 0) / span, 1.0)
        return floor + (o.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if o.schedule == "wsd":
        decay_steps = max(int(round(total_steps * o.decay_fraction)), 1)
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return o.lr
        progress = min((step - decay_start + 1) / decay_steps, 1.0)
        return o.lr + (floor - o.lr) * progress
    raise ValueError(f"unknown schedule {o.schedule!r}")
