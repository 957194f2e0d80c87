"""Weighted mixtures (data.mixture): realised bytes per stream, repeats and subsamples, exact
resume, refusals, and the dry run's plan."""
from __future__ import annotations

import json

import numpy as np
import pytest

from blt_dist.config import load_config
from blt_dist.data.loader import Loader, LoaderSpec, PackedStream, mixture_plan, open_dataset
from blt_dist.data.mixture import MixturePlan
from blt_dist.data.prepare import prepare
from blt_dist.data.shards import ByteDataset
from blt_dist.errors import UserError
from tests.conftest import run_cli, write_word_documents

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
TYPES = ("code", "math", "prose")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    write_word_documents(root / "in", WORDS, 40, (3, 90), types=TYPES)
    prepare([root / "in"], root / "ds", val_fraction=0.0, progress=False)
    return root / "ds"


def spec(dataset, mixture, **kw) -> LoaderSpec:
    return LoaderSpec(path=str(dataset), split="train", family="bytes", sample_len=64, micro_batch_size=2, seed=5,
                      mixture=tuple(mixture), **kw)


def epoch_visits(spec_: LoaderSpec, lanes: int = 3) -> list[list[int]]:
    """The visits (epoch * span + virtual id) every lane packs in epoch 0, read through the real
    lane streams (PackedStream) until each has moved on to epoch 1."""
    per_lane = []
    for lane in range(lanes):
        stream = PackedStream(spec_, lane, lanes)
        seen = []
        add = stream._add
        stream._add = lambda visit: (seen.append(visit), add(visit))
        while stream.epoch == 0:
            stream.next_sample()
        per_lane.append([v for v in seen if v < stream.order.span])
    return per_lane


def realised_bytes(dataset, visits: list[int]) -> dict[str, int]:
    data = ByteDataset(dataset)
    streams = data.streams("train")
    lengths = np.concatenate([data.document_lengths(s) for s in streams])
    owner = np.concatenate([[s.content_type] * s.documents for s in streams])
    n = len(lengths)
    out = dict.fromkeys([s.content_type for s in streams], 0)
    for visit in visits:
        out[owner[visit % n]] += int(lengths[visit % n])
    return out


@pytest.mark.parametrize("weights", [(3.0, 1.0, 1.0), (1.0, 0.0, 2.5), (1.0, 1.0, 1.0)])
def test_an_epoch_realises_each_streams_weight_within_one_document(dataset, weights):
    mixture = list(zip(TYPES, weights))
    lanes = epoch_visits(spec(dataset, mixture))
    visits = [v for lane in lanes for v in lane]
    assert len(visits) == len(set(visits)), "a virtual document read twice in one epoch"
    got = realised_bytes(dataset, visits)
    data = ByteDataset(dataset)
    total = sum(s.bytes for s in data.streams("train"))
    longest = {s.content_type: int(data.document_lengths(s).max()) for s in data.streams("train")}
    for ctype, weight in mixture:
        target = total * weight / sum(weights)
        assert abs(got[ctype] - target) <= longest[ctype] + 1, (ctype, got[ctype], target)
    if weights == (1.0, 0.0, 2.5):
        assert got["math"] == 0  # weight 0: left out, explicitly


