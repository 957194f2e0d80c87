"""The bench's data-path and generation workloads: patcher MB/s, loader MB/s against what
tiny-BLT training consumes, the entropy pass (`blt-dist entropies`'s own function) and cached
generation against a full forward per byte. tools/bench_patching.py and tools/bench_loader.py
use the same pieces.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from blt_dist.bench import s3
from blt_dist.bench.workloads import CONFIGS, config_model, training_step
from blt_dist.config import Config, load_config
from blt_dist.data.calibrate import calibrate_threshold
from blt_dist.data.entropies import ROW_WINDOWS, compute_entropy_dataset, document_entropies, resolve_dtype
from blt_dist.data.loader import ENTROPY_FORMAT, Loader, LoaderSpec
from blt_dist.data.patching import MODES, PatchingRule, patch_lengths_from_starts, patch_starts
from blt_dist.data.prepare import prepare
from blt_dist.data.shards import ByteDataset, SplitReader, iter_stream
from blt_dist.evaluation.generate import BLTDecoder, Sampling, generate
from blt_dist.flops import SampleShape, forward_flops_per_byte
from blt_dist.model import ModelConfig, build_model
from blt_dist.training.export import save_export
from blt_dist.vocab import BOS_ID, EOS_ID, OFFSET, encode_document

LOADER_TARGET_RATIO = 20.0  # loader MB/s over what training consumes
PATCHER_TARGET_MB_S = 200.0  # per core: patching never limits a loader worker


# ---------------------------------------------------------------------------------------------
# Data path: patcher, loader, entropy pass (also used by tools/bench_patching.py, bench_loader.py)


def synthetic_patching_batches(batch: int, seq: int, distinct: int = 16, seed: int = 0):
    """int64 ids in [B, T] with a document (BOS) every ~2 KB and float16 entropies shaped like a
    byte LM's (0..~5 nats); `distinct` batches so the data does not sit in cache."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(distinct):
        tokens = rng.integers(OFFSET, OFFSET + 256, size=(batch, seq), dtype=np.int64)
        tokens[rng.random((batch, seq)) < 1 / 2048] = BOS_ID
        level = np.abs(rng.standard_normal((batch, seq))).cumsum(axis=1) % 3.0
        entropies = (level * rng.random((batch, seq)) + rng.exponential(0.3, (batch, seq))).astype(np.float16)
        out.append((tokens, entropies))
    return out


def quantile_threshold(values: np.ndarray, mean_size: float = 4.5) -> float:
    """A quantile leaving ~1/mean_size of positions above it."""
    return float(np.quantile(values, 1.0 - 1.0 / mean_size))


def patching_rates(megabytes: float, batch: int = 64, seq: int = 16384) -> dict[str, dict]:
    """Per patching mode: {'mb_s', 'mean_patch'} over ~megabytes of positions, in this thread."""
    batches = synthetic_patching_batches(batch, seq)
    sample = batches[0][1].astype(np.float32)
    rules = {
        "entropy": PatchingRule("entropy", threshold=quantile_threshold(sample), max_patch_length=16),
        "monotonic": PatchingRule("monotonic", threshold_r=quantile_threshold(np.diff(sample, axis=1)),
                                  max_patch_length=16),
        "space": PatchingRule("space", max_patch_length=16),
        "static": PatchingRule("static", patch_size=4, max_patch_length=16),
        "byte": PatchingRule("byte", max_patch_length=16),
    }
    per_call = batch * seq
    calls = max(1, round(megabytes * 1e6 / per_call))
    out = {}
    for mode in MODES:
        rule = rules[mode]
        rule.starts(*batches[0])  # warm-up
        n_starts = 0
        begin = time.perf_counter()
        for k in range(calls):
            n_starts += int(rule.starts(*batches[k % len(batches)]).sum())
        out[mode] = {"mb_s": calls * per_call / (time.perf_counter() - begin) / 1e6,
                     "mean_patch": calls * per_call / n_starts}
    return out


