"""`blt-dist train CONFIG [key=value ...]`: one trainer for the entropy model, BLT and BPE.

Read `_train()` top to bottom: set-up, auto-resume, then the loop
    {lr = f(step), forward/backward/step, log, eval, checkpoint, stop check}
and the end (export). The pieces it calls live beside it: step.py (one optimizer step),
run_length.py (steps from a byte or FLOP budget), signals.py (the agreed stop), checkpoint.py,
metrics.py, schedule.py, export.py.

Processes: one process as is; N processes on one machine with torchrun
    torchrun --standalone --nproc_per_node N -m blt_dist.cli train CONFIG ...
(gloo on CPU, NCCL on GPU); under Slurm through launch/, which exports the same variables.
Rerunning the same command on the same run.dir resumes from the newest complete checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import deepspeed
import numpy as np
import torch

from blt_dist.config import Config, add_config_arguments, config_from_args, save_resolved, to_dict, to_yaml
from blt_dist.data.entropies import check_entropy_source
from blt_dist.data.loader import (
    ENTROPY_FORMAT,
    Loader,
    LoaderSpec,
    dataset_format,
    merge_states,
    mixture_plan,
    open_dataset,
)
from blt_dist.errors import UserError
from blt_dist.flops import SampleShape
from blt_dist.hardware import peak_flops
from blt_dist.model import build_model
from blt_dist.model.weights import read_export
from blt_dist.parallel.collectives import (
    abandon,
    all_gather_object,
    broadcast_object,
    reduce_floats,
    reduce_int,
    shutdown,
)
from blt_dist.parallel.engine import (
    apply_activation_checkpointing,
    data_parallel_size,
    deepspeed_config,
    init_distributed,
    initialize_engine,
    set_lr,
)
from blt_dist.parallel.pipeline import build_pipeline, from_model_state_dict
from blt_dist.training import checkpoint, elastic
from blt_dist.training.export import save_export
from blt_dist.training.metrics import MetricsLogger, format_line, memory_gb
from blt_dist.training.run_length import (
    batch_flops,
    check_memory,
    measure_per_sample,
    params_total,
    total_steps_for,
    train_flops_per_byte,
)
from blt_dist.training.schedule import lr_at
from blt_dist.training.signals import Faults, StopRequest
from blt_dist.training.step import all_reduce_sums, pipeline_step, plain_step, zero_sums
from blt_dist.training.validation import ValidationSet, validate

# ---------------------------------------------------------------------------------------------
# Small pieces the loop uses


def batch_digest(batch: dict) -> int:
    """A cheap fingerprint of the data a batch holds, summed into the log to show two runs
    saw the same samples in the same order."""
    return zlib.crc32(batch["tokens"].numpy().tobytes()) ^ zlib.crc32(batch["doc_pos"].numpy().tobytes())


def provenance() -> dict:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return {
        "git_revision": rev or "unknown",
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "numpy": np.__version__,
        "host": platform.node(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def use_deterministic_kernels() -> None:
    """Deterministic kernels where torch has them (a warning names any op without one). cuBLAS
    reads its workspace setting when its first handle is made, at the first matmul: in time."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def drop_metrics_after(run_dir: Path, step: int) -> int:
    """Rewrites metrics.jsonl without the records of steps after `step` (rank 0, on resume).
    A run killed between a log line and its next checkpoint resumes from an earlier step and
    logs those steps again: without this they would appear twice. Returns how many were dropped."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept))
        tmp.replace(path)
    return len(lines) - len(kept)


@dataclass
class Run:
    """What the set-up builds once and the loop uses."""

    engine: object  # DeepSpeed engine (or PipelineEngine)
    loader: Loader
    ds_config: dict
    dp_rank: int
    dp_size: int
    total_steps: int
    length_source: str  # how total_steps was derived, for the log
    marker_info: dict  # what a checkpoint's marker records, and a resume must match
    origin: dict  # provenance
    pipelined: bool
    validation: Optional[ValidationSet]  # the fixed validation documents (None without data.val)
    # matmul peak FLOP/s for MFU; measured when the log opens (after the resume: on a CPU the
    # measurement draws random matrices, and the RNG stream a resume restores must not move)
    peak: float = float("nan")


@dataclass
class Progress:
    """Where the run stands: what every checkpoint saves and a resume restores."""

    step: int = 0
    seen: dict = field(default_factory=lambda: {"bytes": 0, "targets": 0, "flops": 0.0, "flops_executed": 0.0})
    wandb_id: Optional[str] = None
    resumed_from: Optional[str] = None  # checkpoint tag


@dataclass
class Window:
    """What accumulates between two log lines."""

    sums: Optional[torch.Tensor] = None  # [nll, targets, bytes] on the device (step.py), read when logged
    time: float = 0.0
    data_time: float = 0.0
    patches: int = 0
    filled: int = 0
    steps: int = 0
    digest: int = 0
    gnorm: object = float("nan")  # the last finite step's: a float or a device scalar, read when logged
    flops: float = 0.0
    flops_executed: float = 0.0


def train(cfg: Config, stop: "StopRequest | None" = None) -> int:
    """Runs (or resumes) a training run; returns the process exit status (0 also when an agreed
    stop ended it early after saving: `stop.stopped` tells the two apart)."""
    stop = stop or StopRequest()  # before the slow set-up, so an early signal is not lost
    env = init_distributed(cfg.parallel.backend)
    try:
        return _train(cfg, env, stop)
    except BaseException:
        # no barrier here: the other ranks may not reach it; just release the process group
        abandon()
        raise


def _train(cfg: Config, env, stop: StopRequest) -> int:
    run_dir = Path(cfg.run.dir)
    found = find_checkpoint(cfg, env, run_dir)
    change = None
    if found is not None:  # the saved global batch and lanes hold; grad_accum follows the world size
        cfg, change = elastic.plan(cfg, env.world_size, found.marker, found.tag_dir)
    run = set_up(cfg, env, run_dir, found)
    progress = resume(env, run, found, change)
    log = open_log(cfg, env, run, progress, run_dir, change)

    faults = Faults(os.environ.get("BLT_FAULTS", ""))
    nonfinite_in_a_row = failed_saves = 0
    window = Window()
    last_saved = progress.step if progress.resumed_from else -1
    while progress.step < run.total_steps:
        lr = lr_at(progress.step, run.total_steps, cfg.optim)
        set_lr(run.engine, lr)
        started = time.perf_counter()
        batches = [next(run.loader) for _ in range(cfg.train.grad_accum)]
        window.data_time += time.perf_counter() - started
        step_useful, step_executed = count_batches(cfg, run, batches, window)
        if run.pipelined:
            step_sums, nonfinite, gnorm = pipeline_step(run.engine, batches, cfg.model.family)
        else:
            poison = progress.step + 1 in faults.nan_at_steps
            step_sums, nonfinite, gnorm = plain_step(run.engine, batches, cfg.model.family, env.device,
                                                     plain_optimizer(cfg), poison)
        progress.step += 1
        step = progress.step
        window.time += time.perf_counter() - started
        window.steps += 1
        if not nonfinite:
            window.gnorm = gnorm
        faults.after_step(step, env.rank)

        if nonfinite:
            nonfinite_in_a_row += 1
            log.info(f"step {step}: non-finite loss; update skipped ({nonfinite_in_a_row} in a row)")
            if nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
                log.info(f"aborting: {nonfinite_in_a_row} consecutive non-finite losses; the last checkpoint is intact")
                return finish(log, 1)
        else:
            nonfinite_in_a_row = 0
            window.sums = step_sums if window.sums is None else window.sums + step_sums
            # FLOPs seen, like bytes seen, are those of the steps that updated the model
            window.flops += step_useful
            window.flops_executed += step_executed

        stop_now = stop.agreed()
        save_now = bool(cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or stop_now or step == run.total_steps

        # -- log (also right before every save: the bytes and FLOPs a checkpoint records, and the
        # metrics a resumed run continues from, then include every step up to it)
        if step % cfg.log.every == 0 or save_now:
            log_window(cfg, env, run, progress, window, lr, log)
            window = Window()

        # -- eval
        if run.validation and ((cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == run.total_steps):
            val = validate(run.engine, cfg, run.validation, env.device, run.dp_rank, run.dp_size)
            log.log({"step": step, "val_bpb": val.bpb, "val_loss": val.mean_nll, "val_bytes": val.bytes,
                     "val_documents": len(run.validation.documents)},
                    f"step {step}/{run.total_steps} | val bpb {val.bpb:.4f} | val loss {val.mean_nll:.4f} "
                    f"({len(run.validation.documents)} documents, {val.bytes} bytes)")

        # -- checkpoint, stop
        if save_now:
            faults.before_save(run.engine, step, env.rank)
            if save(cfg, env, run, progress, log, run_dir):
                last_saved = step
            elif step < run.total_steps:  # the final save's failure is reported at the end
                failed_saves += 1
                if stop_now or failed_saves > cfg.checkpoint.max_failed_saves:
                    why = "a stop was asked for" if stop_now else (
                        f"{failed_saves} failed saves, checkpoint.max_failed_saves={cfg.checkpoint.max_failed_saves}")
                    log.info(f"stopping at step {step} ({why}): its checkpoint could not be written (see above); "
                             f"{newest_checkpoint(last_saved)}; fix the cause and rerun to resume")
                    return finish(log, 1)
        if stop_now:
            log.info(f"stopped by {stop.signal_name or 'a signal on another rank'} at step {step}; checkpoint saved; "
                     "rerun the same command to resume")
            break

    # -- the end
    step = progress.step
    if step == run.total_steps and last_saved != step:
        log.info(f"training finished at step {step}, but its final checkpoint could not be written (see above); "
                 f"{newest_checkpoint(last_saved)}")
        return finish(log, 1)
    # Every rank leaves the process group before rank 0 consolidates the final checkpoint from
    # its files: a long ZeRO-3 consolidation must not hold the others in a barrier until the
    # process group times out and turns a finished run into a failed one.
    shutdown()
    if step == run.total_steps and env.is_main:
        tag_dir = checkpoint.checkpoint_root(run_dir) / checkpoint.tag_for(step)
        export_dir = save_export(checkpoint.consolidated_state_dict(tag_dir), cfg, run_dir / "export", {"step": step})
        log.info(f"done: {step} steps; fp32 master weights exported to {export_dir}")
    return finish(log, 0)


# ---------------------------------------------------------------------------------------------
# The loop's named steps, in the order it takes them


def initial_weights(cfg: Config, export_dir: Path) -> dict[str, torch.Tensor]:
    """The export's weights for train.init_from, refused unless its model section is this run's
    (the same shapes under another architecture would start from a different function)."""
    try:
        state, export_cfg = read_export(export_dir)
    except UserError as err:
        raise UserError(f"train.init_from: {err}") from None
    theirs, ours = to_dict(export_cfg)["model"], to_dict(cfg)["model"]
    differ = [f"model.{k} (export {theirs.get(k)!r}, this run {ours[k]!r})" for k in ours if theirs.get(k) != ours[k]]
    if differ:
        raise UserError(f"train.init_from: {export_dir} has another model: {'; '.join(differ)}; set these to the "
                        "export's values (its config.yaml)")
    return state


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a run continues from."""

    run_dir: Path
    tag: str
    marker: dict

    @property
    def tag_dir(self) -> Path:
        return checkpoint.checkpoint_root(self.run_dir) / self.tag


