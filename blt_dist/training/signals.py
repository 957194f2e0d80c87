"""How a run is told to stop, and how the tests break one on purpose.

StopRequest: SIGTERM/SIGUSR1/SIGUSR2 (Slurm preemption and time limits, scancel --signal) set a
flag that every rank agrees on each step, so that all of them save at the same step.
Faults: the fault injection of the resume, NaN and retry tests (BLT_FAULTS); empty in real runs.
"""
from __future__ import annotations

import errno
import os
import signal
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class StopRequest:
    """Set by SIGTERM/SIGUSR1/SIGUSR2 (Slurm preemption and time limits, scancel --signal). The
    flag is agreed across ranks every step so that every rank saves at the same step.

    Creating one installs the handlers; launch/ creates it before anything slow so that a signal
    that arrives during start-up is kept, and passes it to `train()`. `signals` lists what this
    rank received, in order; `stopped` says the loop ended early on an agreed stop (this rank's
    signal or another's)."""

    def __init__(self):
        self.requested = False
        self.stopped = False
        self.signals: list[str] = []
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    @property
    def signal_name(self) -> str:
        return self.signals[-1] if self.signals else ""

    def _handle(self, signum, frame):
        self.requested = True
        self.signals.append(signal.Signals(signum).name)

    def agreed(self) -> bool:
        # lazy: this module loads without torch, so that launch/task.py can install the handlers
        # before the 2-3 s of torch and DeepSpeed imports
        from blt_dist.parallel.collectives import reduce_int

        self.stopped = self.stopped or bool(reduce_int(self.requested, "max"))
        return self.stopped


class Faults:
    """Fault injection for the resume, NaN and retry tests, from BLT_FAULTS, e.g.
    "kill_after_step=3" (SIGKILL this process, rank 0 only, right after that step),
    "raise_after_step=2" (rank 0 raises RuntimeError right after that step: a crash that is
    not a preemption), "nan_at_steps=4,5" (make those steps' loss NaN on every rank) or
    "step_sleep_s=0.1" (every step takes at least that long: a pace the Slurm tests can
    interrupt mid-run, whatever the machine's speed) or "save_error=2:1:io" (the save at step 2
    fails on rank 1 inside DeepSpeed's own writes: `io`, a full disk; `bug`, any other error).
    Empty in real runs."""

    def __init__(self, spec: str):
        items = dict(item.split("=", 1) for item in spec.split(";") if item)
        self.kill_after_step = int(items.get("kill_after_step", -1))
        self.raise_after_step = int(items.get("raise_after_step", -1))
        self.nan_at_steps = {int(x) for x in items.get("nan_at_steps", "").split(",") if x}
        self.step_sleep_s = float(items.get("step_sleep_s", 0))
        step, rank, kind = (items.get("save_error") or "-1:-1:io").split(":")
        self.save_error = (int(step), int(rank), kind)

    def after_step(self, step: int, rank: int) -> None:
        if self.step_sleep_s:
            time.sleep(self.step_sleep_s)
        if step == self.kill_after_step and rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        if step == self.raise_after_step and rank == 0:
            raise RuntimeError(f"BLT_FAULTS: injected failure after step {step}")

    def before_save(self, engine, step: int, rank: int) -> None:
        """Arms the injected save failure: DeepSpeed's checkpoint writer raises on that rank."""
        at_step, on_rank, kind = self.save_error
        if step != at_step or rank != on_rank:
            return
        writer = engine.checkpoint_engine
        original = writer.save

        def failing_save(state_dict, path):
            writer.save = original  # once
            if kind == "io":
                raise OSError(errno.ENOSPC, "No space left on device (BLT_FAULTS)", str(path))
            raise ValueError(f"BLT_FAULTS: injected bug while saving {path}")

        writer.save = failing_save
