"""Pipeline parallelism (blt_dist/parallel/pipeline.py).

Single process: the sequential twin computes the plain model's logits bit for bit and the
same gradients (also with DeepSpeed's activation checkpointing); state-dict names map both
ways; the FLOP balance finds the best cut. Two processes (slow): a 2-stage DeepSpeed pipeline
(ZeRO-1, fp32) and the plain model under a DeepSpeed engine, same seed and batches, give the
same loss at every step and the same weights after it; the pipeline checkpoint consolidates
into a plain state dict that reproduces the pipeline's logits.

This file is also the worker script of the slow test: `python tests/test_pipeline.py MODE OUT`.
"""
from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from blt_dist.config import load_config
from blt_dist.data.packing import Packer
from blt_dist.flops import SampleShape, blt_forward_flops
from blt_dist.model import build_model
from blt_dist.model.loss import loss_and_sums
from blt_dist.model.weights import load_export
from blt_dist.parallel.pipeline import (
    PipelineLoss,
    balanced_boundaries,
    build_pipeline,
    consolidate_pipeline_checkpoint,
    from_model_state_dict,
    layer_flops,
    pipeline_batch,
    sequential_twin,
    to_model_state_dict,
)
from blt_dist.training.export import save_export
from blt_dist.vocab import BOS_ID, EOS_ID, OFFSET, PAD_ID

REPO = Path(__file__).resolve().parents[1]
SEED = 7
STEPS = 3
# Tiny configs shrunk further: two micro-batches of two samples per step, a few dozen positions.
RUN = ["train.micro_batch_size=2", "train.grad_accum=2", "parallel.zero_stage=1", "train.dtype=fp32"]
CONFIGS = {
    "blt": ("configs/blt/tiny.yaml", ["data.byte_capacity=64", "data.patches_per_sample=24",
                                      "model.hash.buckets=128", *RUN]),
    "bpe": ("configs/bpe/tiny.yaml", ["data.tokens_per_sample=32", "model.n_layers=3",
                                      "model.vocab_size=512", *RUN]),
}


def tiny_config(family: str, pipeline_stages: int = 1):
    """family "blt-meta": the tiny BLT in the HF/Meta layout (no encoder projection at its widths)."""
    path, overrides = CONFIGS[family.split("-")[0]]
    layout = ["model.layout=meta", "model.hash.functions=2"] if family == "blt-meta" else []
    return load_config(REPO / path, [*overrides, *layout, f"parallel.pipeline_stages={pipeline_stages}"])


def synthetic_batches(cfg, count: int, seed: int) -> list[dict]:
    """`count` micro-batches cut by the real packer from random documents: several documents
    per row, rows that start mid-document, BLT patches of 1..6 bytes and padding."""
    rng = np.random.default_rng(seed)
    family, mb = cfg.model.family, cfg.train.micro_batch_size
    if family == "blt":
        packer = Packer(cfg.data.byte_capacity, bos_id=BOS_ID, pad_id=PAD_ID,
                        patches_per_sample=cfg.data.patches_per_sample)
    else:
        packer = Packer(cfg.data.tokens_per_sample, bos_id=BOS_ID, pad_id=PAD_ID)
    batches, doc = [], 0
    for _ in range(count):
        samples = []
        while len(samples) < mb:
            while packer.needs_more():
                length = int(rng.integers(5, 40))
                body = rng.integers(OFFSET, cfg.model.vocab_size, size=length)
                tokens = np.concatenate([[BOS_ID], body, [EOS_ID]]).astype(np.int64)
                nbytes = (tokens >= OFFSET) * (1 if family == "blt" else rng.integers(1, 6, size=len(tokens)))
                starts = None
                if family == "blt":
                    starts = np.zeros(len(tokens), dtype=bool)
                    position = 0
                    while position < len(tokens):
                        starts[position] = True
                        position += int(rng.integers(1, 7))
                packer.add(doc, tokens, nbytes.astype(np.int64), starts)
                doc += 1
            samples.append(packer.cut())
        batches.append({key: torch.from_numpy(np.stack([s[key] for s in samples])) for key in samples[0]})
    return batches


def plain_logits(model, batch: dict, family: str) -> torch.Tensor:
    inputs, _ = pipeline_batch(batch, family)
    return model(*inputs)


