"""Sharded checkpoints: DeepSpeed state per rank, our state per rank, published atomically.

    RUN/checkpoints/step_00000100/
        mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt ...   DeepSpeed (per rank)
        rank_00000.pt ...         per rank: RNG states (ours); rank 0 also the step, counters and
                                  the loader state of the whole run (every lane)
        COMPLETE                  written last, by rank 0, after every rank has finished:
                                  step, world size, global batch, dataset fingerprint and the
                                  size of every file, so damage is detected before loading

A directory without COMPLETE, or whose files no longer match it (truncated, missing), is not a
checkpoint. Resume takes the newest complete one and falls back to older ones, saying why.
Retention: the newest `keep_last`, plus every checkpoint at a multiple of `permanent_every`;
an elastic resume's `<tag>.logical/` (elastic.py) is removed with its checkpoint.
A failed save (disk full, write error) removes its partial directory and leaves every earlier
checkpoint untouched. Only I/O errors count as a failed save; any other exception on any rank is
a bug, and every rank raises, after the ranks have agreed on it, so none is left waiting in a
collective for one that is gone.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from blt_dist import shims
from blt_dist.errors import UserError
from blt_dist.parallel.collectives import all_gather_object, barrier, broadcast_object, reduce_int
from blt_dist.parallel.pipeline import consolidate_pipeline_checkpoint, to_model_state_dict

MARKER = "COMPLETE"
TAG_RE = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


# ---------------------------------------------------------------------------------------------
# Finding checkpoints


def verify(tag_dir: Path) -> tuple[bool, str, dict]:
    """(ok, reason, marker) for one checkpoint directory."""
    marker_path = tag_dir / MARKER
    if not marker_path.is_file():
        return False, "incomplete (no COMPLETE marker)", {}
    try:
        marker = json.loads(marker_path.read_text())
        files = marker["files"]
    except (OSError, ValueError, KeyError) as err:
        return False, f"unreadable marker ({err})", {}
    for rel, size in files.items():
        path = tag_dir / rel
        if not path.is_file():
            return False, f"missing file {rel}", marker
        if path.stat().st_size != size:
            return False, f"{rel} is {path.stat().st_size} bytes, expected {size} (truncated?)", marker
    return True, "", marker


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint directories (complete or not), oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and TAG_RE.match(p.name))


def newest_complete(run_dir: str | Path, log=print) -> Optional[tuple[Path, dict]]:
    """The newest checkpoint that verifies; reports every newer one it had to skip."""
    for tag_dir in reversed(list_checkpoints(run_dir)):
        ok, reason, marker = verify(tag_dir)
        if ok:
            return tag_dir, marker
        log(f"checkpoint {tag_dir}: skipped, {reason}; falling back to the previous one")
    return None


# ---------------------------------------------------------------------------------------------
# RNG state


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# Save


def _all_ok(ok: bool) -> bool:
    """True only if every rank says ok."""
    return bool(reduce_int(ok, "min"))


# What torch's file writer (used by torch.save, inside DeepSpeed's save too) raises when a write
# fails: a RuntimeError, not an OSError. A full disk reads "unexpected pos" or "file write failed".
TORCH_WRITE_FAILURES = ("PytorchStreamWriter failed", "file write failed", "unexpected pos")


def is_io_error(err: BaseException) -> bool:
    """A failed write (disk full, permissions, I/O): the save failed, the run may go on."""
    if isinstance(err, OSError):
        return True
    return isinstance(err, RuntimeError) and any(marker in str(err) for marker in TORCH_WRITE_FAILURES)


class SaveBug(RuntimeError):
    """A rank failed while saving with an error that is not I/O: a bug; every rank stops."""


def save(engine, run_dir: str | Path, step: int, rank_state: dict, marker_info: dict, rank: int, log=print) -> bool:
    """Collective: every rank calls it. Returns True when the checkpoint was published."""
    root = checkpoint_root(run_dir)
    tag = tag_for(step)
    tag_dir = root / tag
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tag_dir.exists():  # left by a crashed save at the same step: never published
            shutil.rmtree(tag_dir)
    barrier()
    error = None
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state={"step": step}, save_latest=False)
    except Exception as err:  # noqa: BLE001 -- classified below, after every rank has agreed
        error = err
        # DeepSpeed's save_checkpoint ends with one barrier after its writes (shims.py checks the
        # version it was read in). A rank whose write raised skipped it, and the other ranks wait
        # in it: take it here, so that every rank reaches the agreement below.
        barrier()
    if error is None:
        try:
            path = tag_dir / f"rank_{rank:05d}.pt"
            torch.save(rank_state, str(path) + ".tmp")
            os.replace(str(path) + ".tmp", path)
        except Exception as err:  # noqa: BLE001
            error = err
    # 0: written; 1: an I/O error (the save failed); 2: anything else (a bug: everyone stops).
    # Every rank's outcome reaches every rank, so rank 0 (the one that logs) can name them all.
    status = 0 if error is None else 1 if is_io_error(error) else 2
    message = ""
    if error is not None:
        free = shutil.disk_usage(root).free / 1e6  # torch reports a full disk as "unexpected pos"
        message = f"{type(error).__name__}: {error} ({free:.1f} MB free on {root})"
    outcomes = all_gather_object((status, message))
    failed = [(r, m) for r, (st, m) in enumerate(outcomes) if st]
    for failed_rank, text in failed:
        log(f"checkpoint {tag}: save failed on rank {failed_rank}: {text}")
    if failed:
        if rank == 0:
            shutil.rmtree(tag_dir, ignore_errors=True)  # never published: nothing may resume from it
        bugs = [r for r, (st, _) in enumerate(outcomes) if st == 2]
        if status == 2:
            raise error
        if bugs:
            raise SaveBug(f"checkpoint {tag}: rank {bugs[0]} failed while saving with an error that is not I/O "
                          f"(its log has the traceback); stopping every rank")
        if rank == 0:
            log(f"checkpoint {tag}: not published; earlier checkpoints are untouched")
        return False
    published = True
    if rank == 0:
        try:
            files = {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*")) if p.is_file()}
            marker = {"step": step, "files": files, **marker_info}
            tmp = tag_dir / (MARKER + ".tmp")
            tmp.write_text(json.dumps(marker, indent=1, sort_keys=True))
            os.replace(tmp, tag_dir / MARKER)
        except OSError as err:
            log(f"checkpoint {tag}: could not write the completion marker ({err}); not published")
            shutil.rmtree(tag_dir, ignore_errors=True)
            published = False
    return _all_ok(published)


def prune(run_dir: str | Path, keep_last: int, permanent_every: int) -> list[Path]:
    """Deletes old ephemeral checkpoints (rank 0 only). Incomplete ones older than the newest
    complete checkpoint are deleted too; they can never be resumed from."""
    checkpoints = list_checkpoints(run_dir)
    complete = [p for p in checkpoints if (p / MARKER).is_file()]
    keep = set(complete[-keep_last:])
    if permanent_every:
        keep |= {p for p in complete if int(TAG_RE.match(p.name).group(1)) % permanent_every == 0}
    newest = complete[-1] if complete else None
    removed = []
    for p in checkpoints:
        if p in keep or newest is None or p.name > newest.name:
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    # an elastic resume's logical state (elastic.py) goes with the checkpoint it was read from
    root = checkpoint_root(run_dir)
    for derived in root.glob("step_*.logical*") if root.is_dir() else ():
        if not (root / derived.name.split(".")[0]).is_dir():
            shutil.rmtree(derived, ignore_errors=True)
            removed.append(derived)
    return removed


# ---------------------------------------------------------------------------------------------
# Load


def choose_for_resume(run_dir: str | Path, is_main: bool, log=print) -> Optional[str]:
    """Rank 0 picks the checkpoint (newest complete); every rank gets the same answer."""
    choice = None
    if is_main:
        found = newest_complete(run_dir, log=log)
        choice = found[0].name if found else None
    return broadcast_object(choice, src=0)


def check_compatible(marker: dict, expected: dict) -> None:
    """World size, global batch and dataset must match: resuming otherwise would not be exact."""
    for key, now in expected.items():
        saved = marker.get(key)
        if saved != now:
            raise UserError(
                f"checkpoint was written with {key}={saved}, this run has {key}={now}; an exact resume needs "
                "the same value (export the checkpoint with `blt-dist export` to start a new run from its weights)"
            )


def load_engine(engine, run_dir: str | Path, tag: str) -> None:
    """DeepSpeed's own state, at the layout that saved it (bit-exact)."""
    root = checkpoint_root(run_dir)
    load_path, _ = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False)
    if load_path is None:
        raise UserError(f"{root / tag}: DeepSpeed could not load this checkpoint")