def write_text_inputs(root: Path, megabytes: float, corpus: Optional[Path] = None) -> str:
    """~megabytes of JSONL documents per content type under root, from the corpus when it
    exists (round-robin over its files), else synthetic text. Returns a description."""
    budget = int(megabytes * 1e6)
    corpus = corpus if corpus is not None else CONFIGS.parent / "data" / "corpus" / "train"
    types = sorted(p for p in corpus.iterdir() if p.is_dir()) if corpus.is_dir() else []
    if types:
        for type_dir in types:
            share, written = budget // len(types), 0
            out = root / type_dir.name
            out.mkdir(parents=True)
            with open(out / "part.jsonl", "wb") as f:
                files = [p.read_bytes().splitlines() for p in sorted(type_dir.glob("*.jsonl"))]
                for row in range(max((len(lines) for lines in files), default=0)):
                    for lines in files:
                        if row < len(lines) and written < share:
                            f.write(lines[row] + b"\n")
                            written += len(lines[row])
        return f"{corpus} ({', '.join(t.name for t in types)})"
    (root / "synthetic").mkdir(parents=True)
    with open(root / "synthetic" / "part.jsonl", "w") as f:
        for text in synthetic_documents(budget):
            f.write(json.dumps({"text": text}) + "\n")
    return "synthetic text (data/corpus absent)"


def synthetic_documents(total_bytes: int, seed: int = 0) -> list[str]:
    """Word salad documents of 20-800 words (~100-5000 bytes), about total_bytes in all."""
    rng = np.random.default_rng(seed)
    words = "the byte latent transformer reads patches of bytes cut where the next byte is hard".split()
    docs, written = [], 0
    while written < total_bytes:
        docs.append(" ".join(rng.choice(words, int(rng.integers(20, 800)))))
        written += len(docs[-1])
    return docs


def tiny_entropy_export(out: Path) -> None:
    """A random 30k-parameter entropy model export (its entropies are noise, but the loader
    does the same work for any values)."""
    torch.manual_seed(0)
    cfg = Config()
    cfg.model = ModelConfig(family="entropy", dim=32, n_layers=1, n_heads=2, window=64)
    model = build_model(cfg.model)
    with torch.no_grad():
        model.output.weight.mul_(4.0)  # spread a random model's entropies so thresholds separate
    save_export(model.state_dict(), cfg, out)


def calibrated_threshold(entropy_dir: Path, target: float) -> float:
    dataset = ByteDataset(entropy_dir, format=ENTROPY_FORMAT)
    docs, nbytes = [], 0
    for stream in dataset.streams("train"):
        for sample in iter_stream(stream.path):
            docs.append((encode_document(sample["data"]), sample["entropies"]))
            nbytes += len(sample["data"])
            if nbytes > 2_000_000:
                break
    return calibrate_threshold(docs, "entropy", target_mean_size=target, max_patch_length=16).threshold


def measure_loader(spec, num_workers: int, seconds: float, skip_first: bool = True) -> tuple[float, float]:
    """(samples/s, MB/s of raw bytes), after the first batch (worker start-up) is out of the way
    (skip_first=False: from the loader's creation on, opening the dataset included)."""
    start = time.perf_counter()
    loader = Loader(spec, num_workers=num_workers)
    if skip_first:
        next(loader)
        start = time.perf_counter()
    batches = samples = nbytes = 0
    while time.perf_counter() - start < seconds or batches < 3:
        batch = next(loader)
        batches += 1
        samples += batch["tokens"].shape[0]
        nbytes += int(batch["target_bytes"].sum())
    elapsed = time.perf_counter() - start
    loader.close()
    return samples / elapsed, nbytes / elapsed / 1e6


