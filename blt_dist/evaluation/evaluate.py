"""`blt-dist eval`: bits per byte of a trained model, the same bytes for every family.

    blt-dist eval --model RUN/export --data data/heldout [--entropy-model ENTROPY/export] [--json]
    blt-dist eval --model RUN/export --files a.txt b.md

Every document is read once, in order, encoded for the model's family (bytes; sentencepiece
tokens with their byte counts; bytes + patches from entropy-model entropies for BLT), packed
into the model's sample shape (data/packing.py: every target exactly once, including the tail),
and scored. bpb = summed NLL in nats / (ln 2 x raw bytes); EOS is predicted and counted in the
NLL for every family; BOS is given. Reductions in float64. Reported per content type and, with
--per-document, per document; for BLT also the patch-length histogram per content type.

    blt-dist eval --model RUN/export --data data/heldout --noise case:0.05 --noise swap

--noise KIND[:RATE] (blt_dist/evaluation/noise.py) scores the same documents again with seeded
character-level noise and reports the noised bpb and the clean-to-noised gap. The byte limit
picks documents on their clean bytes, so clean and noised cover the same documents, and bpb is
counted on the noised bytes (the bytes the model predicts).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from blt_dist.data.entropies import check_entropy_source, document_entropies, entropy_dtype_for, load_entropy_model
from blt_dist.data.loader import ENTROPY_FORMAT, BPEEncoder, ByteEncoder, PatchEncoder
from blt_dist.data.packing import IGNORE, Packer
from blt_dist.data.patch_stats import ENTROPY_EDGES
from blt_dist.data.shards import FORMAT as BYTE_FORMAT
from blt_dist.data.shards import ByteDataset
from blt_dist.errors import UserError
from blt_dist.evaluation.noise import KINDS, noise_argument, noised, parse_noise
from blt_dist.model import model_inputs
from blt_dist.model.loss import token_nll
from blt_dist.model.weights import load_export


def iter_documents(data: Optional[str], files: list[str], split: Optional[str],
                   cache_dir: Optional[str] = None) -> Iterator[tuple[str, str, bytes]]:
    """(content type, source, bytes) for every document, in a fixed order (`cache_dir`: where a
    remote dataset's shards are kept on this node, default $BLT_DIST_CACHE/datasets)."""
    if files:
        for name in files:
            path = Path(name)
            if not path.is_file():
                raise UserError(f"{path}: no such file")
            yield "files", str(path), path.read_bytes()
        return

    # a byte dataset, or an entropy dataset (it holds every document's bytes too: a BLT's data.val)
    dataset = ByteDataset(data, format=(BYTE_FORMAT, ENTROPY_FORMAT), cache_dir=cache_dir or None)
    splits = [split] if split else (["val"] if dataset.streams("val") else ["train"])
    for name in splits:
        for ctype, sample in dataset.documents(name):
            yield ctype, sample["source"], sample["data"]


def take_per_type(documents: Iterator[tuple[str, str, bytes]],
                  max_bytes_per_type: int) -> Iterator[tuple[str, str, bytes]]:
    """Whole documents of each content type until about `max_bytes_per_type` (0 = all): a type
    stops after the document that crosses the limit."""
    bytes_by_type: dict[str, int] = defaultdict(int)
    for ctype, source, data in documents:
        if max_bytes_per_type and bytes_by_type[ctype] >= max_bytes_per_type:
            continue
        bytes_by_type[ctype] += len(data)
        yield ctype, source, data


def heldout_documents(data: Optional[str], files: list[str], split: Optional[str], max_bytes_per_type: int = 0,
                      noise=None, cache_dir: Optional[str] = None) -> Iterator[tuple[str, str, bytes]]:
    """The scored stream: documents picked by the byte limit, then noised (a NoiseSpec) if asked."""
    documents = take_per_type(iter_documents(data, files, split, cache_dir), max_bytes_per_type)
    if noise is None:
        return documents

    return noised(documents, noise)


class Encoder:
    """One document -> (tokens, nbytes, patch_start) for the model's family."""

    def __init__(self, cfg, entropy_model: Optional[str], tokenizer: Optional[str], entropy_dtype: Optional[str] = None):
        self.family = cfg.model.family
        self.entropy = None
        self.last_entropies = None  # the entropies (nats) of the last document encode() patched
        self.entropy_dtype, self.entropy_dtype_source = None, ""
        if self.family == "bpe":
            path = tokenizer or cfg.data.tokenizer
            if not path:
                raise UserError("--tokenizer: this BPE model's config names no tokenizer")
            self.bpe = BPEEncoder(path)
            vocab = self.bpe.tokenizer.vocab_size
            if vocab != cfg.model.vocab_size:
                raise UserError(f"{path}: vocabulary {vocab} != model.vocab_size {cfg.model.vocab_size}")
            self.bos_id, self.pad_id = self.bpe.bos_id, self.bpe.pad_id
            return
        self.bytes = ByteEncoder()
        self.bos_id, self.pad_id = self.bytes.bos_id, self.bytes.pad_id
        if self.family == "blt":
            p = cfg.data.patching
            self.patcher = PatchEncoder(dict(mode=p.mode, threshold=p.threshold, threshold_r=p.threshold_r,
                                             patch_size=p.patch_size, max_patch_length=p.max_patch_length, bos_alone=p.bos_alone))
            if self.patcher.rule.needs_entropies:
                entropy_model = entropy_model or cfg.data.entropy_model
                if not entropy_model:
                    raise UserError(f"--entropy-model: this BLT patches by {p.mode}; give the entropy model's export")

                if (Path(cfg.data.train) / "dataset.json").is_file():  # the entropies it was trained on
                    check_entropy_source(cfg.data.train, entropy_model)
                self.entropy, entropy_cfg = load_entropy_model(entropy_model)
                self.window = entropy_cfg.model.attention_window
                # the dtype the training entropies were computed in (bf16 and fp32 entropies cut
                # a few patches differently at a calibrated threshold)
                self.entropy_dtype, self.entropy_dtype_source = entropy_dtype_for(cfg, entropy_dtype)

    def encode(self, data: bytes):
        if self.family == "bpe":
            return self.bpe.encode({"data": data}, -1)
        if self.family != "blt":
            return self.bytes.encode({"data": data}, -1)
        sample = {"data": data}
        if self.entropy is not None:
            # in the training entropies' dtype, rounded to float16 as entropy shards store them
            entropies = document_entropies(self.entropy, [data], self.window, dtype=self.entropy_dtype)[0]
            sample["entropies"] = entropies.astype(np.float16)
            self.last_entropies = sample["entropies"]
        return self.patcher.encode(sample, -1)


def entropy_band_counts(entropies: np.ndarray) -> np.ndarray:
    """Positions below, within and above patch_stats.ENTROPY_EDGES (nats): the seed's bands."""
    H = np.asarray(entropies, dtype=np.float64)
    low, high = ENTROPY_EDGES
    return np.array([(H < low).sum(), ((H >= low) & (H <= high)).sum(), (H > high).sum()], dtype=np.int64)


def plain_forward(model, family: str, device="cpu"):
    """`forward(batch) -> per-token NLL` of a plain module (or a DeepSpeed engine, whose call
    runs its module): what evaluate_model scores with unless told otherwise."""

    def forward(batch: dict) -> torch.Tensor:
        logits = model(*model_inputs(batch, family, device))
        return token_nll(logits, batch["targets"].to(device))

    return forward


def encode_documents(encoder: Encoder, documents) -> Iterator[tuple[dict, tuple]]:
    """(document info, (tokens, nbytes, patch_start)) for each (index, (content type, source,
    bytes)) of `documents`: the model's input for it (a BLT's entropies and patches included)."""
    for index, (ctype, source, data) in documents:
        tokens, nbytes, patch_start = encoder.encode(data)
        info = {"index": index, "content_type": ctype, "source": source, "bytes": len(data),
                "patch_start": patch_start if encoder.family == "blt" else None, "length": len(tokens)}
        if encoder.family == "blt" and encoder.entropy is not None:
            # BOS's entropy is a fixed 0 (document_entropies predicts nothing there): not counted
            info["entropy_bands"] = entropy_band_counts(encoder.last_entropies[1:])
        yield info, (tokens, nbytes, patch_start)


def pack_documents(cfg, encoder: Encoder, encoded, batch_size: int, full_batches: bool = False):
    """Packs encoded documents (encode_documents) into the training shapes; yields (document
    infos since the last batch, batch). `full_batches` pads the last batch with all-padding
    samples to `batch_size` (a pipeline's micro-batches have one static shape)."""
    family = cfg.model.family
    if family == "blt":
        packer = Packer(cfg.data.byte_capacity, bos_id=encoder.bos_id, pad_id=encoder.pad_id,
                        patches_per_sample=cfg.data.patches_per_sample)
    else:
        length = cfg.data.tokens_per_sample if family == "bpe" else cfg.data.seq_len
        packer = Packer(length, bos_id=encoder.bos_id, pad_id=encoder.pad_id)

    def batch_of(samples: list[dict]) -> dict:
        if full_batches and len(samples) < batch_size:
            empty = {k: np.full_like(v, IGNORE if k == "targets" else 0) for k, v in samples[0].items()}
            empty["doc_ids"] = np.full_like(samples[0]["doc_ids"], -1)
            samples = samples + [empty] * (batch_size - len(samples))
        return {k: torch.from_numpy(np.stack([s[k] for s in samples])) for k in samples[0]}

    infos, pending = [], []
    for info, (tokens, nbytes, patch_start) in encoded:
        infos.append(info)
        packer.add(info["index"], tokens, nbytes, patch_start)
        while not packer.needs_more():
            pending.append(packer.cut())
            if len(pending) == batch_size:
                yield infos, batch_of(pending)
                infos, pending = [], []
    pending += packer.finish()
    for start in range(0, len(pending), batch_size):  # every document has a sample: BOS + EOS at least
        yield infos, batch_of(pending[start : start + batch_size])
        infos = []


def score_documents(forward, cfg, encoder: Encoder, encoded, batch_size: int = 8, full_batches: bool = False,
                    shard: tuple[int, int] = (0, 1)) -> tuple[list[dict], dict[int, dict[int, tuple[float, int]]]]:
    """(document infos, {batch number: {document index: (NLL in nats, predicted targets)}}).

    `encoded` holds encode_documents' output; every process packs all of it the same way, and scores batches number `shard[0]`, `shard[0] + shard[1]`, ... only (so a
    document's context in its samples never depends on how the work is split). `forward(batch)`
    returns the per-token NLL, or None where this process holds no output (a pipeline's earlier
    stages)."""
    docs: list[dict] = []
    scored: dict[int, dict[int, tuple[float, int]]] = {}
    for number, (infos, batch) in enumerate(pack_documents(cfg, encoder, encoded, batch_size, full_batches)):
        docs += infos
        if number % shard[1] != shard[0]:
            continue
        with torch.no_grad():
            per_token = forward(batch)
        if per_token is None:
            continue
        keep = batch["targets"] != IGNORE
        sums: dict[int, tuple[float, int]] = {}
        for doc, value in zip(batch["doc_visit"][keep].tolist(), per_token.double().cpu()[keep].tolist()):
            nll, targets = sums.get(doc, (0.0, 0))
            sums[doc] = (nll + value, targets + 1)
        scored[number] = sums
    return docs, scored


def per_document(scored: dict[int, dict[int, tuple[float, int]]]) -> tuple[dict[int, float], dict[int, int]]:
    """Per-document NLL and targets from per-batch sums, added in batch order."""
    nll: dict[int, float] = defaultdict(float)
    targets: dict[int, int] = defaultdict(int)
    for number in sorted(scored):
        for doc, (value, count) in scored[number].items():
            nll[doc] += value
            targets[doc] += count
    return nll, targets


def evaluate_model(model, cfg, documents: Iterator[tuple[str, str, bytes]], entropy_model=None, tokenizer=None,
                   batch_size: int = 8, max_bytes_per_type: int = 0, encoder: Optional[Encoder] = None,
                   forward=None) -> dict:
    """Scores every document; returns totals, per content type and per document. `forward`
    (default: the plain model's) and `encoder` (default: built from the config) let the trainer
    score with its engine through this same function."""
    family = cfg.model.family
    encoder = encoder or Encoder(cfg, entropy_model, tokenizer)
    forward = forward or plain_forward(model, family)
    picked = enumerate(take_per_type(documents, max_bytes_per_type))
    infos, scored = score_documents(forward, cfg, encoder, encode_documents(encoder, picked), batch_size)
    nll, targets = per_document(scored)
    docs, total_bytes = [], 0
    patch_lengths: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(0, dtype=np.int64))  # BLT: histogram
    bands: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(3, dtype=np.int64))  # BLT: positions per entropy band
    for info in infos:
        docs.append({"content_type": info["content_type"], "source": info["source"], "bytes": info["bytes"]})
        total_bytes += info["bytes"]
        if family == "blt":
            ctype = info["content_type"]
            starts = np.flatnonzero(info["patch_start"])
            counts = np.bincount(np.diff(np.append(starts, info["length"])))
            seen = patch_lengths[ctype]
            size = max(len(seen), len(counts))
            patch_lengths[ctype] = np.pad(seen, (0, size - len(seen))) + np.pad(counts, (0, size - len(counts)))
            if "entropy_bands" in info:
                bands[ctype] += info["entropy_bands"]

    per_type: dict[str, dict] = defaultdict(lambda: {"nll": 0.0, "bytes": 0, "documents": 0, "targets": 0})
    for index, doc in enumerate(docs):
        doc["nll"], doc["targets"] = nll[index], targets[index]
        doc["bpb"] = doc["nll"] / (math.log(2) * doc["bytes"]) if doc["bytes"] else None
        t = per_type[doc["content_type"]]
        t["nll"] += doc["nll"]
        t["bytes"] += doc["bytes"]
        t["documents"] += 1
        t["targets"] += doc["targets"]
    for ctype, t in per_type.items():
        t["bpb"] = t["nll"] / (math.log(2) * t["bytes"]) if t["bytes"] else None
        if family == "blt":
            # patches of the encoded documents (BOS's own patch and EOS included), lengths in
            # positions; mean = raw bytes per patch, as the trainer logs mean_patch_size
            histogram = patch_lengths[ctype]
            t["patches"] = int(histogram.sum())
            t["patch_length_histogram"] = histogram.tolist()  # [n] = patches of length n
            t["mean_patch_size"] = t["bytes"] / t["patches"] if t["patches"] else None
            if encoder.entropy is not None:
                # positions whose entropy (nats, as the patcher read it) is < 2, 2-5, > 5
                t["entropy_band_positions"] = bands[ctype].tolist()
    total_nll = sum(t["nll"] for t in per_type.values())
    result = {
        "family": family,
        "bpb": total_nll / (math.log(2) * total_bytes) if total_bytes else None,
        "nll_nats": total_nll,
        "bytes": total_bytes,
        "documents": len(docs),
        "targets": sum(t["targets"] for t in per_type.values()),
        "by_content_type": dict(sorted(per_type.items())),
        "documents_detail": docs,
    }
    if encoder.entropy_dtype:
        result["entropy_dtype"] = encoder.entropy_dtype
        result["entropy_dtype_source"] = encoder.entropy_dtype_source
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model export dir (RUN/export) or a run dir")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="byte dataset (from `blt-dist prepare`)")
    source.add_argument("--files", nargs="+", default=[], help="raw text files, one document each")
    parser.add_argument("--split", default=None, help="dataset split (default: val if present, else train)")
    parser.add_argument("--entropy-model", default=None,
                        help="entropy model export, for BLT entropy patching (default: the BLT config's data.entropy_model)")
    parser.add_argument("--entropy-dtype", choices=("fp32", "bf16"), default=None,
                        help="dtype of the BLT's entropy model (default: the one its training entropies were computed in)")
    parser.add_argument("--tokenizer", default=None, help="sentencepiece model (default: the BPE config's)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-bytes-per-type", type=int, default=0,
                        help="score whole documents of each content type up to about this many bytes (0 = all)")
    parser.add_argument("--per-document", action="store_true", help="include every document in --json output")

    parser.add_argument("--noise", action="append", default=[], type=noise_argument, metavar="KIND[:RATE]",
                        help=f"also score with seeded character noise ({'|'.join(KINDS)}; RATE default 0.05) "
                             "and report the clean-to-noised gap; repeatable")
    parser.add_argument("--noise-seed", type=int, default=0, help="seed of the noise (with each document's index)")
    parser.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    # scoped, not torch.set_grad_enabled(False): the command also runs inside other processes
    # (tests, notebooks) whose later autograd must keep working
    with torch.no_grad():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    model_dir = Path(args.model)
    if (model_dir / "export").is_dir():
        model_dir = model_dir / "export"
    model, cfg = load_export(model_dir)

    noises = [parse_noise(text, args.noise_seed) for text in args.noise]

    def score(noise=None) -> dict:
        started = time.perf_counter()
        documents = heldout_documents(args.data, args.files, args.split, args.max_bytes_per_type, noise)
        encoder = Encoder(cfg, args.entropy_model, args.tokenizer, args.entropy_dtype)
        out = evaluate_model(model, cfg, documents, batch_size=args.batch_size, encoder=encoder)
        out["seconds"] = round(time.perf_counter() - started, 2)
        if not args.per_document:
            out.pop("documents_detail")
        return out

    result = score()
    result["model"] = str(model_dir)
    if noises:
        result["noised"] = {}
        for noise in noises:
            noisy = score(noise)
            noisy.update(kind=noise.kind, rate=noise.rate, seed=noise.seed, gap=noisy["bpb"] - result["bpb"])
            for ctype, t in noisy["by_content_type"].items():
                t["gap"] = t["bpb"] - result["by_content_type"][ctype]["bpb"]
            result["noised"][noise.name] = noisy
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{model_dir} ({result['family']}): {result['bpb']:.4f} bits/byte over {result['bytes']:,} bytes, "
          f"{result['documents']} documents, {result['seconds']} s")
    if result.get("entropy_dtype"):
        print(f"  entropies computed in {result['entropy_dtype']} ({result['entropy_dtype_source']})")
    for ctype, t in result["by_content_type"].items():
        patches = f"  {t['mean_patch_size']:.2f} bytes/patch" if t.get("mean_patch_size") else ""
        print(f"  {ctype:<14} {t['bpb']:.4f} bpb  {t['bytes']:>12,} bytes  {t['documents']:>6} documents{patches}")
    for name, noisy in result.get("noised", {}).items():
        print(f"noised {name} (seed {noisy['seed']}): {noisy['bpb']:.4f} bits/byte over {noisy['bytes']:,} "
              f"noised bytes, gap {noisy['gap']:+.4f} vs clean, {noisy['seconds']} s")
        for ctype, t in noisy["by_content_type"].items():
            print(f"  {ctype:<14} {t['bpb']:.4f} bpb  gap {t['gap']:+.4f}  {t['bytes']:>12,} bytes")
    return 0
