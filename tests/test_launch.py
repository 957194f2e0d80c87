"""launch/ without a Slurm cluster: environment derivation, stop classification, snapshots, run
records, the rendered sbatch script, sweep grids and the local sweep backend."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from blt_dist.config import load_config
from blt_dist.errors import ConfigError, UserError
from blt_dist.parallel.engine import cuda_device_index, resolve_backend
from blt_dist.training.loop import drop_metrics_after
from launch import records
from launch.slurm_cli import classify_stop, parse_duration
from launch.slurm_env import expand_nodelist, master_port, task_env, tasks_on_node
from tests.conftest import run_cli

# ---------------------------------------------------------------------------------------------
# Environment of one task


@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu[001-004,010]", ["gpu001", "gpu002", "gpu003", "gpu004", "gpu010"]),
    ("a1,b[2-3]", ["a1", "b2", "b3"]),
    ("node7", ["node7"]),
    ("n[1-2]-ib[3,5]", ["n1-ib3", "n1-ib5", "n2-ib3", "n2-ib5"]),
    ("x[08-11],y", ["x08", "x09", "x10", "x11", "y"]),
])
def test_nodelist_forms(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["gpu[1-", "gpu]1[", "a[x-2]", ""])
def test_bad_nodelists_are_errors(bad):
    with pytest.raises(ValueError):
        expand_nodelist(bad)


def test_master_port_is_stable_and_below_the_ephemeral_range():
    ports = {master_port(job) for job in range(100_000, 130_000)}
    assert all(20000 <= p < 32768 for p in ports) and len(ports) == 12000
    assert master_port("123456") == master_port(123456) and master_port(5) != master_port(6)


def test_tasks_per_node_forms():
    assert [tasks_on_node("2(x3),1", i) for i in range(4)] == [2, 2, 2, 1]
    assert tasks_on_node("8", 0) == 8


def test_two_node_task_environment():
    environ = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "11", "SLURM_LOCALID": "3", "SLURM_NTASKS": "16",
               "SLURM_NODEID": "1", "SLURM_TASKS_PER_NODE": "8(x2)", "SLURM_JOB_NODELIST": "gpu[007-008]",
               "SLURM_RESTART_COUNT": "2"}
    env = task_env(environ)
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size, env.node_rank) == (11, 3, 16, 8, 1)
    assert env.restart_count == 2
    assert env.torch_variables() == {"RANK": "11", "LOCAL_RANK": "3", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8",
                                     "GROUP_RANK": "1", "MASTER_ADDR": "gpu007", "MASTER_PORT": str(master_port(4242))}
    with pytest.raises(RuntimeError, match="not inside a Slurm task"):
        task_env({"SLURM_JOB_ID": "1"})


def test_local_rank_to_gpu_and_backend():
    assert [cuda_device_index(r, 8) for r in range(8)] == list(range(8))  # every GPU of the node visible
    assert cuda_device_index(5, 1) == 0  # one GPU bound per task
    with pytest.raises(UserError, match="local rank 4 has no GPU"):
        cuda_device_index(4, 2)
    assert resolve_backend("auto", cuda=True) == "nccl" and resolve_backend("auto", cuda=False) == "gloo"
    with pytest.raises(UserError, match="nccl needs CUDA"):
        resolve_backend("nccl", cuda=False)


# ---------------------------------------------------------------------------------------------
# Why a job was stopped


def job(start: str, end: str, limit: str, state: str = "RUNNING", preempted: str = "None") -> dict:
    return {"JobState": state, "StartTime": start, "EndTime": end, "TimeLimit": limit, "PreemptTime": preempted}


def test_preemption_timeout_and_cancel_are_told_apart():
    """scontrol's fields as the local slurmctld shows them while the job saves (test_slurm.py
    checks each case against it: preemption, time limit, scancel)."""
    # preemption sets PreemptTime and moves the end time to now + GraceTime
    assert classify_stop(job("2026-01-01T10:00:00", "2026-01-01T10:05:00", "04:00:00", preempted="2026-01-01T10:04:00"),
                         ["SIGUSR2"]) == "preempted"
    # ... and where a Slurm shows no PreemptTime, the end time moved long before start + limit
    assert classify_stop(job("2026-01-01T10:00:00", "2026-01-01T10:05:00", "04:00:00"), ["SIGUSR2"]) == "preempted"
    # a time limit's USR2 comes LEAD seconds before an end time that is still start + limit
    assert classify_stop(job("2026-01-01T10:00:00", "2026-01-01T14:00:00", "04:00:00"), ["SIGUSR2"]) == "timeout"
    assert classify_stop(job("2026-01-01T10:00:00", "2026-01-02T10:00:00", "1-00:00:00"), ["SIGUSR2"]) == "timeout"
    # scancel of a running job: COMPLETING while its processes run, the end time set to now
    assert classify_stop(job("2026-01-01T10:00:00", "2026-01-01T10:01:00", "04:00:00", "COMPLETING"),
                         ["SIGTERM"]) == "cancelled"
    assert classify_stop(job("2026-01-01T10:00:00", "2026-01-01T10:01:00", "UNLIMITED", "COMPLETING"),
                         ["SIGTERM"]) == "cancelled"
    assert classify_stop(job("2026-01-01T10:00:00", "2026-01-01T10:01:00", "04:00:00", "CANCELLED"),
                         ["SIGTERM"]) == "cancelled"
    # the hard time limit ended a save that outlasted the signal lead: still a timeout (requeued)
    assert classify_stop(job("2026-01-01T10:00:00", "2026-01-01T14:00:00", "04:00:00", "COMPLETING"),
                         ["SIGUSR2", "SIGTERM"]) == "timeout"
    assert classify_stop(None, ["SIGUSR2"]) == "preempted"  # scontrol unreachable: requeue, do not count a failure


def test_slurm_durations():
    assert parse_duration("1-02:03:04") == 93784 and parse_duration("02:03:04") == 7384
    assert parse_duration("05:00") == 300 and parse_duration("30") == 1800
    assert parse_duration("UNLIMITED") is None and parse_duration("Partition_Limit") is None


# ---------------------------------------------------------------------------------------------
# Run records


def test_failures_are_counted_since_the_last_submission(tmp_path):
    records.add_event(tmp_path, "submitted", job_id="1")
    records.add_event(tmp_path, "start", job_id="1", restart_count=0)
    records.add_event(tmp_path, "failed", job_id="1", restart_count=0)
    records.add_event(tmp_path, "preempted", job_id="1", restart_count=1)
    assert records.count(tmp_path, "failed") == 1 and records.count(tmp_path, "preempted", "timeout") == 1
    assert records.status(tmp_path)["state"] == "requeued"
    records.add_event(tmp_path, "submitted", job_id="2")  # continue.sh: a fresh budget
    assert records.count(tmp_path, "failed") == 0 and records.status(tmp_path)["state"] == "submitted"


def test_resumed_metrics_drop_the_steps_logged_after_the_checkpoint(tmp_path):
    lines = [{"step": s, "loss": 1.0 / s} for s in range(1, 8)] + [{"step": 5, "val_bpb": 2.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert drop_metrics_after(tmp_path, 5) == 2
    kept = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == [1, 2, 3, 4, 5, 5]
    assert drop_metrics_after(tmp_path, 5) == 0 and drop_metrics_after(tmp_path / "none", 3) == 0


# ---------------------------------------------------------------------------------------------
# Code snapshot


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True,
                          env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                               "GIT_COMMITTER_EMAIL": "t@t"}).stdout


def test_snapshot_records_revision_and_diff_or_refuses_a_dirty_tree(tmp_path):
    from launch.snapshot import take_snapshot

    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "a.py").write_text("A = 1\n")
    (repo / ".gitignore").write_text("data/\n")
    (repo / "data").mkdir()
    (repo / "data" / "big.bin").write_bytes(b"x" * 100)
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "one")
    clean = take_snapshot(tmp_path / "run1", repo)
    assert clean["dirty"] is False and len(clean["revision"]) == 40 and not (tmp_path / "run1" / "code.diff").exists()
    assert (tmp_path / "run1" / "code" / "pkg" / "a.py").read_text() == "A = 1\n"
    assert not (tmp_path / "run1" / "code" / "data").exists()  # ignored files are not code

    (repo / "pkg" / "a.py").write_text("A = 2\n")
    (repo / "pkg" / "new.py").write_text("B = 1\n")  # untracked, not ignored: the tree may import it
    with pytest.raises(UserError, match="uncommitted changes"):
        take_snapshot(tmp_path / "run2", repo, require_clean=True)
    dirty = take_snapshot(tmp_path / "run2", repo)
    assert dirty["dirty"] is True and dirty["untracked"] == ["pkg/new.py"]
    assert "+A = 2" in (tmp_path / "run2" / "code.diff").read_text()
    assert (tmp_path / "run2" / "code" / "pkg" / "a.py").read_text() == "A = 2\n"
    assert (tmp_path / "run2" / "code" / "pkg" / "new.py").is_file()


# ---------------------------------------------------------------------------------------------
# The launch command without a cluster


LAUNCH = ["launch", "configs/blt/tiny.yaml", "data.train=/data/x", "train.max_steps=5"]


def test_dry_run_prints_the_sbatch_script_and_config_and_submits_nothing(tmp_path):
    run_dir = tmp_path / "my run's dir"
    result = run_cli(*LAUNCH, f"run.dir={run_dir}", "--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu a",
                     "--time", "90", "--signal-lead", "300", "--mem", "200", "--exclude", "bad[1-2]", "--dry-run")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=8",
                 "#SBATCH --partition='gpu a'", "#SBATCH --time=90", "#SBATCH --signal=USR2@300", "#SBATCH --mem=200G",
                 "#SBATCH --exclude='bad[1-2]'", "#SBATCH --requeue", "--kill-on-bad-exit=1"):
        assert line in out, line
    assert "PYTHONPATH='" + str(run_dir / "code") + "'" in out.replace("'\"'\"'", "'")  # quoted for the shell
    assert "launch.task after-srun" in out and "partition: gpu a" in out and "time_min: 90" in out
    assert not run_dir.exists()


def test_a_node_range_and_overcommit_reach_sbatch(tmp_path):
    """--nodes MIN-MAX: a job (or its requeue) may start on fewer nodes, and the trainer continues
    at that world size (elastic resume); --overcommit: more tasks than CPUs, as --ntasks."""
    ranged = run_cli(*LAUNCH, f"run.dir={tmp_path / 'r'}", "--nodes", "2-4", "--tasks-per-node", "2", "--dry-run")
    assert ranged.returncode == 0, ranged.stderr
    assert "#SBATCH --nodes=2-4" in ranged.stdout and "#SBATCH --ntasks-per-node=2" in ranged.stdout
    assert "min_nodes: 2" in ranged.stdout and "  nodes: 4" in ranged.stdout
    over = run_cli(*LAUNCH, f"run.dir={tmp_path / 'r'}", "--tasks-per-node", "4", "--overcommit", "--dry-run")
    assert over.returncode == 0, over.stderr
    assert "#SBATCH --ntasks=4" in over.stdout and "#SBATCH --overcommit" in over.stdout
    assert "--ntasks-per-node" not in over.stdout
    for bad in ("x-2", "3-1"):
        result = run_cli(*LAUNCH, "--nodes", bad, "--dry-run")
        assert result.returncode != 0 and "nodes" in result.stderr, (bad, result.stderr)


def test_launch_errors(tmp_path):
    no_slurm = run_cli(*LAUNCH, f"run.dir={tmp_path / 'r'}", f"data.train={tmp_path}",
                       env={"PATH": str(Path(sys.executable).parent)})
    assert no_slurm.returncode == 1 and "no Slurm here" in no_slurm.stderr and "--backend local" in no_slurm.stderr
    assert not (tmp_path / "r").exists()
    missing = run_cli(*LAUNCH, f"run.dir={tmp_path / 'r'}", f"data.train={tmp_path / 'nope'}")
    assert missing.returncode == 1 and "data.train" in missing.stderr and "does not exist" in missing.stderr
    bad_key = run_cli(*LAUNCH, "launch.nodez=2", "--dry-run")
    assert bad_key.returncode == 2 and "launch.nodez: unknown key" in bad_key.stderr
    lead = run_cli(*LAUNCH, "--time", "1", "--signal-lead", "90", "--dry-run")
    assert lead.returncode == 2 and "launch.signal_delay_s" in lead.stderr
    cont = run_cli("launch", "--continue", str(tmp_path))
    assert cont.returncode == 1 and "not a launched run directory" in cont.stderr


def test_every_public_launch_command_has_help():
    for command in (["launch"], ["sweep"], ["entropies"]):
        result = run_cli(*command, "--help")
        assert result.returncode == 0 and "usage:" in result.stdout
    assert "--slurm" in run_cli("entropies", "--help").stdout


# ---------------------------------------------------------------------------------------------
# Sweeps


def write_grid(tmp_path: Path, **changes) -> Path:
    grid = {"name": "t", "out": str(tmp_path / "sweep"), "sizes": ["tiny"], "families": ["blt", "bpe"],
            "flops": [2e9], "seeds": [0]}
    grid.update(changes)
    path = tmp_path / "grid.yaml"
    path.write_text(json.dumps(grid))  # JSON is YAML
    return path


@pytest.mark.parametrize("changes, key", [
    ({"sizes": ["tiny", "7b"]}, "sizes[1]"),
    ({"families": ["blt", "rnn"]}, "families[1]"),
    ({"seedz": [1]}, "seedz"),
    ({"launch": {"nodez": 2}}, "launch.nodez"),
    ({"flops": [-1.0]}, "flops[0]"),
    ({"overrides": {"gpt": ["a=1"]}}, "overrides.gpt"),
    ({"flops_per_size": {"1b": [1e20]}}, "flops_per_size.1b"),
    ({"seeds_per_flops": {"3e9": [0, 1]}}, "seeds_per_flops.3e9"),  # not a budget of the grid
    ({"seeds_per_flops": {"lots": [0, 1]}}, "seeds_per_flops.lots"),
    ({"seeds_per_flops": {"2e9": [1, 1]}}, "seeds_per_flops.2e9"),
])
def test_bad_sweep_files_name_the_key(tmp_path, changes, key):
    from launch.sweep import load_sweep

    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_sweep(write_grid(tmp_path, **changes))


def test_sweep_plan_matches_bpe_and_byte_with_the_flop_counter(tmp_path):
    import dataclasses

    from blt_dist.flops import SampleShape, match_bpe, match_byte, train_flops_per_byte
    from launch.sweep import load_sweep, plan

    grid = write_grid(tmp_path, flops=[2e9, 4e9], seeds=[0, 1], families=["blt", "bpe", "byte"])
    # the tokenizer's measured bytes per token, given for the BPE family only
    spec = load_sweep(grid, ["blt:data.byte_capacity=256", "bpe:data.bytes_per_token=2.84"])
    runs = plan(spec)
    assert [r.name for r in runs][:3] == ["blt-tiny-2e9-s0", "blt-tiny-2e9-s1", "blt-tiny-4e9-s0"] and len(runs) == 12
    blt = next(r for r in runs if r.family == "blt").cfg
    bpe = next(r for r in runs if r.family == "bpe").cfg
    byte = next(r for r in runs if r.family == "byte").cfg
    assert blt.data.byte_capacity == 256 and bpe.train.flops == 2e9 and bpe.train.max_steps == 0
    assert bpe.data.bytes_per_token == 2.84 and blt.data.bytes_per_token == 4.4
    match = match_bpe(blt.model, dataclasses.replace(SampleShape.from_data(blt.data), bytes_per_token=2.84))
    assert (bpe.model.dim, bpe.model.n_layers, bpe.data.tokens_per_sample) == (
        match["dim"], match["n_layers"], match["tokens_per_sample"]) and bpe.data.tokens_per_sample == 88  # 256 / 2.84
    match = match_byte(blt.model, SampleShape.from_data(blt.data))
    assert (byte.model.family, byte.model.dim, byte.model.n_layers, byte.data.seq_len) == (
        "byte", match["dim"], match["n_layers"], 256) and byte.train.flops == 2e9
    blt_cost = train_flops_per_byte(blt.model, SampleShape.from_data(blt.data))
    for baseline in (bpe, byte):
        assert abs(train_flops_per_byte(baseline.model, SampleShape.from_data(baseline.data)) / blt_cost - 1) < 0.05


def test_the_bpe_baseline_takes_the_tokenizers_measured_bytes_per_token(tmp_path):
    import json

    from launch.sweep import load_sweep, plan
    from tests.conftest import sentencepiece_bpe

    tokenizer = sentencepiece_bpe(tmp_path)
    (tmp_path / "tok.json").write_text(json.dumps({"vocab_size": 300, "bytes_per_token": 2.6558}))  # as measured
    grid = write_grid(tmp_path, flops=[2e9], seeds=[0], families=["blt", "bpe"])
    common = [f"bpe:data.tokenizer={tokenizer}", "bpe:model.vocab_size=300", "blt:model.bpe_vocab_size=300"]
    measured = plan(load_sweep(grid, common))
    assert next(r for r in measured if r.family == "bpe").cfg.data.bytes_per_token == 2.6558
    given = plan(load_sweep(grid, [*common, "bpe:data.bytes_per_token=3.1"]))
    assert next(r for r in given if r.family == "bpe").cfg.data.bytes_per_token == 3.1  # the command line wins


def test_seeds_per_flops_gives_the_smallest_budget_more_seeds(tmp_path):
    from launch.sweep import load_sweep, plan

    grid = write_grid(tmp_path, flops=[2e9, 4e9, 8e9], seeds=[0], seeds_per_flops={"2.0e+9": [0, 1, 2]})
    runs = plan(load_sweep(grid))
    blt = [(r.budget, r.seed, r.cfg.run.seed) for r in runs if r.family == "blt"]
    assert blt == [(2e9, 0, 0), (2e9, 1, 1), (2e9, 2, 2), (4e9, 0, 0), (8e9, 0, 0)]
    assert len(runs) == 10 and "bpe-tiny-2e9-s2" in [r.name for r in runs]


def test_sweep_dry_run_prints_the_grid_and_its_cost():
    result = run_cli("sweep", "configs/sweeps/scaling.yaml", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "48 runs" in result.stdout and "40% MFU" in result.stdout and "GPU-hours" in result.stdout
    assert "blt-3b-1.05e21-s1" in result.stdout and "bpe-125m-1.9e18-s0" in result.stdout
    assert "byte-1b-4.8e20-s0" in result.stdout


@pytest.mark.slow
def test_local_backend_runs_the_sweep_and_skips_finished_runs(tmp_path):
    from blt_dist.data.prepare import prepare
    from blt_dist.data.tokenizer import train_tokenizer
    from tests.conftest import write_word_documents

    words = "the quick brown fox jumps over a lazy dog while bytes and patches flow".split()
    write_word_documents(tmp_path / "in", words, 30, (5, 60))
    prepare([tmp_path / "in"], tmp_path / "ds", val_fraction=0.1, progress=False)
    train_tokenizer(tmp_path / "ds", tmp_path / "tok.model", vocab_size=300)
    grid = write_grid(tmp_path, flops=[1e9])
    args = ["sweep", str(grid), f"data.train={tmp_path / 'ds'}", f"data.val={tmp_path / 'ds'}",
            "data.byte_capacity=128", "data.patches_per_sample=48", "train.micro_batch_size=2", "train.eval_bytes=3000",
            "blt:data.patching.mode=space", f"bpe:data.tokenizer={tmp_path / 'tok.model'}", "bpe:model.vocab_size=300",
            "blt:model.bpe_vocab_size=300", "--backend", "local"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stdout + first.stderr
    rows = list(csv.DictReader(open(tmp_path / "sweep" / "results.csv")))
    assert [(r["run"], r["status"]) for r in rows] == [("blt-tiny-1e9-s0", "finished"), ("bpe-tiny-1e9-s0", "finished")]
    assert all(float(r["final_val_bpb"]) > 0 and float(r["flops_spent"]) > 0 for r in rows)
    second = run_cli(*args)
    assert second.returncode == 0 and second.stdout.count("finished, skipped") == 2


def test_continue_resubmits_from_the_run_directory_with_new_resources(tmp_path):
    from launch.slurm import absolute_paths, prepare_run_dir

    run_dir = tmp_path / "run"
    cfg = absolute_paths(load_config("configs/blt/tiny.yaml", [f"run.dir={run_dir}", f"data.train={tmp_path}",
                                                                "launch.time_min=10"]))
    prepare_run_dir(cfg, run_dir, ["launch", "configs/blt/tiny.yaml"])
    script = (run_dir / "continue.sh").read_text()
    assert "launch --continue" in script and str(run_dir) in script and '"$@"' in script
    result = run_cli("launch", "--continue", str(run_dir), "--time", "30", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "#SBATCH --time=30" in result.stdout and str(run_dir / "code") in result.stdout
    both = run_cli("launch", "configs/blt/tiny.yaml", "--continue", str(run_dir))
    assert both.returncode == 1 and "not a config file" in both.stderr


def test_unreachable_patch_size_is_refused_with_the_reason(tmp_path):
    from launch.sweep import load_sweep

    # tiny BLT: max_patch_length=16, so no threshold gives a mean of 40 bytes per patch
    with pytest.raises(ConfigError, match=r"patch_sizes\[1\].*40 bytes.*max_patch_length=16"):
        load_sweep(write_grid(tmp_path, patch_sizes=[4.5, 40]))
    with pytest.raises(ConfigError, match=r"patch_sizes\[0\].*0.5 bytes"):
        load_sweep(write_grid(tmp_path, patch_sizes=[0.5]))
    with pytest.raises(ConfigError, match="no blt family"):
        load_sweep(write_grid(tmp_path, families=["bpe"], patch_sizes=[4.5]))
    # a longer cap makes 40 reachable in principle: the check reads the overridden config
    spec = load_sweep(write_grid(tmp_path, patch_sizes=[40], overrides={"blt": ["data.patching.max_patch_length=48"]}))
    assert spec.patch_sizes == [40]


def test_patch_size_axis_matches_the_bpe_twins_inference_cost(tmp_path):
    """Each patch size gets its own BLT, its latent resized so that its inference FLOPs per byte
    (the counter's, at that patch size) are within 2% of the BPE twin's; longer patches buy a
    bigger latent. Static patching here (no entropies needed); entropy mode is calibrated below."""
    from blt_dist.flops import SampleShape, inference_flops_per_byte
    from launch.sweep import format_plan, load_sweep, plan

    spec = load_sweep(write_grid(tmp_path, patch_sizes=[4, 8], overrides={"blt": ["data.patching.mode=static"]}))
    runs = {r.name: r for r in plan(spec)}
    assert sorted(runs) == ["blt-p4-tiny-2e9-s0", "blt-p8-tiny-2e9-s0", "bpe-tiny-2e9-s0"]
    bpe = runs["bpe-tiny-2e9-s0"].cfg
    target = inference_flops_per_byte(bpe.model, SampleShape.from_data(bpe.data))
    latents = []
    for size in (4, 8):
        cfg = runs[f"blt-p{size}-tiny-2e9-s0"].cfg
        assert cfg.data.patching.patch_size == size and cfg.data.patching.target_mean_size == size
        got = inference_flops_per_byte(cfg.model, SampleShape.from_data(cfg.data))
        assert abs(got / target - 1) <= 0.02, (size, got, target)
        latents.append(cfg.model.dim ** 2 * cfg.model.n_layers)
    assert latents[1] > latents[0]  # the longer patches' latent is bigger
    assert "infer/byte" in format_plan(list(runs.values()), spec)


def test_patch_sizes_are_calibrated_on_the_training_entropies(tmp_path):
    from blt_dist.data.calibrate import calibrate_threshold, sample_documents
    from launch.sweep import load_sweep, plan
    from tests.conftest import random_entropy_dataset

    rng = np.random.default_rng(0)
    words = ["the", "byte", "latent", "transformer", "reads", "patches", "{x: 1}", "\u00e9t\u00e9"]
    entropies = random_entropy_dataset(tmp_path, {"prose": [" ".join(rng.choice(words, rng.integers(5, 60)))
                                                            for _ in range(30)]})
    spec = load_sweep(write_grid(tmp_path, patch_sizes=[3, 5], overrides={"blt": [f"data.train={entropies}"]}))
    runs = {r.name: r.cfg for r in plan(spec)}
    _, docs = sample_documents(str(entropies))
    for size in (3, 5):
        cfg = runs[f"blt-p{size}-tiny-2e9-s0"]
        want = calibrate_threshold([(ids, H) for _, ids, H in docs], mode="entropy", target_mean_size=size,
                                   max_patch_length=16).threshold
        assert cfg.data.patching.threshold == want
    assert runs["blt-p3-tiny-2e9-s0"].data.patching.threshold < runs["blt-p5-tiny-2e9-s0"].data.patching.threshold
    with pytest.raises(UserError, match="'space' patching has no threshold"):
        plan(load_sweep(write_grid(tmp_path, patch_sizes=[5], overrides={"blt": ["data.patching.mode=space"]})))


def test_local_scaling_grid_plans_its_runs(tmp_path):
    """configs/sweeps/local.yaml (issue 21 item 5), its entropies swapped for a random tiny set:
    2 BLT patch sizes + BPE + byte at 4 budgets from 1e12 to 1.6e13, 3 seeds at 1e12."""
    from launch.sweep import format_plan, load_sweep, plan
    from tests.conftest import random_entropy_dataset

    rng = np.random.default_rng(0)
    words = ["the", "byte", "latent", "transformer", "reads", "patches", "{x: 1}", "\u00e9t\u00e9"]
    entropies = random_entropy_dataset(tmp_path, {"prose": [" ".join(rng.choice(words, rng.integers(5, 60)))
                                                            for _ in range(30)]})
    spec = load_sweep(Path("configs/sweeps/local.yaml"), [f"blt:data.train={entropies}"])
    runs = plan(spec)
    budgets = sorted({r.budget for r in runs})
    assert len(budgets) >= 4 and budgets[0] == 1e12 and budgets[-1] >= 1.6e13
    series = {r.name.rsplit("-", 3)[0] for r in runs}
    assert series == {"blt-p4.5", "blt-p8", "bpe", "byte"}
    assert len(runs) == 4 * (len(budgets) + 2)
    assert sorted(r.seed for r in runs if r.budget == 1e12 and r.family == "bpe") == [0, 1, 2]
    assert all(r.cfg.data.patching.mode == "entropy" for r in runs if r.family == "blt")
    assert "infer/byte" in format_plan(runs, spec)