def measure_loader_training(spec, steps: int) -> tuple[float, float]:
    """Raw bytes per second that configs/blt/tiny.yaml consumes on a loader batch (fwd + bwd +
    AdamW, fp32), as (best step, median step). The best step is the fastest the trainer can
    consume here, which makes the loader ratio conservative when other jobs share the cores."""
    torch.manual_seed(0)
    model = build_model(config_model("blt/tiny"))
    batch = next(Loader(spec))
    step = training_step(model, batch, "fp32", torch.device("cpu"))
    step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    nbytes = int(batch["target_bytes"].sum())
    return nbytes / min(times), nbytes / float(np.median(times))


@dataclass
class LoaderWorld:
    """A small byte dataset, its entropy shards (random tiny entropy model), a calibrated
    threshold and the BLT loader spec at configs/blt/tiny.yaml's shapes."""

    root: Path
    source: str
    megabytes: float
    entropy_seconds: float
    threshold: float
    blt_spec: object = field(repr=False)


def build_loader_world(root: Path, megabytes: float) -> LoaderWorld:
    blt_cfg = load_config(CONFIGS / "blt" / "tiny.yaml")
    source = write_text_inputs(root / "in", megabytes)
    prepare([root / "in"], root / "bytes", val_fraction=0.0, shard_size="4mb", progress=False)
    total = sum(s.bytes for s in ByteDataset(root / "bytes").streams())
    tiny_entropy_export(root / "entropy_model")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 30k-parameter model: a second thread only adds contention
    try:
        run = compute_entropy_dataset(root / "entropy_model", root / "bytes", root / "entropies", progress=False)
    finally:
        torch.set_num_threads(threads)
    threshold = calibrated_threshold(root / "entropies", blt_cfg.data.patching.target_mean_size)
    d = blt_cfg.data
    spec = LoaderSpec(
        path=str(root / "entropies"), family="blt", sample_len=d.byte_capacity, patches_per_sample=d.patches_per_sample,
        patching=dict(mode="entropy", threshold=threshold, threshold_r=None, patch_size=4, max_patch_length=16),
        split="train", micro_batch_size=blt_cfg.train.micro_batch_size, seed=0,
    )
    return LoaderWorld(root, source, total / 1e6, run.seconds, threshold, spec)


