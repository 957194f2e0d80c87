"""`blt-dist import-hf DIR --out EXPORT`: a transformers LlamaForCausalLM directory
(config.json + safetensors) -> a project export that eval, compare, generate and
train (model init_from) read.

Every problem is one line and exit status 2: not an HF directory, an architecture the project
has no family for, a tensor missing, of the wrong shape or of a non-float dtype.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from blt_dist.config import Config
from blt_dist.interop import InteropError, hf_llama
from blt_dist.model import build_model
from blt_dist.training.export import save_export

SUPPORTED = (hf_llama.HF_ARCHITECTURE,)


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
    config, hf_state = read_hf_dir(path)
    arch = (config.get("architectures") or [None])[0]
    if arch not in SUPPORTED:
        raise InteropError(f"{path}: architecture {arch!r} is not importable (supported: {', '.join(SUPPORTED)})")
    try:
        model_cfg, problems = hf_llama.model_config_from_hf(config)
    except KeyError as err:
        raise InteropError(f"{path / 'config.json'}: missing key {err}") from err
    if problems:
        raise InteropError(f"{path}: cannot be expressed exactly: " + "; ".join(problems))
    for name, tensor in hf_state.items():
        if not tensor.is_floating_point():
            raise InteropError(f"{path}: tensor {name} has dtype {tensor.dtype}, expected a floating-point dtype")
    # Shapes are checked under HF's names, before the q/k permutation needs them to fit.
    expected = hf_llama.to_hf_state(build_model(model_cfg).state_dict(), model_cfg)
    for name, tensor in expected.items():
        if name not in hf_state:
            raise InteropError(f"{path}: missing tensor {name}")
        if hf_state[name].shape != tensor.shape:
            raise InteropError(f"{path}: tensor {name} has shape {tuple(hf_state[name].shape)}, "
                               f"config.json implies {tuple(tensor.shape)}")
    state = hf_llama.from_hf_state(hf_state, model_cfg)
    cfg = Config()
    cfg.model = model_cfg
    return state, cfg


def add_arguments(parser) -> None:
    parser.add_argument("hf_dir", help="a transformers model directory (config.json + *.safetensors)")
    parser.add_argument("--out", required=True, help="the project export directory to write")


def run(args) -> int:
    state, cfg = convert(args.hf_dir)
    out = Path(args.out)
    if cfg.model.family == "bpe" and (Path(args.hf_dir) / "tokenizer.model").is_file():
        # Kept beside the export so that eval/generate find the sentencepiece model it was trained with.
        shutil.copyfile(Path(args.hf_dir) / "tokenizer.model", out.with_name(out.name + ".tokenizer.model"))
        cfg.data.tokenizer = str(out.with_name(out.name + ".tokenizer.model").resolve())
    save_export(state, cfg, out, {"imported_from": str(Path(args.hf_dir).resolve())})
    print(f"{args.hf_dir} -> {out} ({cfg.model.family}, {sum(t.numel() for t in state.values()) / 1e6:.2f}M parameters)")
    return 0
