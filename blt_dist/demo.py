"""`blt-dist demo`: the main job on the bundled default data, end to end.

Stages (each reuses its output when it is already there and complete):
  1. corpus   real text from Debian/PyPI packages   -> data/corpus/{train,heldout}/<type>/*.jsonl
  2. prepare  training text -> byte shards (train/val) -> data/shards
              held-out text -> byte shards per type    -> data/heldout
Later issues extend it: entropy model, entropies, calibration, tokenizer, BLT and BPE
training at matched FLOPs, and the bits-per-byte comparison.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from blt_dist.data.prepare import format_summary, prepare
from blt_dist.data.shards import MANIFEST
from blt_dist.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="where corpus and shards go (default data/)")
    parser.add_argument("--cache", type=Path, default=Path(".cache/corpus"), help="package download cache")
    parser.add_argument("--recipe", default="full", choices=("full", "small", "pip"), help="corpus recipe")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _stage(name: str) -> float:
    print(f"\n== {name}", flush=True)
    return time.perf_counter()


def run(args: argparse.Namespace) -> int:
    from blt_dist.cli import main as cli_main

    data_dir: Path = args.data_dir
    corpus_dir = data_dir / "corpus"
    started = _stage(f"corpus ({args.recipe} recipe) -> {corpus_dir}")
    corpus_args = ["corpus", "--out", str(corpus_dir), "--cache", str(args.cache), "--recipe", args.recipe]
    if (corpus_dir / "manifest.json").is_file():
        corpus_args.append("--force")  # a rebuild from the warm cache is deterministic and cheap
    if cli_main(corpus_args) != 0:
        raise UserError("corpus build failed (see above)")
    print(f"corpus: {time.perf_counter() - started:.1f} s")

    summaries = {}
    for source, target, val_fraction in (("train", "shards", 0.01), ("heldout", "heldout", 0.0)):
        started = _stage(f"prepare {corpus_dir / source} -> {data_dir / target}")
        manifest = prepare(
            [corpus_dir / source],
            data_dir / target,
            val_fraction=val_fraction,
            force=(data_dir / target / MANIFEST).is_file(),
            progress=not args.no_progress,
        )
        summaries[target] = manifest
        print(f"prepare: {time.perf_counter() - started:.1f} s")

    print("\n== summary")
    for target, manifest in summaries.items():
        print(f"\n{data_dir / target}  (fingerprint {manifest['fingerprint'][:16]})")
        print(format_summary(manifest))
    return 0
