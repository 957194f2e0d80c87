"""Metrics: one line per log step on rank 0, always `metrics.jsonl`, wandb when enabled.

MFU = achieved FLOP/s (from the FLOP counter: training FLOPs per byte x bytes per second)
divided by the peak of `blt_dist.hardware.peak_flops` (a GPU's datasheet, or a CPU's matmuls
timed at start-up); the log header says which. An MFU above 100% means the peak was measured low (the machine was busy at start-up): the step
line then says "peak suspect", and the record carries `mfu_peak_suspect`, so it is never read
as a real number.
"""
from __future__ import annotations

import json
import math
import os
import resource
import uuid
from pathlib import Path
from typing import Optional

import torch


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux -> GB


class MetricsLogger:
    """Rank 0 writes; other ranks hold an inert logger so call sites need no rank checks."""

    def __init__(self, run_dir: Path, enabled: bool, wandb_cfg=None, config_dict: Optional[dict] = None,
                 wandb_id: Optional[str] = None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.wandb = None
        self.wandb_id = wandb_id
        self._warned_suspect_peak = False
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if wandb_cfg is not None and wandb_cfg.wandb and os.environ.get("WANDB_MODE", wandb_cfg.wandb_mode) != "disabled":
            import wandb  # lazy: 0.4 s to import, and only runs with log.wandb=true need it

            self.wandb_id = wandb_id or uuid.uuid4().hex[:8]  # our own id: it goes into every checkpoint
            self.wandb = wandb.init(
                project=wandb_cfg.wandb_project,
                id=self.wandb_id,
                resume="allow",  # a requeued run continues the same wandb run
                dir=str(run_dir),
                mode=os.environ.get("WANDB_MODE", wandb_cfg.wandb_mode),
                config=config_dict,
                name=Path(run_dir).name,
            )

    def log(self, record: dict, line: Optional[str] = None) -> None:
        if not self.enabled:
            return
        if record.get("mfu", 0.0) > 1.0:
            record = {**record, "mfu_peak_suspect": True}
            if not self._warned_suspect_peak:
                self._warned_suspect_peak = True
                print(f"warning: MFU {100 * record['mfu']:.0f}% is above 100%: the peak measured at start-up is "
                      "suspect (too low: the machine was probably busy then); MFU lines are flagged", flush=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if line:
            print(line, flush=True)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record.get("step"))

    def info(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def format_line(r: dict) -> str:
    """The one log line per step."""
    eta = r.get("eta_s", math.nan)
    eta_text = f"{eta / 3600:.1f}h" if eta >= 3600 else f"{eta / 60:.1f}m" if eta >= 60 else f"{eta:.0f}s"
    parts = [
        f"step {r['step']}/{r['total_steps']}",
        f"loss {r['loss']:.4f}",
        f"bpb {r['bpb']:.4f}",
        f"lr {r['lr']:.2e}",
        f"gnorm {r['grad_norm']:.3f}",
        f"{r['bytes_per_s'] / 1e3:.1f} kB/s",
        f"{r['tflops']:.3f} TFLOP/s",
        f"MFU {100 * r['mfu']:.1f}%" + (" (peak suspect)" if r["mfu"] > 1.0 else ""),
        f"mem {r['memory_gb']:.2f} GB",
        f"data {100 * r['data_fraction']:.0f}%",
        f"ETA {eta_text}",
    ]
    if "mean_patch_size" in r:
        parts.insert(6, f"patch {r['mean_patch_size']:.2f} B")
    return " | ".join(parts)
