"""Host syncs per training step, and steps/s: what `blt-dist train`'s step costs a GPU's launch queue.

    python tools/host_syncs.py configs/blt/tiny.yaml [key=value ...] [--steps 5] [--documents 3] [--json]

A host sync is a Python read of a value computed on the device (`.item()`, `.tolist()`,
`bool()`, `float()`, `int()`, `.numpy()`): on a GPU each one waits for every kernel queued
before it. On CPU nothing waits, so they are counted instead of timed: a TorchFunctionMode
follows every tensor derived from the step's device inputs (`.to(device)`) and the model's
parameters, and counts each such read, by the line of blt_dist/ that made it. One process,
gloo, the real DeepSpeed engine and training.step.plain_step on synthetic loader-shaped batches
(bench/workloads.py). steps/s is measured with the counter off.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import weakref
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

from blt_dist.bench.workloads import blt_batch, bpe_batch  # noqa: E402
from blt_dist.config import load_config  # noqa: E402
from blt_dist.model import batch_facts, build_model  # noqa: E402
from blt_dist.parallel.collectives import shutdown  # noqa: E402
from blt_dist.parallel.engine import deepspeed_config, free_port, init_distributed, initialize_engine  # noqa: E402
from blt_dist.training.step import plain_step  # noqa: E402

# Python reads of a value, and ops whose output shape or result depends on values (they wait too)
READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "equal", "nonzero",
         "unique", "masked_select", "allclose"}


class HostSyncCounter(TorchFunctionMode):
    """Counts reads of device-derived tensor values, by the blt_dist/ line that made them."""

    def __init__(self, parameters):
        super().__init__()
        self.tainted: dict[int, weakref.ref] = {}  # by id: tensors compare elementwise, not by identity
        self.counts: Counter = Counter()
        for p in parameters:
            self.taint(p)

    def taint(self, t: torch.Tensor) -> None:
        key = id(t)
        self.tainted[key] = weakref.ref(t, lambda _, key=key: self.tainted.pop(key, None))

    def is_tainted(self, t: torch.Tensor) -> bool:
        ref = self.tainted.get(id(t))
        return ref is not None and ref() is t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        inputs = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
        derived = any(self.is_tainted(x) for x in inputs)
        if name in READS and derived:
            self.counts[f"{name} at {self.call_site()}"] += 1
        out = func(*args, **kwargs)
        if derived or name == "to":
            for x in tree_flatten(out)[0]:
                if isinstance(x, torch.Tensor):
                    self.taint(x)
        return out

    @staticmethod
    def call_site() -> str:
        for frame in reversed(traceback.extract_stack()[:-2]):
            if "/blt_dist/" in frame.filename:
                return f"{Path(frame.filename).relative_to(REPO)}:{frame.lineno}"
        return "elsewhere"


def split_documents(batch: dict, documents: int) -> torch.Tensor:
    """doc_ids for `documents` documents per row, as packing makes them (a BLT's documents start
    at a patch start): the loader's common case, where the attention set-up has masks to build."""
    rows, length = batch["doc_ids"].shape
    doc_ids = torch.zeros(rows, length, dtype=torch.int64)
    for row in range(rows):
        if "patch_lengths" in batch:
            starts = torch.cumsum(batch["patch_lengths"][row], 0)[:-1]
            cuts = [int(starts[len(starts) * d // documents]) for d in range(1, documents)]
        else:
            cuts = [length * d // documents for d in range(1, documents)]
        for cut in cuts:
            doc_ids[row, cut:] += 1
    return doc_ids


def measure(config: str, overrides: list[str], steps: int, documents: int = 1) -> dict:
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    cfg = load_config(config, overrides)
    env = init_distributed("gloo")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    engine = initialize_engine(model, cfg.optim.weight_decay, deepspeed_config(cfg, 1))
    family, mb = cfg.model.family, cfg.train.micro_batch_size
    if family == "blt":
        batch = blt_batch(cfg.data.byte_capacity, mb)
    else:
        length = cfg.data.tokens_per_sample if family == "bpe" else cfg.data.seq_len
        batch = bpe_batch(length, mb, cfg.model.vocab_size)
    if documents > 1:
        batch["doc_ids"] = split_documents(batch, documents)
    batch["facts"] = batch_facts(batch, family)  # as the loader makes them
    batches = [batch] * cfg.train.grad_accum
    plain = cfg.parallel.zero_stage == 0 and cfg.train.dtype == "fp32"
    plain_step(engine, batches, family, env.device, plain, False)  # warm-up
    counter = HostSyncCounter(list(engine.module.parameters()))
    with counter:
        for _ in range(steps):
            plain_step(engine, batches, family, env.device, plain, False)
    started = time.perf_counter()
    for _ in range(steps):
        plain_step(engine, batches, family, env.device, plain, False)
    seconds = time.perf_counter() - started
    shutdown()
    return {"config": config, "overrides": overrides, "steps": steps, "documents_per_row": documents,
            "host_syncs_per_step": sum(counter.counts.values()) / steps,
            "by_site": {site: n / steps for site, n in counter.counts.most_common()},
            "steps_per_s": steps / seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--documents", type=int, default=1, help="documents per row (packed batches: 3)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = measure(args.config, args.overrides, args.steps, args.documents)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{args.config}: {result['host_syncs_per_step']:g} host syncs per step, {result['steps_per_s']:.2f} steps/s")
    for site, n in result["by_site"].items():
        print(f"  {n:g}  {site}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
