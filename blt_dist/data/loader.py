"""Training batches for the three families, with exact resume and exactly-once coverage.

    loader = Loader(LoaderSpec.from_config(cfg, "blt"), rank, world_size, num_workers=2, lanes=8)
    batch = next(loader)            # dict of int64 tensors [micro_batch, ...] (see packing.py)
    state = loader.state_dict()     # goes into the checkpoint; load_state_dict() continues exactly

Lanes. A run fixes L logical lanes when it starts (data.lanes; default world size x loader
workers, the order of the loaders before lanes existed). Every epoch is a seeded permutation of
all document ids of the split (all content types together); lane l reads ids l, l+L, ... of
it and packs them into samples (packing.py), continuing with its part of epoch e+1 after its
last document of epoch e. The parts are disjoint and together complete, with no padding: no
document is read twice in an epoch and none is skipped.
With data.mixture the permutation is of the epoch's virtual documents instead (mixture.py: a
stream under its weight repeated, one over it subsampled, each document copy counted once).

Dealing. Global micro-batch g is lane g % L's batch g // L, so the sequence of micro-batches is
a function of L, the seed and the data, not of the world size. Data-parallel rank r of W takes
g = r, r+W, r+2W, ... (LaneDeal): a fixed slice of every step when the global batch is a
multiple of W micro-batches. A checkpoint taken at W ranks therefore resumes at any W': each
rank picks up where the global sequence stands.

Why not StreamingDataset's own order: it pads partitions with repeated samples to give every
rank the same count, and its resume state is one global sample count that assumes ranks
consume samples in lock-step. Packing breaks both: ranks consume different numbers of
documents per step, and a repeated document would be predicted twice. So shards are read with
mosaicml-streaming's MDS readers (shards.SplitReader) and the order lives here.

State. A lane's state is a few integers: epoch, position in its document order, batches
produced, and which documents are in the packer's buffer with how much of the first is used. On
restore those documents are read and encoded again (deterministic) instead of storing bytes.
Each rank's state holds its lanes; `merge_states` joins the ranks' into the run's, saved once.

Workers. A rank's lanes are split over its DataLoader workers (each lane lives in one), and
worker w produces the rank's micro-batches k = w, w + workers, ...: the DataLoader's round-robin
over workers is then the rank's order, whatever the worker count, which may change on resume.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch

from blt_dist.data.mixture import MixturePlan, mixture_fingerprint
from blt_dist.data.packing import Packer
from blt_dist.data.patching import PatchingRule
from blt_dist.data.shards import FORMAT as BYTE_FORMAT
from blt_dist.data.shards import ByteDataset, SplitReader
from blt_dist.data.tokenizer import ByteExactTokenizer
from blt_dist.errors import UserError
from blt_dist.model import batch_facts
from blt_dist.vocab import BOS_ID, OFFSET, PAD_ID, encode_document

ENTROPY_FORMAT = "blt-dist/entropy-shards/v1"
# remote datasets: every PREFETCH_EVERY documents a lane asks for the shards of its next
# PREFETCH_LOOKAHEAD documents (the cache downloads up to data.prefetch_shards ahead)
PREFETCH_EVERY, PREFETCH_LOOKAHEAD = 8, 256
STATE_VERSION = 3


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
    shuffle_block_shards: int = 0  # > 0: shuffle blocks of this many shards, then documents in a block
    # where a remote dataset's shards are kept on this node, and how many bytes of them (0: all);
    # they change where bytes come from, never which: a resume may change them
    cache_dir: Optional[str] = None
    cache_limit: float = 0
    prefetch_shards: int = 2

    # data.mixture: (content type, weight) pairs, in the config's order (mixture.py); () reads
    # every document once per epoch
    mixture: tuple[tuple[str, float], ...] = ()

    WHERE_FROM = ("path", "cache_dir", "cache_limit", "prefetch_shards")  # not part of the order

    def __post_init__(self):  # a state's spec comes back with lists: compare as tuples
        object.__setattr__(self, "mixture", tuple((str(t), float(w)) for t, w in self.mixture))

    @classmethod
    def from_config(cls, cfg, family: str, split: str = "train") -> "LoaderSpec":
        """From the config tree. family: 'entropy' | 'blt' | 'bpe' (model.family)."""
        d = cfg.data
        path = d.train if split == "train" else d.val
        if not path:
            raise UserError(f"data.{'train' if split == 'train' else 'val'}: no dataset directory set")
        common = dict(path=path, split=split, micro_batch_size=cfg.train.micro_batch_size, seed=d.shuffle_seed,
                      shuffle=d.shuffle, shuffle_block_shards=d.shuffle_block_shards, cache_dir=d.cache_dir or None,
                      cache_limit=d.cache_limit, prefetch_shards=d.prefetch_shards)
        if split == "train" and d.mixture:
            common["mixture"] = tuple((m.content_type, m.weight) for m in d.mixture)
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
        if split != "train" and not open_dataset(spec, verify=False).streams("val"):
            spec = dataclasses.replace(spec, split="train")
        return spec


# ---------------------------------------------------------------------------------------------
# Document order


class DocumentOrder:
    """The documents one lane reads in each epoch: disjoint parts, complete, unpadded.

    With `block_starts` (the first document of each block of shards) the epoch's permutation
    is a seeded shuffle of the blocks, then of the documents inside each block: every lane reads
    the blocks in the same order at about the same pace, so the shards in use at any time are a
    window of about two blocks (what a node cache smaller than the dataset needs)."""

    def __init__(self, num_documents: int, lane: int, lanes: int, seed: int, shuffle: bool,
                 block_starts: Optional[np.ndarray] = None, mixture: Optional[MixturePlan] = None):
        self.num_documents = num_documents
        self.lane, self.lanes = lane, lanes
        self.seed, self.shuffle = seed, shuffle
        self.block_starts = block_starts
        self.mixture = mixture
        # visits (epoch * span + id) name a document as visit % num_documents
        self.span = mixture.span if mixture is not None else num_documents
        per_epoch = len(mixture.epoch(0)) if mixture is not None else num_documents
        if per_epoch < lanes:
            raise UserError(f"an epoch has {per_epoch} documents, fewer than data.lanes = {lanes}: "
                            "some lanes would read nothing")

    def ids(self, epoch: int) -> np.ndarray:
        return self.epoch_order(epoch)[self.lane :: self.lanes]

    def epoch_order(self, epoch: int) -> np.ndarray:
        if self.mixture is not None:
            chosen = self.mixture.epoch(epoch)
            return np.random.default_rng([self.seed, epoch]).permutation(chosen) if self.shuffle else chosen
        if not self.shuffle:
            return np.arange(self.num_documents)
        rng = np.random.default_rng([self.seed, epoch])
        if self.block_starts is None:
            return rng.permutation(self.num_documents)
        bounds = np.append(self.block_starts, self.num_documents)
        blocks = [np.arange(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]
        return np.concatenate([rng.permutation(blocks[b]) for b in rng.permutation(len(blocks))])


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


def open_dataset(spec: LoaderSpec, verify: bool = True) -> ByteDataset:
    """The spec's dataset: a local directory, or a URL whose metadata comes into the node cache."""
    return ByteDataset(spec.path, verify=verify, format=dataset_format(spec), cache_dir=spec.cache_dir)


