"""launch/ against a real Slurm: slurmctld + slurmd + munged on localhost, started once for this
module by tools/slurm_cluster.sh and stopped by pid at the end. Preemption is Slurm's own (a job
in the `high` partition preempts the `low` one); time limits are Slurm's own (--time, USR2@LEAD).

Requeued jobs wait ~120 s before Slurm starts them again (BeginTime); the tests move their start
time to now, as an operator would, so the module runs in minutes.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from blt_dist.data.prepare import prepare
from blt_dist.data.tokenizer import train_tokenizer
from launch import records
from tests.conftest import REPO, run_cli, word_dataset, write_word_documents

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

WORDS = "the quick brown fox jumps over a lazy dog while bytes and patches flow through latent space".split()
FINAL = ("completed", "gave_up", "cancelled", "requeue_failed")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURM_CTLD_PORT": "16817", "SLURM_D_PORT": "16818", "SLURM_GRACE_S": "60"}
    started = subprocess.run(["bash", str(REPO / "tools" / "slurm_cluster.sh"), "start", str(state)], env=env,
                             capture_output=True, text=True, timeout=600)
    if started.returncode != 0:
        message = f"no local Slurm: {started.stderr.strip() or started.stdout.strip()}"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI must run these
        pytest.skip(message)
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(state / "slurm.conf")
    # jobs inherit the environment: DeepSpeed's shared-memory op is compiled once (~40 s), not per job
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    yield state
    # the script cancels what is left and waits for it before it stops the daemons
    subprocess.run(["bash", str(REPO / "tools" / "slurm_cluster.sh"), "stop", str(state)], env=env, timeout=120)
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm-data")
    word_dataset(root, WORDS, per_type=60)
    return root


def blt_args(data: Path, run_dir: Path, steps: int) -> list[str]:
    return ["configs/blt/tiny.yaml", f"data.train={data / 'ds'}", f"data.val={data / 'ds'}", "data.patching.mode=space",
            "data.byte_capacity=128", "data.patches_per_sample=48", "train.micro_batch_size=2", "log.every=1",
            "train.eval_bytes=3000", f"train.max_steps={steps}", f"run.dir={run_dir}"]


def launch(args: list[str], *flags: str, faults: str = "", extra_env: dict | None = None) -> str:
    env = {"BLT_FAULTS": faults, "WANDB_MODE": "disabled", **(extra_env or {})}
    result = run_cli("launch", *args, "--tasks-per-node", "2", "--cpus-per-task", "1", *flags, env=env)
    assert result.returncode == 0, result.stderr + result.stdout
    return result.stdout.split("submitted job ")[1].split(":")[0]


def job_info(job_id: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return dict(token.partition("=")[::2] for token in out.split() if "=" in token)


def drive(run_dir: Path, job_id: str, timeout: float = 400, on_step=None) -> dict:
    """Waits until the run reaches a final state, releasing requeued jobs from their ~120 s
    BeginTime hold (at least 3 s after the requeue: sooner, Slurm revokes the credential).
    `on_step(step)` is called as training progresses (to preempt mid-run)."""
    deadline = time.monotonic() + timeout
    held_since = None
    while time.monotonic() < deadline:
        status = records.status(run_dir) or {}
        info = job_info(job_id)
        if status.get("state") in FINAL and info.get("JobState") not in ("RUNNING", "COMPLETING"):
            return status
        if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
            held_since = held_since or time.monotonic()
            if time.monotonic() - held_since > 3:
                subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], capture_output=True)
                held_since = None
        if on_step is not None:
            on_step(last_step(run_dir))
        time.sleep(0.5)
    logs = "\n".join(p.read_text()[-3000:] for p in sorted((run_dir / "slurm").glob("*_0_log.*")))
    raise AssertionError(f"{run_dir} did not finish in {timeout} s; status {records.status(run_dir)}\n{logs}")


def last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def train_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def event_names(run_dir: Path) -> list[str]:
    return [e["event"] for e in records.events(run_dir)]


STEPS = 40


@pytest.fixture(scope="module")
def uninterrupted(cluster, data, tmp_path_factory):
    """A 2-task training through `blt-dist launch`, in a directory and under a job name with
    spaces and quotes (passed to Slurm as they are)."""
    started = time.monotonic()
    run_dir = tmp_path_factory.mktemp("runs") / "run 'one' two"
    job_id = launch(blt_args(data, run_dir, STEPS), "--time", "10", "--job-name", "blt tiny 'quoted' $HOME")
    status = drive(run_dir, job_id)
    return run_dir, job_id, status, time.monotonic() - started


def test_two_task_training_completes(uninterrupted):
    run_dir, job_id, status, seconds = uninterrupted
    assert status["state"] == "completed", event_names(run_dir)
    assert event_names(run_dir) == ["submitted", "start", "completed"]
    start = records.events(run_dir)[1]
    assert start["world_size"] == 2 and start["restart_count"] == 0
    port = int(start["master"].rsplit(":", 1)[1])
    assert port < 32768 and start["master"].startswith(os.uname().nodename.split(".")[0])
    assert [r["step"] for r in train_records(run_dir)] == list(range(1, STEPS + 1))
    assert (run_dir / "export" / "model.safetensors").is_file()
    name = subprocess.run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%j"], capture_output=True, text=True)
    assert name.stdout.strip() == "blt tiny 'quoted' $HOME"
    # what the run directory holds before the job starts
    code = json.loads((run_dir / "code.json").read_text())
    assert len(code["revision"]) == 40 and (run_dir / "code" / "blt_dist" / "training" / "loop.py").is_file()
    sbatch = (run_dir / "launch" / "job.sbatch").read_text()
    assert "#SBATCH --signal=USR2@120" in sbatch and "--kill-on-bad-exit=1" in sbatch
    assert records.read_submission(run_dir)["job_ids"][0]["job_id"] == job_id
    assert (run_dir / "continue.sh").stat().st_mode & 0o111
    print(f"[timing] two-task launch: {seconds:.0f} s")


def test_real_preemption_requeues_and_resumes_bit_exactly(uninterrupted, data, tmp_path):
    started = time.monotonic()
    reference = train_records(uninterrupted[0])
    run_dir = tmp_path / "preempted"
    job_id = launch(blt_args(data, run_dir, STEPS) + ["log.wandb=true"], "--time", "10",
                    faults="step_sleep_s=0.25", extra_env={"WANDB_MODE": "offline"})
    preemptor = []

    def preempt_mid_run(step: int) -> None:
        if step >= 8 and not preemptor:  # a whole-node job in the high partition: Slurm preempts ours
            out = subprocess.run(["sbatch", "--parsable", "-p", "high", "--exclusive", "-N1", "-o", "/dev/null",
                                  "--wrap", "sleep 2"], capture_output=True, text=True)
            assert out.returncode == 0, out.stderr
            preemptor.append(out.stdout.strip())

    status = drive(run_dir, job_id, on_step=preempt_mid_run)
    assert status["state"] == "completed", event_names(run_dir)
    events = records.events(run_dir)
    assert [e["event"] for e in events] == ["submitted", "start", "preempted", "start", "completed"]
    preempted = events[2]
    assert 8 <= preempted["step"] < STEPS and "SIGUSR2" in preempted["signals"]
    assert [e["restart_count"] for e in events if e["event"] == "start"] == [0, 1]
    resumed = train_records(run_dir)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))  # nothing missing, nothing twice
    assert [(r["loss"], r["data_digest"]) for r in resumed] == [(r["loss"], r["data_digest"]) for r in reference]
    # one wandb run across the requeue
    wandb_id = (run_dir / "wandb_id").read_text().strip()
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(wandb_id) for r in runs)
    log = "".join(p.read_text() for p in (run_dir / "slurm").glob("*_0_log.out"))
    assert "Slurm restart 1" in log
    print(f"[timing] preemption: {time.monotonic() - started:.0f} s; preempted at step {preempted['step']}")
    print("[losses] step  uninterrupted  preempted+resumed")
    for a, b in zip(reference, resumed):
        print(f"[losses] {a['step']:>4}  {a['loss']:.6f}  {b['loss']:.6f}" + ("  <- resumed" if a["step"] == preempted["step"] + 1 else ""))


def test_time_limit_saves_requeues_and_completes(cluster, data, tmp_path):
    started = time.monotonic()
    run_dir = tmp_path / "timed"
    steps = 300  # 0.2 s each: more than one 2-minute allocation (signal at <= 60 s) holds
    job_id = launch(blt_args(data, run_dir, steps), "--time", "2", "--signal-lead", "60", faults="step_sleep_s=0.2")
    status = drive(run_dir, job_id, timeout=600)
    names = event_names(run_dir)
    assert status["state"] == "completed", names
    assert "timeout" in names and "preempted" not in names and "failed" not in names
    assert [r["step"] for r in train_records(run_dir)] == list(range(1, steps + 1))
    info = job_info(job_id)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) == names.count("timeout")
    print(f"[timing] time limit: {time.monotonic() - started:.0f} s, {names.count('timeout')} timeouts")


def test_a_failing_job_is_retried_at_most_max_retries_times(cluster, data, tmp_path):
    started = time.monotonic()
    run_dir = tmp_path / "failing"
    job_id = launch(blt_args(data, run_dir, STEPS), "--time", "10", "--max-retries", "2",
                    faults="raise_after_step=2")
    status = drive(run_dir, job_id)
    assert event_names(run_dir) == ["submitted", "start", "failed", "start", "failed", "start", "gave_up"]
    assert status["state"] == "gave_up" and "2 retries used" in status["reason"]
    assert "srun exited with status" in (run_dir / "FAILED").read_text()
    assert job_info(job_id)["JobState"] == "FAILED"
    print(f"[timing] failure retries: {time.monotonic() - started:.0f} s")


def test_scancel_of_a_running_job_saves_and_is_not_requeued(cluster, data, tmp_path):
    """A user's `scancel` sends SIGTERM, as a preemption may: the run must save, record
    'cancelled' and stay cancelled, never requeue itself."""
    from launch.task import _newest_step

    started = time.monotonic()
    run_dir = tmp_path / "cancelled"
    job_id = launch(blt_args(data, run_dir, 200), "--time", "10", faults="step_sleep_s=0.2")
    deadline = time.monotonic() + 300
    while last_step(run_dir) < 4:
        assert time.monotonic() < deadline, f"no step 4; events {event_names(run_dir)}"
        time.sleep(0.3)
    subprocess.run(["scancel", job_id], check=True)
    while job_info(job_id).get("JobState") not in ("CANCELLED", None) or "cancelled" not in event_names(run_dir):
        assert time.monotonic() < deadline, f"job {job_id}: {job_info(job_id).get('JobState')}; {event_names(run_dir)}"
        time.sleep(0.3)
    time.sleep(3)  # a wrong requeue would show by now
    assert event_names(run_dir) == ["submitted", "start", "cancelled"]
    assert "SIGTERM" in records.events(run_dir)[-1]["signals"]
    assert job_info(job_id)["JobState"] == "CANCELLED" and int(job_info(job_id)["Restarts"]) == 0
    saved = _newest_step(run_dir)
    assert saved is not None and 4 <= saved <= last_step(run_dir) < 200
    print(f"[timing] scancel: {time.monotonic() - started:.0f} s; saved at step {saved}")


def test_entropy_array_equals_one_process(cluster, tmp_path):
    from blt_dist.data.entropies import compute_entropy_dataset
    from blt_dist.training.export import save_export
    from tests.test_entropies import tiny_entropy_model, tree

    started = time.monotonic()
    write_word_documents(tmp_path / "in", ["alpha", "beta", "gamma", "\xe9t\xe9", "x = 1;"], 14, (0, 30))
    prepare([tmp_path / "in"], tmp_path / "bytes", val_fraction=0.2, shard_size="700b", progress=False)
    model, cfg = tiny_entropy_model(0)
    save_export(model.state_dict(), cfg, tmp_path / "model")
    compute_entropy_dataset(tmp_path / "model", tmp_path / "bytes", tmp_path / "one", progress=False, dtype="fp32")
    args = ["entropies", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "bytes"),
            "--out", str(tmp_path / "array"), "--dtype", "fp32", "--no-progress"]
    # part 0 of 2 here; the array then submits only part 1, whose task completes and merges
    assert run_cli(*args, "--part", "0/2").returncode == 0
    result = run_cli(*args, "--slurm", "--parts", "2", "--cpus-per-task", "1", "--wait")
    assert result.returncode == 0, result.stderr + result.stdout
    assert "parts 1 of 2 (1 complete, skipped)" in result.stdout
    assert tree(tmp_path / "array") == tree(tmp_path / "one")
    again = run_cli(*args, "--slurm", "--parts", "2")
    assert again.returncode == 0 and "nothing submitted" in again.stdout
    print(f"[timing] entropy array: {time.monotonic() - started:.0f} s")


def test_tiny_sweep_writes_results_and_a_rerun_submits_nothing(cluster, data, tmp_path):
    started = time.monotonic()
    train_tokenizer(data / "ds", tmp_path / "tok.model", vocab_size=300)
    out = tmp_path / "sweep"
    args = ["sweep", "configs/sweeps/tiny.yaml", f"data.train={data / 'ds'}", f"data.val={data / 'ds'}",
            f"bpe:data.tokenizer={tmp_path / 'tok.model'}", "bpe:model.vocab_size=300", "blt:model.bpe_vocab_size=300",
            "data.byte_capacity=128", "data.patches_per_sample=48", "train.micro_batch_size=2",
            "blt:data.patching.mode=space", "train.eval_bytes=3000"]
    grid = tmp_path / "grid.yaml"
    grid.write_text((REPO / "configs/sweeps/tiny.yaml").read_text().replace("out: runs/sweeps/tiny", f"out: {out}")
                    .replace("flops: [2.0e+11, 4.0e+11]", "flops: [2.0e+9, 4.0e+9]"))
    args[1] = str(grid)
    first = run_cli(*args, env={"WANDB_MODE": "disabled"})
    assert first.returncode == 0, first.stderr + first.stdout
    assert first.stdout.count("submitted as job") == 4
    run_dirs = sorted(p for p in out.iterdir() if p.is_dir())
    assert [p.name for p in run_dirs] == ["blt-tiny-2e9-s0", "blt-tiny-4e9-s0", "bpe-tiny-2e9-s0", "bpe-tiny-4e9-s0"]
    for run_dir in run_dirs:
        job_id = records.read_submission(run_dir)["job_ids"][0]["job_id"]
        assert drive(run_dir, job_id)["state"] == "completed"
    jobs_before = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i"], capture_output=True, text=True).stdout
    second = run_cli(*args, env={"WANDB_MODE": "disabled"})
    assert second.returncode == 0, second.stderr + second.stdout
    assert "4/4 runs finished, 0 submitted" in second.stdout
    assert subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i"], capture_output=True, text=True).stdout == jobs_before
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["run"] for r in rows] == [p.name for p in run_dirs]
    for row in rows:
        assert row["status"] == "finished" and float(row["final_val_bpb"]) > 0
        budget, spent = float(row["flop_budget"]), float(row["flops_spent"])
        assert 0.5 * budget < spent < 1.5 * budget  # the step count came from the budget
        assert (row["mean_patch_size"] != "") == (row["family"] == "blt")
    print(f"[timing] sweep 2x2: {time.monotonic() - started:.0f} s")


def test_unknown_partition_shows_slurms_error(cluster, data, tmp_path):
    result = run_cli("launch", *blt_args(data, tmp_path / "bad", 2), "--partition", "nosuch", "--time", "5")
    assert result.returncode != 0
    assert "invalid partition" in result.stderr.lower(), result.stderr
    impossible = run_cli("launch", *blt_args(data, tmp_path / "bad2", 2), "--tasks-per-node", "64", "--time", "5")
    assert impossible.returncode != 0 and "sbatch refused the job" in impossible.stderr, impossible.stderr


def test_a_preempted_run_continues_on_one_task_then_four(cluster, data, tmp_path):
    """Elastic resume end to end: a 2-task run is preempted (for real) and its requeue cancelled;
    `launch --continue --tasks-per-node 1` continues it on one task, a cancel stops it again,
    and `--continue --tasks-per-node 4 --overcommit` finishes it on four. Every step runs once,
    every step's data digest is the uninterrupted run's and the losses agree to float rounding."""
    from tests.distributed import run as run_processes

    started = time.monotonic()
    steps = 24
    args = ["configs/entropy/tiny.yaml", f"data.train={data / 'ds'}", "data.seq_len=128", "train.micro_batch_size=2",
            "train.grad_accum=2", "log.every=1", f"train.max_steps={steps}", "checkpoint.every=2", "parallel.zero_stage=1"]
    reference = tmp_path / "reference"
    run_processes(2, ["train", *args, f"run.dir={reference}"], tmp_path / "logs_reference")
    run_dir = tmp_path / "elastic"
    env = {"BLT_FAULTS": "step_sleep_s=0.25", "WANDB_MODE": "disabled"}
    job_id = launch([*args, f"run.dir={run_dir}"], "--time", "10", faults="step_sleep_s=0.25")
    deadline = time.monotonic() + 300

    def wait_for(condition, what: str) -> None:
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}; events {event_names(run_dir)}"
            time.sleep(0.3)

    def preempt_at(step: int, job_id: str) -> None:
        """A whole-node job in the high partition preempts ours (Slurm requeues it); the requeued
        job is cancelled before it starts again, as if the allocation came back smaller."""
        wait_for(lambda: last_step(run_dir) >= step, f"step {step}")
        preemptions = event_names(run_dir).count("preempted")
        subprocess.run(["sbatch", "-p", "high", "--exclusive", "-N1", "-o", "/dev/null", "--wrap", "sleep 2"],
                       check=True, capture_output=True)
        wait_for(lambda: event_names(run_dir).count("preempted") > preemptions, "the preemption")
        wait_for(lambda: job_info(job_id).get("JobState") in ("PENDING", "REQUEUED"), "the requeue")
        subprocess.run(["scancel", job_id], check=True)
        wait_for(lambda: job_info(job_id).get("JobState") == "CANCELLED", "the cancel")

    def resubmit(*flags: str) -> str:
        result = run_cli("launch", "--continue", str(run_dir), "--cpus-per-task", "1", *flags, env=env)
        assert result.returncode == 0, result.stderr + result.stdout
        return result.stdout.split("submitted job ")[1].split(":")[0]

    preempt_at(6, job_id)
    job_id = resubmit("--tasks-per-node", "1")
    preempt_at(14, job_id)
    job_id = resubmit("--tasks-per-node", "4", "--overcommit")
    status = drive(run_dir, job_id)
    assert status["state"] == "completed", event_names(run_dir)

    starts = [e for e in records.events(run_dir) if e["event"] == "start"]
    assert [e["world_size"] for e in starts] == [2, 1, 4], records.events(run_dir)
    got, want = train_records(run_dir), train_records(reference)
    assert [r["step"] for r in got] == list(range(1, steps + 1))  # nothing missing, nothing twice
    assert [r["data_digest"] for r in got] == [r["data_digest"] for r in want]
    for a, b in zip(want, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=0), a["step"]
    log = "".join(p.read_text() for p in sorted((run_dir / "slurm").glob("*_0_log.out")))
    assert "saved at 2 ranks ZeRO-1 on 1 rank ZeRO-1, grad_accum 2 -> 4" in log
    assert "saved at 1 rank ZeRO-1 on 4 ranks ZeRO-1, grad_accum 4 -> 1" in log
    print(f"[timing] elastic 2 -> 1 -> 4 tasks: {time.monotonic() - started:.0f} s; events {event_names(run_dir)}")
    for line in (line for line in log.splitlines() if "resumed step" in line):
        print(f"[elastic] {line.strip()}")
    print("[losses] step  uninterrupted(2 ranks)  elastic(2 -> 1 -> 4)")
    for a, b in zip(want, got):
        print(f"[losses] {a['step']:>4}  {a['loss']:.9f}  {b['loss']:.9f}")
