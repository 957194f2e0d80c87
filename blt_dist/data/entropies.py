"""`blt-dist entropies`: run a frozen entropy model over byte shards -> entropy shards.

    blt-dist entropies --model runs/entropy-tiny/export --data data/bytes --out data/entropies
    blt-dist entropies ... --slurm --parts 8     # a Slurm array, one task per part (launch/entropy_array.py)
    blt-dist entropies ... --out s3://b/entropies --part I/N   # to an object store (RemoteOutput)

    H = document_entropies(model, [b"some text", ...], window=cfg.model.attention_window)

Entropies. For an encoded document (BOS + bytes + EOS, blt_dist.vocab) H_i is the entropy in
nats of the model's distribution for token i given tokens < i, read from the logits at
position i-1; H at BOS is 0 (the convention of patching.py). One float per encoded position:
len(data) + 2, stored as float16.

How rows are built. Each layer attends over a sliding window of `window` positions and never
across documents (doc ids), so through L layers a position's entropy depends only on the
L * (window - 1) tokens before it in its own document (its receptive field: one window per
layer, not one in all). `document_entropies` uses that twice:
  * long documents are cut into chunks, each preceded by the receptive field as left context,
    so every position sees exactly what it would see in the whole document and the result
    equals running the whole document at once, as generation does with its KV caches (up to
    float rounding: other matmul shapes);
  * short documents and chunks are packed several to a row with distinct doc ids, so rows are
    full and no position sees a token of another piece ("no mixing of rows"); rows are padded
    with PAD and doc id -1, which the mask keeps apart as well.

Precision (`--dtype`). `auto` runs the blocks under bf16 autocast where the hardware has bf16
matmuls (AVX-512 bf16 / AMX CPUs, recent GPUs), else fp32; the output head and the softmax
over the logits are always fp32, and entropies are stored as float16 either way. Measured on
the tiny entropy model (trained briefly on torch sources, 163 KB of held-out numpy sources):
|H_bf16 - H_fp32| mean 0.003, max 0.14 nats; at the threshold calibrated for 4.5 bytes/patch,
99.93% of start decisions are identical and 99.85% of fp32 boundaries are kept. `fp32` is the
exact reference. The dtype is recorded in job.json and dataset.json, and parts computed in
another dtype are refused.

Output layout = the byte dataset layout (shards.py) plus an `entropies` column, format
loader.ENTROPY_FORMAT:

    OUT/
      job.json                           what is being computed: byte dataset + entropy model
      train/<content_type>/part.00000/   one MDS directory per input shard (+ part.json)
      train/<content_type>/index.json    merged index: basenames part.NNNNN/shard.XXXXX.mds
      dataset.json                       written last: counts, byte_fingerprint, entropy_model

Restartable and splittable. Each input shard becomes its own part directory, written under a
temporary name, read back and checked, then renamed: a part either exists complete or not at
all, so a crashed or preempted run resumes at the next missing part. `--part I/N` takes only
the shards whose global number (over all streams in order) is I mod N. Whichever invocation
finds every part complete merges the indexes and writes dataset.json; the merge is
deterministic and each file is replaced atomically, so two parts finishing together write the
same bytes. Entropies of a shard depend only on that shard, so any split gives the same
dataset as one run (on the same kind of machine: fp32 matmuls can round differently
elsewhere).

Workers and devices (`--workers N`, `--device`). One process uses the intra-op threads of its
cores, but the tiny models' small matmuls scale poorly across threads: N worker processes of
cores/N threads each are faster (the demo's 2.8 MB on 2 cores: 110 s with 2 workers of 1 thread,
130 s in one process of 2 threads, the same bytes). Workers take this part's shards largest
first from one queue, so they finish close together; on CUDA worker i uses GPU i mod the GPU
count (one worker per GPU: `--workers` = `torch.cuda.device_count()`). `--device auto` is CUDA
when there is one, else CPU. Workers only change who computes a shard, not what it holds (fp32
on CPU is bit-identical; tests check it).
"""
from __future__ import annotations

import argparse
import bisect
import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from tqdm import tqdm

from blt_dist import shims
from blt_dist.data.integrity import cache_root
from blt_dist.data.loader import ENTROPY_FORMAT
from blt_dist.data.remote import ShardCache, Uploader, download, fetch_metadata, is_remote, join
from blt_dist.data.shards import (
    COLUMNS,
    LENGTHS,
    MANIFEST,
    SHARD_HASHES,
    ByteDataset,
    StreamHash,
    index_digest,
    iter_stream,
    verify_shard,
    verify_stream,
    write_lengths,
)
from blt_dist.data.shards import (
    FORMAT as BYTE_FORMAT,
)
from blt_dist.errors import UserError
from blt_dist.hardware import bf16_is_native
from blt_dist.model.weights import WEIGHTS, export_info, file_sha256, load_export
from blt_dist.vocab import PAD_ID, encode_document

__all__ = ["ENTROPY_COLUMNS", "NonFiniteEntropy", "document_entropies", "compute_entropy_dataset"]

