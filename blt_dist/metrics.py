"""Metrics: one line per log step on rank 0, always `metrics.jsonl`, wandb when enabled.

MFU = achieved FLOP/s (from the FLOP counter: training FLOPs per byte x bytes per second)
divided by a peak: on GPU from a table of dense bf16/fp32 peaks, on CPU from a matmul timed at
start-up in the run's dtype and thread count (CPUs have no datasheet number worth using).
The log header says which.
"""
from __future__ import annotations

import json
import math
import os
import resource
import time
import uuid
from pathlib import Path
from typing import Optional

import torch

# Dense peak FLOP/s per GPU (no sparsity), by (name fragment, dtype).
GPU_PEAKS = {
    ("H200", "bf16"): 989e12, ("H100", "bf16"): 989e12, ("A100", "bf16"): 312e12, ("L40S", "bf16"): 362e12,
    ("H200", "fp32"): 67e12, ("H100", "fp32"): 67e12, ("A100", "fp32"): 19.5e12, ("L40S", "fp32"): 91.6e12,
}


def measure_cpu_peak(dtype: torch.dtype, size: int = 1024, repeats: int = 5) -> float:
    """Best-of-N FLOP/s of a square matmul on this CPU, in this process's thread setting."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.mm(a, b)  # warm up
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops(dtype_name: str, device: torch.device) -> tuple[float, str]:
    """(peak FLOP/s, where the number comes from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        key = "bf16" if dtype_name in ("bf16", "fp16") else "fp32"
        for (fragment, kind), value in GPU_PEAKS.items():
            if fragment in name and kind == key:
                return value, f"{name} {key} datasheet peak"
        return math.nan, f"{name}: not in the peak table (MFU not reported)"
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    value = measure_cpu_peak(dtype)
    return value, f"CPU {dtype_name} matmul measured at start-up ({torch.get_num_threads()} threads)"


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
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if wandb_cfg is not None and wandb_cfg.wandb and os.environ.get("WANDB_MODE", wandb_cfg.wandb_mode) != "disabled":
            import wandb

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
        f"MFU {100 * r['mfu']:.1f}%",
        f"mem {r['memory_gb']:.2f} GB",
        f"data {100 * r['data_fraction']:.0f}%",
        f"ETA {eta_text}",
    ]
    if "mean_patch_size" in r:
        parts.insert(6, f"patch {r['mean_patch_size']:.2f} B")
    return " | ".join(parts)
