"""`blt-dist compare`: the report the project exists for. At equal training FLOPs, which family
has the lower bits per byte, on which content, by how much, and is the difference real?

    blt-dist compare runs/demo --heldout data/heldout                 # a parent of run dirs
    blt-dist compare runs/sweeps/tiny --noise case:0.05 --noise mix   # a sweep (results.csv)
    blt-dist compare runs/a runs/b --out reports/ab --eval-bytes 0    # run dirs, every held-out byte
    blt-dist compare --compressors-only --heldout data/heldout        # gzip / bz2 / xz rows alone

Inputs. A finished run directory holds config.yaml, metrics.jsonl and export/ (blt-dist train
writes them). A sweep directory holds run directories and results.csv (blt-dist sweep), which
supplies each run's size and FLOP budget; any other directory is searched one level down.
Unfinished runs are listed and left out; no finished run at all is an error naming what each
directory lacks.

Evaluation. Every run is scored by `evaluate.evaluate_model` on the same held-out documents
(`--heldout`, or the byte dataset behind every run's data.val, which must then be the same
one), up to `--eval-bytes` per content type, clean and with each `--noise` (blt_dist/evaluation/noise.py),
and next to the compressor rows (blt_dist/evaluation/compressors.py). Results are cached in
REPORT/cache/, keyed by the export's weights sha256, the held-out fingerprint, the byte limit,
the noise and what the family's encoder reads (entropy model, tokenizer), so a rerun only
scores what changed. Records of different held-out sets or byte limits are refused, never
averaged.

Uncertainty. bpb over a set of documents is a ratio, R = sum(bits_i) / sum(bytes_i). Its
standard error over documents is the ratio (delta-method) estimator: with influence
z_i = (bits_i - R bytes_i) / sum(bytes), SE^2 = m/(m-1) sum z_i^2 over the m documents.
Families are scored on the same documents, so a difference is paired: z_i of one run minus
z_i of the other, which cancels what makes a document hard for everyone. Several seeds of the
same (family, size, budget) are averaged, and their spread enters as var(seeds)/seeds. A
difference within 2 SE (about 95%) is a tie; with fewer than 5 documents in a content type the
SE cannot be trusted and no winner is called ("n/a"). Runs are compared at equal training FLOPs: the
sweep's budget, else train.flops, else the FLOPs spent, grouped within 10%.

Compute. Per run: the budget, useful training FLOPs (the bytes, patches and tokens batches really
held), executed FLOPs (every static slot, padding included), and both per byte seen. A pair of
runs at one budget whose useful FLOPs per byte differ by more than 5% is flagged: matching failed
and the cheaper family saw more text.

Output: REPORT/report.md (also printed) and PNGs: bpb_vs_flops.png, training_curves.png,
bpb_by_content_type.png, patch_sizes.png (BLT runs), noise_gap.png (with --noise).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from blt_dist.config import load_config
from blt_dist.data.entropies import entropy_dtype_for
from blt_dist.data.loader import ENTROPY_FORMAT
from blt_dist.data.patch_stats import LENGTH_BUCKETS, patch_stats_from_counts
from blt_dist.data.patching import ENTROPY_MODES
from blt_dist.data.shards import MANIFEST, ByteDataset
from blt_dist.errors import UserError
from blt_dist.evaluation import plots
from blt_dist.evaluation.compressors import compressor_bpb
from blt_dist.evaluation.evaluate import evaluate_model, heldout_documents
from blt_dist.evaluation.noise import KINDS, noise_argument, parse_noise
from blt_dist.evaluation.scaling import MIN_BUDGETS, crossing, fit_family
from blt_dist.evaluation.scripts import UNIFORM_BPB, per_script
from blt_dist.evaluation.statistics import MIN_DOCUMENTS, TIE_SE, Estimate, cell_estimate, ratio_estimate, verdict
from blt_dist.flops import SampleShape, forward_flops_per_byte, human_count, params_by_component
from blt_dist.model.weights import WEIGHTS, export_info, file_sha256, load_export

CACHE_VERSION = 1  # bump when what an eval record holds or means changes
BUDGET_TOLERANCE = 0.10  # runs whose budgets differ by less than this are at "equal FLOPs"
PER_BYTE_TOLERANCE = 0.05  # compared runs whose training FLOPs per byte differ by more are flagged
FAMILY_ORDER = ("blt", "bpe", "byte", "entropy")


# ---------------------------------------------------------------------------------------------
# Runs


@dataclass
class Run:
    name: str
    run_dir: Path
    cfg: object  # blt_dist.config.Config
    records: list[dict]  # metrics.jsonl
    size: str = ""
    budget: Optional[float] = None  # the training-FLOP budget it was launched with

    @property
    def family(self) -> str:
        return self.cfg.model.family

    @property
    def seed(self) -> int:
        return self.cfg.run.seed

    @property
    def export_dir(self) -> Path:
        return self.run_dir / "export"

    @property
    def train_records(self) -> list[dict]:
        return [r for r in self.records if "loss" in r]

    @property
    def flops_spent(self) -> float:
        train = self.train_records
        return float(train[-1].get("flops_seen", 0.0)) if train else 0.0

    @property
    def flops_executed(self) -> float:
        """Training FLOPs of every slot the static shapes ran, padding included (nan for runs
        logged before the trainer counted them)."""
        train = self.train_records
        return float(train[-1].get("flops_executed_seen", math.nan)) if train else math.nan

    @property
    def flops_per_byte(self) -> float:
        """Useful training FLOPs per raw byte seen: what a byte of training really cost."""
        return self.flops_spent / self.bytes_seen if self.bytes_seen else math.nan

    @property
    def bytes_seen(self) -> int:
        train = self.train_records
        return int(train[-1].get("bytes_seen", 0)) if train else 0

    @property
    def train_mean_patch_size(self) -> Optional[float]:
        """Bytes over patches for the whole run (each log record covers the bytes since the last)."""
        previous, patches = 0, 0.0
        for r in self.train_records:
            if r.get("mean_patch_size"):
                patches += (r["bytes_seen"] - previous) / r["mean_patch_size"]
            previous = r["bytes_seen"]
        return self.bytes_seen / patches if patches else None

    @property
    def comparison_budget(self) -> float:
        return self.budget or (self.cfg.train.flops or None) or self.flops_spent


def _missing(run_dir: Path) -> list[str]:
    wanted = {"config.yaml": run_dir / "config.yaml", "metrics.jsonl": run_dir / "metrics.jsonl",
              "export/": run_dir / "export" / WEIGHTS}
    return [name for name, path in wanted.items() if not path.is_file()]


def _load_run(run_dir: Path, size: str = "", budget: Optional[float] = None) -> Run:
    path = run_dir / "metrics.jsonl"
    try:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not JSON lines ({err})") from None
    return Run(run_dir.name, run_dir, load_config(run_dir / "config.yaml"), records, size, budget)


def _sweep_rows(sweep_dir: Path) -> list[tuple[Path, str, Optional[float]]]:
    """(run dir, size, budget) per results.csv row; run_dir is as the sweep wrote it (relative
    to where it ran), else the run's name inside the sweep directory."""
    with open(sweep_dir / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for row in rows:
        run_dir = Path(row.get("run_dir") or "")
        if not (run_dir / "config.yaml").is_file():
            run_dir = sweep_dir / row["run"]
        budget = float(row["flop_budget"]) if row.get("flop_budget") else None
        out.append((run_dir, row.get("size", ""), budget))
    return out


def find_runs(paths: list[Path]) -> tuple[list[Run], list[str]]:
    """Finished runs under `paths`, and a note for each run left out. A UserError when none."""
    candidates: list[tuple[Path, str, Optional[float]]] = []
    problems: list[str] = []
    for path in paths:
        if not path.is_dir():
            raise UserError(f"{path}: no such directory")
        if (path / "results.csv").is_file():
            candidates += _sweep_rows(path)
        elif (path / "config.yaml").is_file() or (path / "metrics.jsonl").is_file():
            candidates.append((path, "", None))
        else:
            children = sorted(p for p in path.iterdir() if p.is_dir() and ((p / "config.yaml").is_file()
                                                                          or (p / "metrics.jsonl").is_file()))
            if not children:
                problems.append(f"{path}: no run directories in it (a run holds config.yaml, metrics.jsonl, export/)")
            candidates += [(child, "", None) for child in children]
    runs, skipped = [], []
    for run_dir, size, budget in candidates:
        missing = _missing(run_dir)
        if missing:
            note = f"{run_dir}: no {', no '.join(missing)}" + (" (unfinished?)" if "export/" in missing else "")
            skipped.append(note)
        else:
            runs.append(_load_run(run_dir, size, budget))
    if not runs:
        raise UserError("no finished runs to compare: " + "; ".join(problems + skipped))
    names = [r.name for r in runs]
    for run in runs:  # two inputs' "blt" runs: say which is which
        if names.count(run.name) > 1:
            run.name = f"{run.run_dir.parent.name}/{run.run_dir.name}"
    runs.sort(key=lambda r: (_family_rank(r.family), r.size, r.comparison_budget, r.seed, r.name))
    return runs, skipped


def _family_rank(family: str) -> tuple:
    return (FAMILY_ORDER.index(family) if family in FAMILY_ORDER else len(FAMILY_ORDER), family)


# ---------------------------------------------------------------------------------------------
# The held-out set


@dataclass(frozen=True)
class Heldout:
    path: str
    fingerprint: str
    max_bytes_per_type: int
    split: Optional[str] = None

    def documents(self, noise=None):
        return heldout_documents(self.path, [], self.split, self.max_bytes_per_type, noise)


def _byte_dataset_of(dataset: Path) -> tuple[str, str]:
    """(byte dataset path, fingerprint) behind a byte or entropy dataset."""
    manifest_path = dataset / MANIFEST
    if not manifest_path.is_file():
        raise UserError(f"{dataset}: not a prepared dataset (no {MANIFEST})")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") == ENTROPY_FORMAT:  # scored on the bytes it was computed from
        return manifest["byte_dataset"], manifest["byte_fingerprint"]
    return str(dataset), manifest["fingerprint"]


def resolve_heldout(runs: list[Run], heldout: Optional[str], max_bytes_per_type: int,
                    split: Optional[str] = None) -> Heldout:
    """--heldout, or the one byte dataset behind every run's data.val (a UserError otherwise)."""
    if heldout:
        return Heldout(str(heldout), ByteDataset(heldout).fingerprint, max_bytes_per_type, split)
    behind = {}
    for run in runs:
        if not run.cfg.data.val:
            raise UserError(f"{run.run_dir}: its config names no data.val; pass --heldout DIR")
        behind[run.name] = _byte_dataset_of(Path(run.cfg.data.val))
    fingerprints = {fp for _, fp in behind.values()}
    if len(fingerprints) > 1:
        listing = ", ".join(f"{name}: {path} ({fp[:12]})" for name, (path, fp) in behind.items())
        raise UserError(f"the runs were validated on different held-out sets ({listing}); they cannot be compared "
                        "on their own validation data: pass --heldout DIR to score them all on the same bytes")
    path = next(iter(behind.values()))[0]
    ByteDataset(path)  # present and intact
    return Heldout(path, fingerprints.pop(), max_bytes_per_type, split)


# ---------------------------------------------------------------------------------------------
# Evaluation, cached


def _file_sha256(path: str) -> str:
    return file_sha256(Path(path)) if path and Path(path).is_file() else ""


def _encoder_inputs(cfg) -> dict:
    """What a family's encoder reads besides the weights (a change means a new evaluation)."""
    if cfg.model.family == "bpe":
        return {"tokenizer_sha256": _file_sha256(cfg.data.tokenizer)}
    if cfg.model.family == "blt":
        p = cfg.data.patching
        inputs = {"patching": dataclasses.asdict(p)}
        if p.mode in ENTROPY_MODES:
            if not (Path(cfg.data.entropy_model) / "export.json").is_file():
                raise UserError(f"its entropy model {cfg.data.entropy_model!r} (data.entropy_model) is not there; "
                                "run compare from the directory the run was trained in")
            inputs["entropy_model_sha256"] = export_info(cfg.data.entropy_model)["weights_sha256"]
            inputs["entropy_dtype"] = entropy_dtype_for(cfg)[0]  # eval recomputes them as training had them
        return inputs
    return {}


class Cache:
    """Eval records as REPORT/cache/<key>.json; `read=False` scores again and rewrites them."""

    def __init__(self, root: Optional[Path], read: bool = True):
        self.root, self.read = root, read

    def _path(self, identity: dict) -> Path:
        return self.root / f"{hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]}.json"

    def get(self, identity: dict) -> Optional[dict]:
        if self.root is None or not self.read or not self._path(identity).is_file():
            return None
        try:
            record = json.loads(self._path(identity).read_text())
        except (OSError, json.JSONDecodeError):
            return None  # a torn write: score again
        return record if record.get("identity") == identity else None

    def put(self, record: dict) -> dict:
        if self.root is not None:
            self.root.mkdir(parents=True, exist_ok=True)
            path = self._path(record["identity"])
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(record))
            tmp.replace(path)
        return record


