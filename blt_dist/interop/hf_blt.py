"""A meta-layout BLT (`model.layout=meta`, no windows) as transformers' BltForCausalLM: the config
and the key mapping. Not an exporter yet (hf_export.py refuses BLTs): HF needs BOS alone in the first
patch and its own BltPatcher, neither of which exists here. With patch_lengths given explicitly
(BOS alone, a trailing zero-length patch), tests/test_hf_interop.py checks the logits.

HF's BLT rotates interleaved pairs, as the project does: no q/k permutation (unlike Llama).
"""
from __future__ import annotations

import torch

from blt_dist.config.model import ModelConfig

_BLOCK = (("attention.wq.weight", "self_attn.q_proj.weight"), ("attention.wk.weight", "self_attn.k_proj.weight"),
          ("attention.wv.weight", "self_attn.v_proj.weight"), ("attention.wo.weight", "self_attn.o_proj.weight"),
          ("feed_forward.w1.weight", "mlp.gate_proj.weight"), ("feed_forward.w3.weight", "mlp.up_proj.weight"),
          ("feed_forward.w2.weight", "mlp.down_proj.weight"), ("attention_norm.weight", "input_layernorm.weight"),
          ("ffn_norm.weight", "post_attention_layernorm.weight"))
_CROSS = (("attention.wq.weight", "q_proj.weight"), ("attention.wk.weight", "k_proj.weight"),
          ("attention.wv.weight", "v_proj.weight"), ("attention.wo.weight", "o_proj.weight"),
          ("query_norm.weight", "q_norm.weight"), ("memory_norm.weight", "k_norm.weight"))


def hf_blt_config_kwargs(m: ModelConfig) -> dict:
    """BltConfig(**kwargs) for this BLT (patch_in_forward off: the caller gives patch_lengths)."""
    k = m.cross_attn_k

    def sub(dim, layers, heads, **extra):
        # Every sub-config carries its own rope_theta and eps in HF; the project has one of each.
        return dict(hidden_size=dim, num_attention_heads=heads, num_hidden_layers=layers, rms_norm_eps=m.norm_eps,
                    rope_theta=m.rope_theta, intermediate_size=m.ffn_hidden(dim), **extra)

    projection = {"encoder_cross_output_size": k * m.encoder.dim} if m.uses_encoder_projection else {}
    return dict(
        vocab_size=260, cross_attn_k=k, patch_in_forward=False, encoder_hash_byte_group_size=list(m.hash.ngram_sizes),
        encoder_hash_byte_group_vocab=m.hash.buckets, encoder_hash_byte_group_nb_functions=m.hash.functions,
        encoder_config=sub(m.encoder.dim, m.encoder.n_layers, m.encoder.n_heads, cross_attn_k=k,
                           hidden_size_global=m.dim, cross_attn_all_layers=False),
        decoder_config=sub(m.decoder.dim, m.decoder.n_layers, m.decoder.n_heads, cross_attn_k=k,
                           hidden_size_global=m.dim, cross_attn_all_layers=True),
        global_config=sub(m.dim, m.n_layers, m.n_heads, num_key_value_heads=m.kv_heads, **projection),
    )


def to_hf_blt_state(state: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    out = {"model.local_encoder.embed_tokens.weight": state["encoder.byte_embedding.weight"],
           # HF fuses the tables into one, function-major with offsets: the project's table order.
           "model.encoder_hash_tok_embedding.weight": torch.cat(
               [state[f"encoder.hash_embeddings.tables.{i}.weight"]
                for i in range(m.hash.functions * len(m.hash.ngram_sizes))]),
           "model.local_encoder.patch_embedding_projection.weight": state["encoder.pool_query.weight"],
           "model.local_decoder.patch_embedding_projection.weight": state["decoder.patch_proj.weight"],
           "model.local_decoder.norm.weight": state["decoder.norm.weight"],
           "lm_head.weight": state["decoder.output.weight"]}
    if "encoder.patch_proj.weight" in state:
        out["model.global_transformer.token_embedding_projection.weight"] = state["encoder.patch_proj.weight"]

    def copy(pairs, ours, theirs):
        for a, b in pairs:
            out[f"{theirs}.{b}"] = state[f"{ours}.{a}"]

    for i in range(m.encoder.n_layers):
        copy(_BLOCK, f"encoder.layers.{i}", f"model.local_encoder.layers.{i}")
    copy(_CROSS, "encoder.pool_attention", "model.local_encoder.cross_attn_layers.0")
    for i in range(m.n_layers):
        copy(_BLOCK, f"latent.{i}", f"model.global_transformer.layers.{i}")
    for i in range(m.decoder.n_layers):
        copy(_BLOCK, f"decoder.layers.{i}", f"model.local_decoder.layers.{i}")
        copy(_CROSS, f"decoder.cross_attentions.{i}", f"model.local_decoder.cross_attn_layers.{i}")
    return out
