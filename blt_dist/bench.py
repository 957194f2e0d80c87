"""`blt-dist bench`: the compute figures of the project, each printed beside its target.

    blt-dist bench                      # --suite quick: every row, in under 5 minutes on 2 cores
    blt-dist bench --suite full --json bench.json

One run measures, side by side (so ratios are not skewed by a machine that got busier):
  peak      fp32 and bf16 matmul FLOP/s (metrics.measure_cpu_peak; GPU: the datasheet)
  train     bytes/s and MFU of a fwd+bwd+AdamW step for tiny and 125M-shaped BLT and their
            FLOP-matched BPE twins (configs/blt, configs/bpe) at 1k-8k-byte samples, on
            synthetic random bytes with realistic patch lengths (mean ~4.5, max 16, BOS alone);
            MFU uses the real FLOP count of blt_dist/flops.py; bf16 autocast where it is faster
  peers     the same step beside transformers' BltForCausalLM and LlamaForCausalLM at the
            same shape (when transformers is installed: `pip install blt-dist[bench]`)
  data      patcher MB/s, loader MB/s against tiny BLT training consumption, entropy-pass KB/s
            (`blt-dist entropies`'s own function) with its MFU
  memory    peak RSS of a 125M-shaped BLT step at 8192 bytes against its BPE twin (each in a
            fresh subprocess, for a clean ru_maxrss; those subprocesses also time the 125M
            rows), and per-rank parameter + optimizer bytes under ZeRO-0/1/2/3 at 2 ranks,
            computed from ZeRO's partitioning rules (not measured)

Step times are the fastest of the timed steps after one warm-up step (allocations, AdamW
state): the best a step can do here, which stays comparable when other jobs share the cores.
Nothing here asserts a time; tests/test_bench.py checks the structure on the smoke suite.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from blt_dist.config import Config, load_config
from blt_dist.flops import SampleShape, forward_flops_per_byte, params_by_component, train_flops_per_byte
from blt_dist.metrics import GPU_PEAKS, bf16_is_native, measure_cpu_peak
from blt_dist.model import ModelConfig, build_model
from blt_dist.vocab import BOS_ID, OFFSET

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BYTES_PER_TOKEN = 4.4  # the BPE configs' data.bytes_per_token
BYTES_PER_PATCH_SLOT = 4  # the BLT configs: 8192 bytes in 2048 patch slots
LOADER_TARGET_RATIO = 20.0  # loader MB/s over what training consumes
PATCHER_TARGET_MB_S = 200.0  # per core: patching never limits a loader worker


# ---------------------------------------------------------------------------------------------
# Rows and suites


@dataclass
class Row:
    """One figure. `value` is None when the row was skipped (`note` says why)."""

    figure: str
    value: Optional[float]
    unit: str
    target: str = "info"  # ">= 0.8", "<= 1.5", or "info" (a measurement without a target)
    note: str = ""

    @property
    def met(self) -> Optional[bool]:
        if self.value is None or self.target == "info":
            return None
        op, bound = self.target.split()
        return self.value >= float(bound) if op == ">=" else self.value <= float(bound)

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "met": self.met}


@dataclass(frozen=True)
class Suite:
    tiny_sizes: tuple[int, ...]  # sample bytes for the tiny BLT/BPE pair
    big_sizes: tuple[int, ...]  # sample bytes for the 125M pair (always includes 8192 for RSS)
    step_bytes: int  # bytes per training step: batch = step_bytes // sample bytes (at least 1)
    timed_steps: int
    big_timed_steps: int
    llama_tokens: tuple[int, ...]
    peers: bool
    entropy_kb: float
    loader_mb: float
    loader_seconds: float
    patcher_mb: float
    big_models: bool  # the 125M rows (subprocesses): off only in the smoke suite
    big_both_dtypes: bool  # time the 125M steps in fp32 and bf16 (else bf16 where its matmuls are faster)


SUITES = {
    "quick": Suite((1024, 2048, 4096, 8192), (8192,), 8192, 2, 1, (256, 2048), True, 48, 0.5, 1.0, 20, True, False),
    "full": Suite((1024, 2048, 4096, 8192), (1024, 2048, 4096, 8192), 8192, 3, 2, (256, 512, 1024, 2048), True,
                  256, 4.0, 3.0, 100, True, True),
    # For tests: tiny shapes only, seconds in all.
    "smoke": Suite((256, 512), (), 512, 1, 1, (64,), True, 2, 0.05, 0.2, 1, False, False),
}


# ---------------------------------------------------------------------------------------------
# Synthetic training batches and one timed training step


def blt_batch(sample_bytes: int, batch: int, seed: int = 0, max_patch_length: int = 16) -> dict:
    """Random bytes in one document per row, cut into patches of mean ~4.5 bytes (at most
    max_patch_length; the first patch is BOS alone, as the causal layout requires)."""
    rng = np.random.default_rng(seed)
    patch_slots = max(2, sample_bytes // BYTES_PER_PATCH_SLOT)
    tokens = rng.integers(OFFSET, OFFSET + 256, (batch, sample_bytes), dtype=np.int64)
    tokens[:, 0] = BOS_ID
    lengths = np.zeros((batch, patch_slots), dtype=np.int64)
    for row in range(batch):
        # geometric(1/4.6) clipped at 16 has mean ~4.5: short patches common, long ones rare
        draws = np.minimum(rng.geometric(1 / 4.6, patch_slots), max_patch_length)
        draws[0] = 1
        ends = np.cumsum(draws)
        count = int(np.searchsorted(ends, sample_bytes))  # patches that fit entirely
        lengths[row, :count] = draws[:count]
        lengths[row, count] = sample_bytes - (ends[count - 1] if count else 0)
    targets = np.concatenate([tokens[:, 1:], np.full((batch, 1), -100)], axis=1)  # packing.IGNORE
    return {
        "tokens": torch.from_numpy(tokens), "patch_lengths": torch.from_numpy(lengths),
        "doc_ids": torch.zeros(batch, sample_bytes, dtype=torch.int64),
        "targets": torch.from_numpy(targets), "target_bytes": torch.from_numpy((targets >= 0).astype(np.int64)),
    }


def bpe_batch(tokens_per_sample: int, batch: int, vocab_size: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab_size, (batch, tokens_per_sample), dtype=np.int64)
    targets = np.concatenate([tokens[:, 1:], np.full((batch, 1), -100)], axis=1)
    nbytes = np.where(targets >= 0, 4, 0)  # only for the loss sums; throughput counts 4.4 bytes/token
    return {
        "tokens": torch.from_numpy(tokens), "doc_ids": torch.zeros(batch, tokens_per_sample, dtype=torch.int64),
        "targets": torch.from_numpy(targets), "target_bytes": torch.from_numpy(nbytes),
    }


def tokens_for(sample_bytes: int) -> int:
    """BPE tokens covering `sample_bytes` at 4.4 bytes/token, a multiple of 8 (as flops.match_bpe)."""
    return max(8, int(round(sample_bytes / BYTES_PER_TOKEN / 8)) * 8)


@dataclass
class Workload:
    """A model config at one sample size: its batch, raw bytes per step and real FLOPs/byte."""

    model: ModelConfig
    sample_bytes: int
    batch: int

    def make_batch(self) -> dict:
        if self.model.family == "blt":
            return blt_batch(self.sample_bytes, self.batch)
        return bpe_batch(tokens_for(self.sample_bytes), self.batch, self.model.vocab_size)

    def shape(self, batch: dict) -> SampleShape:
        if self.model.family == "blt":
            patches = int((batch["patch_lengths"] > 0).sum())
            mean_patch = batch["patch_lengths"].sum().item() / patches
            return SampleShape(byte_capacity=self.sample_bytes, patches_per_sample=batch["patch_lengths"].shape[1],
                               patch_size=mean_patch)
        return SampleShape(tokens_per_sample=tokens_for(self.sample_bytes), bytes_per_token=BYTES_PER_TOKEN)

    def bytes_per_step(self) -> float:
        if self.model.family == "blt":
            return float(self.batch * self.sample_bytes)
        return self.batch * tokens_for(self.sample_bytes) * BYTES_PER_TOKEN


def training_step(model: torch.nn.Module, batch: dict, dtype: str, device: torch.device,
                  forward: Optional[Callable] = None) -> Callable[[], None]:
    """A fwd + bwd + AdamW step on one batch, as the trainer does it (loss.loss_and_sums).
    `forward(model, batch) -> loss` replaces ours for a peer model."""
    from blt_dist.loss import loss_and_sums

    batch = {k: v.to(device) for k, v in batch.items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def our_forward(model, batch):
        if "patch_lengths" in batch:
            logits = model(batch["tokens"], batch["patch_lengths"], batch["doc_ids"])
        else:
            logits = model(batch["tokens"], batch["doc_ids"])
        return loss_and_sums(logits, batch["targets"], batch["target_bytes"])[0]

    forward = forward or our_forward

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = forward(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step


def fastest_step(step: Callable[[], None], timed_steps: int) -> float:
    """Seconds of the fastest of `timed_steps` steps after one warm-up step."""
    step()
    times = []
    for _ in range(timed_steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return min(times)


def fastest_dtype(make_model: Callable[[], torch.nn.Module], batch: dict, dtypes: tuple[str, ...], timed_steps: int,
                  device: torch.device, forward: Optional[Callable] = None) -> tuple[float, str]:
    """(seconds, dtype) of the fastest step over `dtypes`. bf16 is not always faster: on small
    matrices, or with threads descheduled by other jobs, bf16 autocast steps were measured
    several times slower than fp32 here, so it is measured, not assumed."""
    best = (math.inf, dtypes[0])
    for dtype in dtypes:
        torch.manual_seed(0)
        with torch.device(device):
            model = make_model()
        best = min(best, (fastest_step(training_step(model, batch, dtype, device, forward), timed_steps), dtype))
    return best


def measure_workload(work: Workload, dtypes: tuple[str, ...], timed_steps: int, device: torch.device) -> dict:
    """{'step_s', 'dtype', 'bytes_per_s', 'flops_per_s', 'train_flops_per_byte'} of our model,
    at the fastest of `dtypes`."""
    batch = work.make_batch()
    flops_per_byte = train_flops_per_byte(work.model, work.shape(batch))
    seconds, dtype = fastest_dtype(lambda: build_model(work.model), batch, dtypes, timed_steps, device)
    bytes_per_s = work.bytes_per_step() / seconds
    return {"step_s": seconds, "dtype": dtype, "bytes_per_s": bytes_per_s, "flops_per_s": bytes_per_s * flops_per_byte,
            "train_flops_per_byte": flops_per_byte}


def config_model(name: str, **overrides) -> ModelConfig:
    """configs/<name>.yaml's model section, with field overrides."""
    return dataclasses.replace(load_config(CONFIGS / f"{name}.yaml").model, **overrides)