def find_checkpoint(cfg: Config, env, run_dir: Path) -> Optional[ResumePoint]:
    """The newest complete checkpoint of the run (or of checkpoint.resume_from), chosen by rank 0
    for every rank; None for a fresh start."""
    resume_dir = Path(cfg.checkpoint.resume_from) if cfg.checkpoint.resume_from else run_dir
    tag = checkpoint.choose_for_resume(resume_dir, env.is_main) if cfg.checkpoint.resume else None
    if tag is None and cfg.checkpoint.resume_from:
        raise UserError(f"checkpoint.resume_from: {resume_dir} holds no complete checkpoint")
    if tag is None:
        return None
    _, _, marker = checkpoint.verify(checkpoint.checkpoint_root(resume_dir) / tag)
    return ResumePoint(resume_dir, tag, marker)


def set_up(cfg: Config, env, run_dir: Path, found: Optional[ResumePoint]) -> Run:
    """Run directory files, the model and its DeepSpeed engine, the loader, the run length."""
    family = cfg.model.family
    ds_config = deepspeed_config(cfg, env.world_size)
    dp_size = data_parallel_size(cfg, env.world_size)
    check_memory(cfg, env.world_size, env.device)
    origin = provenance()
    if env.is_main:
        save_resolved(cfg, run_dir)
        (run_dir / "deepspeed.json").write_text(json.dumps(ds_config, indent=2) + "\n")
        (run_dir / "provenance.json").write_text(json.dumps(origin, indent=2) + "\n")

    if cfg.train.deterministic:
        use_deterministic_kernels()
    seed_everything(cfg.run.seed)  # identical initial weights on every rank
    pipelined = cfg.parallel.pipeline_stages > 1
    # train.init_from: an export's weights start a fresh run (a resume takes the checkpoint's)
    initial = initial_weights(cfg, Path(cfg.train.init_from)) if cfg.train.init_from and found is None else None
    if pipelined:
        model = build_pipeline(cfg.model, cfg.parallel.pipeline_stages, cfg.train.activation_checkpointing,
                               cfg.run.seed, SampleShape.from_data(cfg.data))
        if initial is not None:
            model.load_state_dict(from_model_state_dict(initial, model))  # this stage's layers
    else:
        model = build_model(cfg.model)
        if initial is not None:
            model.load_state_dict(initial)  # before checkpointing wrappers rename the parameters
        if cfg.train.activation_checkpointing:
            apply_activation_checkpointing(model)
    if initial is not None and env.is_main:
        print(f"weights from {cfg.train.init_from} (train.init_from); the optimizer and the step start fresh",
              flush=True)
    engine = initialize_engine(model, cfg.optim.weight_decay, ds_config)
    # every stage of a pipeline reads the same batches: the loader is indexed by data-parallel rank
    dp_rank = engine.grid.get_data_parallel_rank() if pipelined else env.rank
    # the lanes are fixed at the first start; a resume takes the saved count, at any world size
    lanes = found.marker["lanes"] if found else cfg.data.lanes or dp_size * max(cfg.data.num_workers, 1)
    loader = Loader(LoaderSpec.from_config(cfg, family), dp_rank, dp_size, cfg.data.num_workers, lanes)
    if family == "blt" and cfg.data.entropy_model and dataset_format(loader.spec) == ENTROPY_FORMAT:
        for path in filter(None, (cfg.data.train, cfg.data.val)):
            check_entropy_source(path, cfg.data.entropy_model)
    if found and not cfg.train.max_steps:  # measured once, at the first start, and kept
        total_steps, length_source = found.marker["total_steps"], "as saved at the first start"
    else:
        total_steps, length_source = total_steps_for(
            cfg, dp_size, lambda: measure_per_sample(cfg, loader.spec, dp_rank, dp_size, lanes)
        )
    marker_info = {
        "world_size": env.world_size,
        "global_batch": ds_config["train_batch_size"],
        "micro_batch_size": cfg.train.micro_batch_size,
        "grad_accum": cfg.train.grad_accum,
        "lanes": lanes,
        "total_steps": total_steps,
        "dataset_fingerprint": loader.fingerprint,
        "zero_stage": cfg.parallel.zero_stage,
        "pipeline_stages": cfg.parallel.pipeline_stages,
        "family": family,
    }
    validation = ValidationSet.from_config(cfg) if cfg.data.val else None
    seed_everything(cfg.run.seed + env.rank)  # per-rank streams for anything random from here on
    return Run(engine, loader, ds_config, dp_rank, dp_size, total_steps, length_source, marker_info, origin, pipelined,
               validation)


