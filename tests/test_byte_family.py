"""The byte-level baseline family end to end: one causal LM over every byte with full causal
attention, trained and evaluated like the others; and the trainer's per-batch FLOP accounting
(useful vs executed FLOPs, padding) against the FLOP counter."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from blt_dist import flops
from blt_dist.config import load_config
from blt_dist.config.model import ModelConfig
from blt_dist.model import CausalLM, build_model
from tests.conftest import REPO, word_dataset
from tests.distributed import metrics, run

WORDS = "the quick brown fox jumps over a lazy dog while bytes and patches flow through latent space".split()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("byte")
    word_dataset(root, WORDS, per_type=40)
    return root


def test_byte_model_attends_over_the_whole_sample():
    # The entropy model's 512-byte window is a family default; the byte family has none.
    cfg = ModelConfig(family="byte", dim=32, n_layers=1, n_heads=2, attention="dense")
    assert cfg.attention_window is None and ModelConfig(family="entropy").attention_window == 512
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    assert isinstance(model, CausalLM)
    tokens = torch.randint(4, 260, (1, 600))
    perturbed = tokens.clone()
    perturbed[0, 10] = 4 + (int(tokens[0, 10]) - 3) % 256
    with torch.no_grad():
        before, after = model(tokens), model(perturbed)
    assert torch.equal(before[0, :10], after[0, :10])  # causal
    assert not torch.allclose(before[0, 599], after[0, 599])  # 589 bytes later: no window


def _train(data, tmp_path, config: str, *overrides: str):
    run_dir = tmp_path / config.replace("/", "-")
    run(1, ["train", f"configs/{config}.yaml", f"data.train={data / 'ds'}", f"data.val={data / 'ds'}",
            f"run.dir={run_dir}", "train.micro_batch_size=2", "log.every=1", "train.eval_bytes=3000",
            "train.max_steps=3", "train.eval_every=3", *overrides], tmp_path / "logs")
    return run_dir, [r for r in metrics(run_dir) if "loss" in r]


def test_byte_family_trains_and_evaluates(data, tmp_path):
    run_dir, records = _train(data, tmp_path, "byte/tiny", "data.seq_len=128")
    assert [r["step"] for r in records] == [1, 2, 3]
    cfg = load_config(run_dir / "config.yaml")
    assert cfg.model.family == "byte" and cfg.model.window is None
    # Fixed-length samples are always full: nothing executed is padding.
    per_sample = flops.batch_train_flops(cfg.model, flops.SampleShape.from_data(cfg.data), [128]).useful
    for r in records:
        assert r["padding_fraction"] == 0 and r["mfu_executed"] == r["mfu"] and math.isfinite(r["mfu"])
        assert r["flops_executed_seen"] == r["flops_seen"] == pytest.approx(r["step"] * 2 * per_sample)
    # `blt-dist eval` scores it like any byte LM (evaluate.py's non-BLT, non-BPE path).
    result = subprocess.run([sys.executable, "-m", "blt_dist.cli", "eval", "--model", str(run_dir / "export"),
                             "--data", str(data / "ds"), "--json"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["family"] == "byte" and 0 < report["bpb"] < 20 and report["bytes"] > 0


def test_blt_run_reports_useful_and_executed_flops(data, tmp_path):
    _, records = _train(data, tmp_path, "blt/tiny", "data.patching.mode=space", "data.byte_capacity=128",
                        "data.patches_per_sample=24")
    cfg = load_config(REPO / "configs/blt/tiny.yaml", ["data.byte_capacity=128", "data.patches_per_sample=24"])
    full_sample = flops.batch_train_flops(cfg.model, flops.SampleShape.from_data(cfg.data), [128], [24]).executed
    previous = {"flops_seen": 0.0, "flops_executed_seen": 0.0}
    for r in records:
        useful = r["flops_seen"] - previous["flops_seen"]
        executed = r["flops_executed_seen"] - previous["flops_executed_seen"]
        # whole patches only: some slots hold padding, paid for but not counted as useful
        assert executed == pytest.approx(2 * full_sample) and 0 < useful < executed
        assert r["padding_fraction"] == pytest.approx(1 - useful / executed)
        assert 0 < r["mfu"] < r["mfu_executed"]
        assert 0 < r["byte_slots_per_sample"] <= 128 and 0 < r["patches_per_sample"] <= 24
        previous = r
