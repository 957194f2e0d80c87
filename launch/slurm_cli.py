"""The few Slurm commands launch/ calls (scontrol, squeue, sbatch presence), with their errors kept.

Every call passes an argument list (never a shell string), so job names and paths with spaces or
quotes reach Slurm as they are.
"""
from __future__ import annotations

import shutil
import subprocess
from datetime import datetime
from pathlib import Path
from typing import Optional

from blt_dist.errors import UserError


def require_slurm() -> None:
    """A clear error where there is no Slurm to submit to."""
    missing = [tool for tool in ("sbatch", "srun", "squeue", "scontrol") if shutil.which(tool) is None]
    if missing:
        raise UserError(
            f"no Slurm here ({', '.join(missing)} not found on PATH). On one machine, train with "
            "`blt-dist train CONFIG` (or torchrun), and run sweeps with `blt-dist sweep GRID --backend local`"
        )


def run(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def test_submission(script: Path) -> None:
    """`sbatch --test-only SCRIPT`: Slurm's own verdict on a job before it is queued. An unknown
    partition is refused by sbatch anyway, but a request no node can ever hold (more tasks or
    memory than a node has) would otherwise be accepted and pend forever (Reason=PartitionConfig)."""
    result = run(["sbatch", "--test-only", str(script)])
    if result.returncode != 0:
        lines = [line.strip() for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        raise UserError("sbatch refused the job: " + "; ".join(lines or [f"exit status {result.returncode}"]))


def job_info(job_id: str) -> Optional[dict[str, str]]:
    """`scontrol show job -o JOB` as a dict (None when Slurm no longer knows the job)."""
    result = run(["scontrol", "show", "job", "-o", str(job_id)])
    if result.returncode != 0 or not result.stdout.strip():
        return None
    info: dict[str, str] = {}
    for token in result.stdout.split():
        key, sep, value = token.partition("=")
        if sep and key not in info:
            info[key] = value
    return info


def parse_duration(text: str) -> Optional[float]:
    """Slurm's [D-]HH:MM:SS / MM:SS / MM -> seconds (None for UNLIMITED or Partition_Limit)."""
    if not text or not text[0].isdigit():
        return None
    days, _, rest = text.rpartition("-") if "-" in text else ("0", "", text)
    parts = [int(p) for p in rest.split(":")]
    if len(parts) == 1:  # minutes
        parts = [0, parts[0], 0]
    elif len(parts) == 2:  # minutes:seconds
        parts = [0, *parts]
    hours, minutes, seconds = parts
    return int(days) * 86400 + hours * 3600 + minutes * 60 + seconds


def parse_time(text: str) -> Optional[datetime]:
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S")
    except (TypeError, ValueError):
        return None


def classify_stop(info: Optional[dict[str, str]], signals: list[str]) -> str:
    """Why Slurm asked this job to stop: 'preempted', 'timeout' or 'cancelled'.

    What `scontrol show job` says while the job saves (measured on the local slurmctld,
    tools/slurm_cluster.sh, and read in slurmctld's preempt code):
    - preemption sets PreemptTime before it signals the job and moves the end time to
      now + GraceTime; the job stays RUNNING through the grace time;
    - a time limit sends the job's --signal LEAD seconds before an end time that is still
      start + TimeLimit; the job stays RUNNING;
    - scancel sets the end time to now and shows COMPLETING (CANCELLED once every process of
      the job has exited, which includes this one, so never while it asks).
    Slurm also shows COMPLETING when it ends a job at its hard time limit (a save that outlasted
    the signal lead); the end time, still start + TimeLimit, tells that apart from a cancel.
    Without scontrol's answer a stop is taken as a preemption (the cautious reading: it is
    requeued, not counted as a failure). `signals` is kept for the record; Slurm sends SIGTERM
    for a cancel and for a preemption without preempt_send_user_signal alike."""
    if info is None:
        return "preempted"
    state = info.get("JobState", "")
    if state.startswith("CANCELLED"):
        return "cancelled"
    if parse_time(info.get("PreemptTime", "")) is not None:
        return "preempted"
    start, end = parse_time(info.get("StartTime", "")), parse_time(info.get("EndTime", ""))
    limit = parse_duration(info.get("TimeLimit", ""))
    ending = state.startswith("COMPLETING")
    if start is None or end is None or limit is None:  # no time limit to compare the end time with
        if ending:
            return "cancelled"
        return "preempted" if "SIGTERM" in signals or "SIGUSR2" in signals else "timeout"
    moved_earlier = (start.timestamp() + limit) - end.timestamp() > 60
    if ending:
        return "cancelled" if moved_earlier else "timeout"
    return "preempted" if moved_earlier else "timeout"


def requeue(job_id: str) -> tuple[bool, str]:
    result = run(["scontrol", "requeue", str(job_id)])
    return result.returncode == 0, (result.stderr or result.stdout).strip()


def queue_state(job_id: str) -> Optional[str]:
    """PENDING / RUNNING / ... while Slurm knows the job, else None."""
    info = job_info(job_id)
    return info.get("JobState") if info else None
