"""Patching: hand-worked layouts per mode, batch == incremental, max length, causality, bad input."""
from __future__ import annotations

import numpy as np
import pytest

from blt_dist.config import PatchingConfig
from blt_dist.data.patching import (
    MODES,
    PatchingRule,
    cumulative_patch_count,
    patch_ids,
    patch_lengths_from_starts,
    patch_starts,
    sample_boundaries,
    spacelike,
)
from blt_dist.errors import UserError
from blt_dist.vocab import BOS_ID, EOS_ID, OFFSET, encode_document


def ids_of(*docs: bytes) -> np.ndarray:
    return np.concatenate([encode_document(d) for d in docs])


def starts_at(*positions: int, length: int) -> np.ndarray:
    out = np.zeros(length, dtype=bool)
    out[list(positions)] = True
    return out


def assert_starts(actual, *positions: int):
    actual = np.asarray(actual)
    assert np.flatnonzero(actual).tolist() == list(positions)


# ---------------------------------------------------------------------------------------------
# Hand-worked examples (expected starts written out by hand from the module docstring's rules)


def test_entropy_mode_by_hand():
    ids = ids_of(b"abcde", b"fg")  # BOS a b c d e EOS BOS f g EOS: positions 0..10
    H = np.array([0.0, 2.0, 0.5, 1.5, 0.2, 3.0, 0.1, 9.9, 2.5, 0.3, 1.0], dtype=np.float32)
    # 0: sample start; 1, 3, 5, 8: H > 1; 7: BOS; 10: H == 1.0 is not > 1.0
    starts = patch_starts(ids, H, mode="entropy", threshold=1.0, max_patch_length=None)
    assert_starts(starts, 0, 1, 3, 5, 7, 8)


def test_monotonic_mode_by_hand():
    ids = ids_of(b"abcdef", b"g")  # BOS a b c d e f EOS BOS g EOS: positions 0..10
    H = np.array([5.0, 1.0, 1.2, 2.0, 0.5, 0.9, 1.6, 1.0, 7.0, 0.4, 1.0], dtype=np.float32)
    # rises: 1: 1.0-0 (BOS counts as 0, its stored 5.0 is ignored); 2: 0.2; 3: 0.8; 4: -1.5;
    # 5: 0.4; 6: 0.7; 7: -0.6; 8: BOS; 9: 0.4-0 (not the 7.0 stored at the BOS); 10: 0.6
    starts = patch_starts(ids, H, mode="monotonic", threshold_r=0.5, max_patch_length=None)
    assert_starts(starts, 0, 1, 3, 6, 8, 10)


def test_space_mode_by_hand():
    text = b"ab  cd, e\xc3\xa9f"
    ids = encode_document(text)
    # positions: 0 BOS, 1 a, 2 b, 3 ' ', 4 ' ', 5 c, 6 d, 7 ',', 8 ' ', 9 e, 10 0xC3, 11 0xA9,
    # 12 f, 13 EOS. Spacelike: BOS, ' ', ',', 0xC3 (a UTF-8 lead byte), EOS.
    # A start at i needs i-1 spacelike and i-2 not: 1 (BOS at 0, nothing before it),
    # 4 (after "ab "), 8 (after "cd,"), 11 (after the lead byte 0xC3, as in SpaceByte).
    starts = patch_starts(ids, mode="space", max_patch_length=None)
    assert_starts(starts, 0, 1, 4, 8, 11)


def test_space_mode_does_not_look_across_documents():
    ids = ids_of(b"a ", b" b")  # BOS a ' ' EOS BOS ' ' b EOS: positions 0..7
    # 1 and 5: after a BOS (spacelike) whose predecessor is outside the document, so BOS is a
    # patch of its own, as in SpaceByte; 3: ' ' at 2 after 'a'; not 6: the ' ' at 5 follows
    # the spacelike BOS at 4 (the EOS at 3 is not consulted: it is in the previous document).
    starts = patch_starts(ids, mode="space", max_patch_length=None)
    assert_starts(starts, 0, 1, 3, 4, 5)


