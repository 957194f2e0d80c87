"""What the machine can do: matmul peaks (for MFU) and whether bf16 runs natively.

On a GPU the peak comes from a table of dense datasheet numbers; on a CPU from square matmuls
timed in this process's dtype and thread count (CPUs have no datasheet number worth using).
Ground layer: imports torch only, so the data plane, training and the bench can all use it.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Sequence

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
