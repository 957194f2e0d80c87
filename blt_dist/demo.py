"""`blt-dist demo`: the main job on the bundled default data, end to end, on CPU.

  1. corpus     real text from Debian/PyPI packages          -> data/corpus (full), data/demo/corpus (small)
  2. prepare    byte shards                                   -> data/shards, data/heldout (full corpus),
                                                                 data/demo/shards, data/demo/heldout (small)
  3. train      the tiny entropy model on the demo shards     -> runs/demo/entropy/export
     check      its bpb against gzip/bz2/xz on the demo's validation bytes (it must beat xz -9e)
  4. entropies  entropy shards for the demo data              -> data/demo/entropies
  5. calibrate  the threshold giving 4.5 bytes per patch (mean patch size per content type)
  6. tokenizer  sentencepiece BPE on the same shards          -> data/demo/tokenizer.model (+ .json: measured
                                                                 bytes per token)
  7. shapes     the BPE and byte-level shapes FLOP-matched to the BLT by blt_dist/flops.py (BPE at the
                tokenizer's measured bytes per token), passed to `blt-dist train` as overrides
  8. train      tiny BLT, BPE and byte-level LM at the same training-FLOP budget -> runs/demo/{blt,bpe,byte}
  9. compare    `blt-dist compare` on the three runs: held-out bpb per content type, clean and noised,
                beside gzip/bz2/xz, plots                     -> runs/demo/report/

Training runs on the small corpus so the whole job takes minutes on 2 cores, and it is scored on
the small corpus's own held-out split (data/demo/heldout: documents, and lines, never seen in its
training split). The full corpus's held-out split (data/heldout) is selected for the full corpus:
about a third of its documents are in the small corpus's training split, so it is not a held-out
set for the demo's models. The full corpus and its shards are what `blt-dist train` uses for real
runs (configs/data/corpus.yaml).

`--quick` runs the same stages on the small corpus alone with fewer steps, a smaller budget and
fewer held-out bytes (about 3 minutes on 2 cores; tests/test_demo.py runs it), into data/quick
and runs/demo-quick. Every stage reuses its output when it is complete (training resumes;
finished runs are kept); a run whose settings changed is trained again.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from blt_dist.cli import main as cli_main
from blt_dist.config import load_config, to_dict
from blt_dist.data.calibrate import calibrate_threshold, sample_documents
from blt_dist.data.prepare import format_summary, prepare
from blt_dist.data.shards import MANIFEST
from blt_dist.errors import UserError
from blt_dist.evaluation.compare import Cache, _load_run, evaluate_compressors, evaluate_run, find_runs, resolve_heldout
from blt_dist.flops import SampleShape, match_bpe, match_byte, measured_compression, train_flops_per_byte

FAMILY_NAMES = {"blt": "BLT", "bpe": "BPE", "byte": "byte-level"}


@dataclass(frozen=True)
class Profile:
    """What differs between the full demo and --quick."""

    data_dir: str
    runs_dir: str
    recipe: Optional[str]  # recipe of DATA/corpus, the full training corpus (None: not built)
    flops: float  # training FLOPs for each of BLT, BPE and byte-level
    entropy_overrides: tuple[str, ...]  # on configs/entropy/tiny.yaml
    eval_bytes: int  # held-out bytes per content type
    vocab_size: int  # BPE tokenizer
    noise: str


PROFILES = {
    # The entropy model: configs/entropy/tiny.yaml (1.1M parameters, 512-byte window) for 700
    # steps of 8 x 512 bytes (2.9 MB, ~1 epoch of the demo's training split) at a peak lr of 3e-3,
    # trained in bf16 (fp32 master weights): 2-3x the fp32 speed on this CPU, and its entropies
    # are computed in bf16 anyway. A byte LM this small sits near 4.2-4.4 bpb for its first ~250
    # steps and only then drops (3.9 validation bpb at step 500 of 1000, lr not yet annealed):
    # 200 fp32 steps gave 4.72, worse than xz.
    "full": Profile("data", "runs/demo", "full", 4e12,
                    ("train.max_steps=700", "train.eval_every=0", "optim.lr=3e-3", "optim.warmup_steps=60",
                     "train.dtype=bf16"),
                    60_000, 4096, "mix:0.05"),
    # --quick: a 2-layer, 64-wide entropy model (7x cheaper per byte, for the entropy pass too)
    "quick": Profile("data/quick", "runs/demo-quick", None, 4e11,
                     ("model.dim=64", "model.n_layers=2", "model.n_heads=2", "train.max_steps=100",
                      "train.eval_every=0", "optim.lr=3e-3", "optim.warmup_steps=20", "train.dtype=bf16"),
                     8_000, 1024, "mix:0.05"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="the same stages in about 3 minutes: small corpus only, fewer steps, smaller budget "
                             "and eval (into data/quick, runs/demo-quick)")
    parser.add_argument("--data-dir", type=Path, default=None, help="where corpus and shards go (default data/)")
    parser.add_argument("--runs-dir", type=Path, default=None, help="training runs and the report (default runs/demo)")
    parser.add_argument("--cache", type=Path, default=Path(".cache/corpus"), help="package download cache")
    parser.add_argument("--recipe", default=None, choices=("full", "small", "pip"),
                        help="corpus recipe for data/corpus (default full; --quick builds none)")
    parser.add_argument("--flops", type=float, default=None,
                        help="training FLOP budget for each of BLT, BPE and byte-level (default 4e12, quick 4e11)")
    parser.add_argument("--eval-bytes", type=int, default=None,
                        help="held-out bytes scored per content type (default 60000, quick 8000)")
    parser.add_argument("--noise", default=None, help="noise kind for the noised columns (default mix:0.05)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _cli(*argv: str) -> None:
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
    return prepare([source], target, val_fraction=val_fraction, force=(target / MANIFEST).is_file(), progress=progress)


def _changed_settings(config: str, run_dir: Path, overrides: list[str]) -> list[str]:
    """Config keys (data, model, optim, train) whose value in run_dir/config.yaml differs from what
    this demo asks for: the run was made by another version or other options."""
    if not (run_dir / "config.yaml").is_file():
        return []
    try:
        old = to_dict(load_config(run_dir / "config.yaml"))
    except Exception as err:  # an older config tree: unreadable keys are a change too
        return [f"config.yaml ({err})"]
    new = to_dict(load_config(config, [f"run.dir={run_dir}", *overrides]))
    changed = []

    def walk(a, b, prefix):
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), f"{prefix}.{key}")
        elif a != b:
            changed.append(f"{prefix[1:]}: {a!r} -> {b!r}")

    for section in ("data", "model", "optim", "train"):
        walk(old.get(section), new.get(section), f".{section}")
    return changed


def _train(config: str, run_dir: Path, *overrides: str) -> tuple[Path, bool]:
    """(export dir, whether it was trained now). Each training run gets its own process, as it
    would under torchrun or Slurm: DeepSpeed keeps process-group state at module level that a
    second run in one process would reuse. A run dir of other settings is trained again."""
    changed = _changed_settings(config, run_dir, list(overrides))
    if changed:
        print(f"{run_dir}: made with other settings ({'; '.join(changed[:4])}{'; ...' if len(changed) > 4 else ''}): "
              "training it again")
        shutil.rmtree(run_dir)
    elif (run_dir / "export" / "model.safetensors").is_file():
        print(f"{run_dir}: finished earlier, kept")
        return run_dir / "export", False
    argv = ["train", config, f"run.dir={run_dir}", *overrides]
    print("blt-dist " + " ".join(argv), flush=True)
    if subprocess.run([sys.executable, "-m", "blt_dist.cli", *argv]).returncode != 0:
        raise UserError(f"`blt-dist {' '.join(argv)}` failed (see above)")
    return run_dir / "export", True


def run(args: argparse.Namespace) -> int:
    profile = PROFILES["quick" if args.quick else "full"]
    data = args.data_dir or Path(profile.data_dir)
    runs = args.runs_dir or Path(profile.runs_dir)
    recipe = args.recipe or profile.recipe
    flops = args.flops or profile.flops
    eval_bytes = profile.eval_bytes if args.eval_bytes is None else args.eval_bytes
    noise = args.noise or profile.noise
    progress = not args.no_progress
    demo = data / "demo"
    force = lambda d: ["--force"] if (d / "manifest.json").is_file() else []  # rebuilds from the warm cache
    started = time.perf_counter()
    print(f"blt-dist demo{' --quick' if args.quick else ''}: data in {data}, runs in {runs}, "
          f"{flops:.3g} training FLOPs per model")

    with _Stage(f"corpus: {f'{recipe} recipe and ' if recipe else ''}the small demo corpus"):
        if recipe:
            _cli("corpus", "--out", str(data / "corpus"), "--cache", str(args.cache), "--recipe", recipe,
                 *force(data / "corpus"))
        _cli("corpus", "--out", str(demo / "corpus"), "--cache", str(args.cache), "--recipe", "small",
             *force(demo / "corpus"))

    with _Stage("prepare byte shards"):
        built = {}
        if recipe:
            built[data / "shards"] = _prepare(data / "corpus" / "train", data / "shards", 0.01, progress)
            built[data / "heldout"] = _prepare(data / "corpus" / "heldout", data / "heldout", 0.0, progress)
        built[demo / "shards"] = _prepare(demo / "corpus" / "train", demo / "shards", 0.02, progress)
        built[demo / "heldout"] = _prepare(demo / "corpus" / "heldout", demo / "heldout", 0.0, progress)
        for target, manifest in built.items():
            print(f"\n{target}  (fingerprint {manifest['fingerprint'][:16]})\n{format_summary(manifest)}")

    shards, heldout = demo / "shards", demo / "heldout"
    with _Stage("train the tiny entropy model"):
        entropy, retrained = _train("configs/entropy/tiny.yaml", runs / "entropy", f"data.train={shards}",
                                    f"data.val={shards}", *profile.entropy_overrides)
        entropy_check = _check_entropy_model(runs / "entropy", shards, heldout, eval_bytes, runs / "report")

    with _Stage("entropies for the demo shards"):
        entropies = demo / "entropies"
        # worker processes of one thread each beat one process of several threads for this small model
        workers = str(min(4, len(os.sched_getaffinity(0))))
        _cli("entropies", "--model", str(entropy), "--data", str(shards), "--out", str(entropies), "--workers", workers,
             *([] if progress else ["--no-progress"]), *(["--force"] if retrained and entropies.exists() else []))

    with _Stage("calibrate the threshold for 4.5 bytes per patch"):
        calibration = _calibrate(entropies, 4.5)
        threshold = float(calibration.threshold)

    with _Stage("sentencepiece BPE tokenizer"):
        tokenizer = demo / "tokenizer.model"
        info = tokenizer.with_suffix(".json")
        wanted = {"dataset_fingerprint": built[shards]["fingerprint"], "vocab_size": profile.vocab_size}
        kept = json.loads(info.read_text()) if info.is_file() and tokenizer.is_file() else {}
        if any(kept.get(k) != v for k, v in wanted.items()):
            _cli("tokenizer", "--data", str(shards), "--out", str(tokenizer), "--vocab-size", str(profile.vocab_size))
        else:
            print(f"{tokenizer}: trained earlier on the same shards, kept")

    blt_overrides = [f"data.train={entropies}", f"data.val={entropies}", f"data.entropy_model={entropy}",
                     "data.patching.mode=entropy", f"data.patching.threshold={threshold}"]
    with _Stage("FLOP-matched BPE and byte-level shapes (blt_dist/flops.py)"):
        bpe_overrides, byte_overrides = _matched_shapes("configs/blt/tiny.yaml", blt_overrides, tokenizer)

    budget = [f"train.flops={flops}", "train.max_steps=0", "train.max_bytes=0", "train.eval_every=0"]
    with _Stage(f"train tiny BLT, BPE and byte-level LM, {flops:.3g} training FLOPs each"):
        _train("configs/blt/tiny.yaml", runs / "blt", *blt_overrides, *budget)
        _train("configs/bpe/tiny.yaml", runs / "bpe", f"data.train={shards}", f"data.val={shards}",
               f"data.tokenizer={tokenizer}", *bpe_overrides, *budget)
        _train("configs/byte/tiny.yaml", runs / "byte", f"data.train={shards}", f"data.val={shards}",
               *byte_overrides, *budget)
        run_dirs = {family: runs / family for family in ("blt", "bpe", "byte")}

    report = runs / "report"
    with _Stage(f"blt-dist compare: held-out bpb (up to {eval_bytes:,} bytes per content type), clean and {noise}"):
        _cli("compare", *map(str, run_dirs.values()), "--heldout", str(heldout), "--eval-bytes", str(eval_bytes),
             "--noise", noise, "--out", str(report))

    _summary(run_dirs, heldout, eval_bytes, report, calibration, entropy_check, time.perf_counter() - started)
    return 0


# ---------------------------------------------------------------------------------------------
# Stages


def _calibrate(entropies: Path, target: float):
    _, docs = sample_documents(entropies)
    result = calibrate_threshold([(ids, H) for _, ids, H in docs], target_mean_size=target,
                                 content_types=[ctype for ctype, _, _ in docs])
    print(result.report())
    return result


def _matched_shapes(blt_config: str, blt_overrides: list[str], tokenizer: Path) -> tuple[list[str], list[str]]:
    """Overrides giving the BPE (at the tokenizer's measured bytes per token and vocabulary) and
    the byte-level LM the BLT's training FLOPs per byte: flops.match_bpe and flops.match_byte,
    as `blt-dist flops CONFIG --tokenizer M.model` prints them."""
    blt = load_config(blt_config, blt_overrides)
    measured = measured_compression(str(tokenizer))
    model = dataclasses.replace(blt.model, bpe_vocab_size=measured["vocab_size"])
    shape = dataclasses.replace(SampleShape.from_data(blt.data), bytes_per_token=measured["bytes_per_token"])
    bpe, byte = match_bpe(model, shape), match_byte(model, shape)
    print(f"BLT tiny: {train_flops_per_byte(model, shape) / 1e6:.3f}M training FLOPs per byte "
          f"(at {shape.patch_size:g} bytes/patch, {shape.byte_capacity} bytes per sample)")
    print(f"BPE: {measured['bytes_per_token']:.3f} bytes/token measured by {measured['source']}; matched "
          f"{bpe['dim']} wide x {bpe['n_layers']} layers, {bpe['tokens_per_sample']} tokens per sample, "
          f"{bpe['train_flops_per_byte'] / 1e6:.3f}M FLOPs/byte (x{bpe['flop_ratio_to_blt']:.3f} the BLT's)")
    print(f"byte-level: matched {byte['dim']} wide x {byte['n_layers']} layers, {byte['seq_len']} bytes per sample, "
          f"{byte['train_flops_per_byte'] / 1e6:.3f}M FLOPs/byte (x{byte['flop_ratio_to_blt']:.3f} the BLT's)")
    bpe_overrides = [f"model.dim={bpe['dim']}", f"model.n_layers={bpe['n_layers']}", f"model.n_heads={bpe['n_heads']}",
                     f"model.vocab_size={bpe['vocab_size']}", f"data.tokens_per_sample={bpe['tokens_per_sample']}",
                     f"data.bytes_per_token={measured['bytes_per_token']:.4f}"]
    byte_overrides = [f"model.dim={byte['dim']}", f"model.n_layers={byte['n_layers']}",
                      f"model.n_heads={byte['n_heads']}", f"data.seq_len={byte['seq_len']}"]
    return bpe_overrides, byte_overrides


def _check_entropy_model(run_dir: Path, shards: Path, heldout: Path, eval_bytes: int, report: Path) -> dict:
    """The entropy model against the compressors, on the demo's validation bytes (the check: at or
    below xz -9e) and on the held-out set the comparison uses. Scored by compare's own code (and
    cached with its records)."""
    cache = Cache(report / "cache")
    entropy_run = _load_run(run_dir)
    out = {}
    for name, heldout_set in (("validation", resolve_heldout([], str(shards), 0, "val")),
                              ("held-out", resolve_heldout([], str(heldout), eval_bytes))):
        record = evaluate_run(entropy_run, heldout_set, None, cache)
        compressors = evaluate_compressors(heldout_set, None, cache)
        out[name] = {"path": heldout_set.path, "split": heldout_set.split, "model": record, "compressors": compressors}
    val = out["validation"]
    model_bpb, xz_bpb = val["model"]["bpb"], val["compressors"]["xz -9e"]["bpb"]
    types = sorted(val["model"]["by_content_type"])
    print(_rows_table(f"entropy model vs compressors on the demo's validation bytes ({shards} val split, "
                      f"{val['model']['bytes']:,} bytes)", types, val))
    verdict = "at or below" if model_bpb <= xz_bpb else "ABOVE"
    print(f"entropy model {model_bpb:.3f} bpb vs xz -9e {xz_bpb:.3f} bpb: {verdict} xz"
          + ("" if model_bpb <= xz_bpb else " (it carries less information than the check asks for)"))
    held = out["held-out"]
    print(_rows_table(f"the same on the held-out set ({heldout}, up to {eval_bytes:,} bytes per content type)",
                      sorted(held["model"]["by_content_type"]), held))
    out["passed"] = model_bpb <= xz_bpb
    return out


def _rows_table(title: str, types: list[str], scored: dict) -> str:
    rows = [("entropy model", scored["model"])] + list(scored["compressors"].items())
    lines = [title, f"{'':<14}" + "".join(f"{t:>13}" for t in types) + f"{'all':>9}"]
    for name, record in rows:
        cells = "".join(f"{_fmt(record['by_content_type'].get(t, {}).get('bpb')):>13}" for t in types)
        lines.append(f"{name:<14}{cells}{_fmt(record['bpb']):>9}")
    return "\n".join(lines)


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.3f}"


# ---------------------------------------------------------------------------------------------
# The closing summary


def _summary(run_dirs: dict, heldout: Path, eval_bytes: int, report: Path, calibration, entropy_check: dict,
             seconds: float) -> None:
    """Mean patch size per content type at the calibrated threshold, the bpb table of the three
    families beside the compressors, and where each model falls short of the best compressor."""
    runs, _ = find_runs(list(run_dirs.values()))
    heldout_set = resolve_heldout(runs, str(heldout), eval_bytes)
    cache = Cache(report / "cache")  # compare scored them just now: these are cache hits
    records = {FAMILY_NAMES.get(r.family, r.family): (r, evaluate_run(r, heldout_set, None, cache)) for r in runs}
    compressors = evaluate_compressors(heldout_set, None, cache)
    types = sorted({t for _, rec in records.values() for t in rec["by_content_type"]})

    print(f"\n== demo summary ({seconds / 60:.1f} min)")
    blt = records.get("BLT")
    print(f"\nmean patch size (bytes/patch) at the calibrated threshold {calibration.threshold:.4f} nats")
    print(f"{'content type':<14}{'demo training split':>21}{'held-out (BLT eval)':>21}")
    for t in types:
        train = calibration.per_type.get(t)
        held = blt[1]["by_content_type"].get(t, {}).get("mean_patch_size") if blt else None
        print(f"{t:<14}{_fmt(train.mean_patch_size if train else None):>21}{_fmt(held):>21}")
    held_all = None
    if blt:
        held_all = blt[1]["bytes"] / sum(v.get("patches", 0) for v in blt[1]["by_content_type"].values())
    print(f"{'all':<14}{_fmt(calibration.mean_patch_size):>21}{_fmt(held_all):>21}")

    print(f"\nheld-out bits per byte ({heldout}, up to {eval_bytes:,} bytes per content type), equal training FLOPs")
    print(f"{'':<14}" + "".join(f"{t:>13}" for t in types) + f"{'all':>9}{'FLOPs spent':>13}")
    for name, (r, rec) in records.items():
        cells = "".join(f"{_fmt(rec['by_content_type'].get(t, {}).get('bpb')):>13}" for t in types)
        print(f"{name:<14}{cells}{_fmt(rec['bpb']):>9}{r.flops_spent:>13.3g}")
    for name, rec in compressors.items():
        cells = "".join(f"{_fmt(rec['by_content_type'].get(t, {}).get('bpb')):>13}" for t in types)
        print(f"{name:<14}{cells}{_fmt(rec['bpb']):>9}{'-':>13}")

    print("\nagainst the best compressor per content type (model bpb - best; + is where the model falls short)")
    for t in types:
        best_name, best = min(((n, c["by_content_type"][t]["bpb"]) for n, c in compressors.items()
                               if c["by_content_type"].get(t, {}).get("bpb") is not None), key=lambda x: x[1])
        gaps = {name: rec["by_content_type"][t]["bpb"] - best for name, (_, rec) in records.items()
                if rec["by_content_type"].get(t, {}).get("bpb") is not None}
        short = [f"{n} {g:+.2f}" for n, g in gaps.items() if g > 0]
        beat = [f"{n} {g:+.2f}" for n, g in gaps.items() if g <= 0]
        line = f"  {t:<13} best {best_name} {best:.3f}: "
        line += (f"short: {', '.join(short)}" if short else "every model at or below it")
        line += f"; below it: {', '.join(beat)}" if short and beat else ""
        print(line)
    val = entropy_check["validation"]
    print(f"\nentropy model on the demo's validation bytes: {val['model']['bpb']:.3f} bpb vs xz -9e "
          f"{val['compressors']['xz -9e']['bpb']:.3f} ({'at or below' if entropy_check['passed'] else 'ABOVE'} xz); "
          f"on the held-out set {entropy_check['held-out']['model']['bpb']:.3f} vs xz "
          f"{entropy_check['held-out']['compressors']['xz -9e']['bpb']:.3f}")
    print(f"report: {report / 'report.md'}")
    print(f"plots:  {', '.join(str(p) for p in sorted(report.glob('*.png')))}")