def test_static_mode_by_hand():
    ids = ids_of(b"abcdefg", b"hi")  # 9 + 4 positions; second BOS at 9
    starts = patch_starts(ids, mode="static", patch_size=3, max_patch_length=None)
    assert_starts(starts, 0, 3, 6, 9, 12)
    # max_patch_length below patch_size wins
    starts = patch_starts(ids, mode="static", patch_size=3, max_patch_length=2)
    assert_starts(starts, 0, 2, 4, 6, 8, 9, 11)


def test_byte_mode_every_position():
    ids = ids_of(b"xyz")
    assert patch_starts(ids, mode="byte").all()


def test_max_patch_length_by_hand():
    ids = ids_of(b"abcdefghij")  # 12 positions
    H = np.zeros(12, dtype=np.float32)
    H[5] = 3.0  # one natural start at 5
    starts = patch_starts(ids, H, mode="entropy", threshold=1.0, max_patch_length=3)
    # forced at 3 (0..2 full); natural at 5 restarts the count; forced at 8 and 11
    assert_starts(starts, 0, 3, 5, 8, 11)
    assert patch_lengths_from_starts(starts, 6).tolist() == [3, 2, 3, 3, 1, 0]


def test_sample_start_is_a_start_without_bos():
    ids = np.array([OFFSET + ord("a")] * 5)
    assert_starts(patch_starts(ids, mode="static", patch_size=10), 0)
    assert_starts(patch_starts(ids, np.zeros(5), mode="monotonic", threshold_r=0.1), 0)


def test_spacelike_matches_spacebyte_definition():
    flags = spacelike(np.arange(OFFSET, OFFSET + 256))
    for byte in range(256):
        alnum = chr(byte).isascii() and chr(byte).isalnum()
        continuation = 0x80 <= byte <= 0xBF
        assert flags[byte] == (not alnum and not continuation), hex(byte)
    assert spacelike([BOS_ID, EOS_ID]).all()


# ---------------------------------------------------------------------------------------------
# Batch form == incremental form


def random_stream(rng: np.random.Generator, T: int) -> tuple[np.ndarray, np.ndarray]:
    """Random bytes (biased to letters and spaces so the space rule has runs), BOS/EOS inside."""
    alphabet = np.frombuffer(b"ab  ,.\n\xc3\xa9\x00\xff9", dtype=np.uint8).astype(np.int64) + OFFSET
    tokens = rng.choice(alphabet, size=T)
    specials = rng.random(T) < 0.04
    tokens[specials] = rng.choice([BOS_ID, EOS_ID], size=int(specials.sum()))
    entropies = (rng.random(T) * 3.0).astype(rng.choice([np.float16, np.float32]))
    return tokens, entropies


def random_rule(rng: np.random.Generator, mode: str) -> PatchingRule:
    max_len = None if rng.random() < 0.1 else int(rng.integers(1, 21))
    return PatchingRule(
        mode,
        threshold=float(rng.random() * 3.0),
        threshold_r=float(rng.normal() * 0.7),
        patch_size=int(rng.integers(1, 9)),
        max_patch_length=max_len,
    )


@pytest.mark.parametrize("mode", MODES)
def test_batch_equals_incremental(mode):
    rng = np.random.default_rng(list(MODES).index(mode))
    for _ in range(40):
        rule = random_rule(rng, mode)
        tokens, entropies = random_stream(rng, int(rng.integers(1, 120)))
        batch = rule.starts(tokens, entropies)
        patcher = rule.incremental()
        stepped = np.array([patcher.step(t, h) for t, h in zip(tokens, entropies)])
        assert np.array_equal(batch, stepped), rule


@pytest.mark.parametrize("mode", MODES)
def test_peek_agrees_with_step(mode):
    """Generation asks before sampling: peek(H_i) must equal step's answer for non-BOS tokens."""
    rng = np.random.default_rng(100 + list(MODES).index(mode))
    rule = random_rule(rng, mode)
    tokens, entropies = random_stream(rng, 300)
    patcher = rule.incremental()
    for t, h in zip(tokens, entropies):
        predicted = patcher.peek(h)
        actual = patcher.step(t, h)
        assert actual == (predicted or t == BOS_ID)


@pytest.mark.parametrize("mode", MODES)
def test_rows_are_independent(mode):
    rng = np.random.default_rng(7)
    rule = random_rule(rng, mode)
    pieces = [random_stream(rng, 64) for _ in range(5)]
    tokens = np.stack([p[0] for p in pieces])
    entropies = np.stack([p[1].astype(np.float32) for p in pieces])
    batch = rule.starts(tokens, entropies)
    for row in range(5):
        assert np.array_equal(batch[row], rule.starts(tokens[row], entropies[row]))


