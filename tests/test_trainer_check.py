"""The CPU twin of the GPU day-one check (tools/gpu_check.sh step 1): tools/trainer_check.py's
--quick subset on gloo, so the script a lent GPU runs is known to work before it gets there."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_trainer_check_passes_on_cpu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions")}
    done = subprocess.run([sys.executable, "tools/trainer_check.py", str(tmp_path / "check"), "--device", "cpu",
                           "--quick"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    summary = json.loads((tmp_path / "check" / "trainer-check.json").read_text())
    assert done.returncode == 0 and summary["ok"], done.stdout[-3000:] + done.stderr[-3000:]
    names = [c["check"] for c in summary["checks"]]
    assert names == ["zero0-blt", "zero1-blt", "zero3-blt", "nan", "resume", "export-eval"]
    resume = next(c for c in summary["checks"] if c["check"] == "resume")
    assert resume["killed_rc"] == -9 and resume["differing_steps"] == []
