"""Datasets in an object store: the manifest and indexes fetched eagerly, shards lazily into a
node-local cache, each verified before it is trusted.

    s3://bucket/prefix/dataset.json, train/<type>/index.json, train/<type>/shard.00000.mds ...
    -> CACHE_DIR/<fingerprint>/  the same layout, shards appearing as they are first read

Any URL that mosaicml-streaming's CloudDownloader handles (s3://, gs://, oci://, azure://, hf://,
sftp://; S3-compatible stores through S3_ENDPOINT_URL) works; a plain path is read in place.

Trust. The manifest is fetched first; each stream's index.json is fetched and checked against
the sha256 the manifest records; each shard is downloaded under a temporary name, checked against
its index's xxh3_64, and only then renamed into place. A file that fails is deleted and the run
stops with one line naming the dataset, stream, shard, URL and both hashes. One download per
shard per node: a file lock per shard, so ranks and loader workers that want the same shard wait
for the first one's download instead of fetching it again. A temporary file left by a process
killed mid-download is never read (it has no final name) and is overwritten by the next download.

Size. `data.cache_limit` bytes (0: no limit) bounds the shards kept: after a download that goes
over it, the least recently used shards are deleted, never one this process has pinned (the
shard it is reading and the ones it is prefetching) and never a file outside the cache's own
directory. With the loader's block shuffle (`data.shuffle_block_shards`) a lane's reads stay in
a window of shards, so a cache that holds a few blocks does not thrash.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import threading
import urllib.parse
from collections import OrderedDict
from pathlib import Path
from typing import Optional

from blt_dist.data.integrity import READ_HASH, cache_root, file_digest, verify_shard, write_stamp
from blt_dist.errors import UserError

MANIFEST = "dataset.json"
INDEX = "index.json"
LENGTHS = "lengths.npy"  # uint64 byte length of every document of a stream, in order (mixture weights)
ORIGIN = "origin.json"  # in the cache directory: the URL it was fetched from


def is_remote(path: str | Path) -> bool:
    """Whether `path` is a URL (scheme://...) rather than a local path."""
    scheme = urllib.parse.urlparse(str(path)).scheme
    return len(scheme) > 1 and scheme != "file"  # one letter: a Windows drive


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *parts])


def default_cache_dir() -> Path:
    return cache_root() / "datasets"


_downloaders = threading.local()


def _downloader_key(url: str, timeout: float) -> tuple:
    return urllib.parse.urlparse(url).scheme, timeout, os.environ.get("S3_ENDPOINT_URL")


def _downloader(url: str, timeout: float):
    """streaming's CloudDownloader for the URL's scheme, one per process, thread, timeout and
    S3 endpoint (a client is bound to the endpoint it was made for). A downloader creates its
    client on its first download and keeps it: an S3 client costs about 0.2 s to create (botocore
    reads its service models), which a new downloader per file paid for every index and shard
    (an open of an entropy dataset of many parts took seconds). Clients are not shared across
    threads or a fork (a DataLoader worker makes its own)."""
    # lazy: `import streaming` costs 2 s over torch; only remote datasets need it
    from streaming.base.storage.download import CloudDownloader

    if getattr(_downloaders, "pid", None) != os.getpid():
        _downloaders.pid, _downloaders.by_key = os.getpid(), {}
    key = _downloader_key(url, timeout)
    if key not in _downloaders.by_key:
        _downloaders.by_key[key] = CloudDownloader.get(url)
    return _downloaders.by_key[key]


def download(url: str, local: Path, timeout: float = 120) -> None:
    """One file from a URL to `local` (overwritten), through streaming's downloader."""
    local.parent.mkdir(parents=True, exist_ok=True)
    local.unlink(missing_ok=True)  # the downloader skips a file that exists
    try:
        _downloader(url, timeout).download(url, str(local), timeout)
    except Exception as err:  # noqa: BLE001 -- boto/gcs/... each raise their own; all mean "not fetched"
        local.unlink(missing_ok=True)
        broken = getattr(_downloaders, "by_key", {}).pop(_downloader_key(url, timeout), None)
        if broken is not None:  # the next try starts from a new client
            broken.clean_up()
        raise UserError(f"{url}: could not download ({type(err).__name__}: {str(err).splitlines()[0][:300]})") from err


