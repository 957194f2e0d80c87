"""A trained model as one directory: `model.safetensors` + `config.yaml` (+ `export.json`).

This is what evaluation, generation, the entropy tool and other users load: no DeepSpeed, no
optimizer state, one file of weights. `blt-dist train` writes one at the end of a run; a ZeRO
checkpoint is consolidated into one by `checkpoint.consolidate`.

    save_export(model, cfg, out_dir, extra={"step": 1000})
    model, cfg = load_export(out_dir)          # fp32, eval mode, on CPU
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from blt_dist.config import Config, load_config, save_resolved
from blt_dist.errors import UserError

WEIGHTS = "model.safetensors"
INFO = "export.json"


def save_export(state_dict: dict[str, torch.Tensor], cfg: Config, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Writes weights and config to out_dir (via a temp dir and a rename)."""
    from safetensors.torch import save_file

    from blt_dist.data.shards import publish

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp-export")
    tmp.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in state_dict.items()}
    save_file(tensors, str(tmp / WEIGHTS))
    save_resolved(cfg, tmp)
    info = {"weights_sha256": file_sha256(tmp / WEIGHTS), "family": cfg.model.family, **(extra or {})}
    (tmp / INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    publish(tmp, out_dir)
    return out_dir


def load_export(path: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, Config). Raises UserError for a missing or damaged export."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from blt_dist.model import build_model

    path = Path(path)
    if not (path / WEIGHTS).is_file() or not (path / "config.yaml").is_file():
        raise UserError(f"{path}: not a model export (needs {WEIGHTS} and config.yaml; see `blt-dist train`)")
    cfg = load_config(path / "config.yaml")
    try:
        state = load_file(str(path / WEIGHTS), device=str(device))
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path / WEIGHTS}: unreadable weights ({err})") from err
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


# ---------------------------------------------------------------------------------------------
# `blt-dist export RUN_DIR`: a (ZeRO-sharded or pipelined) checkpoint -> one safetensors file


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", help="a training run directory (holds config.yaml and checkpoints/)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest complete one)")
    parser.add_argument("--out", default=None, help="export directory (default: RUN_DIR/export)")


def run(args) -> int:
    from blt_dist import checkpoint

    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir}: not a run directory (no config.yaml)")
    if args.step is None:
        found = checkpoint.newest_complete(run_dir)
        if found is None:
            raise UserError(f"{run_dir}: no complete checkpoint to export")
        tag_dir = found[0]
    else:
        tag_dir = checkpoint.checkpoint_root(run_dir) / checkpoint.tag_for(args.step)
    cfg = load_config(run_dir / "config.yaml")
    state = checkpoint.consolidated_state_dict(tag_dir)
    out = save_export(state, cfg, args.out or run_dir / "export", {"step": int(tag_dir.name.split("_")[1])})
    print(f"{tag_dir} -> {out / WEIGHTS} ({sum(t.numel() for t in state.values()) / 1e6:.2f}M parameters)")
    return 0
