"""Every shipped model config: loads, builds on the meta device, has the size its name says,
and each BLT/BPE and BLT/byte pair is FLOP-matched. Bad model configs are rejected with the key path."""
from __future__ import annotations

import argparse
import json

import pytest

from blt_dist import flops
from blt_dist.config import ConfigError, load_config
from blt_dist.config.model import check_against_data
from tests.conftest import REPO

SIZES = {"125m": 125e6, "350m": 350e6, "1b": 1e9, "3b": 3e9}
ENTROPY_SIZES = {"tiny": (0.9e6, 1.1e6), "small": (10e6, 20e6), "100m": (90e6, 110e6)}
SHIPPED = [f"entropy/{n}" for n in ENTROPY_SIZES] + [f"{f}/{n}" for f in ("blt", "bpe", "byte")
                                                     for n in ("tiny", *SIZES)]


def test_every_config_file_is_shipped():
    found = {str(p.relative_to(REPO / "configs").with_suffix(""))
             for family in ("entropy", "blt", "bpe", "byte") for p in (REPO / "configs" / family).glob("[!_]*.yaml")}
    assert found == set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_config_builds_on_meta_with_the_size_its_name_says(name, capsys):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    family, size = name.split("/")
    assert cfg.model.family == family
    assert not cfg.data.train and not cfg.data.val  # data paths come from configs/data/
    # `blt-dist flops CONFIG --json` (meta-device parameter counts included).
    parser = argparse.ArgumentParser()
    flops.add_arguments(parser)
    assert flops.run(parser.parse_args([str(REPO / "configs" / f"{name}.yaml"), "--json"])) == 0
    report = json.loads(capsys.readouterr().out)
    by_component = report["params_by_component"]
    assert report["params_total"] == sum(by_component.values())
    named = report["params_named"]
    if family == "entropy":
        low, high = ENTROPY_SIZES[size]
        assert low <= named <= high, named
    elif size == "tiny":
        assert report["params_total"] < 5e6  # trains in minutes on two CPU cores
    elif family == "byte":
        # named after its BLT twin (test below); at equal FLOPs per byte it is far smaller
        assert named < SIZES[size], (name, named)
    else:
        assert abs(named / SIZES[size] - 1) <= 0.10, (name, named)
    if family == "blt":
        # Hash tables are reported on their own: they are memory, not compute.
        assert by_component["hash_embeddings"] == cfg.model.encoder.dim * cfg.model.hash.buckets * 6
        assert "hash_embeddings" not in report["flops_per_byte_by_component"]
        assert cfg.data.patches_per_sample * cfg.data.patching.max_patch_length >= cfg.data.byte_capacity


@pytest.mark.parametrize("size", ["tiny", *SIZES])
def test_bpe_config_is_the_flop_matched_twin_of_the_blt_config(size):
    blt = load_config(REPO / "configs/blt" / f"{size}.yaml")
    bpe = load_config(REPO / "configs/bpe" / f"{size}.yaml")
    blt_flops = flops.train_flops_per_byte(blt.model, flops.SampleShape.from_data(blt.data))
    bpe_flops = flops.train_flops_per_byte(bpe.model, flops.SampleShape.from_data(bpe.data))
    assert abs(bpe_flops / blt_flops - 1) <= 0.05, (size, bpe_flops, blt_flops)
    # And it is exactly what the matcher derives, so the two never drift apart silently.
    matched = flops.match_bpe(blt.model, flops.SampleShape.from_data(blt.data))
    assert (bpe.model.dim, bpe.model.n_layers, bpe.model.n_heads, bpe.model.vocab_size) == \
        (matched["dim"], matched["n_layers"], matched["n_heads"], matched["vocab_size"])
    assert bpe.data.tokens_per_sample == matched["tokens_per_sample"]
    assert bpe.data.bytes_per_token == blt.data.bytes_per_token
    assert bpe.train.flops == blt.train.flops and bpe.train.max_steps == blt.train.max_steps


@pytest.mark.parametrize("size", ["tiny", *SIZES])
def test_byte_config_is_the_flop_matched_twin_of_the_blt_config(size):
    blt = load_config(REPO / "configs/blt" / f"{size}.yaml")
    byte = load_config(REPO / "configs/byte" / f"{size}.yaml")
    blt_flops = flops.train_flops_per_byte(blt.model, flops.SampleShape.from_data(blt.data))
    byte_flops = flops.train_flops_per_byte(byte.model, flops.SampleShape.from_data(byte.data))
    assert abs(byte_flops / blt_flops - 1) <= flops.MATCH_TOLERANCE, (size, byte_flops, blt_flops)
    matched = flops.match_byte(blt.model, flops.SampleShape.from_data(blt.data))
    assert (byte.model.dim, byte.model.n_layers, byte.model.n_heads, byte.data.seq_len) == \
        (matched["dim"], matched["n_layers"], matched["n_heads"], matched["seq_len"])
    # full causal attention over the sample: no window, not even the entropy model's default
    assert byte.model.window is None and byte.model.attention_window is None
    assert byte.model.vocab_size == 260
    assert byte.train.flops == blt.train.flops and byte.train.max_steps == blt.train.max_steps


@pytest.mark.parametrize("config,override,key", [
    ("blt/tiny", "model.n_heads=3", "model.n_heads"),
    ("blt/tiny", "model.encoder.n_heads=3", "model.encoder.n_heads"),
    ("blt/tiny", "model.decoder.window=0", "model.decoder.window"),
    ("blt/tiny", "model.hash.ngram_sizes=[]", "model.hash.ngram_sizes"),
    ("blt/tiny", "model.hash.buckets=0", "model.hash.buckets"),
    ("blt/tiny", "model.decoder.dim=96", "model.decoder.dim"),
    ("blt/tiny", "model.cross_attn_k=0", "model.cross_attn_k"),
    ("blt/tiny", "model.vocab_size=256", "model.vocab_size"),
    ("entropy/tiny", "model.window=-1", "model.window"),
    ("entropy/tiny", "model.n_kv_heads=3", "model.n_kv_heads"),
    ("bpe/tiny", "model.n_layers=0", "model.n_layers"),
    ("bpe/tiny", "model.family=rnn", "model.family"),
    ("byte/tiny", "model.vocab_size=300", "model.vocab_size"),
    ("byte/tiny", "model.n_heads=5", "model.n_heads"),
])
def test_bad_model_values_are_rejected_with_the_key_path(config, override, key):
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs" / f"{config}.yaml", [override])
    assert f"{key}:" in str(err.value)


def test_checks_that_need_the_data_section(tmp_path):
    blt = load_config(REPO / "configs/blt/tiny.yaml")
    assert check_against_data(blt.model, blt.data) == []
    blt.data.patches_per_sample = 16  # 16 patches * 16 bytes < 512 bytes
    (key, message), = check_against_data(blt.model, blt.data)
    assert key == "data.byte_capacity" and "16 * 16 = 256" in message

    spm = pytest.importorskip("sentencepiece")
    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"line {i} of some text, with words: alpha beta gamma {i * 7}" for i in range(400)))
    prefix = tmp_path / "tok"
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(prefix), vocab_size=300, model_type="bpe",
                                   byte_fallback=True, minloglevel=2)
    bpe = load_config(REPO / "configs/bpe/tiny.yaml")
    bpe.data.tokenizer = str(prefix) + ".model"
    (key, message), = check_against_data(bpe.model, bpe.data)
    assert key == "model.vocab_size" and "300" in message
    bpe.model.vocab_size = 300
    assert check_against_data(bpe.model, bpe.data) == []
