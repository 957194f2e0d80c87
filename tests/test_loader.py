"""Loaders for all families: exact resume, exactly-once coverage per epoch, disjoint ranks."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from blt_dist.data.loader import Loader, LoaderSpec, merge_states
from blt_dist.data.packing import IGNORE
from blt_dist.data.prepare import prepare
from blt_dist.data.tokenizer import train_tokenizer
from blt_dist.errors import UserError
from blt_dist.model import batch_facts
from blt_dist.vocab import encode_document
from tests.conftest import write_word_documents

WORDS = "the quick brown fox jumps over lazy dog byte latent transformer patch entropy".split()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    write_word_documents(root / "in", WORDS, 23, (0, 60), tail=lambda i, rng: b"\xff\x00" if i % 5 == 0 else b"")
    prepare([root / "in"], root / "ds", val_fraction=0.0, progress=False)
    train_tokenizer(root / "ds", root / "tok.model", vocab_size=300)
    return root


def spec_for(data, family: str, **kw) -> LoaderSpec:
    common = dict(path=str(data / "ds"), split="train", micro_batch_size=2, seed=3)
    common.update(kw)
    if family == "blt":
        patching = dict(mode="space", threshold=None, threshold_r=None, patch_size=4, max_patch_length=6)
        return LoaderSpec(family="blt", sample_len=24, patches_per_sample=6, patching=patching, **common)
    if family == "bpe":
        return LoaderSpec(family="bpe", sample_len=16, tokenizer=str(data / "tok.model"), **common)
    return LoaderSpec(family="bytes", sample_len=32, **common)


def take(loader: Loader, n: int) -> list[dict]:
    """n batches' tensors, each checked to carry the layout facts of its own tensors."""
    batches = []
    for _ in range(n):
        batch = next(loader)
        tensors = {k: v.clone() for k, v in batch.items() if k != "facts"}
        assert_facts_equal(batch["facts"], batch_facts(tensors, loader.spec.family))
        batches.append(tensors)
    return batches


def assert_facts_equal(got, want) -> None:
    for field in dataclasses.fields(want):
        a, b = getattr(got, field.name), getattr(want, field.name)
        if dataclasses.is_dataclass(b):
            assert_facts_equal(a, b)
        elif isinstance(b, torch.Tensor):
            assert torch.equal(a, b), field.name
        else:
            assert a == b, field.name


FAMILIES = ["bytes", "bpe", "blt"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("world_size, rank", [(1, 0), (2, 1)])
def test_resume_gives_the_same_next_batches(data, family, num_workers, world_size, rank):
    spec = spec_for(data, family)
    loader = Loader(spec, rank, world_size, num_workers)
    take(loader, 5)
    state = loader.state_dict()
    expected = take(loader, 6)
    loader.close()
    fresh = Loader(spec, rank, world_size, num_workers)
    fresh.load_state_dict(state)
    got = take(fresh, 6)
    fresh.close()
    for a, b in zip(got, expected):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].equal(b[key]), key


def epoch_zero_targets(loader: Loader, num_documents: int):
    """(document, position) of every target of epoch 0, read until epoch 1 has begun."""
    seen, nbytes = [], 0
    while True:
        batch = next(loader)
        keep = batch["targets"] != IGNORE
        visits = batch["doc_visit"][keep]
        positions = batch["doc_pos"][keep] + 1
        in_epoch0 = visits < num_documents
        seen += zip(visits[in_epoch0].tolist(), positions[in_epoch0].tolist())
        nbytes += int(batch["target_bytes"][keep][in_epoch0].sum())
        # each lane's stream is ordered: epoch 0 is done once every lane is past it
        lanes = [s["stream"] for s in loader.state_dict()["lane_states"].values()]
        if all(w is not None and w["epoch"] >= 1 and min(w["buffered_visits"], default=num_documents) >= num_documents
               for w in lanes):
            return seen, nbytes


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("world_size, num_workers", [(1, 0), (2, 0), (2, 2)])
def test_every_target_exactly_once_per_epoch(data, family, world_size, num_workers):
    from blt_dist.data.shards import ByteDataset, SplitReader

    reader = SplitReader(ByteDataset(data / "ds"), "train")
    documents = [reader.get(i)[1]["data"] for i in range(len(reader))]
    seen, total_bytes, per_rank_docs = [], 0, []
    for rank in range(world_size):
        loader = Loader(spec_for(data, family), rank, world_size, num_workers)
        targets, nbytes = epoch_zero_targets(loader, len(documents))
        loader.close()
        seen += targets
        total_bytes += nbytes
        per_rank_docs.append({d for d, _ in targets})
    assert len(seen) == len(set(seen)), "a target was predicted twice"
    if world_size == 2:
        assert not per_rank_docs[0] & per_rank_docs[1], "ranks share documents"
    assert {d for d, _ in seen} == set(range(len(documents)))
    assert total_bytes == sum(map(len, documents)), "raw bytes predicted != raw bytes in the data"
    if family != "bpe":  # byte positions: every position after BOS, EOS included
        expected = {(d, p) for d, data_ in enumerate(documents) for p in range(1, len(encode_document(data_)))}
        assert set(seen) == expected


