"""Meta's own BLT checkpoint layout (facebookresearch/blt; the published facebook/blt-* weights)
-> the BltForCausalLM config and tensors that `import-hf` reads (hf_import.convert_blt).

    DIR/config.json or params.json     {"args": {...}} as published, or a training dump whose
                                       "model" section holds them
    DIR/model.safetensors              the BLT's tensors under Meta's names, or
      or consolidated.pth                a torch checkpoint of them (its "model" entry)
    DIR/entropy_model/params.json      {"entropy_model": {...}, "data": {"patcher_args": {...}}}
    DIR/entropy_model/consolidated.pth the entropy model's tensors

The names and shapes follow the way transformers converts these checkpoints (its
convert_blt_weights_to_hf): the same modules under other names (`attention.wq` ->
`self_attn.q_proj`, `feed_forward.w1` -> `mlp.gate_proj`, `cross_attn_norm_q` -> `q_norm`, ...),
one hash table per (n, function) fused into one, the decoder's `output` as `lm_head`, and
every FFN width `multiple_of * ceil(int(8 * dim / 3) / multiple_of)`. What neither HF nor the
project computes is refused with the reason; Meta's `local_attention_window_len` is reported: HF
and the import attend over the whole causal context, as the HF conversion does.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from blt_dist.interop import InteropError

_RENAMES = ((".attention.", ".self_attn."), (".feed_forward.", ".mlp."), (".attention_norm.", ".input_layernorm."),
            (".ffn_norm.", ".post_attention_layernorm."), (".tok_embeddings.", ".embed_tokens."),
            (".cross_attn_norm_q.", ".q_norm."), (".cross_attn_norm_kv.", ".k_norm."), (".w1.", ".gate_proj."),
            (".w2.", ".down_proj."), (".w3.", ".up_proj."), (".wq.", ".q_proj."), (".wk.", ".k_proj."),
            (".wv.", ".v_proj."), (".wo.", ".o_proj."), (".output.", ".lm_head."))
HASH_PREFIX = "encoder_hash_tok_embedding."


def is_meta_dir(path: Path) -> bool:
    """A Meta BLT directory: its entropy model beside it, args in config.json or params.json."""
    return (path / "entropy_model" / "consolidated.pth").is_file() and _args_file(path) is not None


def _args_file(path: Path) -> Path | None:
    for name in ("config.json", "params.json"):
        if (path / name).is_file():
            text = json.loads((path / name).read_text())
            if "args" in text or "model" in text or "dim_global" in text:
                return path / name
    return None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InteropError(f"{path}: unreadable ({err})") from err


def _torch_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 -- pickle, zip and I/O errors all mean one thing here
        raise InteropError(f"{path}: unreadable torch checkpoint ({type(err).__name__}: {err})") from err
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise InteropError(f"{path}: not a dictionary of tensors")
    return state


def _main_tensors(path: Path) -> dict[str, torch.Tensor]:
    if (path / "model.safetensors").is_file():
        try:
            return load_file(str(path / "model.safetensors"))
        except (SafetensorError, OSError, ValueError) as err:
            raise InteropError(f"{path / 'model.safetensors'}: unreadable weights ({err})") from err
    for candidate in (path / "consolidated.pth", path / "consolidated" / "consolidated.pth"):
        if candidate.is_file():
            return _torch_tensors(candidate)
    raise InteropError(f"{path}: no model.safetensors or consolidated.pth (Meta's BLT layout)")


def ffn_width(dim: int, multiple_of: int) -> int:
    return multiple_of * ((int(8 * dim / 3) + multiple_of - 1) // multiple_of)


def hf_config(args: dict, entropy: dict, patcher: dict, where: Path) -> tuple[dict, list[str]]:
    """BltConfig keyword arguments from Meta's args, and what cannot be expressed."""
    problems = []
    if args.get("pm_size"):
        problems.append(f"pm_size {args['pm_size']} (a patch memory the project does not have)")
    for flag in ("cross_attn_encoder", "cross_attn_decoder"):
        if args.get(flag) is False:
            problems.append(f"{flag}: false (pooling instead of cross-attention; the project always cross-attends)")
    if args.get("encoder_enable_byte_ngrams"):
        problems.append("encoder_enable_byte_ngrams (n-gram tables besides the hash embeddings)")
    if patcher.get("monotonicity"):
        problems.append("monotonic patching (HF's BltForCausalLM cuts by a global threshold only)")
    if patcher.get("threshold_add"):
        problems.append(f"patcher threshold_add {patcher['threshold_add']}")
    if patcher.get("patching_mode", "entropy") != "entropy":
        problems.append(f"patching_mode {patcher.get('patching_mode')!r}")
    if patcher.get("threshold") is None:
        problems.append(f"{where}: no patcher_args.threshold (entropy_model/params.json data.patcher_args)")
    multiple_of = int(args.get("multiple_of", 256))
    eps, theta, k = float(args.get("norm_eps", 1e-5)), float(args.get("rope_theta", 10000.0)), int(args["cross_attn_k"])
    local_positions = int(args.get("max_encoder_seq_length") or args.get("max_seqlen", 1024))

    def local(side: str, all_layers: bool) -> dict:
        dim = int(args[f"dim_local_{side}"])
        return dict(hidden_size=dim, num_attention_heads=int(args[f"n_heads_local_{side}"]),
                    num_key_value_heads=args.get("n_kv_heads"), num_hidden_layers=int(args[f"n_layers_local_{side}"]),
                    rms_norm_eps=eps, rope_theta=theta, intermediate_size=ffn_width(dim, multiple_of),
                    cross_attn_all_layers=all_layers, cross_attn_k=k, hidden_size_global=int(args["dim_global"]),
                    max_position_embeddings=local_positions)

    entropy_dim = int(entropy["dim"])
    kwargs = dict(
        vocab_size=int(args.get("vocab_size", 260)), cross_attn_k=k, patch_in_forward=True, patching_mode="entropy",
        patching_threshold=float(patcher.get("threshold") or 0.0), max_patch_length=patcher.get("max_patch_length"),
        patch_size=patcher.get("patch_size", 4.5),
        encoder_hash_byte_group_size=list(args["encoder_hash_byte_group_size"]),
        encoder_hash_byte_group_vocab=int(args["encoder_hash_byte_group_vocab"]),
        encoder_hash_byte_group_nb_functions=int(args.get("encoder_hash_byte_group_nb_functions", 1)),
        encoder_config=local("encoder", bool(args.get("cross_attn_all_layers_encoder", False))),
        decoder_config=local("decoder", bool(args.get("cross_attn_all_layers_decoder", True))),
        global_config=dict(hidden_size=int(args["dim_global"]), num_attention_heads=int(args["n_heads_global"]),
                           num_key_value_heads=args.get("n_kv_heads_global"),
                           num_hidden_layers=int(args["n_layers_global"]), rms_norm_eps=eps, rope_theta=theta,
                           intermediate_size=ffn_width(int(args["dim_global"]), multiple_of),
                           max_position_embeddings=int(args.get("max_seqlen", 1024))),
        patcher_config=dict(hidden_size=entropy_dim, num_attention_heads=int(entropy["n_heads"]),
                            num_key_value_heads=entropy.get("n_kv_heads"), num_hidden_layers=int(entropy["n_layers"]),
                            rms_norm_eps=float(entropy.get("norm_eps", 1e-5)),
                            rope_theta=float(entropy.get("rope_theta", 10000.0)),
                            intermediate_size=ffn_width(entropy_dim, int(entropy.get("multiple_of", 256))),
                            max_position_embeddings=int(entropy.get("max_seqlen", 1024))),
    )
    return kwargs, problems