def resume(env, run: Run, found: Optional[ResumePoint], change: Optional[elastic.LayoutChange]) -> Progress:
    """The checkpoint's state (model, optimizer, loader, RNG), if there is one. At the layout
    that saved it, DeepSpeed loads its own files (bit-exact); at another, the checkpoint's
    logical state is written into the new engine (elastic.py)."""
    if found is None:
        return Progress()
    marker = found.marker
    checkpoint.check_compatible(marker, {"dataset_fingerprint": run.marker_info["dataset_fingerprint"]})
    if change is None:
        checkpoint.load_engine(run.engine, found.run_dir, found.tag)
    else:
        elastic.load_logical(run.engine, elastic.read_logical(convert_agreed(found, env)), marker["step"])
    own, first = checkpoint.load_rank_states(found.run_dir, found.tag, env.rank)
    run.loader.load_state_dict(first["loader"])
    if own is not None:  # a rank the saving run did not have keeps the seed it was given
        checkpoint.set_rng_state(own["rng"])
    return Progress(first["step"], {**Progress().seen, **first["seen"]}, first.get("wandb_id"), found.tag)


def convert_agreed(found: ResumePoint, env) -> Path:
    """Rank 0 writes the checkpoint's logical state; a failure there stops every rank with its
    message (the others would otherwise wait for it in a collective until the timeout)."""
    error = path = None
    if env.is_main:
        try:
            path = elastic.convert_once(found.tag_dir, found.marker, True)
        except Exception as err:  # noqa: BLE001 -- reported on every rank below
            error = f"{type(err).__name__}: {err}"
    error, path = broadcast_object((error, path), src=0)
    if error is not None:
        raise UserError(f"checkpoint {found.tag_dir}: could not read its state for the new layout: {error}")
    return path