# ---------------------------------------------------------------------------------------------
# Single process


@pytest.fixture(scope="module")
def world_of_one():
    """A gloo process group of one rank: PipelineModule needs one even with a single stage."""
    from blt_dist.parallel.collectives import shutdown as shutdown_distributed
    from blt_dist.parallel.engine import free_port, init_distributed

    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "TORCH_EXTENSIONS_DIR")
    saved = {key: os.environ.get(key) for key in keys}
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    init_distributed("gloo")
    yield
    shutdown_distributed()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "act-ckpt"])
@pytest.mark.parametrize("family", ["blt", "blt-meta", "bpe"])
def test_twin_matches_plain_model(world_of_one, family, checkpointing):
    cfg = tiny_config(family)
    family = cfg.model.family
    pipe = build_pipeline(cfg.model, 1, checkpointing, SEED, SampleShape.from_data(cfg.data))
    torch.manual_seed(SEED)
    model = build_model(cfg.model)
    batch = synthetic_batches(cfg, 1, seed=1)[0]
    inputs, labels = pipeline_batch(batch, family)

    expected = model(*inputs)
    torch.testing.assert_close(sequential_twin(pipe)(inputs), expected, rtol=0, atol=0)

    # Gradients through the PipelineModule's own forward (DeepSpeed's checkpointing when on).
    loss_and_sums(expected, *labels)[0].backward()
    pipe.loss_fn(pipe(inputs), labels).backward()
    pipe_grads = to_model_state_dict({name: p.grad for name, p in pipe.named_parameters()})
    model_grads = {name: p.grad for name, p in model.named_parameters()}
    assert pipe_grads.keys() == model_grads.keys()
    for name, grad in model_grads.items():
        torch.testing.assert_close(pipe_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("family", ["blt", "blt-meta", "bpe"])
def test_state_dict_names_round_trip(world_of_one, family):
    cfg = tiny_config(family)
    pipe = build_pipeline(cfg.model, 1, False, SEED)
    torch.manual_seed(SEED + 1)  # different weights, so the load below has to move every tensor
    model = build_model(cfg.model)

    model_state = to_model_state_dict(pipe.state_dict())
    assert model_state.keys() == model.state_dict().keys()
    model.load_state_dict(model_state, strict=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, model_state[name]), name

    pipe_state = from_model_state_dict(model.state_dict(), pipe)
    assert pipe_state.keys() == pipe.state_dict().keys()
    assert all(torch.equal(pipe_state[key], value) for key, value in pipe.state_dict().items())
    with pytest.raises(KeyError, match="pipeline layer"):
        to_model_state_dict({"encoder.byte_embedding.weight": torch.zeros(1)})


def test_pipeline_loss_is_blt_loss_and_keeps_sums():
    cfg = tiny_config("blt")
    batches = synthetic_batches(cfg, 2, seed=3)
    loss_fn = PipelineLoss()
    expected_sums = None
    for batch in batches:
        logits = torch.randn(*batch["tokens"].shape, 260)
        _, labels = pipeline_batch(batch, "blt")
        loss, sums = loss_and_sums(logits, *labels)
        assert torch.equal(loss_fn(logits, labels), loss)
        expected_sums = sums if expected_sums is None else expected_sums.add(sums)
    assert loss_fn.take_sums() == expected_sums
    assert loss_fn.take_sums().targets == 0


def _best_cut_by_brute_force(weights, stages):
    best = None
    for cuts in itertools.combinations(range(1, len(weights)), stages - 1):
        bounds = [0, *cuts, len(weights)]
        heaviest = max(sum(weights[a:b]) for a, b in zip(bounds, bounds[1:]))
        best = heaviest if best is None else min(best, heaviest)
    return best


def test_balanced_boundaries_minimise_the_heaviest_stage():
    assert balanced_boundaries([1, 1, 1, 1], 2) == [0, 2, 4]
    assert balanced_boundaries([5, 1, 1, 1, 5], 2) == [0, 2, 5]  # 6 | 7; the tie goes to the earliest cut
    assert balanced_boundaries([0, 1, 1, 1, 9], 2) == [0, 4, 5]  # uniform layer counts would give 2 | 10
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 9)
        weights = [rng.choice([0.0, rng.random(), 10 * rng.random()]) for _ in range(n)]
        stages = rng.randint(1, n)
        bounds = balanced_boundaries(weights, stages)
        assert bounds[0] == 0 and bounds[-1] == n and len(bounds) == stages + 1
        assert all(a < b for a, b in zip(bounds, bounds[1:]))  # no empty stage
        heaviest = max(sum(weights[a:b]) for a, b in zip(bounds, bounds[1:]))
        assert heaviest == pytest.approx(_best_cut_by_brute_force(weights, stages))
    with pytest.raises(ValueError):
        balanced_boundaries([1, 1], 3)


