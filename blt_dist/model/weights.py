"""Loading a trained model: an export directory (`model.safetensors` + `config.yaml` +
`export.json`), as evaluation, generation and the entropy tool read it.

    model, cfg = load_export(out_dir)          # fp32, eval mode, on CPU

No DeepSpeed, no optimizer state, one file of weights. Writing one is the training wing's job
(`blt_dist/training/export.py`); it lives here so that the data plane (the entropy model) and
evaluation can load models without importing the trainer.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from blt_dist.config import load_config
from blt_dist.errors import UserError
from blt_dist.model import build_model

WEIGHTS = "model.safetensors"
INFO = "export.json"


def read_export(path: str | Path, device: str | torch.device = "cpu"):
    """(state dict, Config) of an export, without building the model. Raises UserError for a
    missing or damaged export."""
    path = Path(path)
    if not (path / WEIGHTS).is_file() or not (path / "config.yaml").is_file():
        raise UserError(f"{path} is not a model export (needs {WEIGHTS} and config.yaml; see `blt-dist train`)")
    cfg = load_config(path / "config.yaml")
    try:
        state = load_file(str(path / WEIGHTS), device=str(device))
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path / WEIGHTS}: unreadable weights ({err})") from err
    return state, cfg


def load_export(path: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, Config). Raises UserError for a missing or damaged export."""
    state, cfg = read_export(path, device)
    model = build_model(cfg.model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{path}: weights do not fit the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(device).eval(), cfg


def export_info(path: str | Path) -> dict:
    """What identifies an export: weights hash, family, and whatever the writer added."""
    info_path = Path(path) / INFO
    if not info_path.is_file():
        raise UserError(f"{path}: no {INFO}; not a model export")
    return json.loads(info_path.read_text())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
