"""`blt-dist corpus`: determinism, manifest completeness, held-out hygiene, and the text helpers.

The build tests use the repository's own download cache (.cache/corpus, gitignored, the same
default the CLI uses) rather than a temporary one: the small recipe downloads ~22 MB of Debian
packages once, after which every test run and every `blt-dist corpus` reuses them. Set
BLT_CORPUS_CACHE to use another directory.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from pathlib import Path

import pytest

from blt_dist.corpus import build, fetch, rdata, sources
from blt_dist.corpus.split import Doc, remove_shared_lines, split_heldout
from blt_dist.corpus.text import decode, is_language, keep_language, normalise, split_large
from blt_dist.errors import UserError

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("BLT_CORPUS_CACHE", REPO / ".cache" / "corpus"))


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _lines(text: str) -> set[str]:
    return {line.strip() for line in text.split("\n")} - {""}


def _docs(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="session")
def small_builds(tmp_path_factory):
    if fetch.apt_available() is not None:
        pytest.skip("apt-get/dpkg-deb not available: the small recipe needs Debian packages")
    root = tmp_path_factory.mktemp("corpus")
    first = build.build(root / "a", CACHE, "small")
    second = build.build(root / "b", CACHE, "small")
    return root / "a", root / "b", first, second


def test_small_recipe_is_byte_identical_across_builds(small_builds):
    a, b, _, _ = small_builds
    tree_a, tree_b = _tree(a), _tree(b)
    assert tree_a.keys() == tree_b.keys()
    assert [k for k in tree_a if tree_a[k] != tree_b[k]] == []
    # Published by rename: no temporary or old directories left beside the output.
    assert sorted(p.name for p in a.parent.iterdir()) == ["a", "b"]


def test_manifest_lists_every_file_with_provenance(small_builds):
    out, _, manifest, _ = small_builds
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*.jsonl")}
    listed = {f["path"] for f in manifest["files"]}
    assert on_disk == listed
    assert manifest["recipe"] == "small" and "recipe small" in manifest["note"]
    assert set(manifest["totals"]) == set(sources.CONTENT_TYPES)
    for entry in manifest["files"]:
        path = out / entry["path"]
        assert entry["split"] == path.parts[-3] and entry["content_type"] == path.parts[-2]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
        docs = _docs(path)
        assert entry["documents"] == len(docs) > 0
        assert entry["bytes"] == sum(len(d["text"].encode()) for d in docs)
        assert entry["licence"] and entry["packages"]
        assert all(p["name"] and p["version"] and p["archive"].endswith(".deb") for p in entry["packages"])
        if entry["content_type"] == "multilingual":
            assert entry["languages"] and entry["scripts"]
        for d in docs:
            assert set(d) == {"text", "source"} and d["text"].strip()
            assert "\r" not in d["text"] and len(d["text"].encode()) <= 64 * 1024
    for content_type, splits in manifest["totals"].items():
        for split, total in splits.items():
            entries = [f for f in manifest["files"] if f["content_type"] == content_type and f["split"] == split]
            assert total["bytes"] == sum(f["bytes"] for f in entries)
            assert total["documents"] == sum(f["documents"] for f in entries)
        assert splits["heldout"]["bytes"] >= 32 * 1024  # the small recipe's held-out minimum


def test_heldout_shares_no_line_with_training(small_builds):
    out, _, _, _ = small_builds
    for content_type in sources.NATURAL_LANGUAGE:
        train = set().union(*(_lines(d["text"]) for p in (out / "train" / content_type).glob("*.jsonl") for d in _docs(p)))
        heldout = set().union(*(_lines(d["text"]) for p in (out / "heldout" / content_type).glob("*.jsonl")
                                for d in _docs(p)))
        assert heldout, content_type
        assert train & heldout == set(), content_type
    # No document is in both splits, whatever its type.
    ids = [d["source"] for p in out.rglob("*.jsonl") for d in _docs(p)]
    assert len(ids) == len(set(ids))


def test_refuses_to_overwrite_foreign_directory(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a previous"):
        build._check_out(foreign, force=False)
    build._check_out(foreign, force=True)  # --force accepts it
    (foreign / "notes.txt").unlink()
    (foreign / "manifest.json").write_text(json.dumps({"generator": build.GENERATOR}))
    build._check_out(foreign, force=False)  # a previous build is replaced without --force


def test_falls_back_to_pip_recipe_without_apt(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fetch, "apt_available", lambda: "`apt-get` is not on PATH")
    manifest = build.build(tmp_path / "out", CACHE, "small")
    assert manifest["recipe"] == "pip"
    assert "apt was unavailable" in manifest["note"]
    assert "falling back" in capsys.readouterr().err
    assert {"code", "structured", "technical", "multilingual"} <= set(manifest["totals"])


# ---------------------------------------------------------------- helpers, no packages needed

def test_split_large_cuts_at_paragraphs_within_limit():
    paragraphs = [f"paragraph {i} " + " ".join(["word"] * 50) for i in range(200)]
    text = "\n\n".join(paragraphs) + "\n"
    parts = split_large(text, max_bytes=4096)
    assert len(parts) > 1 and all(len(p.encode()) <= 4096 for p in parts)
    assert "\n\n".join(p.strip("\n") for p in parts) == text.strip("\n")  # nothing lost, cut only between paragraphs
    giant_line = "x" * 10000
    assert all(len(p.encode()) <= 4096 for p in split_large(giant_line, max_bytes=4096))


def test_decode_normalises_and_uses_declared_fallback():
    assert decode("\ufeffa\r\nb\rc\x00\n\n\n\nd".encode()) == "a\nb\nc\n\nd\n"
    assert decode("привет".encode("koi8-r"), ("koi8-r",)) == "привет\n"
    with pytest.raises(UnicodeDecodeError):
        decode(b"\xff\xfe\xfa")
    assert normalise("   \n") == ""


def test_language_filter_drops_untranslated_english():
    assert is_language("Das ist nicht der Fall, und es ist gut.", "de")
    assert not is_language("This is not the case, and it is fine.", "de")
    assert keep_language("यह हिन्दी है\n\nThis paragraph was never translated.", "hi") == "यह हिन्दी है\n"


def test_heldout_dedup_removes_shared_lines_and_grows_to_target():
    boiler = "Translated by the team; report bugs to the list."
    docs = [Doc("s", f"id{i}", f"{boiler}\nunique line {i} " + "x" * 100 + "\n") for i in range(100)]
    train, heldout = split_heldout(docs, min_bytes=1000, share=0.0, dedup=True)
    assert sum(d.nbytes for d in heldout) >= 1000
    assert not any(boiler in d.text for d in heldout)
    assert {d.source_id for d in train}.isdisjoint({d.source_id for d in heldout})
    again = split_heldout(docs, min_bytes=1000, share=0.0, dedup=True)
    assert [d.source_id for d in again[1]] == [d.source_id for d in heldout]
    assert remove_shared_lines([Doc("s", "a", "same\n")], [Doc("s", "b", "same\n")]) == []


def _xdr_strsxp(values: list[str]) -> bytes:
    body = struct.pack(">ii", 16, len(values))
    for value in values:
        raw = value.encode()
        body += struct.pack(">ii", 9 | (8 << 12), len(raw)) + raw  # CHARSXP flagged UTF-8
    return b"X\n" + struct.pack(">iii", 2, 0x40000, 0x20300) + body


def test_rdata_reads_character_vectors_from_lazyload_records(tmp_path):
    serialized = _xdr_strsxp(["EMMA", "", "Émile"])
    assert rdata.unserialize(serialized) == ["EMMA", "", "Émile"]
    record = struct.pack(">I", len(serialized)) + zlib.compress(serialized)
    assert rdata._decompress(record) == serialized


def test_dictd_offsets_are_base64_numbers():
    assert sources._dictd_number("A") == 0
    assert sources._dictd_number("BA") == 64
    assert sources._dictd_number("Bw") == 112