def test_blt_layer_flops_split_the_component_totals():
    cfg = load_config(REPO / "configs/blt/1b.yaml")
    shape = SampleShape.from_data(cfg.data)
    per_layer = layer_flops(cfg.model, shape)
    components, _ = blt_forward_flops(cfg.model, shape)
    assert len(per_layer) == cfg.model.n_layers + 2
    assert sum(per_layer) == pytest.approx(sum(components.values()))
    # The byte-level decoder layer costs several latent blocks: cutting by FLOPs gives the
    # busiest stage clearly less work than cutting by layer count.
    def heaviest(bounds):
        return max(sum(per_layer[a:b]) for a, b in zip(bounds, bounds[1:]))

    by_count = [round(i * len(per_layer) / 4) for i in range(5)]
    assert heaviest(balanced_boundaries(per_layer, 4)) < 0.85 * heaviest(by_count)


# ---------------------------------------------------------------------------------------------
# Two processes: the pipeline against the plain model


def run_worker(mode: str, out: Path) -> None:
    """One rank of `mode`: 'pipeline' (a PipelineEngine with one stage per rank) or 'reference'
    (plain model, DeepSpeed engine, one process). Writes losses, checkpoint and logits under
    out/<run>/<family>. The 3-stage run (BLT only) has a middle stage of latent blocks alone,
    which passes byte_states and its gradient straight through, under activation checkpointing."""
    import deepspeed
    import torch.distributed as dist

    from blt_dist.parallel.collectives import shutdown as shutdown_distributed
    from blt_dist.parallel.engine import deepspeed_config, init_distributed, optimizer_groups

    env = init_distributed("gloo")
    stages = env.world_size if mode == "pipeline" else 1
    families = ["blt"] if stages > 2 else list(CONFIGS)
    for family in families:
        cfg = tiny_config(family, pipeline_stages=stages)
        gas = cfg.train.grad_accum
        batches = synthetic_batches(cfg, STEPS * gas + 1, seed=11)
        train, eval_batch = batches[:-1], batches[-1]
        ds = deepspeed_config(cfg, env.world_size)
        family_dir = out / run_name(mode, stages) / family
        family_dir.mkdir(parents=True, exist_ok=True)
        losses = []
        if mode == "pipeline":
            pipe = build_pipeline(cfg.model, stages, stages > 2, SEED, SampleShape.from_data(cfg.data))
            engine, *_ = deepspeed.initialize(model=pipe, config=ds,
                                              model_parameters=optimizer_groups(pipe, cfg.optim.weight_decay))
            for step in range(STEPS):
                micro = [pipeline_batch(b, family) for b in train[step * gas:(step + 1) * gas]]
                losses.append(float(engine.train_batch(iter(micro))))
            engine.save_checkpoint(str(family_dir / "ckpt"), tag="final")
            _, logits = engine.eval_batch(iter([pipeline_batch(eval_batch, family)]), return_logits=True,
                                          num_micro_batches=1)
            if engine.is_last_stage():
                torch.save(logits, family_dir / "pipeline_logits.pt")
                (family_dir / "parts.json").write_text(json.dumps(pipe.parts))
        else:
            torch.manual_seed(SEED)
            model = build_model(cfg.model)
            engine, *_ = deepspeed.initialize(model=model, config=ds,
                                              model_parameters=optimizer_groups(model, cfg.optim.weight_decay))
            for step in range(STEPS):
                micro_losses = []
                for batch in train[step * gas:(step + 1) * gas]:
                    inputs, labels = pipeline_batch(batch, family)
                    loss, _ = loss_and_sums(engine(*inputs), *labels)
                    engine.backward(loss)
                    engine.step()
                    micro_losses.append(loss.item())
                losses.append(sum(micro_losses) / gas)
            torch.save(model.state_dict(), family_dir / "reference_state.pt")
        torch.save(eval_batch, family_dir / "eval_batch.pt")
        if env.rank == 0:
            (family_dir / f"{mode}_losses.json").write_text(json.dumps(losses))
        dist.barrier()
    shutdown_distributed()


