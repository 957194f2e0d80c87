"""A meta-layout BLT (`model.layout=meta`, no windows) and its entropy model as transformers'
BltForCausalLM (the entropy model becomes its BltPatcher), both ways: the config and the keys.

HF's BLT rotates interleaved pairs, as the project does: no q/k permutation (unlike Llama).

What HF's patcher does, read in transformers 4.57 (modeling_blt.py) and checked by tests:
- starts: 0, 1 (BOS alone), and p+1 for every p >= 1 whose fp32 entropy exceeds
  `patching_threshold`: the project's "H_i > threshold" rule with data.patching.bos_alone=true.
- the project compares entropies rounded to float16 (as entropy shards store them); the
  exported threshold is the float32 that cuts fp32 entropies exactly where their float16
  roundings cross the run's threshold (`hf_threshold`).
- a start at T (the last byte closes its patch) gives a trailing zero-length patch, so the last
  byte reads its own patch, as in the project; but `max_patch_length` (process_patch_lengths)
  drops zero-length patches, so with a max length the LAST input position reads the previous
  patch whenever its byte closes a patch. Every earlier position is unaffected.
- the patcher attends over the whole input: equal to the entropy model (a sliding window) only
  for inputs of at most `window` positions.
"""
from __future__ import annotations

import numpy as np
import torch

from blt_dist.config.model import HashEmbeddingConfig, LocalModelConfig, ModelConfig

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


HF_BLT_ARCHITECTURE = "BltForCausalLM"


def hf_threshold(threshold: float) -> float:
    """The float32 t with (fp32 H > t) == (float16(H) > threshold) for every fp32 H >= 0: HF's
    patcher compares fp32 entropies, the project their float16 roundings (round to nearest even)."""
    low = np.float16(threshold)
    if float(low) > threshold:
        low = np.nextafter(low, np.float16(-np.inf))
    high = np.nextafter(low, np.float16(np.inf))  # float16(H) > threshold iff float16(H) >= high
    middle = np.float32((float(low) + float(high)) / 2)  # exact: 12 significant bits
    # H == middle rounds to whichever of low/high has an even last bit
    if int(np.array(high).view(np.uint16)) & 1 == 0:
        return float(np.nextafter(middle, np.float32(-np.inf)))
    return float(middle)


def patcher_config_kwargs(e: ModelConfig) -> dict:
    return dict(vocab_size=e.vocab_size, hidden_size=e.dim, num_hidden_layers=e.n_layers,
                num_attention_heads=e.n_heads, num_key_value_heads=e.kv_heads, rms_norm_eps=e.norm_eps,
                rope_theta=e.rope_theta, intermediate_size=e.ffn_hidden(e.dim),
                # not enforced by HF: the length up to which the patcher equals the entropy model
                max_position_embeddings=e.attention_window or 8192)


def patcher_state(state: dict[str, torch.Tensor], e: ModelConfig) -> dict[str, torch.Tensor]:
    """The entropy model's tensors under BltPatcher's names (same block, interleaved rotary)."""
    out = {"model.patcher.embed_tokens.weight": state["tok_embeddings.weight"],
           "model.patcher.norm.weight": state["norm.weight"], "model.patcher.lm_head.weight": state["output.weight"]}
    for i in range(e.n_layers):
        for ours, theirs in _BLOCK:
            out[f"model.patcher.layers.{i}.{theirs}"] = state[f"blocks.{i}.{ours}"]
    return out