def load_rank_states(run_dir: str | Path, tag: str, rank: int) -> tuple[Optional[dict], dict]:
    """(this rank's own state, None for a rank the saving run did not have; rank 0's, which
    holds the run's step, counters and loader state)."""
    tag_dir = checkpoint_root(run_dir) / tag

    def read(r: int) -> dict:
        return torch.load(tag_dir / f"rank_{r:05d}.pt", weights_only=False)

    first = read(0)
    own = first if rank == 0 else read(rank) if (tag_dir / f"rank_{rank:05d}.pt").is_file() else None
    return own, first


# ---------------------------------------------------------------------------------------------
# Consolidation: a checkpoint of any layout -> the fp32 master weights under the plain names
#
# Where the masters sit depends on the optimizer DeepSpeed chose for the layout (read in 0.19.8;
# shims.py tracks the code):
#   fp32 training          the module weights are the masters, on every layout;
#   ZeRO-1/2/3             the ZeRO optimizer's flat shards (DeepSpeed's zero_to_fp32 reads them);
#   ZeRO-0, bf16           FP16_UnfusedOptimizer's fp32_groups in mp_rank_00_model_states.pt;
#   pipeline, bf16         BF16_Optimizer's flat partitions, one file per stage and data rank.
# The module weights of a bf16 run are the masters rounded to bf16: each reader checks that
# every master it returns rounds to its module weight, so a misread layout fails loudly.