def test_mismatched_resume_fails_loudly(data):
    loader = Loader(spec_for(data, "bytes"), 0, 2)
    take(loader, 2)
    state = loader.state_dict()
    with pytest.raises(UserError, match="data.lanes 2, this run has 4"):
        Loader(spec_for(data, "bytes"), 0, 2, lanes=4).load_state_dict(state)
    with pytest.raises(UserError, match="loader settings"):
        Loader(spec_for(data, "bytes", seed=4), 0, 2).load_state_dict(state)
    with pytest.raises(UserError, match="loader settings"):
        Loader(spec_for(data, "bytes", micro_batch_size=3), 0, 2).load_state_dict(state)
    with pytest.raises(UserError, match="fingerprint"):
        Loader(spec_for(data, "bytes"), 0, 2).load_state_dict({**state, "fingerprint": "0" * 64})
    with pytest.raises(UserError, match="no state for lanes"):  # rank 0's lanes only, loaded as rank 1
        Loader(spec_for(data, "bytes"), 1, 2).load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# Lanes: the global sequence of micro-batches does not depend on the world size


def global_sequence(data, family: str, lanes: int, world_size: int, num_workers: int, steps: int,
                    per_step: int, state=None):
    """The global micro-batches of `steps` steps of `per_step` micro-batches, with every rank's
    share put back in global order (rank r holds global micro-batches r, r + W, ...); and the
    run's merged loader state after them."""
    loaders = [Loader(spec_for(data, family), r, world_size, num_workers, lanes=lanes) for r in range(world_size)]
    if state is not None:
        for loader in loaders:
            loader.load_state_dict(state)
    out = []
    for _ in range(steps):
        shares = [take(loader, per_step // world_size) for loader in loaders]
        out += [shares[i % world_size][i // world_size] for i in range(per_step)]
    merged = merge_states([loader.state_dict() for loader in loaders])
    for loader in loaders:
        loader.close()
    return out, merged


def assert_same_batches(got, want):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        for key in b:
            assert a[key].equal(b[key]), (i, key)


@pytest.mark.parametrize("family", ["bytes", "blt"])
def test_the_global_micro_batches_are_the_same_at_every_world_size(data, family):
    lanes, per_step = 4, 12
    want, _ = global_sequence(data, family, lanes, 1, 0, 3, per_step)
    for world_size, num_workers in [(2, 0), (3, 2), (4, 2), (2, 3)]:
        got, _ = global_sequence(data, family, lanes, world_size, num_workers, 3, per_step)
        assert_same_batches(got, want)


@pytest.mark.parametrize("family", ["bytes", "bpe"])
def test_a_world_size_change_mid_epoch_continues_the_same_sequence(data, family):
    """Saved at 2 ranks, resumed at 1, 3 and 4 (with other worker counts): the micro-batches
    after the resume are those of the uninterrupted run, and every target of epoch 0 is
    predicted exactly once across the change."""
    lanes, per_step = 4, 12
    want, _ = global_sequence(data, family, lanes, 1, 0, 8, per_step)
    first, state = global_sequence(data, family, lanes, 2, 2, 3, per_step)
    assert_same_batches(first, want[: len(first)])
    for world_size, num_workers in [(1, 0), (3, 0), (4, 2)]:
        rest, _ = global_sequence(data, family, lanes, world_size, num_workers, 5, per_step, state=state)
        assert_same_batches(first + rest, want)


def test_blt_shapes_and_patch_lengths(data):
    batch = next(Loader(spec_for(data, "blt"), 0, 1))
    assert batch["tokens"].shape == (2, 24) and batch["patch_lengths"].shape == (2, 6)
    real = (batch["doc_ids"] >= 0).sum(dim=1)
    assert batch["patch_lengths"].sum(dim=1).equal(real)
    assert int(batch["patch_lengths"].max()) <= 6


def test_too_few_documents_for_the_lanes(data):
    with pytest.raises(UserError, match="fewer than data.lanes = 64"):
        Loader(spec_for(data, "bytes"), 0, 32, num_workers=2)