def run_name(mode: str, stages: int) -> str:
    return f"pipeline{stages}" if mode == "pipeline" else "reference"


def _spawn(mode: str, world_size: int, out: Path, tmp: Path) -> list[subprocess.Popen]:
    from blt_dist.parallel.engine import free_port

    port = free_port()
    procs = []
    for rank in range(world_size):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
               "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        # The first init_distributed compiles a comm op (~40 s): keep it for the next run.
        env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
        log = open(tmp / f"{mode}{world_size}-rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, __file__, mode, str(out)], env=env, cwd=REPO,
                                      stdout=log, stderr=subprocess.STDOUT))
    return procs


@pytest.mark.slow
def test_pipeline_trains_like_the_plain_model(tmp_path):
    out, logs = tmp_path / "out", tmp_path / "logs"
    logs.mkdir()
    runs = {("pipeline", 2): _spawn("pipeline", 2, out, logs), ("pipeline", 3): _spawn("pipeline", 3, out, logs),
            ("reference", 1): _spawn("reference", 1, out, logs)}
    deadline = time.monotonic() + 300
    for (mode, world_size), group in runs.items():
        for rank, proc in enumerate(group):
            try:
                code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for p in itertools.chain(*runs.values()):
                    p.kill()
                code = "timeout"
            if code != 0:
                log = (logs / f"{mode}{world_size}-rank{rank}.log").read_text()
                pytest.fail(f"{mode} ({world_size} ranks) rank {rank} exited with {code}:\n{log[-6000:]}")

    for stages, family in [(2, "blt"), (2, "bpe"), (3, "blt")]:
        run_dir, reference_dir = out / f"pipeline{stages}" / family, out / "reference" / family
        pipeline = json.loads((run_dir / "pipeline_losses.json").read_text())
        reference = json.loads((reference_dir / "reference_losses.json").read_text())
        assert len(pipeline) == STEPS
        assert pipeline == pytest.approx(reference, rel=1e-5), (stages, family)
        parts = json.loads((run_dir / "parts.json").read_text())
        assert len(parts) == stages + 1
        if stages == 3:  # the middle stage holds latent blocks only: byte_states passes straight through
            assert 1 <= parts[1] < parts[2] <= tiny_config(family).model.n_layers + 1, parts  # layers 1..L: latent

        # Consolidated checkpoint == the reference run's weights and, exported and loaded back as
        # a plain model, reproduces the pipeline's logits.
        cfg = tiny_config(family)
        state = consolidate_pipeline_checkpoint(run_dir / "ckpt" / "final")
        reference_state = torch.load(reference_dir / "reference_state.pt", weights_only=True)
        assert state.keys() == reference_state.keys()
        # Gradients agree to fp32 rounding (summed in another order across stages), but Adam
        # divides by sqrt(v): where a gradient is near zero that rounding moves the update a
        # little. Allow 5% of one Adam step (lr); a missed or wrong update moves a weight ~lr.
        # (1% was one element short on an Intel Xeon: 1 of 12288 encoder weights off by 1.08%.)
        step_size = cfg.optim.lr
        torch.manual_seed(SEED)
        initial = build_model(cfg.model).state_dict()
        for name, tensor in state.items():  # every tensor of every stage was updated (Adam: ~lr per step)
            assert (tensor - initial[name]).abs().max() > 0.5 * step_size, f"{family} {name} did not train"
            torch.testing.assert_close(tensor, reference_state[name], rtol=0, atol=0.05 * step_size,
                                       msg=f"{stages} stages, {family} {name}")
        model, _ = load_export(save_export(state, cfg, tmp_path / f"export-{stages}-{family}"))
        with torch.no_grad():
            logits = plain_logits(model, torch.load(run_dir / "eval_batch.pt", weights_only=True), family)
        pipeline_logits = torch.load(run_dir / "pipeline_logits.pt", weights_only=True)
        torch.testing.assert_close(logits, pipeline_logits, rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
    run_worker(sys.argv[1], Path(sys.argv[2]))
