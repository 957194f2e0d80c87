"""What runs inside a Slurm job: the training task on every srun task, and the batch shell's
check after srun.

    sbatch script (rendered by submitit)
      setup:     PYTHONPATH=RUN_DIR/code (the snapshot), OMP_NUM_THREADS
      srun --kill-on-bad-exit=1 python -m submitit.core._submit ...   -> TrainTask() on every task
      teardown:  python -m launch.task after-srun RUN_DIR $?          -> bounded retry of failures

TrainTask: stop handlers first (a signal during start-up is kept), the torch variables from
SLURM_*, then the ordinary trainer on the resolved config in the run directory; it resumes from
the newest complete checkpoint by itself. When Slurm asks the job to stop (USR2 before the time
limit or on preemption, SIGTERM), every rank saves at the same agreed step; rank 0 then records
whether it was a preemption or a time limit and requeues the job, which starts again from the top
of this script and resumes. A task that raises, or dies, makes srun fail (--kill-on-bad-exit
stops the others); the batch shell then counts the failure and requeues at most
launch.max_retries times before it gives up and writes the reason into the run directory.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from blt_dist.config import load_config
from blt_dist.training.signals import StopRequest
from launch import records
from launch.slurm_cli import classify_stop, job_info, requeue
from launch.slurm_env import export_task_env


class TrainTask:
    """The function submitit pickles: one instance per run, called on every Slurm task."""

    def __init__(self, run_dir: str):
        self.run_dir = str(run_dir)

    def __call__(self) -> dict:
        stop = StopRequest()  # before the slow imports: replaces submitit's handlers as well
        # lazy: torch and DeepSpeed take 2-3 s to import; a preemption signal in that time must find
        # the handlers above installed (this module, which submitit unpickles, loads without torch)
        from blt_dist.training.loop import train

        run_dir = Path(self.run_dir)
        task = export_task_env()
        cfg = load_config(run_dir / "config.yaml")
        main = task.rank == 0
        if main:
            records.add_event(run_dir, "start", job_id=task.job_id, restart_count=task.restart_count,
                              world_size=task.world_size, master=f"{task.master_addr}:{task.master_port}",
                              host=os.uname().nodename)
        status = train(cfg, stop)
        if status != 0:
            raise SystemExit(status)  # the batch shell counts it as a failure
        if not stop.stopped:
            if main:
                records.add_event(run_dir, "completed", job_id=task.job_id, restart_count=task.restart_count)
            return {"status": "completed", "run_dir": self.run_dir}

        # An agreed stop: every rank has saved the same step. Rank 0 decides what happens next.
        if main:
            info = job_info(task.job_id)
            reason = classify_stop(info, stop.signals)
            if reason == "cancelled":
                records.add_event(run_dir, "cancelled", job_id=task.job_id, signals=stop.signals)
            elif records.count(run_dir, *records.STOP_REASONS) >= cfg.launch.max_requeues:
                records.add_event(run_dir, "gave_up", job_id=task.job_id, reason=f"{reason}: launch.max_requeues="
                                  f"{cfg.launch.max_requeues} requeues used; resubmit with continue.sh")
            else:
                # the event first: a successful requeue ends this job's processes at once
                records.add_event(run_dir, reason, job_id=task.job_id, restart_count=task.restart_count,
                                  signals=stop.signals, step=_newest_step(run_dir))
                print(f"[launch] {reason}: checkpoint saved; requeueing job {task.job_id}", flush=True)
                ok, message = requeue(task.job_id)
                if not ok:
                    records.add_event(run_dir, "requeue_failed", job_id=task.job_id, restart_count=task.restart_count,
                                      reason=f"scontrol requeue: {message}; resubmit with continue.sh")
                    print(f"[launch] scontrol requeue failed: {message}", flush=True)
        # Not a result: the run is not finished, so submitit must not record one.
        raise SystemExit(0)


def after_srun(run_dir: Path, srun_status: int) -> int:
    """The batch shell's step after srun: retry a failed run at most launch.max_retries times.
    Returns the batch script's exit status."""
    job_id = os.environ.get("SLURM_JOB_ID", "?")
    if srun_status == 0:
        return 0
    restart = int(os.environ.get("SLURM_RESTART_COUNT", 0) or 0)
    state = records.status(run_dir) or {}
    this_run = state.get("job_id") == job_id and state.get("restart_count") == restart
    if this_run and state.get("event") in (*records.STOP_REASONS, "cancelled", "gave_up", "requeue_failed"):
        return 0  # the task stopped on purpose and has requeued (or not) itself; srun saw it killed
    if this_run and state.get("event") == "completed":
        # the run finished and exported; a task then died in the interpreter's teardown
        print(f"[launch] run completed; srun exited with status {srun_status} after it (not retried)", flush=True)
        return 0
    max_retries = load_config(run_dir / "config.yaml").launch.max_retries
    failures = records.count(run_dir, "failed")
    reason = f"srun exited with status {srun_status} (see {run_dir / 'slurm'} for the task logs)"
    if failures >= max_retries:
        records.add_event(run_dir, "gave_up", job_id=job_id, restart_count=restart,
                          reason=f"{reason}; {failures} retries used (launch.max_retries={max_retries})")
        (run_dir / "FAILED").write_text(
            f"job {job_id} failed: {reason}.\nIt was retried {failures} times (launch.max_retries={max_retries}); "
            f"fix the cause, then resubmit with {run_dir / 'continue.sh'}.\n"
        )
        print(f"[launch] giving up after {failures} retries: {reason}", flush=True)
        return 1
    records.add_event(run_dir, "failed", job_id=job_id, restart_count=restart, reason=reason, retry=failures + 1)
    print(f"[launch] failure {failures + 1}/{max_retries}: {reason}; requeueing", flush=True)
    ok, message = requeue(job_id)
    if not ok:
        records.add_event(run_dir, "requeue_failed", job_id=job_id, restart_count=restart,
                          reason=f"scontrol requeue: {message}; resubmit with continue.sh")
        print(f"[launch] scontrol requeue failed: {message}", flush=True)
    return 0 if ok else 1


def _newest_step(run_dir: Path):
    # lazy: checkpoint.py imports torch and DeepSpeed (2 s); the batch shell's steps run without them
    from blt_dist.training.checkpoint import newest_complete

    found = newest_complete(run_dir, log=lambda *_: None)
    return found[1].get("step") if found else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.task", description="blt-dist's steps inside a Slurm job")
    sub = parser.add_subparsers(dest="step", required=True)
    after = sub.add_parser("after-srun", help="count a failed srun and requeue within launch.max_retries")
    after.add_argument("run_dir", type=Path)
    after.add_argument("srun_status", type=int)
    args = parser.parse_args(argv)
    try:
        return after_srun(args.run_dir, args.srun_status)
    except Exception:  # the batch shell must still end; say why in its log
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
