"""FLOP counter: dense accounting against torch's counter, real-context terms against hand
computation, matching, and the `flops` command."""
from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from blt_dist import flops
from blt_dist.config import load_config
from blt_dist.model import build_model
from blt_dist.model.config import HashEmbeddingConfig, LocalModelConfig, ModelConfig
from tests.conftest import REPO
from tests.test_model_causality import random_batch, tiny_blt


def torch_forward_flops(model, *inputs) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(*inputs)
    return counter.get_total_flops()


@pytest.mark.parametrize("latent_kv_heads", [None, 2])
def test_dense_blt_flops_match_torch(latent_kv_heads):
    torch.manual_seed(0)
    cfg = tiny_blt(n_kv_heads=latent_kv_heads, attention="dense")  # the masked SDPA the dense count describes
    model = build_model(cfg)
    tokens, lengths, docs = random_batch(0, batch=2, capacity=40, num_patches=16)
    counted = torch_forward_flops(model, tokens, lengths, docs)
    expected = 2 * flops.dense_forward_flops(cfg, flops.SampleShape(byte_capacity=40, patches_per_sample=16))
    assert abs(expected / counted - 1) < 0.02, (expected, counted)


@pytest.mark.parametrize("family,kv_heads,window", [("entropy", None, 8), ("bpe", 2, None)])
def test_dense_lm_flops_match_torch(family, kv_heads, window):
    torch.manual_seed(0)
    vocab = 260 if family == "entropy" else 500
    cfg = ModelConfig(family=family, vocab_size=vocab, dim=64, n_layers=2, n_heads=4, n_kv_heads=kv_heads,
                      window=window, attention="dense")
    model = build_model(cfg)
    tokens = torch.randint(0, vocab, (3, 32))
    counted = torch_forward_flops(model, tokens)
    shape = flops.SampleShape(seq_len=32, tokens_per_sample=32)
    assert abs(3 * flops.dense_forward_flops(cfg, shape) / counted - 1) < 0.02


def test_causal_context():
    assert flops.causal_context(16) == 8.5  # (T + 1) / 2
    assert flops.causal_context(16, window=4) == (1 + 2 + 3 + 4 + 12 * 4) / 16
    assert flops.causal_context(3, window=512) == 2.0  # window longer than the sequence


def test_real_lm_flops_by_hand():
    cfg = ModelConfig(family="entropy", dim=64, n_layers=2, n_heads=4, window=4)
    per_byte = flops.forward_flops_per_byte(cfg, flops.SampleShape(seq_len=16))
    # SwiGLU width: 64 * ceil(int(8/3 * 64) / 64) = 192. Context: (1+2+3+4 + 12*4) / 16 = 3.625.
    block = 4 * 2 * 64 * 64 + 4 * 64 * 3.625 + 3 * 2 * 64 * 192  # QKVO + attention + FFN
    assert per_byte == {"transformer": 2 * block, "head": 2 * 64 * 260}
    assert flops.train_flops_per_byte(cfg, flops.SampleShape(seq_len=16)) == 3 * (2 * block + 2 * 64 * 260)
    # BPE: per token divided by bytes per token; no window -> context (T + 1) / 2.
    bpe = ModelConfig(family="bpe", vocab_size=1000, dim=64, n_layers=1, n_heads=4)
    per_byte = flops.forward_flops_per_byte(bpe, flops.SampleShape(tokens_per_sample=8, bytes_per_token=4.0))
    assert per_byte["transformer"] == (4 * 2 * 64 * 64 + 4 * 64 * 4.5 + 3 * 2 * 64 * 192) / 4.0
    assert per_byte["head"] == 2 * 64 * 1000 / 4.0