def test_max_length_matches_sequential_definition():
    """The vectorised forced starts equal 'count positions, start when full, reset on starts'."""
    rng = np.random.default_rng(3)
    for _ in range(200):
        T = int(rng.integers(1, 200))
        natural = rng.random(T) < rng.choice([0.0, 0.02, 0.2])
        max_len = int(rng.integers(1, 21))
        ids = np.full(T, OFFSET + ord("a"))
        H = np.where(natural, 2.0, 0.0).astype(np.float32)
        got = patch_starts(ids, H, mode="entropy", threshold=1.0, max_patch_length=max_len)
        expected, length = np.zeros(T, bool), 0
        for i in range(T):
            expected[i] = i == 0 or natural[i] or length == max_len
            length = 1 if expected[i] else length + 1
        assert np.array_equal(got, expected)
        assert patch_lengths_from_starts(got, T).max() <= max_len


def test_both_max_length_strategies_agree():
    """Dense and sparse natural starts take different code paths; both must be exact."""
    from blt_dist.data.patching import _forced_by_start_list, _forced_by_windows

    rng = np.random.default_rng(4)
    for _ in range(300):
        natural = rng.random(int(rng.integers(1, 300))) < rng.choice([0.0, 0.01, 0.1, 0.5, 0.9])
        natural[0] = True
        max_len = int(rng.integers(1, 25))
        by_list = _forced_by_start_list(natural, max_len)
        by_windows = _forced_by_windows(natural, max_len)
        assert np.array_equal(np.sort(by_list), by_windows), (natural, max_len)


# ---------------------------------------------------------------------------------------------
# Causality: the decision at i reads tokens < i and entropies <= i only


@pytest.mark.parametrize("mode", MODES)
def test_causality_of_decisions(mode):
    rng = np.random.default_rng(11 + list(MODES).index(mode))
    byte_ids = np.arange(OFFSET, OFFSET + 256)
    for _ in range(30):
        rule = random_rule(rng, mode)
        tokens, entropies = random_stream(rng, 80)
        entropies = entropies.astype(np.float32)
        base = rule.starts(tokens, entropies)
        t = int(rng.integers(0, 80))

        if tokens[t] != BOS_ID:  # a byte for another byte: nothing at or before t may change
            other = tokens.copy()
            other[t] = rng.choice(byte_ids[byte_ids != tokens[t]])
            assert np.array_equal(rule.starts(other, entropies)[: t + 1], base[: t + 1])
        as_bos = tokens.copy()  # a new document at t: nothing before t may change
        as_bos[t] = BOS_ID
        assert np.array_equal(rule.starts(as_bos, entropies)[:t], base[:t])
        hotter = entropies.copy()  # H_t may move the start at t, nothing before it
        hotter[t] += rng.choice([-2.0, 2.0, 10.0])
        assert np.array_equal(rule.starts(tokens, hotter)[:t], base[:t])


# ---------------------------------------------------------------------------------------------
# Exactness of threshold comparisons


def test_threshold_comparison_is_exact():
    value = np.float32(1.3)  # not exactly 1.3
    ids = ids_of(b"ab")
    H = np.array([0.0, value, 0.0, 0.0], dtype=np.float32)
    at = patch_starts(ids, H, mode="entropy", threshold=float(value), max_patch_length=None)
    below = patch_starts(ids, H, mode="entropy", threshold=np.nextafter(float(value), 0.0), max_patch_length=None)
    assert_starts(at, 0)
    assert_starts(below, 0, 1)


def test_float16_bit_compare_equals_float32_compare():
    rng = np.random.default_rng(5)
    H16 = (rng.standard_normal(5000) * 2).astype(np.float16)
    H16[:6] = [0.0, -0.0, 6e-8, 65504, -65504, 1.0]
    ids = np.full(H16.size, OFFSET + 97)
    for threshold in [0.0, 1.0, float(np.float16(1.3)), 1.3, 1e-9, 2.5, 70000.0, -0.5, float("inf")]:
        a = patch_starts(ids, H16, mode="entropy", threshold=threshold, max_patch_length=None)
        b = patch_starts(ids, H16.astype(np.float32), mode="entropy", threshold=threshold, max_patch_length=None)
        assert np.array_equal(a, b), threshold


