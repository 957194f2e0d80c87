"""Threshold calibration: the entropy threshold whose patches average a target size.

    blt-dist calibrate --data data/entropies --target 4.5 [--mode monotonic] [--json]

    result = calibrate_threshold(docs, mode="entropy", target_mean_size=4.5, max_patch_length=16)
    print(result.report())          # threshold, mean, reachable range, histogram, per content type
    cfg.data.patching.threshold = result.threshold

`docs` holds (tokens, entropies) per encoded document (BOS + bytes [+ EOS], one entropy per
position, as in entropy shards). Mean patch size is real bytes per patch: bytes of the
documents (BOS/EOS excluded) divided by the patches that hold at least one byte (a patch of
only BOS or EOS holds no text) -- the same count `blt-dist patch --json` shows.

Search. Raising the threshold removes natural starts and never adds patches (a merged run
needs at most as many forced starts as its parts), so the mean is monotone in the threshold.
All thresholds between two neighbouring distinct values of the compared quantity (H_i for
`entropy`, H_i - H_{i-1} for `monotonic`) give the same layout, so bisection runs over the
sorted distinct values: ~16 patching passes for float16 entropies.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import numpy as np

from blt_dist.data.loader import ENTROPY_FORMAT
from blt_dist.data.patching import PatchingRule, patch_starts
from blt_dist.data.shards import ByteDataset, SplitReader
from blt_dist.errors import UserError
from blt_dist.vocab import BOS_ID, OFFSET, encode_document

__all__ = ["CalibrationResult", "TypeStats", "calibrate_threshold", "sample_documents"]


@dataclass
class TypeStats:
    bytes: int
    patches: int

    @property
    def mean_patch_size(self) -> float:
        return self.bytes / self.patches if self.patches else float("nan")


@dataclass
class CalibrationResult:
    mode: str
    threshold: float  # theta (entropy) or theta_r (monotonic), in nats
    mean_patch_size: float
    target_mean_size: float
    reachable: tuple[float, float]  # mean patch sizes at the lowest and highest thresholds
    max_patch_length: Optional[int]
    histogram: dict[int, int]  # bytes per patch -> number of patches
    per_type: dict[str, TypeStats] = field(default_factory=dict)

    @property
    def config_key(self) -> str:
        return "data.patching.threshold" if self.mode == "entropy" else "data.patching.threshold_r"

    def report(self) -> str:
        lo, hi = self.reachable
        total = sum(self.histogram.values())
        lines = [
            f"{self.config_key}={self.threshold!r}",
            f"mean patch size {self.mean_patch_size:.3f} bytes (target {self.target_mean_size:g}, "
            f"reachable {lo:.3f}..{hi:.3f} with max_patch_length={self.max_patch_length})",
            "bytes/patch  patches  share",
        ]
        for length, count in sorted(self.histogram.items()):
            lines.append(f"{length:11d}  {count:7d}  {count / total:6.1%}  {'#' * round(40 * count / total)}")
        if self.per_type:
            lines.append("content type  mean patch size  bytes  patches")
            for name, stats in sorted(self.per_type.items()):
                lines.append(f"{name:12s}  {stats.mean_patch_size:15.3f}  {stats.bytes:5d}  {stats.patches:7d}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


@dataclass
class _Corpus:
    """All documents as one stream (every document starts with BOS, so none leaks into another)."""

    tokens: np.ndarray
    entropies: np.ndarray  # float32
    is_byte: np.ndarray
    doc_type: np.ndarray  # content-type index of each position's document
    type_names: list[str]


def _gather(documents: Iterable, content_types: Optional[Sequence[str]]) -> _Corpus:
    tokens, entropies, type_index = [], [], []
    names: dict[str, int] = {}
    for k, doc in enumerate(documents):
        ids, H = (np.asarray(a) for a in doc)
        if ids.ndim != 1 or ids.size == 0 or ids[0] != BOS_ID:
            raise UserError(f"document {k}: expected encoded ids starting with BOS ({BOS_ID}), got shape {ids.shape}")
        if H.shape != ids.shape:
            raise UserError(f"document {k}: {H.shape[0] if H.ndim else 0} entropies for {ids.size} positions")
        label = "all" if content_types is None else str(content_types[k])
        tokens.append(ids)
        entropies.append(H.astype(np.float32))
        type_index.append(np.full(ids.size, names.setdefault(label, len(names)), dtype=np.int32))
    if not tokens:
        raise UserError("calibration needs at least one document")
    if content_types is not None and len(content_types) != len(tokens):
        raise UserError(f"{len(content_types)} content types for {len(tokens)} documents")
    stream = np.concatenate(tokens)
    return _Corpus(stream, np.concatenate(entropies), stream >= OFFSET, np.concatenate(type_index), list(names))


def _patch_statistics(corpus: _Corpus, starts: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(mean bytes per patch, bytes per non-empty patch, the start index of each of those)."""
    first = np.flatnonzero(starts)
    bytes_per_patch = np.add.reduceat(corpus.is_byte.astype(np.int64), first)
    keep = bytes_per_patch > 0
    total = int(bytes_per_patch.sum())
    n = int(keep.sum())
    return (total / n if n else 0.0), bytes_per_patch[keep], first[keep]


