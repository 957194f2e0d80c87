"""Byte shards on disk: the layout `prepare` writes and every later stage reads.

    DATASET/
      dataset.json                    format, fingerprint, per split/content type counts
      train/<content_type>/index.json + shard.NNNNN.mds   (mosaicml-streaming MDS)
      train/<content_type>/lengths.npy   every document's byte length, in order (mixtures' weights)
      val/<content_type>/...

One MDS sample per document, columns:
    data     bytes   the document's raw bytes, exactly as read (any byte string)
    doc      int64   document ordinal within its stream (0, 1, 2, ...)
    source   str     where it came from: 'path' or 'path:line' for JSONL

The fingerprint is a sha256 over every stream's (split, content type) and its documents' bytes
in order. Later
stages store it (entropy shards, checkpoints) and refuse to mix data from different datasets.

Verified shards. The manifest is the root of trust: it records each stream's index.json sha256,
each index records its shards' xxh3_64 and sha256 (mosaicml-streaming's `hashes`). Opening a
dataset checks the indexes against the manifest; a reader checks every shard's xxh3_64 (2 ms per
64 MB) before its first sample is used, once per node: a stamp under $BLT_DIST_CACHE (default
~/.cache/blt-dist) keyed by the dataset fingerprint, the shard's size, mtime and hash lets other
ranks, workers and runs skip the re-hash. `blt-dist verify DIR` checks everything (sha256 too);
`--stamp` adds the hashes to a dataset written before they existed, after checking its documents
against the manifest's per-stream sha256.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from blt_dist.data.integrity import READ_HASH, file_digest, verify_shard  # noqa: F401 (READ_HASH: verify.py)
from blt_dist.data.remote import INDEX, LENGTHS, MANIFEST, ShardCache, fetch_metadata, is_remote  # noqa: F401 (re-exported)
from blt_dist.errors import UserError

FORMAT = "blt-dist/byte-shards/v1"
SPLITS = ("train", "val")
COLUMNS = {"data": "bytes", "doc": "int64", "source": "str"}
SHARD_HASHES = ["sha256", "xxh3_64"]  # sorted, as MDSWriter requires


class StreamHash:
    """Content hash of one stream: document order, lengths and bytes all count."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()

    def add_document(self, data: bytes) -> None:
        self._hash.update(struct.pack("<Q", len(data)))
        self._hash.update(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def dataset_fingerprint(stream_hashes: dict[tuple[str, str], str]) -> str:
    """Combines per-stream hashes, keyed by (split, content type), into the dataset fingerprint."""
    lines = "".join(f"{split}/{ctype}:{digest}\n" for (split, ctype), digest in sorted(stream_hashes.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


@dataclass(frozen=True)
class StreamInfo:
    split: str
    content_type: str
    path: Path
    documents: int
    bytes: int
    shards: int

    def rel(self, info: dict) -> str:
        """A shard's path relative to the dataset root (`info`: its index entry's raw_data)."""
        return f"{self.split}/{self.content_type}/{info['basename']}"


class ByteDataset:
    """A prepared dataset, checked on open: manifest, every stream's index, shard sizes.

    Byte datasets (`prepare`) and entropy datasets (`entropies`) share this layout; `format`
    says which one the caller expects (a tuple: any of them)."""

    def __init__(self, root: str | Path, verify: bool = True, format: str | tuple[str, ...] = FORMAT,
                 cache_dir: str | Path | None = None):
        # a URL: the manifest and indexes come into the node cache now, shards when first read
        self.url = str(root) if is_remote(root) else None
        self.cache_dir = cache_dir
        self.root = fetch_metadata(self.url, cache_dir) if self.url else Path(root)
        self.name = self.url or str(self.root)  # what messages call it
        manifest_path = self.root / MANIFEST
        if not self.root.is_dir():
            raise UserError(f"{self.root}: no such dataset directory")
        if not manifest_path.is_file():
            raise UserError(f"{self.root}: not a blt-dist byte dataset (no {MANIFEST}; run `blt-dist prepare`)")
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"{manifest_path}: unreadable ({err})") from err
        expected = (format,) if isinstance(format, str) else format
        if self.manifest.get("format") not in expected:
            raise UserError(f"{manifest_path}: format {self.manifest.get('format')!r}, expected "
                            f"{' or '.join(repr(f) for f in expected)}")
        self.fingerprint: str = self.manifest["fingerprint"]
        if verify:
            for stream in self.streams():
                verify_stream(stream.path, self.index_sha256(stream), shards_local=self.url is None)

    def index_sha256(self, stream: "StreamInfo") -> str:
        """The stream's index.json sha256 from the manifest; a dataset written before verified
        shards has none and is refused, with the command that checks it and adds them."""
        digest = self.manifest["splits"][stream.split][stream.content_type].get("index_sha256")
        if digest is None:
            raise UserError(f"{self.root}: written before shard hashes, so its shards cannot be verified; "
                            f"run `blt-dist verify {self.root} --stamp` (checks every document against the "
                            "manifest's sha256, then records the hashes)")
        return digest

    def document_lengths(self, stream: "StreamInfo") -> np.ndarray:
        """Every document's byte length (int64), checked against the manifest's sha256, count and
        total bytes. What a weighted mixture needs; a dataset written before lengths existed is
        refused with the command that adds them."""
        stats = self.manifest["splits"][stream.split][stream.content_type]
        digest, path = stats.get("lengths_sha256"), stream.path / LENGTHS
        if digest is None:
            raise UserError(f"{self.name}: stream {stream.split}/{stream.content_type} has no document lengths "
                            f"(written before they existed); run `blt-dist verify {self.name} --stamp` to add them")
        if not path.is_file():
            raise UserError(f"{path}: missing (the manifest lists its sha256)")
        raw = path.read_bytes()
        if hashlib.sha256(raw).hexdigest() != digest:
            raise UserError(f"{path}: sha256 {hashlib.sha256(raw).hexdigest()}, the manifest says {digest}")
        lengths = np.load(path, allow_pickle=False).astype(np.int64)
        if len(lengths) != stream.documents or int(lengths.sum()) != stream.bytes:
            raise UserError(f"{path}: {len(lengths)} documents / {int(lengths.sum())} bytes, the manifest says "
                            f"{stream.documents} / {stream.bytes}")
        return lengths

    def streams(self, split: str | None = None) -> list[StreamInfo]:
        out = []
        for split_name, types in self.manifest["splits"].items():
            if split is not None and split_name != split:
                continue
            for content_type, stats in sorted(types.items()):
                out.append(
                    StreamInfo(
                        split=split_name,
                        content_type=content_type,
                        path=self.root / split_name / content_type,
                        documents=stats["documents"],
                        bytes=stats["bytes"],
                        shards=stats["shards"],
                    )
                )
        return out

    def documents(self, split: str) -> Iterator[tuple[str, dict]]:
        """Yields (content_type, sample) for every document of a split, in stored order."""
        cache = self.shard_cache()
        for stream in self.streams(split):
            fetch = None
            if cache is not None:
                def fetch(info, stream=stream):
                    return cache.ensure(stream.rel(info), info, self.where(stream), self.fingerprint)
            for sample in iter_stream(stream.path, self.index_sha256(stream), self.fingerprint, fetch=fetch):
                yield stream.content_type, sample

    def where(self, stream: "StreamInfo") -> str:
        return f"{self.name}: stream {stream.split}/{stream.content_type}"

    def shard_cache(self, limit: int = 0, prefetch: int = 2) -> "ShardCache | None":
        """The node cache of a remote dataset's shards (None for a local dataset)."""
        return ShardCache(self.root, self.url, limit, prefetch) if self.url else None


class SplitReader:
    """Random access to every document of one split, across its content-type streams.

    Global document ids run over the streams in sorted content-type order, then document order.
    Reads through mosaicml-streaming's MDS shard readers; the order in which documents are
    visited belongs to the loaders (see loader.py for why not StreamingDataset's)."""

    def __init__(self, dataset: ByteDataset, split: str, cache_limit: float = 0, prefetch: int = 2):
        # lazy: `import streaming` costs 2 s over torch (measured); generate, patch and eval --files never read a shard
        from streaming.base.format import reader_from_json

        self.dataset = dataset
        self.cache = dataset.shard_cache(int(cache_limit), prefetch)  # remote: shards come on first read
        self._ready: set[tuple[int, int]] = set()  # (stream, shard) this process has verified and pinned
        self._global_shards = self._global_starts = None  # built by the first prefetch
        # shards kept pinned: the one being read and those prefetched, per lane this reader serves
        self.pin_window = 2 + prefetch
        self.streams = dataset.streams(split)
        if not self.streams:
            raise UserError(f"{dataset.root}: no {split!r} split (splits: {', '.join(dataset.manifest['splits'])})")
        self._readers = []  # per stream: list of shard readers
        self._shard_starts = []  # per stream: first document id of each shard
        stream_sizes = []
        self._infos = []  # per stream: each shard's raw_data entry
        for stream in self.streams:
            index = verify_stream(stream.path, dataset.index_sha256(stream), shards_local=self.cache is None)
            if self.cache is None:
                for info in index["shards"]:  # before any sample is used; once per node (a stamp)
                    verify_shard(stream.path, info["raw_data"], dataset.fingerprint, dataset.where(stream))
            self._infos.append([info["raw_data"] for info in index["shards"]])
            readers = [reader_from_json(str(stream.path), None, info) for info in index["shards"]]
            counts = [r.samples for r in readers]
            if sum(counts) != stream.documents:
                raise UserError(f"{stream.path}: index lists {sum(counts)} documents, manifest says {stream.documents}")
            self._readers.append(readers)
            self._shard_starts.append(np.cumsum([0] + counts[:-1]))
            stream_sizes.append(sum(counts))
        self._stream_starts = np.cumsum([0] + stream_sizes[:-1])
        self.num_documents = int(sum(stream_sizes))

    def __len__(self) -> int:
        return self.num_documents

    def locate(self, doc_id: int) -> tuple[int, int, int]:
        """(stream, shard, index in the shard) of global document `doc_id`."""
        if not 0 <= doc_id < self.num_documents:
            raise IndexError(f"document {doc_id} out of range [0, {self.num_documents})")
        stream = int(np.searchsorted(self._stream_starts, doc_id, side="right")) - 1
        local = doc_id - int(self._stream_starts[stream])
        shard = int(np.searchsorted(self._shard_starts[stream], local, side="right")) - 1
        return stream, shard, local - int(self._shard_starts[stream][shard])

    def shard_starts(self) -> np.ndarray:
        """The global id of every shard's first document, in global order (streams, then shards)."""
        return np.concatenate([start + starts for start, starts in zip(self._stream_starts, self._shard_starts)])

    def get(self, doc_id: int) -> tuple[str, dict]:
        """(content type, sample) of global document `doc_id`."""
        stream, shard, item = self.locate(doc_id)
        if self.cache is not None:
            self._fetch(stream, shard)
            try:
                sample = self._readers[stream][shard].get_item(item)
            except FileNotFoundError:  # evicted by another process since: fetch it again
                self._ready.discard((stream, shard))
                self._fetch(stream, shard)
                sample = self._readers[stream][shard].get_item(item)
        else:
            sample = self._readers[stream][shard].get_item(item)
        return self.streams[stream].content_type, sample

    def _fetch(self, stream: int, shard: int) -> None:
        info, rel = self._infos[stream][shard], self.streams[stream].rel(self._infos[stream][shard])
        self.cache.pin(rel, window=self.pin_window)
        if (stream, shard) in self._ready and (self.streams[stream].path / info["basename"]).is_file():
            return
        failed = self.cache.prefetch_error(rel)
        if failed is not None:
            raise failed
        self.cache.ensure(rel, info, self.dataset.where(self.streams[stream]), self.dataset.fingerprint)
        self._ready = {key for key in self._ready if key[0] != stream or abs(key[1] - shard) < 4}
        self._ready.add((stream, shard))

    def prefetch(self, doc_ids) -> None:
        """Starts downloading the shards of these upcoming documents (remote datasets), in order."""
        if self.cache is None:
            return
        if self._global_shards is None:  # (stream, shard) of every shard in global order, and its first document
            self._global_shards = [(i, j) for i, infos in enumerate(self._infos) for j in range(len(infos))]
            self._global_starts = self.shard_starts()
        positions = np.searchsorted(self._global_starts, np.asarray(doc_ids), side="right") - 1
        _, first = np.unique(positions, return_index=True)
        wanted = []
        for position in positions[np.sort(first)]:  # distinct shards, in the order they are needed
            stream, shard = self._global_shards[int(position)]
            if (stream, shard) not in self._ready:
                info = self._infos[stream][shard]
                wanted.append((self.streams[stream].rel(info), info, self.dataset.where(self.streams[stream]),
                               self.dataset.fingerprint))
        if wanted:
            self.cache.prefetch(wanted)


def verify_stream(stream_dir: Path, index_sha256: str | None = None, shards_local: bool = True) -> dict:
    """Checks an MDS stream directory: index.json present, parsable and (given the manifest's
    digest) the one the manifest names, every shard file present with the size the index
    records (shards_local=False: a remote dataset's cache, where shards come when first read).
    Returns the parsed index. Raises UserError naming the file."""
    index_path = stream_dir / INDEX
    if not index_path.is_file():
        raise UserError(f"{stream_dir}: shard directory without index.json (incomplete or not an MDS dataset)")
    raw = index_path.read_bytes()
    if index_sha256 is not None and hashlib.sha256(raw).hexdigest() != index_sha256:
        raise UserError(f"{index_path}: sha256 {hashlib.sha256(raw).hexdigest()}, the manifest says {index_sha256} "
                        "(the index changed after the dataset was written: re-copy or re-prepare it)")
    try:
        index = json.loads(raw)
        shards = index["shards"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(f"{index_path}: unreadable MDS index ({err})") from err
    for shard in shards:
        if shard.get("compression"):  # `prepare` writes raw shards: they read faster (FIELD-NOTES)
            raise UserError(f"{index_path}: compressed shards are not supported; re-run `blt-dist prepare`")
        info = shard["raw_data"]
        path = stream_dir / info["basename"]
        if not shards_local:
            continue
        if not path.is_file():
            raise UserError(f"{path}: shard file missing (listed in {index_path})")
        size = path.stat().st_size
        if size != info["bytes"]:
            raise UserError(f"{path}: shard is {size} bytes, index says {info['bytes']} (truncated or corrupt)")
    return index


def iter_stream(stream_dir: Path, index_sha256: str | None = None, fingerprint: str | None = None,
                check_shards: bool = True, fetch=None) -> Iterator[dict]:
    """Reads one MDS stream in order, without the streaming dataset machinery (no shared memory,
    no cache copy): for offline tools that walk every document once. Each shard is verified
    before it is read (check_shards=False: the caller checks the documents themselves).
    `fetch(raw_data)`: brings a remote dataset's shard into the node cache, verified."""
    # lazy: `import streaming` costs 2 s over torch (measured); generate, patch and eval --files never read a shard
    from streaming.base.format import reader_from_json

    index = verify_stream(stream_dir, index_sha256, shards_local=fetch is None)
    for shard_info in index["shards"]:
        if fetch is not None:
            fetch(shard_info["raw_data"])
        elif check_shards:
            verify_shard(stream_dir, shard_info["raw_data"], fingerprint, str(stream_dir))
        reader = reader_from_json(str(stream_dir), None, shard_info)
        for i in range(reader.samples):
            yield reader.get_item(i)


def write_lengths(stream_dir: Path, lengths) -> str:
    """Writes a stream's lengths.npy; returns its sha256 (the manifest's `lengths_sha256`)."""
    path = stream_dir / LENGTHS
    tmp = path.with_name(f".{LENGTHS}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to the temporary name
        np.save(f, np.asarray(lengths, dtype="<u8"), allow_pickle=False)
    os.replace(tmp, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def index_digest(stream_dir: Path) -> str:
    """The sha256 the manifest records for a stream's index.json."""
    return hashlib.sha256((stream_dir / INDEX).read_bytes()).hexdigest()


def publish(tmp_dir: Path, final_dir: Path) -> None:
    """Replaces final_dir with tmp_dir. The rename is atomic; a crash leaves either the old
    directory or a stray temp directory, never a half-written one under the final name."""
    if final_dir.exists():
        old = final_dir.with_name(final_dir.name + f".old-{os.getpid()}")
        final_dir.rename(old)
        tmp_dir.rename(final_dir)
        shutil.rmtree(old)
    else:
        tmp_dir.rename(final_dir)