def measure_object_store(world: LoaderWorld, seconds: float) -> dict:
    """The BLT loader from a loopback S3 server (moto): MB/s with a cold node cache (every shard
    downloaded and verified as it is first read) and a warm one (the same cache, stamped), and
    what verification costs a local open: every shard hashed (first touch on a node) against the
    stamps read (every later open). None when moto is not installed."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="blt-bench-s3.") as tmp:
        tmp = Path(tmp)
        try:
            with s3.loopback_s3(tmp / "aws"):
                url = s3.upload(world.root / "entropies", "bench", "entropies")
                spec = dataclasses.replace(world.blt_spec, path=url, cache_dir=str(tmp / "cache"))
                out["cold_mb_s"] = measure_loader(spec, 0, seconds, skip_first=False)[1]
                out["warm_mb_s"] = measure_loader(spec, 0, seconds, skip_first=False)[1]
        except ModuleNotFoundError:  # moto (and its server's flask/werkzeug): the dev extra
            return None
        shards = sum(s.shards for s in ByteDataset(world.root / "entropies", format=ENTROPY_FORMAT).streams())
        saved = os.environ.get("BLT_DIST_CACHE")
        os.environ["BLT_DIST_CACHE"] = str(tmp / "stamps")  # no stamps yet: every shard is hashed
        try:
            for key in ("first_touch_s", "stamped_s"):
                start = time.perf_counter()
                SplitReader(ByteDataset(world.root / "entropies", format=ENTROPY_FORMAT), "train")
                out[key] = time.perf_counter() - start
        finally:
            if saved is None:
                os.environ.pop("BLT_DIST_CACHE", None)
            else:
                os.environ["BLT_DIST_CACHE"] = saved
        out["shards"] = shards
    return out


def measure_entropy_pass(kilobytes: float, dtype: str, device: torch.device) -> dict:
    """`blt-dist entropies`'s document_entropies with configs/entropy/tiny.yaml (random
    weights: the work does not depend on them) over ~kilobytes of documents."""
    cfg = load_config(CONFIGS / "entropy" / "tiny.yaml").model
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(cfg)
    docs = [d.encode() for d in synthetic_documents(int(kilobytes * 1e3), seed=1)]
    window = cfg.attention_window
    dtype = resolve_dtype(dtype, device)
    document_entropies(model, docs[:1], window, dtype=dtype)  # warm-up
    start = time.perf_counter()
    document_entropies(model, docs, window, dtype=dtype)
    seconds = time.perf_counter() - start
    nbytes = sum(len(d) for d in docs)
    # Useful work per output byte: a full row's causal windowed context (flops.py); the left
    # context re-read at chunk edges is not counted.
    per_byte = sum(forward_flops_per_byte(cfg, SampleShape(seq_len=ROW_WINDOWS * window)).values())
    return {"bytes_per_s": nbytes / seconds, "flops_per_s": nbytes / seconds * per_byte, "dtype": dtype, "bytes": nbytes}



# ---------------------------------------------------------------------------------------------
# Generation: cached steps against a full forward per byte


def cached_generation_speed(n_bytes: int, timed_lengths: int = 8) -> dict:
    """`blt-dist generate`'s cached loop against recomputing everything at every byte, for the
    tiny BLT (configs/blt/tiny.yaml) and tiny entropy model, random weights, entropy patching
    at a threshold for ~4.5 bytes/patch, sampling at temperature 1 with EOS banned (so every run
    makes n_bytes). Recomputing = entropy pass + patching + BLT forward over the whole sequence
    before each byte; it is timed at `timed_lengths` evenly spaced lengths and summed over all.
    Both sides run on one thread: a step of tiny models is mostly per-op overhead, which a second
    thread (spinning when the cores are shared) only slows down."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        entropy, cfg = build_model(config_model("entropy/tiny")).eval(), load_config(CONFIGS / "blt/tiny.yaml")
        blt = build_model(cfg.model).eval()
        prompt = synthetic_documents(1)[0].encode()[:64]
        # Random weights sample near-random bytes: calibrate the threshold on those.
        calibration = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
        with torch.inference_mode():
            sample = document_entropies(entropy, [calibration], entropy.window)[0][1:].astype(np.float16)
            cfg.data.patching.mode, cfg.data.patching.threshold = "entropy", quantile_threshold(sample)
            decoder = BLTDecoder(blt, cfg, entropy)
            decoder.banned = decoder.banned + [EOS_ID]
            result = generate(decoder, prompt, n_bytes, Sampling(seed=0))
            rule, tokens = PatchingRule.from_config(cfg.data.patching), np.array(result.tokens)

            def full_pass(length: int) -> float:
                began = time.perf_counter()
                ids = tokens[:length]
                entropies = document_entropies(entropy, [ids], entropy.window)[0].astype(np.float16)
                starts = patch_starts(ids, entropies, rule)
                lengths = torch.from_numpy(patch_lengths_from_starts(starts, int(starts.sum())))[None]
                ids = torch.from_numpy(ids)[None]
                blt(ids, lengths, torch.zeros_like(ids))
                return time.perf_counter() - began

            full_pass(result.prompt_tokens)  # warm-up
            # Byte j is predicted from prompt + j tokens: the midpoints of timed_lengths equal bins.
            lengths = [result.prompt_tokens + int((m + 0.5) * n_bytes / timed_lengths) for m in range(timed_lengths)]
            full_seconds = n_bytes * float(np.mean([full_pass(length) for length in lengths]))
    finally:
        torch.set_num_threads(threads)
    starts = decoder.layout_starts(len(result.tokens))
    return {"bytes": len(result.data), "cached_bytes_per_s": len(result.data) / result.seconds,
            "full_bytes_per_s": n_bytes / full_seconds, "speedup": full_seconds / result.seconds,
            "mean_patch": len(starts) / sum(starts)}