def consolidated_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The fp32 master weights of a complete checkpoint, whatever its ZeRO stage or pipeline
    layout, as the plain model's state dict (buffers included)."""
    ok, reason, marker = verify(tag_dir)
    if not ok:
        raise UserError(f"{tag_dir}: not a complete checkpoint ({reason})")
    pipelined = marker.get("pipeline_stages", 1) > 1
    if marker.get("zero_stage", 0) >= 1 and not pipelined:
        return shims.zero_to_fp32_state_dict(str(tag_dir.parent), tag_dir.name)
    if pipelined:
        module = consolidate_pipeline_checkpoint(tag_dir)
        bf16 = sorted(tag_dir.glob("bf16_zero_pp_rank_*_optim_states.pt"))
        masters = _pipeline_masters(bf16) if bf16 else {}
        buffers: set = set()  # the models have none; a layer file does not say which are
    else:
        states = _model_states(tag_dir)
        buffers = set(states.get("buffer_names") or ())
        module = {name: t.float() for name, t in states["module"].items()}
        bf16_weights = any(t.dtype == torch.bfloat16 for t in states["module"].values())
        masters = _zero0_masters(states, buffers, tag_dir) if bf16_weights else {}
    if not masters:  # fp32 training: the module weights are the masters
        return module
    return _checked_masters(module, masters, buffers, tag_dir)


def _model_states(tag_dir: Path) -> dict:
    path = tag_dir / "mp_rank_00_model_states.pt"
    if not path.is_file():
        raise UserError(f"{tag_dir}: no mp_rank_00_model_states.pt")
    return torch.load(path, map_location="cpu", weights_only=False)


def _zero0_masters(states: dict, buffers: set, tag_dir: Path) -> dict[str, torch.Tensor]:
    """Names for the unfused optimizer's fp32 groups: the trainer's optimizer_groups order (the
    decay group, then the rest, each in parameter order)."""
    from blt_dist.parallel.engine import decays  # lazy: engine imports deepspeed (0.3 s) for training only

    params = [(name, t) for name, t in states["module"].items() if name not in buffers]
    order = [[name for name, t in params if decays(name, t.dim())],
             [name for name, t in params if not decays(name, t.dim())]]
    groups = shims.unfused_optimizer_masters(states)
    if [len(g) for g in groups] != [len(names) for names in order]:
        raise UserError(f"{tag_dir}: optimizer groups of {[len(g) for g in groups]} tensors, but the model's "
                        f"parameters split {[len(n) for n in order]} (written by another version of the trainer?)")
    return {name: t.float() for names, group in zip(order, groups) for name, t in zip(names, group)}


def _pipeline_masters(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every stage's and data rank's fragments, joined in data-rank order, under plain names."""
    name_re = re.compile(r"bf16_zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
    fragments: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for path in files:
        dp_rank = int(name_re.search(path.name).group(1))
        for group in shims.bf16_optimizer_fragments(torch.load(path, map_location="cpu", weights_only=False)):
            for name, fragment in group.items():
                fragments.setdefault(name, []).append((dp_rank, fragment))
    joined = {name: torch.cat([f for _, f in sorted(parts, key=lambda p: p[0])]).float()
              for name, parts in fragments.items()}
    return to_model_state_dict(joined)


def _checked_masters(module: dict[str, torch.Tensor], masters: dict[str, torch.Tensor], buffers: set,
                     tag_dir: Path) -> dict[str, torch.Tensor]:
    """The masters shaped as the module's weights, each checked to round to it; buffers (no
    master) keep the module's values."""
    out = dict(module)
    for name, master in masters.items():
        if name not in module or master.numel() != module[name].numel():
            raise UserError(f"{tag_dir}: master weight {name!r} ({master.numel()} values) does not match the model")
        master = master.view(module[name].shape)
        if not torch.equal(master.to(torch.bfloat16).float(), module[name]):
            raise UserError(f"{tag_dir}: master weight {name!r} does not round to the module's bf16 weight "
                            "(the checkpoint's optimizer state was misread)")
        out[name] = master
    missing = sorted(set(module) - set(masters) - buffers)
    if missing:
        raise UserError(f"{tag_dir}: no master weights for {missing[:5]}")
    return out
