"""The writing script of a held-out document, for the report's per-script rows (issue #21, item 3).

A document's script is the script of its letters, read from the Unicode character names of
stdlib `unicodedata` (no new dependency): "CYRILLIC SMALL LETTER A" is Cyrillic. Digits,
punctuation, spaces and symbols carry no script, so an English text with numbers is still Latin.
Documents that cannot be given one script keep their own row instead of being dropped, since a
model's bpb on them is as much a result as on clean text:
  - bytes that are not valid UTF-8: INVALID;
  - no letter at all (numbers, punctuation, binary-looking text): NO_LETTERS;
  - no script holding at least DOMINANT of the letters (code-switched text): MIXED.
"""
from __future__ import annotations

import math
import unicodedata
from collections import Counter

import numpy as np

from blt_dist.evaluation.statistics import Estimate, verdict

INVALID = "invalid UTF-8"
NO_LETTERS = "no letters"
MIXED = "mixed"
UNIFORM_BPB = 8.0  # a model that assigns every byte 1/256: the floor any model must beat
# A Russian article with a Latin URL in it is still Russian; a text half Hindi, half English is not.
DOMINANT = 0.8

# Prefix of the Unicode name -> script. Kana and Han share a row (CJK): the seed's table lists
# Chinese/Japanese together and a byte model sees the same 3-byte UTF-8 shape for both.
_PREFIXES = (
    ("LATIN", "Latin"), ("CYRILLIC", "Cyrillic"), ("GREEK", "Greek"), ("ARABIC", "Arabic"),
    ("HEBREW", "Hebrew"), ("DEVANAGARI", "Devanagari"), ("BENGALI", "Bengali"), ("TAMIL", "Tamil"),
    ("CJK", "CJK"), ("HIRAGANA", "CJK"), ("KATAKANA", "CJK"), ("HANGUL", "Hangul"), ("THAI", "Thai"),
    ("ARMENIAN", "Armenian"), ("GEORGIAN", "Georgian"), ("ETHIOPIC", "Ethiopic"),
)


def char_script(ch: str) -> str | None:
    """Script of one character; None for a non-letter (or a mark: it belongs to its base letter)."""
    if not unicodedata.category(ch).startswith("L"):
        return None
    name = unicodedata.name(ch, "")
    for prefix, script in _PREFIXES:
        if name.startswith(prefix):
            return script
    return "other"  # a letter of a script without its own row: counted, not dropped


def document_script(data: bytes) -> str:
    """The script row of one document (see the module docstring for the three special rows)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return INVALID
    counts = Counter(s for s in map(char_script, text) if s is not None)
    if not counts:
        return NO_LETTERS
    script, n = counts.most_common(1)[0]
    return script if n >= DOMINANT * sum(counts.values()) else MIXED


def masked_estimate(nbytes: np.ndarray, nats: np.ndarray, mask: np.ndarray) -> Estimate:
    """bpb over the documents in mask, with the per-document influence statistics.py pairs on."""
    bits = np.asarray(nats, dtype=np.float64) / math.log(2)
    nbytes = np.asarray(nbytes, dtype=np.float64)
    total = nbytes[mask].sum()
    if not total:
        return Estimate(math.nan, np.zeros(len(nbytes)), 0)
    value = bits[mask].sum() / total
    return Estimate(float(value), np.where(mask, (bits - value * nbytes) / total, 0.0), int(mask.sum()))


def per_script(documents: list[bytes], nbytes: np.ndarray, nats_per_family: dict[str, np.ndarray]) -> list[dict]:
    """One row per script of the documents: its document count, bpb per family, whether a family
    is worse than uniform bytes there, and the BLT-minus-BPE difference (paired over the script's
    documents) when both families are present. nbytes and nats are per document, in order."""


    scripts = np.array([document_script(d) for d in documents], dtype=object)
    rows = []
    for script in sorted(set(scripts), key=lambda s: (-(scripts == s).sum(), s)):
        mask = scripts == script
        estimates = {f: masked_estimate(nbytes, nats, mask) for f, nats in nats_per_family.items()}
        row = {"script": script, "documents": int(mask.sum()),
               "bpb": {f: e.value for f, e in estimates.items()},
               "worse_than_uniform": sorted(f for f, e in estimates.items() if e.value > UNIFORM_BPB)}
        if "blt" in estimates and "bpe" in estimates:
            diff = estimates["blt"] - estimates["bpe"]
            row["blt_minus_bpe"] = diff.value
            row["blt_minus_bpe_se"] = diff.se
            row["verdict"] = verdict(diff, ("blt", "bpe"))
        rows.append(row)
    return rows