def test_real_blt_flops_by_hand():
    cfg = ModelConfig(
        family="blt", dim=32, n_layers=1, n_heads=2,
        encoder=LocalModelConfig(dim=16, n_layers=1, n_heads=2, window=4),
        decoder=LocalModelConfig(dim=16, n_layers=1, n_heads=2, window=4),
        cross_attn_k=2, hash=HashEmbeddingConfig(buckets=10),
    )
    # 24 byte slots, 8 patch slots, 4 bytes/patch: R = min(24, 8*4) = 24 real bytes, n = 6 patches.
    shape = flops.SampleShape(byte_capacity=24, patches_per_sample=8, patch_size=4.0)
    per_byte = flops.forward_flops_per_byte(cfg, shape)
    # Local block (d=16, SwiGLU 64, window context (1+2+3+4 + 20*4)/24 = 3.75): 2048 + 240 + 6144.
    local_block = 4 * 2 * 16 * 16 + 4 * 16 * 3.75 + 3 * 2 * 16 * 64
    # Pooling per patch: query init 16->32, q and out for 2 queries, 32->32 out; bytes' k, v;
    # each of the 2 queries attends to the patch's 4 bytes.
    pool = 6 * (2 * 16 * 32 + 2 * 2 * 2 * 16 * 16 + 2 * 32 * 32) + 24 * 2 * 2 * 16 * 16 + 6 * 2 * 4 * 16 * 4
    # Latent block (D=32, SwiGLU 128) over 6 patches: causal context 3.5.
    latent_block = 4 * 2 * 32 * 32 + 4 * 32 * 3.5 + 3 * 2 * 32 * 128
    # Decoder cross-attention: patch 32 -> 2x16 once; per layer k, v of 12 patch vectors,
    # q and out of 24 bytes, each byte attending to 2 vectors.
    cross = 6 * 2 * 32 * 32 + (12 * 2 * 2 * 16 * 16 + 24 * 2 * 2 * 16 * 16 + 24 * 4 * 16 * 2)
    assert per_byte == pytest.approx({
        "encoder": local_block, "encoder_cross_attention": pool / 24, "global": 6 * latent_block / 24,
        "decoder_cross_attention": cross / 24, "decoder": local_block, "head": 2 * 16 * 260,
    }, rel=1e-12)
    # When the patch slots run out first, only P * s bytes are real.
    short = flops.SampleShape(byte_capacity=64, patches_per_sample=4, patch_size=4.0)
    real_flops, real_bytes = flops.blt_forward_flops(cfg, short)
    assert real_bytes == 16


def test_match_bpe_and_reverse_are_within_tolerance():
    blt = load_config(REPO / "configs/blt/125m.yaml")
    shape = flops.SampleShape.from_data(blt.data)
    matched = flops.match_bpe(blt.model, shape)
    assert abs(matched["flop_ratio_to_blt"] - 1) <= 0.05
    assert matched["dim"] == blt.model.dim  # the family prefers the latent width
    assert matched["tokens_per_sample"] == 1864  # 8192 bytes / 4.4 bytes per token, multiple of 8
    # Halving the patch size makes the latent model twice as expensive per byte: a bigger baseline.
    smaller_patches = flops.match_bpe(blt.model, dataclasses.replace(shape, patch_size=2.25))
    assert smaller_patches["train_flops_per_byte"] > 1.5 * matched["train_flops_per_byte"]

    bpe = load_config(REPO / "configs/bpe/125m.yaml")
    reverse = flops.match_blt(bpe.model, flops.SampleShape.from_data(bpe.data), blt.model, shape)
    assert abs(reverse["flop_ratio_to_bpe"] - 1) <= 0.05
    assert (reverse["dim"], reverse["n_layers"]) == (blt.model.dim, blt.model.n_layers)


def _run_cli(capsys, *argv) -> str:
    parser = argparse.ArgumentParser()
    flops.add_arguments(parser)
    assert flops.run(parser.parse_args(list(argv))) == 0
    return capsys.readouterr().out


def test_flops_command_json_and_table(capsys):
    report = json.loads(_run_cli(capsys, str(REPO / "configs/blt/tiny.yaml"), "--json"))
    for key in ("params_total", "params_by_component", "train_flops_per_byte", "flops_per_byte_by_component",
                "matched_bpe"):
        assert key in report
    assert set(report["flops_per_byte_by_component"]) == set(flops.BLT_COMPONENTS)
    assert report["params_total"] == sum(report["params_by_component"].values())
    assert report["train_flops_per_byte"] == pytest.approx(3 * sum(report["flops_per_byte_by_component"].values()))
    assert "entropy_model" not in report  # off by default

    # Overrides change the numbers; the entropy model is reported beside, never added in.
    with_entropy = json.loads(_run_cli(capsys, str(REPO / "configs/blt/tiny.yaml"), "--json",
                                       "--entropy-model", str(REPO / "configs/entropy/tiny.yaml")))
    assert with_entropy["train_flops_per_byte"] == report["train_flops_per_byte"]
    assert with_entropy["entropy_model"]["forward_flops_per_byte"] > 0
    bigger = json.loads(_run_cli(capsys, str(REPO / "configs/blt/tiny.yaml"), "model.n_layers=6", "--json"))
    assert bigger["flops_per_byte_by_component"]["global"] > report["flops_per_byte_by_component"]["global"]

    table = _run_cli(capsys, str(REPO / "configs/bpe/tiny.yaml"), "--blt-template", str(REPO / "configs/blt/tiny.yaml"))
    assert "training FLOPs/byte" in table and "matched BLT latent" in table
