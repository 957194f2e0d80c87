"""zero_memory: counting what a training engine holds, and real 2-rank DeepSpeed engines."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from blt_dist.bench.workloads import CONFIGS as REPO_CONFIGS
from blt_dist.bench.zero_memory import engine_state_bytes, held_storages, measure_zero_state
from blt_dist.errors import UserError


def test_a_storage_counts_once_however_many_views_reach_it():
    flat = torch.zeros(100)
    model = nn.Linear(4, 5)
    model.weight.data = flat[:20].view(5, 4)  # views into one flat buffer, as ZeRO's flat groups
    model.bias.data = flat[20:25]
    found = held_storages({"module": model, "again": [flat, {"view": flat[50:]}]})
    assert list(found.values()) == [(400, torch.float32, "module.parameters")]


def test_a_plain_adamw_holds_weights_gradients_and_two_moments():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 8)).sum().backward()
    optimizer.step()

    class Engine:  # the two attributes engine_state_bytes reads from a DeepSpeed engine
        pass

    engine = Engine()
    engine.module, engine.optimizer = model, optimizer
    params = sum(p.numel() for p in model.parameters())
    held = engine_state_bytes(engine)
    steps = 4 * len(optimizer.state)  # AdamW keeps its step count as one fp32 scalar per tensor
    assert held["bytes"] == 4 * params * 4 + steps  # weights, gradients, exp_avg, exp_avg_sq
    assert held["by_holder"] == {"optimizer.state": 8 * params + steps, "module.parameters": 4 * params,
                                 "module.parameters.grad": 4 * params}


def test_bad_requests_are_refused_before_starting_ranks(tmp_path):
    with pytest.raises(UserError, match="ZeRO stages are 0..3"):
        measure_zero_state(REPO_CONFIGS / "blt" / "tiny.yaml", stages=(4,))
    with pytest.raises(UserError, match="does not exist"):
        measure_zero_state(tmp_path / "nope.yaml")


@pytest.mark.slow
def test_two_ranks_split_the_optimizer_state_from_zero_1_on():
    zero0, zero1 = measure_zero_state(REPO_CONFIGS / "blt" / "tiny.yaml", ranks=2, stages=(0, 1), dtype="bf16")
    params = zero0["params"]
    # ZeRO-0, bf16: every rank holds bf16 weights and gradients, fp32 master weights and moments
    assert zero0["bytes_per_rank"][0] == zero0["bytes_per_rank"][1]
    assert zero0["bytes_per_rank"][0] == pytest.approx(16 * params, rel=0.01)
    assert zero0["by_dtype"]["bfloat16"] == pytest.approx(4 * params, rel=0.01)
    # ZeRO-1: master weights and moments are split between the two ranks
    moments = zero0["by_holder"]["optimizer.optimizer"]
    assert zero1["by_holder"]["optimizer.optimizer"] == pytest.approx(moments / 2, rel=0.02)
    assert max(zero1["bytes_per_rank"]) < 0.6 * zero0["bytes_per_rank"][0]


def test_fp16_without_a_gpu_is_refused_before_starting_ranks():
    if torch.cuda.is_available():
        pytest.skip("fp16 is allowed with CUDA")
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        measure_zero_state(REPO_CONFIGS / "blt" / "tiny.yaml", dtype="fp16")


@pytest.mark.slow
def test_a_smaller_reduce_bucket_shrinks_what_zero_3_holds():
    (default,) = measure_zero_state(REPO_CONFIGS / "blt" / "tiny.yaml", ranks=2, stages=(3,), dtype="bf16")
    (small,) = measure_zero_state(REPO_CONFIGS / "blt" / "tiny.yaml", ranks=2, stages=(3,), dtype="bf16",
                                  overrides=["parallel.reduce_bucket_size=1e6"])
    # DeepSpeed's default bucket, 5e8 bf16 elements, against one of 1e6 elements: the rest is equal
    assert default["by_holder"]["optimizer.ipg_buckets"] == 2 * 500_000_000
    assert small["by_holder"]["optimizer.ipg_buckets"] == 2 * 1_000_000
    assert default["bytes_per_rank"][0] - small["bytes_per_rank"][0] == 2 * (500_000_000 - 1_000_000)
