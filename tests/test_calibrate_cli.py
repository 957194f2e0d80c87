"""`blt-dist calibrate` on an entropy dataset: the printed threshold reproduces the printed mean."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from blt_dist.data import calibrate
from blt_dist.data.loader import ENTROPY_FORMAT
from blt_dist.data.patching import patch_starts
from blt_dist.data.shards import ByteDataset, iter_stream
from blt_dist.errors import UserError
from blt_dist.vocab import OFFSET, encode_document
from tests.conftest import random_entropy_dataset


@pytest.fixture(scope="module")
def entropy_dataset(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model; the cores are shared
    root = tmp_path_factory.mktemp("calibrate_cli")
    rng = np.random.default_rng(0)
    words = ["the", "byte", "latent", "transformer", "reads", "patches", "of", "bytes", "{x: 1}", "\u00e9t\u00e9"]
    texts = {ctype: [" ".join(rng.choice(words, rng.integers(5, 60))) for _ in range(n)]
             for ctype, n in (("prose", 30), ("code", 12))}
    texts["code"] = [t.upper() for t in texts["code"]]
    random_entropy_dataset(root, texts)
    yield root / "ent"
    torch.set_num_threads(threads)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="blt-dist calibrate")
    calibrate.add_arguments(parser)
    return parser.parse_args(list(argv))


def all_documents(path):
    dataset = ByteDataset(path, format=ENTROPY_FORMAT)
    return [(s.content_type, sample) for s in dataset.streams("train") for sample in iter_stream(s.path)]


def mean_patch_size(documents, **rule) -> tuple[float, dict[str, float]]:
    """Bytes per patch holding a byte, recomputed from the stored float16 entropies."""
    totals: dict[str, list[int]] = {}
    for ctype, sample in documents:
        ids = encode_document(sample["data"])
        edges = np.append(np.flatnonzero(patch_starts(ids, sample["entropies"], **rule)), ids.size)
        real = np.add.reduceat((ids >= OFFSET).astype(np.int64), edges[:-1])
        t = totals.setdefault(ctype, [0, 0])
        t[0] += int(real.sum())
        t[1] += int((real > 0).sum())
    n_bytes, n_patches = (sum(t[i] for t in totals.values()) for i in (0, 1))
    return n_bytes / n_patches, {c: b / p for c, (b, p) in totals.items()}


@pytest.mark.parametrize("mode, target", [("entropy", 4.5), ("monotonic", 3.0)])
def test_threshold_reproduces_the_reported_mean(entropy_dataset, capsys, mode, target):
    assert calibrate.run(parse("--data", str(entropy_dataset), "--target", str(target), "--mode", mode, "--json")) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sample"]["documents"] == 42  # the whole (small) dataset
    assert abs(report["mean_patch_size"] - target) <= 0.05 * target
    key = "threshold" if mode == "entropy" else "threshold_r"
    assert report["config_key"] == f"data.patching.{key}"
    assert f"data.patching.{key}={report['threshold']!r}" in report["overrides"]
    mean, per_type = mean_patch_size(all_documents(entropy_dataset), mode=mode, max_patch_length=16, **{key: report["threshold"]})
    assert mean == pytest.approx(report["mean_patch_size"], rel=1e-12)
    for ctype, stats in report["per_content_type"].items():
        assert per_type[ctype] == pytest.approx(stats["mean_patch_size"], rel=1e-12)
    histogram = {int(k): v for k, v in report["histogram"].items()}
    assert sum(k * v for k, v in histogram.items()) / sum(histogram.values()) == pytest.approx(mean)


def test_text_report(entropy_dataset, capsys):
    assert calibrate.run(parse("--data", str(entropy_dataset), "--target", "4.5")) == 0
    out = capsys.readouterr().out
    assert "data.patching.threshold=" in out and "bytes/patch" in out and "code" in out and "prose" in out
    assert out.strip().splitlines()[-1].startswith("use: data.patching.threshold=")


def test_sample_is_deterministic_and_proportional(entropy_dataset):
    _, docs = calibrate.sample_documents(entropy_dataset, sample_bytes=2000, seed=3)
    _, again = calibrate.sample_documents(entropy_dataset, sample_bytes=2000, seed=3)
    assert [d[1].tobytes() for d in docs] == [d[1].tobytes() for d in again]
    sampled = {c: sum(ids.size - 2 for t, ids, _ in docs if t == c) for c in ("prose", "code")}
    stats = {s.content_type: s.bytes for s in ByteDataset(entropy_dataset, format=ENTROPY_FORMAT).streams("train")}
    total = sum(stats.values())
    for ctype, nbytes in sampled.items():
        share = 2000 * stats[ctype] / total
        assert share <= nbytes < share + 400  # stops at the first document past its share
    for _, ids, H in docs:
        assert H.dtype == np.float16 and H.shape == ids.shape


def test_errors(entropy_dataset, tmp_path):
    with pytest.raises(UserError, match="reachable mean patch size"):
        calibrate.run(parse("--data", str(entropy_dataset), "--target", "40"))
    with pytest.raises(UserError, match="byte-shards/v1', expected 'blt-dist/entropy-shards/v1'"):
        calibrate.run(parse("--data", str(entropy_dataset.parent / "bytes"), "--target", "4.5"))
    with pytest.raises(UserError, match="sample-bytes"):
        calibrate.run(parse("--data", str(entropy_dataset), "--sample-bytes", "0"))