def open_reader(spec: LoaderSpec) -> SplitReader:
    """The spec's split, ready to read (shards verified, or fetched into the node cache on use)."""
    return SplitReader(open_dataset(spec), spec.split, spec.cache_limit, spec.prefetch_shards)


def mixture_plan(spec: LoaderSpec, dataset: ByteDataset) -> MixturePlan:
    """The spec's weighted mixture over the split's streams (their document lengths checked)."""
    streams = dataset.streams(spec.split)
    return MixturePlan(spec.mixture, streams, [dataset.document_lengths(s) for s in streams], spec.seed)


def dataset_format(spec: LoaderSpec) -> str:
    """BLT with an entropy mode reads entropy shards; everything else reads byte shards."""
    if spec.family == "blt" and spec.patching["mode"] in ("entropy", "monotonic"):
        return ENTROPY_FORMAT
    return BYTE_FORMAT


# ---------------------------------------------------------------------------------------------
# One lane's packed stream


class PackedStream:
    """One lane: its documents of every epoch, packed into samples and batches."""

    def __init__(self, spec: LoaderSpec, lane: int, lanes: int, state: Optional[dict] = None,
                 reader: Optional[SplitReader] = None):
        self.spec = spec
        # one reader serves every lane of a worker: opening one reads (or, remote, fetches) every index
        self.reader = reader or open_reader(spec)
        self.fingerprint = self.reader.dataset.fingerprint
        blocks = mixture = None
        if spec.shuffle_block_shards:
            blocks = self.reader.shard_starts()[:: spec.shuffle_block_shards]
        if spec.mixture:
            mixture = mixture_plan(spec, self.reader.dataset)
        self.order = DocumentOrder(len(self.reader), lane, lanes, spec.seed, spec.shuffle, blocks, mixture)
        self.batches = 0  # batches produced (kept by the caller's lane state)
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
        doc_id = visit % self.order.num_documents  # a mixture's k-th copy of d is k * num_documents + d
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
            virtual_id = int(self._ids[self.position])  # the document itself unless a mixture repeats it
            if self.reader.cache is not None and self.position % PREFETCH_EVERY == 0:
                ahead = self._ids[self.position : self.position + PREFETCH_LOOKAHEAD]
                self.reader.prefetch(ahead % self.order.num_documents)
            self.position += 1
            self._add(self.epoch * self.order.span + virtual_id)
        self.samples += 1
        return self.packer.cut()

    def skip_batch(self) -> None:
        for _ in range(self.spec.micro_batch_size):
            self.next_sample()
        self.batches += 1

    def next_batch(self) -> dict[str, torch.Tensor]:
        samples = [self.next_sample() for _ in range(self.spec.micro_batch_size)]
        self.batches += 1
        batch = {key: torch.from_numpy(np.stack([s[key] for s in samples])) for key in samples[0]}
        batch["facts"] = batch_facts(batch, self.spec.family)  # read here, so the forward reads no device value
        return batch

    def state_dict(self) -> dict:
        visits, consumed = self.packer.buffered_documents()
        return {"epoch": self.epoch, "position": self.position, "samples": self.samples,
                "buffered_visits": visits, "consumed": consumed}