def test_a_repeated_stream_reads_every_document_and_a_subsample_changes_each_epoch(dataset):
    data = ByteDataset(dataset)
    streams = data.streams("train")
    plan = MixturePlan((("code", 4.0), ("math", 1.0), ("prose", 1.0)), streams,
                       [data.document_lengths(s) for s in streams], seed=5)
    n = plan.num_documents
    code = set(range(streams[0].documents))
    e0, e1 = plan.epoch(0), plan.epoch(1)
    # code: 4/6 of 3 streams' bytes ~ 2x its own -> every document at least twice (copies 0 and 1)
    for copy in (0, 1):
        assert {int(v) % n for v in e0 if v // n == copy and v % n in code} == code
    subsample = lambda ids: {int(v) % n for v in ids if int(v) % n >= streams[0].documents + streams[1].documents}
    assert subsample(e0) != subsample(e1)  # prose, over its share: a new subsample each epoch
    assert len(e0) == len(set(e0.tolist()))


def test_resume_under_a_mixture_is_exact_and_refuses_changed_weights(dataset):
    mixture = [("code", 2.0), ("math", 1.0), ("prose", 1.0)]
    straight = Loader(spec(dataset, mixture), lanes=2)
    want = [next(straight)["tokens"].clone() for _ in range(12)]
    first = Loader(spec(dataset, mixture), lanes=2)
    got = [next(first)["tokens"].clone() for _ in range(5)]
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint carries it: lists, not tuples
    again = Loader(spec(dataset, mixture), lanes=2)
    again.load_state_dict(state)
    got += [next(again)["tokens"].clone() for _ in range(7)]
    assert all((a == b).all() for a, b in zip(want, got))

    changed = Loader(spec(dataset, [("code", 1.0), ("math", 1.0), ("prose", 1.0)]), lanes=2)
    with pytest.raises(UserError, match=r"saved with data.mixture .*'code', 2.0.*the weights decide"):
        changed.load_state_dict(state)
    unweighted = Loader(spec(dataset, []), lanes=2)
    with pytest.raises(UserError, match=r"data.mixture"):
        unweighted.load_state_dict(state)


def test_no_mixture_keeps_the_unweighted_order(dataset):
    """Without data.mixture the loader's order is the one runs had before mixtures existed."""
    lanes = epoch_visits(spec(dataset, []))
    visits = sorted(v for lane in lanes for v in lane)
    assert visits == list(range(sum(s.documents for s in ByteDataset(dataset).streams("train"))))


@pytest.mark.parametrize("mixture, message", [
    ([("code", 1.0), ("prose", 1.0)], r"content types \['math'\] of the dataset are not listed"),
    ([("code", 1.0), ("math", 1.0), ("prose", 1.0), ("poetry", 1.0)], r"\['poetry'\] are not in the dataset"),
    ([("code", 1.0), ("code", 1.0), ("math", 1.0), ("prose", 1.0)], r"listed twice"),
])
def test_a_bad_mixture_is_refused_with_the_reason(dataset, mixture, message):
    with pytest.raises(UserError, match=message):
        PackedStream(spec(dataset, mixture), 0, 1)


def test_a_dataset_without_lengths_is_refused_until_verify_stamps_them(dataset, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    for path in dataset.rglob("*"):
        if path.is_file() and path.name != "lengths.npy":
            target = old / path.relative_to(dataset)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    manifest = json.loads((old / "dataset.json").read_text())
    for stats in manifest["splits"]["train"].values():
        stats.pop("lengths_sha256")
    (old / "dataset.json").write_text(json.dumps(manifest))
    mixture = [("code", 1.0), ("math", 1.0), ("prose", 1.0)]
    with pytest.raises(UserError, match=rf"no document lengths .* run `blt-dist verify {old} --stamp`"):
        PackedStream(spec(old, mixture), 0, 1)
    Loader(spec(old, []))  # an unweighted run does not need them
    done = run_cli("verify", str(old), "--stamp")
    assert done.returncode == 0 and "document lengths" in done.stdout, done
    assert mixture_plan(spec(old, mixture), open_dataset(spec(old, mixture))).shares


def test_dry_run_prints_each_streams_bytes_and_repeats(dataset):
    done = run_cli("train", "configs/entropy/tiny.yaml", f"data.train={dataset}",
                   "data.mixture=[{content_type: code, weight: 2}, {content_type: math, weight: 0}, "
                   "{content_type: prose, weight: 1}]", "--dry-run")
    assert done.returncode == 0, done.stderr
    lines = {line.split(":")[0].strip("# "): line for line in done.stdout.splitlines() if line.startswith("#   ")}
    assert set(lines) == set(TYPES)
    assert "left out" in lines["math"] and "per epoch" in lines["code"]
    repeats = float(lines["code"].split("(")[1].split("x")[0])
    data = ByteDataset(dataset)
    total = sum(s.bytes for s in data.streams("train"))
    code = next(s for s in data.streams("train") if s.content_type == "code")
    assert repeats == pytest.approx(total * 2 / 3 / code.bytes, rel=1e-2)


def test_the_mixture_belongs_to_the_training_split_only(dataset):
    cfg = load_config("configs/entropy/tiny.yaml", [f"data.train={dataset}", f"data.val={dataset}",
                                                     "data.mixture=[{content_type: code, weight: 1}]"])
    assert LoaderSpec.from_config(cfg, "entropy", "train").mixture == (("code", 1.0),)
    assert LoaderSpec.from_config(cfg, "entropy", "val").mixture == ()  # validation reads every document
