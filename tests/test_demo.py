"""`blt-dist demo --quick`: every stage of the README's first command on the small corpus, ending
with the compare report (BLT, BPE, byte-level and compressor rows); a rerun reuses every stage."""
from __future__ import annotations

import re

import pytest
from conftest import REPO, run_cli

pytestmark = pytest.mark.slow


def test_quick_demo_ends_with_the_report_and_reruns_from_its_outputs(tmp_path):
    data, runs = tmp_path / "data", tmp_path / "runs"
    argv = ("demo", "--quick", "--data-dir", str(data), "--runs-dir", str(runs),
            "--cache", str(REPO / ".cache" / "corpus"), "--no-progress")
    first = run_cli(*argv)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]

    report = (runs / "report" / "report.md").read_text()
    table = report.split("## Bits per byte, clean", 1)[1].split("##", 1)[0]
    for row in ("| blt |", "| bpe |", "| byte |", "| *gzip -9* |", "| *bz2 -9* |", "| *xz -9e* |"):
        assert row in table, f"{row} missing from the clean bpb table:\n{table}"
    assert "## Bits per byte, noised `mix:0.05`" in report
    for plot in ("bpb_vs_flops.png", "bpb_by_content_type.png", "patch_sizes.png"):
        assert (runs / "report" / plot).is_file()

    out = first.stdout
    # the matched shapes came from the FLOP counter at the tokenizer's measured bytes per token
    measured = json_value(data / "demo" / "tokenizer.json", "bytes_per_token")
    assert abs(yaml_value(runs / "bpe" / "config.yaml", "bytes_per_token") - measured) < 1e-3
    assert re.search(r"entropy model \d+\.\d+ bpb vs xz -9e \d+\.\d+ bpb", out)
    assert "mean patch size (bytes/patch) at the calibrated threshold" in out
    assert "against the best compressor per content type" in out
    assert f"report: {runs / 'report' / 'report.md'}" in out

    second = run_cli(*argv)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    for name in ("entropy", "blt", "bpe", "byte"):
        assert f"{runs / name}: finished earlier, kept" in second.stdout
    assert "trained earlier on the same shards, kept" in second.stdout
    assert (runs / "report" / "report.md").read_text() == report  # same scores, from the cache


def json_value(path, key):
    import json

    return json.loads(path.read_text())[key]


def yaml_value(path, key):
    import yaml

    data = yaml.safe_load(path.read_text())["data"]
    return float(data[key])
