"""Checkpoint bookkeeping without DeepSpeed: verification, fallback order, retention."""
from __future__ import annotations

import json

from blt_dist.training.checkpoint import MARKER, list_checkpoints, newest_complete, prune, tag_for, verify


def fake_checkpoint(run_dir, step: int, complete: bool = True):
    tag_dir = run_dir / "checkpoints" / tag_for(step)
    tag_dir.mkdir(parents=True)
    (tag_dir / "model.pt").write_bytes(b"x" * (10 + step))
    if complete:
        files = {"model.pt": 10 + step}
        (tag_dir / MARKER).write_text(json.dumps({"step": step, "files": files}))
    return tag_dir


def test_verify_and_fallback(tmp_path):
    for step in (2, 4):
        fake_checkpoint(tmp_path, step)
    newest = fake_checkpoint(tmp_path, 6)
    fake_checkpoint(tmp_path, 8, complete=False)  # a crash during the save at step 8
    (newest / "model.pt").write_bytes(b"short")  # step 6 damaged after publication
    messages = []
    tag_dir, marker = newest_complete(tmp_path, log=messages.append)
    assert tag_dir.name == "step_00000004" and marker["step"] == 4
    assert "step_00000008: skipped, incomplete" in messages[0] and "step_00000006: skipped" in messages[1]
    assert "truncated" in verify(newest)[1]


def test_prune_keeps_last_k_and_permanent(tmp_path):
    for step in range(1, 11):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 11, complete=False)  # newer than the newest complete one: kept (may be in flight)
    fake_checkpoint(tmp_path, 0, complete=False)  # older and incomplete: can never be resumed, removed
    prune(tmp_path, keep_last=2, permanent_every=4)
    assert [p.name for p in list_checkpoints(tmp_path)] == [tag_for(s) for s in (4, 8, 9, 10, 11)]
