"""Verified shards (data/shards.py, data/verify.py): the manifest vouches for each index, each
index for its shards; a changed byte anywhere is refused before it is used, naming the shard."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from blt_dist.data import integrity
from blt_dist.data.shards import ByteDataset, SplitReader
from blt_dist.errors import UserError
from tests.conftest import run_cli, word_dataset
from tests.distributed import launch, logs, metrics, wait

WORDS = "verified shards carry hashes so that a flipped byte never trains silently".split()


@pytest.fixture()
def dataset(tmp_path) -> Path:
    return word_dataset(tmp_path, WORDS, per_type=40)


def first_shard(ds: Path) -> Path:
    return sorted((ds / "train" / "prose").glob("shard.*.mds"))[0]


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_flipped_byte_anywhere_in_a_shard_is_refused_naming_it(dataset):
    shard = first_shard(dataset)
    SplitReader(ByteDataset(dataset), "train")  # clean: opens (and stamps)
    for offset in (0, shard.stat().st_size // 2, shard.stat().st_size - 1):
        flip_byte(shard, offset)
        with pytest.raises(UserError, match=r"stream train/prose: shard shard\.00000\.mds .* is corrupt: xxh3_64 "
                                             r"[0-9a-f]+, its index says [0-9a-f]+"):
            SplitReader(ByteDataset(dataset), "train")
        flip_byte(shard, offset)  # restored: the stamp of the clean file still matches nothing stale
    SplitReader(ByteDataset(dataset), "train")


def test_each_node_hashes_a_shard_once(dataset, monkeypatch):
    calls = []
    real = integrity.file_digest
    monkeypatch.setattr(integrity, "file_digest", lambda path, algo: calls.append(path) or real(path, algo))
    SplitReader(ByteDataset(dataset), "train")
    first = len(calls)
    assert first == sum(s.shards for s in ByteDataset(dataset).streams("train"))
    SplitReader(ByteDataset(dataset), "train")  # other ranks, workers, runs: the stamps
    assert len(calls) == first
    shard = first_shard(dataset)
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 1))  # touched: hashed again
    SplitReader(ByteDataset(dataset), "train")
    assert len(calls) == first + 1


def test_an_edited_index_is_refused_by_the_manifest(dataset):
    index = dataset / "train" / "prose" / "index.json"
    index.write_text(index.read_text().replace('"version": 2', '"version":  2'))
    with pytest.raises(UserError, match=r"prose/index\.json: sha256 [0-9a-f]+, the manifest says [0-9a-f]+"):
        ByteDataset(dataset)


def unhash(ds: Path) -> None:
    """What a dataset written before verified shards looks like."""
    manifest = json.loads((ds / "dataset.json").read_text())
    for split, types in manifest["splits"].items():
        for ctype, stats in types.items():
            stats.pop("index_sha256")
            stats.pop("lengths_sha256")
            (ds / split / ctype / "lengths.npy").unlink()
            index_path = ds / split / ctype / "index.json"
            index = json.loads(index_path.read_text())
            for shard in index["shards"]:
                shard["raw_data"]["hashes"] = {}  # as MDSWriter writes it without hashes=
            index_path.write_text(json.dumps(index))
    (ds / "dataset.json").write_text(json.dumps(manifest))


def test_an_old_dataset_is_refused_until_verify_stamps_it(dataset):
    unhash(dataset)
    with pytest.raises(UserError, match=rf"run `blt-dist verify {dataset} --stamp`"):
        ByteDataset(dataset)
    done = run_cli("verify", str(dataset), "--stamp")
    assert done.returncode == 0 and "added after the documents matched the manifest" in done.stdout, done
    assert "shard hashes" in done.stdout and "document lengths" in done.stdout
    SplitReader(ByteDataset(dataset), "train")
    for stream in ByteDataset(dataset).streams():  # the lengths a mixture needs, as the documents have them
        assert ByteDataset(dataset).document_lengths(stream).sum() == stream.bytes
    ok = run_cli("verify", str(dataset))
    assert ok.returncode == 0 and "ok (" in ok.stdout


def test_stamp_refuses_documents_that_are_not_the_manifests(dataset):
    unhash(dataset)
    flip_byte(first_shard(dataset), first_shard(dataset).stat().st_size // 2)
    done = run_cli("verify", str(dataset), "--stamp")
    assert done.returncode != 0 and "the manifest says" in done.stderr
    assert "index_sha256" not in (dataset / "dataset.json").read_text()  # nothing vouched for
    assert "lengths_sha256" not in (dataset / "dataset.json").read_text()


def test_verify_finds_a_corrupt_shard_by_sha256(dataset):
    flip_byte(first_shard(dataset), 10)
    done = run_cli("verify", str(dataset))
    assert done.returncode != 0 and "is corrupt: sha256" in done.stderr, done.stderr


def test_training_on_a_corrupt_shard_stops_before_the_first_step(dataset, tmp_path):
    flip_byte(first_shard(dataset), first_shard(dataset).stat().st_size // 3)
    run_dir = tmp_path / "run"
    args = ["train", "configs/entropy/tiny.yaml", f"data.train={dataset}", f"data.val={dataset}", "data.seq_len=64",
            "train.micro_batch_size=2", "train.max_steps=2", f"run.dir={run_dir}"]
    codes = wait(launch(2, args, tmp_path / "logs"), tmp_path / "logs")
    text = logs(tmp_path / "logs")
    assert codes == [1, 1], text  # every rank stops, none hangs
    assert "shard shard.00000.mds" in text and "is corrupt" in text
    assert not [r for r in metrics(run_dir) if "loss" in r]
