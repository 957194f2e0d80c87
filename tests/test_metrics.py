"""Metrics: the CPU peak says what it measured, and an MFU above 100% is never shown unflagged."""
from __future__ import annotations

import json

import torch

from blt_dist.hardware import PeakMeasurement, measure_cpu_peak, peak_flops
from blt_dist.training.metrics import MetricsLogger, format_line


def step_record(mfu: float) -> dict:
    return {
        "step": 3, "total_steps": 10, "loss": 2.0, "bpb": 2.9, "lr": 1e-3, "grad_norm": 0.5,
        "bytes_per_s": 1234.0, "tflops": 0.1, "mfu": mfu, "memory_gb": 1.0, "data_fraction": 0.01, "eta_s": 30.0,
    }


def test_cpu_peak_reports_what_was_measured():
    measured = measure_cpu_peak(torch.float32, sizes=(32, 64), seconds_per_size=0.01)
    assert isinstance(measured, PeakMeasurement)
    assert measured.flops > 0 and measured.best_size in (32, 64) and measured.sizes == (32, 64)
    assert measured.dtype == "fp32" and measured.threads == torch.get_num_threads() and measured.seconds > 0
    text = measured.describe()
    for fact in ("fp32", "32/64", "threads", "GFLOP/s", " s in all"):
        assert fact in text


def test_peak_flops_on_cpu_names_sizes_dtype_and_threads():
    value, source = peak_flops("bf16", torch.device("cpu"))
    assert value > 0
    assert "bf16" in source and "512/1024/2048" in source and f"{torch.get_num_threads()} threads" in source


def test_mfu_above_100_percent_is_flagged(tmp_path, capsys):
    assert "peak suspect" not in format_line(step_record(0.42))
    assert "MFU 42.0%" in format_line(step_record(0.42))
    assert "MFU 104.0% (peak suspect)" in format_line(step_record(1.04))

    log = MetricsLogger(tmp_path, enabled=True)
    log.log(step_record(0.5), format_line(step_record(0.5)))
    log.log(step_record(1.04), format_line(step_record(1.04)))
    log.log(step_record(1.05), format_line(step_record(1.05)))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("mfu_peak_suspect", False) for r in records] == [False, True, True]
    printed = capsys.readouterr().out
    assert printed.count("warning: MFU") == 1 and "suspect" in printed
