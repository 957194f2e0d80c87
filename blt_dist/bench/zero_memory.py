"""Measured per-rank training state of a real DeepSpeed engine under ZeRO-0/1/2/3.

    blt-dist memory configs/blt/125m.yaml [key=value ...] --ranks 2 --stages 0 1 2 3 [--dtype bf16] [--json OUT]
    blt-dist memory configs/blt/1b.yaml parallel.reduce_bucket_size=5e7 --stages 3
    measure_zero_state("configs/blt/tiny.yaml", ranks=2) -> [{"stage": 0, "bytes_per_rank": [...], ...}, ...]

Starts `ranks` processes (gloo, as torchrun would). Each builds the config's model, wraps it in
deepspeed.initialize with the project's DeepSpeed config (parallel/engine.py) at each ZeRO
stage in turn, runs one training step on a small synthetic batch and the backward of a
second, and counts what the engine holds then, between the backward and the update: the
optimizer state exists (the first update made it) and so do this step's gradients.

What is counted. Every distinct tensor storage reachable from the engine at that point:
  * the module's parameters, their gradients and, at ZeRO-3, their partitions (`ds_tensor`);
  * everything the ZeRO / bf16 optimizer wrapper and the torch AdamW inside it keep: master
    weights, moments, flat gradient buffers and communication buckets.
Activations are freed by then. Storages are deduplicated by address, so a flat buffer and
the parameter views into it count once. Not counted: what exists only inside the backward
(activations, and gradients before ZeRO reduces and partitions them). This is read from the
objects DeepSpeed built, so it checks the textbook rule (bench.zero_bytes_per_rank:
parameters, gradients and optimizer state, partitioned as the ZeRO paper says), which ignores
buffers, alignment padding and what DeepSpeed frees early.

Measured with DeepSpeed 0.19 on 2 ranks, bf16 (tiny and 125M BLT configs):
  * ZeRO-0 holds the rule's 16 bytes per parameter;
  * ZeRO-1 and 2 hold the same, 2 + 14 / N bytes: DeepSpeed keeps only this rank's partition
    of the reduced gradients at stage 1 already (the rule counts full gradients there);
  * ZeRO-3 adds a reduce bucket of 5e8 elements (DeepSpeed's reduce_bucket_size default,
    954 MiB in bf16) whatever the model's size, and keeps parameters of at most 1e5
    elements whole on every rank (stage3_param_persistence_threshold); the rest is the rule's 16 / N bytes.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence, Union

import deepspeed
import torch
from torch import nn

from blt_dist.bench.workloads import blt_batch, bpe_batch
from blt_dist.config import load_config
from blt_dist.errors import UserError
from blt_dist.model import build_model, model_inputs
from blt_dist.model.loss import loss_and_sums
from blt_dist.parallel.collectives import all_gather_object, shutdown
from blt_dist.parallel.engine import (
    deepspeed_config,
    free_port,
    init_distributed,
    local_rank_env,
    optimizer_groups,
)

# Objects whose attributes are walked for tensors: DeepSpeed's engine parts and torch's
# optimizers. Anything else (process groups, the accelerator, loggers) holds no training state.
_WALKED_MODULES = ("deepspeed.", "torch.optim")


def held_storages(roots: dict[str, object]) -> dict[int, tuple[int, torch.dtype, str]]:
    """{storage address: (bytes, dtype, holder)} of every tensor storage reachable from the
    named `roots`; holder is the path (root and first attribute) it was first reached by."""
    found: dict[int, tuple[int, torch.dtype, str]] = {}
    seen: set[int] = set()
    stack = list(roots.items())[::-1]
    while stack:
        path, obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage.nbytes() and obj.device.type != "meta" and storage.data_ptr() not in found:
                found[storage.data_ptr()] = (storage.nbytes(), obj.dtype, path)
            for name in ("grad", "ds_tensor"):
                if getattr(obj, name, None) is not None:
                    stack.append((f"{path}.{name}", getattr(obj, name)))
        elif isinstance(obj, nn.Module):
            stack.extend((f"{path}.parameters", p) for p in obj.parameters())
            stack.extend((f"{path}.buffers", b) for b in obj.buffers())
        elif isinstance(obj, dict):
            stack.extend((path, v) for v in obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend((path, v) for v in obj)
        elif type(obj).__module__.startswith(_WALKED_MODULES) and hasattr(obj, "__dict__"):
            depth = path.count(".")
            stack.extend((f"{path}.{k.split('__')[-1]}" if depth < 1 else path, v) for k, v in vars(obj).items())
    return found


def engine_state_bytes(engine) -> dict:
    """{'bytes': total, 'by_dtype': {dtype: bytes}, 'by_holder': {path: bytes}} held by a
    DeepSpeed engine (see the module docstring)."""
    by_dtype: dict[str, int] = defaultdict(int)
    by_holder: dict[str, int] = defaultdict(int)
    for nbytes, dtype, holder in held_storages({"module": engine.module, "optimizer": engine.optimizer}).values():
        by_dtype[str(dtype).removeprefix("torch.")] += nbytes
        by_holder[holder] += nbytes
    return {"bytes": sum(by_dtype.values()), "by_dtype": dict(sorted(by_dtype.items())),
            "by_holder": dict(sorted(by_holder.items(), key=lambda kv: -kv[1]))}


def _one_step(engine, cfg) -> None:
    _backward(engine, cfg)
    engine.step()


def _backward(engine, cfg) -> None:
    family = cfg.model.family
    batch = blt_batch(512, 1) if family == "blt" else bpe_batch(128, 1, cfg.model.vocab_size)
    logits = engine(*model_inputs(batch, family, engine.device))
    loss, _ = loss_and_sums(logits, batch["targets"], batch["target_bytes"])
    engine.backward(loss)


def _rank_main(config: str, overrides: Sequence[str], stages: Sequence[int], dtype: str, out: str) -> None:
    env = init_distributed("gloo")
    results = []
    for stage in stages:
        cfg = load_config(config, [*overrides, f"parallel.zero_stage={stage}", f"train.dtype={dtype}",
                                   "train.micro_batch_size=1", "train.grad_accum=1", "parallel.pipeline_stages=1"])
        torch.manual_seed(0)
        model = build_model(cfg.model)
        params = sum(p.numel() for p in model.parameters())
        engine, *_ = deepspeed.initialize(model=model, config=deepspeed_config(cfg, env.world_size),
                                          model_parameters=optimizer_groups(model, cfg.optim.weight_decay))
        del model
        # Between the second step's backward and its update: moments and master weights exist
        # (made by the first update) and so do this step's gradients.
        _one_step(engine, cfg)
        _backward(engine, cfg)
        gc.collect()
        mine = engine_state_bytes(engine)
        engine.step()
        every = all_gather_object(mine)
        results.append({"stage": stage, "dtype": dtype, "params": params, "ranks": env.world_size,
                        "bytes_per_rank": [r["bytes"] for r in every], "by_dtype": every[0]["by_dtype"],
                        "by_holder": every[0]["by_holder"]})
        if hasattr(engine, "destroy"):
            engine.destroy()
        del engine
        gc.collect()
    if env.is_main:
        Path(out).write_text(json.dumps(results))
    shutdown()


def _wait_all(procs: list[subprocess.Popen], timeout: float) -> list[Optional[int]]:
    """Exit codes once every rank has finished; stops early when one fails (the others would
    wait for it in a collective until the timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
            return codes
        time.sleep(0.2)
    return [p.poll() for p in procs]


def measure_zero_state(config: Union[str, Path], ranks: int = 2, stages: Sequence[int] = (0, 1, 2, 3),
                       dtype: str = "bf16", overrides: Sequence[str] = (), timeout: float = 600) -> list[dict]:
    """Runs `ranks` processes on this machine and returns, per stage, the bytes each rank holds.
    `overrides`: dotted config overrides (parallel.reduce_bucket_size=5e7, model.dim=...)."""
    if ranks < 1:
        raise UserError(f"--ranks must be at least 1, got {ranks}")
    if bad := [s for s in stages if s not in (0, 1, 2, 3)]:
        raise UserError(f"--stages: ZeRO stages are 0..3, got {bad}")
    if not Path(config).is_file():
        raise UserError(f"config {config} does not exist")

    # a bad config or dtype (fp16 without a GPU) fails here, not once in every rank
    deepspeed_config(load_config(config, [*overrides, f"train.dtype={dtype}", "parallel.pipeline_stages=1"]), ranks)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="blt-zero.") as tmp:
        out = Path(tmp) / "result.json"
        code = "import sys, json, blt_dist.bench.zero_memory as z; z._rank_main(*json.loads(sys.argv[1]))"
        request = json.dumps([str(config), list(overrides), list(stages), dtype, str(out)])
        procs = []
        for rank in range(ranks):
            env = {**os.environ, **local_rank_env(rank, ranks, port),
                   "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
            log = open(Path(tmp) / f"rank{rank}.log", "wb")
            procs.append(subprocess.Popen([sys.executable, "-c", code, request],
                                          env=env, stdout=log, stderr=subprocess.STDOUT))
        try:
            codes = _wait_all(procs, timeout)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        if any(code != 0 for code in codes) or not out.exists():
            tail = (Path(tmp) / "rank0.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"ZeRO memory measurement failed (exit codes {codes}); rank 0 log:\n{tail}")
        return json.loads(out.read_text())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="a model config, e.g. configs/blt/125m.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value",
                        help="dotted config overrides, e.g. parallel.reduce_bucket_size=5e7")
    parser.add_argument("--ranks", type=int, default=2, help="processes (data-parallel ranks) on this machine (default 2)")
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3], help="ZeRO stages (default 0 1 2 3)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16", help="train.dtype of the engines (default bf16)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the results as JSON")


def run(args: argparse.Namespace) -> int:
    results = measure_zero_state(args.config, args.ranks, args.stages, args.dtype, args.overrides)
    for r in results:
        shown = ", ".join(f"{b / 2**20:.1f}" for b in r["bytes_per_rank"])
        print(f"ZeRO-{r['stage']} {r['dtype']}: {shown} MiB per rank ({r['params'] / 1e6:.1f}M params, "
              f"{max(r['bytes_per_rank']) / r['params']:.2f} bytes/param); largest holders on rank 0:")
        for holder, nbytes in list(r["by_holder"].items())[:6]:
            print(f"    {nbytes / 2**20:10.1f} MiB  {holder}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0