ENTROPY_COLUMNS = {**COLUMNS, "entropies": "ndarray:float16"}
JOB = "job.json"
PART_INFO = "part.json"
DEFAULT_BATCH_POSITIONS = 16384
DTYPES = ("auto", "fp32", "bf16")
ROW_WINDOWS = 4  # default row length in receptive fields: ~1/4 of a long document's positions is context
GROUP_BATCHES = 8  # documents are read and written in groups of about this many forward passes


# ---------------------------------------------------------------------------------------------
# Computing entropies


class NonFiniteEntropy(UserError):
    """The model produced NaN or inf for a document (broken weights, or an overflow)."""

    def __init__(self, document: int, position: int):
        self.document, self.position = document, position
        super().__init__(f"document {document}: non-finite entropy at encoded position {position}")


@dataclass(frozen=True)
class _Piece:
    """Positions [out_start, out_end) of one document's model input, read with left context
    from ctx_start. The model input of a document is its encoded ids without the final EOS:
    the logits at input position j give H_{j+1}."""

    doc: int
    ctx_start: int
    out_start: int
    out_end: int

    @property
    def length(self) -> int:
        return self.out_end - self.ctx_start


def _pieces(input_lengths: Sequence[int], chunk: int, context: int) -> list[_Piece]:
    pieces = []
    for doc, n in enumerate(input_lengths):
        for start in range(0, n, chunk):
            pieces.append(_Piece(doc, max(0, start - context), start, min(n, start + chunk)))
    return pieces


def _pack_rows(pieces: list[_Piece], row_positions: int) -> list[list[int]]:
    """Best-fit decreasing: piece indices per row, no row longer than row_positions.

    Pieces go longest first into the open row with the least room that still fits them (a
    sorted list of (room, row) and a bisection: O(n log n), deterministic)."""
    rows: list[list[int]] = []
    open_rows: list[tuple[int, int]] = []  # (free positions, row number), sorted
    for index in sorted(range(len(pieces)), key=lambda k: -pieces[k].length):  # stable: deterministic
        length = pieces[index].length
        at = bisect.bisect_left(open_rows, (length, -1))
        if at < len(open_rows):
            room, row = open_rows.pop(at)
        else:
            room, row = row_positions, len(rows)
            rows.append([])
        rows[row].append(index)
        if room - length > 0:
            bisect.insort(open_rows, (room - length, row))
    return rows


def _encoded(document) -> np.ndarray:
    if isinstance(document, (bytes, bytearray, memoryview)):
        return encode_document(bytes(document))
    ids = np.asarray(document, dtype=np.int64)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"an encoded document is a non-empty 1-D id array, got shape {ids.shape}")
    return ids


DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """The device of a --device choice; "auto" is CUDA when there is one."""
    if name not in DEVICES:
        raise UserError(f"--device: one of {', '.join(DEVICES)}, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device here (torch.cuda.is_available() is False); use --device cpu")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def resolve_dtype(name: str, device: torch.device) -> str:
    """"fp32" or "bf16" for a --dtype choice; "auto" is bf16 where the hardware runs it natively."""
    if name not in DTYPES:
        raise UserError(f"--dtype: one of {', '.join(DTYPES)}, got {name!r}")
    if name == "auto":
        return "bf16" if bf16_is_native(device) else "fp32"
    return name


def _logits_at(model: torch.nn.Module, tokens: torch.Tensor, doc_ids: torch.Tensor, flat_positions: torch.Tensor):
    """fp32 logits [N, vocab] at the given flat (row * length + column) positions only.

    The model's own stages (CausalLM: embed, mask_and_rope, blocks, head), so the head runs
    only where an entropy is wanted (not on left context or padding), and always in fp32: under
    bf16 autocast the blocks run in bf16 but rounding the logits to bf16 (~0.03 at |logit| ~10)
    was the largest error in the entropies, and it is what flips boundaries at a threshold."""
    h = model.embed(tokens)
    attention, rope = model.mask_and_rope(tokens.shape[1], doc_ids, tokens.device)
    for block in model.blocks:
        h = block(h, attention, rope)
    h = h.reshape(-1, h.shape[-1])[flat_positions]
    with torch.autocast(tokens.device.type, enabled=False):
        return model.head(h.float())


