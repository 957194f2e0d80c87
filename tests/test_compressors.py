"""Compressor reference rows, checked against the compressors called by hand."""
from __future__ import annotations

import bz2
import gzip
import lzma

import pytest

from blt_dist.evaluation.compressors import COMPRESSORS, bits_per_byte, compressor_bpb

PROSE = [b"the cat sat on the mat. " * 30, b"a dog barked at the cat, then slept. " * 20]
CODE = [b"def f(x):\n    return x * 2\n" * 25, b"\xff\x00 not utf-8 \x80"]


def documents():
    return [("prose", f"p{i}", d) for i, d in enumerate(PROSE)] + [("code", f"c{i}", d) for i, d in enumerate(CODE)]


def test_bits_per_byte_is_compressed_size_by_hand():
    data = b"".join(PROSE)
    assert bits_per_byte("gzip -9", data) == len(gzip.compress(data, 9, mtime=0)) * 8 / len(data)
    assert bits_per_byte("bz2 -9", data) == len(bz2.compress(data, 9)) * 8 / len(data)
    assert bits_per_byte("xz -9e", data) == len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)) * 8 / len(data)
    # the header clock does not change the size
    assert len(gzip.compress(data, 9)) == len(gzip.compress(data, 9, mtime=0))


def test_one_stream_per_content_type_and_the_overall_row():
    rows = compressor_bpb(documents())
    assert set(rows) == set(COMPRESSORS)
    prose, code = b"".join(PROSE), b"".join(CODE)
    for name, row in rows.items():
        by_type = row["by_content_type"]
        assert list(by_type) == ["code", "prose"]
        assert by_type["prose"]["bpb"] == pytest.approx(bits_per_byte(name, prose))
        assert by_type["code"]["bpb"] == pytest.approx(bits_per_byte(name, code))
        compressed = len(COMPRESSORS[name](prose)) + len(COMPRESSORS[name](code))
        assert row["bpb"] == pytest.approx(8 * compressed / (len(prose) + len(code)))
    assert rows["gzip -9"]["by_content_type"]["prose"]["bpb"] == len(gzip.compress(prose, 9)) * 8 / len(prose)


def test_empty_stream():
    with pytest.raises(ValueError):
        bits_per_byte("gzip -9", b"")
    assert compressor_bpb([("prose", "e", b"")])["xz -9e"]["by_content_type"]["prose"]["bpb"] is None
