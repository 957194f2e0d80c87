"""`blt-dist verify DIR [--stamp]`: check a prepared (or entropy) dataset end to end.

    blt-dist verify data/shards            every index against the manifest, every shard's sha256
                                           and xxh3_64 against its index, every document against
                                           the manifest's per-stream sha256 (byte datasets)
    blt-dist verify data/shards --stamp    for a dataset written by an older version: check the
                                           documents against the manifest first, then record what
                                           it lacks (shard hashes and the indexes' digests; every
                                           document's byte length, which mixtures need)

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
    LENGTHS,
    MANIFEST,
    SHARD_HASHES,
    ByteDataset,
    StreamHash,
    file_digest,
    index_digest,
    iter_stream,
    verify_shard,
    verify_stream,
    write_lengths,
)
from blt_dist.errors import UserError


def check_documents(dataset: ByteDataset, stream, check_shards: bool = False) -> list[int]:
    """The stream's documents, read back, against the manifest's count, bytes and (byte datasets)
    sha256; returns every document's byte length."""
    expected = dataset.manifest["splits"][stream.split][stream.content_type]
    lengths, digest = [], StreamHash()
    for sample in iter_stream(stream.path, check_shards=check_shards):
        lengths.append(len(sample["data"]))
        digest.add_document(sample["data"])
    got, want = [len(lengths), sum(lengths)], [expected["documents"], expected["bytes"]]
    if "sha256" in expected:  # byte datasets (entropy datasets hash their entropies instead)
        got, want = got + [digest.hexdigest()], want + [expected["sha256"]]
    if got != want:
        raise UserError(f"{stream.path}: documents, bytes{', sha256' if len(got) == 3 else ''} read back "
                        f"{tuple(got)}; the manifest says {tuple(want)}")
    return lengths


def stamp(dataset: ByteDataset) -> list[str]:
    """Adds what a dataset written by an older version lacks, each only after its documents
    matched the manifest: shard hashes and index digests (byte datasets), document lengths
    (any dataset). Each file is replaced atomically, the manifest last. Returns what was added."""
    added = []
    for stream in dataset.streams():
        stats = dataset.manifest["splits"][stream.split][stream.content_type]
        name = f"{stream.split}/{stream.content_type}"
        if "index_sha256" not in stats:
            if dataset.manifest.get("format") != FORMAT:
                raise UserError(f"{dataset.root}: an entropy dataset written before shard hashes; recompute it "
                                "(`blt-dist entropies ... --force`)")
            lengths = check_documents(dataset, stream)  # nothing gets a hash that does not hold the manifest's documents
            index = verify_stream(stream.path)
            for shard in index["shards"]:
                info = shard["raw_data"]
                info["hashes"] = {algo: file_digest(stream.path / info["basename"], algo) for algo in SHARD_HASHES}
            _write_atomic(stream.path / INDEX, json.dumps(index, sort_keys=True))
            stats["index_sha256"] = index_digest(stream.path)
            added.append(f"{name}: {len(index['shards'])} shard hashes")
        else:
            lengths = None
        if "lengths_sha256" not in stats:
            if lengths is None:  # shards already hashed: read them verified
                verify_stream(stream.path, stats["index_sha256"])
                lengths = check_documents(dataset, stream, check_shards=True)
            stats["lengths_sha256"] = write_lengths(stream.path, lengths)
            added.append(f"{name}: {len(lengths)} document lengths")
    if added:
        _write_atomic(dataset.root / MANIFEST, json.dumps(dataset.manifest, indent=2, sort_keys=True) + "\n")
    return added


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
        has_lengths = "lengths_sha256" in dataset.manifest["splits"][stream.split][stream.content_type]
        if dataset.manifest.get("format") == FORMAT or has_lengths:
            lengths = check_documents(dataset, stream)
            if has_lengths and dataset.document_lengths(stream).tolist() != lengths:
                raise UserError(f"{stream.path / LENGTHS}: does not match the documents' byte lengths")
    return checked


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", help="a dataset directory (from `blt-dist prepare` or `blt-dist entropies`)")
    parser.add_argument("--stamp", action="store_true",
                        help="add shard hashes and document lengths to a dataset written before them (after checking "
                             "its documents)")


def run(args: argparse.Namespace) -> int:
    # lazy: the entropy format lives with the entropies command, which imports torch models
    from blt_dist.data.entropies import ENTROPY_FORMAT

    dataset = ByteDataset(args.dataset, verify=False, format=(FORMAT, ENTROPY_FORMAT))
    if args.stamp:
        added = stamp(dataset)
        if not added:
            print(f"{dataset.root}: already has shard hashes and document lengths; checking it instead")
        else:
            print(f"{dataset.root}: added after the documents matched the manifest: {'; '.join(added)}")
            dataset = ByteDataset(args.dataset, verify=False, format=(FORMAT, ENTROPY_FORMAT))
    checked = verify(dataset)
    print(f"{dataset.root}: ok ({checked} shards: indexes, sha256 and xxh3_64"
          f"{', documents' if dataset.manifest.get('format') == FORMAT else ''} as recorded)")
    return 0