def entropy_nats(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of softmax(logits) over the last axis: the one definition the offline
    pass and online patching in generation share."""
    log_p = torch.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


def cached_entropies(model: torch.nn.Module, tokens: torch.Tensor, cache, dtype: str = "fp32") -> torch.Tensor:
    """Entropies (nats) after each of the next tokens [B, t] fed to the model's cache
    (generation's online patching): the blocks in `dtype` as the offline pass runs them, the
    head in fp32 (see _logits_at)."""
    device_type = tokens.device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
        hidden = model.hidden_cached(tokens, cache)
    with torch.autocast(device_type, enabled=False):
        return entropy_nats(model.head(hidden.float()))


def recorded_dtype(entropy_dataset: Union[str, Path, None]) -> Optional[str]:
    """The dtype an entropy dataset's entropies were computed in (its dataset.json; fp32 for
    datasets made before it was recorded), or None when `entropy_dataset` is not one."""
    if not entropy_dataset:
        return None
    manifest = _read_json(Path(entropy_dataset) / MANIFEST)
    if not manifest or "entropy_model" not in manifest:
        return None
    return manifest.get("compute_dtype", "fp32")


def entropy_dtype_for(cfg, given: Optional[str] = None) -> tuple[str, str]:
    """(dtype, where it comes from) for recomputing a BLT's entropies as its training data
    has them: `given` (a command-line choice), else the dtype recorded by the entropy dataset
    the BLT trained on (data.train), else fp32."""
    if given:
        return given, "given"
    recorded = recorded_dtype(cfg.data.train)
    if recorded:
        return recorded, f"as recorded by {cfg.data.train}"
    return "fp32", "fp32: no entropy dataset of the training data found"


def receptive_field(model: torch.nn.Module, window: int) -> int:
    """Left context that reaches a position's output through the model's windowed layers. Each
    mask lets query j see keys j-window+1..j, so L layers reach L * (window - 1) back; one more
    per layer keeps it exact under either reading of "window" and costs L positions."""
    return len(model.blocks) * window


def document_entropies(
    model: torch.nn.Module,
    documents: Sequence[Union[bytes, np.ndarray]],
    window: int,
    batch_positions: int = DEFAULT_BATCH_POSITIONS,
    row_positions: Optional[int] = None,
    dtype: str = "fp32",
) -> list[np.ndarray]:
    """Entropies (float32, nats) for every encoded position of each document.

    model: a CausalLM (family entropy); its stages are called so the head runs in fp32 only
        where an entropy is wanted (see _logits_at).

    documents: raw bytes (encoded here as BOS + bytes + EOS) or encoded id arrays.
    window: the model's attention window (cfg.model.attention_window).
    batch_positions: positions per forward pass (whole rows, at least one row).
    row_positions: row length (default 4 receptive fields, see receptive_field); longer
        documents are chunked. Results do not depend on it beyond float rounding.
    dtype: "fp32" (exact reference), "bf16" (autocast: matmuls and attention in bf16, the
        softmax over logits in fp32; entropies move by ~1e-2 nats) or "auto" (resolve_dtype).
    Raises NonFiniteEntropy naming the document (its index in `documents`).
    """
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive number of positions, got {window!r}")
    context = receptive_field(model, window)
    row_positions = ROW_WINDOWS * context if row_positions is None else row_positions
    if row_positions <= context:
        raise ValueError(f"row_positions ({row_positions}) must exceed the receptive field ({context}: "
                         f"{len(model.blocks)} layers of window {window})")
    if batch_positions < 1:
        raise ValueError(f"batch_positions must be positive, got {batch_positions}")
    encoded = [_encoded(d) for d in documents]
    pieces = _pieces([ids.size - 1 for ids in encoded], chunk=row_positions - context, context=context)
    rows = _pack_rows(pieces, row_positions)
    rows_per_batch = max(1, batch_positions // row_positions)
    out = [np.zeros(ids.size, dtype=np.float32) for ids in encoded]  # H at BOS stays 0
    device = next(model.parameters()).device
    dtype = resolve_dtype(dtype, device)

    was_training = model.training
    model.eval()
    try:
        # One autocast region around every batch: its cache casts each weight to bf16 once.
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            for first in range(0, len(rows), rows_per_batch):
                batch = rows[first : first + rows_per_batch]
                length = max(sum(pieces[k].length for k in row) for row in batch)
                tokens = np.full((len(batch), length), PAD_ID, dtype=np.int64)
                doc_ids = np.full((len(batch), length), -1, dtype=np.int64)
                flat_targets, owners = [], []  # flat row*length+column of each output; (doc, out_start, out_end)
                for r, row in enumerate(batch):
                    column = 0
                    for slot, k in enumerate(row):
                        p = pieces[k]
                        tokens[r, column : column + p.length] = encoded[p.doc][p.ctx_start : p.out_end]
                        doc_ids[r, column : column + p.length] = slot  # distinct per piece in a row
                        skip = p.out_start - p.ctx_start
                        flat_targets.append(r * length + column + skip + np.arange(p.out_end - p.out_start))
                        owners.append(p)
                        column += p.length
                picked = _logits_at(model, torch.from_numpy(tokens).to(device), torch.from_numpy(doc_ids).to(device),
                                    torch.from_numpy(np.concatenate(flat_targets)).to(device))
                entropy = entropy_nats(picked).cpu().numpy()
                offset = 0
                for p in owners:
                    count = p.out_end - p.out_start
                    out[p.doc][p.out_start + 1 : p.out_end + 1] = entropy[offset : offset + count]
                    offset += count
    finally:
        model.train(was_training)

    bad = [k for k, H in enumerate(out) if not np.isfinite(H).all()]
    if bad:
        # A NaN crosses masks (a masked key's weight is 0, and 0 * NaN is NaN), so one bad
        # document poisons its row: find one that is non-finite on its own to name it.
        if len(documents) > 1:
            for k in bad:
                try:
                    document_entropies(model, [encoded[k]], window, batch_positions, row_positions, dtype)
                except NonFiniteEntropy as err:
                    raise NonFiniteEntropy(k, err.position) from None
        k = bad[0]
        raise NonFiniteEntropy(k, int(np.flatnonzero(~np.isfinite(out[k]))[0]))
    return out


# ---------------------------------------------------------------------------------------------
# The entropy dataset


@dataclass(frozen=True)
class ShardTask:
    """One input shard and the part directory it becomes."""

    number: int  # global shard number over every stream, in order: what --part splits on
    split: str
    content_type: str
    index: int  # shard number within its stream
    stream_dir: Path  # input stream
    info: dict  # the shard's entry in the input index.json
    url: Optional[str] = None  # a remote input dataset: its URL (stream_dir is in the node cache)
    fingerprint: Optional[str] = None

    def fetch(self) -> None:
        """Brings a remote input shard into the node cache, verified (no-op for local input)."""
        if self.url is not None:
            cache = ShardCache(self.stream_dir.parents[1], self.url)
            rel = f"{self.split}/{self.content_type}/{self.info['raw_data']['basename']}"
            cache.ensure(rel, self.info["raw_data"], f"{self.url}: stream {self.split}/{self.content_type}",
                         self.fingerprint)

    @property
    def part_name(self) -> str:
        return f"part.{self.index:05d}"

    def out_dir(self, out: Path) -> Path:
        return out / self.split / self.content_type / self.part_name


def list_shards(dataset: ByteDataset) -> list[ShardTask]:
    tasks = []
    for stream in dataset.streams():
        index_json = verify_stream(stream.path, dataset.index_sha256(stream), shards_local=dataset.url is None)
        for index, info in enumerate(index_json["shards"]):
            tasks.append(ShardTask(len(tasks), stream.split, stream.content_type, index, stream.path, info,
                                   dataset.url, dataset.fingerprint))
    return tasks


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: unreadable ({err})") from err


def _identity(record: dict) -> tuple:
    """What must agree between existing output and this run (datasets written before the
    dtype was recorded were computed in fp32)."""
    return record.get("byte_fingerprint"), record.get("entropy_model"), record.get("compute_dtype", "fp32")


def _describe(record: dict) -> str:
    model = record.get("entropy_model") or {}
    return (
        f"byte dataset {str(record.get('byte_fingerprint'))[:16]}, entropy model weights "
        f"{str(model.get('weights_sha256'))[:16]} (window {(model.get('config') or {}).get('window')}), "
        f"computed in {record.get('compute_dtype', 'fp32')}"
    )


def _prepare_output(out: Path, data: Path, job: dict, force: bool) -> None:
    """Checks existing output against this job (refusing a mismatch unless --force, which
    starts over), then records the job in OUT/job.json."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    if not is_remote(data) and out.resolve() == Path(data).resolve():
        raise UserError(f"--out {out} is the byte dataset itself; choose another directory")
    if out.is_dir() and any(out.iterdir()):
        manifest, existing_job = _read_json(out / MANIFEST), _read_json(out / JOB)
        if manifest is not None and manifest.get("format") != ENTROPY_FORMAT:
            raise UserError(f"{out}: holds a dataset of format {manifest.get('format')!r}, not entropies; refusing to touch it")
        existing = manifest or existing_job
        if existing is None:
            raise UserError(f"{out}: exists and holds other data; refusing to write entropies there")
        if force:
            trash = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(trash)
            shutil.rmtree(trash)
        elif _identity(existing) != _identity(job):
            raise UserError(
                f"{out}: holds entropies of {_describe(existing)}; this run has {_describe(job)}. "
                f"Use another --out, or pass --force to delete it and start over"
            )
    out.mkdir(parents=True, exist_ok=True)
    # Several array tasks may start at once: create job.json exclusively (link fails if it
    # exists), then everyone compares against the one that won.
    tmp = out / f".{JOB}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(job, indent=2, sort_keys=True) + "\n")
    try:
        os.link(tmp, out / JOB)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    if _identity(_read_json(out / JOB)) != _identity(job):
        raise UserError(f"{out}: another run is computing entropies of {_describe(_read_json(out / JOB))} there")


def part_complete(out: Path, task: ShardTask) -> bool:
    part = task.out_dir(out)
    return (part / PART_INFO).is_file() and (part / "index.json").is_file()


def write_part(task: ShardTask, model, window: int, out: Path, batch_positions: int, shard_size, bar,
               dtype: str = "fp32") -> dict:
    """Computes one input shard's entropies into its part directory (temp name, checked, renamed).
    Returns the part record (also written to part.json)."""
    # lazy: `import streaming` costs 2 s over torch (measured); only shard I/O needs it
    from streaming.base.format import reader_from_json

    final = task.out_dir(out)
    tmp = final.with_name(f".{final.name}.tmp")
    if tmp.exists():  # left by a crashed run of this part: never published, safe to discard
        shutil.rmtree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    # the input is checked (sha256: this job is long, the hash is not) before its bytes are passed
    # on: a corrupt shard would otherwise leave here under a fresh, valid hash
    task.fetch()
    verify_shard(task.stream_dir, task.info["raw_data"], None, f"{task.url or task.stream_dir}", algo="sha256")
    reader = reader_from_json(str(task.stream_dir), None, task.info)
    written_bytes, written_entropies = StreamHash(), hashlib.sha256()
    documents = nbytes = 0
    group_positions = GROUP_BATCHES * batch_positions

    def flush(group: list[dict]) -> None:
        nonlocal documents, nbytes
        try:
            entropies = document_entropies(model, [s["data"] for s in group], window, batch_positions, dtype=dtype)
        except NonFiniteEntropy as err:
            sample = group[err.document]
            raise UserError(
                f"{task.split}/{task.content_type} document {sample['doc']} ({sample['source']}): the entropy "
                f"model produced a non-finite entropy at encoded position {err.position}; refusing to write it"
            ) from err
        for sample, H in zip(group, entropies):
            H16 = H.astype(np.float16)
            writer.write({"data": sample["data"], "doc": sample["doc"], "source": sample["source"], "entropies": H16})
            written_bytes.add_document(sample["data"])
            written_entropies.update(H16.tobytes())
            documents += 1
            nbytes += len(sample["data"])
            bar.update(len(sample["data"]))

    try:
        writer = shims.local_mds_writer(tmp, ENTROPY_COLUMNS, shard_size, SHARD_HASHES)
        group, positions = [], 0
        for i in range(reader.samples):
            sample = reader.get_item(i)
            group.append(sample)
            positions += len(sample["data"]) + 1
            if positions >= group_positions:
                flush(group)
                group, positions = [], 0
        if group:
            flush(group)
        writer.finish()
        record = {
            "input_shard": task.info["raw_data"]["basename"],
            "documents": documents,
            "bytes": nbytes,
            "bytes_sha256": written_bytes.hexdigest(),
            "entropies_sha256": written_entropies.hexdigest(),
        }
        _check_part(tmp, record, expected_documents=reader.samples)
        _write_json_atomic(tmp / PART_INFO, record)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record


def _check_part(part_dir: Path, record: dict, expected_documents: int) -> None:
    """Reads a part back: documents, bytes and entropies exactly as written, none lost."""
    documents, nbytes, data_hash, entropy_hash = 0, 0, StreamHash(), hashlib.sha256()
    for sample in iter_stream(part_dir):
        H = sample["entropies"]
        if H.dtype != np.float16 or H.shape != (len(sample["data"]) + 2,):
            raise RuntimeError(f"{part_dir}: document {sample['doc']} read back with entropies {H.dtype}{H.shape}")
        documents += 1
        nbytes += len(sample["data"])
        data_hash.add_document(sample["data"])
        entropy_hash.update(H.tobytes())
    got = (documents, nbytes, data_hash.hexdigest(), entropy_hash.hexdigest())
    want = (expected_documents, record["bytes"], record["bytes_sha256"], record["entropies_sha256"])
    if got != want or record["documents"] != expected_documents:
        raise RuntimeError(f"{part_dir}: wrote {want} (documents, bytes, sha256s) but read back {got}")


def _merge(out: Path, dataset: ByteDataset, tasks: list[ShardTask], job: dict, shards_here: bool = True) -> dict:
    """Every part is complete: one index.json per stream, then dataset.json (last). shards_here:
    False for a remote output, whose parts may have been computed (and kept) elsewhere."""
    streams: dict[tuple[str, str], list[ShardTask]] = {}
    for task in tasks:
        streams.setdefault((task.split, task.content_type), []).append(task)
    splits: dict[str, dict] = {}
    fingerprint_lines = [f"byte_fingerprint:{job['byte_fingerprint']}", f"entropy_model:{job['entropy_model']['weights_sha256']}"]
    for stream in dataset.streams():
        key = (stream.split, stream.content_type)
        shards, documents, nbytes, part_digests = [], 0, 0, []
        for task in streams.get(key, []):
            part = task.out_dir(out)
            record = _read_json(part / PART_INFO)
            if record["documents"] != task.info["samples"] or record["input_shard"] != task.info["raw_data"]["basename"]:
                raise UserError(f"{part}: made from another input shard ({record['input_shard']}); re-run with --force")
            for shard in verify_stream(part, shards_local=shards_here)["shards"]:
                for column in ("raw_data", "zip_data", "raw_meta", "zip_meta"):
                    if shard.get(column):
                        shard[column]["basename"] = f"{task.part_name}/{shard[column]['basename']}"
                shards.append(shard)
            documents += record["documents"]
            nbytes += record["bytes"]
            part_digests.append(record["entropies_sha256"])
        if (documents, nbytes) != (stream.documents, stream.bytes):
            raise UserError(
                f"{out / stream.split / stream.content_type}: {documents} documents / {nbytes} bytes out, "
                f"the byte dataset has {stream.documents} / {stream.bytes}"
            )
        stream_out = out / stream.split / stream.content_type
        _write_json_atomic(stream_out / "index.json", {"version": 2, "shards": shards})
        lengths_sha256 = write_lengths(stream_out, _document_lengths(dataset, stream, stream_out, shards_here))
        entropies_sha256 = hashlib.sha256("".join(part_digests).encode()).hexdigest()
        splits.setdefault(stream.split, {})[stream.content_type] = {
            "documents": documents,
            "bytes": nbytes,
            "shards": len(shards),
            "parts": len(streams.get(key, [])),
            "entropies_sha256": entropies_sha256,
            "index_sha256": index_digest(stream_out),
            "lengths_sha256": lengths_sha256,
        }
        fingerprint_lines.append(f"{stream.split}/{stream.content_type}:{entropies_sha256}")
    manifest = {
        **job,
        "fingerprint": hashlib.sha256(("\n".join(fingerprint_lines) + "\n").encode()).hexdigest(),
        "splits": splits,
    }
    _write_json_atomic(out / MANIFEST, manifest)
    if shards_here:
        ByteDataset(out, format=ENTROPY_FORMAT)  # what the BLT loader will open: check it opens
    return manifest


def _document_lengths(dataset: ByteDataset, stream, stream_out: Path, shards_here: bool = True):
    """The byte dataset's document lengths (the same documents, in the same order), or, for one
    written before lengths existed, counted from the entropy shards just merged."""
    if dataset.manifest["splits"][stream.split][stream.content_type].get("lengths_sha256"):
        return dataset.document_lengths(stream)
    if not shards_here:
        raise UserError(f"{dataset.name}: written before document lengths, which a remote --out takes from it; run "
                        f"`blt-dist verify {dataset.name} --stamp` on a local copy first")
    return [len(sample["data"]) for sample in iter_stream(stream_out, check_shards=False)]


class RemoteOutput:
    """An entropy dataset written to a URL. It is computed in a node-local staging directory
    (under $BLT_DIST_CACHE) exactly as a local one; each finished part is uploaded (its shards and
    index, then part.json, the part's completion mark), parts finished elsewhere are fetched as
    part.json + index.json, and the merge uploads every stream's index and lengths, then
    dataset.json last: a reader never sees a manifest before the files it names."""

    def __init__(self, staging: Path, url: str, job: dict, force: bool):
        self.staging, self.url, self.force = staging, url, force
        self.pushed: set[int] = set()
        theirs = self._fetch(JOB)
        if theirs is not None and not force and _identity(theirs) != _identity(job):
            raise UserError(f"{url}: holds entropies of {_describe(theirs)}; this run has {_describe(job)}. Use "
                            "another --out, or pass --force to overwrite it")
        self.uploader = Uploader(staging, url)
        self.uploader.put(JOB)  # also shows, before any computing, that the store takes our files

    @staticmethod
    def staging(url: str) -> Path:
        return cache_root() / "entropies-out" / hashlib.sha256(url.encode()).hexdigest()[:16]

    def _fetch(self, rel: str, local: Optional[Path] = None) -> Optional[dict]:
        """A small JSON file of the output, or None where the store has none."""
        target = local or self.staging / ".fetched" / rel
        try:
            download(join(self.url, rel), target)
        except UserError:
            return None
        return _read_json(target)

    def pull_parts(self, tasks: list[ShardTask]) -> None:
        if self.force:  # starting over: what the store holds is replaced, never reused
            return
        for task in tasks:
            if part_complete(self.staging, task):
                continue
            rel = task.out_dir(self.staging).relative_to(self.staging).as_posix()
            fetched = self.staging / ".fetched" / rel
            if self._fetch(f"{rel}/{PART_INFO}", fetched / PART_INFO) is None:
                continue
            download(join(self.url, rel, "index.json"), fetched / "index.json")
            task.out_dir(self.staging).parent.mkdir(parents=True, exist_ok=True)
            os.replace(fetched, task.out_dir(self.staging))  # its shards stay in the store
            self.pushed.add(task.number)

    def push_parts(self, tasks: list[ShardTask]) -> None:
        for task in tasks:
            if task.number in self.pushed or not part_complete(self.staging, task):
                continue
            part = task.out_dir(self.staging)
            files = sorted(p for p in part.rglob("*") if p.is_file() and p.name != PART_INFO)
            for path in [*files, part / PART_INFO]:
                self.uploader.put(path.relative_to(self.staging).as_posix())
            self.pushed.add(task.number)

    def push_dataset(self, dataset: ByteDataset) -> None:
        for stream in dataset.streams():
            for name in ("index.json", LENGTHS):
                self.uploader.put(f"{stream.split}/{stream.content_type}/{name}")
        self.uploader.put(MANIFEST)
        ByteDataset(self.url, format=ENTROPY_FORMAT)  # what the BLT loader will open: check it opens


@dataclass
class EntropyRun:
    """What one invocation did."""

    part: tuple[int, int]
    done: int  # shards computed by this invocation
    skipped: int  # shards of this part found complete
    pending: int  # shards of other parts not complete yet
    documents: int
    bytes: int
    seconds: float
    manifest: Optional[dict]  # set when this invocation completed the dataset
    dtype: str  # the compute dtype actually used (fp32 | bf16)


def compute_entropy_dataset(
    model_dir: Union[str, Path],
    data: Union[str, Path],
    out: Union[str, Path],
    *,
    part: tuple[int, int] = (0, 1),
    batch_positions: int = DEFAULT_BATCH_POSITIONS,
    shard_size: Union[str, int] = "64mb",
    force: bool = False,
    progress: bool = True,
    dtype: str = "auto",
    device: str = "auto",
    workers: int = 1,
) -> EntropyRun:
    remote_out = str(out) if is_remote(out) else None
    model_dir = Path(model_dir)
    out = RemoteOutput.staging(remote_out) if remote_out else Path(out)  # a URL: computed here, then uploaded
    data = str(data) if is_remote(data) else Path(data)
    this, count = part
    if not (count >= 1 and 0 <= this < count):
        raise UserError(f"--part {this}/{count}: expected I/N with 0 <= I < N")
    if batch_positions < 1:
        raise UserError(f"--batch-positions must be positive, got {batch_positions}")
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    where = resolve_device(device)
    model, cfg = load_entropy_model(model_dir, where)
    window = cfg.model.attention_window
    dtype = resolve_dtype(dtype, where)
    # The dataset is tied to the weights actually used, not to what export.json claims.
    weights_sha256 = file_sha256(model_dir / WEIGHTS)
    if weights_sha256 != export_info(model_dir).get("weights_sha256"):
        raise UserError(f"{model_dir / WEIGHTS}: sha256 differs from the one in export.json (weights replaced or damaged)")
    dataset = ByteDataset(data)
    job = {
        "format": ENTROPY_FORMAT,
        "byte_dataset": str(data),
        "byte_fingerprint": dataset.fingerprint,
        # model.attention picks a kernel, not a function (every path is exact): it is not part of
        # what the entropies are, so datasets made before the knob existed still match
        "entropy_model": {"weights_sha256": weights_sha256,
                          "config": {k: v for k, v in dataclasses.asdict(cfg.model).items() if k != "attention"}},
        # bf16 and fp32 entropies differ in the last bits, so parts computed in different
        # dtypes (an array spread over machines with and without bf16) must not be mixed.
        "compute_dtype": dtype,
    }
    job = json.loads(json.dumps(job))  # as it reads back from job.json (lists, not tuples), so they compare
    _prepare_output(out, data, job, force)
    tasks = list_shards(dataset)
    remote = RemoteOutput(out, remote_out, job, force) if remote_out else None
    if remote is not None:
        remote.pull_parts(tasks)  # parts other tasks or earlier runs finished: not computed again

    mine = [t for t in tasks if t.number % count == this]
    todo = [t for t in mine if not part_complete(out, t)]
    documents = nbytes = 0
    start = time.perf_counter()
    # The bar's total is the shard files' size, a little above the document bytes it counts.
    total = sum(t.info["raw_data"]["bytes"] for t in todo)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"entropies {this}/{count}", disable=not progress) as bar:
        parallel = workers > 1 and len(todo) > 1
        if parallel:
            del model  # each worker loads its own copy
            records = _parallel_parts(todo, workers, model_dir, where, out, batch_positions, shard_size, dtype)
        else:
            records = (write_part(task, model, window, out, batch_positions, shard_size, bar, dtype) for task in todo)
        for record in records:
            documents += record["documents"]
            nbytes += record["bytes"]
            if parallel:
                bar.update(record["bytes"])  # a whole shard at a time: workers cannot share the bar
            if remote is not None:
                remote.push_parts(todo)  # each part as soon as it is complete
        bar.total = bar.n  # end at 100%
    seconds = time.perf_counter() - start
    if remote is not None:
        remote.push_parts(todo)
        remote.pull_parts(tasks)  # what other tasks finished meanwhile: the last one to finish merges
    pending = sum(not part_complete(out, t) for t in tasks)
    manifest = None
    if pending == 0:
        manifest = _merge(out, dataset, tasks, job, shards_here=remote is None)
        if remote is not None:
            remote.push_dataset(dataset)
    return EntropyRun((this, count), len(todo), len(mine) - len(todo), pending, documents, nbytes, seconds, manifest,
                      dtype)


