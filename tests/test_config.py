"""The config tree: YAML inheritance, dotted overrides, and every rejection path."""
from __future__ import annotations

from pathlib import Path

import pytest

from blt_dist.config import ConfigError, load_config, save_resolved, to_yaml
from tests.conftest import REPO, run_cli


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_load():
    cfg = load_config()
    assert cfg.optim.lr > 0 and cfg.parallel.zero_stage == 0


def test_inheritance_child_overrides_parent(tmp_path):
    write(tmp_path / "base.yaml", "optim:\n  lr: 0.001\n  warmup_steps: 7\ntrain:\n  max_steps: 3\n")
    write(tmp_path / "mid.yaml", "extends: base.yaml\noptim:\n  lr: 0.002\n")
    child = write(tmp_path / "child.yaml", "extends: mid.yaml\ntrain:\n  max_steps: 5\n")
    cfg = load_config(child)
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.train.max_steps) == (0.002, 7, 5)


def test_multiple_parents_merge_left_to_right(tmp_path):
    write(tmp_path / "a.yaml", "optim:\n  lr: 0.1\n  eps: 1.0e-6\n")
    write(tmp_path / "b.yaml", "optim:\n  lr: 0.2\n")
    cfg = load_config(write(tmp_path / "c.yaml", "extends: [a.yaml, b.yaml]\n"))
    assert (cfg.optim.lr, cfg.optim.eps) == (0.2, 1e-6)


def test_overrides_win_over_files_and_convert_types(tmp_path):
    path = write(tmp_path / "x.yaml", "optim:\n  lr: 0.001\n")
    cfg = load_config(path, ["optim.lr=3e-4", "train.flops=1e15", "data.patching.threshold=1.335", "log.wandb=true"])
    assert cfg.optim.lr == 3e-4 and cfg.train.flops == 1e15
    assert cfg.data.patching.threshold == 1.335 and cfg.log.wandb is True


@pytest.mark.parametrize(
    "overrides, key, expected",
    [
        (["optim.lrr=1"], "optim.lrr", "unknown key"),
        (["nosuch.section=1"], "nosuch", "unknown key"),
        (["optim.lr=abc"], "optim.lr", "could not be converted"),
        (["train.max_steps=1.5"], "train.max_steps", "could not be converted"),
        (["optim.lr=-1"], "optim.lr", "positive"),
        (["optim.schedule=linear"], "optim.schedule", "cosine, wsd, constant"),
        (["train.dtype=fp8"], "train.dtype", "fp32, bf16, fp16"),
        (["parallel.zero_stage=4"], "parallel.zero_stage", "0, 1, 2 or 3"),
        (["parallel.pipeline_stages=2", "parallel.zero_stage=2"], "parallel.zero_stage", "pipeline"),
        (["optim.beta2=1.0"], "optim.beta2", "[0, 1)"),
        (["data.patching.mode=words"], "data.patching.mode", "entropy"),
        (["log.every=0"], "log.every", "positive"),
        (["launch.max_retries=-1"], "launch.max_retries", "non-negative"),
        (["launch.time_min=2", "launch.signal_delay_s=120"], "launch.signal_delay_s", "time limit"),
        (["model.family=rnn"], "model.family", "entropy"),
        (["optim.lr"], "", "key.path=value"),
    ],
)
def test_rejections_name_the_key_path(overrides, key, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert "\n" not in message
    assert info.value.key == key
    assert expected in message


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(write(tmp_path / "bad.yaml", "optim: [unclosed\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path / "list.yaml", "- 1\n- 2\n"))
    write(tmp_path / "p.yaml", "extends: q.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(write(tmp_path / "q.yaml", "extends: p.yaml\n"))
    with pytest.raises(ConfigError, match="extended by"):
        load_config(write(tmp_path / "orphan.yaml", "extends: gone.yaml\n"))
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path / "unknown.yaml", "optim:\n  learning_rate: 1\n"))
    assert info.value.key == "optim.learning_rate"


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["optim.lr=0.005", "run.seed=3"])
    path = save_resolved(cfg, tmp_path / "run")
    assert load_config(path) == cfg
    assert "lr: 0.005" in to_yaml(cfg)


def test_every_shipped_yaml_loads():
    from launch.sweep import load_sweep, plan

    files = sorted((REPO / "configs").rglob("*.yaml"))
    assert files, "no configs shipped"
    for path in files:
        if path.name.startswith("_"):  # fragments meant to be extended, not run on their own
            continue
        if path.parent.name == "sweeps":  # grids of runs: each run's config must load too
            grid = load_sweep(path)
            if grid.patch_sizes and not (REPO / "data" / "local" / "entropies").is_dir():
                continue  # its plan calibrates on data made first (tests/test_launch.py plans it on stand-in data)
            assert plan(grid)
            continue
        load_config(path)


def test_cli_exits_2_with_one_line(tmp_path):
    result = run_cli("train", str(write(tmp_path / "c.yaml", "{}\n")), "optim.lr=abc", "--dry-run")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert "optim.lr" in result.stderr and "Traceback" not in result.stderr


def test_cli_dry_run_prints_resolved_config(tmp_path):
    result = run_cli("train", str(write(tmp_path / "c.yaml", "optim:\n  lr: 0.25\n")), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "lr: 0.25" in result.stdout and "zero_stage" in result.stdout


def test_reduce_bucket_size_reaches_deepspeed_only_when_set():
    from blt_dist.parallel.engine import deepspeed_config

    config = REPO / "configs" / "blt" / "tiny.yaml"
    assert "reduce_bucket_size" not in deepspeed_config(load_config(config), 2)["zero_optimization"]
    cfg = load_config(config, ["parallel.reduce_bucket_size=5e7", "parallel.zero_stage=3"])
    assert deepspeed_config(cfg, 2)["zero_optimization"] == {"stage": 3, "reduce_bucket_size": 50_000_000}
    with pytest.raises(ConfigError, match="parallel.reduce_bucket_size"):
        load_config(config, ["parallel.reduce_bucket_size=-1"])
