"""Model section of the config tree: one dataclass for the four model families.

    entropy  small causal byte LM with a sliding window (drives BLT patching)
    blt      Byte Latent Transformer
    bpe      causal LM over sentencepiece tokens (FLOP-matched baseline)
    byte     causal LM over every byte with full causal attention over the sample
             (FLOP-matched baseline: the naive tokenizer-free model BLT is built to beat)

The top-level shape fields (`dim`, `n_layers`, `n_heads`, ...) describe the *main* transformer:
the whole LM for `entropy`, `bpe` and `byte`, and the latent (global) transformer over patches for
`blt`. That is also the size a config is named after (configs/blt/1b.yaml and
configs/bpe/1b.yaml both have a ~1B-parameter main transformer), except for `byte`:
configs/byte/1b.yaml is named after the BLT it is FLOP-matched to, and running every layer on
every byte, it is far smaller at the same FLOPs per byte. The BLT-only sections
(`encoder`, `decoder`, `hash`, `cross_attn_k`) are ignored by the LM families.

`validate` returns (key path, what was expected) pairs; the config loader turns the first
one into a one-line error. `check_against_data` holds the checks that need the data section.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import sentencepiece as spm

from blt_dist.vocab import VOCAB_SIZE

MODEL_FAMILIES = ("entropy", "blt", "bpe", "byte")
BYTE_VOCAB_FAMILIES = ("entropy", "blt", "byte")  # models over the 260-entry byte vocabulary
# How attention is computed (blt_dist/model/attention.py); every mode gives the same results.
ATTENTION_MODES = ("auto", "dense", "blocked", "flex", "flash")
ENTROPY_DEFAULT_WINDOW = 512
BLT_LAYOUTS = ("project", "meta")
HASH_FUNCTIONS = ("project", "meta")  # the reference entropy model's sliding window (bytes)


@dataclass
class LocalModelConfig:
    """A BLT local (byte-level) transformer: the encoder or the decoder."""

    dim: int = 256
    n_layers: int = 1
    n_heads: int = 4
    window: Optional[int] = 512  # sliding-window self-attention over bytes (never across documents); None: full causal


@dataclass
class HashEmbeddingConfig:
    """Hash n-gram embeddings added to the encoder's byte embeddings (BLT paper section 3.2.1)."""

    ngram_sizes: List[int] = field(default_factory=lambda: [3, 4, 5, 6, 7, 8])
    buckets: int = 500_000  # rows per n-gram size; at 500k these tables dominate the params
    # project: (x+1) * 1000003**k mod 2**31-1; meta: HF/Meta's sum_j x[i-n+1+j] * prime**j in
    # int64 (model/hash_embeddings.py). None: the model's layout decides.
    function: Optional[str] = None
    functions: int = 1  # meta only: hash functions per n (Meta's encoder_hash_byte_group_nb_functions)


