"""FLOP counter: dense accounting against torch's counter, real-context terms against hand
computation, matching (BPE, byte-level, at a tokenizer's measured compression), per-batch
accounting, and the `flops` command."""
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
from blt_dist.config.model import HashEmbeddingConfig, LocalModelConfig, ModelConfig
from blt_dist.errors import UserError
from blt_dist.model import build_model
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


def hand_blt() -> ModelConfig:
    """The small BLT whose FLOPs test_real_blt_flops_by_hand works out by hand."""
    return ModelConfig(
        family="blt", dim=32, n_layers=1, n_heads=2,
        encoder=LocalModelConfig(dim=16, n_layers=1, n_heads=2, window=4),
        decoder=LocalModelConfig(dim=16, n_layers=1, n_heads=2, window=4),
        cross_attn_k=2, hash=HashEmbeddingConfig(buckets=10),
    )


def test_real_blt_flops_by_hand():
    cfg = hand_blt()
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


def test_flops_command_matches_the_byte_level_baseline(capsys):
    report = json.loads(_run_cli(capsys, str(REPO / "configs/blt/tiny.yaml"), "--json"))
    byte = report["matched_byte"]
    assert abs(byte["flop_ratio_to_blt"] - 1) <= flops.MATCH_TOLERANCE and byte["seq_len"] == 512
    model = flops.byte_shape(load_config(REPO / "configs/blt/tiny.yaml").model, byte["dim"], byte["n_layers"])
    assert model.family == "byte" and model.attention_window is None and model.vocab_size == 260
    assert "matched byte-level: dim=" in _run_cli(capsys, str(REPO / "configs/blt/tiny.yaml"))


def test_flops_with_a_tokenizer_matches_at_its_measured_bytes_per_token(tmp_path, capsys):
    blt_config, bpe_config = str(REPO / "configs/blt/tiny.yaml"), str(REPO / "configs/bpe/tiny.yaml")
    # `blt-dist tokenizer --out M.model` writes M.json beside the model; only the JSON is read
    (tmp_path / "tok.json").write_text(json.dumps({"vocab_size": 4096, "bytes_per_token": 2.84,
                                                   "measured_on": "val split, 1000 bytes"}))
    tokenizer = str(tmp_path / "tok.model")
    assumed = json.loads(_run_cli(capsys, blt_config, "--json"))
    measured = json.loads(_run_cli(capsys, blt_config, "--json", "--tokenizer", tokenizer))
    assert assumed["matched_bpe"]["bytes_per_token"] == 4.4 and assumed["matched_bpe"]["tokens_per_sample"] == 120
    bpe = measured["matched_bpe"]
    assert bpe["bytes_per_token"] == 2.84 and "tok.json" in bpe["bytes_per_token_source"]
    assert bpe["tokens_per_sample"] == 184  # 512 bytes / 2.84, a multiple of 8
    assert abs(bpe["flop_ratio_to_blt"] - 1) <= flops.MATCH_TOLERANCE
    assert measured["train_flops_per_byte"] == assumed["train_flops_per_byte"]  # the BLT itself is unchanged
    # The shipped tiny BPE, shaped for 4.4 bytes/token, really costs ~1.59x the BLT per byte at 2.84.
    shipped = json.loads(_run_cli(capsys, bpe_config, "--json", "--tokenizer", tokenizer))
    assert shipped["bytes_per_token"]["bytes_per_token"] == 2.84
    assert shipped["train_flops_per_byte"] / assumed["train_flops_per_byte"] == pytest.approx(1.59, abs=0.01)

    parser = argparse.ArgumentParser()
    flops.add_arguments(parser)
    with pytest.raises(UserError, match="missing.json not found"):
        flops.run(parser.parse_args([blt_config, "--tokenizer", str(tmp_path / "missing.model")]))
    with pytest.raises(UserError, match="BLT or BPE config"):
        flops.run(parser.parse_args([str(REPO / "configs/entropy/tiny.yaml"), "--tokenizer", tokenizer]))


# ---------------------------------------------------------------------------------------------
# Per-batch accounting


@pytest.mark.parametrize("config", ["blt/tiny", "bpe/tiny", "byte/tiny", "entropy/tiny"])
def test_a_full_batch_costs_the_per_sample_number(config):
    cfg = load_config(REPO / "configs" / f"{config}.yaml")
    m, shape = cfg.model, flops.SampleShape.from_data(cfg.data)
    per_sample = flops.train_flops_per_byte(m, shape) * flops.bytes_per_sample(m, shape)
    if m.family == "blt":  # filled as the shape assumes: R bytes in R / s patches
        real_bytes = flops.bytes_per_sample(m, shape)
        batch = flops.batch_train_flops(m, shape, [real_bytes] * 3, [real_bytes / shape.patch_size] * 3)
    else:
        batch = flops.batch_train_flops(m, shape, [flops.positions_per_sample(m, shape)] * 3)
    assert batch.useful == pytest.approx(3 * per_sample, rel=1e-12)
    if m.family != "blt":
        assert batch.executed == batch.useful  # fixed-length samples are always full
    else:
        # every slot filled (C bytes in P patches) is the executed cost, and the upper bound
        full = flops.batch_train_flops(m, shape, [shape.byte_capacity] * 3, [shape.patches_per_sample] * 3)
        assert full.useful == full.executed == batch.executed > batch.useful