def hf_blt_config_dict(m: ModelConfig, e: ModelConfig, patching) -> dict:
    """config.json of the export: BltConfig with the patcher in the forward."""
    from transformers.models.blt.configuration_blt import BltConfig  # lazy: transformers only for --hf

    kwargs = hf_blt_config_kwargs(m)
    kwargs.update(patch_in_forward=True, patching_mode="entropy", patching_threshold=hf_threshold(patching.threshold),
                  patch_size=patching.target_mean_size, max_patch_length=patching.max_patch_length,
                  patcher_config=patcher_config_kwargs(e), bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config = BltConfig(**kwargs)
    config.architectures = [HF_BLT_ARCHITECTURE]
    config.torch_dtype = "float32"
    return config.to_dict()


def from_hf_blt_state(hf: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """HF BLT tensors -> the project's (KeyError names a missing HF tensor); the inverse of
    to_hf_blt_state, by inverting its names (the fused hash table is split back)."""
    names = {theirs: ours for ours, theirs in _key_pairs(m)}
    out = {}
    for theirs, ours in names.items():
        if ours == "hash":
            table = hf[theirs]
            out.update({f"encoder.hash_embeddings.tables.{i}.weight": chunk.contiguous()
                        for i, chunk in enumerate(table.split(m.hash.buckets))})
        else:
            out[ours] = hf[theirs]
    return out


def _key_pairs(m: ModelConfig) -> list[tuple[str, str]]:
    """(project name, HF name) for every tensor; "hash" stands for the fused table."""
    pairs = [("encoder.byte_embedding.weight", "model.local_encoder.embed_tokens.weight"),
             ("hash", "model.encoder_hash_tok_embedding.weight"),
             ("encoder.pool_query.weight", "model.local_encoder.patch_embedding_projection.weight"),
             ("decoder.patch_proj.weight", "model.local_decoder.patch_embedding_projection.weight"),
             ("decoder.norm.weight", "model.local_decoder.norm.weight"), ("decoder.output.weight", "lm_head.weight")]
    if m.uses_encoder_projection:
        pairs.append(("encoder.patch_proj.weight", "model.global_transformer.token_embedding_projection.weight"))
    for i in range(m.encoder.n_layers):
        pairs += [(f"encoder.layers.{i}.{a}", f"model.local_encoder.layers.{i}.{b}") for a, b in _BLOCK]
    pairs += [(f"encoder.pool_attention.{a}", f"model.local_encoder.cross_attn_layers.0.{b}") for a, b in _CROSS]
    for i in range(m.n_layers):
        pairs += [(f"latent.{i}.{a}", f"model.global_transformer.layers.{i}.{b}") for a, b in _BLOCK]
    for i in range(m.decoder.n_layers):
        pairs += [(f"decoder.layers.{i}.{a}", f"model.local_decoder.layers.{i}.{b}") for a, b in _BLOCK]
        pairs += [(f"decoder.cross_attentions.{i}.{a}", f"model.local_decoder.cross_attn_layers.{i}.{b}")
                  for a, b in _CROSS]
    return pairs


def from_patcher_state(hf: dict[str, torch.Tensor], e: ModelConfig) -> dict[str, torch.Tensor]:
    out = {"tok_embeddings.weight": hf["model.patcher.embed_tokens.weight"],
           "norm.weight": hf["model.patcher.norm.weight"], "output.weight": hf["model.patcher.lm_head.weight"]}
    for i in range(e.n_layers):
        for ours, theirs in _BLOCK:
            out[f"blocks.{i}.{ours}"] = hf[f"model.patcher.layers.{i}.{theirs}"]
    return out


def model_configs_from_hf(config: dict) -> tuple[ModelConfig, ModelConfig, list[str]]:
    """(BLT config, entropy-model config, what the project cannot express) from a BltForCausalLM
    config.json (sub-configs as dicts, as BltConfig.to_dict writes them)."""
    enc, dec, glob, pat = (config[k] for k in ("encoder_config", "decoder_config", "global_config", "patcher_config"))
    problems = []
    if enc.get("cross_attn_all_layers"):
        problems.append("the encoder cross-attends after every layer (cross_attn_all_layers); the project pools "
                        "once, after its last layer")
    if not dec.get("cross_attn_all_layers", True):
        problems.append("the decoder cross-attends before its first layer only; the project before every layer")
    for name, sub in (("encoder", enc), ("decoder", dec), ("global", glob), ("patcher", pat)):
        if sub.get("rope_scaling"):
            problems.append(f"{name} rope_scaling {sub['rope_scaling']!r} (the project has plain RoPE)")
    if {enc.get("cross_attn_k", config["cross_attn_k"]), dec.get("cross_attn_k", config["cross_attn_k"])} != \
            {config["cross_attn_k"]}:
        problems.append("cross_attn_k differs between the encoder, the decoder and the model")
    thetas = {enc["rope_theta"], dec["rope_theta"], glob["rope_theta"]}
    if len(thetas) > 1:
        problems.append(f"rope_theta differs between encoder, decoder and global ({sorted(thetas)}): the project has one")
    if enc.get("num_key_value_heads", enc["num_attention_heads"]) != enc["num_attention_heads"] or \
            dec.get("num_key_value_heads", dec["num_attention_heads"]) != dec["num_attention_heads"]:
        problems.append("grouped-query attention in the local models")
    if enc["intermediate_size"] != dec["intermediate_size"] or enc["hidden_size"] != dec["hidden_size"]:
        problems.append("encoder and decoder widths differ")
    m = ModelConfig(family="blt", layout="meta", dim=glob["hidden_size"], n_layers=glob["num_hidden_layers"],
                    n_heads=glob["num_attention_heads"], n_kv_heads=glob.get("num_key_value_heads"),
                    norm_eps=float(glob["rms_norm_eps"]), rope_theta=float(glob["rope_theta"]),
                    cross_attn_k=config["cross_attn_k"],
                    encoder=LocalModelConfig(dim=enc["hidden_size"], n_layers=enc["num_hidden_layers"],
                                             n_heads=enc["num_attention_heads"], window=None),
                    decoder=LocalModelConfig(dim=dec["hidden_size"], n_layers=dec["num_hidden_layers"],
                                             n_heads=dec["num_attention_heads"], window=None),
                    hash=HashEmbeddingConfig(ngram_sizes=list(config["encoder_hash_byte_group_size"]),
                                             buckets=config["encoder_hash_byte_group_vocab"],
                                             functions=config["encoder_hash_byte_group_nb_functions"]))
    # the project has one SwiGLU rule for every width: find a (multiplier, multiple_of) giving both
    widths = [(glob["hidden_size"], glob["intermediate_size"]), (enc["hidden_size"], enc["intermediate_size"])]
    for multiple_of in (glob["intermediate_size"], 256, 128, 64, 32, 16, 8, 4, 2, 1):
        m.ffn_multiplier, m.ffn_multiple_of = glob["intermediate_size"] * 3 / (8 * glob["hidden_size"]), multiple_of
        if all(m.ffn_hidden(d) == h for d, h in widths):
            break
    else:
        problems.append(f"intermediate sizes {[h for _, h in widths]} for widths {[d for d, _ in widths]} "
                        "follow no single SwiGLU rule (the project derives every width from one)")
    e = ModelConfig(family="entropy", dim=pat["hidden_size"], n_layers=pat["num_hidden_layers"],
                    n_heads=pat["num_attention_heads"], n_kv_heads=pat.get("num_key_value_heads"),
                    norm_eps=float(pat["rms_norm_eps"]), rope_theta=float(pat["rope_theta"]),
                    ffn_multiplier=pat["intermediate_size"] * 3 / (8 * pat["hidden_size"]),
                    ffn_multiple_of=pat["intermediate_size"], window=pat.get("max_position_embeddings"))
    return m, e, problems
