"""Training batches for the three families, with exact resume and exactly-once coverage.

    loader = Loader(LoaderSpec.for_family(cfg, "blt", split="train"), rank, world_size, num_workers=2)
    batch = next(loader)            # dict of int64 tensors [micro_batch, ...] (see packing.py)
    state = loader.state_dict()     # goes into the checkpoint; load_state_dict() continues exactly

Order. Every epoch is a seeded permutation of all document ids of the split (all content
types together), dealt round-robin to ranks and then to loader workers. The parts are
disjoint and together complete, with no padding: a rank never sees a document twice in an
epoch and no document is skipped. Each (rank, worker) packs its documents into samples
(packing.py); after its last document of epoch e it continues with its part of epoch e+1.

Why not StreamingDataset's own order: it pads partitions with repeated samples to give every
rank the same count, and its resume state is one global sample count that assumes ranks
consume samples in lock-step. Packing breaks both: ranks consume different numbers of
documents per step, and a repeated document would be predicted twice. So shards are read with
mosaicml-streaming's MDS readers (shards.SplitReader) and the order lives here.

State. A (rank, worker) stream's state is a few integers: epoch, position in its document
order, and which documents are in the packer's buffer with how much of the first is used. On
restore those documents are read and encoded again (deterministic) instead of storing bytes.

Workers. Worker w packs its own part. A torch DataLoader returns batches from its workers
round-robin, so the sequence of batches is fixed; every batch carries its worker's state after
producing it, and the main process keeps the latest state per worker plus which worker comes
next. On resume, worker w restarts from its state and the round-robin is rotated to start at
the saved next worker. Resuming with another world size or worker count is refused: the parts
would differ, and the run would repeat or skip documents.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch

from blt_dist.data.packing import Packer
from blt_dist.data.patching import PatchingRule
from blt_dist.data.shards import FORMAT as BYTE_FORMAT
from blt_dist.data.shards import ByteDataset, SplitReader
from blt_dist.data.tokenizer import ByteExactTokenizer
from blt_dist.errors import UserError
from blt_dist.model import batch_facts
from blt_dist.vocab import BOS_ID, OFFSET, PAD_ID, encode_document

ENTROPY_FORMAT = "blt-dist/entropy-shards/v1"
STATE_VERSION = 2


@dataclass(frozen=True)
class LoaderSpec:
    """Everything a loader worker needs; plain data, so it pickles into worker processes."""

    path: str  # dataset directory
    split: str  # "train" or "val"
    family: str  # "bytes" (entropy model / byte LM) | "blt" | "bpe"
    sample_len: int  # positions per sample (BLT: byte capacity)
    micro_batch_size: int
    seed: int = 0
    shuffle: bool = True
    patches_per_sample: Optional[int] = None  # BLT
    patching: Optional[dict] = None  # BLT: PatchingRule fields
    tokenizer: Optional[str] = None  # BPE: sentencepiece model path

    @classmethod
    def from_config(cls, cfg, family: str, split: str = "train") -> "LoaderSpec":
        """From the config tree. family: 'entropy' | 'blt' | 'bpe' (model.family)."""
        d = cfg.data
        path = d.train if split == "train" else d.val
        if not path:
            raise UserError(f"data.{'train' if split == 'train' else 'val'}: no dataset directory set")
        common = dict(path=path, split=split, micro_batch_size=cfg.train.micro_batch_size, seed=d.shuffle_seed, shuffle=d.shuffle)
        if family == "blt":
            patching = {k: getattr(d.patching, k) for k in ("mode", "threshold", "threshold_r", "patch_size", "max_patch_length", "bos_alone")}
            spec = cls(family="blt", sample_len=d.byte_capacity, patches_per_sample=d.patches_per_sample, patching=patching, **common)
        elif family == "bpe":
            if not d.tokenizer:
                raise UserError("data.tokenizer: the BPE baseline needs a sentencepiece model (`blt-dist tokenizer`)")
            spec = cls(family="bpe", sample_len=d.tokens_per_sample, tokenizer=d.tokenizer, **common)
        else:
            spec = cls(family="bytes", sample_len=d.seq_len, **common)
        # a held-out dataset prepared with --val-fraction 0 has only "train": evaluate on that
        if split != "train" and not ByteDataset(path, verify=False, format=dataset_format(spec)).streams("val"):
            spec = dataclasses.replace(spec, split="train")
        return spec


# ---------------------------------------------------------------------------------------------
# Document order


class DocumentOrder:
    """The documents one (rank, worker) reads in each epoch: disjoint parts, complete, unpadded."""

    def __init__(self, num_documents: int, rank: int, world_size: int, worker: int, num_workers: int, seed: int, shuffle: bool):
        parts = world_size * max(num_workers, 1)
        if num_documents < parts:
            raise UserError(
                f"the dataset has {num_documents} documents, fewer than ranks x loader workers = {parts}: "
                "some would read nothing"
            )
        self.num_documents = num_documents
        self.rank, self.world_size = rank, world_size
        self.worker, self.num_workers = worker, max(num_workers, 1)
        self.seed, self.shuffle = seed, shuffle

    def ids(self, epoch: int) -> np.ndarray:
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_documents)
        else:
            order = np.arange(self.num_documents)
        return order[self.rank :: self.world_size][self.worker :: self.num_workers]


# ---------------------------------------------------------------------------------------------
# Document encoders: one document sample -> (tokens, nbytes, patch_start)


class ByteEncoder:
    bos_id, pad_id = BOS_ID, PAD_ID

    def encode(self, sample: dict, doc_id: int):
        tokens = encode_document(sample["data"])
        return tokens, (tokens >= OFFSET).astype(np.int64), None


class PatchEncoder(ByteEncoder):
    """Bytes plus patch starts computed at load time from stored entropies (or from the bytes
    alone for the space/static/byte modes), so the threshold can change without recomputing."""

    def __init__(self, patching: dict):
        self.rule = PatchingRule(**patching)

    def encode(self, sample: dict, doc_id: int):
        tokens, nbytes, _ = super().encode(sample, doc_id)
        entropies = None
        if self.rule.needs_entropies:
            entropies = np.asarray(sample["entropies"])
            if entropies.shape != tokens.shape:
                raise UserError(
                    f"document {doc_id} ({sample.get('source', '?')}): {entropies.shape[0]} entropies for "
                    f"{tokens.shape[0]} encoded positions (entropy shards from another byte dataset?)"
                )
            if not np.isfinite(entropies).all():
                bad = int(np.flatnonzero(~np.isfinite(entropies))[0])
                raise UserError(f"document {doc_id} ({sample.get('source', '?')}): non-finite entropy at position {bad}")
        return tokens, nbytes, self.rule.starts(tokens, entropies)


class BPEEncoder:
    def __init__(self, tokenizer_path: str):
        self.tokenizer = ByteExactTokenizer(tokenizer_path)
        self.bos_id, self.pad_id = self.tokenizer.bos_id, self.tokenizer.pad_id

    def encode(self, sample: dict, doc_id: int):
        tokens, nbytes = self.tokenizer.encode_document(sample["data"])
        return tokens, nbytes, None


def make_encoder(spec: LoaderSpec):
    if spec.family == "blt":
        return PatchEncoder(spec.patching)
    if spec.family == "bpe":
        return BPEEncoder(spec.tokenizer)
    return ByteEncoder()


def dataset_format(spec: LoaderSpec) -> str:
    """BLT with an entropy mode reads entropy shards; everything else reads byte shards."""
    if spec.family == "blt" and spec.patching["mode"] in ("entropy", "monotonic"):
        return ENTROPY_FORMAT
    return BYTE_FORMAT


# ---------------------------------------------------------------------------------------------
# One (rank, worker)'s packed stream


class PackedStream:
    def __init__(self, spec: LoaderSpec, rank: int, world_size: int, worker: int, num_workers: int, state: Optional[dict] = None):
        self.spec = spec
        dataset = ByteDataset(spec.path, format=dataset_format(spec))
        self.fingerprint = dataset.fingerprint
        self.reader = SplitReader(dataset, spec.split)
        self.order = DocumentOrder(len(self.reader), rank, world_size, worker, num_workers, spec.seed, spec.shuffle)
        self.encoder = make_encoder(spec)
        self.packer = Packer(
            spec.sample_len, bos_id=self.encoder.bos_id, pad_id=self.encoder.pad_id, patches_per_sample=spec.patches_per_sample
        )
        self.epoch, self.position, self.samples = 0, 0, 0
        if state is not None:
            self.epoch, self.position, self.samples = state["epoch"], state["position"], state["samples"]
            self._restore_buffer(state["buffered_visits"], state["consumed"])
        self._ids = self.order.ids(self.epoch)

    def _add(self, visit: int) -> None:
        doc_id = visit % self.order.num_documents
        _, sample = self.reader.get(doc_id)
        self.packer.add(visit, *self.encoder.encode(sample, doc_id))

    def _restore_buffer(self, visits: list[int], consumed: int) -> None:
        """Re-reads and re-encodes the buffered documents (encoding is deterministic), then drops
        the positions already used: the state stays a few integers instead of the buffer."""
        for visit in visits:
            self._add(visit)
        if visits:
            self.packer.drop(consumed)

    def next_sample(self) -> dict[str, np.ndarray]:
        while self.packer.needs_more():
            if self.position == len(self._ids):
                self.epoch, self.position = self.epoch + 1, 0
                self._ids = self.order.ids(self.epoch)
            doc_id = int(self._ids[self.position])
            self.position += 1
            self._add(self.epoch * self.order.num_documents + doc_id)
        self.samples += 1
        return self.packer.cut()

    def next_batch(self) -> dict[str, torch.Tensor]:
        samples = [self.next_sample() for _ in range(self.spec.micro_batch_size)]
        batch = {key: torch.from_numpy(np.stack([s[key] for s in samples])) for key in samples[0]}
        batch["facts"] = batch_facts(batch, self.spec.family)  # read here, so the forward reads no device value
        return batch

    def state_dict(self) -> dict:
        visits, consumed = self.packer.buffered_documents()
        return {"epoch": self.epoch, "position": self.position, "samples": self.samples,
                "buffered_visits": visits, "consumed": consumed}


class _PackedIterable(torch.utils.data.IterableDataset):
    """Yields (logical worker, batch, that worker's state after the batch), forever."""

    def __init__(self, spec: LoaderSpec, rank: int, world_size: int, num_workers: int, states: list, rotation: int):
        self.spec, self.rank, self.world_size = spec, rank, world_size
        self.num_workers, self.states, self.rotation = num_workers, states, rotation

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        physical = info.id if info is not None else 0
        logical = (physical + self.rotation) % max(self.num_workers, 1)
        stream = PackedStream(self.spec, self.rank, self.world_size, logical, self.num_workers, self.states[logical])
        while True:
            batch = stream.next_batch()
            yield logical, batch, stream.state_dict()


# ---------------------------------------------------------------------------------------------
# The rank's loader


class Loader:
    """An endless iterator of batches for one rank, with state_dict()/load_state_dict()."""

    def __init__(self, spec: LoaderSpec, rank: int = 0, world_size: int = 1, num_workers: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.spec, self.rank, self.world_size, self.num_workers = spec, rank, world_size, num_workers
        self.fingerprint = ByteDataset(spec.path, format=dataset_format(spec)).fingerprint
        self._states: list[Optional[dict]] = [None] * max(num_workers, 1)
        self._next_worker = 0
        self.batches = 0
        self._iter: Optional[Iterator] = None

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._iter is None:
            self._iter = self._start()
        worker, batch, state = next(self._iter)
        self._states[worker] = state
        self._next_worker = (worker + 1) % max(self.num_workers, 1)
        self.batches += 1
        return batch

    def _start(self) -> Iterator:
        dataset = _PackedIterable(self.spec, self.rank, self.world_size, self.num_workers, list(self._states), self._next_worker)
        if self.num_workers == 0:
            return iter(dataset)
        # collate_fn=_as_is: the default would turn the numpy arrays of the worker state into tensors
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=self.num_workers, prefetch_factor=2, collate_fn=_as_is
        )
        return iter(loader)

    def close(self) -> None:
        self._iter = None  # drops the DataLoader iterator, which shuts its workers down

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "spec": dataclasses.asdict(self.spec),
            "fingerprint": self.fingerprint,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "batches": self.batches,
            "next_worker": self._next_worker,
            "workers": [None if s is None else dict(s) for s in self._states],
        }

    def load_state_dict(self, state: dict) -> None:
        def refuse(what: str, saved, now):
            raise UserError(
                f"loader state was saved with {what} {saved}, this run has {now}; resuming would repeat or skip "
                f"documents (start a new run, or resume with the same {what})"
            )

        if state.get("version") != STATE_VERSION:
            refuse("state version", state.get("version"), STATE_VERSION)
        if state["fingerprint"] != self.fingerprint:
            refuse("dataset fingerprint", state["fingerprint"][:16], self.fingerprint[:16])
        for key in ("world_size", "rank", "num_workers"):
            if state[key] != getattr(self, key):
                refuse(key.replace("_", " "), state[key], getattr(self, key))
        saved_spec = LoaderSpec(**state["spec"])
        changed = [f.name for f in dataclasses.fields(LoaderSpec) if getattr(saved_spec, f.name) != getattr(self.spec, f.name)]
        if changed:
            refuse("loader settings", {k: getattr(saved_spec, k) for k in changed}, {k: getattr(self.spec, k) for k in changed})
        self.close()
        self._states = [None if s is None else dict(s) for s in state["workers"]]
        self._next_worker = state["next_worker"]
        self.batches = state["batches"]


def _as_is(item):
    return item


