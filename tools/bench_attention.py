"""Training-step speed of tiny BLT (configs/blt/tiny.yaml's model) with dense vs auto attention.

    .venv/bin/python tools/bench_attention.py [--capacities 1024 2048 4096 8192] [--threads 1 2]
        [--bytes-per-step 8192] [--steps 2] [--modes dense auto]

For each byte capacity C (patches_per_sample = C / 4, as tiny's 512 / 128), one micro-batch of
bytes_per_step / C samples, fp32, one train step = forward + backward + AdamW. Layouts are
synthetic but shaped like the loader's: documents of random length (mean ~1.5 KB, so longer
rows hold several), patches of 1..16 bytes (mean ~4.5) cut at every document start, trailing
empty patches and padding. Prints the best of `steps` timed steps (after one warm-up) as
bytes/s and the real-FLOP GFLOP/s of blt_dist/flops.py. Not a test: the machine may be shared,
so compare columns measured in the same run.
"""
from __future__ import annotations

import argparse
import dataclasses
import random
import time

import torch
import torch.nn.functional as F

from blt_dist import flops
from blt_dist.config import load_config
from blt_dist.model import build_model
from blt_dist.vocab import BOS_ID, EOS_ID, OFFSET, PAD_ID

MAX_PATCH = 16


def synthetic_batch(seed: int, batch: int, capacity: int, num_patches: int):
    """tokens, patch_lengths, doc_ids as the loader would give them (see the module docstring)."""
    rng = random.Random(seed)
    tokens = torch.full((batch, capacity), PAD_ID)
    doc_ids = torch.full((batch, capacity), -1)
    lengths = torch.zeros(batch, num_patches, dtype=torch.long)
    for row in range(batch):
        seq, docs, doc = [], [], 0
        while len(seq) < capacity:
            body = [rng.randint(OFFSET, 259) for _ in range(int(rng.expovariate(1 / 1500)) + 8)]
            seq += [BOS_ID, *body, EOS_ID]
            docs += [doc] * (len(body) + 2)
            doc += 1
        real = capacity - rng.randint(0, capacity // 16)  # some padding at the end
        patches, current = [], 0
        for tok in seq[:real]:
            if current and (tok == BOS_ID or current == MAX_PATCH or rng.random() < 1 / 4.5):
                patches.append(current)
                current = 0
            current += 1
        patches.append(current)
        while len(patches) > num_patches:  # more patches than slots: drop the row's last bytes
            real -= patches.pop()
        tokens[row, :real] = torch.tensor(seq[:real])
        doc_ids[row, :real] = torch.tensor(docs[:real])
        lengths[row, : len(patches)] = torch.tensor(patches)
    return tokens, lengths, doc_ids


def step_seconds(model, batch, steps: int) -> float:
    tokens, lengths, doc_ids = batch
    targets = tokens.roll(-1, dims=1)
    weight = ((doc_ids >= 0) & (doc_ids.roll(-1, dims=1) == doc_ids)).float()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    best = float("inf")
    for i in range(steps + 1):  # the first step warms up (allocator, thread pools)
        start = time.perf_counter()
        logits = model(tokens, lengths, doc_ids)
        loss = (F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none") * weight.flatten()).sum() \
            / weight.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i:
            best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/blt/tiny.yaml")
    parser.add_argument("--capacities", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--modes", nargs="+", default=["dense", "auto"])
    parser.add_argument("--bytes-per-step", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()

    print(f"torch {torch.__version__}; {args.config} model, fp32, train step = fwd + bwd + AdamW, "
          f"{args.bytes_per_step} byte slots per step, best of {args.steps}")
    header = f"{'threads':>7} {'capacity':>8} {'patches':>7} " + " ".join(
        f"{mode + ' B/s':>11} {mode + ' GF/s':>10}" for mode in args.modes)
    print(header + (f" {'speed-up':>8}" if len(args.modes) == 2 else ""))
    for threads in args.threads:
        torch.set_num_threads(threads)
        for capacity in args.capacities:
            patches = capacity // 4
            cfg = load_config(args.config, [f"data.byte_capacity={capacity}", f"data.patches_per_sample={patches}"])
            batch_size = max(1, args.bytes_per_step // capacity)
            batch = synthetic_batch(capacity, batch_size, capacity, patches)
            real_bytes = int((batch[2] >= 0).sum())
            shape = flops.SampleShape.from_data(cfg.data)
            flops_per_byte = flops.train_flops_per_byte(cfg.model, shape)
            row, rates = f"{threads:>7} {capacity:>8} {patches:>7}", []
            for mode in args.modes:
                torch.manual_seed(0)
                model = build_model(dataclasses.replace(cfg.model, attention=mode))
                seconds = step_seconds(model, batch, args.steps)
                rates.append(real_bytes / seconds)
                row += f" {rates[-1]:>11,.0f} {rates[-1] * flops_per_byte / 1e9:>10.1f}"
            if len(rates) == 2:
                row += f" {rates[1] / rates[0]:>7.2f}x"
            print(row, flush=True)


if __name__ == "__main__":
    main()