def _parallel_parts(todo: list[ShardTask], workers: int, model_dir: Path, device: torch.device, out: Path,
                    batch_positions: int, shard_size, dtype: str):
    """Part records of `todo`, computed by `workers` processes (spawned: forking a process whose
    OpenMP threads are running is unsafe), largest shard first, yielded as each finishes. A worker's error stops
    the pool and is raised here; finished parts stay (the run resumes at the missing ones)."""
    context = multiprocessing.get_context("spawn")
    slots = context.Queue()
    for slot in range(workers):
        slots.put(slot)
    processes = min(workers, len(todo))
    threads = max(1, len(os.sched_getaffinity(0)) // processes)
    largest_first = sorted(todo, key=lambda t: -t.info["raw_data"]["bytes"])
    jobs = [(task, out, batch_positions, shard_size, dtype) for task in largest_first]
    with context.Pool(processes, initializer=_worker_start,
                      initargs=(slots, str(model_dir), device.type, threads)) as pool:
        yield from pool.imap_unordered(_worker_part, jobs, chunksize=1)


_worker_state: dict = {}


def _worker_start(slots, model_dir: str, device_type: str, threads: int) -> None:
    slot = slots.get()
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    if device_type == "cuda":
        device = torch.device("cuda", slot % torch.cuda.device_count())
        torch.cuda.set_device(device)
    model, cfg = load_entropy_model(model_dir, device)
    _worker_state.update(model=model, window=cfg.model.attention_window)


class _NoBar:
    """A worker's stand-in for the progress bar: the parent counts whole shards."""

    def update(self, n: int) -> None:
        pass


def _worker_part(job) -> dict:
    task, out, batch_positions, shard_size, dtype = job
    return write_part(task, _worker_state["model"], _worker_state["window"], out, batch_positions, shard_size,
                      _NoBar(), dtype)


def check_entropy_source(entropy_dataset: Union[str, Path], model_dir: Union[str, Path]) -> None:
    """Refuses an entropy dataset that another entropy model produced: patches cut from one
    model's entropies mean nothing to a BLT evaluated (or trained on) with another's. A byte
    dataset passes: a BLT validated on one computes its entropies with the given model."""
    root = fetch_metadata(str(entropy_dataset)) if is_remote(entropy_dataset) else Path(entropy_dataset)
    manifest = _read_json(root / "dataset.json") or {}
    if manifest.get("format") == BYTE_FORMAT:
        return
    recorded = (manifest.get("entropy_model") or {}).get("weights_sha256")
    given = export_info(model_dir).get("weights_sha256")
    if recorded != given:
        raise UserError(
            f"{entropy_dataset}: its entropies come from entropy model {str(recorded)[:16]}, but {model_dir} is "
            f"{str(given)[:16]}; use the model that produced the dataset (or recompute the entropies)"
        )


def load_entropy_model(path: Union[str, Path], device: Union[str, torch.device] = "cpu"):
    """(model, cfg) of an entropy-model export; a UserError for any other kind of model."""
    family = export_info(path).get("family")
    if family != "entropy":
        raise UserError(f"{path}: a {family!r} model export, not an entropy model (train one with configs/entropy/*.yaml)")
    return load_export(path, device)


# ---------------------------------------------------------------------------------------------
# CLI


def _part_arg(text: str) -> tuple[int, int]:
    try:
        this, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N (e.g. 0/4), got {text!r}") from None
    if not (count >= 1 and 0 <= this < count):
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N, got {text!r}")
    return this, count


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, metavar="EXPORT_DIR", help="entropy-model export directory")
    parser.add_argument("--data", required=True, metavar="BYTE_DATASET",
                        help="byte dataset (`blt-dist prepare`): a directory or a URL (s3://..., gs://...)")
    parser.add_argument("--out", required=True, metavar="ENTROPY_DATASET",
                        help="entropy dataset to write: a directory or a URL (computed in a node-local staging "
                             "directory, each part uploaded when complete, dataset.json last)")
    parser.add_argument(
        "--part", type=_part_arg, default=(0, 1), metavar="I/N",
        help="process only input shards whose number is I mod N (Slurm arrays); the last part to finish merges",
    )
    parser.add_argument(
        "--batch-positions", type=int, default=DEFAULT_BATCH_POSITIONS,
        help=f"positions per forward pass (default {DEFAULT_BATCH_POSITIONS})",
    )
    parser.add_argument(
        "--dtype", choices=DTYPES, default="auto",
        help="compute precision: auto = bf16 where the CPU/GPU runs it natively (entropies move by ~3e-3 nats; "
        "99.9%% of patch-start decisions at a calibrated threshold as in fp32), else fp32; fp32 = the exact reference",
    )
    parser.add_argument(
        "--device", choices=DEVICES, default="auto", help="where the model runs (auto: CUDA when there is one)",
    )
    parser.add_argument(
        "--workers", type=int, default=1,
        help="worker processes, each with cores/N threads (or GPU i mod the GPU count); they take shards largest "
        "first (default 1; on a CPU machine 2 or more is faster for small entropy models)",
    )
    parser.add_argument(
        "--force", action="store_true",
        help="delete existing output and start over (once, before an array: every task would delete the others' work)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")



def run(args: argparse.Namespace) -> int:
    result = compute_entropy_dataset(
        args.model, args.data, args.out,
        part=args.part, batch_positions=args.batch_positions, force=args.force, progress=not args.no_progress,
        dtype=args.dtype, device=args.device, workers=args.workers,
    )
    this, count = result.part
    rate = result.bytes / result.seconds if result.seconds > 0 else 0.0
    print(
        f"part {this}/{count}: {result.documents:,} documents, {result.bytes:,} bytes in {result.seconds:.1f} s "
        f"({rate:,.0f} bytes/s, {result.dtype}); {result.done} shards computed, {result.skipped} already complete (skipped)"
    )
    if result.manifest is None:
        print(f"{result.pending} shards of other parts not complete yet; the part that completes the last one merges")
        return 0
    m = result.manifest
    total_docs = sum(s["documents"] for t in m["splits"].values() for s in t.values())
    total_bytes = sum(s["bytes"] for t in m["splits"].values() for s in t.values())
    print(
        f"{args.out}: complete, {total_docs:,} documents, {total_bytes:,} bytes (= the byte dataset's); "
        f"fingerprint {m['fingerprint'][:16]}"
    )
    return 0
