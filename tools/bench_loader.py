"""Loader throughput against what training consumes (a benchmark, not a test).

    python tools/bench_loader.py [--mb 4] [--seconds 4]

Builds, in a temporary directory, the whole data path at small scale (the dataset, entropies,
threshold and measurements are blt_dist/bench/datapath.py's, shared with `blt-dist bench`):
  byte dataset   `prepare` on ~MB of data/corpus/train (synthetic text when the corpus is absent)
  entropy model  a random tiny entropy model export (its entropies are noise, but the loader
                 does the same work for any values)
  entropy shards `compute_entropy_dataset`, the code path of `blt-dist entropies`
  threshold      `calibrate_threshold` for 4.5 bytes per patch
  tokenizer      a 4096-token sentencepiece BPE (configs/bpe/tiny.yaml's vocabulary)
then prints samples/s and MB/s (raw bytes predicted) of the BLT loader with 0 and 2 workers,
the byte loader and the BPE loader, all at the tiny configs' shapes; and the training
consumption rate of configs/blt/tiny.yaml (forward + backward + AdamW on a loader batch, raw
bytes per second). The ratio loader / consumption should be >= 20x, so the loader never shows
up in a step's time even when the trainer is far faster than this machine's CPU.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from blt_dist.bench.datapath import LOADER_TARGET_RATIO as TARGET_RATIO  # noqa: E402 (shared with `blt-dist bench`)
from blt_dist.bench.datapath import build_loader_world, measure_loader, measure_loader_training  # noqa: E402
from blt_dist.config import load_config  # noqa: E402
from blt_dist.data.loader import LoaderSpec  # noqa: E402
from blt_dist.data.tokenizer import train_tokenizer  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=4.0, help="MB of text in the temporary dataset")
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds per loader measurement")
    parser.add_argument("--steps", type=int, default=8, help="training steps timed for the consumption rate")
    args = parser.parse_args(argv)

    blt_cfg = load_config(REPO / "configs" / "blt" / "tiny.yaml")
    bpe_cfg = load_config(REPO / "configs" / "bpe" / "tiny.yaml")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads")
    with tempfile.TemporaryDirectory(prefix="bench_loader.") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        world = build_loader_world(tmp, args.mb)
        print(f"byte dataset: {world.megabytes:.1f} MB from {world.source}; entropies (tiny random model, window 64, "
              f"1 thread) {world.megabytes / world.entropy_seconds:.2f} MB/s; {time.perf_counter() - t0:.1f} s in all")
        threshold = world.threshold
        t0 = time.perf_counter()
        train_tokenizer(tmp / "bytes", tmp / "bpe.model", vocab_size=bpe_cfg.model.vocab_size)
        print(f"threshold {threshold} (4.5 bytes/patch); BPE tokenizer trained in {time.perf_counter() - t0:.1f} s")

        d, common = blt_cfg.data, dict(split="train", micro_batch_size=blt_cfg.train.micro_batch_size, seed=0)
        blt_spec = world.blt_spec
        specs = {
            "blt, 0 workers": (blt_spec, 0),
            "blt, 2 workers": (blt_spec, 2),
            "bytes (entropy model), 0 workers": (
                LoaderSpec(path=str(tmp / "bytes"), family="bytes", sample_len=d.byte_capacity, **common), 0
            ),
            "bpe, 0 workers": (
                LoaderSpec(
                    path=str(tmp / "bytes"), family="bpe", sample_len=bpe_cfg.data.tokens_per_sample,
                    tokenizer=str(tmp / "bpe.model"), **common,
                ),
                0,
            ),
        }
        print(f"\n{'loader':34s} {'samples/s':>10s} {'MB/s':>8s}   (micro batch {common['micro_batch_size']})")
        rates = {}
        for name, (spec, workers) in specs.items():
            samples_s, mb_s = measure_loader(spec, workers, args.seconds)
            rates[name] = mb_s
            print(f"{name:34s} {samples_s:10.0f} {mb_s:8.2f}")

        best, median = (rate / 1e6 for rate in measure_loader_training(blt_spec, args.steps))
        print(
            f"\ntraining configs/blt/tiny.yaml (fwd+bwd+AdamW, fp32, {torch.get_num_threads()} threads): "
            f"{best:.4f} MB/s of raw bytes at the fastest of {args.steps} steps (median {median:.4f})"
        )
        consumed = best
        for name in ("blt, 0 workers", "blt, 2 workers"):
            ratio = rates[name] / consumed
            verdict = "ok" if ratio >= TARGET_RATIO else f"BELOW the {TARGET_RATIO:.0f}x target"
            print(f"{name}: {ratio:.0f}x the consumption rate ({verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
