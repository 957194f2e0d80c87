"""Packing a stream of documents into fixed-shape samples, every target exactly once.

A rank (or loader worker) sees one long stream of positions: its documents, each encoded as
BOS + content + EOS, back to back. A sample's inputs are stream positions s .. s+n-1 and its
targets are positions s+1 .. s+n; the next sample starts at s+n. So every position after the
first is a target exactly once, across sample boundaries and across documents, and nothing
is dropped at the end of a sample: the one position of overlap is an input of the next sample.
A target that is a BOS is masked (IGNORE): a document start is given, not predicted.

The shape rule is the only thing that differs between families:
  * fixed length (byte LM / entropy model, BPE):  n = T positions per sample;
  * patches (BLT): whole patches only, at most P of them and at most C positions; the rest of
    the C positions is padding (PAD, doc id -1, target IGNORE).

Every sample carries, per position, where its input came from (`doc_visit` = epoch x documents
+ document id, and `doc_pos`, the position inside the encoded document) so tests can check
exactly-once coverage per epoch, and `target_bytes`, the raw bytes each target stands for (1 per byte, 0 for EOS and
masked targets, a token's byte length for BPE): bits per byte divides by `target_bytes.sum()`
for both families.

The packer's state is its buffer (the unconsumed tail of the current documents); it is small
and goes into every checkpoint, so a resumed loader continues mid-document exactly.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from blt_dist.vocab import IGNORE

COLUMNS = ("tokens", "doc_visit", "doc_pos", "nbytes", "patch_start")


class Packer:
    """Buffers encoded documents and cuts samples.

    Each document arrives as `tokens` plus, per position, `nbytes` (raw bytes the token stands
    for) and, for BLT, `patch_start`. With `patches_per_sample` set the BLT shape rule applies,
    otherwise samples are `sample_len` positions long."""

    def __init__(
        self,
        sample_len: int,
        *,
        bos_id: int,
        pad_id: int,
        patches_per_sample: Optional[int] = None,
    ):
        if sample_len < 1:
            raise ValueError(f"sample_len must be positive, got {sample_len}")
        self.sample_len = sample_len  # T, or the byte capacity C for BLT
        self.patches_per_sample = patches_per_sample
        self.bos_id = bos_id
        self.pad_id = pad_id
        self._buffer = {name: [] for name in COLUMNS}  # lists of per-document arrays, concatenated lazily
        self._length = 0

    # -- input

    def add(self, doc_visit: int, tokens: np.ndarray, nbytes: np.ndarray, patch_start: Optional[np.ndarray] = None):
        n = len(tokens)
        if patch_start is None:
            patch_start = np.zeros(n, dtype=bool)
        if len(nbytes) != n or len(patch_start) != n:
            raise ValueError("tokens, nbytes and patch_start must have one entry per position")
        if self.patches_per_sample is not None and n and not patch_start[0]:
            raise ValueError("a document must begin with a patch start")
        columns = {
            "tokens": np.asarray(tokens, dtype=np.int64),
            "doc_visit": np.full(n, doc_visit, dtype=np.int64),
            "doc_pos": np.arange(n, dtype=np.int64),
            "nbytes": np.asarray(nbytes, dtype=np.int64),
            "patch_start": np.asarray(patch_start, dtype=bool),
        }
        for name, values in columns.items():
            self._buffer[name].append(values)
        self._length += n

    def needs_more(self) -> bool:
        """True until a sample plus its one position of look-ahead is buffered."""
        return self._length < self.sample_len + 1

    def finish(self) -> list[dict[str, np.ndarray]]:
        """The samples left at the end of a finite pass (evaluation), shorter ones padded.

        A sentinel BOS closes the stream: the last EOS gets a (masked) target, and the BLT rule
        sees where the last patch ends. Every buffered target is predicted exactly once."""
        self.add(-1, np.array([self.bos_id]), np.zeros(1, dtype=np.int64), np.ones(1, dtype=bool))
        samples = []
        while self._length > 1:
            samples.append(self.cut(final=True))
        self._buffer = {name: [] for name in COLUMNS}
        self._length = 0
        return samples

    # -- output

    def _flat(self) -> dict[str, np.ndarray]:
        for name, parts in self._buffer.items():
            if len(parts) != 1:
                self._buffer[name] = [np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)]
        return {name: parts[0] for name, parts in self._buffer.items()}

    def cut(self, final: bool = False) -> dict[str, np.ndarray]:
        """One sample (numpy arrays). Call only when `needs_more()` is False (or from finish())."""
        if self.needs_more() and not final:
            raise RuntimeError("cut() before enough positions are buffered")
        buf = self._flat()
        capacity = self.sample_len
        usable = min(capacity, self._length - 1)  # positions that have a target in the buffer
        patch_lengths = None
        if self.patches_per_sample is None:
            n = usable
        else:
            # whole patches: the k-th patch start (k <= P) at or before C ends the sample
            starts = np.flatnonzero(buf["patch_start"][: usable + 1])
            k = min(self.patches_per_sample, len(starts) - 1)
            if k < 1:
                raise ValueError(f"a patch is longer than the byte capacity {capacity}")
            n = int(starts[k])
            patch_lengths = np.zeros(self.patches_per_sample, dtype=np.int64)
            patch_lengths[:k] = np.diff(starts[: k + 1])

        tokens = buf["tokens"][:n]
        targets = buf["tokens"][1 : n + 1].copy()
        target_bytes = buf["nbytes"][1 : n + 1].copy()
        masked = targets == self.bos_id
        targets[masked] = IGNORE
        target_bytes[masked] = 0
        is_bos = tokens == self.bos_id
        doc_ids = np.cumsum(is_bos) - int(is_bos[0])  # 0 for the first (possibly continued) document

        sample = {
            "tokens": _pad(tokens, capacity, self.pad_id),
            "targets": _pad(targets, capacity, IGNORE),
            "target_bytes": _pad(target_bytes, capacity, 0),
            "doc_ids": _pad(doc_ids, capacity, -1),
            "doc_visit": _pad(buf["doc_visit"][:n], capacity, -1),
            "doc_pos": _pad(buf["doc_pos"][:n], capacity, -1),
        }
        if patch_lengths is not None:
            sample["patch_lengths"] = patch_lengths
        self.drop(n)
        return sample

    # -- checkpointing

    def buffered_documents(self) -> tuple[list[int], int]:
        """(doc_visit of each document in the buffer, in order; positions of the first already
        cut). Re-adding those documents and dropping that many positions rebuilds the buffer."""
        if self._length == 0:
            return [], 0
        buf = self._flat()
        visits = buf["doc_visit"]
        firsts = np.r_[0, np.flatnonzero(visits[1:] != visits[:-1]) + 1]
        return visits[firsts].tolist(), int(buf["doc_pos"][0])

    def drop(self, n: int) -> None:
        """Discards the first n buffered positions (used when rebuilding a buffer)."""
        buf = self._flat()
        for name, values in buf.items():
            self._buffer[name] = [values[n:]]
        self._length -= n

    def state_dict(self) -> dict:
        return {name: values.copy() for name, values in self._flat().items()}

    def load_state_dict(self, state: dict) -> None:
        lengths = {len(state[name]) for name in COLUMNS}
        if len(lengths) != 1:
            raise ValueError(f"corrupt packer state: columns of different lengths {sorted(lengths)}")
        self._buffer = {name: [np.asarray(state[name]).copy()] for name in COLUMNS}
        self._length = lengths.pop()


def _pad(values: np.ndarray, length: int, fill: int) -> np.ndarray:
    if len(values) == length:
        return values.astype(np.int64, copy=False)
    out = np.full(length, fill, dtype=np.int64)
    out[: len(values)] = values
    return out
