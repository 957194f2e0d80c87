"""Weighted mixtures of a dataset's content types (`data.mixture`).

    data:
      mixture:                       # every content type of data.train, in a fixed order
        - {content_type: prose, weight: 3}
        - {content_type: code, weight: 1}
        - {content_type: multilingual, weight: 1}
        ...

Weights are shares of an epoch's bytes: an epoch still holds the split's total bytes E (the
manifest's per-stream bytes summed), and stream i gets T_i = E * w_i / sum(w) of them. A stream
of B_i bytes with T_i >= B_i is read floor(T_i / B_i) times in full, then a prefix of a seeded
permutation of its documents (seed, epoch, stream) up to the first document that reaches the
remaining bytes; one with T_i < B_i is that prefix alone. So every epoch realises each stream's
target within one document, the subsample changes from epoch to epoch, and a weight of 0 drops a
stream explicitly. Every content type must be listed: none is left out by omission.

The k-th copy of global document d is the virtual document k * N + d (N documents in the split),
so a document read twice in an epoch is two different documents to the packer, and the loader's
visit numbers (epoch * span + virtual id) still name the document as visit % N.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from blt_dist.errors import UserError


@dataclass(frozen=True)
class StreamShare:
    content_type: str
    documents: int
    bytes: int  # in the dataset
    target: int  # bytes per epoch under the mixture

    @property
    def repeats(self) -> float:
        return self.target / self.bytes if self.bytes else 0.0


def shares(weights: tuple[tuple[str, float], ...], streams) -> list[StreamShare]:
    """Each stream's bytes per epoch. `streams`: the split's StreamInfo list (sorted content types)."""
    have = {s.content_type: s for s in streams}
    named = [name for name, _ in weights]
    unknown = [name for name in named if name not in have]
    if unknown:
        raise UserError(f"data.mixture: content types {unknown} are not in the dataset (it has {sorted(have)})")
    if len(set(named)) != len(named):
        raise UserError(f"data.mixture: a content type is listed twice ({named})")
    missing = sorted(set(have) - set(named))
    if missing:
        raise UserError(f"data.mixture: content types {missing} of the dataset are not listed; give each a weight "
                        "(0 leaves one out)")
    if any(not np.isfinite(w) or w < 0 for _, w in weights) or sum(w for _, w in weights) <= 0:
        raise UserError(f"data.mixture: weights must be non-negative with a positive sum, got {[w for _, w in weights]}")
    total_weight = sum(w for _, w in weights)
    epoch_bytes = sum(s.bytes for s in streams)
    out = []
    for name, weight in weights:
        stream = have[name]
        target = round(epoch_bytes * weight / total_weight)
        if target and not stream.bytes:
            raise UserError(f"data.mixture: {name} has weight {weight} but no bytes")
        out.append(StreamShare(name, stream.documents, stream.bytes, target))
    return out


def mixture_fingerprint(weights: tuple[tuple[str, float], ...], dataset_fingerprint: str) -> str:
    """What the loader state records: the weights and the data they apply to."""
    text = json.dumps({"weights": [list(w) for w in weights], "dataset": dataset_fingerprint})
    return hashlib.sha256(text.encode()).hexdigest()


class MixturePlan:
    """The virtual documents of every epoch, before the epoch's shuffle."""

    def __init__(self, weights: tuple[tuple[str, float], ...], streams, lengths: list[np.ndarray], seed: int):
        by_type = {s.content_type: i for i, s in enumerate(streams)}
        self.shares = shares(weights, streams)
        self.num_documents = sum(s.documents for s in streams)
        starts = np.cumsum([0] + [s.documents for s in streams[:-1]])
        self.seed = seed
        # (global first id, document lengths) per listed stream, in the mixture's order (as shares)
        self._streams = [(int(starts[by_type[sh.content_type]]), lengths[by_type[sh.content_type]])
                         for sh in self.shares]
        copies = max(-(-sh.target // sh.bytes) for sh in self.shares if sh.bytes) if self.num_documents else 1
        self.span = max(copies, 1) * self.num_documents  # virtual ids of an epoch lie in [0, span)

    def epoch(self, epoch: int) -> np.ndarray:
        """The epoch's virtual document ids, stream by stream (the loader shuffles them)."""
        parts = []
        for index, (share, (start, lengths)) in enumerate(zip(self.shares, self._streams)):
            if share.target == 0:
                continue
            full, rest = divmod(share.target, share.bytes)  # bytes: the lengths' sum (document_lengths checks)
            ids = np.arange(start, start + len(lengths), dtype=np.int64)
            parts.extend(copy * self.num_documents + ids for copy in range(full))
            if rest:
                order = np.random.default_rng([self.seed, epoch, index, 0x6D6978]).permutation(len(lengths))
                taken = int(np.searchsorted(np.cumsum(lengths[order]), rest, side="left")) + 1
                parts.append(full * self.num_documents + ids[np.sort(order[:taken])])
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def describe(self) -> list[str]:
        """One line per stream: bytes in the dataset and per epoch, expected repeats."""
        lines = []
        for sh in self.shares:
            lines.append(f"{sh.content_type}: {sh.bytes:,} bytes in the dataset, {sh.target:,} per epoch "
                         f"({sh.repeats:.3g}x: {_what(sh.repeats)})")
        return lines


def _what(repeats: float) -> str:
    if repeats == 0:
        return "left out"
    if repeats < 1:
        return f"a {repeats:.0%} subsample, a new one each epoch"
    times = "once" if int(repeats) == 1 else f"{int(repeats)} times"
    return f"read {times}{' plus a subsample' if repeats % 1 else ''}"