def _documents_digest(documents: list[list]) -> str:
    """Which documents were scored, in order: content type, source and byte count."""
    return hashlib.sha256(json.dumps([d[:3] for d in documents]).encode()).hexdigest()


def _record(identity: dict, result: dict) -> dict:
    """The part of an evaluate_model result the report needs: totals, per content type, and per
    document [content type, source, bytes scored (noised, for a noised record), NLL in nats]."""
    documents = [[d["content_type"], d["source"], d["bytes"], d["nll"]] for d in result["documents_detail"]]
    by_type = {ctype: {k: v for k, v in t.items() if k != "nll"} for ctype, t in result["by_content_type"].items()}
    return {"identity": identity, "bpb": result["bpb"], "bytes": result["bytes"], "documents": result["documents"],
            "targets": result["targets"], "by_content_type": by_type, "per_document": documents,
            "documents_digest": _documents_digest(documents)}


def evaluate_run(run: Run, heldout: Heldout, noise=None, cache: Optional[Cache] = None, batch_size: int = 8) -> dict:
    """The run's eval record on the held-out set (clean, or with `noise`), from the cache if there."""
    try:
        encoder_inputs = _encoder_inputs(run.cfg)
    except UserError as err:
        raise UserError(f"{run.run_dir}: {err}") from None
    identity = {"version": CACHE_VERSION, "weights_sha256": export_info(run.export_dir)["weights_sha256"],
                "heldout_fingerprint": heldout.fingerprint, "split": heldout.split,
                "max_bytes_per_type": heldout.max_bytes_per_type, "noise": _noise_identity(noise), **encoder_inputs}
    cache = cache or Cache(None)
    cached = cache.get(identity)
    if cached is not None:
        return cached
    model, cfg = load_export(run.export_dir)
    result = evaluate_model(model, cfg, heldout.documents(noise), batch_size=batch_size)
    return cache.put(_record(identity, result))