@dataclass
class ModelConfig:
    family: str = "blt"  # entropy | blt | bpe | byte
    vocab_size: int = VOCAB_SIZE  # 260 for byte models; the sentencepiece vocabulary for bpe
    # The main transformer (LM, or BLT's latent transformer over patches).
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # grouped-query attention; None = n_heads
    window: Optional[int] = None  # sliding window; None = family default (entropy 512, else full causal)
    ffn_multiplier: float = 1.0  # SwiGLU hidden = round_up(multiplier * 8/3 * dim, ffn_multiple_of)
    ffn_multiple_of: int = 64
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02
    # auto | dense (masked SDPA, the reference) | blocked (exact O(T*W) paths, any device)
    # | flex | flash (CUDA kernels). auto = the fastest exact path for the device.
    attention: str = "auto"
    # BLT only.
    encoder: LocalModelConfig = field(default_factory=LocalModelConfig)
    decoder: LocalModelConfig = field(default_factory=lambda: LocalModelConfig(n_layers=6))
    cross_attn_k: int = 2  # latent queries per patch in the encoder's cross-attention pooling
    hash: HashEmbeddingConfig = field(default_factory=HashEmbeddingConfig)
    bpe_vocab_size: int = 128_000  # vocabulary of the FLOP-matched BPE baseline (flops.py)
    # BLT layout: "project" (this repo's BLT) or "meta" (what transformers' BltForCausalLM and
    # Meta's checkpoints compute). Each switch below left at None takes the layout's choice.
    layout: str = "project"
    double_residual: Optional[bool] = None  # cross-attentions add q twice: q + (q + attn) (meta)
    latent_norm: Optional[bool] = None  # RMSNorm before the latent-to-decoder projection (project)
    encoder_projection: Optional[bool] = None  # None: project always; meta only when k * encoder.dim != dim

    # -- the layout's resolved switches ------------------------------------------------------

    @property
    def hash_function(self) -> str:
        return self.hash.function or ("meta" if self.layout == "meta" else "project")

    @property
    def uses_double_residual(self) -> bool:
        return self.double_residual if self.double_residual is not None else self.layout == "meta"

    @property
    def uses_latent_norm(self) -> bool:
        return self.latent_norm if self.latent_norm is not None else self.layout != "meta"

    @property
    def uses_encoder_projection(self) -> bool:
        if self.encoder_projection is not None:
            return self.encoder_projection
        return self.layout != "meta" or self.cross_attn_k * self.encoder.dim != self.dim

    # -- derived shapes (used by the model and the FLOP counter alike) --------------------

    def ffn_hidden(self, dim: int) -> int:
        """SwiGLU width for a model of width `dim` (Llama's 8/3 rule, rounded up)."""
        hidden = int(self.ffn_multiplier * 8 * dim / 3)
        return self.ffn_multiple_of * math.ceil(hidden / self.ffn_multiple_of)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def attention_window(self) -> Optional[int]:
        """The main transformer's self-attention window (None = unbounded causal)."""
        if self.window is not None:
            return self.window
        return ENTROPY_DEFAULT_WINDOW if self.family == "entropy" else None

    # -- validation --------------------------------------------------------------------------

    def validate(self, prefix: str = "model") -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []

        def bad(key: str, expected: str) -> None:
            problems.append((f"{prefix}.{key}", expected))

        if self.family not in MODEL_FAMILIES:
            bad("family", f"one of {', '.join(MODEL_FAMILIES)}, got {self.family!r}")
            return problems
        if self.attention not in ATTENTION_MODES:
            bad("attention", f"one of {', '.join(ATTENTION_MODES)}, got {self.attention!r}")
        _check_attention(bad, "", self.dim, self.n_layers, self.n_heads, self.window, min_layers=1)
        if self.n_kv_heads is not None and (self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads):
            bad("n_kv_heads", f"a positive divisor of n_heads={self.n_heads}, got {self.n_kv_heads}")
        for key in ("ffn_multiplier", "ffn_multiple_of", "norm_eps", "rope_theta", "init_std"):
            value = getattr(self, key)
            if not (value > 0 and math.isfinite(value)):
                bad(key, f"a positive number, got {value!r}")

        if self.family in BYTE_VOCAB_FAMILIES and self.vocab_size != VOCAB_SIZE:
            bad("vocab_size", f"{VOCAB_SIZE} (256 bytes + 4 specials) for family {self.family}, got {self.vocab_size}")
        if self.family == "bpe" and self.vocab_size < 8:
            bad("vocab_size", f"the tokenizer's vocabulary size (>= 8), got {self.vocab_size}")
        if self.family != "blt":
            return problems

        _check_attention(bad, "encoder.", self.encoder.dim, self.encoder.n_layers, self.encoder.n_heads,
                         self.encoder.window, min_layers=0)
        _check_attention(bad, "decoder.", self.decoder.dim, self.decoder.n_layers, self.decoder.n_heads,
                         self.decoder.window, min_layers=1)
        if self.decoder.dim != self.encoder.dim:
            # The decoder's byte states start from the encoder's: same width.
            bad("decoder.dim", f"equal to encoder.dim={self.encoder.dim}, got {self.decoder.dim}")
        if self.cross_attn_k < 1:
            bad("cross_attn_k", f"a positive number of queries per patch, got {self.cross_attn_k}")
        sizes = list(self.hash.ngram_sizes)
        if not sizes:
            bad("hash.ngram_sizes", "a non-empty list of n-gram sizes (e.g. [3, 4, 5, 6, 7, 8])")
        elif any(n < 2 for n in sizes) or len(set(sizes)) != len(sizes):
            bad("hash.ngram_sizes", f"distinct sizes >= 2 (n=1 is the byte embedding), got {sizes}")
        if self.hash.buckets <= 0:
            bad("hash.buckets", f"a positive bucket count, got {self.hash.buckets}")
        if self.layout not in BLT_LAYOUTS:
            bad("layout", f"one of {', '.join(BLT_LAYOUTS)}, got {self.layout!r}")
        if self.hash.function is not None and self.hash.function not in HASH_FUNCTIONS:
            bad("hash.function", f"one of {', '.join(HASH_FUNCTIONS)}, got {self.hash.function!r}")
        if self.hash.functions < 1 or (self.hash.functions > 1 and self.hash_function != "meta"):
            bad("hash.functions", f"1, or more with the meta hash, got {self.hash.functions}")
        if not self.uses_encoder_projection and self.cross_attn_k * self.encoder.dim != self.dim:
            bad("encoder_projection", f"true: cross_attn_k * encoder.dim = {self.cross_attn_k * self.encoder.dim} "
                                      f"!= dim = {self.dim}, so the patch states need a projection")
        if self.bpe_vocab_size < 8:
            bad("bpe_vocab_size", f"the matched BPE vocabulary size (>= 8), got {self.bpe_vocab_size}")
        return problems


