"""Calibration: hits its target within 5%, reports a consistent histogram, explains failures."""
from __future__ import annotations

import numpy as np
import pytest

from blt_dist.data.calibrate import calibrate_threshold
from blt_dist.data.patching import patch_starts
from blt_dist.errors import UserError
from blt_dist.vocab import BOS_ID, OFFSET, encode_document


def synthetic_docs(seed: int, n_docs: int = 40, scale: float = 1.0):
    """Encoded random documents with float16 entropies (a smooth level plus noise, like an LM's)."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        ids = encode_document(rng.integers(0, 256, size=int(rng.integers(50, 400)), dtype=np.uint8).tobytes())
        level = np.abs(rng.standard_normal(ids.size)).cumsum() % 3.0
        H = (scale * (level * rng.random(ids.size) + rng.exponential(0.3, ids.size))).astype(np.float16)
        docs.append((ids, H))
    return docs


def measured_mean(docs, **rule) -> float:
    """Real bytes per patch holding a byte, recomputed from scratch for each document."""
    n_bytes = n_patches = 0
    for ids, H in docs:
        starts = patch_starts(ids, H, **rule)
        edges = np.append(np.flatnonzero(starts), ids.size)
        for a, b in zip(edges[:-1], edges[1:]):
            real = int((ids[a:b] >= OFFSET).sum())
            n_bytes += real
            n_patches += real > 0
    return n_bytes / n_patches


def test_hand_worked_calibration():
    ids = encode_document(b"abcd")  # BOS a b c d EOS
    H = np.array([0.0, 3.0, 1.0, 2.0, 0.5, 0.1], dtype=np.float32)
    # threshold in [1, 2): starts at a and c -> patches "ab", "cd"+EOS -> 2 bytes per patch
    result = calibrate_threshold([(ids, H)], "entropy", target_mean_size=2.0, max_patch_length=None)
    assert 1.0 <= result.threshold < 2.0
    assert result.mean_patch_size == 2.0
    assert result.histogram == {2: 2}
    assert result.reachable == (1.0, 4.0)  # every byte its own patch .. one patch of 4 bytes


@pytest.mark.parametrize("mode", ["entropy", "monotonic"])
@pytest.mark.parametrize("target", [2.5, 4.5, 7.0])
def test_hits_target_within_five_percent(mode, target):
    docs = synthetic_docs(seed=int(target * 10))
    result = calibrate_threshold(docs, mode, target_mean_size=target, max_patch_length=16)
    assert abs(result.mean_patch_size - target) <= 0.05 * target
    key = "threshold" if mode == "entropy" else "threshold_r"
    # the reported threshold reproduces the reported mean when the documents are patched anew
    again = measured_mean(docs, mode=mode, max_patch_length=16, **{key: result.threshold})
    assert again == pytest.approx(result.mean_patch_size, rel=1e-12)
    sizes = np.array(list(result.histogram.keys()))
    counts = np.array(list(result.histogram.values()))
    assert (sizes * counts).sum() / counts.sum() == pytest.approx(result.mean_patch_size)
    assert sizes.max() <= 16
    assert f"{key}=" in result.report()


def test_per_content_type_means():
    prose = synthetic_docs(seed=1, n_docs=20, scale=1.0)
    code = synthetic_docs(seed=2, n_docs=20, scale=0.3)  # more predictable: fewer starts
    result = calibrate_threshold(prose + code, target_mean_size=4.5, content_types=["prose"] * 20 + ["code"] * 20)
    assert set(result.per_type) == {"prose", "code"}
    assert result.per_type["code"].mean_patch_size > result.per_type["prose"].mean_patch_size
    total_bytes = sum(s.bytes for s in result.per_type.values())
    total_patches = sum(s.patches for s in result.per_type.values())
    assert total_bytes / total_patches == pytest.approx(result.mean_patch_size)
    assert "code" in result.report()


def test_unreachable_targets_say_what_is_reachable():
    docs = synthetic_docs(seed=3, n_docs=10)
    with pytest.raises(UserError, match=r"reachable mean patch size is 1\.000\.\.[23]\.\d+ bytes \(max_patch_length=3"):
        calibrate_threshold(docs, target_mean_size=4.5, max_patch_length=3)
    with pytest.raises(UserError, match="reachable mean patch size is 1.000"):
        calibrate_threshold(docs, target_mean_size=0.5)
    flat = [(ids, np.full(ids.size, 1.25, dtype=np.float16)) for ids, _ in docs]
    with pytest.raises(UserError, match=r"jumps between 1\.0 and .*too few distinct values \(1\)"):
        calibrate_threshold(flat, target_mean_size=4.5)


def test_bad_documents():
    ids = encode_document(b"abc")
    with pytest.raises(UserError, match="starting with BOS"):
        calibrate_threshold([(ids[1:], np.zeros(ids.size - 1))])
    with pytest.raises(UserError, match="4 entropies for 5 positions"):
        calibrate_threshold([(ids, np.zeros(4))])
    bad = np.zeros(ids.size)
    bad[2] = np.nan
    with pytest.raises(UserError, match="finite"):
        calibrate_threshold([(ids, bad)])
    with pytest.raises(UserError, match="not 'space'"):
        calibrate_threshold([(ids, np.zeros(ids.size))], mode="space")
    with pytest.raises(UserError, match="at least one document"):
        calibrate_threshold([])
    assert ids[0] == BOS_ID
