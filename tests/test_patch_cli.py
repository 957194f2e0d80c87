"""`blt-dist patch`: every byte shown exactly once, hand-checked layouts, clear errors."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest

from blt_dist.data import patch_cli
from blt_dist.errors import UserError


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="blt-dist patch")
    patch_cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def run_json(capsys, *argv: str) -> dict:
    assert patch_cli.run(parse(*argv, "--json")) == 0
    return json.loads(capsys.readouterr().out)


def test_space_mode_json_by_hand(capsys):
    report = run_json(capsys, "hello world", "--mode", "space")
    assert report["patches"] == [
        {"start": 0, "length": 6, "text": "hello "},
        {"start": 6, "length": 5, "text": "world"},
    ]
    assert report["mean_patch_size"] == 5.5


def test_static_mode_json_by_hand(capsys):
    # encoded: BOS a b c | d e f g | h i j EOS -- the BOS and EOS positions are not shown
    report = run_json(capsys, "abcdefghij", "--mode", "static", "--patch-size", "4")
    assert [(p["start"], p["length"], p["text"]) for p in report["patches"]] == [
        (0, 3, "abc"),
        (3, 4, "defg"),
        (7, 3, "hij"),
    ]


@pytest.mark.parametrize("mode", ["space", "static", "byte"])
def test_json_covers_every_byte_once(tmp_path, capsys, mode):
    rng = np.random.default_rng(0)
    data = bytes(rng.choice(list(b"ab \n\x00\xc3\xa9\xff,"), size=500))
    path = tmp_path / "input.bin"
    path.write_bytes(data)
    report = run_json(capsys, "--file", str(path), "--mode", mode, "--max-patch-length", "7")
    offset = 0
    for patch in report["patches"]:
        assert patch["start"] == offset and 1 <= patch["length"] <= 7
        chunk = data[offset : offset + patch["length"]]
        assert patch["text"] == chunk.decode("utf-8", errors="replace")
        offset += patch["length"]
    assert offset == len(data)
    assert report["mean_patch_size"] == pytest.approx(len(data) / len(report["patches"]))


def test_empty_input(capsys):
    assert run_json(capsys, "", "--mode", "space")["patches"] == []


def test_terminal_output_marks_boundaries(capsys):
    assert patch_cli.run(parse("hello big world", "--mode", "space")) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "hello |big |world"
    assert "15 bytes, 3 patches, mean patch size 5.00 bytes" in out


def test_invalid_utf8_argument_passes_through_as_raw_bytes():
    """A command-line argument that is not UTF-8 reaches the patcher as the original bytes."""
    script = (
        "import argparse, sys\n"
        "from blt_dist.data import patch_cli\n"
        "p = argparse.ArgumentParser(); patch_cli.add_arguments(p)\n"
        "sys.exit(patch_cli.run(p.parse_args(sys.argv[1:])))\n"
    )
    result = subprocess.run(
        [sys.executable.encode(), b"-c", script.encode(), b"a\xffb", b"--mode", b"byte", b"--json"],
        capture_output=True,
        check=True,
    )
    patches = json.loads(result.stdout)["patches"]
    assert [(p["start"], p["text"]) for p in patches] == [(0, "a"), (1, "\ufffd"), (2, "b")]


def test_entropy_modes_say_what_is_missing(tmp_path):
    with pytest.raises(UserError, match="needs entropies from an entropy model: pass --entropy-model"):
        patch_cli.run(parse("hi", "--mode", "entropy", "--threshold", "1.0"))
    with pytest.raises(UserError, match="no export.json; not a model export"):
        patch_cli.run(parse("hi", "--mode", "monotonic", "--threshold", "0.5", "--entropy-model", str(tmp_path)))
    with pytest.raises(UserError, match="needs --threshold"):
        patch_cli.run(parse("hi", "--mode", "entropy", "--entropy-model", "ckpt"))


def save_tiny_export(path, family: str):
    import torch

    from blt_dist.config import Config
    from blt_dist.model import ModelConfig, build_model
    from blt_dist.training.export import save_export

    torch.manual_seed(0)
    cfg = Config()
    vocab = {"bpe": {"vocab_size": 64}}.get(family, {})
    cfg.model = ModelConfig(family=family, dim=32, n_layers=1, n_heads=2, window=16, **vocab)
    model = build_model(cfg.model)
    save_export(model.state_dict(), cfg, path)
    return model


def test_entropy_mode_with_a_real_export(tmp_path, capsys):
    """--entropy-model loads an export and computes what `blt-dist entropies` would store."""
    from blt_dist.data.entropies import document_entropies
    from blt_dist.vocab import encode_document

    model = save_tiny_export(tmp_path / "entropy", "entropy")
    text = "a real entropy model, a sliding window of 16 bytes, and a text longer than that"
    expected = document_entropies(model, [text.encode()], window=16)[0].astype(np.float16).astype(np.float32)
    threshold = float(np.median(expected[1:]))
    report = run_json(capsys, text, "--mode", "entropy", "--threshold", str(threshold), "--entropy-model", str(tmp_path / "entropy"))
    shown = np.concatenate([p["entropies"] for p in report["patches"]])
    np.testing.assert_allclose(shown, expected[1:-1], atol=1e-4)  # float16 as stored; per byte (no BOS, EOS)
    starts = [p["start"] + 1 for p in report["patches"]]  # encoded positions of the first bytes
    assert set(starts) >= {i for i in range(2, len(text) + 1) if expected[i] > threshold}
    for previous, start in zip(starts, starts[1:]):
        assert expected[start] > threshold or start - previous == 16  # natural, or forced by the max length
    assert encode_document(text.encode()).size == expected.size

    save_tiny_export(tmp_path / "bpe", "bpe")
    with pytest.raises(UserError, match="a 'bpe' model export, not an entropy model"):
        patch_cli.run(parse("hi", "--mode", "entropy", "--threshold", "1", "--entropy-model", str(tmp_path / "bpe")))


def test_input_errors(tmp_path):
    with pytest.raises(UserError, match="exactly one"):
        patch_cli.run(parse("--mode", "space"))
    with pytest.raises(UserError, match="exactly one"):
        patch_cli.run(parse("text", "--file", "x", "--mode", "space"))
    with pytest.raises(UserError, match="no such file"):
        patch_cli.run(parse("--file", str(tmp_path / "missing"), "--mode", "space"))
    with pytest.raises(UserError, match="max_patch_length must be a positive integer"):
        patch_cli.run(parse("hi", "--mode", "space", "--max-patch-length", "0"))


def fake_entropy_model(monkeypatch):
    """Stands in for the entropy model: high entropy at the first byte after a space."""

    def load(path):
        def entropies(ids):
            H = np.full(ids.size, 0.5, dtype=np.float32)
            H[1:][ids[:-1] == ord(" ") + 4] = 2.0  # after a space the next byte is uncertain
            return H

        return entropies

    monkeypatch.setattr(patch_cli, "load_entropy_fn", load)


def test_entropy_mode_with_a_model(monkeypatch, capsys, tmp_path):
    fake_entropy_model(monkeypatch)
    argv = ("one two three", "--mode", "entropy", "--threshold", "1.0", "--entropy-model", "fake")
    report = run_json(capsys, *argv)
    assert [p["text"] for p in report["patches"]] == ["one ", "two ", "three"]
    assert report["patches"][1]["entropies"][:2] == [2.0, 0.5]

    assert patch_cli.run(parse(*argv)) == 0
    out = capsys.readouterr().out
    assert "H(first)" in out and "2.000" in out  # per-patch entropies in the terminal view

    page = tmp_path / "patches.html"
    assert patch_cli.run(parse(*argv, "--html", str(page))) == 0
    text = page.read_text()
    assert "hsl(0,90%,45%)" in text  # the highest entropy is the reddest
    assert text.count("border-left") == 3  # one bar per patch


def test_html_without_entropies(tmp_path, capsys):
    page = tmp_path / "p.html"
    assert patch_cli.run(parse("a<b> c", "--mode", "space", "--html", str(page))) == 0
    text = page.read_text()
    assert "&lt;" in text and "<b>" not in text  # input is escaped
    # "a<", "b>", " c": a patch starts after the first byte of a spacelike run
    assert text.count("border-left") == 3
