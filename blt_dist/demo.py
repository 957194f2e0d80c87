"""`blt-dist demo`: the main job on the bundled default data, end to end, on CPU.

  1. corpus     real text from Debian/PyPI packages          -> data/corpus (full), data/demo/corpus (small)
  2. prepare    byte shards                                   -> data/shards, data/heldout, data/demo/shards
  3. train      the tiny entropy model on the demo shards     -> runs/demo/entropy/export
  4. entropies  entropy shards for the demo data              -> data/demo/entropies
  5. calibrate  the threshold giving 4.5 bytes per patch
  6. tokenizer  sentencepiece BPE on the same shards          -> data/demo/tokenizer.model
  7. train      tiny BLT and tiny BPE at the same FLOP budget -> runs/demo/{blt,bpe}
  8. eval       bits per byte on the held-out sets, per content type, and the comparison table

Training runs on the small corpus so the whole job takes minutes on 2 cores; the full corpus
and its shards (steps 1-2) are what `blt-dist train` uses for real runs (configs/data/corpus.yaml).
Every stage reuses its output when it is complete (training resumes; finished runs are kept).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from blt_dist.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="where corpus and shards go (default data/)")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/demo"), help="training runs (default runs/demo)")
    parser.add_argument("--cache", type=Path, default=Path(".cache/corpus"), help="package download cache")
    parser.add_argument("--recipe", default="full", choices=("full", "small", "pip"), help="corpus recipe for data/corpus")
    parser.add_argument("--flops", type=float, default=4e12, help="training FLOP budget for each of BLT and BPE")
    parser.add_argument("--eval-bytes", type=int, default=60_000, help="held-out bytes scored per content type")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _cli(*argv: str) -> None:
    from blt_dist.cli import main as cli_main

    status = cli_main(list(argv))
    if status != 0:
        raise UserError(f"`blt-dist {' '.join(argv)}` failed with status {status} (see above)")


class _Stage:
    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        print(f"\n== {self.name}", flush=True)
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            print(f"-- {self.name}: {time.perf_counter() - self.started:.1f} s", flush=True)


def _prepare(source: Path, target: Path, val_fraction: float, progress: bool) -> dict:
    from blt_dist.data.prepare import prepare
    from blt_dist.data.shards import MANIFEST

    return prepare([source], target, val_fraction=val_fraction, force=(target / MANIFEST).is_file(), progress=progress)


def _train(config: str, run_dir: Path, *overrides: str) -> Path:
    """Each training run gets its own process, as it would under torchrun or Slurm: DeepSpeed
    keeps process-group state at module level that a second run in one process would reuse."""
    import subprocess
    import sys

    if (run_dir / "export" / "model.safetensors").is_file():
        print(f"{run_dir}: finished earlier, kept")
        return run_dir / "export"
    argv = ["train", config, f"run.dir={run_dir}", *overrides]
    if subprocess.run([sys.executable, "-m", "blt_dist.cli", *argv]).returncode != 0:
        raise UserError(f"`blt-dist {' '.join(argv)}` failed (see above)")
    return run_dir / "export"


def run(args: argparse.Namespace) -> int:
    from blt_dist.data.prepare import format_summary

    data, runs, progress = args.data_dir, args.runs_dir, not args.no_progress
    demo = data / "demo"
    force = lambda d: ["--force"] if (d / "manifest.json").is_file() else []  # rebuilds from the warm cache

    with _Stage(f"corpus ({args.recipe} recipe) and the small demo corpus"):
        _cli("corpus", "--out", str(data / "corpus"), "--cache", str(args.cache), "--recipe", args.recipe,
             *force(data / "corpus"))
        _cli("corpus", "--out", str(demo / "corpus"), "--cache", str(args.cache), "--recipe", "small",
             *force(demo / "corpus"))

    with _Stage("prepare byte shards"):
        built = {
            data / "shards": _prepare(data / "corpus" / "train", data / "shards", 0.01, progress),
            data / "heldout": _prepare(data / "corpus" / "heldout", data / "heldout", 0.0, progress),
            demo / "shards": _prepare(demo / "corpus" / "train", demo / "shards", 0.02, progress),
        }
        for target, manifest in built.items():
            print(f"\n{target}  (fingerprint {manifest['fingerprint'][:16]})\n{format_summary(manifest)}")

    shards = demo / "shards"
    with _Stage("train the tiny entropy model"):
        entropy = _train("configs/entropy/tiny.yaml", runs / "entropy", f"data.train={shards}", f"data.val={shards}",
                         "train.max_steps=200", "train.eval_every=100")

    with _Stage("entropies for the demo shards"):
        entropies = demo / "entropies"
        _cli("entropies", "--model", str(entropy), "--data", str(shards), "--out", str(entropies),
             *([] if progress else ["--no-progress"]))

    with _Stage("calibrate the threshold for 4.5 bytes per patch"):
        threshold = _calibrate(entropies, 4.5)

    with _Stage("sentencepiece BPE tokenizer"):
        tokenizer = demo / "tokenizer.model"
        if not tokenizer.is_file():
            _cli("tokenizer", "--data", str(shards), "--out", str(tokenizer), "--vocab-size", "4096")
        bytes_per_token = json.loads(tokenizer.with_suffix(".json").read_text())["bytes_per_token"]

    budget = [f"train.flops={args.flops}", "train.max_steps=0", "train.eval_every=0"]
    with _Stage(f"train tiny BLT and tiny BPE, {args.flops:.2g} training FLOPs each"):
        blt = _train("configs/blt/tiny.yaml", runs / "blt", f"data.train={entropies}", f"data.val={entropies}",
                     f"data.entropy_model={entropy}", "data.patching.mode=entropy",
                     f"data.patching.threshold={threshold}", *budget)
        bpe = _train("configs/bpe/tiny.yaml", runs / "bpe", f"data.train={shards}", f"data.val={shards}",
                     f"data.tokenizer={tokenizer}", f"data.bytes_per_token={bytes_per_token:.4f}", *budget)

    with _Stage(f"bits per byte on the held-out sets (up to {args.eval_bytes:,} bytes per content type)"):
        results = {name: _evaluate(export, data / "heldout", args.eval_bytes, entropy)
                   for name, export in (("BLT", blt), ("BPE", bpe))}
        _print_comparison(results, runs)
    return 0


def _calibrate(entropies: Path, target: float) -> float:
    from blt_dist.data.calibrate import calibrate_threshold, sample_documents

    _, docs = sample_documents(entropies)
    result = calibrate_threshold([(ids, H) for _, ids, H in docs], target_mean_size=target,
                                 content_types=[ctype for ctype, _, _ in docs])
    print(result.report())
    return float(result.threshold)


def _evaluate(export: Path, heldout: Path, max_bytes: int, entropy: Path) -> dict:
    from blt_dist.evaluate import evaluate_model, iter_documents
    from blt_dist.export import load_export

    model, cfg = load_export(export)
    return evaluate_model(model, cfg, iter_documents(str(heldout), [], None),
                          entropy_model=str(entropy) if cfg.model.family == "blt" else None,
                          max_bytes_per_type=max_bytes)


def _print_comparison(results: dict, runs: Path) -> None:
    spent = {}
    for name in results:
        lines = [json.loads(l) for l in (runs / name.lower() / "metrics.jsonl").read_text().splitlines()]
        spent[name] = max((r.get("flops_seen", 0.0) for r in lines), default=0.0)
    types = sorted(set().union(*(r["by_content_type"] for r in results.values())))
    print(f"\n{'content type':<14} {'BLT bpb':>9} {'BPE bpb':>9} {'bytes':>10}")
    for ctype in types:
        b, p = results["BLT"]["by_content_type"][ctype], results["BPE"]["by_content_type"][ctype]
        print(f"{ctype:<14} {b['bpb']:>9.4f} {p['bpb']:>9.4f} {b['bytes']:>10,}")
    print(f"{'all':<14} {results['BLT']['bpb']:>9.4f} {results['BPE']['bpb']:>9.4f} {results['BLT']['bytes']:>10,}")
    print(f"training FLOPs spent: BLT {spent['BLT']:.3g}, BPE {spent['BPE']:.3g} (3 x forward, entropy model excluded)")
