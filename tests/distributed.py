"""Runs `blt-dist` as N real processes on this machine (gloo), the way torchrun would."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from blt_dist.parallel.engine import free_port, local_rank_env

REPO = Path(__file__).resolve().parents[1]


def launch(nproc: int, args: list[str], log_dir: Path, env: dict | None = None) -> list[subprocess.Popen]:
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for rank in range(nproc):
        proc_env = {
            **os.environ, **local_rank_env(rank, nproc, port), "OMP_NUM_THREADS": "1",
            "WANDB_MODE": "disabled", "DS_ACCELERATOR": "cpu",
            # DeepSpeed compiles a shared-memory comm op once (~40 s); keep it across sessions
            "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions"),
            **(env or {}),
        }
        out = open(log_dir / f"rank{rank}.log", "ab")
        procs.append(subprocess.Popen([sys.executable, "-m", "blt_dist.cli", *args], env=proc_env, stdout=out,
                                      stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True))
    return procs


def wait(procs: list[subprocess.Popen], log_dir: Path, timeout: float = 300) -> list[int]:
    """Waits for all; if one dies (e.g. SIGKILL), kill -9 the others (they would hang in a collective)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            return codes
        if any(c is not None and c != 0 for c in codes):
            time.sleep(1.0)  # let the others notice, then stop them the hard way
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
            return [p.wait() for p in procs]
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    raise TimeoutError(f"processes did not finish in {timeout} s; logs in {log_dir}:\n" + logs(log_dir))


def logs(log_dir: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(log_dir.glob("rank*.log")))


def run(nproc: int, args: list[str], log_dir: Path, env: dict | None = None, expect: int = 0, timeout: float = 300):
    codes = wait(launch(nproc, args, log_dir, env), log_dir, timeout)
    assert all(c == expect for c in codes) if expect == 0 else codes[0] == expect, f"exit codes {codes}\n{logs(log_dir)}"
    return codes


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
