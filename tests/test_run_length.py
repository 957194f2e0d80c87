"""Run length from a step count, a byte budget or a FLOP budget."""
from __future__ import annotations

import pytest

from blt_dist.config import load_config
from blt_dist.errors import UserError
from blt_dist.training.run_length import total_steps_for


def test_max_steps_wins_and_skips_the_measurement():
    cfg = load_config("configs/blt/tiny.yaml", ["train.max_steps=7", "train.flops=1e15"])
    steps, source = total_steps_for(cfg, 1, lambda: pytest.fail("measured needlessly"))
    assert (steps, source) == (7, "train.max_steps")


def test_flop_budget_uses_the_measured_useful_flops_per_sample():
    cfg = load_config("configs/blt/tiny.yaml", ["train.max_steps=0", "train.flops=8e12", "train.micro_batch_size=8",
                                                "train.grad_accum=2"])
    # 1e9 useful FLOPs/sample x 8 x 2 x 2 ranks = 3.2e10 FLOPs/step; 8e12 / 3.2e10 = 250 steps
    steps, source = total_steps_for(cfg, 2, lambda: (400.0, 1e9))
    assert steps == 250 and "1e+09 measured useful FLOPs/sample" in source and "400.0 bytes" in source


def test_byte_budget_and_missing_budget():
    cfg = load_config("configs/entropy/tiny.yaml", ["train.max_steps=0", "train.max_bytes=1000000"])
    assert total_steps_for(cfg, 1, lambda: (500.0, 1.0))[0] == round(1e6 / (500 * cfg.train.micro_batch_size))
    with pytest.raises(UserError, match="max_steps, max_bytes or flops"):
        total_steps_for(load_config("configs/entropy/tiny.yaml", ["train.max_steps=0"]), 1, lambda: (1.0, 1.0))
