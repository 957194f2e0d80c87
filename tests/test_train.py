"""The trainer end to end, as real processes: runs, resume after kill -9, signals, faults."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from blt_dist.data.prepare import prepare
from blt_dist.data.tokenizer import train_tokenizer
from blt_dist.training.checkpoint import checkpoint_root, list_checkpoints, verify
from tests.conftest import write_word_documents
from tests.distributed import launch, logs, metrics, run, wait

WORDS = "the quick brown fox jumps over a lazy dog while bytes and patches flow through latent space".split()
SMALL = ["data.seq_len=128", "train.micro_batch_size=2", "log.every=1", "train.eval_bytes=3000"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    write_word_documents(root / "in", WORDS, 60, (5, 120))
    prepare([root / "in"], root / "ds", val_fraction=0.1, progress=False)
    train_tokenizer(root / "ds", root / "tok.model", vocab_size=300)
    return root


def assert_val_is_what_compare_scores(run_dir: Path) -> None:
    """The run's final val_bpb is evaluate_model's (what `compare` uses) on its export, on the
    same documents: whole validation documents up to train.eval_bytes per content type."""
    from blt_dist.evaluation.evaluate import evaluate_model, heldout_documents
    from blt_dist.model.weights import load_export

    model, cfg = load_export(run_dir / "export")
    final = [r for r in metrics(run_dir) if "val_bpb" in r][-1]
    scored = evaluate_model(model, cfg, heldout_documents(cfg.data.val, [], "val", cfg.train.eval_bytes))
    assert (final["val_bytes"], final["val_documents"]) == (scored["bytes"], scored["documents"])
    # equal but for float rounding: compare batches 8 samples, the trainer a micro-batch
    assert final["val_bpb"] == pytest.approx(scored["bpb"], rel=1e-6, abs=0), (final, scored["bpb"])


def family_args(data: Path, family: str) -> list[str]:
    common = [f"data.train={data / 'ds'}", f"data.val={data / 'ds'}"]
    if family == "blt":
        return ["configs/blt/tiny.yaml", *common, "data.patching.mode=space", "data.byte_capacity=128",
                "data.patches_per_sample=48", "train.micro_batch_size=2", "log.every=1", "train.eval_bytes=3000"]
    if family == "bpe":
        return ["configs/bpe/tiny.yaml", *common, f"data.tokenizer={data / 'tok.model'}", "model.vocab_size=300",
                "data.tokens_per_sample=32", "train.micro_batch_size=2", "log.every=1", "train.eval_bytes=3000"]
    return ["configs/entropy/tiny.yaml", *common, *SMALL]


@pytest.mark.parametrize("family", ["entropy", "blt", "bpe"])
def test_one_process_run_writes_metrics_checkpoint_and_export(data, tmp_path, family):
    run_dir = tmp_path / "run"
    run(1, ["train", *family_args(data, family), f"run.dir={run_dir}", "train.max_steps=3", "train.eval_every=2"],
        tmp_path / "logs")
    records = [r for r in metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(np.isfinite([r["loss"], r["bpb"], r["lr"], r["grad_norm"], r["mfu"]]).all() for r in records)
    assert any("val_bpb" in r for r in metrics(run_dir))
    if family == "blt":
        assert all(1.0 < r["mean_patch_size"] < 16 for r in records)
    for name in ("config.yaml", "deepspeed.json", "provenance.json"):
        assert (run_dir / name).is_file()
    ok, reason, marker = verify(checkpoint_root(run_dir) / "step_00000003")
    assert ok, reason
    from blt_dist.model.weights import load_export

    model, cfg = load_export(run_dir / "export")
    assert cfg.model.family == family and sum(p.numel() for p in model.parameters()) > 0
    assert_val_is_what_compare_scores(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage, family", [(0, "entropy"), (1, "blt"), (1, "bpe"), (2, "blt"), (2, "bpe"),
                                                (3, "blt"), (3, "bpe")])
def test_resume_after_kill_9_is_bit_exact(data, tmp_path, zero_stage, family):
    args = ["train", *family_args(data, family), f"parallel.zero_stage={zero_stage}", "train.max_steps=4",
            "checkpoint.every=2", "data.num_workers=0"]
    straight = tmp_path / "straight"
    run(2, [*args, f"run.dir={straight}"], tmp_path / "logs_straight")
    killed = tmp_path / "killed"
    codes = wait(launch(2, [*args, f"run.dir={killed}"], tmp_path / "logs_killed", {"BLT_FAULTS": "kill_after_step=3"}),
                 tmp_path / "logs_killed")
    assert codes[0] == -signal.SIGKILL, logs(tmp_path / "logs_killed")
    assert [p.name for p in list_checkpoints(killed)] == ["step_00000002"]  # step 3 never saved
    run(2, [*args, f"run.dir={killed}"], tmp_path / "logs_resumed")
    keys = ("step", "loss", "bpb", "grad_norm", "data_digest", "lr")
    expected = [tuple(r[k] for k in keys) for r in metrics(straight) if "loss" in r]
    got = [tuple(r[k] for k in keys) for r in metrics(killed) if "loss" in r]
    # the killed run logged steps 1-2, the resumed one 3-4: together, bit for bit the straight run
    assert got == expected
    from blt_dist.model.weights import load_export

    (a, _), (b, _) = load_export(straight / "export"), load_export(killed / "export")  # consolidated shards
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    if zero_stage in (1, 3):  # documents split over 2 ranks (ZeRO-1), or all on each (ZeRO-3): one score
        assert_val_is_what_compare_scores(straight)
    if (zero_stage, family) == (1, "bpe"):  # a changed global batch would not continue the run: refused
        codes = wait(launch(1, [*args, f"run.dir={killed}", "train.grad_accum=3"], tmp_path / "logs_batch"),
                     tmp_path / "logs_batch")
        assert codes == [1] and "the checkpoint's is 4" in logs(tmp_path / "logs_batch")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["blt", "bpe"])
def test_two_stage_pipeline_resume_after_kill_9_is_bit_exact(data, tmp_path, family):
    args = ["train", *family_args(data, family), "parallel.pipeline_stages=2", "parallel.zero_stage=1",
            "train.grad_accum=2", "train.max_steps=4", "checkpoint.every=2"]
    straight = tmp_path / "straight"
    run(2, [*args, f"run.dir={straight}"], tmp_path / "logs_straight")
    killed = tmp_path / "killed"
    wait(launch(2, [*args, f"run.dir={killed}"], tmp_path / "logs_killed", {"BLT_FAULTS": "kill_after_step=3"}),
         tmp_path / "logs_killed")
    run(2, [*args, f"run.dir={killed}"], tmp_path / "logs_resumed")
    keys = ("step", "loss", "bpb", "grad_norm", "data_digest")
    expected = [tuple(r[k] for k in keys) for r in metrics(straight) if "loss" in r]
    assert [tuple(r[k] for k in keys) for r in metrics(killed) if "loss" in r] == expected
    assert len(expected) == 4 and all(np.isfinite(r[1]) for r in expected)
    from blt_dist.model.weights import load_export

    model, cfg = load_export(straight / "export")  # consolidated from the pipeline's layer files
    assert cfg.parallel.pipeline_stages == 2 and cfg.model.family == family
    assert_val_is_what_compare_scores(straight)  # the pipeline scores the same documents the same way


@pytest.mark.slow
def test_every_layout_exports_the_same_fp32_master_weights(data, tmp_path):
    """One bf16 recipe and seed on ZeRO-0, 1, 2 and 3 and 2-stage pipelines: the exports agree to
    fp32 rounding and hold the fp32 masters, not the bf16 module weights (which differ from them
    by up to 1e-3: a bf16-only export fails). The ZeRO-0 run also covers the undone warm-up step
    of DeepSpeed's unfused optimizer (shims.undo_unfused_optimizer_init_step): with it, ZeRO-0's
    first update was 0.74 lr and its weights 8e-4 away after three steps.

    Two steps, not more: the optimizers' fp32 arithmetic differs in rounding (one flat tensor or
    a list), and once a master crosses a bf16 rounding boundary the next forward differs by a
    bf16 ulp; from step 3 on the layouts drift apart by ~1e-5 (measured), as any two mixed-precision
    implementations do."""
    from safetensors.torch import load_file

    from blt_dist.parallel.pipeline import consolidate_pipeline_checkpoint

    common = ["train", *family_args(data, "entropy"), "train.dtype=bf16", "train.max_steps=2", "run.seed=7"]
    layouts = {"zero0": (1, ["parallel.zero_stage=0"]), "zero1": (1, ["parallel.zero_stage=1"]),
               "zero2": (1, ["parallel.zero_stage=2"]), "zero3": (1, ["parallel.zero_stage=3"]),
               "pipeline": (2, ["parallel.pipeline_stages=2", "parallel.zero_stage=1"]),
               "pipeline_zero0": (2, ["parallel.pipeline_stages=2", "parallel.zero_stage=0"])}
    exports = {}
    for name, (nproc, extra) in layouts.items():
        run(nproc, [*common, *extra, f"run.dir={tmp_path / name}"], tmp_path / f"logs_{name}")
        exports[name] = load_file(tmp_path / name / "export" / "model.safetensors")
    reference = exports["zero1"]
    assert not all(torch.equal(t, t.bfloat16().float()) for t in reference.values()), "not the fp32 masters"
    for name in ("zero0", "zero2", "zero3", "pipeline"):
        assert exports[name].keys() == reference.keys()
        worst = max((exports[name][k] - reference[k]).abs().max().item() for k in reference)
        assert worst <= 1e-6, f"{name}: {worst:.3g} from ZeRO-1's export"
    # A pipeline at ZeRO-0 runs DeepSpeed's BF16_Optimizer, which trains measurably differently
    # (1.9e-4 from ZeRO-1 after two steps; its step-1 grad norm already differs in the 7th digit):
    # not compared with the others. Its export is its masters, which round to its layer weights.
    module = consolidate_pipeline_checkpoint(checkpoint_root(tmp_path / "pipeline_zero0") / "step_00000002")
    assert all(torch.equal(exports["pipeline_zero0"][k].bfloat16().float(), module[k]) for k in module)


@pytest.mark.slow
def test_stop_signal_on_one_rank_stops_both_at_the_same_step(data, tmp_path):
    run_dir = tmp_path / "run"
    procs = launch(2, ["train", *family_args(data, "entropy"), f"run.dir={run_dir}", "train.max_steps=100000",
                       "parallel.zero_stage=1"], tmp_path / "logs")
    deadline = time.monotonic() + 120
    while not metrics(run_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    os.kill(procs[1].pid, signal.SIGUSR2)  # only rank 1 is told
    assert wait(procs, tmp_path / "logs") == [0, 0], logs(tmp_path / "logs")
    (tag_dir,) = list_checkpoints(run_dir)
    assert verify(tag_dir)[0] and (tag_dir / "rank_00000.pt").is_file() and (tag_dir / "rank_00001.pt").is_file()
    step = int(tag_dir.name.split("_")[1])
    assert 0 < step < 100000 and metrics(run_dir)[-1]["step"] <= step
    assert "stopped by" in logs(tmp_path / "logs")


def test_damaged_newest_checkpoint_falls_back(data, tmp_path):
    run_dir = tmp_path / "run"
    args = ["train", *family_args(data, "entropy"), f"run.dir={run_dir}", "checkpoint.every=2", "checkpoint.keep_last=3"]
    run(1, [*args, "train.max_steps=4"], tmp_path / "logs1")
    shard = next((checkpoint_root(run_dir) / "step_00000004").glob("*model_states.pt"))
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    run(1, [*args, "train.max_steps=6"], tmp_path / "logs2")
    text = logs(tmp_path / "logs2")
    assert "step_00000004: skipped" in text and "resumed from step_00000002" in text
    assert [r["step"] for r in metrics(run_dir) if "loss" in r][-4:] == [3, 4, 5, 6]


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_nonfinite_steps_are_skipped_then_abort(data, tmp_path, zero_stage):
    from blt_dist.training.checkpoint import consolidated_state_dict

    run_dir = tmp_path / "skip"
    args = ["train", *family_args(data, "entropy"), "checkpoint.every=1", "checkpoint.keep_last=5",
            f"parallel.zero_stage={zero_stage}"]
    run(1, [*args, f"run.dir={run_dir}", "train.max_steps=3"], tmp_path / "logs1", {"BLT_FAULTS": "nan_at_steps=2"})
    assert "non-finite loss; update skipped" in logs(tmp_path / "logs1")
    before = consolidated_state_dict(checkpoint_root(run_dir) / "step_00000001")
    after = consolidated_state_dict(checkpoint_root(run_dir) / "step_00000002")
    assert all(torch.equal(before[k], after[k]) for k in before), "a skipped step changed the weights"
    abort_dir = tmp_path / "abort"
    codes = wait(launch(1, [*args, f"run.dir={abort_dir}", "train.max_steps=10", "train.max_nonfinite_steps=2"],
                        tmp_path / "logs2", {"BLT_FAULTS": "nan_at_steps=2,3,4"}), tmp_path / "logs2")
    assert codes == [1] and "aborting: 2 consecutive non-finite losses" in logs(tmp_path / "logs2")
    # steps 2 and 3 were skipped: every checkpoint left is complete and holds step 1's weights
    saved = list_checkpoints(abort_dir)
    assert [p.name for p in saved] == ["step_00000001", "step_00000002"] and all(verify(p)[0] for p in saved)
    first, last = (consolidated_state_dict(p) for p in saved)
    assert all(torch.equal(first[k], last[k]) and torch.isfinite(last[k]).all() for k in first)


def test_bad_requests_fail_fast_with_one_line(data, tmp_path):
    from tests.conftest import run_cli

    common = [*family_args(data, "entropy"), f"run.dir={tmp_path / 'r'}", "train.max_steps=2"]
    fp16 = run_cli("train", *common, "train.dtype=fp16")
    assert fp16.returncode == 1 and "fp16 needs a GPU" in fp16.stderr
    big = run_cli("train", "configs/blt/3b.yaml", f"data.train={data / 'ds'}", f"run.dir={tmp_path / 'big'}")
    assert big.returncode == 1 and "GB for weights, gradients and AdamW state" in big.stderr
    nothing = run_cli("train", *common, f"checkpoint.resume_from={tmp_path / 'empty'}")
    assert nothing.returncode == 1 and "holds no complete checkpoint" in nothing.stderr


def test_init_from_starts_a_fresh_run_from_an_exports_weights(data, tmp_path):
    from safetensors.torch import load_file

    from tests.conftest import run_cli

    first, second = tmp_path / "first", tmp_path / "second"
    common = [*family_args(data, "entropy"), "train.eval_every=0"]
    run(1, ["train", *common, f"run.dir={first}", "train.max_steps=3"], tmp_path / "logs1")
    # one step at a learning rate of 1e-12: the weights it ends with are the ones it started from
    run(1, ["train", *common, f"run.dir={second}", "train.max_steps=1", f"train.init_from={first / 'export'}",
            "optim.lr=1e-12", "optim.warmup_steps=0"], tmp_path / "logs2")
    assert "weights from" in logs(tmp_path / "logs2")
    start, after = load_file(str(first / "export" / "model.safetensors")), load_file(str(second / "export" / "model.safetensors"))
    assert start.keys() == after.keys()
    assert max(float((start[k] - after[k]).abs().max()) for k in start) < 1e-6
    assert [r["step"] for r in metrics(second) if "loss" in r] == [1]  # a fresh run: step and optimizer from 0

    other = run_cli("train", *common, f"run.dir={tmp_path / 'other'}", "train.max_steps=1", "model.dim=64",
                    f"train.init_from={first / 'export'}")
    assert other.returncode == 1 and "has another model: model.dim (export 128, this run 64)" in other.stderr
    missing = run_cli("train", *common, f"run.dir={tmp_path / 'none'}", f"train.init_from={tmp_path}")
    assert missing.returncode == 1 and "is not a model export" in missing.stderr


def test_disk_full_during_save_leaves_the_previous_checkpoint(data, tmp_path):
    """A real full disk: the run directory on a tmpfs that holds one checkpoint, not two."""
    import subprocess

    mount = tmp_path / "small_disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=22m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        run_dir = mount / "run"
        codes = wait(launch(1, ["train", *family_args(data, "entropy"), f"run.dir={run_dir}", "train.max_steps=4",
                                "checkpoint.every=2", "checkpoint.keep_last=1"], tmp_path / "logs"), tmp_path / "logs")
        text = logs(tmp_path / "logs")
        assert codes == [1], text  # finished, but without its final checkpoint: not a success
        assert "save failed on rank 0" in text and " MB free on " in text
        assert "earlier checkpoints are untouched" in text and "the newest checkpoint is step 2" in text
        assert [p.name for p in list_checkpoints(run_dir)] == ["step_00000002"] and verify(run_dir / "checkpoints" / "step_00000002")[0]
        assert [r["step"] for r in metrics(run_dir) if "loss" in r] == [1, 2, 3, 4]  # training went on
    finally:
        subprocess.run(["umount", "-l", str(mount)])


def test_wandb_offline_run_id_survives_a_resume(data, tmp_path):
    run_dir = tmp_path / "run"
    args = ["train", *family_args(data, "entropy"), f"run.dir={run_dir}", "log.wandb=true", "checkpoint.every=2"]
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    run(1, [*args, "train.max_steps=2"], tmp_path / "logs1", env)
    run(1, [*args, "train.max_steps=4"], tmp_path / "logs2", env)
    saved = torch.load(checkpoint_root(run_dir) / "step_00000002" / "rank_00000.pt", weights_only=False)
    runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(saved["wandb_id"]) for name in runs), runs


def _wait_unaided(procs, log_dir, timeout: float = 180) -> list[int]:
    """Exit codes, without killing anyone: a rank still running at the timeout was left waiting."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.2)
    stuck = [rank for rank, p in enumerate(procs) if p.poll() is None]
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert not stuck, f"ranks {stuck} were left waiting after another failed mid-save\n{logs(log_dir)}"
    return [p.returncode for p in procs]


