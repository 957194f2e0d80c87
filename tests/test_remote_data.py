"""Datasets in an object store, against a real S3 server on loopback (moto's server mode): the
node cache, its limit, verification at download and in the cache, and the errors of a broken
bucket or endpoint."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from blt_dist.bench import s3
from blt_dist.data.loader import Loader, LoaderSpec
from blt_dist.data.packing import IGNORE
from blt_dist.data.prepare import prepare
from blt_dist.data.shards import ByteDataset, SplitReader
from blt_dist.errors import UserError
from tests.conftest import write_word_documents
from tests.distributed import metrics, run

WORDS = "the quick brown fox jumps over a lazy dog while bytes and patches flow through latent space".split()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with s3.loopback_s3(tmp_path_factory.mktemp("aws")) as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A local dataset of 8 train shards (one content type) and its copy in the bucket."""
    root = tmp_path_factory.mktemp("remote")
    write_word_documents(root / "in", WORDS, 80, (20, 120), types=("prose",))
    prepare([root / "in"], root / "ds", val_fraction=0.1, shard_size="2kb", progress=False)
    return root / "ds"


def shard_count(ds: Path, split: str = "train") -> int:
    return sum(s.shards for s in ByteDataset(ds).streams(split))


@pytest.fixture
def url(server, dataset, request):
    """The dataset uploaded under a prefix of its own (tests may damage their copy)."""
    return s3.upload(dataset, "data", request.node.name)


def spec(path, cache_dir: Path, **kw) -> LoaderSpec:
    return LoaderSpec(path=str(path), split="train", family="bytes", sample_len=64, micro_batch_size=2, seed=1,
                      cache_dir=str(cache_dir), **kw)


def test_the_bucket_dataset_reads_like_the_local_one(dataset, url, tmp_path):
    assert shard_count(dataset) >= 8
    local = Loader(spec(dataset, tmp_path / "unused"))
    remote = Loader(spec(url, tmp_path / "cache"))
    for _ in range(20):
        a, b = next(local), next(remote)
        assert all(a[k].equal(b[k]) for k in a if k != "facts")
    cached = sorted(p.name for p in (tmp_path / "cache").rglob("*.mds"))
    assert cached and len(cached) < shard_count(dataset)  # lazily: only the shards read so far
    remote_ds = ByteDataset(url, cache_dir=tmp_path / "cache")
    assert remote_ds.fingerprint == ByteDataset(dataset).fingerprint and remote_ds.url == url


def test_a_mixture_from_the_bucket_reads_like_the_local_one(dataset, url, tmp_path):
    """The document lengths a mixture needs come with the manifest and indexes, checked."""
    local = Loader(spec(dataset, tmp_path / "unused", mixture=(("prose", 1.0),)))
    remote = Loader(spec(url, tmp_path / "cache", mixture=(("prose", 1.0),)))
    for _ in range(10):
        a, b = next(local), next(remote)
        assert all(a[k].equal(b[k]) for k in a if k != "facts")
    assert list((tmp_path / "cache").rglob("train/prose/lengths.npy"))


def epoch_targets(loader: Loader, num_documents: int):
    seen = []
    while True:
        batch = next(loader)
        keep = batch["targets"] != IGNORE
        visits, positions = batch["doc_visit"][keep], batch["doc_pos"][keep] + 1
        first = visits < num_documents
        seen += zip(visits[first].tolist(), positions[first].tolist())
        lanes = [s["stream"] for s in loader.state_dict()["lane_states"].values()]
        if all(s is not None and s["epoch"] >= 1 and min(s["buffered_visits"], default=num_documents) >= num_documents
               for s in lanes):
            return seen