def evaluate_compressors(heldout: Heldout, noise=None, cache: Optional[Cache] = None) -> dict:
    identity = {"version": CACHE_VERSION, "compressors": True, "heldout_fingerprint": heldout.fingerprint,
                "split": heldout.split, "max_bytes_per_type": heldout.max_bytes_per_type,
                "noise": _noise_identity(noise)}
    cache = cache or Cache(None)
    cached = cache.get(identity)
    if cached is None:
        cached = cache.put({"identity": identity, "rows": compressor_bpb(heldout.documents(noise))})
    return cached["rows"]


def _noise_identity(noise) -> Optional[dict]:
    return None if noise is None else {"kind": noise.kind, "rate": noise.rate, "seed": noise.seed}


def check_comparable(records: dict[str, dict]) -> None:
    """Refuses records scored on different held-out sets, byte limits or documents."""
    def what(record):
        i = record["identity"]
        return (i["heldout_fingerprint"], i.get("split"), i["max_bytes_per_type"], record["documents_digest"])

    seen = {name: what(record) for name, record in records.items()}
    if len(set(seen.values())) > 1:
        listing = "; ".join(f"{name}: held-out {fp[:12]}, split {split}, {limit} bytes per type, documents "
                            f"{digest[:12]}" for name, (fp, split, limit, digest) in seen.items())
        raise UserError(f"these results come from different held-out sets and cannot be compared: {listing}")


