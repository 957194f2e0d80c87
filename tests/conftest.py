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
