"""Packer: fixed shapes, whole patches, every target exactly once, exact state round trip."""
from __future__ import annotations

import numpy as np
import pytest

from blt_dist.data.packing import IGNORE, Packer
from blt_dist.vocab import BOS_ID, EOS_ID, OFFSET, PAD_ID, encode_document


def doc(data: bytes):
    tokens = encode_document(data)
    return tokens, (tokens >= OFFSET).astype(np.int64)


def test_fixed_length_hand_example():
    packer = Packer(4, bos_id=BOS_ID, pad_id=PAD_ID)
    packer.add(7, *doc(b"abc"))  # BOS a b c EOS
    packer.add(8, *doc(b"d"))  # BOS d EOS
    first = packer.cut()
    a, b, c, d = (OFFSET + x for x in b"abcd")
    assert first["tokens"].tolist() == [BOS_ID, a, b, c]
    assert first["targets"].tolist() == [a, b, c, EOS_ID]
    assert first["target_bytes"].tolist() == [1, 1, 1, 0]
    assert first["doc_visit"].tolist() == [7, 7, 7, 7]
    assert packer.needs_more()  # EOS BOS d EOS: 4 positions, a sample needs 5
    packer.add(9, *doc(b""))
    second = packer.cut()
    assert second["tokens"].tolist() == [EOS_ID, BOS_ID, d, EOS_ID]
    assert second["targets"].tolist() == [IGNORE, d, EOS_ID, IGNORE]  # BOS targets are masked
    assert second["doc_ids"].tolist() == [0, 1, 1, 1]


def test_blt_cuts_whole_patches_and_pads():
    packer = Packer(6, bos_id=BOS_ID, pad_id=PAD_ID, patches_per_sample=2)
    tokens, nbytes = doc(b"abcdefgh")  # 10 positions
    starts = np.zeros(10, dtype=bool)
    starts[[0, 1, 4, 7]] = True  # patches [BOS] [a b c] [d e f] [g h EOS]
    packer.add(0, tokens, nbytes, starts)
    sample = packer.cut()
    assert sample["patch_lengths"].tolist() == [1, 3]
    assert sample["tokens"].tolist()[:4] == tokens[:4].tolist() and sample["tokens"].tolist()[4:] == [PAD_ID] * 2
    assert sample["targets"].tolist() == tokens[1:5].tolist() + [IGNORE] * 2
    assert sample["doc_ids"].tolist() == [0, 0, 0, 0, -1, -1]
    packer.add(1, *doc(b"x"), np.array([True, True, False]))
    sample = packer.cut()  # [d e f] then [g h EOS] is 3 more: 6 positions fit exactly
    assert sample["patch_lengths"].tolist() == [3, 3]


def test_patch_longer_than_capacity_is_an_error():
    packer = Packer(3, bos_id=BOS_ID, pad_id=PAD_ID, patches_per_sample=4)
    tokens, nbytes = doc(b"abcdef")
    packer.add(0, tokens, nbytes, np.array([True, True] + [False] * 6))
    assert packer.cut()["patch_lengths"].tolist() == [1, 0, 0, 0]  # the BOS patch fits
    with pytest.raises(ValueError, match="longer than the byte capacity"):
        packer.cut()


def random_documents(blt: bool, count: int = 60):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        tokens, nbytes = doc(rng.integers(0, 256, rng.integers(0, 40)).astype(np.uint8).tobytes())
        starts = None
        if blt:
            starts = rng.random(len(tokens)) < 0.4
            starts[np.arange(len(tokens)) % 7 == 0] = True  # includes BOS; max patch length 7 <= capacity
        out.append((tokens, nbytes, starts))
    return out


def feed(packer: Packer, documents, first_visit: int = 0):
    samples = []
    for visit, (tokens, nbytes, starts) in enumerate(documents, start=first_visit):
        packer.add(visit, tokens, nbytes, starts)
        while not packer.needs_more():
            samples.append(packer.cut())
    return samples


@pytest.mark.parametrize("blt", [False, True])
def test_every_target_exactly_once(blt):
    documents = random_documents(blt)
    samples = feed(Packer(16, bos_id=BOS_ID, pad_id=PAD_ID, patches_per_sample=5 if blt else None), documents)
    seen = []
    for sample in samples:
        keep = sample["targets"] != IGNORE
        assert (sample["target_bytes"][keep] == (sample["targets"][keep] >= OFFSET)).all()
        seen += zip(sample["doc_visit"][keep].tolist(), (sample["doc_pos"][keep] + 1).tolist())
    assert len(seen) == len(set(seen)), "a target was predicted twice"
    last = max(v for v, _ in seen)  # documents after it are still in the buffer
    expected = {(v, p) for v, (tokens, _, _) in enumerate(documents) for p in range(1, len(tokens)) if v < last}
    assert expected <= set(seen), "a target was skipped"


@pytest.mark.parametrize("blt", [False, True])
def test_state_round_trip_continues_exactly(blt):
    documents = random_documents(blt)
    make = lambda: Packer(16, bos_id=BOS_ID, pad_id=PAD_ID, patches_per_sample=5 if blt else None)
    reference = make()
    feed(reference, documents[:30])
    state = reference.state_dict()
    expected = feed(reference, documents[30:], first_visit=30)
    restored = make()
    restored.load_state_dict(state)
    got = feed(restored, documents[30:], first_visit=30)
    assert len(got) == len(expected) > 5
    for a, b in zip(got, expected):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("blt", [False, True])
def test_finish_predicts_the_tail_exactly_once(blt):
    documents = random_documents(blt, count=25)
    packer = Packer(16, bos_id=BOS_ID, pad_id=PAD_ID, patches_per_sample=5 if blt else None)
    samples = feed(packer, documents) + packer.finish()
    seen = []
    for sample in samples:
        keep = sample["targets"] != IGNORE
        seen += zip(sample["doc_visit"][keep].tolist(), (sample["doc_pos"][keep] + 1).tolist())
        assert sample["tokens"].shape == (16,)
    expected = [(v, p) for v, (tokens, _, _) in enumerate(documents) for p in range(1, len(tokens))]
    assert sorted(seen) == sorted(expected)
