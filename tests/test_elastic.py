"""Elastic resume: a run saved at one data-parallel layout continues at another (world size, ZeRO
stage), with the same global micro-batches and, in fp32, the same losses to float rounding."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from blt_dist.config import load_config
from blt_dist.data.prepare import prepare
from blt_dist.errors import UserError
from blt_dist.training import elastic
from blt_dist.training.checkpoint import checkpoint_root, list_checkpoints, prune
from tests.conftest import write_word_documents
from tests.distributed import launch, metrics, run, wait

WORDS = "the quick brown fox jumps over a lazy dog while bytes and patches flow through latent space".split()


def marker(**kw) -> dict:
    base = {"world_size": 2, "zero_stage": 0, "pipeline_stages": 1, "grad_accum": 2, "micro_batch_size": 2,
            "global_batch": 8, "lanes": 4, "total_steps": 6, "step": 3}
    return {**base, **kw}


def config(**train) -> object:
    cfg = load_config("configs/entropy/tiny.yaml")
    t = dataclasses.replace(cfg.train, **{"micro_batch_size": 2, "grad_accum": 2, **train})
    return dataclasses.replace(cfg, train=t)


# ---------------------------------------------------------------------------------------------
# The plan: what a layout change derives, and what it refuses before touching any state


def test_grad_accum_is_derived_from_the_saved_global_batch():
    cfg, change = elastic.plan(config(), 1, marker())
    assert cfg.train.grad_accum == 4
    assert change.describe(3) == "resumed step 3 saved at 2 ranks ZeRO-0 on 1 rank ZeRO-0, grad_accum 2 -> 4"
    cfg, change = elastic.plan(config(), 4, marker())
    assert cfg.train.grad_accum == 1
    assert elastic.plan(config(), 2, marker()) == (config(), None)  # same layout: DeepSpeed's own load


def test_changes_that_would_not_continue_the_run_are_refused():
    with pytest.raises(UserError, match="does not split over 3 data-parallel ranks"):
        elastic.plan(config(), 3, marker())
    with pytest.raises(UserError, match="train.grad_accum=3 gives a global batch of 12"):
        elastic.plan(config(grad_accum=3), 2, marker())
    with pytest.raises(UserError, match="train.micro_batch_size"):
        elastic.plan(config(micro_batch_size=4), 1, marker())
    cfg = config()
    with pytest.raises(UserError, match="data.lanes: the checkpoint has 4, this run 8"):
        elastic.plan(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, lanes=8)), 1, marker())
    with pytest.raises(UserError, match="pipeline checkpoint in fp32 at ZeRO-0"):
        elastic.plan(config(grad_accum=4), 1, marker(pipeline_stages=2, grad_accum=4), Path("/nonexistent"))
    old = marker()
    del old["lanes"]
    with pytest.raises(UserError, match="written before elastic resume"):
        elastic.plan(config(), 1, old)


def test_pruning_a_checkpoint_removes_its_logical_state(tmp_path):
    root = checkpoint_root(tmp_path)
    for step in (2, 4, 6):
        (root / f"step_{step:08d}").mkdir(parents=True)
        (root / f"step_{step:08d}" / "COMPLETE").write_text("{}")
    (root / "step_00000002.logical").mkdir()
    (root / "step_00000004.logical").mkdir()
    prune(tmp_path, keep_last=2, permanent_every=0)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000004", "step_00000004.logical", "step_00000006"]


# ---------------------------------------------------------------------------------------------
# Real runs: kill at 2 ranks, resume at 1 and 4, on every ZeRO stage


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("elastic")
    write_word_documents(root / "in", WORDS, 60, (5, 120))
    prepare([root / "in"], root / "ds", val_fraction=0.1, progress=False)
    return root


def args_for(data: Path, run_dir: Path, zero_stage: int, *extra: str) -> list[str]:
    return ["train", "configs/entropy/tiny.yaml", f"data.train={data / 'ds'}", f"data.val={data / 'ds'}",
            "data.seq_len=128", "train.micro_batch_size=2", "train.grad_accum=2", "log.every=1",
            "train.eval_bytes=3000", "train.max_steps=6", "checkpoint.every=3", "data.lanes=4",
            f"parallel.zero_stage={zero_stage}", f"run.dir={run_dir}", *extra]


def steps(run_dir: Path) -> list[dict]:
    return [r for r in metrics(run_dir) if "loss" in r]


def assert_continues(reference: Path, resumed: Path, rel: float) -> float:
    """Every step's data digest equal, losses and grad norms within `rel`; returns the worst loss
    difference (relative)."""
    want, got = steps(reference), steps(resumed)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, 7))
    assert [r["data_digest"] for r in got] == [r["data_digest"] for r in want]
    worst = 0.0
    for a, b in zip(want, got):
        for key in ("loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=rel, abs=0), (a["step"], key, a[key], b[key])
        worst = max(worst, abs(a["loss"] - b["loss"]) / a["loss"])
    return worst


def assert_exports_close(a: Path, b: Path, atol: float) -> None:
    from safetensors.torch import load_file

    x, y = load_file(a / "export" / "model.safetensors"), load_file(b / "export" / "model.safetensors")
    assert x.keys() == y.keys()
    worst = max((x[k] - y[k]).abs().max().item() for k in x)
    assert worst <= atol, worst


@pytest.fixture(scope="module")
def saved(data, tmp_path_factory):
    """Per source ZeRO stage: the uninterrupted 2-rank run and one killed after step 4 (its
    newest checkpoint is step 3)."""
    root = tmp_path_factory.mktemp("saved")
    out = {}
    for stage in (0, 1, 2, 3):
        straight, killed = root / f"straight{stage}", root / f"killed{stage}"
        run(2, args_for(data, straight, stage), root / f"logs_straight{stage}")
        codes = wait(launch(2, args_for(data, killed, stage), root / f"logs_killed{stage}",
                            {"BLT_FAULTS": "kill_after_step=4"}), root / f"logs_killed{stage}")
        assert codes[0] != 0
        assert [p.name for p in list_checkpoints(killed)] == ["step_00000003"]
        out[stage] = (straight, killed)
    return out


# (source stage, world size, target stage): every stage into another world size, and each
# stage change (1 <-> 3 and into / out of ZeRO-0 included) at least once
PAIRS = [(0, 1, 0), (0, 4, 3), (1, 1, 3), (1, 4, 1), (2, 1, 0), (2, 4, 2), (3, 1, 1), (3, 4, 3), (3, 1, 0)]


@pytest.mark.slow
@pytest.mark.parametrize("source, world_size, target", PAIRS)
def test_kill_at_two_ranks_resume_at_another_layout(data, saved, tmp_path, source, world_size, target):
    straight, killed = saved[source]
    resumed = tmp_path / "resumed"
    shutil.copytree(killed, resumed)
    run(world_size, args_for(data, resumed, target), tmp_path / "logs")
    text = (tmp_path / "logs" / "rank0.log").read_text()
    accum = {1: 4, 4: 1}[world_size]
    line = (f"resumed step 3 saved at 2 ranks ZeRO-{source} on {world_size} rank{'s' if world_size > 1 else ''} "
            f"ZeRO-{target}, grad_accum 2 -> {accum}")
    assert line in text, text[-3000:]
    # fp32: the regrouped micro-batches change float reduction order only (measured <= 2e-8)
    worst = assert_continues(straight, resumed, rel=1e-5)
    print(f"[elastic] 2 ranks ZeRO-{source} -> {world_size} ZeRO-{target}: worst loss difference {worst:.1e}")
    assert_exports_close(straight, resumed, atol=1e-5)
    marker = json.loads((checkpoint_root(resumed) / "step_00000006" / "COMPLETE").read_text())
    assert (marker["world_size"], marker["zero_stage"], marker["lanes"], marker["global_batch"]) == (
        world_size, target, 4, 8)
    assert (checkpoint_root(resumed) / "step_00000003.logical" / "COMPLETE").is_file()
    assert torch.load(checkpoint_root(killed) / "step_00000003" / "rank_00000.pt", weights_only=False)["step"] == 3


@pytest.fixture(scope="module")
def saved_pipeline(data, tmp_path_factory):
    """A 2-stage pipeline on 2 ranks (ZeRO-1, fp32), uninterrupted and killed after step 4."""
    root = tmp_path_factory.mktemp("saved_pipeline")
    straight, killed = root / "straight", root / "killed"
    extra = ("parallel.pipeline_stages=2", "train.grad_accum=4")  # one data-parallel rank: the same global batch
    run(2, args_for(data, straight, 1, *extra), root / "logs_straight")
    wait(launch(2, args_for(data, killed, 1, *extra), root / "logs_killed", {"BLT_FAULTS": "kill_after_step=4"}),
         root / "logs_killed")
    assert [p.name for p in list_checkpoints(killed)] == ["step_00000003"]
    return straight, killed


@pytest.mark.slow
@pytest.mark.parametrize("world_size, target", [(1, 1), (2, 2)])
def test_a_pipeline_checkpoint_resumes_without_stages(data, saved_pipeline, tmp_path, world_size, target):
    straight, killed = saved_pipeline
    resumed = tmp_path / "resumed"
    shutil.copytree(killed, resumed)
    run(world_size, args_for(data, resumed, target, "train.grad_accum=4"), tmp_path / "logs")
    text = (tmp_path / "logs" / "rank0.log").read_text()
    assert f"resumed step 3 saved at 2 ranks ZeRO-1 x 2 pipeline stages on {world_size} rank" in text
    print(f"[elastic] pipeline -> {world_size} ranks ZeRO-{target}: worst loss difference "
          f"{assert_continues(straight, resumed, rel=1e-5):.1e}")
    assert_exports_close(straight, resumed, atol=1e-5)


@pytest.mark.slow
def test_a_data_parallel_checkpoint_resumes_as_a_pipeline(data, saved, tmp_path):
    straight, killed = saved[1]
    resumed = tmp_path / "resumed"
    shutil.copytree(killed, resumed)
    run(2, args_for(data, resumed, 1, "parallel.pipeline_stages=2"), tmp_path / "logs")
    text = (tmp_path / "logs" / "rank0.log").read_text()
    assert "resumed step 3 saved at 2 ranks ZeRO-1 on 2 ranks ZeRO-1 x 2 pipeline stages, grad_accum 2 -> 4" in text
    print(f"[elastic] 2 ranks ZeRO-1 -> 2-stage pipeline: worst loss difference "
          f"{assert_continues(straight, resumed, rel=1e-5):.1e}")
    assert_exports_close(straight, resumed, atol=1e-5)


@pytest.mark.slow
def test_a_resume_at_the_same_layout_takes_deepspeeds_own_load(data, saved, tmp_path):
    """No logical state is made, and the run is bit-exact (the digest, loss and grad norm of
    every step equal the uninterrupted run's)."""
    straight, killed = saved[2]
    resumed = tmp_path / "resumed"
    shutil.copytree(killed, resumed)
    run(2, args_for(data, resumed, 2), tmp_path / "logs")
    assert not (checkpoint_root(resumed) / "step_00000003.logical").exists()
    keys = ("step", "loss", "grad_norm", "data_digest")
    assert [tuple(r[k] for k in keys) for r in steps(resumed)] == [tuple(r[k] for k in keys) for r in steps(straight)]


@pytest.mark.slow
@pytest.mark.parametrize("source, target", [
    (("parallel.zero_stage=0", "train.grad_accum=2"), ("parallel.zero_stage=3", "train.grad_accum=2")),
    (("parallel.zero_stage=1", "parallel.pipeline_stages=2", "train.grad_accum=4"),
     ("parallel.zero_stage=1", "train.grad_accum=4")),
], ids=["zero0-to-zero3", "pipeline-to-zero1"])
def test_bf16_resumes_at_another_layout(data, tmp_path, source, target):
    """bf16: ZeRO-0's unfused optimizer and a pipeline's BF16_Optimizer, read into one rank.
    Regrouped micro-batches change bf16 rounding: uninterrupted 1- and 2-rank bf16 runs already
    differ by 7e-5 in loss (measured); the resumed runs stay within 1e-3 (measured 2.3e-4)."""
    straight, killed, resumed = tmp_path / "straight", tmp_path / "killed", tmp_path / "resumed"
    run(2, args_for(data, straight, 0, *source, "train.dtype=bf16"), tmp_path / "logs_straight")
    wait(launch(2, args_for(data, killed, 0, *source, "train.dtype=bf16"), tmp_path / "logs_killed",
                {"BLT_FAULTS": "kill_after_step=4"}), tmp_path / "logs_killed")
    shutil.copytree(killed, resumed)
    run(1, args_for(data, resumed, 0, *target, "train.dtype=bf16"), tmp_path / "logs")
    assert "resumed step 3 saved at 2 ranks" in (tmp_path / "logs" / "rank0.log").read_text()
    print(f"[elastic] bf16 {source} -> 1 rank {target}: worst loss difference "
          f"{assert_continues(straight, resumed, rel=1e-3):.1e}")


@pytest.mark.slow
def test_a_checkpoint_that_cannot_be_converted_stops_every_rank(data, saved, tmp_path):
    """An optimizer shard damaged in place (same size, so the marker's sizes still match): rank 0
    cannot read it, and all four ranks stop with its message instead of waiting for it."""
    _, killed = saved[1]
    resumed = tmp_path / "resumed"
    shutil.copytree(killed, resumed)
    shard = checkpoint_root(resumed) / "step_00000003" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(bytes(shard.stat().st_size))
    codes = wait(launch(4, args_for(data, resumed, 1), tmp_path / "logs"), tmp_path / "logs", timeout=240)
    assert codes == [1, 1, 1, 1]
    for rank in range(4):
        assert "could not read its state for the new layout" in (tmp_path / "logs" / f"rank{rank}.log").read_text()
    assert sorted(p.name for p in checkpoint_root(resumed).glob("step_*")) == ["step_00000003"]  # nothing half-made
