"""Where the entropy pass's time goes: torch.profiler over `blt-dist entropies`'s own function
(document_entropies, the tiny entropy model), grouped into matmuls, attention and the rest, with
the MFU of the whole pass and of its matmuls alone (a profile, not a test).

    python tools/profile_entropy_pass.py [--kb 200] [--dtype auto|fp32|bf16] [--top 15]

MFU is against the matmul peak blt-dist measures for the dtype (blt_dist.hardware.peak_flops),
the same peak the trainer and `blt-dist bench` use. The FLOPs counted are the model's useful
forward FLOPs per output byte (flops.py), as in the bench's entropy-pass row.
"""
from __future__ import annotations

import argparse
import math
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from blt_dist.bench.datapath import measure_entropy_pass, synthetic_documents
from blt_dist.config import load_config
from blt_dist.data.entropies import document_entropies, resolve_dtype
from blt_dist.hardware import peak_flops
from blt_dist.model import build_model

MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm")
ATTENTION = ("aten::_scaled_dot_product", "aten::scaled_dot_product", "flex_attention", "aten::_flash", "sdpa")


def kind(name: str) -> str:
    if any(name.startswith(m) for m in MATMUL):
        return "matmul"
    if any(a in name for a in ATTENTION):
        return "attention"
    return "other"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kb", type=float, default=200.0, help="KB of synthetic documents")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 where native) | fp32 | bf16")
    parser.add_argument("--top", type=int, default=15, help="ops listed by self CPU time")
    args = parser.parse_args(argv)
    device = torch.device("cpu")
    dtype = resolve_dtype(args.dtype, device)

    timed = measure_entropy_pass(args.kb, dtype, device)  # the bench's row, unprofiled
    peak, peak_source = peak_flops(dtype, device)
    print(f"entropy pass ({dtype}, {timed['bytes'] / 1e3:.0f} KB): {timed['bytes_per_s'] / 1e3:.1f} KB/s, "
          f"{timed['flops_per_s'] / 1e9:.1f} GFLOP/s, MFU {100 * timed['flops_per_s'] / peak:.1f}% "
          f"of {peak / 1e12:.2f} TFLOP/s ({peak_source})")

    cfg = load_config("configs/entropy/tiny.yaml").model
    torch.manual_seed(0)
    model = build_model(cfg)
    docs = [d.encode() for d in synthetic_documents(int(args.kb * 1e3), seed=1)]
    document_entropies(model, docs[:1], cfg.attention_window, dtype=dtype)  # warm-up
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False, with_flops=True) as prof:
        start = time.perf_counter()
        document_entropies(model, docs, cfg.attention_window, dtype=dtype)
        wall = time.perf_counter() - start
    events = prof.key_averages()
    self_us = defaultdict(float)
    matmul_flops = 0.0
    for e in events:
        self_us[kind(e.key)] += e.self_cpu_time_total
        if kind(e.key) == "matmul":
            matmul_flops += e.flops or 0.0
    total = sum(self_us.values())
    print(f"\nprofiled wall {wall:.2f} s (profiler overhead included); self CPU time by kind:")
    for name in ("matmul", "attention", "other"):
        print(f"  {name:<10} {self_us[name] / 1e6:7.2f} s  {100 * self_us[name] / total:5.1f}%")
    matmul_s = self_us["matmul"] / 1e6
    if matmul_s > 0 and matmul_flops:
        print(f"matmuls alone: {matmul_flops / 1e9:.1f} GFLOP in {matmul_s:.2f} s = {matmul_flops / matmul_s / 1e9:.1f} "
              f"GFLOP/s, {100 * matmul_flops / matmul_s / peak:.1f}% of the peak (their shapes are small: "
              f"width {cfg.dim})")
    print(f"\ntop {args.top} ops by self CPU time:")
    rows = sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]
    for e in rows:
        print(f"  {e.key[:48]:<48} {e.self_cpu_time_total / 1e3:9.1f} ms  {100 * e.self_cpu_time_total / total:5.1f}%  "
              f"x{e.count}")
    if not math.isfinite(peak):
        print("(no measured peak for this dtype)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