def size_or_zero(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # evicted while we looked
        return 0


def test_a_cache_of_three_shards_reads_every_byte_once_per_epoch(dataset, url, tmp_path):
    reader = SplitReader(ByteDataset(dataset), "train")
    shard_bytes = max(info["bytes"] for infos in reader._infos for info in infos)
    limit = 3 * shard_bytes
    cache = tmp_path / "cache"
    loader = Loader(spec(url, cache, cache_limit=limit, shuffle_block_shards=1, prefetch_shards=1))
    peak = 0

    class Watch:  # the cache's size after every batch
        def __init__(self, inner):
            self.inner = inner

        def __next__(self):
            nonlocal peak
            batch = next(self.inner)
            peak = max(peak, sum(map(size_or_zero, cache.rglob("*.mds"))))
            return batch

        def state_dict(self):
            return self.inner.state_dict()

    seen = epoch_targets(Watch(loader), len(reader))
    documents = [reader.get(i)[1]["data"] for i in range(len(reader))]
    assert len(seen) == len(set(seen))
    expected = {(d, p) for d, data in enumerate(documents) for p in range(1, len(data) + 2)}  # bytes + EOS
    assert set(seen) == expected
    assert peak <= limit + 2 * shard_bytes  # the limit, plus the pinned window above it at most
    assert len(list(cache.rglob("*.mds"))) < shard_count(dataset)


def test_the_block_shuffle_is_a_permutation_that_stays_within_blocks(dataset):
    from blt_dist.data.loader import DocumentOrder

    reader = SplitReader(ByteDataset(dataset), "train")
    starts = reader.shard_starts()[::2]
    order = DocumentOrder(len(reader), 0, 1, seed=3, shuffle=True, block_starts=starts).epoch_order(0)
    assert sorted(order.tolist()) == list(range(len(reader)))
    block_of = np.searchsorted(starts, order, side="right")
    assert (np.diff(block_of) != 0).sum() == len(starts) - 1  # each block read in one go


def damage(url: str, rel: str, how: str) -> None:
    bucket, prefix = url[len("s3://"):].split("/", 1)
    client = s3.client()
    key = f"{prefix}/{rel}"
    if how == "delete":
        client.delete_object(Bucket=bucket, Key=key)
        return
    body = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    if how == "flip":
        body[len(body) // 2] ^= 0x01
    elif how == "truncate":
        body = body[: len(body) // 2]
    client.put_object(Bucket=bucket, Key=key, Body=bytes(body))


def first_shard(ds: Path) -> str:
    index = json.loads((ds / "train" / "prose" / "index.json").read_text())
    return f"train/prose/{index['shards'][0]['raw_data']['basename']}"


def read_all(url: str, cache: Path) -> None:
    reader = SplitReader(ByteDataset(url, cache_dir=cache), "train")
    for i in range(len(reader)):
        reader.get(i)


def test_a_byte_flipped_in_the_bucket_is_refused_and_deleted(dataset, url, tmp_path):
    shard = first_shard(dataset)
    damage(url, shard, "flip")
    with pytest.raises(UserError) as err:
        read_all(url, tmp_path / "cache")
    message = str(err.value)
    assert f"{url}: stream train/prose: shard {Path(shard).name} from {url}/{shard} is corrupt: xxh3_64" in message
    assert "its index says" in message and "deleted" in message
    assert not [p for p in (tmp_path / "cache").rglob(Path(shard).name)]  # nothing kept, not even the temp file


def test_a_shard_corrupted_in_the_cache_is_refused_and_deleted(dataset, url, tmp_path):
    cache = tmp_path / "cache"
    read_all(url, cache)
    (cached,) = [p for p in cache.rglob(Path(first_shard(dataset)).name)]
    data = bytearray(cached.read_bytes())
    data[10] ^= 0x01
    cached.write_bytes(bytes(data))  # same size, new mtime: the stamp no longer matches
    with pytest.raises(UserError, match=r"cached from s3://.*is corrupt: xxh3_64 .*deleted from the node cache"):
        read_all(url, cache)
    assert not cached.exists()
    read_all(url, cache)  # downloaded again, clean


@pytest.mark.parametrize("how, pattern", [
    ("truncate-index", r"index\.json has sha256 [0-9a-f]+, the manifest says [0-9a-f]+"),
    ("delete-shard", r"could not download"),
])
def test_a_broken_bucket_names_the_file(dataset, url, tmp_path, how, pattern):
    if how == "truncate-index":
        damage(url, "train/prose/index.json", "truncate")
    else:
        damage(url, first_shard(dataset), "delete")
    with pytest.raises(UserError, match=pattern) as err:
        read_all(url, tmp_path / "cache")
    assert url in str(err.value)


def test_one_s3_client_serves_every_file_a_process_reads(dataset, url, tmp_path, monkeypatch):
    """Creating an S3 client costs ~0.2 s: the manifest, the indexes and every shard come through
    one per process, not one each (the cold-cache open was 1,700x slower that way)."""
    from streaming.base.storage.download import S3Downloader

    from blt_dist.data import remote

    made = []
    create = S3Downloader._create_s3_client

    def counted(self, **kw):  # the real client, counted
        made.append(1)
        return create(self, **kw)

    monkeypatch.setattr(S3Downloader, "_create_s3_client", counted)
    monkeypatch.setattr(remote, "_downloaders", threading.local(), raising=False)  # none made before this test
    read_all(url, tmp_path / "cache")
    shards = [p for p in (tmp_path / "cache").rglob("*.mds") if ".used" not in p.parts]  # not the LRU marks
    assert len(shards) == shard_count(dataset)  # every shard downloaded
    assert len(made) == 1


def test_an_unreachable_endpoint_is_one_clear_error(dataset, url, tmp_path, monkeypatch):
    monkeypatch.setenv("S3_ENDPOINT_URL", "http://127.0.0.1:9")  # the discard port: nothing listens
    with pytest.raises(UserError, match=r"dataset\.json: could not download"):
        ByteDataset(url, cache_dir=tmp_path / "cache")


def test_a_download_killed_half_way_is_never_trusted(dataset, url, tmp_path):
    """What kill -9 mid-download leaves: a partial file under the temporary name (and the lock
    file, whose flock died with the process). The next read ignores it and downloads again."""
    cache = tmp_path / "cache"
    ByteDataset(url, cache_dir=cache)  # the metadata
    root = next(p for p in cache.iterdir() if p.is_dir() and not p.name.startswith("."))
    shard = root / first_shard(dataset)
    partial = shard.with_name(f".{shard.name}.download")
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes((dataset / first_shard(dataset)).read_bytes()[:100])
    read_all(url, cache)
    assert shard.read_bytes() == (dataset / first_shard(dataset)).read_bytes()
    assert not partial.exists()


@pytest.mark.slow
def test_training_from_the_bucket_gives_the_local_losses(dataset, url, tmp_path):
    """A 2-rank training (2 loader workers each) from s3:// with a 3-shard cache: the same losses
    and data digests, bit for bit, as from the local directory."""
    limit = 3 * max(p.stat().st_size for p in dataset.rglob("*.mds"))
    common = ["train", "configs/entropy/tiny.yaml", "data.seq_len=128", "train.micro_batch_size=2", "log.every=1",
              "train.max_steps=4", "data.num_workers=2", "data.shuffle_block_shards=2"]
    common += ["train.eval_bytes=3000"]  # validation from the same place as the training data
    run(2, [*common, f"data.train={dataset}", f"data.val={dataset}", f"run.dir={tmp_path / 'local'}"],
        tmp_path / "logs_local")
    node = {"BLT_DIST_CACHE": str(tmp_path / "node")}  # everything remote must go to data.cache_dir instead
    run(2, [*common, f"data.train={url}", f"data.val={url}", f"data.cache_dir={tmp_path / 'cache'}",
            f"data.cache_limit={limit}", f"run.dir={tmp_path / 'remote'}"], tmp_path / "logs_remote", env=node)
    keys = ("step", "loss", "grad_norm", "data_digest")
    local = [tuple(r[k] for k in keys) for r in metrics(tmp_path / "local") if "loss" in r]
    remote = [tuple(r[k] for k in keys) for r in metrics(tmp_path / "remote") if "loss" in r]
    assert remote == local and len(local) == 4
    val = [[r["val_bpb"] for r in metrics(tmp_path / where) if "val_bpb" in r] for where in ("local", "remote")]
    assert val[0] == val[1] and len(val[0]) == 1
    assert not (tmp_path / "node" / "datasets").exists()


def test_entropies_from_the_bucket_equal_those_from_the_local_copy(dataset, url, tmp_path):
    from blt_dist.data.entropies import compute_entropy_dataset
    from blt_dist.training.export import save_export
    from tests.test_entropies import tiny_entropy_model, tree

    model, cfg = tiny_entropy_model(0)
    save_export(model.state_dict(), cfg, tmp_path / "model")
    compute_entropy_dataset(tmp_path / "model", dataset, tmp_path / "local", progress=False, dtype="fp32")
    compute_entropy_dataset(tmp_path / "model", url, tmp_path / "remote", progress=False, dtype="fp32")
    local, remote = tree(tmp_path / "local"), tree(tmp_path / "remote")
    named = ("job.json", "dataset.json")  # they name the input they read: the path or the URL
    assert {k: v for k, v in local.items() if k not in named} == {k: v for k, v in remote.items() if k not in named}
    for name in named:
        a, b = json.loads(local[name]), json.loads(remote[name])
        assert a.pop("byte_dataset") == str(dataset) and b.pop("byte_dataset") == url
        assert a == b
    # the entropy dataset itself from the bucket (its shards sit in part directories): the BLT
    # loader reads the same batches as from the local copy
    entropies_url = s3.upload(tmp_path / "local", "data", f"{url.rsplit('/', 1)[1]}-entropies")
    patching = dict(mode="entropy", threshold=1.0, threshold_r=None, patch_size=4, max_patch_length=8)
    blt = dict(family="blt", sample_len=64, patches_per_sample=24, patching=patching, split="train",
               micro_batch_size=2, seed=1, shuffle_block_shards=1)
    local_loader = Loader(LoaderSpec(path=str(tmp_path / "local"), **blt))
    remote_loader = Loader(LoaderSpec(path=entropies_url, cache_dir=str(tmp_path / "cache"), **blt))
    for _ in range(10):
        x, y = next(local_loader), next(remote_loader)
        assert all(x[k].equal(y[k]) for k in x if k != "facts")


def test_entropies_written_to_the_bucket_in_two_parts_on_two_nodes(dataset, server, tmp_path, monkeypatch):
    """--out s3://...: part 0/2 and part 1/2 computed with separate node caches (two machines);
    the second to finish fetches the first's part records, merges, uploads dataset.json last.
    The bucket then holds the local computation's entropy dataset, file for file."""
    from blt_dist.data.entropies import compute_entropy_dataset
    from blt_dist.training.export import save_export
    from tests.test_entropies import tiny_entropy_model, tree

    model, cfg = tiny_entropy_model(0)
    save_export(model.state_dict(), cfg, tmp_path / "model")
    compute_entropy_dataset(tmp_path / "model", dataset, tmp_path / "local", progress=False, dtype="fp32")
    out = "s3://outputs/written-entropies"
    s3.client().create_bucket(Bucket="outputs")
    monkeypatch.setenv("BLT_DIST_CACHE", str(tmp_path / "node0"))
    first = compute_entropy_dataset(tmp_path / "model", dataset, out, part=(0, 2), progress=False, dtype="fp32")
    assert first.manifest is None and first.pending > 0  # the other part is not done: no dataset.json yet
    with pytest.raises(UserError):
        ByteDataset(out, cache_dir=tmp_path / "reader")
    monkeypatch.setenv("BLT_DIST_CACHE", str(tmp_path / "node1"))
    second = compute_entropy_dataset(tmp_path / "model", dataset, out, part=(1, 2), progress=False, dtype="fp32")
    assert second.manifest is not None and second.done == first.pending
    fetched = tmp_path / "fetched"
    for key in [o["Key"] for o in s3.client().list_objects_v2(Bucket="outputs")["Contents"]]:
        target = fetched / key.removeprefix("written-entropies/")
        target.parent.mkdir(parents=True, exist_ok=True)
        s3.client().download_file("outputs", key, str(target))
    assert tree(fetched) == tree(tmp_path / "local")
    assert ByteDataset(out, cache_dir=tmp_path / "reader", format="blt-dist/entropy-shards/v1").fingerprint == \
        ByteDataset(tmp_path / "local", format="blt-dist/entropy-shards/v1").fingerprint
