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

from blt_dist.data.entropies import check_entropy_source, document_entropies, load_entropy_model
from blt_dist.data.loader import BPEEncoder, ByteEncoder, PatchEncoder
from blt_dist.data.packing import IGNORE, Packer
from blt_dist.data.shards import ByteDataset
from blt_dist.errors import UserError
from blt_dist.evaluation.noise import KINDS, noise_argument, noised, parse_noise
from blt_dist.model import model_inputs
from blt_dist.model.loss import token_nll
from blt_dist.model.weights import load_export


def iter_documents(data: Optional[str], files: list[str], split: Optional[str]) -> Iterator[tuple[str, str, bytes]]:
    """(content type, source, bytes) for every document, in a fixed order."""
    if files:
        for name in files:
            path = Path(name)
            if not path.is_file():
                raise UserError(f"{path}: no such file")
            yield "files", str(path), path.read_bytes()
        return

    dataset = ByteDataset(data)
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
                      noise=None) -> Iterator[tuple[str, str, bytes]]:
    """The scored stream: documents picked by the byte limit, then noised (a NoiseSpec) if asked."""
    documents = take_per_type(iter_documents(data, files, split), max_bytes_per_type)
    if noise is None:
        return documents

    return noised(documents, noise)


class Encoder:
    """One document -> (tokens, nbytes, patch_start) for the model's family."""

    def __init__(self, cfg, entropy_model: Optional[str], tokenizer: Optional[str]):
        self.family = cfg.model.family
        self.entropy = None
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
                                             patch_size=p.patch_size, max_patch_length=p.max_patch_length))
            if self.patcher.rule.needs_entropies:
                entropy_model = entropy_model or cfg.data.entropy_model
                if not entropy_model:
                    raise UserError(f"--entropy-model: this BLT patches by {p.mode}; give the entropy model's export")

                if (Path(cfg.data.train) / "dataset.json").is_file():  # the entropies it was trained on
                    check_entropy_source(cfg.data.train, entropy_model)
                self.entropy, entropy_cfg = load_entropy_model(entropy_model)
                self.window = entropy_cfg.model.attention_window

    def encode(self, data: bytes):
        if self.family == "bpe":
            return self.bpe.encode({"data": data}, -1)
        if self.family != "blt":
            return self.bytes.encode({"data": data}, -1)
        sample = {"data": data}
        if self.entropy is not None:
            # float16, as stored in entropy shards: evaluation patches exactly as training did
            sample["entropies"] = document_entropies(self.entropy, [data], self.window)[0].astype(np.float16)
        return self.patcher.encode(sample, -1)


def evaluate_model(model, cfg, documents: Iterator[tuple[str, str, bytes]], entropy_model=None, tokenizer=None,
                   batch_size: int = 8, max_bytes_per_type: int = 0) -> dict:
    """Scores every document; returns totals, per content type and per document."""
    family = cfg.model.family
    encoder = Encoder(cfg, entropy_model, tokenizer)
    if family == "blt":
        packer = Packer(cfg.data.byte_capacity, bos_id=encoder.bos_id, pad_id=encoder.pad_id,
                        patches_per_sample=cfg.data.patches_per_sample)
    else:
        length = cfg.data.tokens_per_sample if family == "bpe" else cfg.data.seq_len
        packer = Packer(length, bos_id=encoder.bos_id, pad_id=encoder.pad_id)

    docs: list[dict] = []
    nll = defaultdict(float)  # per document
    targets = defaultdict(int)
    pending: list[dict] = []

    def score(samples: list[dict]) -> None:
        batch = {k: torch.from_numpy(np.stack([s[k] for s in samples])) for k in samples[0]}
        with torch.no_grad():
            logits = model(*model_inputs(batch, family, "cpu"))
            per_token = token_nll(logits, batch["targets"]).double()
        keep = batch["targets"] != IGNORE
        for doc, value in zip(batch["doc_visit"][keep].tolist(), per_token[keep].tolist()):
            nll[doc] += value
            targets[doc] += 1

    total_bytes = 0
    patch_lengths: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(0, dtype=np.int64))  # BLT: histogram
    for ctype, source, data in take_per_type(documents, max_bytes_per_type):
        index = len(docs)
        docs.append({"content_type": ctype, "source": source, "bytes": len(data)})
        total_bytes += len(data)
        tokens, nbytes, patch_start = encoder.encode(data)
        if family == "blt":
            starts = np.flatnonzero(patch_start)
            counts = np.bincount(np.diff(np.append(starts, len(tokens))))
            seen = patch_lengths[ctype]
            size = max(len(seen), len(counts))
            patch_lengths[ctype] = np.pad(seen, (0, size - len(seen))) + np.pad(counts, (0, size - len(counts)))
        packer.add(index, tokens, nbytes, patch_start)
        while not packer.needs_more():
            pending.append(packer.cut())
            if len(pending) == batch_size:
                score(pending)
                pending = []
    pending += packer.finish()
    for start in range(0, len(pending), batch_size):
        score(pending[start : start + batch_size])

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
    total_nll = sum(t["nll"] for t in per_type.values())
    return {
        "family": family,
        "bpb": total_nll / (math.log(2) * total_bytes) if total_bytes else None,
        "nll_nats": total_nll,
        "bytes": total_bytes,
        "documents": len(docs),
        "targets": sum(t["targets"] for t in per_type.values()),
        "by_content_type": dict(sorted(per_type.items())),
        "documents_detail": docs,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model export dir (RUN/export) or a run dir")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="byte dataset (from `blt-dist prepare`)")
    source.add_argument("--files", nargs="+", default=[], help="raw text files, one document each")
    parser.add_argument("--split", default=None, help="dataset split (default: val if present, else train)")
    parser.add_argument("--entropy-model", default=None,
                        help="entropy model export, for BLT entropy patching (default: the BLT config's data.entropy_model)")
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
        out = evaluate_model(model, cfg, documents, args.entropy_model, args.tokenizer, args.batch_size)
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
    for ctype, t in result["by_content_type"].items():
        patches = f"  {t['mean_patch_size']:.2f} bytes/patch" if t.get("mean_patch_size") else ""
        print(f"  {ctype:<14} {t['bpb']:.4f} bpb  {t['bytes']:>12,} bytes  {t['documents']:>6} documents{patches}")
    for name, noisy in result.get("noised", {}).items():
        print(f"noised {name} (seed {noisy['seed']}): {noisy['bpb']:.4f} bits/byte over {noisy['bytes']:,} "
              f"noised bytes, gap {noisy['gap']:+.4f} vs clean, {noisy['seconds']} s")
        for ctype, t in noisy["by_content_type"].items():
            print(f"  {ctype:<14} {t['bpb']:.4f} bpb  gap {t['gap']:+.4f}  {t['bytes']:>12,} bytes")
    return 0