# ---------------------------------------------------------------------------------------------
# Peers (transformers), at our shapes


def hf_blt(m: ModelConfig, sample_bytes: int):
    """transformers' BltForCausalLM with our BLT's shape (widths, depths, heads, k, FFN widths,
    hash n-grams and buckets); patches are given (no patcher inside)."""
    from transformers import BltConfig, BltForCausalLM

    def local(c, cross_all):
        return dict(hidden_size=c.dim, num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
                    intermediate_size=m.ffn_hidden(c.dim), cross_attn_k=m.cross_attn_k, hidden_size_global=m.dim,
                    max_position_embeddings=sample_bytes, cross_attn_all_layers=cross_all, rope_theta=m.rope_theta)

    config = BltConfig(
        vocab_size=m.vocab_size, max_position_embeddings=sample_bytes, patch_in_forward=False,
        cross_attn_k=m.cross_attn_k, encoder_hash_byte_group_size=list(m.hash.ngram_sizes),
        encoder_hash_byte_group_vocab=m.hash.buckets, encoder_hash_byte_group_nb_functions=1,
        encoder_config=local(m.encoder, False), decoder_config=local(m.decoder, True),
        global_config=dict(hidden_size=m.dim, num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads,
                           intermediate_size=m.ffn_hidden(m.dim), max_position_embeddings=sample_bytes),
        rope_theta=m.rope_theta,
    )
    config._attn_implementation = "sdpa"
    return BltForCausalLM(config)