# ---------------------------------------------------------------------------------------------
# The report


@dataclass
class Row:
    run: Run
    clean: dict
    noised: dict[str, dict] = field(default_factory=dict)  # noise name -> record
    inference_flops_per_byte: float = math.nan
    params: int = 0

    @property
    def label(self) -> str:
        return self.run.name


def _inference_flops_per_byte(cfg, record: dict) -> float:
    """Forward FLOPs per byte (blt_dist/flops.py) at the compression measured on the held-out
    text: the BLT's mean patch size there, the BPE's bytes per token there."""
    shape = SampleShape.from_data(cfg.data)
    by_type = record["by_content_type"].values()
    if cfg.model.family == "blt":
        patches = sum(t.get("patches", 0) for t in by_type)
        if patches:
            shape = dataclasses.replace(shape, patch_size=record["bytes"] / patches)
    elif cfg.model.family == "bpe":
        tokens = record["targets"] - record["documents"]  # every token is a target, EOS included
        if tokens > 0:
            shape = dataclasses.replace(shape, bytes_per_token=record["bytes"] / tokens)
    return sum(forward_flops_per_byte(cfg.model, shape).values())


def _si(n: float) -> str:
    return "-" if n is None or not math.isfinite(n) else human_count(n)


def _bpb(x: Optional[float]) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.3f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _cells(rows: list[Row]) -> dict[tuple, list[Row]]:
    """(size, budget group) -> rows, budgets within BUDGET_TOLERANCE grouped together."""
    groups: list[tuple[float, list[Row]]] = []
    for row in sorted(rows, key=lambda r: r.run.comparison_budget):
        budget = row.run.comparison_budget
        if groups and budget <= groups[-1][0] * (1 + BUDGET_TOLERANCE):
            groups[-1][1].append(row)
        else:
            groups.append((budget, [row]))
    cells: dict[tuple, list[Row]] = {}
    for budget, members in groups:
        for row in members:
            cells.setdefault((row.run.size, budget), []).append(row)
    return cells


def _family_estimate(rows: list[Row], measure: str, content_type: Optional[str]) -> Estimate:
    """One family's rows (its seeds) in one cell, for `measure` = clean | noise name | 'gap NAME'."""
    def one(row: Row) -> Estimate:
        if measure == "clean":
            return ratio_estimate(row.clean, content_type)
        if measure.startswith("gap "):
            name = measure[4:]
            return ratio_estimate(row.noised[name], content_type) - ratio_estimate(row.clean, content_type)
        return ratio_estimate(row.noised[measure], content_type)

    return cell_estimate([one(row) for row in rows])


def comparisons(rows: list[Row], content_types: list[str], noise_names: list[str]) -> list[dict]:
    """Every pair of families in every (size, budget) cell, per measure and content type."""
    out = []
    measures = ["clean", *noise_names, *(f"gap {n}" for n in noise_names)]
    for (size, budget), members in _cells(rows).items():
        families = sorted({r.run.family for r in members}, key=_family_rank)
        for a, b in itertools.combinations(families, 2):
            rows_a = [r for r in members if r.run.family == a]
            rows_b = [r for r in members if r.run.family == b]
            for measure in measures:
                for ctype in [*content_types, None]:
                    ea, eb = _family_estimate(rows_a, measure, ctype), _family_estimate(rows_b, measure, ctype)
                    diff = ea - eb
                    out.append({"size": size, "budget": budget, "a": a, "b": b, "seeds": (len(rows_a), len(rows_b)),
                                "measure": measure, "content_type": ctype or "all", "documents": diff.documents,
                                "value_a": ea.value,
                                "value_b": eb.value, "difference": diff.value, "se": diff.se,
                                "winner": verdict(diff, (a, b))})
    return out


def _verdict_sentence(pair: list[dict], measure: str) -> str:
    """'BLT beats BPE on prose (0.071 bpb lower, 2.5%), ...; tie on code' for one measure."""
    a, b = pair[0]["a"].upper(), pair[0]["b"].upper()
    lower_is_better = "gap" if measure.startswith("gap") else "bpb"
    parts = []
    for side, name, other in (("a", a, b), ("b", b, a)):
        wins = [c for c in pair if c["winner"] == c[side]]
        if wins:
            # a relative size only for bpb itself: a percentage of a gap near zero says nothing
            said = ", ".join(f"{c['content_type']} ({abs(c['difference']):.3f} {lower_is_better} lower"
                             + ("" if measure.startswith("gap") else f", {_relative(c, side):.1%}") + ")" for c in wins)
            parts.append(f"{name} beats {other} on {said}")
    ties = [c["content_type"] for c in pair if c["winner"] == "tie"]
    if ties:
        parts.append(f"tie on {', '.join(ties)}")
    uncalled = [f"{c['content_type']} ({c['documents']} documents)" for c in pair if c["winner"] == "n/a"]
    if uncalled:
        parts.append(f"not called on {', '.join(uncalled)}: fewer than {MIN_DOCUMENTS} documents")
    return "; ".join(parts) + "."


def _relative(c: dict, side: str) -> float:
    loser = c["value_b"] if side == "a" else c["value_a"]
    return abs(c["difference"]) / abs(loser) if loser else math.nan


