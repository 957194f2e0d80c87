"""Deterministic hold-out selection and train/held-out line de-duplication.

Documents are ordered by sha256 of their source id (a stable pseudo-random order that depends
on nothing but the id) and taken into the held-out set in that order until it holds enough bytes.
For natural-language content every held-out line that also occurs in training is then removed:
translated manuals and fortune files repeat boilerplate across documents, and a split by
document alone leaks those lines into the evaluation set.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass
class Doc:
    source: str   # the Source.name this document came from (its output file)
    source_id: str
    text: str

    @property
    def nbytes(self) -> int:
        return len(self.text.encode())


def hash_key(source_id: str) -> str:
    return hashlib.sha256(source_id.encode()).hexdigest()


def line_key(line: str) -> str:
    """Lines compare after stripping surrounding whitespace; blank lines are never 'shared'."""
    return line.strip()


def remove_shared_lines(heldout: list[Doc], train: list[Doc]) -> list[Doc]:
    """Held-out documents without the lines that occur anywhere in training; emptied ones dropped."""
    train_lines = {line_key(line) for doc in train for line in doc.text.split("\n")}
    train_lines.discard("")
    kept = []
    for doc in heldout:
        lines = [line for line in doc.text.split("\n") if line_key(line) not in train_lines]
        text = "\n".join(lines).strip("\n")
        while "\n\n\n" in text:  # removed lines can leave runs of blank lines behind
            text = text.replace("\n\n\n", "\n\n")
        if text.strip():
            kept.append(Doc(doc.source, doc.source_id, text + "\n"))
    return kept


def split_heldout(docs: list[Doc], min_bytes: int, share: float, dedup: bool) -> tuple[list[Doc], list[Doc]]:
    """(train, heldout) for one content type.

    The held-out set takes documents in hash order until it reaches max(min_bytes, share of
    the type) — after de-duplication, when `dedup` is set: removing shared lines shrinks it,
    so the raw target grows until the de-duplicated set is big enough. Never more than half the
    data is held out.
    """
    ordered = sorted(docs, key=lambda d: hash_key(d.source_id))
    total = sum(d.nbytes for d in ordered)
    target = max(min_bytes, int(share * total))
    limit = total // 2
    raw_target = target
    while True:
        heldout, size = [], 0
        for doc in ordered:
            if size >= min(raw_target, limit):
                break
            heldout.append(doc)
            size += doc.nbytes
        taken = {d.source_id for d in heldout}
        train = [d for d in ordered if d.source_id not in taken]
        if dedup:
            heldout = remove_shared_lines(heldout, train)
        got = sum(d.nbytes for d in heldout)
        if got >= target or raw_target >= limit:
            return train, heldout
        # Grow the raw selection in proportion to how much de-duplication removed.
        raw_target = min(limit, int(raw_target * max(1.1, target / max(got, 1))))
