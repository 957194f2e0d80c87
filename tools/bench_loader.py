"""Loader throughput against what training consumes (a benchmark, not a test).

    python tools/bench_loader.py [--mb 4] [--seconds 4]

Builds, in a temporary directory, the whole data path at small scale:
  byte dataset   `prepare` on ~MB of data/corpus/train (synthetic text when the corpus is absent)
  entropy model  a random tiny entropy model export (its entropies are noise, but the loader
                 does the same work for any values)
  entropy shards `compute_entropy_dataset`, the code path of `blt-dist entropies`
  threshold      `calibrate_threshold` for 4.5 bytes per patch
  tokenizer      a 4096-token sentencepiece BPE (configs/bpe/tiny.yaml's vocabulary)
then prints samples/s and MB/s (raw bytes predicted) of the BLT loader with 0 and 2 workers,
the byte loader and the BPE loader, all at the tiny configs' shapes; and the training
consumption rate of configs/blt/tiny.yaml (forward + backward + AdamW on a loader batch, raw
bytes per second). The ratio loader / consumption should be >= 20x, so the loader never shows
up in a step's time even when the trainer is far faster than this machine's CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from blt_dist.config import Config, load_config  # noqa: E402
from blt_dist.data.calibrate import calibrate_threshold  # noqa: E402
from blt_dist.data.entropies import compute_entropy_dataset  # noqa: E402
from blt_dist.data.loader import ENTROPY_FORMAT, Loader, LoaderSpec  # noqa: E402
from blt_dist.data.prepare import prepare  # noqa: E402
from blt_dist.data.shards import ByteDataset, iter_stream  # noqa: E402
from blt_dist.data.tokenizer import train_tokenizer  # noqa: E402
from blt_dist.export import save_export  # noqa: E402
from blt_dist.loss import loss_and_sums  # noqa: E402
from blt_dist.model import ModelConfig, build_model  # noqa: E402
from blt_dist.vocab import encode_document  # noqa: E402

TARGET_RATIO = 20.0
CORPUS = REPO / "data" / "corpus" / "train"


def write_inputs(root: Path, megabytes: float) -> str:
    """~megabytes of JSONL documents per content-type directory under root. Returns a description."""
    budget = int(megabytes * 1e6)
    types = sorted(p for p in CORPUS.iterdir() if p.is_dir()) if CORPUS.is_dir() else []
    if types:
        for type_dir in types:
            share, written = budget // len(types), 0
            out = root / type_dir.name
            out.mkdir(parents=True)
            with open(out / "part.jsonl", "wb") as f:
                files = [p.read_bytes().splitlines() for p in sorted(type_dir.glob("*.jsonl"))]
                # round-robin over the type's files, so every source is represented
                for row in range(max(len(lines) for lines in files)):
                    for lines in files:
                        if row < len(lines) and written < share:
                            f.write(lines[row] + b"\n")
                            written += len(lines[row])
        return f"data/corpus/train ({', '.join(t.name for t in types)})"
    rng = np.random.default_rng(0)
    words = "the byte latent transformer reads patches of bytes cut where the next byte is hard".split()
    (root / "synthetic").mkdir(parents=True)
    with open(root / "synthetic" / "part.jsonl", "w") as f:
        written = 0
        while written < budget:
            text = " ".join(rng.choice(words, int(rng.integers(20, 800))))
            f.write(json.dumps({"text": text}) + "\n")
            written += len(text)
    return "synthetic text (data/corpus absent)"


def tiny_entropy_export(out: Path) -> None:
    torch.manual_seed(0)
    cfg = Config()
    cfg.model = ModelConfig(family="entropy", dim=32, n_layers=1, n_heads=2, window=64)
    model = build_model(cfg.model)
    with torch.no_grad():
        model.output.weight.mul_(4.0)  # spread a random model's entropies so thresholds separate
    save_export(model.state_dict(), cfg, out)


def calibrated_threshold(entropy_dir: Path, target: float) -> float:
    dataset = ByteDataset(entropy_dir, format=ENTROPY_FORMAT)
    docs, nbytes = [], 0
    for stream in dataset.streams("train"):
        for sample in iter_stream(stream.path):
            docs.append((encode_document(sample["data"]), sample["entropies"]))
            nbytes += len(sample["data"])
            if nbytes > 2_000_000:
                break
    return calibrate_threshold(docs, "entropy", target_mean_size=target, max_patch_length=16).threshold


def raw_bytes(batch) -> int:
    return int(batch["target_bytes"].sum())


def measure_loader(spec: LoaderSpec, num_workers: int, seconds: float) -> tuple[float, float]:
    """(samples/s, MB/s of raw bytes), after the first batch (worker start-up) is out of the way."""
    loader = Loader(spec, num_workers=num_workers)
    next(loader)
    batches = samples = nbytes = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or batches < 3:
        batch = next(loader)
        batches += 1
        samples += batch["tokens"].shape[0]
        nbytes += raw_bytes(batch)
    elapsed = time.perf_counter() - start
    loader.close()
    return samples / elapsed, nbytes / elapsed / 1e6


def measure_training(spec: LoaderSpec, steps: int) -> tuple[float, float]:
    """Raw bytes per second that configs/blt/tiny.yaml consumes (fwd + bwd + AdamW, fp32), as
    (best step, median step). The best step is the fastest the trainer can consume here, which
    makes the loader ratio conservative when other jobs share the cores."""
    cfg = load_config(REPO / "configs" / "blt" / "tiny.yaml")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    batch = next(Loader(spec))

    def step():
        logits = model(batch["tokens"], batch["patch_lengths"], batch["doc_ids"])
        loss, _ = loss_and_sums(logits, batch["targets"], batch["target_bytes"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocations, AdamW state
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return raw_bytes(batch) / min(times), raw_bytes(batch) / float(np.median(times))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=4.0, help="MB of text in the temporary dataset")
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds per loader measurement")
    parser.add_argument("--steps", type=int, default=8, help="training steps timed for the consumption rate")
    args = parser.parse_args(argv)

    blt_cfg = load_config(REPO / "configs" / "blt" / "tiny.yaml")
    bpe_cfg = load_config(REPO / "configs" / "bpe" / "tiny.yaml")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads")
    with tempfile.TemporaryDirectory(prefix="bench_loader.") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        source = write_inputs(tmp / "in", args.mb)
        prepare([tmp / "in"], tmp / "bytes", val_fraction=0.0, shard_size="4mb", progress=False)
        byte_ds = ByteDataset(tmp / "bytes")
        total_bytes = sum(s.bytes for s in byte_ds.streams())
        print(f"byte dataset: {total_bytes / 1e6:.1f} MB from {source}, {time.perf_counter() - t0:.1f} s")

        tiny_entropy_export(tmp / "entropy_model")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a 30k-parameter model: a second thread only adds contention
        run = compute_entropy_dataset(tmp / "entropy_model", tmp / "bytes", tmp / "entropies", progress=False)
        torch.set_num_threads(threads)
        print(
            f"entropies (tiny random model, window 64, 1 thread): {run.bytes / 1e6:.1f} MB in {run.seconds:.1f} s "
            f"= {run.bytes / run.seconds / 1e6:.2f} MB/s"
        )
        threshold = calibrated_threshold(tmp / "entropies", blt_cfg.data.patching.target_mean_size)
        t0 = time.perf_counter()
        train_tokenizer(tmp / "bytes", tmp / "bpe.model", vocab_size=bpe_cfg.model.vocab_size)
        print(f"threshold {threshold} (4.5 bytes/patch); BPE tokenizer trained in {time.perf_counter() - t0:.1f} s")

        d, common = blt_cfg.data, dict(split="train", micro_batch_size=blt_cfg.train.micro_batch_size, seed=0)
        patching = dict(mode="entropy", threshold=threshold, threshold_r=None, patch_size=4, max_patch_length=16)
        blt_spec = LoaderSpec(
            path=str(tmp / "entropies"), family="blt", sample_len=d.byte_capacity,
            patches_per_sample=d.patches_per_sample, patching=patching, **common,
        )
        specs = {
            "blt, 0 workers": (blt_spec, 0),
            "blt, 2 workers": (blt_spec, 2),
            "bytes (entropy model), 0 workers": (
                LoaderSpec(path=str(tmp / "bytes"), family="bytes", sample_len=d.byte_capacity, **common), 0
            ),
            "bpe, 0 workers": (
                LoaderSpec(
                    path=str(tmp / "bytes"), family="bpe", sample_len=bpe_cfg.data.tokens_per_sample,
                    tokenizer=str(tmp / "bpe.model"), **common,
                ),
                0,
            ),
        }
        print(f"\n{'loader':34s} {'samples/s':>10s} {'MB/s':>8s}   (micro batch {common['micro_batch_size']})")
        rates = {}
        for name, (spec, workers) in specs.items():
            samples_s, mb_s = measure_loader(spec, workers, args.seconds)
            rates[name] = mb_s
            print(f"{name:34s} {samples_s:10.0f} {mb_s:8.2f}")

        best, median = (rate / 1e6 for rate in measure_training(blt_spec, args.steps))
        print(
            f"\ntraining configs/blt/tiny.yaml (fwd+bwd+AdamW, fp32, {torch.get_num_threads()} threads): "
            f"{best:.4f} MB/s of raw bytes at the fastest of {args.steps} steps (median {median:.4f})"
        )
        consumed = best
        for name in ("blt, 0 workers", "blt, 2 workers"):
            ratio = rates[name] / consumed
            verdict = "ok" if ratio >= TARGET_RATIO else f"BELOW the {TARGET_RATIO:.0f}x target"
            print(f"{name}: {ratio:.0f}x the consumption rate ({verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