class Uploader:
    """Files of a local directory to the same relative paths under a URL, through streaming's
    CloudUploader (every scheme it handles); a failure is one UserError naming the file."""

    def __init__(self, local: Path, url: str):
        # lazy: `import streaming` costs 2 s over torch; only remote output needs it
        from streaming.base.storage.upload import CloudUploader

        self.local, self.url = Path(local), url
        self._uploader = CloudUploader.get(out=(str(local), url), keep_local=True, exist_ok=True)

    def put(self, rel: str) -> None:
        try:
            self._uploader.upload_file(rel)
        except Exception as err:  # noqa: BLE001 -- boto/gcs/... each raise their own; all mean "not stored"
            raise UserError(f"{join(self.url, rel)}: could not upload {self.local / rel} "
                            f"({type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''})") from err


def fetch_metadata(url: str, cache_dir: Optional[str | Path] = None) -> Path:
    """The dataset's manifest and stream indexes in the node cache; returns the local root.
    Fetched on every open (they are small), each index checked against the manifest."""
    cache_root = Path(cache_dir) if cache_dir else default_cache_dir()
    staging = cache_root / ".incoming" / f"{os.getpid()}-{threading.get_ident()}"
    try:
        download(join(url, MANIFEST), staging / MANIFEST)
        try:
            manifest = json.loads((staging / MANIFEST).read_text())
            fingerprint = manifest["fingerprint"]
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(f"{join(url, MANIFEST)}: not a blt-dist dataset manifest ({err})") from err
        root = cache_root / fingerprint
        for split, types in manifest.get("splits", {}).items():
            for content_type, stats in types.items():
                rel = f"{split}/{content_type}/{INDEX}"
                index = staging / rel
                download(join(url, rel), index)
                expected = stats.get("index_sha256")
                if expected is not None:
                    actual = hashlib.sha256(index.read_bytes()).hexdigest()
                    if actual != expected:
                        raise UserError(f"{url}: stream {split}/{content_type}: {join(url, rel)} has sha256 {actual}, "
                                        f"the manifest says {expected} (a changed or truncated index)")
                if stats.get("lengths_sha256") is not None:  # small: one integer per document
                    rel = f"{split}/{content_type}/{LENGTHS}"
                    download(join(url, rel), staging / rel)
                    actual = hashlib.sha256((staging / rel).read_bytes()).hexdigest()
                    if actual != stats["lengths_sha256"]:
                        raise UserError(f"{url}: stream {split}/{content_type}: {join(url, rel)} has sha256 {actual}, "
                                        f"the manifest says {stats['lengths_sha256']}")
        root.mkdir(parents=True, exist_ok=True)
        for path in sorted(staging.rglob("*")):
            if path.is_file():
                target = root / path.relative_to(staging)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target)  # atomic: another process may be reading the old copy
        (root / ORIGIN).write_text(json.dumps({"url": url}) + "\n")
        return root
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class ShardCache:
    """A dataset's shards in the node cache (`root`, the directory fetch_metadata returned)."""

    def __init__(self, root: Path, url: str, limit: int = 0, prefetch: int = 2):
        self.root, self.url, self.limit, self.prefetch_depth = Path(root), url, int(limit), prefetch
        self.pinned: "OrderedDict[str, None]" = OrderedDict()  # rel paths this process must keep
        self._queue: list[tuple[str, dict]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._failed: dict[str, BaseException] = {}

    # -- one shard --------------------------------------------------------------------------

    def ensure(self, rel: str, info: dict, where: str, fingerprint: str) -> Path:
        """The shard's local path, downloaded and verified if it is not here yet; a cached copy
        is verified on its first use by this node since it last changed (shards.verify_shard's
        stamp), and deleted if it fails."""
        path = self.root / rel
        stream_dir = self.root.joinpath(*Path(rel).parts[:2])  # split/content type; basenames may have a dir
        with self._file_lock(rel):
            self._touch(rel)
            if path.is_file():
                try:
                    verify_shard(stream_dir, info, fingerprint, f"{where} (cached from {join(self.url, rel)})")
                    return path
                except UserError as err:
                    path.unlink(missing_ok=True)
                    raise UserError(f"{err} (deleted from the node cache; the next run downloads it again)") from None
            tmp = path.with_name(f".{path.name}.download")
            remote = join(self.url, rel)
            download(remote, tmp)
            expected = (info.get("hashes") or {}).get(READ_HASH)
            actual = file_digest(tmp, READ_HASH)
            if expected is None or actual != expected or tmp.stat().st_size != info["bytes"]:
                size = tmp.stat().st_size
                tmp.unlink(missing_ok=True)
                raise UserError(f"{where}: shard {info['basename']} from {remote} is corrupt: {READ_HASH} {actual} "
                                f"({size} bytes), its index says {expected} ({info['bytes']} bytes); deleted, "
                                "not trained on")
            os.replace(tmp, path)  # keeps its mtime: the stamp below names the checked file
            if fingerprint is not None:
                write_stamp(path, fingerprint, expected)
        self._evict()
        return path

    def _touch(self, rel: str) -> None:
        """Marks a shard recently used (a sidecar's mtime: the shard's own mtime keys its stamp)."""
        used = self.root / ".used" / rel.replace("/", "__")
        used.parent.mkdir(parents=True, exist_ok=True)
        used.touch()

    def _last_used(self, rel: str) -> int:
        try:
            return (self.root / ".used" / rel.replace("/", "__")).stat().st_mtime_ns
        except OSError:
            return 0

    def _file_lock(self, rel: str):
        lock_path = self.root / ".locks" / (rel.replace("/", "__") + ".lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        return _FileLock(lock_path)

    # -- pinning, prefetch --------------------------------------------------------------------

    def pin(self, rel: str, window: int) -> None:
        """Keeps `rel` and the `window - 1` shards pinned before it (this process's window)."""
        with self._lock:
            self.pinned.pop(rel, None)
            self.pinned[rel] = None
            while len(self.pinned) > max(window, 1):
                self.pinned.popitem(last=False)

    def prefetch(self, shards: list[tuple[str, dict, str, str]]) -> None:
        """Downloads these (rel, info, where, fingerprint) in the background, in order, pinned
        meanwhile."""
        with self._lock:
            for item in shards[: self.prefetch_depth]:
                rel = item[0]
                if not (self.root / rel).is_file() and all(rel != q[0] for q in self._queue):
                    self._queue.append(item)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._prefetch_loop, daemon=True, name="blt-dist-prefetch")
                self._thread.start()
        self._wake.set()

    def _prefetch_loop(self) -> None:
        while True:
            with self._lock:
                item = self._queue[0] if self._queue else None
            if item is None:
                self._wake.clear()
                if not self._wake.wait(timeout=5):
                    return
                continue
            rel = item[0]
            try:
                self.ensure(*item)
            except BaseException as err:  # noqa: BLE001 -- raised again when the reader asks for it
                self._failed[rel] = err
            with self._lock:
                self._queue.pop(0)

    def prefetch_error(self, rel: str) -> Optional[BaseException]:
        return self._failed.pop(rel, None)

    # -- eviction ------------------------------------------------------------------------------

    def _evict(self) -> None:
        """Deletes least recently used shards until the cache is within its limit; never a pinned
        or queued one, never one another process is downloading or has locked, never anything
        outside the cache directory (only `*.mds` files under `root`)."""
        if not self.limit:
            return
        shards = list(self.root.rglob("*.mds"))
        total = sum(map(_size, shards))  # another process (or the prefetch thread) may delete some meanwhile
        if total <= self.limit:
            return
        with self._lock:
            keep = set(self.pinned) | {q[0] for q in self._queue}
        rels = {path: str(path.relative_to(self.root)) for path in shards}
        for path in sorted(shards, key=lambda p: self._last_used(rels[p])):
            if total <= self.limit:
                break
            rel = rels[path]
            if rel in keep:
                continue
            lock = self._file_lock(rel)
            if not lock.try_acquire():
                continue
            try:
                size = _size(path)
                path.unlink(missing_ok=True)
                total -= size
            finally:
                lock.release()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


class _FileLock:
    """An exclusive flock on a lock file (released with the process, should it die)."""

    def __init__(self, path: Path):
        self.path, self._fd = path, None

    def __enter__(self):
        self._fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        self.release()

    def try_acquire(self) -> bool:
        self._fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            return False

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