def open_log(cfg: Config, env, run: Run, progress: Progress, run_dir: Path,
             change: Optional[elastic.LayoutChange]) -> MetricsLogger:
    """metrics.jsonl (and wandb, continuing the run's wandb id), then the run's header line."""
    dropped = drop_metrics_after(run_dir, progress.step) if env.is_main else 0
    # wandb resumes its run: the id is in every checkpoint, and in the run dir from the first
    # start on, so a job stopped before its first checkpoint continues the same wandb run too
    id_file = run_dir / "wandb_id"
    if progress.wandb_id is None and id_file.is_file():
        progress.wandb_id = id_file.read_text().strip() or None
    log = MetricsLogger(run_dir, env.is_main, cfg.log, to_dict(cfg), progress.wandb_id)
    if env.is_main and log.wandb_id and log.wandb_id != progress.wandb_id:
        id_file.write_text(log.wandb_id + "\n")
    tag, step = progress.resumed_from, progress.step
    if change is not None:
        log.info(change.describe(step))
    run.peak, peak_source = peak_flops(cfg.train.dtype, env.device)
    log.info(
        f"{cfg.model.family}: {params_total(cfg) / 1e6:.2f}M params, {train_flops_per_byte(cfg):.3g} train FLOPs/byte "
        f"at the nominal shape, {run.total_steps} steps ({run.length_source}), {env.world_size} ranks ({env.backend}), "
        f"ZeRO-{cfg.parallel.zero_stage}, {cfg.train.dtype}; MFU peak {run.peak / 1e12:.3f} TFLOP/s from {peak_source}"
        + (f"; resumed from {tag} (step {step})" if tag else "")
        + (f"; Slurm restart {os.environ['SLURM_RESTART_COUNT']}" if "SLURM_RESTART_COUNT" in os.environ else "")
    )
    log.info(f"data: {run.loader.describe()}")
    if run.validation:
        log.info(f"validation: {run.validation.describe(cfg)}")
    if dropped:
        log.info(f"metrics.jsonl: dropped {dropped} records after step {step} (logged before a crash, replayed now)")
    return log