def hf_llama(m: ModelConfig, tokens: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.dim, intermediate_size=m.ffn_hidden(m.dim),
                         num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads,
                         num_key_value_heads=m.kv_heads, max_position_embeddings=tokens, rope_theta=m.rope_theta,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def _hf_forward(model, batch):
    kwargs = {"patch_lengths": batch["patch_lengths"]} if "patch_lengths" in batch else {}
    return model(input_ids=batch["tokens"], labels=batch["targets"], **kwargs).loss


def transformers_version() -> Optional[str]:
    try:
        import transformers
    except ImportError:
        return None
    return transformers.__version__


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
    from blt_dist.data.patching import MODES, PatchingRule

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
    from blt_dist.export import save_export

    torch.manual_seed(0)
    cfg = Config()
    cfg.model = ModelConfig(family="entropy", dim=32, n_layers=1, n_heads=2, window=64)
    model = build_model(cfg.model)
    with torch.no_grad():
        model.output.weight.mul_(4.0)  # spread a random model's entropies so thresholds separate
    save_export(model.state_dict(), cfg, out)


def calibrated_threshold(entropy_dir: Path, target: float) -> float:
    from blt_dist.data.calibrate import calibrate_threshold
    from blt_dist.data.loader import ENTROPY_FORMAT
    from blt_dist.data.shards import ByteDataset, iter_stream
    from blt_dist.vocab import encode_document

    dataset = ByteDataset(entropy_dir, format=ENTROPY_FORMAT)
    docs, nbytes = [], 0
    for stream in dataset.streams("train"):
        for sample in iter_stream(stream.path):
            docs.append((encode_document(sample["data"]), sample["entropies"]))
            nbytes += len(sample["data"])
            if nbytes > 2_000_000:
                break
    return calibrate_threshold(docs, "entropy", target_mean_size=target, max_patch_length=16).threshold


def measure_loader(spec, num_workers: int, seconds: float) -> tuple[float, float]:
    """(samples/s, MB/s of raw bytes), after the first batch (worker start-up) is out of the way."""
    from blt_dist.data.loader import Loader

    loader = Loader(spec, num_workers=num_workers)
    next(loader)
    batches = samples = nbytes = 0
    start = time.perf_counter()
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
    from blt_dist.data.loader import Loader

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
    from blt_dist.data.entropies import compute_entropy_dataset
    from blt_dist.data.loader import LoaderSpec
    from blt_dist.data.prepare import prepare
    from blt_dist.data.shards import ByteDataset

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


def measure_entropy_pass(kilobytes: float, dtype: str, device: torch.device) -> dict:
    """`blt-dist entropies`'s document_entropies with configs/entropy/tiny.yaml (random
    weights: the work does not depend on them) over ~kilobytes of documents."""
    from blt_dist.data.entropies import ROW_WINDOWS, document_entropies, resolve_dtype

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
# Memory: peak RSS (subprocess) and ZeRO partitioning


def run_child(name: str, sample_bytes: int, dtypes: tuple[str, ...], timed_steps: int) -> dict:
    """Times a training step of configs/<name>.yaml in a fresh process; returns its
    measure_workload figures plus 'maxrss_bytes' (that process's peak RSS)."""
    request = json.dumps({"name": name, "sample_bytes": sample_bytes, "dtypes": dtypes, "timed_steps": timed_steps,
                          "threads": torch.get_num_threads()})
    code = "import sys, blt_dist.bench as b; b._child_main(sys.argv[1])"
    done = subprocess.run([sys.executable, "-c", code, request], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench child {name} at {sample_bytes} bytes failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _child_main(request: str) -> None:
    r = json.loads(request)
    torch.set_num_threads(r["threads"])
    work = Workload(config_model(r["name"]), r["sample_bytes"], batch=1)
    out = measure_workload(work, tuple(r["dtypes"]), r["timed_steps"], torch.device("cpu"))
    out["maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps(out))


def zero_bytes_per_rank(params: int, stage: int, ranks: int, dtype: str) -> float:
    """Parameter + gradient + AdamW bytes per rank under ZeRO `stage` (Rajbhandari et al. 2020,
    as DeepSpeed partitions them; alignment padding ignored). bf16: 2-byte params and grads
    plus fp32 master weights and two moments (12 bytes); fp32: 4 + 4 + 8 bytes."""
    p, g, o = (2, 2, 12) if dtype == "bf16" else (4, 4, 8)
    sharded = {0: 0, 1: o, 2: o + g, 3: o + g + p}[stage]
    return params * ((p + g + o - sharded) + sharded / ranks)


# ---------------------------------------------------------------------------------------------
# The suite


def _peak(dtype: str, device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        value = next((v for (frag, kind), v in GPU_PEAKS.items() if frag in name and kind == dtype), math.nan)
        return value, f"{name} datasheet"
    measured = measure_cpu_peak(torch.bfloat16 if dtype == "bf16" else torch.float32)
    return measured.flops, measured.describe().replace("CPU ", "").replace(" at start-up", "")


def run_suite(suite_name: str, device: Optional[torch.device] = None, log: Callable[[str], None] = print) -> dict:
    suite = SUITES[suite_name]
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    began = time.perf_counter()
    rows: list[Row] = []

    def add(row: Row) -> None:
        rows.append(row)
        shown = "skipped" if row.value is None else f"{row.value:.4g} {row.unit}"
        log(f"  {row.figure}: {shown} (target {row.target}) {row.note}")

    # -- peaks
    peaks: dict[str, float] = {}
    for dtype in ("fp32", "bf16"):
        if dtype == "bf16" and not bf16_is_native(device):
            add(Row("matmul peak bf16", None, "GFLOP/s", note="skipped: no native bf16 here"))
            continue
        peaks[dtype], how = _peak(dtype, device)
        add(Row(f"matmul peak {dtype}", peaks[dtype] / 1e9, "GFLOP/s", note=how))
    # bf16 autocast where it is faster: measured per workload (both dtypes), except for the
    # 125M steps of the quick suite, which take bf16 when its matmuls are clearly faster.
    dtypes = ("fp32", "bf16") if "bf16" in peaks else ("fp32",)
    big_dtypes = dtypes if suite.big_both_dtypes or len(dtypes) == 1 else (
        ("bf16",) if peaks["bf16"] > 1.3 * peaks["fp32"] else ("fp32",))

    def mfu(r: dict) -> float:
        return r["flops_per_s"] / peaks[r["dtype"]]

    # -- training: tiny pair in this process, 125M pair in subprocesses (clean peak RSS)
    measured: dict[tuple[str, int], dict] = {}
    for name in ("blt/tiny", "bpe/tiny"):
        for size in suite.tiny_sizes:
            work = Workload(config_model(name), size, batch=max(1, suite.step_bytes // size))
            measured[name, size] = r = measure_workload(work, dtypes, suite.timed_steps, device)
            add(Row(f"{name} train bytes/s @ {size} B", r["bytes_per_s"], "B/s",
                    note=f"batch {work.batch}, {r['dtype']}, MFU {100 * mfu(r):.1f}%, "
                    f"{r['train_flops_per_byte'] / 1e6:.1f} MFLOP/B"))
    if suite.big_models:
        for name in ("blt/125m", "bpe/125m"):
            for size in suite.big_sizes:
                measured[name, size] = r = run_child(name, size, big_dtypes, suite.big_timed_steps)
                add(Row(f"{name} train bytes/s @ {size} B", r["bytes_per_s"], "B/s",
                        note=f"batch 1, {r['dtype']}, MFU {100 * mfu(r):.1f}%, "
                        f"{r['train_flops_per_byte'] / 1e6:.1f} MFLOP/B, peak RSS {r['maxrss_bytes'] / 2**30:.2f} GiB"))

    small, large = min(suite.tiny_sizes), max(suite.tiny_sizes)
    at_large, at_small = measured["blt/tiny", large], measured["blt/tiny", small]
    add(Row(f"BLT MFU @ {large} B / @ {small} B (tiny)", mfu(at_large) / mfu(at_small), "x", ">= 0.8",
            note=f"{at_large['dtype']} vs {at_small['dtype']} (each against its own dtype's peak)"))
    if suite.big_models and len(suite.big_sizes) > 1:
        small_big = min(suite.big_sizes)
        add(Row(f"BLT MFU @ 8192 B / @ {small_big} B (125M)",
                mfu(measured["blt/125m", 8192]) / mfu(measured["blt/125m", small_big]), "x", ">= 0.8"))
    if not suite.big_models:
        for figure, target in (("BLT / BPE bytes/s, 125M, 8192 B", ">= 0.9"),
                               ("peak RSS BLT / BPE step, 125M, 8192 B", "<= 1.5")):
            add(Row(figure, None, "x", target, note=f"skipped: not in the {suite_name} suite"))
    else:
        blt, bpe = measured["blt/125m", 8192], measured["bpe/125m", 8192]
        add(Row("BLT / BPE bytes/s, 125M, 8192 B", blt["bytes_per_s"] / bpe["bytes_per_s"], "x", ">= 0.9",
                note=f"FLOPs/B ratio {blt['train_flops_per_byte'] / bpe['train_flops_per_byte']:.2f}"))
        add(Row("peak RSS BLT / BPE step, 125M, 8192 B", blt["maxrss_bytes"] / bpe["maxrss_bytes"], "x", "<= 1.5",
                note=f"{blt['maxrss_bytes'] / 2**30:.2f} vs {bpe['maxrss_bytes'] / 2**30:.2f} GiB"))

    # -- peers: each side at its fastest dtype
    version = transformers_version()
    if not suite.peers or version is None:
        why = "skipped: transformers not installed (pip install blt-dist[bench])" if version is None else "skipped"
        add(Row("our BLT step / HF BltForCausalLM, tiny shape", None, "x", "<= 0.33", note=why))
        add(Row("our LM step / HF Llama, tiny BPE shape (worst)", None, "x", "<= 1.0", note=why))
    else:
        m = config_model("blt/tiny")
        batch = Workload(m, large, batch=1).make_batch()
        ours, our_dtype = fastest_dtype(lambda: build_model(m), batch, dtypes, suite.timed_steps, device)
        theirs, their_dtype = fastest_dtype(lambda: hf_blt(m, large), batch, dtypes, suite.timed_steps, device,
                                            _hf_forward)
        add(Row(f"our BLT step / HF BltForCausalLM, tiny shape, {large} B", ours / theirs, "x", "<= 0.33",
                note=f"{ours:.3f} s ({our_dtype}) vs {theirs:.3f} s ({their_dtype}), transformers {version}"))
        m, ratios = config_model("bpe/tiny"), []
        for tokens in suite.llama_tokens:
            batch = bpe_batch(tokens, max(1, suite.step_bytes // 4 // tokens), m.vocab_size)
            ours, our_dtype = fastest_dtype(lambda: build_model(m), batch, dtypes, suite.timed_steps, device)
            theirs, their_dtype = fastest_dtype(lambda: hf_llama(m, tokens), batch, dtypes, suite.timed_steps, device,
                                                _hf_forward)
            ratios.append((ours / theirs, tokens, our_dtype, their_dtype))
        worst = max(ratios)
        add(Row(f"our LM step / HF Llama, tiny BPE shape, {'/'.join(str(t) for t in suite.llama_tokens)} tokens (worst)",
                worst[0], "x", "<= 1.0", note=", ".join(f"{r:.2f} @ {t} ({a} vs {b})" for r, t, a, b in ratios)))

    # -- data path
    rates = patching_rates(suite.patcher_mb)
    add(Row("patcher MB/s, entropy mode, 1 core", rates["entropy"]["mb_s"], "MB/s", f">= {PATCHER_TARGET_MB_S:.0f}",
            note=", ".join(f"{mode} {r['mb_s']:.0f}" for mode, r in rates.items())))
    with tempfile.TemporaryDirectory(prefix="blt-bench.") as tmp:
        world = build_loader_world(Path(tmp), suite.loader_mb)
        _, loader_mb_s = measure_loader(world.blt_spec, 0, suite.loader_seconds)
        consumed, _ = measure_loader_training(world.blt_spec, max(2, suite.timed_steps))
        add(Row("BLT loader MB/s / tiny BLT training consumption", loader_mb_s * 1e6 / consumed, "x",
                f">= {LOADER_TARGET_RATIO:.0f}",
                note=f"loader {loader_mb_s:.2f} MB/s (0 workers), training {consumed / 1e6:.4f} MB/s (fp32)"))
    entropy = measure_entropy_pass(suite.entropy_kb, "auto", device)
    entropy_peak = peaks.get(entropy["dtype"], math.nan)
    add(Row("entropy pass, tiny entropy model", entropy["bytes_per_s"] / 1e3, "KB/s", ">= 114",
            note=f"{entropy['dtype']}, MFU {100 * entropy['flops_per_s'] / entropy_peak:.1f}%, "
            f"{entropy['bytes'] / 1e3:.0f} KB"))

    # -- ZeRO partitioning (computed)
    params = sum(params_by_component(config_model("blt/125m")).values())
    for stage in range(4):
        add(Row(f"ZeRO-{stage} param+grad+optimizer bytes/rank, 125M BLT, 2 ranks",
                zero_bytes_per_rank(params, stage, 2, "bf16") / 2**30, "GiB",
                note=f"computed from ZeRO's partitioning rules (not measured), {params / 1e6:.0f}M params, bf16"))

    # -- GPU row
    if device.type == "cuda":
        for name in ("blt/1b", "bpe/1b"):
            r = measure_workload(Workload(config_model(name), 8192, batch=1), ("bf16",), suite.timed_steps, device)
            add(Row(f"GPU MFU {name}, 8192 B, bf16", 100 * mfu(r), "%", ">= 40"))
    else:
        add(Row("GPU MFU 1B BLT and BPE, bf16", None, "%", ">= 40", note="skipped: no CUDA device"))

    return {"suite": suite_name, "machine": machine_info(device), "seconds": time.perf_counter() - began, "rows": [row.as_dict() for row in rows]}


def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {"cpu": cpu, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers_version(), "device": str(device),
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"`blt-dist bench --suite {result['suite']}`: {m['cpu']}, {m['cpus']} CPUs, {m['torch_threads']} torch threads, "
        f"torch {m['torch']}, transformers {m['transformers'] or '-'}, load average {m['load_average']:.1f} at start, "
        f"{result['seconds']:.0f} s",
        "",
        "| figure | measured | target | met | notes |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        value = "skipped" if r["value"] is None else f"{r['value']:.3g} {r['unit']}"
        met = {True: "yes", False: "**no**", None: ""}[r["met"]]
        lines.append(f"| {r['figure']} | {value} | {r['target']} | {met} | {r['note']} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", choices=list(SUITES), default="quick",
                        help="quick: every row in < 5 min on 2 cores (default); full: every size, more steps; "
                        "smoke: tiny shapes only (tests)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the results as JSON")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_suite(args.suite, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0