def build_report(rows: list[Row], compressors: dict, heldout: Heldout, noises: list, skipped: list[str],
                 plots: list[str]) -> str:
    """report.md: runs, bpb tables (clean, noised), verdicts, compressors, plots."""
    content_types = sorted({c for row in rows for c in row.clean["by_content_type"]}
                           | {c for r in compressors["clean"].values() for c in r["by_content_type"]})
    noise_names = [n.name for n in noises]
    any_record = rows[0].clean if rows else None
    lines = ["# blt-dist compare", ""]
    bytes_by_type = ", ".join(f"{c} {t['bytes']:,}" for c, t in next(iter(compressors["clean"].values()))
                              ["by_content_type"].items())
    limit = (f"up to {heldout.max_bytes_per_type:,} bytes per content type" if heldout.max_bytes_per_type
             else "every byte")
    documents = f"{any_record['documents']} documents, " if any_record else ""
    lines += [f"Held-out set: `{heldout.path}` (fingerprint {heldout.fingerprint[:16]}), {limit}: {documents}"
              f"{bytes_by_type} bytes.", ""]
    if noises:
        lines += ["Noise (blt_dist/evaluation/noise.py; bpb counted on the noised bytes): "
                  + ", ".join(f"`{n.name}` (seed {n.seed})" for n in noises) + ".", ""]
    if skipped:
        lines += ["Left out (not finished): " + "; ".join(skipped) + ".", ""]

    if rows:
        lines += ["## Runs", ""]
        lines += _table(["run", "family", "size", "seed", "params", "training FLOPs", "bytes seen",
                         "mean patch (train / held-out)", "inference FLOPs/byte"],
                        [[r.label, r.run.family, r.run.size or "-", str(r.run.seed), _si(r.params),
                          f"{r.run.flops_spent:.3g}", _si(r.run.bytes_seen), _patch_cell(r),
                          _si(r.inference_flops_per_byte)] for r in rows])
        lines += ["", "Training FLOPs: 3 x forward, counted by the trainer (entropy model excluded). Inference "
                  "FLOPs/byte: forward, blt_dist/flops.py at the patch size / bytes per token measured on the "
                  "held-out text.", ""]
        lines += _compute(rows)
        lines += _scaling(rows)

    def bpb_table(title: str, measure: Optional[str]) -> None:
        header = ["run", *content_types, "all ± SE"] + (["gap vs clean"] if measure else [])
        body = []
        for r in rows:
            record = r.noised[measure] if measure else r.clean
            total = ratio_estimate(record)
            cells = [_bpb(record["by_content_type"].get(c, {}).get("bpb")) for c in content_types]
            body.append([r.label, *cells, f"{total.value:.3f} ± {total.se:.3f}" if math.isfinite(total.se)
                         else f"{total.value:.3f}"]
                        + ([f"{record['bpb'] - r.clean['bpb']:+.3f}"] if measure else []))
        clean_compressors = compressors["clean"]
        for name, c in compressors[measure or "clean"].items():
            cells = [_bpb(c["by_content_type"].get(t, {}).get("bpb")) for t in content_types]
            body.append([f"*{name}*", *cells, _bpb(c["bpb"])]
                        + ([f"{c['bpb'] - clean_compressors[name]['bpb']:+.3f}"] if measure else []))
        lines.extend([f"## {title}", ""] + _table(header, body) + [""])

    bpb_table("Bits per byte, clean", None)
    for name in noise_names:
        bpb_table(f"Bits per byte, noised `{name}`", name)
    lines += ["SE: standard error over documents (ratio estimator). Compressor rows (italic): one stream per "
              "content type (blt_dist/evaluation/compressors.py), no uncertainty given.", ""]
    if rows:
        lines += _verdicts(rows, content_types, noise_names)
        lines += _against_compressors(rows, compressors["clean"], content_types)
        lines += _by_script(rows, heldout)
        lines += _patch_statistics(rows)
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)


def _by_script(rows: list[Row], heldout: Heldout) -> list[str]:
    """Clean bpb per writing script of the held-out documents (evaluation/scripts.py), for the
    largest budget of each size: per family (its seeds' NLLs averaged per document), the
    BLT-minus-BPE difference paired over the script's documents, and families worse than
    uniform bytes (8 bpb) flagged."""
    detail = rows[0].clean["per_document"]
    documents = list(heldout.documents())
    if [(c, s) for c, s, _ in documents] != [(d[0], d[1]) for d in detail]:
        return ["## Bits per byte by script", "", "Not shown: the held-out documents read now are not the ones "
                "scored (the held-out set changed since its cached records).", ""]
    data = [b for _, _, b in documents]
    nbytes = np.array([d[2] for d in detail], dtype=np.float64)
    largest: dict[str, tuple] = {}
    for size, budget in _cells(rows):
        largest[size] = max(largest.get(size, (size, budget)), (size, budget), key=lambda key: key[1])
    lines = ["## Bits per byte by script", "",
             "Each held-out document's script is the one of at least 80% of its letters (stdlib `unicodedata`); "
             "invalid UTF-8, letter-free and mixed documents keep their own rows. Clean bpb; seeds averaged per "
             "document; BLT - BPE paired over the script's documents, a tie within 2 SE; a bpb above "
             f"{UNIFORM_BPB:.0f} (uniform bytes) is flagged.", ""]
    cells = _cells(rows)
    for key in sorted(largest.values(), key=lambda k: (k[0], k[1])):
        members = cells[key]
        families = sorted({r.run.family for r in members}, key=_family_rank)
        nats = {f: np.mean([[d[3] for d in r.clean["per_document"]] for r in members if r.run.family == f], axis=0)
                for f in families}
        table = per_script(data, nbytes, nats)
        size = f"size {key[0]}, " if key[0] else ""
        header = ["script", "documents", *families, "BLT - BPE ± 2 SE", "verdict", "worse than uniform"]
        body = []
        for row in table:
            diff = (f"{row['blt_minus_bpe']:+.3f} ± {2 * row['blt_minus_bpe_se']:.3f}"
                    if math.isfinite(row.get("blt_minus_bpe", math.nan)) else "-")
            body.append([row["script"], str(row["documents"]), *(_bpb(row["bpb"][f]) for f in families), diff,
                         row.get("verdict", "-"), ", ".join(row["worse_than_uniform"]) or "-"])
        lines += [f"{size}{key[1]:.3g} training FLOPs:", ""] + _table(header, body) + [""]
    return lines


