"""Patcher throughput on one core: MB/s of positions patched, per mode (a benchmark, not a test).

    python tools/bench_patching.py [--mb 100] [--batch 64] [--seq 16384]

Synthetic data shaped like the loader's (blt_dist.bench.datapath.synthetic_patching_batches, which
`blt-dist bench` also uses): int64 ids in [B, T] batches with a document (BOS) every ~2 KB,
float16 entropies as stored in entropy shards, thresholds set so patches average ~4.5 bytes.
The target is 200 MB/s per core, so patching never limits a loader worker.
"""
from __future__ import annotations

import os

# single core: numpy itself is single-threaded here, but keep any BLAS/OpenMP pool out of it
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import time  # noqa: E402

from blt_dist.bench.datapath import PATCHER_TARGET_MB_S as TARGET_MB_S  # noqa: E402
from blt_dist.bench.datapath import patching_rates, synthetic_patching_batches  # noqa: E402
from blt_dist.data.patching import PatchingRule, patch_lengths_from_starts  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=100.0, help="MB (million positions) per mode")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=16384)
    args = parser.parse_args(argv)

    print(f"~{args.mb:.0f} MB per mode in [{args.batch}, {args.seq}] calls, one core")
    print(f"{'mode':10s} {'MB/s':>8s} {'x target':>9s} {'mean patch':>11s}")
    for mode, r in patching_rates(args.mb, args.batch, args.seq).items():
        print(f"{mode:10s} {r['mb_s']:8.0f} {r['mb_s'] / TARGET_MB_S:8.2f}x {r['mean_patch']:11.2f}")

    # the loader also needs per-patch lengths; report that helper's rate too
    tokens, entropies = synthetic_patching_batches(args.batch, args.seq, distinct=1)[0]
    starts = PatchingRule("static", patch_size=4, max_patch_length=16).starts(tokens, entropies)
    n_patches = int(starts.sum(axis=1).max())
    begin = time.perf_counter()
    repeats = 10
    for _ in range(repeats):
        patch_lengths_from_starts(starts, n_patches)
    rate = repeats * args.batch * args.seq / (time.perf_counter() - begin) / 1e6
    print(f"{'lengths':10s} {rate:8.0f} {rate / TARGET_MB_S:8.2f}x  (patch_lengths_from_starts)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
