"""Classical compressors as reference rows: bits per byte with no training at all.

    rows = compressor_bpb(documents)   # {"xz -9e": {"bpb": ..., "by_content_type": {...}}, ...}

gzip -9, bz2 -9 and xz -9e (lzma preset 9 | PRESET_EXTREME), from Python's standard library,
on the same held-out bytes the models are scored on. bpb = 8 x compressed bytes / raw bytes.

One stream per content type: the documents of a type are concatenated, in the scored order,
and compressed once. That is how one would measure a compressor on a corpus, and it is the
compressor's best case: it sees earlier documents as context and pays its header once, while a
model scores each document from its BOS alone. A model that beats these rows beats the
compressor on its own ground. (Compressing each document alone is closer to what a model does
but charges every short document a 20-60 byte header, which says more about container formats
than about text.) The overall row sums the compressed sizes of the per-type streams over the
total raw bytes, so it is never a compression of the whole mixture.
"""
from __future__ import annotations

import bz2
import gzip
import lzma
from collections import defaultdict
from typing import Callable, Iterable

COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    # mtime=0: the gzip header then holds no clock, so the size (and the cache) is reproducible
    "gzip -9": lambda data: gzip.compress(data, compresslevel=9, mtime=0),
    "bz2 -9": lambda data: bz2.compress(data, compresslevel=9),
    "xz -9e": lambda data: lzma.compress(data, preset=9 | lzma.PRESET_EXTREME),
}


def bits_per_byte(name: str, data: bytes) -> float:
    """8 x compressed size / raw size of one stream."""
    if not data:
        raise ValueError("bits per byte of an empty stream is undefined")
    return 8.0 * len(COMPRESSORS[name](data)) / len(data)


def compressor_bpb(documents: Iterable[tuple[str, str, bytes]], names: Iterable[str] = tuple(COMPRESSORS)) -> dict:
    """Per compressor: bpb per content type (one stream each) and overall."""
    streams: dict[str, list[bytes]] = defaultdict(list)
    for content_type, _source, data in documents:
        streams[content_type].append(data)
    joined = {ctype: b"".join(parts) for ctype, parts in sorted(streams.items())}
    total = sum(len(data) for data in joined.values())
    rows = {}
    for name in names:
        by_type, compressed = {}, 0
        for ctype, data in joined.items():
            size = len(COMPRESSORS[name](data)) if data else 0
            compressed += size
            by_type[ctype] = {"bytes": len(data), "compressed_bytes": size,
                              "bpb": 8.0 * size / len(data) if data else None}
        rows[name] = {"family": name, "bpb": 8.0 * compressed / total if total else None, "bytes": total,
                      "compressed_bytes": compressed, "by_content_type": by_type}
    return rows