def _compute(rows: list[Row]) -> list[str]:
    """What each run's training cost: budget, useful and executed FLOPs, FLOPs per byte, and a
    flag on every compared pair whose per-byte cost differs by more than PER_BYTE_TOLERANCE (at
    an equal budget the cheaper family then simply saw more bytes)."""
    lines = ["## Training compute", ""]
    body = []
    for r in rows:
        executed = r.run.flops_executed
        padding = 1 - r.run.flops_spent / executed if executed and math.isfinite(executed) else math.nan
        body.append([r.label, r.run.family, f"{r.run.comparison_budget:.3g}", f"{r.run.flops_spent:.3g}",
                     f"{executed:.3g}" if math.isfinite(executed) else "-",
                     f"{padding:.1%}" if math.isfinite(padding) else "-", _si(r.run.bytes_seen),
                     _si(r.run.flops_per_byte),
                     _si(executed / r.run.bytes_seen) if math.isfinite(executed) and r.run.bytes_seen else "-"])
    lines += _table(["run", "family", "budget", "useful FLOPs", "executed FLOPs", "padding", "bytes seen",
                     "useful FLOPs/byte", "executed FLOPs/byte"], body)
    lines += ["", "Useful FLOPs count the bytes, patches and tokens each batch really holds; executed FLOPs count "
              "every slot the static shapes run, padding included (paid for, never useful). Runs are matched "
              "and compared on useful FLOPs.", ""]
    flags = per_byte_cost_flags(rows)
    if flags:
        lines += [f"**Per-byte cost differs by more than {PER_BYTE_TOLERANCE:.0%}** between runs compared at one "
                  "budget, so they saw different amounts of text: " + "; ".join(flags) + ".", ""]
    elif len(rows) > 1:
        lines += [f"Every pair compared at one budget is within {PER_BYTE_TOLERANCE:.0%} in useful training FLOPs "
                  "per byte.", ""]
    return lines


def _patch_statistics(rows: list[Row]) -> list[str]:
    """The seed's patch table per BLT series (at its largest budget, lowest seed): per content
    type of the held-out text, the share of patches 1-4 / 5-8 / 9-12 / 13-16 positions long and
    of positions with entropy < 2, 2-5, > 5 nats (as the patcher read them), beside the mean."""
    latest: dict[str, Row] = {}
    for r in sorted((r for r in rows if r.run.family == "blt"), key=lambda r: (r.run.comparison_budget,
                                                                               -r.run.cfg.run.seed)):
        latest[plots.series_label(r, rows)] = r
    if not latest:
        return []
    lines = ["## Patch statistics", ""]
    head = ["run", "content type", "mean patch size", *(f"{lo}-{hi}" for lo, hi in LENGTH_BUCKETS),
            "H < 2", "2 <= H <= 5", "H > 5"]
    body, no_entropies = [], []
    for label, r in latest.items():
        for ctype, t in r.clean["by_content_type"].items():
            if "patch_length_histogram" not in t:
                continue
            stats = patch_stats_from_counts(t["patch_length_histogram"], t.get("entropy_band_positions"),
                                            t.get("mean_patch_size"))
            body.append([r.label, ctype, *stats.row().split(" | ")])
        if not any("entropy_band_positions" in t for t in r.clean["by_content_type"].values()):
            no_entropies.append(f"{r.label} (patching: {r.run.cfg.data.patching.mode})")
    lines += _table(head, body)
    lines += ["", "Patch lengths in encoded positions (BOS's own patch and EOS included), shares of patches; "
              "entropy bands: shares of the positions the entropy model scored, BOS excluded (the entropies, in "
              "nats, the patcher cut at)."]
    if no_entropies:
        lines += ["No entropies (the run does not patch by entropy, or its record predates the bands): "
                  + ", ".join(no_entropies) + "."]
    return lines + [""]


def _groups(values: list[tuple[float, Row]]) -> list[tuple[float, list[Row]]]:
    """Rows grouped by a cost (budget, inference FLOPs/byte) within BUDGET_TOLERANCE of the group's first."""
    groups: list[tuple[float, list[Row]]] = []
    for value, row in sorted(values, key=lambda v: v[0]):
        if groups and value <= groups[-1][0] * (1 + BUDGET_TOLERANCE):
            groups[-1][1].append(row)
        else:
            groups.append((value, [row]))
    return groups