def test_batch_flops_by_hand():
    # A byte LM (d=64, 2 layers, SwiGLU 192, full causal attention), 16-position samples: one full
    # (context (16+1)/2 = 8.5), one with 8 positions filled (context 4.5).
    lm = ModelConfig(family="byte", dim=64, n_layers=2, n_heads=4)
    shape = flops.SampleShape(seq_len=16)

    def lm_sample(t, ctx):
        return t * (2 * (4 * 2 * 64 * 64 + 4 * 64 * ctx + 3 * 2 * 64 * 192) + 2 * 64 * 260)

    batch = flops.batch_train_flops(lm, shape, [16, 8])
    assert batch.useful == 3 * (lm_sample(16, 8.5) + lm_sample(8, 4.5))
    assert batch.executed == 3 * 2 * lm_sample(16, 8.5)

    # The BLT of test_real_blt_flops_by_hand: one sample of 24 bytes in 6 patches (its hand
    # figures), one of 12 bytes in 3 patches, 24 byte and 8 patch slots each.
    blt = hand_blt()
    shape = flops.SampleShape(byte_capacity=24, patches_per_sample=8, patch_size=4.0)
    first = 24 * sum(flops.forward_flops_per_byte(blt, shape).values())
    # 12 bytes: window context (1+2+3+4 + 8*4)/12 = 3.5; 3 patches of 4 bytes: latent context 2.
    local_block = 4 * 2 * 16 * 16 + 4 * 16 * 3.5 + 3 * 2 * 16 * 64
    pool = 3 * (2 * 16 * 32 + 2 * 2 * 2 * 16 * 16 + 2 * 32 * 32) + 12 * 2 * 2 * 16 * 16 + 3 * 2 * 4 * 16 * 4
    latent = 3 * (4 * 2 * 32 * 32 + 4 * 32 * 2 + 3 * 2 * 32 * 128)
    cross = 3 * 2 * 32 * 32 + (6 * 2 * 2 * 16 * 16 + 12 * 2 * 2 * 16 * 16 + 12 * 4 * 16 * 2)
    second = 12 * local_block + pool + latent + cross + 12 * local_block + 12 * 2 * 16 * 260
    batch = flops.batch_train_flops(blt, shape, [24, 12], [6, 3])
    assert batch.useful == pytest.approx(3 * (first + second), rel=1e-12)
    assert batch.executed == pytest.approx(3 * 2 * sum(flops.blt_flops_at(blt, 24, 8).values()), rel=1e-12)
    with pytest.raises(ValueError, match="patch count"):
        flops.batch_train_flops(blt, shape, [24, 12])


def test_flops_command_shows_the_fixed_inference_match(capsys):
    """`blt-dist flops BLT --patch-size P --bpe BPE`: for each patch size the resized latent's
    inference FLOPs/byte, recounted here from the reported shape, is within 2% of the twin's."""
    blt, bpe = load_config(REPO / "configs/blt/tiny.yaml"), load_config(REPO / "configs/bpe/tiny.yaml")
    report = json.loads(_run_cli(capsys, str(REPO / "configs/blt/tiny.yaml"), "--json", "--patch-size", "4.5",
                                 "--patch-size", "8", "--bpe", str(REPO / "configs/bpe/tiny.yaml")))
    match = report["inference_match"]
    twin = flops.inference_flops_per_byte(bpe.model, flops.SampleShape.from_data(bpe.data))
    assert match["bpe_twin"]["inference_flops_per_byte"] == pytest.approx(twin)
    rows = match["by_patch_size"]
    assert [r["patch_size"] for r in rows] == [4.5, 8.0]
    base = flops.SampleShape.from_data(blt.data)
    for r in rows:
        latent = dataclasses.replace(blt.model, dim=r["dim"], n_layers=r["n_layers"], n_heads=r["n_heads"],
                                     n_kv_heads=None)
        sample = dataclasses.replace(base, patch_size=r["patch_size"], patches_per_sample=r["patches_per_sample"])
        assert abs(flops.inference_flops_per_byte(latent, sample) / twin - 1) <= 0.02 and r["within_tolerance"]
    # Longer patches buy a bigger latent at the same cost per byte.
    assert rows[1]["params_named"] > rows[0]["params_named"] and rows[1]["patches_per_sample"] < 128
    table = _run_cli(capsys, str(REPO / "configs/blt/tiny.yaml"), "--patch-size", "8")
    assert "fixed inference cost (within 2%)" in table and "matched_bpe (same training FLOPs/byte)" in table


@pytest.mark.parametrize("argv, message", [
    (["configs/blt/tiny.yaml", "--patch-size", "40"], "40 bytes/patch is outside 1..16"),
    (["configs/bpe/tiny.yaml", "--patch-size", "8"], "resizes a BLT's latent; got family 'bpe'"),
    (["configs/blt/tiny.yaml", "--patch-size", "8", "--bpe", "configs/blt/tiny.yaml"], "expected a BPE config"),
])
def test_flops_inference_match_refuses_bad_input(argv, message):
    parser = argparse.ArgumentParser()
    flops.add_arguments(parser)
    args = parser.parse_args([str(REPO / argv[0]), *argv[1:]])
    if args.bpe:
        args.bpe = str(REPO / args.bpe)
    with pytest.raises(UserError, match=message):
        flops.run(args)