class _LaneIterable(torch.utils.data.IterableDataset):
    """Yields (lane, that lane's batches produced, batch, the lane's stream state), forever:
    one physical worker's share of the rank's micro-batches, in the rank's order."""

    def __init__(self, spec: LoaderSpec, deal: "LaneDeal", lane_states: dict, workers: int):
        self.spec, self.deal, self.lane_states, self.workers = spec, deal, lane_states, workers

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        streams: dict[int, PackedStream] = {}
        reader = open_reader(self.spec)
        lanes_here = len({self.deal.lane_batch(k)[0] for k in range(worker, self.deal.period, self.workers)})
        reader.pin_window *= lanes_here  # each lane reads its own window of shards
        for k in itertools.count(worker, self.workers):  # the rank's k-th micro-batch from here on
            lane, n = self.deal.lane_batch(k)
            stream = streams.get(lane)
            if stream is None:
                saved = self.lane_states[lane]
                stream = streams[lane] = PackedStream(self.spec, lane, self.deal.lanes, saved["stream"], reader)
                stream.batches = saved["produced"]
            if stream.batches > n:
                raise RuntimeError(f"lane {lane} is past batch {n} ({stream.batches} produced): inconsistent loader state")
            while stream.batches < n:  # batches of a lane that other ranks take (lanes not a multiple of ranks)
                stream.skip_batch()
            batch = stream.next_batch()
            yield lane, stream.batches, batch, stream.state_dict()


# ---------------------------------------------------------------------------------------------
# Dealing micro-batches to ranks


