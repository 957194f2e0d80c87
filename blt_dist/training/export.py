"""Writing a trained model as one directory: `model.safetensors` + `config.yaml` (+ `export.json`),
the layout `blt_dist.model.weights.load_export` reads.

`blt-dist train` writes one at the end of a run; `blt-dist export RUN_DIR` consolidates a ZeRO
checkpoint (sharded or pipelined) into one.

    save_export(state_dict, cfg, out_dir, extra={"step": 1000})
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from blt_dist.config import Config, load_config, save_resolved
from blt_dist.data.shards import publish
from blt_dist.errors import UserError
from blt_dist.model.weights import INFO, WEIGHTS, file_sha256
from blt_dist.training import checkpoint


def save_export(state_dict: dict[str, torch.Tensor], cfg: Config, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Writes weights and config to out_dir (via a temp dir and a rename)."""
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


# ---------------------------------------------------------------------------------------------
# `blt-dist export RUN_DIR`: a (ZeRO-sharded or pipelined) checkpoint -> one safetensors file


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", help="a training run directory (holds config.yaml and checkpoints/)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest complete one)")
    parser.add_argument("--out", default=None, help="export directory (default: RUN_DIR/export)")


def run(args) -> int:
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
