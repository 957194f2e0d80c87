"""The training step reads no device value on the host but the agreed non-finite flag, which
decides whether the update runs (tools/host_syncs.py counts them; on a GPU each read would
empty the launch queue). Packed batches: three documents per row, the loader's layout facts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("config", ["configs/blt/tiny.yaml", "configs/bpe/tiny.yaml"])
def test_a_training_step_reads_one_value_on_the_host(config):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions")}
    done = subprocess.run([sys.executable, "tools/host_syncs.py", config, "train.grad_accum=2", "--steps", "2",
                           "--documents", "3", "--json"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["host_syncs_per_step"] == 1, result["by_site"]
    assert list(result["by_site"]) == ["item at blt_dist/training/step.py:45"], result["by_site"]
