"""`blt-dist verify DIR [--stamp]`: check a prepared (or entropy) dataset end to end.

    blt-dist verify data/shards            every index against the manifest, every shard's sha256
                                           and xxh3_64 against its index, every document against
                                           the manifest's per-stream sha256 (byte datasets)
    blt-dist verify data/shards --stamp    for a dataset written before shard hashes: check the
                                           documents against the manifest's sha256 first, then
                                           record the shard hashes and the indexes' digests

The readers (loader, eval, entropies) check each shard's xxh3_64 once per node before they use it
(shards.verify_shard); this command is the full check, for a copy you have just made or doubt.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from blt_dist.data.shards import (
    FORMAT,
    INDEX,
    MANIFEST,
    SHARD_HASHES,
    ByteDataset,
    StreamHash,
    file_digest,
    index_digest,
    iter_stream,
    verify_shard,
    verify_stream,
)
from blt_dist.errors import UserError


def check_documents(dataset: ByteDataset, stream) -> None:
    """The stream's documents, read back, against the manifest's count, bytes and sha256."""
    expected = dataset.manifest["splits"][stream.split][stream.content_type]
    documents, nbytes, digest = 0, 0, StreamHash()
    for sample in iter_stream(stream.path, check_shards=False):
        documents += 1
        nbytes += len(sample["data"])
        digest.add_document(sample["data"])
    got, want = (documents, nbytes, digest.hexdigest()), (expected["documents"], expected["bytes"], expected["sha256"])
    if got != want:
        raise UserError(f"{stream.path}: documents, bytes, sha256 read back {got}; the manifest says {want}")


def stamp(dataset: ByteDataset) -> int:
    """Adds shard hashes to every index and the indexes' digests to the manifest (each file
    replaced atomically, the manifest last). Returns the number of shards hashed."""
    if dataset.manifest.get("format") != FORMAT:
        raise UserError(f"{dataset.root}: --stamp checks documents against a byte dataset's manifest; recompute "
                        "an entropy dataset instead (`blt-dist entropies ... --force`)")
    hashed = 0
    for stream in dataset.streams():
        check_documents(dataset, stream)  # nothing gets a hash that does not hold the manifest's documents
        index = verify_stream(stream.path)
        for shard in index["shards"]:
            info = shard["raw_data"]
            info["hashes"] = {algo: file_digest(stream.path / info["basename"], algo) for algo in SHARD_HASHES}
            hashed += 1
        _write_atomic(stream.path / INDEX, json.dumps(index, sort_keys=True))
        dataset.manifest["splits"][stream.split][stream.content_type]["index_sha256"] = index_digest(stream.path)
    _write_atomic(dataset.root / MANIFEST, json.dumps(dataset.manifest, indent=2, sort_keys=True) + "\n")
    return hashed


def verify(dataset: ByteDataset) -> int:
    """Every check there is; returns the number of shards checked."""
    checked = 0
    for stream in dataset.streams():
        index = verify_stream(stream.path, dataset.index_sha256(stream))
        where = f"{dataset.root}: stream {stream.split}/{stream.content_type}"
        for shard in index["shards"]:
            for algo in SHARD_HASHES:
                verify_shard(stream.path, shard["raw_data"], None, where, algo=algo)
            checked += 1
        if dataset.manifest.get("format") == FORMAT:
            check_documents(dataset, stream)
    return checked


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", help="a dataset directory (from `blt-dist prepare` or `blt-dist entropies`)")
    parser.add_argument("--stamp", action="store_true",
                        help="add shard hashes to a dataset written before them (after checking its documents)")


def run(args: argparse.Namespace) -> int:
    # lazy: the entropy format lives with the entropies command, which imports torch models
    from blt_dist.data.entropies import ENTROPY_FORMAT

    dataset = ByteDataset(args.dataset, verify=False, format=(FORMAT, ENTROPY_FORMAT))
    if args.stamp:
        unhashed = [s for s in dataset.streams()
                    if "index_sha256" not in dataset.manifest["splits"][s.split][s.content_type]]
        if not unhashed:
            print(f"{dataset.root}: already has shard hashes; checking it instead")
        else:
            print(f"{dataset.root}: {stamp(dataset)} shards hashed after their documents matched the manifest")
            dataset = ByteDataset(args.dataset, verify=False, format=(FORMAT, ENTROPY_FORMAT))
    checked = verify(dataset)
    print(f"{dataset.root}: ok ({checked} shards: indexes, sha256 and xxh3_64"
          f"{', documents' if dataset.manifest.get('format') == FORMAT else ''} as recorded)")
    return 0