def hf_tensors(main: dict[str, torch.Tensor], entropy: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Meta's tensor names -> BltForCausalLM's (the hash tables fused in index order)."""
    renamed = {}
    for name, tensor in [*main.items(), *((f"patcher.{n}", t) for n, t in entropy.items())]:
        if name.startswith(HASH_PREFIX):
            continue
        for old, new in _RENAMES:
            name = name.replace(old, new)
        renamed["lm_head.weight" if name == "local_decoder.lm_head.weight" else f"model.{name}"] = tensor
    tables = sorted((int(n[len(HASH_PREFIX):].split(".")[0]), t) for n, t in main.items() if n.startswith(HASH_PREFIX))
    if tables:
        renamed["model.encoder_hash_tok_embedding.weight"] = torch.cat([t for _, t in tables])
    return renamed


def read_meta_dir(path: Path) -> tuple[dict, dict[str, torch.Tensor], list[str]]:
    """(BltForCausalLM config.json as transformers writes it, its tensors, notes for the user)."""
    # lazy: transformers fills BltConfig's defaults exactly as a saved directory has them; only
    # this import path needs it
    from transformers import BltConfig

    raw = _read_json(_args_file(path))
    args = raw.get("args") or raw.get("model") or raw
    entropy_params = _read_json(path / "entropy_model" / "params.json") \
        if (path / "entropy_model" / "params.json").is_file() else {}
    entropy_args = entropy_params.get("entropy_model") or raw.get("entropy_model") or entropy_params.get("model")
    if not entropy_args:
        raise InteropError(f"{path / 'entropy_model' / 'params.json'}: no entropy_model section (its shape)")
    patcher = (entropy_params.get("data") or {}).get("patcher_args") or (raw.get("data") or {}).get("patcher_args") or {}
    try:
        kwargs, problems = hf_config(args, entropy_args, patcher, path)
    except KeyError as err:
        raise InteropError(f"{path}: Meta BLT args without {err}") from err
    if problems:
        raise InteropError(f"{path}: cannot be expressed exactly: " + "; ".join(problems))
    notes = []
    if args.get("local_attention_window_len"):
        notes.append(f"Meta's local models attend within {args['local_attention_window_len']} bytes; HF's and this "
                     "import's attend over the whole causal context (as transformers' own conversion does)")
    config = BltConfig(**kwargs).to_dict()
    config["architectures"] = ["BltForCausalLM"]
    tensors = hf_tensors(_main_tensors(path), _torch_tensors(path / "entropy_model" / "consolidated.pth"))
    return config, tensors, notes
