"""`blt-dist prepare`: exact bytes through MDS shards, deterministic split, fingerprint, bad input."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from blt_dist.data.prepare import prepare, split_of
from blt_dist.data.shards import ByteDataset, iter_stream
from blt_dist.errors import UserError
from tests.conftest import run_cli

ADVERSARIAL = [
    b"",
    b"\x00",
    b"plain ascii\n",
    b"\xff\xfe\xfd invalid utf-8 \x80\xbf",
    "emoji 😀 and accents é ü 漢字 العربية".encode(),
    b"\xf0\x9f\x98",  # truncated 4-byte sequence
    b"crlf\r\nline\rcr",
    bytes(range(256)) * 3,
    b"\n\n\n",
    b"x" * 100_000,
]


def make_inputs(root: Path, documents: list[bytes]) -> Path:
    """One .txt file per document under root/mixed, plus a JSONL under root/json."""
    (root / "mixed").mkdir(parents=True)
    for i, data in enumerate(documents):
        (root / "mixed" / f"doc{i:03d}.txt").write_bytes(data)
    (root / "json").mkdir()
    lines = [json.dumps({"text": data.decode("utf-8", "surrogateescape"), "meta": i}) for i, data in enumerate(documents)]
    (root / "json" / "docs.jsonl").write_text("\n".join(lines) + "\n")
    return root


def read_all(dataset: Path) -> dict[str, list[bytes]]:
    ds = ByteDataset(dataset)
    out: dict[str, list[bytes]] = {}
    for split in ("train", "val"):
        for ctype, sample in ds.documents(split):
            out.setdefault(ctype, []).append(sample["data"])
    return out


def test_adversarial_bytes_round_trip_exactly(tmp_path):
    inputs = make_inputs(tmp_path / "in", ADVERSARIAL)
    manifest = prepare([inputs], tmp_path / "ds", val_fraction=0.0, progress=False)
    got = read_all(tmp_path / "ds")
    assert got["mixed"] == ADVERSARIAL  # files are read in sorted order: doc000, doc001, ...
    assert got["json"] == ADVERSARIAL
    stats = manifest["splits"]["train"]
    assert stats["mixed"]["documents"] == len(ADVERSARIAL)
    assert stats["mixed"]["bytes"] == sum(map(len, ADVERSARIAL))


def test_split_is_deterministic_and_complete(tmp_path):
    documents = [f"document number {i}\n".encode() * (i % 7 + 1) for i in range(300)]
    inputs = make_inputs(tmp_path / "in", documents)
    a = prepare([inputs], tmp_path / "a", val_fraction=0.2, progress=False)
    b = prepare([inputs], tmp_path / "b", val_fraction=0.2, progress=False)
    assert a["fingerprint"] == b["fingerprint"]
    for path in sorted((tmp_path / "a").rglob("*")):
        if path.is_file():
            assert path.read_bytes() == (tmp_path / "b" / path.relative_to(tmp_path / "a")).read_bytes(), path
    ds = ByteDataset(tmp_path / "a")
    train = [s["data"] for c, s in ds.documents("train") if c == "mixed"]
    val = [s["data"] for c, s in ds.documents("val") if c == "mixed"]
    assert sorted(train + val) == sorted(documents)  # nothing lost, nothing repeated
    assert 30 < len(val) < 90  # ~20% of 300
    assert all(split_of(d, 0.2, 0) == "val" for d in val)
    c = prepare([inputs], tmp_path / "c", val_fraction=0.2, split_seed=1, progress=False)
    assert c["fingerprint"] != a["fingerprint"]  # another seed, another split


def test_sample_fraction_keeps_a_recorded_deterministic_slice_of_every_content_type(tmp_path):
    documents = [f"sampled document {i}\n".encode() * (i % 5 + 1) for i in range(400)]
    inputs = make_inputs(tmp_path / "in", documents)
    prepare([inputs], tmp_path / "full", progress=False)
    full = read_all(tmp_path / "full")
    kept = prepare([inputs], tmp_path / "half", sample_fraction=0.5, progress=False)
    again = prepare([inputs], tmp_path / "again", sample_fraction=0.5, progress=False)
    assert kept["fingerprint"] == again["fingerprint"]
    half = read_all(tmp_path / "half")
    for ctype in ("mixed", "json"):  # every content type, in proportion
        assert set(half[ctype]) <= set(full[ctype]) and 150 < len(half[ctype]) < 250
    assert half["mixed"] == half["json"]  # a pure function of the document's bytes
    left = kept["sample"]
    assert left["fraction"] == 0.5
    assert left["left_out_documents"] + sum(map(len, half.values())) == 2 * len(documents)
    assert left["left_out_bytes"] + sum(map(len, (d for v in half.values() for d in v))) == 2 * sum(map(len, documents))
    with pytest.raises(UserError, match="--sample-fraction must be in"):
        prepare([inputs], tmp_path / "none", sample_fraction=0.0, progress=False)


def test_fingerprint_changes_with_one_byte(tmp_path):
    make_inputs(tmp_path / "in1", [b"abc", b"def"])
    make_inputs(tmp_path / "in2", [b"abc", b"deg"])
    f1 = prepare([tmp_path / "in1"], tmp_path / "o1", val_fraction=0.0, progress=False)["fingerprint"]
    f2 = prepare([tmp_path / "in2"], tmp_path / "o2", val_fraction=0.0, progress=False)["fingerprint"]
    assert f1 != f2
    assert ByteDataset(tmp_path / "o1").fingerprint == f1


def test_small_shards_and_content_type_override(tmp_path):
    inputs = make_inputs(tmp_path / "in", [bytes([i % 256]) * 5000 for i in range(40)])
    manifest = prepare([inputs], tmp_path / "ds", val_fraction=0.0, shard_size="16kb", content_type="all", progress=False)
    stats = manifest["splits"]["train"]["all"]
    assert stats["documents"] == 80 and stats["shards"] > 5
    assert [s["doc"] for s in iter_stream(tmp_path / "ds" / "train" / "all")] == list(range(80))


# --------------------------------------------------------------------------- bad input


def test_missing_input(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        prepare([tmp_path / "nope"], tmp_path / "ds", progress=False)


def test_unreadable_file_is_named(tmp_path, monkeypatch):
    inputs = make_inputs(tmp_path / "in", [b"a", b"b"])
    bad = inputs / "mixed" / "doc001.txt"
    real_read = Path.read_bytes

    def read_bytes(self):
        if self == bad:
            raise PermissionError(13, "Permission denied")
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(UserError, match=r"doc001\.txt: cannot read \(Permission denied\)"):
        prepare([inputs], tmp_path / "ds", progress=False)
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"text": "ok"', "malformed JSON"),
        ('["not", "an", "object"]', "JSON object"),
        ('{"body": "no text field"}', "JSON object"),
        ('{"text": 42}', "expected a string"),
        ('{"text": "lone \\ud800 surrogate"}', "lone surrogate"),
    ],
)
def test_bad_jsonl_line_names_file_and_line(tmp_path, line, message):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text('{"text": "fine"}\n\n' + line + "\n")
    with pytest.raises(UserError) as info:
        prepare([tmp_path / "in"], tmp_path / "ds", progress=False)
    assert "a.jsonl:3:" in str(info.value) and message in str(info.value)
    # nothing half-written left behind, and nothing that looks complete
    assert not (tmp_path / "ds").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["in"]


def test_output_dir_with_other_data_is_refused(tmp_path):
    inputs = make_inputs(tmp_path / "in", [b"a"])
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "thesis.tex").write_text("precious")
    with pytest.raises(UserError, match="holds other data"):
        prepare([inputs], tmp_path / "busy", progress=False, force=True)
    assert (tmp_path / "busy" / "thesis.tex").read_text() == "precious"


def test_existing_dataset_needs_force(tmp_path):
    inputs = make_inputs(tmp_path / "in", [b"a"])
    prepare([inputs], tmp_path / "ds", val_fraction=0.0, progress=False)
    with pytest.raises(UserError, match="--force"):
        prepare([inputs], tmp_path / "ds", progress=False)
    (inputs / "mixed" / "doc000.txt").write_bytes(b"b")
    new = prepare([inputs], tmp_path / "ds", val_fraction=0.0, progress=False, force=True)
    assert ByteDataset(tmp_path / "ds").fingerprint == new["fingerprint"]
    assert read_all(tmp_path / "ds")["mixed"] == [b"b"]


def test_truncated_shard_is_named(tmp_path):
    inputs = make_inputs(tmp_path / "in", [b"hello world" * 100])
    prepare([inputs], tmp_path / "ds", val_fraction=0.0, progress=False)
    shard = tmp_path / "ds" / "train" / "mixed" / "shard.00000.mds"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(UserError, match=r"mixed/shard\.00000\.mds: shard is \d+ bytes, index says \d+"):
        ByteDataset(tmp_path / "ds")


def test_missing_index_is_named(tmp_path):
    inputs = make_inputs(tmp_path / "in", [b"hello world"])
    prepare([inputs], tmp_path / "ds", val_fraction=0.0, progress=False)
    os.remove(tmp_path / "ds" / "train" / "json" / "index.json")
    with pytest.raises(UserError, match=r"train/json: shard directory without index\.json"):
        ByteDataset(tmp_path / "ds")
    with pytest.raises(UserError, match="not a blt-dist byte dataset"):
        ByteDataset(tmp_path / "in")


def test_cli_summary_and_help(tmp_path):
    inputs = make_inputs(tmp_path / "in", ADVERSARIAL[:4])
    result = run_cli("prepare", str(inputs), "--out", str(tmp_path / "ds"), "--val-fraction", "0", "--no-progress")
    assert result.returncode == 0, result.stderr
    total = 2 * sum(map(len, ADVERSARIAL[:4]))
    assert f"{total:,} bytes in == {total:,} bytes out" in result.stdout
    assert "mixed" in result.stdout and "json" in result.stdout
    bad = run_cli("prepare", str(tmp_path / "missing"), "--out", str(tmp_path / "x"))
    assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0 and "missing" in bad.stderr
    assert run_cli("prepare", "--help").returncode == 0
