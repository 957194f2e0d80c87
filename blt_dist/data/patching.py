"""Patch boundaries: where the BLT global model takes a step.

Vectorised over whole batches (numpy, no Python loop per byte), plus `IncrementalPatcher`, the
one-token-at-a-time twin used in generation; a test checks the two agree exactly.

Conventions (fixed; the model, the loaders, `calibrate` and `blt-dist patch` all rely on them)
--------------------------------------------------------------------------------------------
Input is encoded ids (blt_dist.vocab: a document is BOS + bytes + EOS), shape [T] or [B, T],
with, for the entropy modes, one entropy per position.

* H_i, the entropy at position i, is the entropy of the entropy model's distribution for token i
  given tokens < i: it is known *before* token i is read. H at a BOS position is taken as 0
  whatever the array holds (BOS is never predicted inside a document).
* The output is a boolean `patch_start[..., T]`. A patch starts at position i when
    1. i == 0 (sample start), or
    2. token i is BOS (a document starts: patches never span documents), or
    3. the mode's rule fires at i, or
    4. the current patch already holds max_patch_length positions (a forced start; the count
       restarts at every start, natural or forced), or
    5. with `bos_alone` (off by default), token i-1 is BOS: the BOS is a patch of its own, as
       Hugging Face's and Meta's BLT patchers force (a start at position 1).
* Rules (each looks only inside the current document):
    entropy   (global threshold): fires iff H_i > threshold.
    monotonic (BLT's "approximate monotonicity"): fires iff H_i - H_{i-1} > threshold_r.
    space     (SpaceByte, causal form; see `_SPACELIKE`): fires iff token i-1 is spacelike and
              token i-2 is not (i-2 before the document's BOS counts as not spacelike).
    static    fires every patch_size positions counted from the document (or sample) start.
    byte      fires everywhere: every position is its own patch.
* Comparisons are exact comparisons of float32 values against the threshold as given: entropies
  are converted to float32 (exact for float16 shards), monotonic differences are computed in
  float32, and `H > threshold` means the real-number comparison (not float32(threshold)).

Causality. Every decision at i reads only tokens < i and entropies <= i (H_i is itself a
function of tokens < i), so a patch layout never reveals a byte the model has to predict: the
model reads a patch's global state at the patch's last byte, so "a patch starts at i" is the
same statement as "the patch ending at i-1 is complete", and must not depend on token i. The one
exception is rule 2: a BOS at i is read from token i. That leaks nothing because an encoded
document always ends with EOS, so the token after EOS is BOS (or padding) with certainty.

Space rule and SpaceByte. SpaceByte runs its global block *after* the first spacelike byte of a
run, with that byte as input: "hello world" -> "hello |world". The tempting translation into
patch starts -- a patch starts *at* each spacelike byte that follows a non-spacelike one, so a
word's trailing space opens the next patch ("hello| world") -- decides the start at i from
token i itself: the patch "hello" would be closed because the next byte is a space, which is
the very byte the model predicts from that patch's state. That form leaks the target; the rule
here reads tokens i-1 and i-2 only, so it is SpaceByte's own insertion point, expressed as a
start. A consequence: in a run of spacelike bytes, the first one ends the word's patch and the
rest of the run goes with the next word ("ab  cd" -> "ab | cd"), and a non-ASCII character is
cut after its UTF-8 lead byte (lead bytes are spacelike in SpaceByte's definition).

Loaders. Cut samples on the patch_start array of the whole stream (`sample_boundaries`); do not
re-run patching on a cut piece: the space and monotonic rules look one or two positions back,
and at a fresh sample start there is nothing to look at.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from blt_dist.errors import UserError
from blt_dist.vocab import BOS_ID, OFFSET, VOCAB_SIZE

MODES = ("entropy", "monotonic", "space", "static", "byte")
ENTROPY_MODES = ("entropy", "monotonic")

__all__ = [
    "MODES",
    "ENTROPY_MODES",
    "PatchingRule",
    "IncrementalPatcher",
    "patch_starts",
    "spacelike",
    "patch_ids",
    "patch_lengths_from_starts",
    "cumulative_patch_count",
    "sample_boundaries",
]


def _spacelike_table() -> np.ndarray:
    """Spacelike flag for every token id (specials included).

    SpaceByte (Slagle 2024, "SpaceByte: Towards Deleting Tokenization from Large Language
    Modeling", arXiv:2404.14408, sec. 2) calls a byte spacelike when it is not an ASCII letter,
    not an ASCII digit and not a UTF-8 continuation byte (10xxxxxx). Its reference code
    (kjslag/spacebyte, spacebyte.py, patch_method 'utf8') marks exactly: bytes < '0', between
    '9' and 'A', between 'Z' and 'a', between 'z' and 0x80, and >= 0xC0 -- so UTF-8 lead bytes
    count as spacelike and each non-ASCII character ends a patch after its lead byte, as there.
    Specials (PAD, BOS, EOS) are not text; they count as spacelike (SpaceByte also gives BOS
    its own global step).
    """
    table = np.ones(VOCAB_SIZE, dtype=bool)
    byte = np.arange(256)
    alnum = (
        ((byte >= ord("0")) & (byte <= ord("9")))
        | ((byte >= ord("A")) & (byte <= ord("Z")))
        | ((byte >= ord("a")) & (byte <= ord("z")))
    )
    continuation = (byte & 0xC0) == 0x80
    table[OFFSET:] = ~(alnum | continuation)
    return table


_SPACELIKE = _spacelike_table()


def spacelike(tokens) -> np.ndarray:
    """SpaceByte's spacelike flag per token id (see `_spacelike_table`)."""
    return _SPACELIKE[np.asarray(tokens)]


def _float32_floor(value: float) -> np.float32:
    """The largest float32 <= value, so `x32 > _float32_floor(t)` iff the real x32 > t.

    Comparing a float32 array with float32(t) would round t to the nearest float32, which can
    be above or below t; rounding down keeps batch results identical to the incremental form,
    which compares in float64 (exact for float32 values).
    """
    with np.errstate(over="ignore"):
        down = np.float32(value)
    if float(down) > value:
        down = np.nextafter(down, np.float32(-np.inf))
    return down


@dataclass(frozen=True)
class PatchingRule:
    """A validated patching mode plus its parameters (see the module docstring)."""

    mode: str
    threshold: Optional[float] = None  # entropy mode (nats)
    threshold_r: Optional[float] = None  # monotonic mode (nats)
    patch_size: int = 4  # static mode
    max_patch_length: Optional[int] = 16  # None: no limit
    bos_alone: bool = False  # every BOS a patch of its own (HF/Meta); reads token i-1 only

    def __post_init__(self):
        if self.mode not in MODES:
            raise UserError(f"patching mode {self.mode!r}: expected one of {', '.join(MODES)}")
        needed = {"entropy": "threshold", "monotonic": "threshold_r"}.get(self.mode)
        if needed is not None:
            value = getattr(self, needed)
            if value is None:
                raise UserError(
                    f"patching mode {self.mode!r} needs a {needed} (data.patching.{needed}); "
                    f"`blt-dist calibrate` finds one that hits a target mean patch size"
                )
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
                raise UserError(f"patching {needed} must be a number, got {value!r}")
            if math.isnan(float(value)):
                raise UserError(f"patching {needed} is NaN")
        for name, value in (("patch_size", self.patch_size), ("max_patch_length", self.max_patch_length)):
            if name == "max_patch_length" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise UserError(f"patching {name} must be a positive integer, got {value!r}")

    @classmethod
    def from_config(cls, cfg) -> "PatchingRule":
        """From a `blt_dist.config.PatchingConfig`."""
        return cls(cfg.mode, cfg.threshold, cfg.threshold_r, cfg.patch_size, cfg.max_patch_length,
                   cfg.bos_alone)

    @property
    def needs_entropies(self) -> bool:
        return self.mode in ENTROPY_MODES

    def starts(self, tokens, entropies=None) -> np.ndarray:
        """Boolean patch_start with the shape of `tokens` ([T] or [B, T])."""
        return patch_starts(tokens, entropies, self)

    def incremental(self) -> "IncrementalPatcher":
        return IncrementalPatcher(self)


# ---------------------------------------------------------------------------------------------
# Batch form


def _check_tokens(tokens) -> np.ndarray:
    tokens = np.asarray(tokens)
    if tokens.ndim not in (1, 2):
        raise UserError(f"patching expects tokens of shape [T] or [B, T], got shape {tokens.shape}")
    if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
        raise UserError(f"patching expects integer token ids, got dtype {tokens.dtype}")
    return tokens


def _check_finite(entropies: np.ndarray) -> None:
    """UserError naming the first position whose entropy is NaN/inf (or overflows float32)."""
    if entropies.dtype == np.float16:
        # all-ones exponent means inf or NaN; checking bits avoids a slow float16 conversion
        finite = (np.ascontiguousarray(entropies).view(np.uint16) & 0x7C00) != 0x7C00
    else:
        with np.errstate(over="ignore"):
            finite = np.isfinite(entropies.astype(np.float32, copy=False))
    if finite.all():
        return
    flat = int(np.flatnonzero(~finite.reshape(-1))[0])
    where = np.unravel_index(flat, entropies.shape)
    position = int(where[0]) if len(where) == 1 else tuple(int(w) for w in where)
    raise UserError(
        f"entropy at position {position} is {float(entropies.reshape(-1)[flat])}, not a finite float32; "
        f"entropies must be finite (recompute the entropy shard)"
    )


def _entropies_float32(entropies: np.ndarray) -> np.ndarray:
    """Entropies as a float32 array we own (we write zeros at BOS); already checked finite."""
    return entropies.astype(np.float32)  # always a copy


def _entropy_fires(entropies: np.ndarray, threshold: float) -> np.ndarray:
    """H_i > threshold, exactly. Float16 input is compared on its bit pattern (no conversion)."""
    if entropies.dtype == np.float16 and threshold >= 0:
        raw = np.ascontiguousarray(entropies)
        # For float16 the int16 view orders like the value for non-negative numbers, and every
        # negative number (sign bit set) is a negative int16, below any non-negative bound.
        # That makes the compare ~20x cheaper than converting; `_float16_floor` keeps it exact.
        return raw.view(np.int16) > _float16_floor(threshold).view(np.int16)
    # H at BOS is not zeroed here: a BOS starts a patch whatever the rule says
    return _entropies_float32(entropies) > _float32_floor(threshold)


def _float16_floor(value: float) -> np.float16:
    """The largest float16 <= value (value >= 0), so `x16 > floor` iff the real x16 > value."""
    with np.errstate(over="ignore"):
        down = np.float16(value)
    if float(down) > value:
        down = np.nextafter(down, np.float16(-np.inf))
    return down


def _apply_max_length(natural: np.ndarray, max_len: Optional[int]) -> np.ndarray:
    """Adds the forced starts: every max_len positions after the last natural start.

    Equal to the sequential definition (count positions in the current patch, start a new one
    when it is full, reset at every start) because natural starts do not depend on forced ones:
    after a natural start at j with the next natural start at j + g, the sequential form starts
    at j + max_len, j + 2 max_len, ... < j + g. Two exact strategies, picked by cost: dense
    natural starts (entropy, space: gaps rarely reach max_len) scan windows, sparse ones
    (static, document starts only) list the starts. `natural` is [B, T] with natural[:, 0] True,
    so neither a flattened gap nor a window holding a row start crosses rows.
    """
    if max_len is None or natural.size == 0:
        return natural
    flat = natural.reshape(-1)
    if np.count_nonzero(flat) * max_len >= flat.size:
        forced = _forced_by_windows(flat, max_len)
    else:
        forced = _forced_by_start_list(flat, max_len)
    if forced.size == 0:
        return natural
    result = flat.copy()
    result[forced] = True
    return result.reshape(natural.shape)


def _forced_by_start_list(flat: np.ndarray, max_len: int) -> np.ndarray:
    """Forced start positions from the list of natural starts: O(starts + forced)."""
    starts = np.flatnonzero(flat)
    gaps = np.diff(starts, append=flat.size)
    long_runs = np.flatnonzero(gaps > max_len)
    counts = (gaps[long_runs] - 1) // max_len  # forced starts inside a run of length g
    first = np.repeat(starts[long_runs], counts)
    # k = 1..count within each run: a running index minus the run's offset in the flat list
    offsets = np.repeat(np.cumsum(counts) - counts, counts)
    k = np.arange(first.size, dtype=np.int64) - offsets + 1
    return first + k * max_len


def _forced_by_windows(flat: np.ndarray, max_len: int) -> np.ndarray:
    """Forced start positions without listing natural starts (a full nonzero costs ~8x more).

    Position i is "overdue" when the window [i - max_len + 1, i] holds no natural start, i.e.
    i - last_natural(i) >= max_len. Overdue positions form segments [j + max_len, next - 1]
    after a natural start j, and the forced starts are every max_len-th position of a segment
    from its first. Window ORs are built by doubling (log2(max_len) passes over bools).
    """
    covered, width = flat, 1  # covered[k]: a natural start in flat[k : k + width]
    while width * 2 <= max_len:
        covered = covered[:-width] | covered[width:]
        width *= 2
    if width < max_len:  # two overlapping windows of `width` cover exactly max_len
        covered = covered[: width - max_len] | covered[max_len - width :]
    overdue = np.flatnonzero(~covered) + (max_len - 1)  # window ending at i starts at i - max_len + 1
    if overdue.size == 0:
        return overdue
    segment_start = np.ones(overdue.size, dtype=bool)
    segment_start[1:] = np.diff(overdue) != 1  # segments never touch: `next` itself is covered
    first = np.maximum.accumulate(np.where(segment_start, overdue, 0))
    return overdue[(overdue - first) % max_len == 0]


def patch_starts(tokens, entropies=None, rule: Optional[PatchingRule] = None, **rule_kwargs) -> np.ndarray:
    """Boolean patch_start, same shape as `tokens` ([T] or [B, T]); see the module docstring.

        patch_starts(ids, H, PatchingRule("entropy", threshold=1.335))
        patch_starts(ids, mode="space", max_patch_length=16)
    """
    if rule is None:
        rule = PatchingRule(**rule_kwargs)
    elif rule_kwargs:
        raise TypeError("pass either a PatchingRule or its fields, not both")
    tokens = _check_tokens(tokens)
    shape = tokens.shape
    ids = tokens.reshape(1, -1) if tokens.ndim == 1 else tokens
    if ids.shape[-1] == 0:
        return np.zeros(shape, dtype=bool)

    if rule.mode == "byte":
        return np.ones(shape, dtype=bool)

    if rule.needs_entropies:
        if entropies is None:
            raise UserError(f"patching mode {rule.mode!r} needs entropies (one per position); none were given")
        entropies = np.asarray(entropies)
        if entropies.shape != shape:
            raise UserError(f"entropies have shape {entropies.shape}, tokens have shape {shape}")
        if not np.issubdtype(entropies.dtype, np.floating):
            entropies = entropies.astype(np.float32)  # integers are legal, if odd
        _check_finite(entropies)
        entropies = entropies.reshape(ids.shape)

    bos = ids == BOS_ID
    if rule.mode == "entropy":
        natural = _entropy_fires(entropies, float(rule.threshold)) | bos
    elif rule.mode == "monotonic":
        H = _entropies_float32(entropies)
        H[bos] = 0.0  # BOS is never predicted; the first byte rises from 0
        natural = bos.copy()
        rise = H[:, 1:] - H[:, :-1]  # float32 arithmetic, as in IncrementalPatcher
        natural[:, 1:] |= rise > _float32_floor(float(rule.threshold_r))
    elif rule.mode == "space":
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= VOCAB_SIZE:
            bad = low if low < 0 else high
            raise UserError(f"token id {bad} is outside the vocabulary [0, {VOCAB_SIZE})")
        space = _SPACELIKE[ids]
        natural = bos.copy()
        if ids.shape[-1] > 1:
            natural[:, 1] |= space[:, 0]  # nothing before position 0: counts as not spacelike
        # i-2 lies in the previous document exactly when token i-1 is a BOS
        before_is_space = space[:, :-2] & ~bos[:, 1:-1]
        natural[:, 2:] |= space[:, 1:-1] & ~before_is_space
    else:  # static: only sample/document starts are natural; the period does the rest
        natural = bos.copy()

    natural[:, 0] = True
    if rule.bos_alone:
        natural[:, 1:] |= bos[:, :-1]
    period = rule.max_patch_length
    if rule.mode == "static":
        period = rule.patch_size if period is None else min(rule.patch_size, period)
    return _apply_max_length(natural, period).reshape(shape)


# ---------------------------------------------------------------------------------------------
# Incremental form (generation)


class IncrementalPatcher:
    """Decides patch starts one position at a time; agrees exactly with `patch_starts`.

        patcher = PatchingRule("entropy", threshold=1.3).incremental()
        for token, h in stream:
            new_patch = patcher.step(token, h)

    In generation the decision for the next position is needed before its token is sampled:
    `peek(entropy)` answers "does a patch start at the next position (unless it is a BOS)?"
    without consuming anything; `step` then records the sampled token.
    """

    def __init__(self, rule: PatchingRule):
        self.rule = rule
        self.reset()

    def reset(self) -> None:
        """Back to a sample start (position 0)."""
        self.position = 0
        self.patch_length = 0  # positions in the current patch
        self.prev_entropy = np.float32(0.0)  # H_{i-1} (0 after a BOS)
        self.prev_space = False  # token i-1 spacelike
        self.prev2_space = False  # token i-2 spacelike and in the same document
        self.prev_bos = False  # token i-1 is BOS (bos_alone)

    def _rule_fires(self, entropy) -> bool:
        rule = self.rule
        if rule.mode == "byte":
            return True
        if rule.mode == "entropy":
            return float(self._entropy32(entropy)) > rule.threshold
        if rule.mode == "monotonic":
            rise = self._entropy32(entropy) - self.prev_entropy  # float32 arithmetic
            return float(rise) > rule.threshold_r
        if rule.mode == "space":
            return self.prev_space and not self.prev2_space
        return False  # static: only the period

    def _limit(self) -> Optional[int]:
        if self.rule.mode == "static":
            m = self.rule.max_patch_length
            return self.rule.patch_size if m is None else min(self.rule.patch_size, m)
        return self.rule.max_patch_length

    def _entropy32(self, entropy) -> np.float32:
        if entropy is None:
            raise UserError(f"patching mode {self.rule.mode!r} needs an entropy for every position")
        value = np.float32(entropy)
        if not np.isfinite(value):
            raise UserError(f"entropy at position {self.position} is {entropy!r}; entropies must be finite")
        return value

    def peek(self, entropy=None) -> bool:
        """Whether a patch starts at the next position if its token is not BOS."""
        if self.position == 0 or (self.rule.bos_alone and self.prev_bos):
            return True
        limit = self._limit()
        return self._rule_fires(entropy) or (limit is not None and self.patch_length >= limit)

    def step(self, token: int, entropy=None) -> bool:
        """Consumes token i (with H_i for entropy modes); returns whether a patch starts at i."""
        token = int(token)
        if not 0 <= token < VOCAB_SIZE:
            raise UserError(f"token id {token} at position {self.position} is outside the vocabulary")
        is_bos = token == BOS_ID
        if self.rule.needs_entropies and (entropy is not None or not is_bos):
            entropy32 = self._entropy32(entropy)
        else:
            entropy32 = np.float32(0.0)  # BOS: never read
        start = True if is_bos else self.peek(entropy)

        self.patch_length = 1 if start else self.patch_length + 1
        self.prev_entropy = np.float32(0.0) if is_bos else entropy32
        # after a BOS, i-2 (the BOS's predecessor) belongs to the previous document
        self.prev2_space = False if is_bos else self.prev_space
        self.prev_space = bool(_SPACELIKE[token])
        self.prev_bos = is_bos
        self.position += 1
        return start


# ---------------------------------------------------------------------------------------------
# Layout helpers for loaders and the model


def patch_ids(patch_start) -> np.ndarray:
    """Index of the patch each position belongs to (int64, same shape): cumsum - 1."""
    starts = np.asarray(patch_start, dtype=bool)
    return np.cumsum(starts, axis=-1, dtype=np.int64) - 1


def cumulative_patch_count(patch_start) -> np.ndarray:
    """Number of patches started at positions <= i (int64). On one long stream, positions
    i with count[i] - count[s - 1] <= P after a patch start s hold exactly the first P patches."""
    return np.cumsum(np.asarray(patch_start, dtype=bool), axis=-1, dtype=np.int64)


def sample_boundaries(patch_start, patches_per_sample: int) -> np.ndarray:
    """Start positions of samples holding exactly `patches_per_sample` patches each.

    For one long stream (1-D patch_start): sample k spans [b[k], b[k+1]) (the last one ends at
    the stream's end and may hold fewer patches). Every boundary is a patch start, so cutting
    the stream's patch_start there gives each sample a valid layout (starting with True).
    """
    starts = np.asarray(patch_start, dtype=bool)
    if starts.ndim != 1:
        raise ValueError(f"sample_boundaries expects a 1-D stream, got shape {starts.shape}")
    if patches_per_sample < 1:
        raise ValueError(f"patches_per_sample must be positive, got {patches_per_sample}")
    if starts.size and not starts[0]:
        raise ValueError("patch_start[0] must be True (a stream starts a patch)")
    return np.flatnonzero(starts)[::patches_per_sample]


def patch_lengths_from_starts(patch_start, n_patches: int, valid_lengths=None) -> np.ndarray:
    """Patch lengths in positions, int64 [B, n_patches] (or [n_patches] for 1-D input).

    Only positions < valid_lengths[b] count (padding excluded); rows with fewer patches get
    trailing zeros. A row whose valid part holds more than n_patches patches is an error: the
    loader must cut samples to the model's fixed patch count first (`sample_boundaries`).
    """
    starts = np.asarray(patch_start, dtype=bool)
    one_d = starts.ndim == 1
    rows = starts.reshape(1, -1) if one_d else starts
    if rows.ndim != 2:
        raise ValueError(f"patch_start must be [T] or [B, T], got shape {starts.shape}")
    B, T = rows.shape
    if valid_lengths is None:
        valid_len = np.full(B, T, dtype=np.int64)
        counted = rows
    else:
        valid_len = np.asarray(valid_lengths, dtype=np.int64).reshape(-1)
        if valid_len.shape != (B,) or (valid_len < 0).any() or (valid_len > T).any():
            raise ValueError(f"valid_lengths must be {B} values in [0, {T}], got {valid_lengths!r}")
        counted = rows & (np.arange(T) < valid_len[:, None])
    if T and (~rows[:, 0] & (valid_len > 0)).any():
        bad = int(np.flatnonzero(~rows[:, 0] & (valid_len > 0))[0])
        raise ValueError(f"row {bad}: patch_start[0] must be True")
    per_row = np.count_nonzero(counted, axis=1)
    if (per_row > n_patches).any():
        bad = int(np.flatnonzero(per_row > n_patches)[0])
        raise ValueError(f"row {bad} holds {per_row[bad]} patches, more than n_patches={n_patches}")
    # Work on start positions only (sparse): a patch ends at the next start or its row's end.
    flat_starts = np.flatnonzero(counted)
    row = flat_starts // max(T, 1)
    next_start = np.append(flat_starts[1:], B * T)
    ends = np.minimum(next_start, row * T + valid_len[row])
    rank = np.arange(flat_starts.size) - np.repeat(np.cumsum(per_row) - per_row, per_row)
    out = np.zeros((B, n_patches), dtype=np.int64)
    out[row, rank] = ends - flat_starts
    return out[0] if one_d else out
