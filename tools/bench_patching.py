"""Patcher throughput on one core: MB/s of positions patched, per mode (a benchmark, not a test).

    python tools/bench_patching.py [--mb 100] [--batch 64] [--seq 16384]

Synthetic data shaped like the loader's: int64 ids in [B, T] batches with a document (BOS) every
~2 KB, float16 entropies as stored in entropy shards, thresholds set so patches average ~4.5
bytes. 16 distinct batches are cycled so the data does not sit in cache. The target is 200 MB/s
per core, so patching never limits a loader worker.
"""
from __future__ import annotations

import os

# single core: numpy itself is single-threaded here, but keep any BLAS/OpenMP pool out of it
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from blt_dist.data.patching import MODES, PatchingRule, patch_lengths_from_starts  # noqa: E402
from blt_dist.vocab import BOS_ID, OFFSET  # noqa: E402

TARGET_MB_S = 200.0
DISTINCT_BATCHES = 16


def synthetic_batches(batch: int, seq: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(DISTINCT_BATCHES):
        tokens = rng.integers(OFFSET, OFFSET + 256, size=(batch, seq), dtype=np.int64)
        tokens[rng.random((batch, seq)) < 1 / 2048] = BOS_ID
        # entropies: a smooth random level plus spikes, roughly like a byte LM's (0..~5 nats)
        level = np.abs(rng.standard_normal((batch, seq))).cumsum(axis=1) % 3.0
        entropies = (level * rng.random((batch, seq)) + rng.exponential(0.3, (batch, seq))).astype(np.float16)
        out.append((tokens, entropies))
    return out


def threshold_for(values: np.ndarray, mean_size: float = 4.5) -> float:
    """A quantile leaving ~1/mean_size of positions above it."""
    return float(np.quantile(values, 1.0 - 1.0 / mean_size))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=100.0, help="MB (million positions) per mode")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=16384)
    args = parser.parse_args(argv)

    batches = synthetic_batches(args.batch, args.seq)
    sample = batches[0][1].astype(np.float32)
    rules = {
        "entropy": PatchingRule("entropy", threshold=threshold_for(sample), max_patch_length=16),
        "monotonic": PatchingRule(
            "monotonic", threshold_r=threshold_for(np.diff(sample, axis=1)), max_patch_length=16
        ),
        "space": PatchingRule("space", max_patch_length=16),
        "static": PatchingRule("static", patch_size=4, max_patch_length=16),
        "byte": PatchingRule("byte", max_patch_length=16),
    }
    per_call = args.batch * args.seq
    calls = max(1, round(args.mb * 1e6 / per_call))
    print(f"{calls} calls x [{args.batch}, {args.seq}] = {calls * per_call / 1e6:.0f} MB per mode, one core")
    print(f"{'mode':10s} {'MB/s':>8s} {'x target':>9s} {'mean patch':>11s}")
    for mode in MODES:
        rule = rules[mode]
        rule.starts(*batches[0])  # warm-up
        n_starts = 0
        begin = time.perf_counter()
        for k in range(calls):
            tokens, entropies = batches[k % DISTINCT_BATCHES]
            n_starts += int(rule.starts(tokens, entropies).sum())
        elapsed = time.perf_counter() - begin
        rate = calls * per_call / elapsed / 1e6
        print(f"{mode:10s} {rate:8.0f} {rate / TARGET_MB_S:8.2f}x {calls * per_call / n_starts:11.2f}")

    # the loader also needs per-patch lengths; report that helper's rate too
    starts = rules["entropy"].starts(*batches[0])
    n_patches = int(starts.sum(axis=1).max())
    begin = time.perf_counter()
    repeats = 10
    for _ in range(repeats):
        patch_lengths_from_starts(starts, n_patches)
    rate = repeats * per_call / (time.perf_counter() - begin) / 1e6
    print(f"{'lengths':10s} {rate:8.0f} {rate / TARGET_MB_S:8.2f}x  (patch_lengths_from_starts)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