def _scaling(rows: list[Row]) -> list[str]:
    """Power-law fits of bpb against training FLOPs per series (family, and BLT patch size),
    where two series' lines cross (with the seeds' uncertainty), and the runs grouped by
    inference FLOPs/byte and by training budget."""
    points = {label: [(x, y) for x, y, _ in pts] for label, pts in plots.scaling_points(rows).items()}
    lines = ["## Scaling", ""]
    body, fits = [], {}
    for label, pts in points.items():
        fit, why = fit_family(pts)
        fits[label] = fit
        budgets = len({x for x, _ in pts})
        body.append([label, str(budgets), str(len(pts)),
                     f"{fit.exponent:+.4f}" if fit else "-", f"{fit.bpb(1e13):.3f}" if fit else "-", why or "fitted"])
    lines += _table(["series", "budgets", "runs", "exponent", "fitted bpb at 1e13 FLOPs", "fit"], body)
    lines += ["", f"Fit: log10 bpb = a + exponent * log10 training FLOPs, least squares over budgets (a budget's "
              f"seeds averaged first); a series with fewer than {MIN_BUDGETS} budgets is not fitted (two points "
              "always fit a line) and not drawn. A negative exponent: more compute, fewer bits per byte.", ""]
    cross = []
    for a, b in itertools.combinations(points, 2):
        if fits[a] is None or fits[b] is None:
            continue
        c, _ = crossing(points[a], points[b])
        if c is None or c.flops is None:
            cross.append(f"{a} and {b}: parallel, never cross")
            continue
        spread = (f" (seed bootstrap 16-84%: {c.low:.3g} to {c.high:.3g})" if c.low is not None
                  else " (one seed per budget: no uncertainty)")
        where = "within the fitted budgets" if c.inside else "outside the fitted budgets (an extrapolation)"
        cross.append(f"{a} and {b} cross at {c.flops:.3g} training FLOPs{spread}, {where}")
    if cross:
        lines += ["Crossings: " + "; ".join(cross) + ".", ""]
    elif sum(f is not None for f in fits.values()) < 2:
        lines += ["Crossings: none computed (fewer than two fitted series).", ""]

    lines += ["### Runs by inference FLOPs/byte", ""]
    body = []
    for value, members in _groups([(r.inference_flops_per_byte, r) for r in rows
                                   if math.isfinite(r.inference_flops_per_byte)]):
        for budget, cell in _groups([(r.run.comparison_budget, r) for r in members]):
            by_series: dict[str, list[float]] = {}
            for r in cell:
                by_series.setdefault(plots.series_label(r, rows), []).append(ratio_estimate(r.clean).value)
            body.append([_si(value), f"{budget:.3g}",
                         "; ".join(f"{k} {np.mean(v):.3f}" + (f" ({len(v)} seeds)" if len(v) > 1 else "")
                                   for k, v in by_series.items())])
    lines += _table(["inference FLOPs/byte", "training budget", "held-out bpb per series"], body)
    lines += ["", f"Grouped within {BUDGET_TOLERANCE:.0%}; inference FLOPs/byte measured on the held-out text, so a "
              "BLT matched to its BPE twin at the assumed patch size can land in a neighbouring group.", ""]
    return lines


def per_byte_cost_flags(rows: list[Row]) -> list[str]:
    """One line per pair of runs of two families in one (size, budget) cell whose useful training
    FLOPs per byte differ by more than PER_BYTE_TOLERANCE, e.g. "bpe costs 1.59x blt's FLOPs per
    byte (4.49M vs 2.83M)"."""
    flags = []
    for members in _cells(rows).values():
        for a, b in itertools.combinations(sorted(members, key=lambda r: _family_rank(r.run.family)), 2):
            if a.run.family == b.run.family:
                continue
            ratio = b.run.flops_per_byte / a.run.flops_per_byte
            if math.isfinite(ratio) and abs(ratio - 1) > PER_BYTE_TOLERANCE:
                flags.append(f"{b.label} costs {ratio:.2f}x {a.label}'s FLOPs per byte "
                             f"({_si(b.run.flops_per_byte)} vs {_si(a.run.flops_per_byte)})")
    return flags


def _patch_cell(row: Row) -> str:
    if row.run.family != "blt":
        return "-"
    types = row.clean["by_content_type"].values()
    patches = sum(t.get("patches", 0) for t in types)
    train = row.run.train_mean_patch_size
    return f"{train:.2f} / {row.clean['bytes'] / patches:.2f}" if train and patches else "-"


def _verdicts(rows: list[Row], content_types: list[str], noise_names: list[str]) -> list[str]:
    lines = ["## Who wins", "",
             f"At equal training FLOPs (within {BUDGET_TOLERANCE:.0%}) and size, lower bpb wins; a difference within "
             f"{TIE_SE:g} standard errors (paired over documents, plus the seed-to-seed spread where a family has "
             f"several seeds) is a tie; on fewer than {MIN_DOCUMENTS} documents no winner is called (n/a).", ""]
    found = comparisons(rows, content_types, noise_names)
    if not found:
        lines += ["No two families share a training budget and size: nothing is compared head to head "
                  "(see the plot of bpb against training FLOPs).", ""]
        return lines
    by_pair = {}
    for c in found:
        by_pair.setdefault((c["size"], c["budget"], c["a"], c["b"]), []).append(c)
    for (size, budget, a, b), items in by_pair.items():
        seeds = items[0]["seeds"]
        lines += [f"### {a.upper()} vs {b.upper()}{f', size {size}' if size else ''}, {budget:.3g} training FLOPs "
                  f"({seeds[0]} vs {seeds[1]} seed{'s' if max(seeds) > 1 else ''})", ""]
        if max(seeds) == 1:
            lines += ["One seed each: the uncertainty covers the choice of documents, not training randomness.", ""]
        for measure in dict.fromkeys(c["measure"] for c in items):
            title = {"clean": "Clean"}.get(measure, f"Noised `{measure}`" if not measure.startswith("gap")
                                           else f"Clean-to-noised gap `{measure[4:]}` (smaller is more robust)")
            lines.append(f"- {title}: " + _verdict_sentence([c for c in items if c["measure"] == measure], measure))
        lines.append("")
        body = [[c["measure"], c["content_type"], str(c["documents"]), _bpb(c["value_a"]), _bpb(c["value_b"]),
                 f"{c['difference']:+.3f}",
                 f"{TIE_SE * c['se']:.3f}" if math.isfinite(c["se"]) else "-",
                 c["winner"].upper() if c["winner"] not in ("tie", "n/a") else c["winner"]] for c in items]
        lines += _table(["measure", "content type", "docs", a.upper(), b.upper(), f"{a.upper()} - {b.upper()}",
                         f"± {TIE_SE:g} SE", "verdict"], body) + [""]
    return lines


