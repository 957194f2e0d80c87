"""Parameters and training FLOPs per byte, per component; FLOP-matched BPE and byte-level baselines.

    blt-dist flops configs/blt/1b.yaml [overrides...] [--json] [--entropy-model CONFIG]
    blt-dist flops configs/blt/1b.yaml --tokenizer M.model   # BPE matched at M's measured bytes/token
    blt-dist flops configs/bpe/1b.yaml --blt-template configs/blt/1b.yaml   # the reverse match

Derivation (forward pass, one multiply-add = 2 FLOPs, embedding lookups free, norms/softmax/
rotary/residual adds ignored as in the BLT paper and in torch.utils.flop_counter):

    linear(a, b)        = 2ab per row
    block(d, m)         = QKVO + attention + SwiGLU, per position attending to m keys
                        = [2 linear(d, d) + 2 linear(d, d_kv)] + 4 d m + 3 linear(d, F)
                          (QK^T and AV are 2dm each over all heads; F = SwiGLU width)
    causal context      m(T, w) = mean over positions i < T of min(i + 1, w)
                                = (T + 1) / 2 without a window (the paper's (m+1)/2).

LM over T tokens (entropy model, byte-level baseline, BPE):  T * [L block(d, m(T, w)) + linear(d, V)],
per byte divided by the bytes it covers (T for bytes; T * bytes_per_token for BPE).

BLT over one sample: C byte slots, P patch slots, mean patch size s, k queries per patch.
Real bytes R = min(C, P s); real patches n = R / s. With d = local width, D = latent width:

    encoder                  R L_enc block(d, m(R, w_enc))
    encoder_cross_attention  n [linear(d, kd) + 2k linear(d, d) + linear(kd, D)]  queries, out
                             + R 2 linear(d, d)                                    keys/values of bytes
                             + n k 4 d s                         each query sees its patch's s bytes
    global                   n L_lat block(D, m(n, w_lat))
    decoder_cross_attention  n linear(D, kd) + L_dec [n k 2 linear(d, d) + R 2 linear(d, d) + R 4 d k]
                             (keys/values of patch vectors, queries/out of bytes; a byte sees the
                              k vectors of one patch)
    decoder                  R L_dec block(d, m(R, w_dec))
    head                     R linear(d, 260)

Per byte: divide by R. Training = 3 x forward (backward = 2 x forward). The entropy model runs
offline, once, forward only; it is reported separately when asked for (--entropy-model).

The contexts above are the *real* ones: causal average, window, patch counts, and documents
assumed longer than the context (an upper bound when they are shorter). Dense accounting
(`mode="dense"`) instead counts what the dense masked SDPA computes (every query against every
key: m = T, P, C or P k, with R = C and n = P); that is what torch's FLOP counter sees under
`model.attention=dense`, and the tests check it against torch within 2%, and the real formulas
against hand computation. The fast attention paths (model/attention.py) compute close to the
real contexts: a window's blocks a little more (whole key blocks), the cross-attentions exactly.

FLOP matching: the BPE baseline for a BLT config keeps the same bytes per sample
(tokens = R / bytes_per_token, rounded to a multiple of 8) and searches a small family of
shapes (widths below, head dim 64, or 32 under width 256; any depth) for training FLOPs per byte
within 5% of the BLT's, preferring the width closest to the BLT's latent width. bytes_per_token
is an assumption (4.4, Llama 3) unless measured: `--tokenizer M.model` reads the value
`blt-dist tokenizer` measured (M.json). The byte-level baseline (`match_byte`) is one LM over the
same bytes per sample, full causal attention, preferring the BLT's local width. The reverse
(`match_blt`) searches the BLT latent shape for a BPE config, keeping the local models.

Per batch (`batch_train_flops`, the trainer's accounting): the same formulas at the bytes,
patches or tokens each sample really holds (useful FLOPs), and at every slot of the static
shapes (executed FLOPs: padding costs the same matmuls). The gap is the padding a BLT pays for
holding whole patches only; fixed-length LM samples are always full.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import torch

from blt_dist.config import load_config
from blt_dist.config.model import ModelConfig
from blt_dist.errors import UserError
from blt_dist.model import build_model
from blt_dist.vocab import VOCAB_SIZE

BLT_COMPONENTS = ("encoder", "encoder_cross_attention", "global", "decoder_cross_attention", "decoder", "head")
LM_COMPONENTS = ("transformer", "head")
SHAPE_WIDTHS = (32, 48, 64, 96, 128, 192, 256, 384, 512, 640, 768, 896, 1024, 1280, 1536, 1792, 2048, 2304,
                2560, 3072, 3584, 4096, 5120)
MATCH_TOLERANCE = 0.05
TRAIN_MULTIPLIER = 3  # forward + backward (2x forward)


# ---------------------------------------------------------------------------------------------
# Formulas


def linear(n_in: float, n_out: float) -> float:
    return 2.0 * n_in * n_out


def block_flops(dim: int, n_heads: int, n_kv_heads: int, ffn_hidden: int, context: float) -> float:
    """Forward FLOPs of one transformer block for one position attending to `context` keys."""
    kv_dim = dim // n_heads * n_kv_heads
    qkvo = 2 * linear(dim, dim) + 2 * linear(dim, kv_dim)
    return qkvo + 4.0 * dim * context + 3 * linear(dim, ffn_hidden)


def causal_context(length: float, window: Optional[int] = None) -> float:
    """Mean number of keys a causal query sees over `length` positions with a sliding window."""
    if length <= 0:
        return 0.0
    w = length if window is None else min(window, length)
    return (w * (w + 1) / 2 + (length - w) * w) / length


@dataclass
class SampleShape:
    """The data fields the counter needs (from cfg.data)."""

    seq_len: int = 1024  # entropy model: bytes per sample
    tokens_per_sample: int = 256  # BPE
    byte_capacity: int = 1024  # BLT
    patches_per_sample: int = 256  # BLT
    patch_size: float = 4.5  # assumed mean patch size (data.patching.target_mean_size)
    bytes_per_token: float = 4.4  # BPE

    @classmethod
    def from_data(cls, data) -> "SampleShape":
        return cls(data.seq_len, data.tokens_per_sample, data.byte_capacity, data.patches_per_sample,
                   data.patching.target_mean_size, data.bytes_per_token)


def lm_forward_flops(m: ModelConfig, tokens: int, mode: str = "real") -> dict[str, float]:
    """Forward FLOPs of one LM sample of `tokens` positions, by component."""
    context = causal_context(tokens, m.attention_window) if mode == "real" else float(tokens)
    per_token = m.n_layers * block_flops(m.dim, m.n_heads, m.kv_heads, m.ffn_hidden(m.dim), context)
    return {"transformer": tokens * per_token, "head": tokens * linear(m.dim, m.vocab_size)}


def blt_forward_flops(m: ModelConfig, shape: SampleShape, mode: str = "real") -> tuple[dict[str, float], float]:
    """Forward FLOPs of one BLT sample by component, and the real bytes it covers (R)."""
    if mode == "real":
        real_bytes = min(float(shape.byte_capacity), shape.patches_per_sample * shape.patch_size)
        return blt_flops_at(m, real_bytes, real_bytes / shape.patch_size), real_bytes
    if mode == "dense":
        R, n = float(shape.byte_capacity), float(shape.patches_per_sample)
        return _blt_components(m, R, n, enc_ctx=R, dec_ctx=R, lat_ctx=n, pool_keys=R, dec_keys=n * m.cross_attn_k), R
    raise ValueError(f"mode must be 'real' or 'dense', got {mode!r}")


def blt_flops_at(m: ModelConfig, real_bytes: float, real_patches: float) -> dict[str, float]:
    """Real-context forward FLOPs of one BLT sample holding `real_bytes` byte positions cut into
    `real_patches` patches (the per-sample counter at R and n; a batch's own counts per sample)."""
    R, n = float(real_bytes), float(real_patches)
    if R <= 0 or n <= 0:
        return dict.fromkeys(BLT_COMPONENTS, 0.0)
    return _blt_components(
        m, R, n, enc_ctx=causal_context(R, m.encoder.window), dec_ctx=causal_context(R, m.decoder.window),
        lat_ctx=causal_context(n, m.attention_window), pool_keys=R / n, dec_keys=float(m.cross_attn_k),
    )


def _blt_components(m: ModelConfig, R: float, n: float, enc_ctx: float, dec_ctx: float, lat_ctx: float,
                    pool_keys: float, dec_keys: float) -> dict[str, float]:
    """The formulas of the module docstring for R bytes, n patches and the given contexts."""
    d, D, k = m.encoder.dim, m.dim, m.cross_attn_k
    enc, dec = m.encoder, m.decoder
    return {
        "encoder": R * enc.n_layers * block_flops(d, enc.n_heads, enc.n_heads, m.ffn_hidden(d), enc_ctx),
        "encoder_cross_attention": n * (linear(d, k * d) + 2 * k * linear(d, d)
                                        + (linear(k * d, D) if m.uses_encoder_projection else 0.0))
        + R * 2 * linear(d, d) + n * k * 4.0 * d * pool_keys,
        "global": n * m.n_layers * block_flops(D, m.n_heads, m.kv_heads, m.ffn_hidden(D), lat_ctx),
        "decoder_cross_attention": n * linear(D, k * d)
        + dec.n_layers * (n * k * 2 * linear(d, d) + R * 2 * linear(d, d) + R * 4.0 * d * dec_keys),
        "decoder": R * dec.n_layers * block_flops(d, dec.n_heads, dec.n_heads, m.ffn_hidden(d), dec_ctx),
        "head": R * linear(d, VOCAB_SIZE),
    }


def positions_per_sample(m: ModelConfig, shape: SampleShape) -> int:
    """Positions of an LM's static sample: tokens for BPE, bytes for the byte LMs."""
    return shape.tokens_per_sample if m.family == "bpe" else shape.seq_len


def bytes_per_sample(m: ModelConfig, shape: SampleShape) -> float:
    """Raw bytes one sample covers at the shape's assumed compression (patch size, bytes/token)."""
    if m.family == "blt":
        return min(float(shape.byte_capacity), shape.patches_per_sample * shape.patch_size)
    if m.family == "bpe":
        return shape.tokens_per_sample * shape.bytes_per_token
    return float(shape.seq_len)


def forward_flops_per_byte(m: ModelConfig, shape: SampleShape) -> dict[str, float]:
    """Real-context forward FLOPs per byte, by component."""
    if m.family == "blt":
        flops, real_bytes = blt_forward_flops(m, shape)
    else:
        flops = lm_forward_flops(m, positions_per_sample(m, shape))
        real_bytes = bytes_per_sample(m, shape)
    return {name: value / real_bytes for name, value in flops.items()}


def train_flops_per_byte(m: ModelConfig, shape: SampleShape) -> float:
    return TRAIN_MULTIPLIER * sum(forward_flops_per_byte(m, shape).values())


def dense_forward_flops(m: ModelConfig, shape: SampleShape) -> float:
    """What torch's FLOP counter should see for one sample's forward (math SDPA backend)."""
    if m.family == "blt":
        return sum(blt_forward_flops(m, shape, mode="dense")[0].values())
    return sum(lm_forward_flops(m, positions_per_sample(m, shape), mode="dense").values())


# ---------------------------------------------------------------------------------------------
# Per-batch accounting (the trainer): what a batch really holds, not the assumed shape


class BatchFlops(NamedTuple):
    useful: float  # training FLOPs of the positions and patches that hold data
    executed: float  # training FLOPs of every slot of the static shapes, padding included


def batch_train_flops(m: ModelConfig, shape: SampleShape, positions: Sequence[float],
                      patches: Optional[Sequence[float]] = None) -> BatchFlops:
    """Training FLOPs of one batch from its real counts per sample: `positions[i]` filled
    positions of sample i (bytes for BLT and the byte LMs, BOS/EOS included; tokens for BPE) and,
    for BLT, `patches[i]` its patches. Useful FLOPs apply the per-sample formulas at those counts
    (a sample filled as the shape assumes gives exactly the per-sample number); executed FLOPs
    apply them to every byte and patch slot, since padding runs through the same matmuls and
    attention. BLT samples hold whole patches only, so they are rarely full."""
    if m.family == "blt":
        if patches is None or len(patches) != len(positions):
            raise ValueError("a BLT batch needs one patch count per sample")
        useful = sum(sum(blt_flops_at(m, r, n).values()) for r, n in zip(positions, patches))
        full = sum(blt_flops_at(m, shape.byte_capacity, shape.patches_per_sample).values())
    else:
        useful = sum(sum(lm_forward_flops(m, t).values()) for t in positions)
        full = sum(lm_forward_flops(m, positions_per_sample(m, shape)).values())
    return BatchFlops(TRAIN_MULTIPLIER * useful, TRAIN_MULTIPLIER * full * len(positions))


# ---------------------------------------------------------------------------------------------
# Parameters (counted on the meta device, so they always agree with the model code)


def component_of(name: str, family: str) -> str:
    if family != "blt":
        if name.startswith("tok_embeddings."):
            return "embedding"
        return "transformer" if name.startswith("blocks.") else "head"
    prefixes = (
        ("encoder.byte_embedding.", "byte_embedding"),
        ("encoder.hash_embeddings.", "hash_embeddings"),
        ("encoder.layers.", "encoder"),
        ("encoder.", "encoder_cross_attention"),  # pool_query, pool_attention, patch_proj
        ("latent.", "global"),
        ("decoder.layers.", "decoder"),
        ("decoder.norm.", "head"),
        ("decoder.output.", "head"),
        ("decoder.", "decoder_cross_attention"),  # latent_norm, patch_proj, cross_attentions
    )
    return next(component for prefix, component in prefixes if name.startswith(prefix))


def params_by_component(m: ModelConfig) -> dict[str, int]:
    with torch.device("meta"):
        model = build_model(m)
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():
        component = component_of(name, m.family)
        counts[component] = counts.get(component, 0) + param.numel()
    return counts


def named_params(m: ModelConfig, by_component: dict[str, int]) -> int:
    """What a config's size name refers to: the main transformer's blocks (BLT: the latent
    model; BPE and entropy: non-embedding parameters, as in Kaplan et al.)."""
    return by_component["global" if m.family == "blt" else "transformer"]


# ---------------------------------------------------------------------------------------------
# FLOP matching


def shape_heads(width: int) -> int:
    return width // (64 if width >= 256 else 32)


def _search(target: float, flops_for, preferred_width: int, tolerance: float = MATCH_TOLERANCE):
    """(width, depth) from the shape family whose FLOPs are within `tolerance` of target,
    preferring the width closest to `preferred_width`; the closest overall if none fits."""
    best, best_any = None, None
    for width in SHAPE_WIDTHS:
        for depth in range(1, 129):
            error = flops_for(width, depth) / target - 1
            key_any = (abs(error), width, depth)
            best_any = min(best_any, key_any) if best_any else key_any
            if abs(error) <= tolerance:
                key = (abs(math.log(width / preferred_width)), abs(error), width, depth)
                best = min(best, key) if best else key
    if best is not None:
        return best[2], best[3]
    return best_any[1], best_any[2]


def bpe_shape(template: ModelConfig, width: int, depth: int, vocab_size: int) -> ModelConfig:
    return dataclasses.replace(template, family="bpe", dim=width, n_layers=depth, n_heads=shape_heads(width),
                               n_kv_heads=None, window=None, vocab_size=vocab_size)


def match_bpe(blt: ModelConfig, shape: SampleShape) -> dict:
    """The BPE baseline whose training FLOPs per byte match the BLT's (same bytes per sample),
    at the shape's bytes_per_token (pass the tokenizer's measured value: at an assumed one the
    baseline's real cost per byte is off by their ratio)."""
    target = train_flops_per_byte(blt, shape)
    tokens = max(8, int(round(bytes_per_sample(blt, shape) / shape.bytes_per_token / 8)) * 8)
    bpe_sample = dataclasses.replace(shape, tokens_per_sample=tokens)

    def flops_for(width, depth):
        return train_flops_per_byte(bpe_shape(blt, width, depth, blt.bpe_vocab_size), bpe_sample)

    width, depth = _search(target, flops_for, blt.dim)
    model = bpe_shape(blt, width, depth, blt.bpe_vocab_size)
    by_component = params_by_component(model)
    flops = train_flops_per_byte(model, bpe_sample)
    return {
        "dim": width, "n_layers": depth, "n_heads": model.n_heads, "vocab_size": model.vocab_size,
        "tokens_per_sample": tokens, "bytes_per_token": shape.bytes_per_token,
        "params_total": sum(by_component.values()), "params_named": named_params(model, by_component),
        "train_flops_per_byte": flops, "flop_ratio_to_blt": flops / target,
    }


def byte_shape(template: ModelConfig, width: int, depth: int) -> ModelConfig:
    return dataclasses.replace(template, family="byte", vocab_size=VOCAB_SIZE, dim=width, n_layers=depth,
                               n_heads=shape_heads(width), n_kv_heads=None, window=None)


def match_byte(blt: ModelConfig, shape: SampleShape) -> dict:
    """The byte-level LM whose training FLOPs per byte match the BLT's: one transformer over
    the same bytes per sample (seq_len = R, a multiple of 8), full causal attention. It prefers
    the BLT's local width: running every layer on every byte, it is the size of a byte-level
    model, and at the latent width it would be a few layers deep."""
    target = train_flops_per_byte(blt, shape)
    seq_len = max(8, int(round(bytes_per_sample(blt, shape) / 8)) * 8)
    byte_sample = dataclasses.replace(shape, seq_len=seq_len)

    def flops_for(width, depth):
        return train_flops_per_byte(byte_shape(blt, width, depth), byte_sample)

    width, depth = _search(target, flops_for, blt.encoder.dim)
    model = byte_shape(blt, width, depth)
    by_component = params_by_component(model)
    flops = train_flops_per_byte(model, byte_sample)
    return {
        "dim": width, "n_layers": depth, "n_heads": model.n_heads, "seq_len": seq_len,
        "params_total": sum(by_component.values()), "params_named": named_params(model, by_component),
        "train_flops_per_byte": flops, "flop_ratio_to_blt": flops / target,
    }


def match_blt(bpe: ModelConfig, bpe_sample: SampleShape, blt_template: ModelConfig, blt_sample: SampleShape) -> dict:
    """The reverse: the BLT latent shape (local models kept from `blt_template`) whose training
    FLOPs per byte match the BPE config's."""
    target = train_flops_per_byte(bpe, bpe_sample)

    def latent(width, depth):
        return dataclasses.replace(blt_template, dim=width, n_layers=depth, n_heads=shape_heads(width),
                                   n_kv_heads=None)

    width, depth = _search(target, lambda w, d: train_flops_per_byte(latent(w, d), blt_sample), bpe.dim)
    model = latent(width, depth)
    flops = train_flops_per_byte(model, blt_sample)
    return {"dim": width, "n_layers": depth, "n_heads": model.n_heads,
            "params_named": named_params(model, params_by_component(model)),
            "train_flops_per_byte": flops, "flop_ratio_to_bpe": flops / target}


INFERENCE_MATCH_TOLERANCE = 0.02  # the fixed-inference-cost axis: within 2% of the BPE twin


def inference_flops_per_byte(m: ModelConfig, shape: SampleShape) -> float:
    """Forward FLOPs per byte: what serving a byte costs (the BLT at the shape's patch size)."""
    return sum(forward_flops_per_byte(m, shape).values())


def match_blt_inference(bpe: ModelConfig, bpe_sample: SampleShape, blt_template: ModelConfig,
                        blt_sample: SampleShape) -> dict:
    """The BLT latent (local models kept from `blt_template`) whose inference FLOPs per byte at
    blt_sample's patch size equal the BPE's: the BLT paper's fixed-inference-cost rule, where
    longer patches buy a bigger latent model at the same cost per byte."""
    target = inference_flops_per_byte(bpe, bpe_sample)

    def latent(width, depth):
        return dataclasses.replace(blt_template, dim=width, n_layers=depth, n_heads=shape_heads(width),
                                   n_kv_heads=None)

    width, depth = _search(target, lambda w, d: inference_flops_per_byte(latent(w, d), blt_sample), bpe.dim,
                           tolerance=INFERENCE_MATCH_TOLERANCE)
    model = latent(width, depth)
    flops = inference_flops_per_byte(model, blt_sample)
    return {"dim": width, "n_layers": depth, "n_heads": model.n_heads, "patch_size": blt_sample.patch_size,
            "patches_per_sample": blt_sample.patches_per_sample,
            "params_named": named_params(model, params_by_component(model)),
            "inference_flops_per_byte": flops, "bpe_inference_flops_per_byte": target,
            "ratio_to_bpe": flops / target}


def patches_for(patch_size: float, byte_capacity: int, template: SampleShape) -> int:
    """Patch slots per sample at another mean patch size, with the template's slack over
    byte_capacity / patch_size (packing cuts whole patches: short ones need spare slots), in
    multiples of 8."""
    slack = template.patches_per_sample * template.patch_size / template.byte_capacity
    return max(8, math.ceil(byte_capacity / patch_size * slack / 8) * 8)


# ---------------------------------------------------------------------------------------------
# Report and CLI


def measured_compression(tokenizer: str) -> dict:
    """What `blt-dist tokenizer` measured for M.model, from the M.json it writes beside it."""
    path = Path(tokenizer)
    info_path = path.with_suffix(".json")
    if not info_path.is_file():
        raise UserError(f"--tokenizer: {info_path} not found (`blt-dist tokenizer --out {path}` writes it with the "
                        "measured bytes per token); or give the value as data.bytes_per_token=X")
    info = json.loads(info_path.read_text())
    if not info.get("bytes_per_token", 0) > 0 or not info.get("vocab_size", 0) >= 8:
        raise UserError(f"--tokenizer: {info_path} has no measured bytes_per_token and vocab_size")
    return {"bytes_per_token": float(info["bytes_per_token"]), "vocab_size": int(info["vocab_size"]),
            "source": f"{info_path} ({info.get('measured_on', 'measured')})"}


def inference_matches(blt_cfg, shape: SampleShape, patch_sizes: Sequence[float], bpe_cfg=None) -> dict:
    """The fixed-inference-cost match for each patch size (what the sweep's patch_sizes axis
    trains): the BLT's latent resized so that its inference FLOPs per byte equal the BPE twin's.
    The twin is bpe_cfg where given, else the BPE that matches this BLT's training FLOPs/byte
    (`matched_bpe`, at the shape's bytes per token)."""
    m, max_len = blt_cfg.model, blt_cfg.data.patching.max_patch_length
    for target in patch_sizes:
        if not 1 <= target <= max_len:
            raise UserError(f"--patch-size: {target:g} bytes/patch is outside 1..{max_len} "
                            f"(data.patching.max_patch_length={max_len})")
    if bpe_cfg is not None:
        if bpe_cfg.model.family != "bpe":
            raise UserError(f"--bpe: expected a BPE config, got family {bpe_cfg.model.family!r}")
        twin, twin_sample = bpe_cfg.model, SampleShape.from_data(bpe_cfg.data)
        source = "--bpe config"
    else:
        b = match_bpe(m, shape)
        twin = bpe_shape(m, b["dim"], b["n_layers"], b["vocab_size"])
        twin_sample = dataclasses.replace(shape, tokens_per_sample=b["tokens_per_sample"])
        source = "matched_bpe (same training FLOPs/byte)"
    runs = []
    for target in patch_sizes:
        sample = dataclasses.replace(shape, patch_size=target,
                                     patches_per_sample=patches_for(target, shape.byte_capacity, shape))
        match = match_blt_inference(twin, twin_sample, m, sample)
        runs.append({**match, "within_tolerance": abs(match["ratio_to_bpe"] - 1) <= INFERENCE_MATCH_TOLERANCE})
    return {"bpe_twin": {"dim": twin.dim, "n_layers": twin.n_layers, "vocab_size": twin.vocab_size,
                         "tokens_per_sample": twin_sample.tokens_per_sample,
                         "bytes_per_token": twin_sample.bytes_per_token, "source": source,
                         "inference_flops_per_byte": inference_flops_per_byte(twin, twin_sample)},
            "tolerance": INFERENCE_MATCH_TOLERANCE, "by_patch_size": runs}


def report(cfg, entropy_cfg=None, blt_template=None, tokenizer: Optional[str] = None,
           patch_sizes: Sequence[float] = (), bpe_cfg=None) -> dict:
    """Everything `blt-dist flops --json` prints, for a loaded Config. With `tokenizer` (a BLT or
    BPE config), BPE costs per byte are taken at its measured bytes per token, not the config's."""
    m, shape = cfg.model, SampleShape.from_data(cfg.data)
    compression = {"bytes_per_token": shape.bytes_per_token, "source": "data.bytes_per_token (as configured)"}
    if tokenizer:
        if m.family not in ("blt", "bpe"):
            raise UserError(f"--tokenizer: for a BLT or BPE config, got family {m.family!r}")
        compression = measured_compression(tokenizer)
        shape = dataclasses.replace(shape, bytes_per_token=compression["bytes_per_token"])
        if m.family == "blt":  # the matched baseline uses this tokenizer's vocabulary
            m = dataclasses.replace(m, bpe_vocab_size=compression["vocab_size"])
    by_component = params_by_component(m)
    per_byte = forward_flops_per_byte(m, shape)
    out = {
        "family": m.family,
        "params_total": sum(by_component.values()),
        "params_named": named_params(m, by_component),
        "params_by_component": by_component,
        "flops_per_byte_by_component": per_byte,
        "forward_flops_per_byte": sum(per_byte.values()),
        "train_flops_per_byte": TRAIN_MULTIPLIER * sum(per_byte.values()),
    }
    if m.family == "bpe":
        out["bytes_per_token"] = compression
    if m.family == "blt":
        out["matched_bpe"] = {**match_bpe(m, shape), "bytes_per_token_source": compression["source"]}
        out["matched_byte"] = match_byte(m, shape)
    if patch_sizes or bpe_cfg is not None:
        if m.family != "blt":
            raise UserError(f"--patch-size/--bpe: the fixed-inference match resizes a BLT's latent; got family "
                            f"{m.family!r}")
        out["inference_flops_per_byte"] = inference_flops_per_byte(m, shape)
        out["inference_match"] = inference_matches(dataclasses.replace(cfg, model=m), shape,
                                                   patch_sizes or [shape.patch_size], bpe_cfg)
    if m.family == "bpe" and blt_template is not None:
        out["matched_blt"] = match_blt(m, shape, blt_template.model, SampleShape.from_data(blt_template.data))
    if entropy_cfg is not None:
        if entropy_cfg.model.family != "entropy":
            raise UserError(f"--entropy-model: expected an entropy model config, got family {entropy_cfg.model.family!r}")
        entropy_per_byte = sum(forward_flops_per_byte(entropy_cfg.model, SampleShape.from_data(entropy_cfg.data)).values())
        # Entropies are computed once, offline, forward only: reported beside, never added in.
        out["entropy_model"] = {"params_total": sum(params_by_component(entropy_cfg.model).values()),
                                "forward_flops_per_byte": entropy_per_byte}
    return out


def human_count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def format_report(r: dict) -> str:
    lines = [f"family: {r['family']}   params: {human_count(r['params_total'])} total, "
             f"{human_count(r['params_named'])} named (main transformer)",
             f"{'component':<26}{'params':>10}{'fwd FLOPs/byte':>16}"]
    names = list(dict.fromkeys([*r["params_by_component"], *r["flops_per_byte_by_component"]]))
    for name in names:
        params = r["params_by_component"].get(name)
        flops = r["flops_per_byte_by_component"].get(name)
        lines.append(f"{name:<26}{human_count(params) if params is not None else '-':>10}"
                     f"{human_count(flops) if flops is not None else '-':>16}")
    lines.append(f"training FLOPs/byte (3 x forward): {human_count(r['train_flops_per_byte'])}")
    if "matched_bpe" in r:
        b = r["matched_bpe"]
        lines.append(f"matched BPE: dim={b['dim']} n_layers={b['n_layers']} n_heads={b['n_heads']} "
                     f"vocab={b['vocab_size']} tokens_per_sample={b['tokens_per_sample']} "
                     f"params={human_count(b['params_total'])} train FLOPs/byte={human_count(b['train_flops_per_byte'])} "
                     f"(x{b['flop_ratio_to_blt']:.3f})")
    if "matched_bpe" in r:
        lines.append(f"  at {r['matched_bpe']['bytes_per_token']:.3f} bytes/token from "
                     f"{r['matched_bpe']['bytes_per_token_source']}")
    if "matched_byte" in r:
        b = r["matched_byte"]
        lines.append(f"matched byte-level: dim={b['dim']} n_layers={b['n_layers']} n_heads={b['n_heads']} "
                     f"seq_len={b['seq_len']} params={human_count(b['params_total'])} "
                     f"train FLOPs/byte={human_count(b['train_flops_per_byte'])} (x{b['flop_ratio_to_blt']:.3f})")
    if "bytes_per_token" in r:
        compression = r["bytes_per_token"]
        lines.append(f"at {compression['bytes_per_token']:.3f} bytes/token from {compression['source']}")
    if "matched_blt" in r:
        b = r["matched_blt"]
        lines.append(f"matched BLT latent: dim={b['dim']} n_layers={b['n_layers']} n_heads={b['n_heads']} "
                     f"train FLOPs/byte={human_count(b['train_flops_per_byte'])} (x{b['flop_ratio_to_bpe']:.3f})")
    if "inference_match" in r:
        im, t = r["inference_match"], r["inference_match"]["bpe_twin"]
        lines.append(f"fixed inference cost (within {im['tolerance']:.0%}): BPE twin dim={t['dim']} "
                     f"n_layers={t['n_layers']} vocab={t['vocab_size']} at {t['bytes_per_token']:.3f} bytes/token "
                     f"({t['source']}): inference FLOPs/byte={human_count(t['inference_flops_per_byte'])}")
        lines.append(f"  this BLT as configured: inference FLOPs/byte={human_count(r['inference_flops_per_byte'])}")
        lines.append(f"  {'patch size':>10}{'patch slots':>12}{'latent dim':>11}{'layers':>7}{'heads':>6}"
                     f"{'latent params':>14}{'inf FLOPs/byte':>15}{'BPE twin':>10}{'ratio':>8}")
        for b in im["by_patch_size"]:
            flag = "" if b["within_tolerance"] else "  (outside tolerance: the sweep refuses it)"
            lines.append(f"  {b['patch_size']:>10g}{b['patches_per_sample']:>12}{b['dim']:>11}{b['n_layers']:>7}"
                         f"{b['n_heads']:>6}{human_count(b['params_named']):>14}"
                         f"{human_count(b['inference_flops_per_byte']):>15}"
                         f"{human_count(b['bpe_inference_flops_per_byte']):>10}{b['ratio_to_bpe']:>8.3f}{flag}")
    if "entropy_model" in r:
        e = r["entropy_model"]
        lines.append(f"entropy model (offline, not included): params={human_count(e['params_total'])} "
                     f"forward FLOPs/byte={human_count(e['forward_flops_per_byte'])}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="model config YAML (configs/{entropy,blt,bpe,byte}/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.patching.target_mean_size=6")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--entropy-model", metavar="CONFIG",
                        help="also report this entropy model's forward FLOPs/byte (offline cost, off by default)")
    parser.add_argument("--blt-template", metavar="CONFIG",
                        help="for a BPE config: BLT config whose local models to keep when matching a BLT latent shape")
    parser.add_argument("--tokenizer", metavar="M.model",
                        help="BPE costs at this tokenizer's measured bytes per token (and, matching from a BLT, "
                             "its vocabulary), read from the M.json `blt-dist tokenizer` wrote beside it")
    parser.add_argument("--patch-size", metavar="BYTES", type=float, action="append", default=[],
                        help="for a BLT config: the fixed-inference match at this mean patch size (repeatable): the "
                             "latent resized so its inference FLOPs/byte equal the BPE twin's, as a sweep's "
                             "patch_sizes trains it")
    parser.add_argument("--bpe", metavar="CONFIG",
                        help="the BPE twin of --patch-size (default: the BPE matching this BLT's training FLOPs/byte)")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    entropy_cfg = load_config(args.entropy_model) if args.entropy_model else None
    blt_template = load_config(args.blt_template) if args.blt_template else None
    if blt_template is not None and blt_template.model.family != "blt":
        raise UserError(f"--blt-template: expected a BLT config, got family {blt_template.model.family!r}")
    bpe_cfg = load_config(args.bpe) if args.bpe else None
    r = report(cfg, entropy_cfg, blt_template, args.tokenizer, args.patch_size, bpe_cfg)
    print(json.dumps(r, indent=2) if args.json else format_report(r))
    return 0