@dataclass(frozen=True)
class LaneDeal:
    """Which lane batch is a rank's k-th micro-batch, counted from global micro-batch `start`.

    Global micro-batch g is batch g // L of lane g % L. Data-parallel rank r of W takes the
    global micro-batches g = start + r + W*k (k = 0, 1, ...): with the global batch a multiple
    of W micro-batches, that is a fixed slice of every step, and the sequence of global
    micro-batches depends on L, the seed and the data only. When W divides L a rank owns L/W
    lanes outright; otherwise a lane's batches go to several ranks in turn, and each of them
    packs (and drops) the batches the others take: correct, but slower by W/gcd(L, W).
    """

    lanes: int
    rank: int
    world_size: int
    start: int  # global micro-batches consumed before this deal began (a multiple of world_size)

    def lane_batch(self, k: int) -> tuple[int, int]:
        g = self.start + self.rank + self.world_size * k
        return g % self.lanes, g // self.lanes

    @property
    def period(self) -> int:
        """The rank's lanes repeat with this period in k; each lane once per period."""
        return math.lcm(self.lanes, self.world_size) // self.world_size

    def rank_lanes(self) -> list[int]:
        return [self.lane_batch(k)[0] for k in range(self.period)]

    def workers_for(self, num_workers: int) -> int:
        """Physical workers: the most, up to num_workers, that split the rank's lanes evenly, so
        that each lane lives in one worker and the DataLoader's round-robin is the rank's order."""
        return max(w for w in range(1, max(num_workers, 1) + 1) if self.period % w == 0)

    @property
    def repacked(self) -> int:
        """Lane batches packed per batch used (1 when world_size divides lanes)."""
        return self.world_size // math.gcd(self.lanes, self.world_size)


# ---------------------------------------------------------------------------------------------
# The rank's loader


