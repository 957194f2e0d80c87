"""What a launched run directory says about its Slurm life.

    RUN_DIR/launch/submission.json   command line, cwd, resources, sbatch parameters, job ids
    RUN_DIR/launch/job.sbatch        the exact sbatch script submitted (the newest one)
    RUN_DIR/launch/events.jsonl      one line per start / stop: job id, restart count, reason
    RUN_DIR/launch/status.json       the latest state: running | requeued | completed | failed | cancelled
    RUN_DIR/continue.sh              one command that resubmits the run where it stopped

Events are written by rank 0 of a task (start, preempted, timeout, completed) and by the batch
shell after srun (failed, gave_up), never by two writers at once. Failures are counted from the
events, so the retry budget survives requeues and resubmissions alike.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

LAUNCH_DIR = "launch"
STOP_REASONS = ("preempted", "timeout")  # requeued, not counted as failures


def launch_dir(run_dir: Path) -> Path:
    return Path(run_dir) / LAUNCH_DIR


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None


def read_submission(run_dir: Path) -> Optional[dict]:
    return read_json(launch_dir(run_dir) / "submission.json")


def write_submission(run_dir: Path, submission: dict) -> None:
    _write_json(launch_dir(run_dir) / "submission.json", submission)


def add_job_id(run_dir: Path, job_id: str, sbatch_text: str) -> None:
    """Records a (re)submission: its job id and the exact script."""
    submission = read_submission(run_dir) or {}
    submission.setdefault("job_ids", []).append({"job_id": job_id, "submitted_at": _now()})
    write_submission(run_dir, submission)
    (launch_dir(run_dir) / "job.sbatch").write_text(sbatch_text)


def events(run_dir: Path) -> list[dict]:
    path = launch_dir(run_dir) / "events.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def add_event(run_dir: Path, event: str, **fields) -> dict:
    """Appends one event and makes it the run's status."""
    record = {"event": event, "time": _now(), **fields}
    path = launch_dir(run_dir) / "events.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    state = {"start": "running", "preempted": "requeued", "timeout": "requeued", "failed": "requeued"}.get(event, event)
    _write_json(launch_dir(run_dir) / "status.json", {"state": state, **record})
    return record


def status(run_dir: Path) -> Optional[dict]:
    return read_json(launch_dir(run_dir) / "status.json")


def count(run_dir: Path, *kinds: str) -> int:
    """Events of these kinds since the run was last submitted (a resubmission starts the
    retry and requeue budgets afresh)."""
    n = 0
    for event in reversed(events(run_dir)):
        if event["event"] == "submitted":
            break
        n += event["event"] in kinds
    return n


def write_continue_script(run_dir: Path) -> Path:
    """RUN_DIR/continue.sh: resubmits this run (same config, code snapshot and resources);
    the trainer resumes from the newest complete checkpoint."""
    path = Path(run_dir) / "continue.sh"
    command = [sys.executable, "-m", "blt_dist.cli", "launch", "--continue", str(Path(run_dir).resolve())]
    path.write_text(
        "#!/bin/sh\n"
        "# Resubmit this run after a crash, a cancel or an exhausted retry budget; it resumes from the\n"
        "# newest complete checkpoint. Extra arguments are passed on (e.g. --time 240 --partition p).\n"
        f'exec {shlex.join(command)} "$@"\n'
    )
    path.chmod(0o755)
    return path


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
