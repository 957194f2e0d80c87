"""Learning-rate schedules: warmup, end points, monotone decay."""
from __future__ import annotations

import pytest

from blt_dist.config import OptimConfig
from blt_dist.training.schedule import lr_at


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_warmup_is_linear_and_reaches_lr(schedule):
    o = OptimConfig(lr=1.0, warmup_steps=10, schedule=schedule, min_lr_ratio=0.1, decay_fraction=0.2)
    assert [lr_at(s, 100, o) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])


def test_cosine_ends_at_the_floor_and_decays_monotonically():
    o = OptimConfig(lr=2.0, warmup_steps=5, schedule="cosine", min_lr_ratio=0.1)
    lrs = [lr_at(s, 50, o) for s in range(50)]
    assert lrs[5] == pytest.approx(2.0) and lrs[-1] == pytest.approx(0.2)
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:]))


def test_wsd_is_stable_then_decays_to_the_floor():
    o = OptimConfig(lr=1.0, warmup_steps=0, schedule="wsd", min_lr_ratio=0.0, decay_fraction=0.25)
    lrs = [lr_at(s, 100, o) for s in range(100)]
    assert lrs[:75] == [1.0] * 75
    assert lrs[-1] == pytest.approx(0.0) and lrs[75] == pytest.approx(1 - 1 / 25)
