"""Shard integrity: whole-file hashes, checked once per node.

A shard's index records its xxh3_64 and sha256 (mosaicml-streaming's `hashes`). `verify_shard`
checks the xxh3_64 (2 ms per 64 MB) before a shard's first sample is used, unless a stamp under
$BLT_DIST_CACHE (default ~/.cache/blt-dist) says this node already did for the same file: the
stamp is keyed by the dataset fingerprint, the file's size and mtime and the expected hash, so a
file that changed since is hashed again. Local datasets (shards.py) and the node cache of remote
ones (remote.py) both check here.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from blt_dist.errors import UserError

READ_HASH = "xxh3_64"  # what every reader checks; sha256 is for `blt-dist verify` and other tools


def file_digest(path: Path, algo: str) -> str:
    """Hex digest of a whole file, as mosaicml-streaming's get_hash gives it for the same bytes."""
    import xxhash  # lazy: a dependency of mosaicml-streaming, only shard checks need it

    digest = getattr(xxhash, algo)() if algo.startswith("xxh") else hashlib.new(algo)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def cache_root() -> Path:
    """$BLT_DIST_CACHE, default ~/.cache/blt-dist: this node's stamps and remote datasets' shards."""
    return Path(os.environ.get("BLT_DIST_CACHE") or Path.home() / ".cache" / "blt-dist")


def stamp_root() -> Path:
    return cache_root() / "verified"


def _stamp(path: Path, fingerprint: str, algo: str, expected: str) -> tuple[Path, str]:
    """Where this node's stamp for a shard file lives, and what it holds while the file is the one
    that was checked (size, mtime, the expected hash)."""
    stat = path.stat()
    name = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
    return stamp_root() / fingerprint / name, f"{stat.st_size} {stat.st_mtime_ns} {algo}:{expected}\n"


def write_stamp(path: Path, fingerprint: str, expected: str, algo: str = READ_HASH) -> None:
    """Records that `path` (now, at its size and mtime) was checked against `expected`."""
    stamp, key = _stamp(path, fingerprint, algo, expected)
    try:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        tmp = stamp.with_name(f".{stamp.name}.{os.getpid()}")
        tmp.write_text(key)
        os.replace(tmp, stamp)
    except OSError:
        pass  # a read-only home: every open re-hashes, nothing is trusted without a check


def verify_shard(stream_dir: Path, info: dict, fingerprint: str | None, where: str, algo: str = READ_HASH) -> None:
    """Checks one shard file (`info`: its index entry's raw_data) against the hash its index
    records, unless this node already did for the same file (a stamp keyed by the dataset
    fingerprint, the file's size and mtime and the expected hash). Raises UserError naming the
    dataset and stream (`where`), the shard and both hashes."""
    path = stream_dir / info["basename"]
    expected = (info.get("hashes") or {}).get(algo)
    if expected is None:
        raise UserError(f"{where}: shard {info['basename']} has no {algo} in its index (written before shard "
                        "hashes; `blt-dist verify DATASET --stamp` adds them)")
    if fingerprint is not None:
        stamp, key = _stamp(path, fingerprint, algo, expected)
        try:
            if stamp.read_text() == key:
                return
        except OSError:
            pass
    actual = file_digest(path, algo)
    if actual != expected:
        raise UserError(f"{where}: shard {info['basename']} ({path}) is corrupt: {algo} {actual}, its index says "
                        f"{expected}; re-copy or re-prepare the dataset")
    if fingerprint is not None:
        write_stamp(path, fingerprint, expected, algo)
