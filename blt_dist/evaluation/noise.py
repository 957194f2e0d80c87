"""Seeded character-level noise for held-out text, as in the BLT paper's noised evaluation.

    spec = parse_noise("swap:0.05")                 # KIND[:RATE], RATE default 0.05
    noisy = spec.apply(b"some text", index=3)       # the same bytes every time for (seed, index)
    documents = noised(documents, spec)             # (content type, source, bytes) stream, noised

Kinds, each applied to a character with probability RATE:
    case    swap the case of a letter (characters without a one-character case twin never change)
    swap    exchange it with the next character (pairs never overlap)
    delete  drop it
    repeat  write it twice
    mix     one of the four above, drawn uniformly per character

Text is handled as characters, never bytes: a document is decoded with errors="surrogateescape",
so valid UTF-8 becomes code points and each invalid byte a lone surrogate U+DC80..U+DCFF. Noise
touches only real characters (invalid bytes are never changed, moved or dropped) and the result
is encoded back the same way, so a multi-byte character is never split and any byte string is
valid input. Decoding and encoding an unchanged document gives back its bytes exactly. (A
deletion can bring two invalid bytes together into a valid pair, b"\xc3 \x80" -> b"\xc3\x80";
the bytes themselves are still untouched.)

Determinism: document `index` (its position in the scored stream) and the seed pick the
generator (numpy's default_rng([seed, index])), so every model scored on the same held-out set
and byte limit sees identical noised bytes, whatever its family or the batch it lands in.
The random draws do not depend on the kind: `case:0.1` and `delete:0.1` select the same
characters.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from blt_dist.errors import UserError

OPERATIONS = ("case", "swap", "delete", "repeat")
KINDS = (*OPERATIONS, "mix")
DEFAULT_RATE = 0.05
_ESCAPED_LOW, _ESCAPED_HIGH = 0xDC80, 0xDCFF  # surrogateescape's range: one invalid byte each


@dataclass(frozen=True)
class NoiseSpec:
    kind: str
    rate: float = DEFAULT_RATE
    seed: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UserError(f"noise kind {self.kind!r}: expected one of {', '.join(KINDS)}")
        if not 0.0 <= self.rate <= 1.0:
            raise UserError(f"noise rate {self.rate}: expected a probability in [0, 1]")

    @property
    def name(self) -> str:
        """`kind:rate`, as typed on the command line (the seed is said separately)."""
        return f"{self.kind}:{self.rate:g}"

    def apply(self, data: bytes, index: int) -> bytes:
        return add_noise(data, self, index)


def parse_noise(text: str, seed: int = 0) -> NoiseSpec:
    """'KIND' or 'KIND:RATE' -> NoiseSpec (a UserError for anything else)."""
    kind, _, rate = text.partition(":")
    try:
        value = float(rate) if rate else DEFAULT_RATE
    except ValueError:
        raise UserError(f"--noise {text!r}: RATE must be a number (e.g. {kind}:0.05)") from None
    return NoiseSpec(kind.strip().lower(), value, seed)


def noise_argument(text: str) -> str:
    """argparse type: checks KIND[:RATE] early; the seed is applied later with parse_noise."""
    try:
        parse_noise(text)
    except UserError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def add_noise(data: bytes, spec: NoiseSpec, index: int) -> bytes:
    """The noised document (see the module docstring)."""
    text = data.decode("utf-8", errors="surrogateescape")
    if not text or spec.rate == 0.0:
        return data
    chars = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype="<u4").copy()
    n = len(chars)
    rng = np.random.default_rng([spec.seed, index])
    selected = rng.random(n) < spec.rate
    drawn = rng.integers(0, len(OPERATIONS), n)  # used by mix; drawn always, so streams never shift
    operation = drawn if spec.kind == "mix" else np.full(n, OPERATIONS.index(spec.kind))
    real = (chars < _ESCAPED_LOW) | (chars > _ESCAPED_HIGH)  # invalid bytes are left alone
    selected &= real

    case = np.flatnonzero(selected & (operation == OPERATIONS.index("case")))
    for i in case:  # few positions (rate x length); str.swapcase knows every script's letters
        twin = chr(chars[i]).swapcase()
        if len(twin) == 1:  # 'ß' -> 'SS' is not a flip
            chars[i] = ord(twin)

    # A swap at i exchanges i and i + 1; one at i + 1 as well would overlap, so a swap is kept
    # only when the character before did not also ask for one (cheaper than a left-to-right scan,
    # and the same for every family since it depends only on the draws).
    swap = selected & (operation == OPERATIONS.index("swap"))
    swap[-1] = False
    swap[1:] &= ~swap[:-1]
    swap[:-1] &= real[1:]
    first = np.flatnonzero(swap)
    order = np.arange(n)
    order[first], order[first + 1] = first + 1, first
    chars = chars[order]
    # The other operations stay with their character when it moves.
    selected, operation = selected[order], operation[order]

    copies = np.ones(n, dtype=np.int64)
    copies[selected & (operation == OPERATIONS.index("delete"))] = 0
    copies[selected & (operation == OPERATIONS.index("repeat"))] = 2
    chars = np.repeat(chars, copies)
    text = chars.astype("<u4").tobytes().decode("utf-32-le", errors="surrogatepass")
    return text.encode("utf-8", errors="surrogateescape")


def noised(documents: Iterable[tuple[str, str, bytes]], spec: NoiseSpec) -> Iterator[tuple[str, str, bytes]]:
    """The same stream with document i noised by (spec.seed, i)."""
    for index, (content_type, source, data) in enumerate(documents):
        yield content_type, source, add_noise(data, spec, index)
