"""`blt-dist bench`: structure of the results on the smoke suite (no timed assertions)."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from blt_dist.bench import suite as bench
from blt_dist.bench import workloads
from blt_dist.cli import COMMANDS


def test_synthetic_blt_batch_is_a_causal_realistic_layout():
    batch = workloads.blt_batch(2048, batch=3, seed=1)
    lengths = batch["patch_lengths"].numpy()
    assert (lengths.sum(axis=1) == 2048).all() and (lengths[:, 0] == 1).all() and lengths.max() <= 16
    assert 4.0 < lengths.sum() / (lengths > 0).sum() < 5.0  # mean patch ~4.5 bytes
    assert (batch["tokens"][:, 0] == workloads.BOS_ID).all() and lengths.shape[1] == 2048 // 4


def test_zero_partitioning_rules():
    params = 1000
    per_rank = [bench.zero_bytes_per_rank(params, stage, 2, "bf16") for stage in range(4)]
    assert per_rank == [16000, 4000 + 6000, 2000 + 7000, 8000]
    assert bench.zero_bytes_per_rank(params, 0, 2, "fp32") == 16000
    assert bench.zero_bytes_per_rank(params, 3, 4, "fp32") == 4000


def test_child_reports_step_time_and_peak_rss():
    r = bench.run_child("blt/tiny", 256, ("fp32",), timed_steps=1)
    assert r["step_s"] > 0 and r["dtype"] == "fp32" and r["maxrss_bytes"] > 50e6 and r["train_flops_per_byte"] > 0


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert bench.run(parser.parse_args(["--suite", "smoke", "--json", str(out)])) == 0
    torch.set_num_threads(threads)
    return json.loads(out.read_text())


def test_smoke_suite_rows(smoke, capsys):
    assert "bench" in COMMANDS
    assert smoke["suite"] == "smoke" and smoke["seconds"] > 0
    assert {"cpu", "cpus", "torch_threads", "torch", "device"} <= set(smoke["machine"])
    figures = [r["figure"] for r in smoke["rows"]]
    for needle in ("matmul peak fp32", "blt/tiny train bytes/s", "bpe/tiny train bytes/s", "BLT MFU @",
                   "BLT / BPE bytes/s, 125M", "HF BltForCausalLM", "HF Llama", "patcher MB/s", "loader MB/s",
                   "entropy pass", "peak RSS", "ZeRO-0", "ZeRO-3", "GPU MFU"):
        assert any(needle in f for f in figures), needle
    for r in smoke["rows"]:
        assert r["target"] == "info" or r["target"].split()[0] in (">=", "<="), r
        if r["value"] is None:
            assert r["note"].startswith("skipped"), r
            assert r["met"] is None
        else:
            assert isinstance(r["value"], float) and np.isfinite(r["value"]), r
            assert r["met"] in ((None,) if r["target"] == "info" else (True, False)), r
    table = bench.markdown(smoke)
    assert table.count("\n|") == len(smoke["rows"]) + 2  # header, rule, one line per row


def test_the_gpu_suite_refuses_a_machine_without_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from blt_dist.cli import main

    assert main(["bench", "--suite", "gpu"]) == 1
    assert "bench --suite gpu needs a CUDA device" in capsys.readouterr().err


def test_the_gpu_check_script_parses():
    import subprocess

    assert subprocess.run(["bash", "-n", str(workloads.CONFIGS.parent / "tools" / "gpu_check.sh")]).returncode == 0