class Loader:
    """An endless iterator of batches for one data-parallel rank, with state_dict() /
    load_state_dict(). `lanes` fixes the run's logical streams (default: world_size x
    max(num_workers, 1), the order of the loaders before lanes existed); a state saved at one
    world size or worker count loads at any other."""

    def __init__(self, spec: LoaderSpec, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 lanes: Optional[int] = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.spec, self.rank, self.world_size, self.num_workers = spec, rank, world_size, num_workers
        self.lanes = lanes or world_size * max(num_workers, 1)
        dataset = open_dataset(spec)
        self.fingerprint = dataset.fingerprint
        self.num_documents = sum(stream.documents for stream in dataset.streams(spec.split))
        if self.num_documents < self.lanes:
            raise UserError(
                f"the dataset has {self.num_documents} documents, fewer than data.lanes = {self.lanes} "
                "(default: ranks x loader workers): some lanes would read nothing"
            )
        self.deal = LaneDeal(self.lanes, rank, world_size, 0)
        self._lane_states = {lane: {"produced": 0, "stream": None} for lane in self.deal.rank_lanes()}
        self.taken = 0  # micro-batches taken since the deal began
        self._iter: Optional[Iterator] = None

    @property
    def consumed(self) -> int:
        """Global micro-batches consumed, assuming every rank took as many as this one (true at
        step boundaries, where checkpoints are written)."""
        return self.deal.start + self.world_size * self.taken

    def describe(self) -> str:
        text = f"{self.lanes} lanes, {len(self._lane_states)} on this rank"
        if self.deal.repacked > 1:
            text += (f"; {self.lanes} lanes do not split over {self.world_size} ranks, so each rank packs "
                     f"{self.deal.repacked}x the batches it uses (choose data.lanes as a multiple of the world sizes)")
        return text

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._iter is None:
            self._iter = self._start()
        lane, produced, batch, state = next(self._iter)
        self._lane_states[lane] = {"produced": produced, "stream": state}
        self.taken += 1
        return batch

    def _start(self) -> Iterator:
        self.deal = LaneDeal(self.lanes, self.rank, self.world_size, self.consumed)
        self.taken = 0
        workers = self.deal.workers_for(self.num_workers)
        dataset = _LaneIterable(self.spec, self.deal, dict(self._lane_states), workers)
        if self.num_workers == 0:
            return iter(dataset)
        # collate_fn=_as_is: the default would turn the numpy arrays of the worker state into tensors
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=workers, prefetch_factor=2, collate_fn=_as_is
        )
        return iter(loader)

    def close(self) -> None:
        if self._iter is not None:  # the next start continues from what was taken
            self.deal = LaneDeal(self.lanes, self.rank, self.world_size, self.consumed)
            self.taken = 0
        self._iter = None  # drops the DataLoader iterator, which shuts its workers down

    def state_dict(self) -> dict:
        """This rank's lanes. Every rank's states together (merge_states) are the run's."""
        return {
            "version": STATE_VERSION,
            "spec": dataclasses.asdict(self.spec),
            "fingerprint": self.fingerprint,
            "lanes": self.lanes,
            "mixture": mixture_fingerprint(self.spec.mixture, self.fingerprint) if self.spec.mixture else None,
            "consumed": self.consumed,
            "lane_states": {lane: dict(s) for lane, s in sorted(self._lane_states.items())},
        }

    def load_state_dict(self, state: dict) -> None:
        def refuse(what: str, saved, now, fix: str = ""):
            raise UserError(
                f"loader state was saved with {what} {saved}, this run has {now}; resuming would repeat or skip "
                f"documents ({fix or f'start a new run, or resume with the same {what}'})"
            )

        if state.get("version") != STATE_VERSION:
            refuse("state version", state.get("version"), STATE_VERSION, "written by another version of blt-dist")
        if state["fingerprint"] != self.fingerprint:
            refuse("dataset fingerprint", state["fingerprint"][:16], self.fingerprint[:16])
        if state["lanes"] != self.lanes:
            refuse("data.lanes", state["lanes"], self.lanes, "leave data.lanes unset to take the saved value")
        saved_spec = LoaderSpec(**state["spec"])
        if saved_spec.mixture != self.spec.mixture:
            refuse("data.mixture", list(saved_spec.mixture) or "none", list(self.spec.mixture) or "none",
                   "the weights decide which documents each epoch holds; start a new run, or resume with the "
                   "saved weights")
        changed = [f.name for f in dataclasses.fields(LoaderSpec) if f.name not in LoaderSpec.WHERE_FROM
                   and getattr(saved_spec, f.name) != getattr(self.spec, f.name)]
        if changed:
            refuse("loader settings", {k: getattr(saved_spec, k) for k in changed}, {k: getattr(self.spec, k) for k in changed})
        if state["consumed"] % self.world_size:
            raise UserError(f"loader state: {state['consumed']} micro-batches consumed, not a multiple of "
                            f"{self.world_size} ranks (saved between two steps?)")
        self.close()
        self.deal = LaneDeal(self.lanes, self.rank, self.world_size, state["consumed"])
        self.taken = 0
        saved = {int(lane): s for lane, s in state["lane_states"].items()}
        missing = [lane for lane in self.deal.rank_lanes() if lane not in saved]
        if missing:
            raise UserError(f"loader state holds no state for lanes {missing} (a single rank's state, not the run's?)")
        self._lane_states = {lane: dict(saved[lane]) for lane in self.deal.rank_lanes()}


def merge_states(states: list[dict]) -> dict:
    """The run's loader state from every rank's: each lane's newest state (a lane two ranks
    share is furthest along in the rank that took its latest batch)."""
    first = states[0]
    for other in states[1:]:
        for key in ("version", "spec", "fingerprint", "lanes", "consumed"):
            if other[key] != first[key]:
                raise RuntimeError(f"loader states of the ranks differ in {key}: {first[key]} vs {other[key]}")
    lanes: dict[int, dict] = {}
    for state in states:
        for lane, s in state["lane_states"].items():
            lane = int(lane)
            if lane not in lanes or s["produced"] > lanes[lane]["produced"]:
                lanes[lane] = s
    return {**first, "lane_states": dict(sorted(lanes.items()))}


def _as_is(item):
    return item