# ---------------------------------------------------------------------------------------------
# Layout helpers


def test_patch_lengths_ids_and_counts():
    starts = np.array([[1, 0, 1, 1, 0, 0, 1, 0], [1, 1, 0, 0, 1, 0, 0, 0]], dtype=bool)
    assert patch_ids(starts).tolist() == [[0, 0, 1, 2, 2, 2, 3, 3], [0, 1, 1, 1, 2, 2, 2, 2]]
    assert cumulative_patch_count(starts[0]).tolist() == [1, 1, 2, 3, 3, 3, 4, 4]
    lengths = patch_lengths_from_starts(starts, 5, valid_lengths=[8, 6])
    assert lengths.tolist() == [[2, 1, 3, 2, 0], [1, 3, 2, 0, 0]]  # row 1: padding after 6
    assert lengths.dtype == np.int64
    with pytest.raises(ValueError, match="row 0 holds 4 patches"):
        patch_lengths_from_starts(starts, 3)
    with pytest.raises(ValueError, match="patch_start\\[0\\] must be True"):
        patch_lengths_from_starts(~starts, 8)


def test_sample_boundaries_give_exactly_p_patches():
    rng = np.random.default_rng(9)
    tokens, entropies = random_stream(rng, 1000)
    starts = patch_starts(tokens, entropies, mode="entropy", threshold=1.5, max_patch_length=8)
    cuts = sample_boundaries(starts, 16)
    pieces = np.split(starts, cuts[1:])
    assert all(p[0] for p in pieces)
    assert [int(p.sum()) for p in pieces[:-1]] == [16] * (len(pieces) - 1)
    assert 1 <= pieces[-1].sum() <= 16


# ---------------------------------------------------------------------------------------------
# Bad input


def test_nonfinite_entropies_name_the_position():
    ids = ids_of(b"abcdef")
    for bad, dtype in [(np.nan, np.float32), (np.inf, np.float16), (-np.inf, np.float64), (1e39, np.float64)]:
        H = np.zeros(ids.size, dtype=dtype)
        H[4] = bad
        with pytest.raises(UserError, match="entropy at position 4 is"):
            patch_starts(ids, H, mode="entropy", threshold=1.0)
    batch = np.zeros((2, ids.size), dtype=np.float32)
    batch[1, 3] = np.nan
    with pytest.raises(UserError, match=r"position \(1, 3\)"):
        patch_starts(np.stack([ids, ids]), batch, mode="monotonic", threshold_r=0.2)
    with pytest.raises(UserError, match="position 2"):
        patcher = PatchingRule("entropy", threshold=1.0).incremental()
        for t, h in zip(ids, [0.0, 1.0, float("nan")]):
            patcher.step(t, h)


def test_missing_threshold_or_entropies_is_a_clear_error():
    with pytest.raises(UserError, match="needs a threshold .*calibrate"):
        PatchingRule("entropy")
    with pytest.raises(UserError, match="needs a threshold_r"):
        PatchingRule.from_config(PatchingConfig(mode="monotonic", threshold=1.0))
    with pytest.raises(UserError, match="needs entropies"):
        patch_starts(ids_of(b"a"), mode="entropy", threshold=1.0)
    with pytest.raises(UserError, match="shape"):
        patch_starts(ids_of(b"a"), np.zeros(2), mode="entropy", threshold=1.0)
    with pytest.raises(UserError, match="expected one of"):
        PatchingRule("bpe")
    with pytest.raises(UserError, match="max_patch_length must be a positive integer"):
        PatchingRule("byte", max_patch_length=0)
    with pytest.raises(UserError, match="outside the vocabulary"):
        patch_starts(np.array([1, 300]), mode="space")


def test_empty_and_single_position():
    assert patch_starts(np.zeros(0, dtype=np.int64), mode="space").shape == (0,)
    assert patch_starts(np.array([BOS_ID]), np.zeros(1), mode="monotonic", threshold_r=0.0).tolist() == [True]
    assert patch_starts(np.array([[97], [98]]), mode="space").tolist() == [[True], [True]]