def plain_optimizer(cfg: Config) -> bool:
    """DeepSpeed runs a plain torch optimizer (no overflow check of its own) at ZeRO-0 in fp32."""
    return cfg.parallel.zero_stage == 0 and cfg.train.dtype == "fp32"


def count_batches(cfg: Config, run: Run, batches: list[dict], window: Window) -> tuple[float, float]:
    """Adds a step's batches to the window's digest and slot counts; returns their (useful,
    executed) training FLOPs. Pipeline stages all read the same batches: each data-parallel
    batch is counted (digest included) on the last stage only."""
    counts_batches = not run.pipelined or run.engine.is_last_stage()
    step_useful = step_executed = 0.0
    for batch in batches:
        if not counts_batches:
            continue
        # once per data-parallel batch, so that every layout of the same run logs the same digest
        window.digest = (window.digest + batch_digest(batch)) % (1 << 62)
        useful, executed = batch_flops(cfg, batch)
        step_useful, step_executed = step_useful + useful, step_executed + executed
        window.filled += int((batch["doc_ids"] >= 0).sum())
        if cfg.model.family == "blt":
            window.patches += int((batch["patch_lengths"] > 0).sum())
    return step_useful, step_executed


def log_window(cfg: Config, env, run: Run, progress: Progress, window: Window, lr: float, log: MetricsLogger) -> None:
    """One metrics record for the steps since the last one, summed over every rank; adds the
    window's bytes and FLOPs to what the run has seen."""
    seen, step, total_steps = progress.seen, progress.step, run.total_steps
    sums = all_reduce_sums(window.sums if window.sums is not None else zero_sums(env.device), env.device)
    useful, executed = reduce_floats([window.flops, window.flops_executed])  # float64: FLOPs overflow int64
    seen["bytes"] += sums.bytes
    seen["targets"] += sums.targets
    seen["flops"] += useful
    seen["flops_executed"] += executed
    elapsed = max(window.time, 1e-9)
    # MFU counts the useful FLOPs (the model's work on real bytes: comparable across families);
    # mfu_executed counts every slot the static shapes run, padding included (the hardware's
    # view). Both over the matmul peak of every rank together.
    peak = run.peak
    job_peak = env.world_size * peak
    samples = window.steps * run.ds_config["train_batch_size"]
    record = {
        "step": step, "total_steps": total_steps, "loss": sums.mean_nll, "bpb": sums.bpb, "lr": lr,
        "grad_norm": float(window.gnorm), "data_digest": reduce_int(window.digest),
        "bytes_per_s": sums.bytes / elapsed, "tflops": useful / elapsed / 1e12,
        "mfu": useful / elapsed / job_peak if peak == peak else float("nan"),
        "mfu_executed": executed / elapsed / job_peak if peak == peak else float("nan"),
        "padding_fraction": 1 - useful / executed if executed else float("nan"),
        "memory_gb": memory_gb(env.device), "data_fraction": window.data_time / elapsed,
        "eta_s": elapsed / window.steps * (total_steps - step),
        "bytes_seen": seen["bytes"], "flops_seen": seen["flops"], "flops_executed_seen": seen["flops_executed"],
    }
    if cfg.model.family == "blt":
        patches = reduce_int(window.patches)
        record["mean_patch_size"] = sums.bytes / max(patches, 1)
        record["patches_per_sample"] = patches / samples
        record["byte_slots_per_sample"] = reduce_int(window.filled) / samples
    log.log(record, format_line(record))