@pytest.mark.slow
@pytest.mark.parametrize("kind, allowed, expected", [
    ("io", 0, "stop"),  # a full disk on rank 1 at the periodic save of step 2: the run stops, clearly
    ("io", 1, "finish"),  # ... unless checkpoint.max_failed_saves lets it train on
    ("bug", 0, "raise"),  # not an I/O error: a bug; every rank raises, none hangs
])
def test_a_save_that_fails_on_one_rank_of_two(data, tmp_path, kind, allowed, expected):
    run_dir, log_dir = tmp_path / "run", tmp_path / "logs"
    args = ["train", *family_args(data, "entropy"), f"run.dir={run_dir}", "train.max_steps=4", "checkpoint.every=2",
            "parallel.zero_stage=1", f"checkpoint.max_failed_saves={allowed}"]  # ZeRO-1: rank 1 writes its own shard
    codes = _wait_unaided(launch(2, args, log_dir, {"BLT_FAULTS": f"save_error=2:1:{kind}"}), log_dir)
    text = logs(log_dir)
    if expected == "finish":
        assert codes == [0, 0], text
        assert "save failed on rank 1" in text and [p.name for p in list_checkpoints(run_dir)] == ["step_00000004"]
        assert (run_dir / "export" / "model.safetensors").is_file()
        return
    assert codes[0] != 0 and codes[1] != 0, text
    assert list_checkpoints(run_dir) == [], text  # the partial step-2 directory was removed
    assert (run_dir / "metrics.jsonl").is_file() and max(r["step"] for r in metrics(run_dir)) == 2  # no step 3
    if expected == "stop":
        assert "save failed on rank 1" in text and "No space left on device" in text, text
        assert "stopping at step 2 (1 failed saves, checkpoint.max_failed_saves=0)" in text, text
    else:
        assert "BLT_FAULTS: injected bug while saving" in text, text  # rank 1's own traceback
        assert "rank 1 failed while saving with an error that is not I/O" in text, text  # rank 0
