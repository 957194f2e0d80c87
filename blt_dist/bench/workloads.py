"""The bench's training workloads: synthetic batches shaped like the loaders', one timed
fwd + bwd + AdamW step of a plain torch module, steps of several models timed interleaved, and
transformers' BltForCausalLM / LlamaForCausalLM built at our shapes (the peers).

Batches are random bytes with realistic patch lengths (mean ~4.5, max 16, BOS alone). Step
times are the fastest of the timed steps after one warm-up step (allocations, AdamW state).
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from blt_dist.config import load_config
from blt_dist.flops import SampleShape, train_flops_per_byte
from blt_dist.model import ModelConfig, batch_facts, build_model, model_inputs
from blt_dist.model.loss import loss_and_sum_tensor
from blt_dist.vocab import BOS_ID, OFFSET

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
BYTES_PER_TOKEN = 4.4  # the BPE configs' data.bytes_per_token
BYTES_PER_PATCH_SLOT = 4  # the BLT configs: 8192 bytes in 2048 patch slots


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
        left = sample_bytes - (ends[count - 1] if count else 0)
        if count < patch_slots:
            lengths[row, count] = left
        else:  # every slot filled short of the row (rare draws): lengthen patches from the end
            for slot in range(patch_slots - 1, 0, -1):
                grow = min(left, max_patch_length - lengths[row, slot])
                lengths[row, slot] += grow
                left -= grow
            if left:
                raise ValueError(f"{sample_bytes} bytes do not fit {patch_slots} patches of <= {max_patch_length}")
    targets = np.concatenate([tokens[:, 1:], np.full((batch, 1), -100)], axis=1)  # packing.IGNORE
    out = {
        "tokens": torch.from_numpy(tokens), "patch_lengths": torch.from_numpy(lengths),
        "doc_ids": torch.zeros(batch, sample_bytes, dtype=torch.int64),
        "targets": torch.from_numpy(targets), "target_bytes": torch.from_numpy((targets >= 0).astype(np.int64)),
    }
    out["facts"] = batch_facts(out, "blt")  # as the loader makes them
    return out


def bpe_batch(tokens_per_sample: int, batch: int, vocab_size: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab_size, (batch, tokens_per_sample), dtype=np.int64)
    targets = np.concatenate([tokens[:, 1:], np.full((batch, 1), -100)], axis=1)
    nbytes = np.where(targets >= 0, 4, 0)  # only for the loss sums; throughput counts 4.4 bytes/token
    out = {
        "tokens": torch.from_numpy(tokens), "doc_ids": torch.zeros(batch, tokens_per_sample, dtype=torch.int64),
        "targets": torch.from_numpy(targets), "target_bytes": torch.from_numpy(nbytes),
    }
    out["facts"] = batch_facts(out, "bpe")
    return out


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
    """A fwd + bwd + AdamW step on one batch, as the trainer does it (loss.loss_and_sum_tensor).
    `forward(model, batch) -> loss` replaces ours for a peer model."""
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def our_forward(model, batch):
        family = "blt" if "patch_lengths" in batch else "bpe"  # the LMs take the same inputs
        logits = model(*model_inputs(batch, family, device))
        return loss_and_sum_tensor(logits, batch["targets"], batch["target_bytes"])[0]

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


def interleaved_step_times(steps: Callable[[str], dict[str, Callable[[], None]]], dtypes: tuple[str, ...],
                           rounds: int) -> dict[str, dict[str, float]]:
    """{name: {dtype: seconds of the fastest step}}. For each dtype, `steps(dtype)` gives the
    training steps to compare by name; after a warm-up step each (allocations, AdamW state)
    they run interleaved (a, b, a, b, ...) for `rounds` rounds, so that load from other jobs
    drifting during the measurement hits every side alike: two sequential measurements of one
    ratio moved by 25% between runs on a shared machine. bf16 is not always faster: on small
    matrices, or with threads descheduled by other jobs, bf16 autocast steps were measured
    several times slower than fp32 here, so it is measured, not assumed."""
    best: dict[str, dict[str, float]] = {}
    for dtype in dtypes:
        named = steps(dtype)
        for step in named.values():
            step()
        for _ in range(rounds):
            for name, step in named.items():
                start = time.perf_counter()
                step()
                seconds = time.perf_counter() - start
                best.setdefault(name, {})[dtype] = min(best.get(name, {}).get(dtype, math.inf), seconds)
        del named
    return best


def fresh_step(make_model: Callable[[], torch.nn.Module], batch: dict, dtype: str, device: torch.device,
               forward: Optional[Callable] = None) -> Callable[[], None]:
    """training_step on a model built with seed 0 on `device`."""
    torch.manual_seed(0)
    with torch.device(device):
        model = make_model()
    return training_step(model, batch, dtype, device, forward)


def side_by_side(makers: dict[str, Callable[[], torch.nn.Module]], forwards: dict[str, Optional[Callable]],
                 batch: dict, dtypes: tuple[str, ...], rounds: int, device: torch.device) -> dict[str, tuple[float, str]]:
    """{name: (seconds, dtype)} of each model's fastest step on one batch, at its fastest dtype,
    the models' steps interleaved (interleaved_step_times)."""
    times = interleaved_step_times(
        lambda dtype: {name: fresh_step(make, batch, dtype, device, forwards.get(name)) for name, make in makers.items()},
        dtypes, rounds)
    return {name: min((seconds, dtype) for dtype, seconds in by_dtype.items()) for name, by_dtype in times.items()}


