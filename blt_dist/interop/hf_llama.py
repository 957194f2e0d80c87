"""The LM families (bpe, byte) as transformers' LlamaForCausalLM, both ways.

The blocks are the same Llama block; two conventions differ and are converted exactly:
- rotary pairs: the project rotates interleaved pairs (x[2i], x[2i+1]), Llama rotates halves
  (x[i], x[i + head_dim/2]); q and k rows are permuted per head (k with n_kv_heads), as
  transformers' own Llama converter does. Attention scores are unchanged by a permutation
  applied to both q and k, so v and o are copied as they are.
- RMSNorm eps: ours is in the config (1e-5 by default), Llama's default is 1e-6; it is set.
"""
from __future__ import annotations

import torch

from blt_dist.config.model import ModelConfig
from blt_dist.vocab import VOCAB_SIZE

HF_ARCHITECTURE = "LlamaForCausalLM"

# project name pattern -> HF name pattern (per block: {i})
_BLOCK_KEYS = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_KEYS = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}


def differences(m: ModelConfig) -> list[str]:
    """What LlamaForCausalLM cannot express about this model (empty: it maps exactly)."""
    found = []
    if m.family not in ("bpe", "byte"):
        found.append(f"family {m.family!r}: only bpe and byte runs map onto {HF_ARCHITECTURE}")
    if m.attention_window is not None:
        found.append(f"sliding window {m.attention_window}: LlamaForCausalLM attends to every earlier position")
    return found


def interleaved_to_half(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows [heads * head_dim, dim]: per head, pair rows (2i, 2i+1) -> rows (i, i + head_dim/2)."""
    rows, dim = weight.shape
    return weight.view(heads, rows // heads // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


def half_to_interleaved(weight: torch.Tensor, heads: int) -> torch.Tensor:
    rows, dim = weight.shape
    return weight.view(heads, 2, rows // heads // 2, dim).transpose(1, 2).reshape(rows, dim)


def hf_config_dict(m: ModelConfig) -> dict:
    return dict(
        architectures=[HF_ARCHITECTURE], model_type="llama", vocab_size=m.vocab_size, hidden_size=m.dim,
        intermediate_size=m.ffn_hidden(m.dim), num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads,
        num_key_value_heads=m.kv_heads, head_dim=m.dim // m.n_heads, rms_norm_eps=m.norm_eps,
        rope_theta=m.rope_theta, hidden_act="silu", attention_bias=False, mlp_bias=False,
        tie_word_embeddings=False, max_position_embeddings=8192, rope_scaling=None,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, torch_dtype="float32",
    )


def to_hf_state(state: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    out = {hf: state[ours] for ours, hf in _TOP_KEYS.items()}
    for i in range(m.n_layers):
        for ours, hf in _BLOCK_KEYS.items():
            tensor = state[f"blocks.{i}.{ours}"]
            if ours == "attention.wq.weight":
                tensor = interleaved_to_half(tensor, m.n_heads)
            elif ours == "attention.wk.weight":
                tensor = interleaved_to_half(tensor, m.kv_heads)
            out[f"model.layers.{i}.{hf}"] = tensor.contiguous()
    return out


def from_hf_state(hf_state: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """HF tensors -> project tensors; a missing tensor raises KeyError with its HF name."""
    out = {ours: hf_state[hf] for ours, hf in _TOP_KEYS.items()}
    for i in range(m.n_layers):
        for ours, hf in _BLOCK_KEYS.items():
            tensor = hf_state[f"model.layers.{i}.{hf}"]
            if ours == "attention.wq.weight":
                tensor = half_to_interleaved(tensor, m.n_heads)
            elif ours == "attention.wk.weight":
                tensor = half_to_interleaved(tensor, m.kv_heads)
            out[f"blocks.{i}.{ours}"] = tensor.contiguous()
    return out


def model_config_from_hf(config: dict) -> tuple[ModelConfig, list[str]]:
    """(ModelConfig, what the project cannot express) from a LlamaForCausalLM config.json."""
    problems = []
    dim, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or dim // heads
    if head_dim * heads != dim:
        problems.append(f"head_dim {head_dim} * {heads} heads != hidden_size {dim}")
    for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False),
                      ("tie_word_embeddings", False), ("rope_scaling", None)):
        if config.get(key, want) != want:
            problems.append(f"{key}={config.get(key)!r} (the project has {want!r})")
    hidden = config["intermediate_size"]
    # ffn_hidden = multiple_of * ceil(int(multiplier * 8/3 * dim) / multiple_of): with multiple_of
    # = the HF width, any multiplier that gives a hidden size in (0, width] yields the width itself.
    m = ModelConfig(family="byte" if config["vocab_size"] == VOCAB_SIZE else "bpe", vocab_size=config["vocab_size"],
                    dim=dim, n_layers=config["num_hidden_layers"], n_heads=heads,
                    n_kv_heads=config.get("num_key_value_heads") or heads, ffn_multiplier=hidden * 3 / (8 * dim),
                    ffn_multiple_of=hidden, norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                    rope_theta=float(config.get("rope_theta", 10000.0)))
    if m.ffn_hidden(dim) != hidden:
        problems.append(f"intermediate_size {hidden} is not expressible (got {m.ffn_hidden(dim)})")
    return m, problems