def _candidates(corpus: _Corpus, mode: str) -> np.ndarray:
    """Sorted distinct values the rule compares against the threshold (float32, as patching does)."""
    bos = corpus.tokens == BOS_ID
    if mode == "entropy":
        compared = corpus.entropies[~bos]
    else:
        H = corpus.entropies.copy()
        H[bos] = 0.0
        compared = (H[1:] - H[:-1])[~bos[1:]]  # float32 rises, exactly as patch_starts computes them
    if compared.size == 0:
        raise UserError("the documents hold no bytes to calibrate on")
    if not np.isfinite(compared).all():
        raise UserError("entropies must be finite (found NaN or inf)")
    return np.unique(compared)


def _readable_between(low: float, high: float) -> float:
    """A short decimal t with low <= t < high (same layout as `low` on this data), else low."""
    for digits in range(2, 18):
        t = float(f"{(low + high) / 2:.{digits}g}")
        if low <= t < high:
            return t
    return low


def calibrate_threshold(
    documents: Iterable,
    mode: str = "entropy",
    target_mean_size: float = 4.5,
    max_patch_length: Optional[int] = 16,
    tolerance: float = 0.05,
    content_types: Optional[Sequence[str]] = None,
) -> CalibrationResult:
    """The threshold (entropy) or threshold_r (monotonic) hitting target_mean_size within tolerance.

    Raises UserError when no threshold gets within tolerance, saying what is reachable.
    """
    if mode not in ("entropy", "monotonic"):
        raise UserError(f"calibration applies to the entropy and monotonic modes, not {mode!r}")
    if not (isinstance(target_mean_size, (int, float)) and math.isfinite(target_mean_size) and target_mean_size > 0):
        raise UserError(f"target mean patch size must be a positive number, got {target_mean_size!r}")
    corpus = _gather(documents, content_types)
    values = _candidates(corpus, mode)
    key = "threshold" if mode == "entropy" else "threshold_r"

    # Index k in -1..n-1: threshold values[k] (k = -1: just below the smallest, every rule fires).
    def threshold_at(k: int) -> float:
        return float(np.nextafter(values[0], -np.inf)) if k < 0 else float(values[k])

    cache: dict[int, tuple] = {}

    def evaluate(k: int):
        if k not in cache:
            rule = PatchingRule(mode, max_patch_length=max_patch_length, **{key: threshold_at(k)})
            starts = patch_starts(corpus.tokens, corpus.entropies, rule)
            cache[k] = (starts, *_patch_statistics(corpus, starts))
        return cache[k]

    low, high = -1, values.size - 1
    lowest, highest = evaluate(low)[1], evaluate(high)[1]
    if target_mean_size <= lowest:
        best = low
    elif target_mean_size >= highest:
        best = high
    else:  # invariant: mean(low) < target <= mean(high)
        while high - low > 1:
            mid = (low + high) // 2
            if evaluate(mid)[1] < target_mean_size:
                low = mid
            else:
                high = mid
        best = min((low, high), key=lambda k: abs(evaluate(k)[1] - target_mean_size))

    starts, mean, sizes, first = evaluate(best)
    if abs(mean - target_mean_size) > tolerance * target_mean_size:
        if target_mean_size > highest or target_mean_size < lowest:
            why = (
                f"the reachable mean patch size is {lowest:.3f}..{highest:.3f} bytes"
                f" (max_patch_length={max_patch_length}, documents of {corpus.is_byte.sum()} bytes in all)"
            )
        else:
            nearest = sorted({round(evaluate(low)[1], 3), round(evaluate(high)[1], 3)})
            why = (
                f"the mean jumps between {' and '.join(map(str, nearest))} bytes: the entropies take too "
                f"few distinct values ({values.size}) to land in between"
            )
        raise UserError(
            f"no {key} gives a mean patch size within {tolerance:.0%} of {target_mean_size:g}: {why}"
        )

    threshold = threshold_at(best)
    if 0 <= best < values.size - 1:
        threshold = _readable_between(float(values[best]), float(values[best + 1]))

    patch_type = corpus.doc_type[first]
    per_type = {}
    for index, name in enumerate(corpus.type_names):
        mine = patch_type == index
        per_type[name] = TypeStats(int(sizes[mine].sum()), int(mine.sum()))
    lengths, counts = np.unique(sizes, return_counts=True)
    return CalibrationResult(
        mode=mode,
        threshold=threshold,
        mean_patch_size=mean,
        target_mean_size=float(target_mean_size),
        reachable=(lowest, highest),
        max_patch_length=max_patch_length,
        histogram={int(n): int(c) for n, c in zip(lengths, counts)},
        per_type=per_type if content_types is not None else {},
    )


