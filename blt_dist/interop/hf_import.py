"""`blt-dist import-hf DIR --out EXPORT`: a transformers LlamaForCausalLM or BltForCausalLM
directory (config.json + safetensors), or a BLT in Meta's own layout (meta_blt.py) -> a project export that eval, compare and generate read
(a BLT's patcher becomes an entropy-model export at EXPORT.entropy). `train.init_from=EXPORT`
continues pretraining from it.

Every problem is one line and exit status 2: not an HF directory, an architecture the project
has no family for, a tensor missing, of the wrong shape or of a non-float dtype.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from blt_dist.config import Config
from blt_dist.interop import InteropError, hf_blt, hf_llama, meta_blt
from blt_dist.model import build_model
from blt_dist.training.export import save_export

SUPPORTED = (hf_llama.HF_ARCHITECTURE, hf_blt.HF_BLT_ARCHITECTURE)


def read_hf_dir(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    if not (path / "config.json").is_file():
        raise InteropError(f"{path}: not a Hugging Face model directory (no config.json)")
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise InteropError(f"{path / 'config.json'}: not JSON ({err})") from err
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise InteropError(f"{path}: no *.safetensors weights (save with safe_serialization=True)")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(str(file)))
        except (SafetensorError, OSError, ValueError) as err:
            raise InteropError(f"{file}: unreadable weights ({err})") from err
    return config, state


def convert(path: str | Path) -> tuple[dict[str, torch.Tensor], Config]:
    path = Path(path)
    if meta_blt.is_meta_dir(path):  # Meta's layout: through BltForCausalLM's names and config
        config, hf_state, notes = meta_blt.read_meta_dir(path)
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        return convert_blt(path, config, hf_state)
    config, hf_state = read_hf_dir(path)
    arch = (config.get("architectures") or [None])[0]
    if arch not in SUPPORTED:
        raise InteropError(f"{path}: architecture {arch!r} is not importable (supported: {', '.join(SUPPORTED)})")
    if arch == hf_blt.HF_BLT_ARCHITECTURE:
        return convert_blt(path, config, hf_state)
    try:
        model_cfg, problems = hf_llama.model_config_from_hf(config)
    except KeyError as err:
        raise InteropError(f"{path / 'config.json'}: missing key {err}") from err
    if problems:
        raise InteropError(f"{path}: cannot be expressed exactly: " + "; ".join(problems))
    # Shapes are checked under HF's names, before the q/k permutation needs them to fit.
    check_tensors(path, hf_state, hf_llama.to_hf_state(build_model(model_cfg).state_dict(), model_cfg))
    state = hf_llama.from_hf_state(hf_state, model_cfg)
    cfg = Config()
    cfg.model = model_cfg
    return state, cfg


def check_tensors(path: Path, hf_state: dict, expected: dict) -> None:
    """Every tensor floating-point; every expected one present, with the expected shape."""
    for name, tensor in hf_state.items():
        if not tensor.is_floating_point():
            raise InteropError(f"{path}: tensor {name} has dtype {tensor.dtype}, expected a floating-point dtype")
    for name, tensor in expected.items():
        if name not in hf_state:
            raise InteropError(f"{path}: missing tensor {name}")
        if hf_state[name].shape != tensor.shape:
            raise InteropError(f"{path}: tensor {name} has shape {tuple(hf_state[name].shape)}, "
                               f"config.json implies {tuple(tensor.shape)}")


def convert_blt(path: Path, config: dict, hf_state: dict):
    """BltForCausalLM -> (BLT state, its Config, entropy state, the entropy Config). The patching
    threshold is HF's, compared by the project against float16-rounded entropies: a boundary can
    move where an entropy lies within half a float16 step of it."""
    try:
        m, e, problems = hf_blt.model_configs_from_hf(config)
    except KeyError as err:
        raise InteropError(f"{path / 'config.json'}: missing key {err}") from err
    if config.get("patching_mode", "entropy") != "entropy" or not config.get("patch_in_forward", True):
        problems.append(f"patching_mode {config.get('patching_mode')!r} without the patcher in the forward")
    if problems:
        raise InteropError(f"{path}: cannot be expressed exactly: " + "; ".join(problems))
    blt, entropy = build_model(m), build_model(e)
    expected = {**hf_blt.to_hf_blt_state(blt.state_dict(), m), **hf_blt.patcher_state(entropy.state_dict(), e)}
    check_tensors(path, hf_state, expected)
    unexpected = sorted(set(hf_state) - set(expected))
    if unexpected:  # a module the project's BLT lacks: importing without it would change the function
        raise InteropError(f"{path}: {len(unexpected)} tensors the project's BLT has no place for "
                           f"({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''})")
    cfg, ecfg = Config(), Config()
    cfg.model, ecfg.model = m, e
    p = cfg.data.patching
    p.mode, p.bos_alone, p.threshold = "entropy", True, float(config["patching_threshold"])
    if config.get("max_patch_length"):
        p.max_patch_length = int(config["max_patch_length"])
    return hf_blt.from_hf_blt_state(hf_state, m), cfg, hf_blt.from_patcher_state(hf_state, e), ecfg


def add_arguments(parser) -> None:
    parser.add_argument("hf_dir", help="a transformers model directory (config.json + *.safetensors), or Meta's BLT "
                                       "layout (params/config.json, consolidated.pth or model.safetensors, "
                                       "entropy_model/)")
    parser.add_argument("--out", required=True, help="the project export directory to write")


def run(args) -> int:
    converted = convert(args.hf_dir)
    out = Path(args.out)
    if len(converted) == 4:  # a BLT: its patcher becomes an entropy-model export beside it
        state, cfg, entropy_state, entropy_cfg = converted
        entropy_out = out.with_name(out.name + ".entropy")
        save_export(entropy_state, entropy_cfg, entropy_out, {"imported_from": str(Path(args.hf_dir).resolve())})
        cfg.data.entropy_model = str(entropy_out.resolve())
    else:
        state, cfg = converted

    if cfg.model.family == "bpe" and (Path(args.hf_dir) / "tokenizer.model").is_file():
        # Kept beside the export so that eval/generate find the sentencepiece model it was trained with.
        shutil.copyfile(Path(args.hf_dir) / "tokenizer.model", out.with_name(out.name + ".tokenizer.model"))
        cfg.data.tokenizer = str(out.with_name(out.name + ".tokenizer.model").resolve())
    save_export(state, cfg, out, {"imported_from": str(Path(args.hf_dir).resolve())})
    print(f"{args.hf_dir} -> {out} ({cfg.model.family}, {sum(t.numel() for t in state.values()) / 1e6:.2f}M parameters)")
    return 0
