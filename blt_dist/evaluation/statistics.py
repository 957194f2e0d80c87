"""Uncertainty of bits per byte over documents, for the report's verdicts.

bpb over a set of documents is a ratio, R = sum(bits_i) / sum(bytes_i). Its standard error over
documents is the ratio (delta-method) estimator: with influence z_i = (bits_i - R bytes_i) /
sum(bytes), SE^2 = m/(m-1) sum z_i^2 over the m documents. Runs scored on the same documents are
paired: subtracting two Estimates subtracts their influences, which cancels what makes a
document hard for everyone. Seeds of one (family, size, budget) are averaged and their spread
enters as var(seeds)/seeds. A difference within TIE_SE standard errors is a tie; on fewer than
MIN_DOCUMENTS documents no winner is called.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

TIE_SE = 2.0  # a difference within this many standard errors is a tie
MIN_DOCUMENTS = 5  # below this the SE is itself too uncertain to call a winner: "n/a"


@dataclass
class Estimate:
    """A bpb (or a difference of bpbs) and its per-document influence (for paired SEs)."""

    value: float
    influence: np.ndarray  # [documents], zero outside the content type
    documents: int  # m: documents in the content type
    seed_var: float = 0.0  # var(seed means)/seeds: training randomness, when several seeds exist

    @property
    def se(self) -> float:
        if self.documents < 2:
            return math.inf  # one document: no spread to measure
        doc_var = self.documents / (self.documents - 1) * float(np.sum(self.influence ** 2))
        return math.sqrt(doc_var + self.seed_var)

    def __sub__(self, other: "Estimate") -> "Estimate":
        return Estimate(self.value - other.value, self.influence - other.influence, self.documents,
                        self.seed_var + other.seed_var)


def ratio_estimate(record: dict, content_type: Optional[str] = None) -> Estimate:
    """bpb of one eval record over a content type (None: all documents)."""
    docs = record["per_document"]
    nbytes = np.array([d[2] for d in docs], dtype=np.float64)  # noised records: the noised bytes
    bits = np.array([d[3] for d in docs], dtype=np.float64) / math.log(2)
    mask = np.ones(len(docs), dtype=bool) if content_type is None else np.array([d[0] == content_type for d in docs])
    total = nbytes[mask].sum()
    if not total:
        return Estimate(math.nan, np.zeros(len(docs)), 0)
    value = bits[mask].sum() / total
    return Estimate(float(value), np.where(mask, (bits - value * nbytes) / total, 0.0), int(mask.sum()))


def cell_estimate(estimates: list[Estimate]) -> Estimate:
    """Seeds of one (family, size, budget): their mean, with the seed spread as extra variance."""
    if len(estimates) == 1:
        return estimates[0]
    values = np.array([e.value for e in estimates])
    return Estimate(float(values.mean()), np.mean([e.influence for e in estimates], axis=0), estimates[0].documents,
                    float(values.var(ddof=1)) / len(values))


def verdict(difference: Estimate, names: tuple[str, str]) -> str:
    """'A' / 'B' (lower bpb wins), 'tie' when |difference| <= 2 SE, 'n/a' on too few documents.
    difference = A - B."""
    if not math.isfinite(difference.value) or difference.documents < MIN_DOCUMENTS:
        return "n/a"
    if difference.value == 0 or abs(difference.value) <= TIE_SE * difference.se:
        return "tie"
    return names[0] if difference.value < 0 else names[1]