def save(cfg: Config, env, run: Run, progress: Progress, log: MetricsLogger, run_dir: Path) -> bool:
    """A checkpoint at the current step on every rank (published when all of them wrote theirs),
    then keep-last-k pruning on rank 0. False when it could not be written (the run goes on)."""
    # the loader state is the run's (every rank's lanes): gathered and saved once, by rank 0
    loader_states = all_gather_object(run.loader.state_dict())
    rank_state = {
        "step": progress.step, "seen": progress.seen, "loader": merge_states(loader_states) if env.is_main else None,
        "rng": checkpoint.rng_state(), "wandb_id": log.wandb_id, "config": to_dict(cfg), "provenance": run.origin,
    }
    ok = checkpoint.save(run.engine, run_dir, progress.step, rank_state, run.marker_info, env.rank, log=log.info)
    if ok and env.is_main:
        checkpoint.prune(run_dir, cfg.checkpoint.keep_last, cfg.checkpoint.permanent_every)
    return ok


def newest_checkpoint(step: int) -> str:
    return f"the newest checkpoint is step {step}" if step >= 0 else "no checkpoint yet"


def finish(log: MetricsLogger, status: int) -> int:
    log.close()
    shutdown()
    return status


# ---------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.dry_run:
        print(to_yaml(cfg), end="")
        if cfg.data.mixture and cfg.data.train:
            spec = LoaderSpec.from_config(cfg, cfg.model.family)
            print(f"# data.mixture over {cfg.data.train} (bytes per epoch, expected repeats):")
            print("\n".join(f"#   {line}" for line in mixture_plan(spec, open_dataset(spec, verify=False)).describe()))
        return 0
    if not cfg.data.train:
        raise UserError("data.train: no training dataset (prepare one with `blt-dist prepare`, then data.train=DIR)")
    status = train(cfg)
    # Every file is written and closed and the process group is destroyed. What is left is the
    # interpreter's own teardown, in which gloo/DeepSpeed threads still alive in static objects
    # occasionally abort the process ("terminate called without an active exception", seen on
    # a ZeRO-3 rank under load): a finished run must not exit as a crash, so skip that teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