def measure_workloads(works: list[Workload], dtypes: tuple[str, ...], timed_steps: int, device: torch.device) -> list[dict]:
    """Per workload {'step_s', 'dtype', 'bytes_per_s', 'flops_per_s', 'train_flops_per_byte',
    'flops_per_s_by_dtype'} of our model at the fastest of `dtypes`, the workloads' steps
    interleaved (interleaved_step_times): ratios between them (MFU at 8 KB over 1 KB) are
    then taken under the same load."""
    batches = [work.make_batch() for work in works]
    times = interleaved_step_times(
        lambda dtype: {i: fresh_step(lambda w=work: build_model(w.model), batch, dtype, device)
                       for i, (work, batch) in enumerate(zip(works, batches))},
        dtypes, timed_steps)
    results = []
    for i, (work, batch) in enumerate(zip(works, batches)):
        flops_per_byte = train_flops_per_byte(work.model, work.shape(batch))
        seconds, dtype = min((seconds, dtype) for dtype, seconds in times[i].items())
        bytes_per_s = work.bytes_per_step() / seconds
        results.append({"step_s": seconds, "dtype": dtype, "bytes_per_s": bytes_per_s,
                        "flops_per_s": bytes_per_s * flops_per_byte, "train_flops_per_byte": flops_per_byte,
                        "flops_per_s_by_dtype": {d: work.bytes_per_step() / t * flops_per_byte for d, t in times[i].items()}})
    return results


def measure_workload(work: Workload, dtypes: tuple[str, ...], timed_steps: int, device: torch.device) -> dict:
    """measure_workloads for one workload."""
    return measure_workloads([work], dtypes, timed_steps, device)[0]


def config_model(name: str, **overrides) -> ModelConfig:
    """configs/<name>.yaml's model section, with field overrides."""
    return dataclasses.replace(load_config(CONFIGS / f"{name}.yaml").model, **overrides)


# ---------------------------------------------------------------------------------------------
# Peers (transformers), at our shapes


def hf_blt(m: ModelConfig, sample_bytes: int):
    """transformers' BltForCausalLM with our BLT's shape (widths, depths, heads, k, FFN widths,
    hash n-grams and buckets); patches are given (no patcher inside)."""
    # lazy: transformers is optional (blt-dist[bench]) and takes 2 s to import
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
    # lazy: transformers is optional (blt-dist[bench]) and takes 2 s to import
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.dim, intermediate_size=m.ffn_hidden(m.dim),
                         num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads,
                         num_key_value_heads=m.kv_heads, max_position_embeddings=tokens, rope_theta=m.rope_theta,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def hf_forward(model, batch):
    kwargs = {"patch_lengths": batch["patch_lengths"]} if "patch_lengths" in batch else {}
    return model(input_ids=batch["tokens"], labels=batch["targets"], **kwargs).loss


def transformers_version() -> Optional[str]:
    try:
        # lazy: optional (blt-dist[bench]); absent means the peer rows are skipped
        import transformers
    except ImportError:
        return None
    return transformers.__version__


