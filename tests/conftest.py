"""Shared test setup: keep what libraries leave behind (streaming's /tmp locks, DeepSpeed's
extension builds) inside a per-session temporary directory, and keep CPU use predictable."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _isolated_tmpdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("libtmp")
    old = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmp)
    os.environ["BLT_DIST_CACHE"] = str(tmp / "blt-dist-cache")  # shard stamps: not in the user's home
    yield
    if old is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = old


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None):
    """Runs `blt-dist ARGS` in a subprocess, as a user would. Returns CompletedProcess."""
    import subprocess

    return subprocess.run(
        [sys.executable, "-m", "blt_dist.cli", *args],
        cwd=cwd or REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )


def write_word_documents(root: Path, words, per_type: int, word_range: tuple[int, int], tail=None, seed: int = 0,
                         types=("prose", "code")) -> Path:
    """Synthetic text documents root/<type>/NN.txt: random words, plus `tail(i, rng)` bytes."""
    import numpy as np

    rng = np.random.default_rng(seed)
    for ctype in types:
        (root / ctype).mkdir(parents=True)
        for i in range(per_type):
            text = " ".join(rng.choice(words, rng.integers(*word_range))).encode()
            (root / ctype / f"{i:02d}.txt").write_bytes(text + (tail(i, rng) if tail else b""))
    return root


def word_dataset(root: Path, words, per_type: int = 60) -> Path:
    """root/ds: a prepared byte dataset of synthetic word documents (prose + code, 10% val)."""
    from blt_dist.data.prepare import prepare

    write_word_documents(root / "in", words, per_type, (5, 120))
    prepare([root / "in"], root / "ds", val_fraction=0.1, progress=False)
    return root / "ds"


def random_entropy_dataset(root: Path, texts: dict[str, list[str]]) -> Path:
    """root/ent: an entropy dataset of `texts` (content type -> documents), made by a random tiny
    entropy model whose output is scaled to spread its entropies (seconds)."""
    import torch

    from blt_dist.config import Config
    from blt_dist.config.model import ModelConfig
    from blt_dist.data.entropies import compute_entropy_dataset
    from blt_dist.data.prepare import prepare
    from blt_dist.model import build_model
    from blt_dist.training.export import save_export

    for ctype, documents in texts.items():
        (root / "in" / ctype).mkdir(parents=True)
        for i, text in enumerate(documents):
            (root / "in" / ctype / f"{i:02d}.txt").write_text(text)
    prepare([root / "in"], root / "bytes", val_fraction=0.0, progress=False)
    torch.manual_seed(0)
    cfg = Config()
    cfg.model = ModelConfig(family="entropy", dim=32, n_layers=1, n_heads=2, window=16)
    model = build_model(cfg.model)
    with torch.no_grad():
        model.output.weight.mul_(4.0)  # spread the entropies of a random model
    save_export(model.state_dict(), cfg, root / "model")
    compute_entropy_dataset(root / "model", root / "bytes", root / "ent", progress=False)
    return root / "ent"


def sentencepiece_bpe(root: Path, vocab_size: int = 300) -> Path:
    """root/tok.model: a small sentencepiece BPE with the settings of `blt-dist tokenizer` that
    ByteExactTokenizer relies on (ids, byte fallback, identity normalisation)."""
    import sentencepiece as spm

    text = root / "text.txt"
    text.write_text("\n".join(f"the cat sat on the mat {i}, and the dog ran after it." for i in range(300)))
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(root / "tok"), vocab_size=vocab_size, model_type="bpe", byte_fallback=True,
        normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, minloglevel=2)
    return root / "tok.model"