def _against_compressors(rows: list[Row], compressors: dict, content_types: list[str]) -> list[str]:
    lines = ["## Against the compressors", ""]
    body = []
    for ctype in [*content_types, None]:
        key = ctype or "all"
        name, best = min(((n, c["bpb"] if ctype is None else c["by_content_type"].get(ctype, {}).get("bpb"))
                          for n, c in compressors.items()), key=lambda x: (x[1] is None, x[1] or 0))
        if best is None:
            continue
        verdicts = []
        for r in rows:
            e = ratio_estimate(r.clean, ctype)
            gap = e.value - best
            if e.documents < MIN_DOCUMENTS:
                state = "n/a"
            else:
                state = "tie" if abs(gap) <= TIE_SE * e.se else ("below" if gap < 0 else "above")
            verdicts.append(f"{r.label} {state} ({gap:+.3f})")
        body.append([key, f"{best:.3f} ({name})", "; ".join(verdicts)])
    lines += _table(["content type", "best compressor", "runs: below / above / tie / n/a (bpb - best)"], body)
    return lines + [""]


# ---------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="*", type=Path, metavar="RUN_OR_SWEEP_DIR",
                        help="run directories, sweep directories (results.csv) or directories holding runs")
    parser.add_argument("--out", type=Path, default=None,
                        help="report folder (default: INPUT/report for one input, else ./report)")
    parser.add_argument("--heldout", default=None,
                        help="byte dataset to score every run on (default: the one behind every run's data.val)")
    parser.add_argument("--split", default=None, help="held-out split (default: val if present, else train)")
    parser.add_argument("--eval-bytes", type=int, default=60_000,
                        help="held-out bytes per content type, whole documents (0 = all; default 60000)")
    parser.add_argument("--noise", action="append", default=[], type=noise_argument, metavar="KIND[:RATE]",
                        help=f"add noised columns ({'|'.join(KINDS)}; RATE default 0.05); repeatable")
    parser.add_argument("--noise-seed", type=int, default=0)
    parser.add_argument("--compressors-only", action="store_true",
                        help="only the compressor rows on --heldout (no runs needed)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-cache", action="store_true", help="score everything again (the cache is rewritten)")


def run(args: argparse.Namespace) -> int:
    noises = [parse_noise(text, args.noise_seed) for text in dict.fromkeys(args.noise)]
    if args.eval_bytes < 0:
        raise UserError(f"--eval-bytes must be >= 0, got {args.eval_bytes}")
    if args.compressors_only:
        if not args.heldout:
            raise UserError("--compressors-only needs --heldout DIR")
        runs, skipped = [], []
    elif not args.inputs:
        raise UserError("give run or sweep directories to compare (or --compressors-only --heldout DIR)")
    else:
        runs, skipped = find_runs(args.inputs)
    out = args.out or (args.inputs[0] / "report" if len(args.inputs) == 1 else Path("report"))
    heldout = resolve_heldout(runs, args.heldout, args.eval_bytes, args.split)
    report = compare(runs, heldout, noises, out, skipped, use_cache=not args.no_cache, batch_size=args.batch_size)
    print(report)
    print(f"\nreport: {out / 'report.md'}")
    return 0


def compare(runs: list[Run], heldout: Heldout, noises: list, out: Path, skipped: list[str] = (),
            use_cache: bool = True, batch_size: int = 8, progress=print) -> str:
    """Scores every run and the compressors, writes REPORT/report.md and the plots; returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    cache = Cache(out / "cache", read=use_cache)
    rows = []
    for run in runs:
        noised = f" (clean and {len(noises)} noised)" if noises else ""
        progress(f"[compare] {run.name}: scoring on {heldout.path}{noised}")
        row = Row(run, evaluate_run(run, heldout, None, cache, batch_size))
        for noise in noises:
            row.noised[noise.name] = evaluate_run(run, heldout, noise, cache, batch_size)
        row.inference_flops_per_byte = _inference_flops_per_byte(run.cfg, row.clean)
        row.params = sum(params_by_component(run.cfg.model).values())
        rows.append(row)
    if rows:
        check_comparable({r.label: r.clean for r in rows})
        for noise in noises:
            check_comparable({r.label: r.noised[noise.name] for r in rows})
    compressors = {"clean": evaluate_compressors(heldout, None, cache)}
    for noise in noises:
        compressors[noise.name] = evaluate_compressors(heldout, noise, cache)
    plot_files = plots.write_all(rows, compressors, noises, out) if rows else []
    report = build_report(rows, compressors, heldout, noises, list(skipped), plot_files)
    (out / "report.md").write_text(report + "\n")
    return report