# ---------------------------------------------------------------------------------------------
# CLI: calibrate on a sample of an entropy dataset


def sample_documents(path, split: str = "train", sample_bytes: int = 16_000_000, seed: int = 0):
    """A deterministic sample of an entropy dataset: [(content type, encoded ids, entropies)].

    Each content type gets a share of `sample_bytes` proportional to its bytes, so the sample's
    mix, and hence the overall mean patch size, is the training mix (the loaders read every
    document once per epoch); every content type gets at least one document so its mean can be
    reported. Within a type, documents are taken in a seeded random order until its share is
    reached. The whole split is used when it holds at most `sample_bytes`.
    """
    dataset = ByteDataset(path, format=ENTROPY_FORMAT)
    reader = SplitReader(dataset, split)
    total = sum(stream.bytes for stream in reader.streams)
    docs, first = [], 0
    for k, stream in enumerate(reader.streams):
        share = stream.bytes if total <= sample_bytes else sample_bytes * stream.bytes / total
        order = np.random.default_rng([seed, k]).permutation(stream.documents)
        taken = 0
        for local in order:
            if taken >= share and taken > 0:
                break
            content_type, sample = reader.get(first + int(local))
            docs.append((content_type, encode_document(sample["data"]), np.asarray(sample["entropies"])))
            taken += len(sample["data"]) + (len(sample["data"]) == 0)  # empty documents still count once
        first += stream.documents
    return dataset, docs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="ENTROPY_DATASET", help="entropy dataset (`blt-dist entropies`)")
    parser.add_argument("--target", type=float, default=4.5, help="target mean patch size in bytes (default 4.5)")
    parser.add_argument("--mode", choices=("entropy", "monotonic"), default="entropy", help="patching rule (default entropy)")
    parser.add_argument("--max-patch-length", type=int, default=16, help="longest patch in positions (default 16)")
    parser.add_argument(
        "--sample-bytes", type=int, default=16_000_000, metavar="N",
        help="calibrate on about N bytes, shared by content type in proportion to their size (default 16M)",
    )
    parser.add_argument("--split", default="train", help="split to sample (default train)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the document sample")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    if args.sample_bytes < 1:
        raise UserError(f"--sample-bytes must be positive, got {args.sample_bytes}")
    if args.max_patch_length < 1:
        raise UserError(f"--max-patch-length must be positive, got {args.max_patch_length}")
    dataset, docs = sample_documents(args.data, args.split, args.sample_bytes, args.seed)
    result = calibrate_threshold(
        [(ids, H) for _, ids, H in docs],
        mode=args.mode,
        target_mean_size=args.target,
        max_patch_length=args.max_patch_length,
        content_types=[ctype for ctype, _, _ in docs],
    )
    overrides = [f"{result.config_key}={result.threshold!r}", f"data.patching.max_patch_length={args.max_patch_length}"]
    if args.mode != "entropy":
        overrides.insert(0, f"data.patching.mode={args.mode}")
    sample = {"documents": len(docs), "bytes": int(sum(ids.size - 2 for _, ids, _ in docs)), "split": args.split}
    if args.json:
        print(json.dumps({
            "mode": result.mode,
            "threshold": result.threshold,
            "config_key": result.config_key,
            "overrides": overrides,
            "mean_patch_size": result.mean_patch_size,
            "target_mean_size": result.target_mean_size,
            "reachable": list(result.reachable),
            "max_patch_length": result.max_patch_length,
            "histogram": {str(n): c for n, c in sorted(result.histogram.items())},
            "per_content_type": {
                name: {"mean_patch_size": s.mean_patch_size, "bytes": s.bytes, "patches": s.patches}
                for name, s in sorted(result.per_type.items())
            },
            "sample": sample,
            "dataset_fingerprint": dataset.fingerprint,
        }))
        return 0
    print(f"sample: {sample['documents']:,} documents, {sample['bytes']:,} bytes of {args.data} ({args.split})")
    print(result.report())
    print(f"use: {' '.join(overrides)}")
    return 0