def _check_attention(bad, key: str, dim: int, n_layers: int, n_heads: int, window: Optional[int],
                     min_layers: int) -> None:
    if dim <= 0:
        bad(f"{key}dim", f"a positive width, got {dim}")
    if n_layers < min_layers:
        bad(f"{key}n_layers", f">= {min_layers}, got {n_layers}")
    if n_heads <= 0 or dim % n_heads:
        bad(f"{key}n_heads", f"a positive divisor of {key}dim={dim}, got {n_heads}")
    elif (dim // n_heads) % 2:
        bad(f"{key}n_heads", f"an even head dim for rotary embeddings, got {dim}/{n_heads} = {dim // n_heads}")
    if window is not None and window <= 0:
        bad(f"{key}window", f"a positive number of positions, got {window}")


def check_against_data(model: ModelConfig, data, prefix: str = "") -> list[tuple[str, str]]:
    """Checks that need the data section (called by blt_dist.config.validate).

    - BLT: the fixed patch count must be able to cover the byte capacity at max patch length,
      otherwise the loader could not place every byte in a patch.
    - BPE: the model's vocabulary must equal the tokenizer's, when the tokenizer exists.
    """
    problems: list[tuple[str, str]] = []
    if model.family == "blt":
        reach = data.patches_per_sample * data.patching.max_patch_length
        if reach < data.byte_capacity:
            problems.append((
                f"{prefix}data.byte_capacity",
                f"<= data.patches_per_sample * data.patching.max_patch_length = "
                f"{data.patches_per_sample} * {data.patching.max_patch_length} = {reach}, got {data.byte_capacity}",
            ))
    if model.family == "bpe" and data.tokenizer:
        if Path(data.tokenizer).is_file():
            size = spm.SentencePieceProcessor(model_file=str(data.tokenizer)).get_piece_size()
            if size != model.vocab_size:
                problems.append((
                    f"{prefix}model.vocab_size",
                    f"the tokenizer's vocabulary size {size} ({data.tokenizer}), got {model.vocab_size}",
                ))
    return problems
