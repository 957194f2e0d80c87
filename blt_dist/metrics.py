"""Metrics: one line per log step on rank 0, always `metrics.jsonl`, wandb when enabled.

MFU = achieved FLOP/s (from the FLOP counter: training FLOPs per byte x bytes per second)
divided by a peak: on GPU from a table of dense bf16/fp32 peaks, on CPU from matmuls timed at
start-up in the run's dtype and thread count (CPUs have no datasheet number worth using).
The log header says which, and for a CPU what was measured (sizes, dtype, threads, seconds).
An MFU above 100% means the peak was measured low (the machine was busy at start-up): the step
line then says "peak suspect", and the record carries `mfu_peak_suspect`, so it is never read
as a real number.
"""
from __future__ import annotations

import json
import math
import os
import resource
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

# Dense peak FLOP/s per GPU (no sparsity), by (name fragment, dtype).
GPU_PEAKS = {
    ("H200", "bf16"): 989e12, ("H100", "bf16"): 989e12, ("A100", "bf16"): 312e12, ("L40S", "bf16"): 362e12,
    ("H200", "fp32"): 67e12, ("H100", "fp32"): 67e12, ("A100", "fp32"): 19.5e12, ("L40S", "fp32"): 91.6e12,
}


# The CPU peak is the best FLOP/s of square matmuls at these sizes, each timed for about this
# long. A single short matmul reads low (thread pool and clock still waking up, another job on
# the cores for a moment): a 1024^2 best-of-5 read 104 GFLOP/s fp32 on a machine that sustains
# ~230, and MFU then printed above 100%. About 1.5 s at start-up buys a number worth dividing by.
PEAK_SIZES = (512, 1024, 2048)
PEAK_SECONDS_PER_SIZE = 0.4


@dataclass(frozen=True)
class PeakMeasurement:
    """What a CPU matmul peak measurement did, so the log can say it."""

    flops: float  # best FLOP/s seen
    dtype: str  # fp32 | bf16
    best_size: int
    sizes: tuple[int, ...]
    threads: int
    seconds: float  # wall time spent measuring, all sizes together

    def describe(self) -> str:
        sizes = "/".join(str(n) for n in self.sizes)
        return (
            f"CPU {self.dtype} matmul measured at start-up: best of {sizes} square matmuls, "
            f"{self.seconds:.1f} s in all, {self.threads} threads, best {self.flops / 1e9:.0f} GFLOP/s at {self.best_size}"
        )


def measure_cpu_peak(dtype: torch.dtype, sizes: Sequence[int] = PEAK_SIZES,
                     seconds_per_size: float = PEAK_SECONDS_PER_SIZE) -> PeakMeasurement:
    """Best FLOP/s of square matmuls on this CPU, in this process's thread setting.

    Each size gets one untimed warm-up call, then calls until `seconds_per_size` has passed
    (at least 3); the fastest single call counts. Taking the best over sizes and calls makes
    the peak high, and so MFU conservative."""
    begin = time.perf_counter()
    best_flops, best_size = 0.0, sizes[0]
    for size in sizes:
        a = torch.randn(size, size).to(dtype)
        b = torch.randn(size, size).to(dtype)
        torch.mm(a, b)  # warm up: allocation, packing, thread pool
        calls, size_begin = 0, time.perf_counter()
        while calls < 3 or time.perf_counter() - size_begin < seconds_per_size:
            start = time.perf_counter()
            torch.mm(a, b)
            flops = 2 * size**3 / (time.perf_counter() - start)
            if flops > best_flops:
                best_flops, best_size = flops, size
            calls += 1
    name = "bf16" if dtype == torch.bfloat16 else "fp32" if dtype == torch.float32 else str(dtype)
    return PeakMeasurement(best_flops, name, best_size, tuple(sizes), torch.get_num_threads(),
                           time.perf_counter() - begin)


def peak_flops(dtype_name: str, device: torch.device) -> tuple[float, str]:
    """(peak FLOP/s, where the number comes from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        key = "bf16" if dtype_name in ("bf16", "fp16") else "fp32"
        for (fragment, kind), value in GPU_PEAKS.items():
            if fragment in name and kind == key:
                return value, f"{name} {key} datasheet peak"
        return math.nan, f"{name}: not in the peak table (MFU not reported)"
    measured = measure_cpu_peak(torch.bfloat16 if dtype_name == "bf16" else torch.float32)
    return measured.flops, measured.describe()


def bf16_is_native(device: torch.device) -> bool:
    """Whether bf16 matmuls run in hardware here (else they are emulated and slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


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
