"""DeepSpeed glue: process group, the DeepSpeed config generated from the config tree, the engine.

The DeepSpeed JSON is never kept by hand: `deepspeed_config(cfg, world)` derives it, and the
run directory gets a copy (`deepspeed.json`) for reference. Learning rate is set by the
training loop every step (a pure function of the step), so DeepSpeed gets no scheduler.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import deepspeed
import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from blt_dist import shims
from blt_dist.config import Config
from blt_dist.errors import UserError
from blt_dist.model.layers import CrossAttentionBlock, TransformerBlock


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_rank_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """The variables torchrun gives rank `rank` of `world_size` processes on this machine, which
    init_distributed reads (for processes a tool starts itself: blt-dist memory, the tests)."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def init_distributed(backend: str = "auto") -> DistEnv:
    """Joins (or, for a plain single process, creates) the process group.

    Ranks come from torchrun / the deepspeed launcher (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT) or from Slurm via launch/ (which exports the same variables)."""
    if "RANK" not in os.environ:  # one process started by hand: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    cuda = torch.cuda.is_available()
    backend = resolve_backend(backend, cuda)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", cuda_device_index(local_rank, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    return DistEnv(int(os.environ["RANK"]), local_rank, int(os.environ["WORLD_SIZE"]), device, backend)


def resolve_backend(requested: str, cuda: bool) -> str:
    """auto -> NCCL on GPU machines, gloo on CPU; NCCL without CUDA is a user error."""
    if requested == "auto":
        return "nccl" if cuda else "gloo"
    if requested == "nccl" and not cuda:
        raise UserError("parallel.backend: nccl needs CUDA GPUs; this machine has none (use gloo or auto)")
    return requested


def cuda_device_index(local_rank: int, visible_devices: int) -> int:
    """The GPU a process drives. One process per GPU: with every GPU of the node visible (srun
    --gpus-per-node, torchrun) local rank i drives GPU i; when the launcher binds one GPU to each
    task (--gpus-per-task=1, --gpu-bind), that task sees a single device, index 0."""
    if visible_devices == 1:
        return 0
    if local_rank >= visible_devices:
        raise UserError(
            f"local rank {local_rank} has no GPU: this process sees {visible_devices} CUDA devices; "
            "run one task per GPU (launch --gpus-per-node G starts G tasks per node)"
        )
    return local_rank


def data_parallel_size(cfg: Config, world_size: int) -> int:
    stages = cfg.parallel.pipeline_stages
    if world_size % stages:
        raise UserError(f"parallel.pipeline_stages: {stages} does not divide the world size {world_size}")
    return world_size // stages


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    t, o, p = cfg.train, cfg.optim, cfg.parallel
    if t.dtype == "fp16" and not torch.cuda.is_available():
        raise UserError("train.dtype: fp16 needs a GPU (DeepSpeed refuses fp16 on CPU); use bf16 or fp32")
    dp = data_parallel_size(cfg, world_size)
    ds = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * dp,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": o.lr,
                "betas": [o.beta1, o.beta2],
                "eps": o.eps,
                "weight_decay": o.weight_decay,
                # torch's AdamW: DeepSpeed's fused CPU Adam compiles for ~45 s first (FIELD-NOTES)
                "torch_adam": True,
            },
        },
        "zero_optimization": {"stage": p.zero_stage},
        "bf16": {"enabled": t.dtype == "bf16"},
        "fp16": {"enabled": t.dtype == "fp16"},
        "steps_per_print": 1 << 30,  # the loop logs; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
    }
    if p.reduce_bucket_size:
        ds["zero_optimization"]["reduce_bucket_size"] = int(p.reduce_bucket_size)
    if o.grad_clip > 0:
        ds["gradient_clipping"] = o.grad_clip
    return ds


def initialize_engine(model: nn.Module, weight_decay: float, ds_config: dict):
    """deepspeed.initialize with the trainer's parameter groups, and the optimizer state exactly
    as a fresh AdamW's on every ZeRO stage and layout (shims.undo_unfused_optimizer_init_step)."""
    engine, *_ = deepspeed.initialize(model=model, model_parameters=optimizer_groups(model, weight_decay),
                                      config=ds_config)
    shims.undo_unfused_optimizer_init_step(engine.optimizer)
    return engine


def optimizer_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: not on norms, biases or embedding tables."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if decays(name, param.dim()) else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def decays(name: str, dim: int) -> bool:
    """Whether a parameter is in the weight-decay group (the first of `optimizer_groups`); the
    export reads a ZeRO-0 checkpoint's master weights back in this order."""
    is_embedding = "embed" in name or "hash" in name
    return dim >= 2 and not is_embedding


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recomputes every transformer block in backward instead of storing its activations."""
    wrapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (TransformerBlock, CrossAttentionBlock)):
                setattr(parent, name, checkpoint_wrapper(child))
                wrapped += 1
    return wrapped


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
