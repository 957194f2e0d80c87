"""`blt-dist train CONFIG [key=value ...]`: one trainer for the entropy model, BLT and BPE.

Read `train()` top to bottom: setup, auto-resume, then the loop
    {lr = f(step), forward/backward/step, log, eval, checkpoint, stop check}.

Processes: one process as is; N processes on one machine with torchrun
    torchrun --standalone --nproc_per_node N -m blt_dist.cli train CONFIG ...
(gloo on CPU, NCCL on GPU); under Slurm through launch/, which exports the same variables.
Rerunning the same command on the same run.dir resumes from the newest complete checkpoint.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from blt_dist import checkpoint
from blt_dist.config import Config, add_config_arguments, config_from_args, save_resolved, to_dict, to_yaml
from blt_dist.errors import UserError
from blt_dist.loss import LossSums, loss_and_sums
from blt_dist.metrics import MetricsLogger, format_line, memory_gb, peak_flops
from blt_dist.parallel.engine import reduce_int
from blt_dist.schedule import lr_at

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


# ---------------------------------------------------------------------------------------------
# Small pieces the loop uses


class StopRequest:
    """Set by SIGTERM/SIGUSR1/SIGUSR2 (Slurm preemption and time limits, scancel --signal). The
    flag is agreed across ranks every step so that every rank saves at the same step.

    Creating one installs the handlers; launch/ creates it before anything slow so that a signal
    that arrives during start-up is kept, and passes it to `train()`. `signals` lists what this
    rank received, in order; `stopped` says the loop ended early on an agreed stop (this rank's
    signal or another's)."""

    def __init__(self):
        self.requested = False
        self.stopped = False
        self.signals: list[str] = []
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    @property
    def signal_name(self) -> str:
        return self.signals[-1] if self.signals else ""

    def _handle(self, signum, frame):
        self.requested = True
        self.signals.append(signal.Signals(signum).name)

    def agreed(self) -> bool:
        self.stopped = self.stopped or bool(reduce_int(self.requested, "max"))
        return self.stopped


class Faults:
    """Fault injection for the resume, NaN and retry tests, from BLT_FAULTS, e.g.
    "kill_after_step=3" (SIGKILL this process, rank 0 only, right after that step),
    "raise_after_step=2" (rank 0 raises RuntimeError right after that step: a crash that is
    not a preemption), "nan_at_steps=4,5" (make those steps' loss NaN on every rank) or
    "step_sleep_s=0.1" (every step takes at least that long: a pace the Slurm tests can
    interrupt mid-run, whatever the machine's speed). Empty in real runs."""

    def __init__(self, spec: str):
        items = dict(item.split("=", 1) for item in spec.split(";") if item)
        self.kill_after_step = int(items.get("kill_after_step", -1))
        self.raise_after_step = int(items.get("raise_after_step", -1))
        self.nan_at_steps = {int(x) for x in items.get("nan_at_steps", "").split(",") if x}
        self.step_sleep_s = float(items.get("step_sleep_s", 0))

    def after_step(self, step: int, rank: int) -> None:
        if self.step_sleep_s:
            time.sleep(self.step_sleep_s)
        if step == self.kill_after_step and rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        if step == self.raise_after_step and rank == 0:
            raise RuntimeError(f"BLT_FAULTS: injected failure after step {step}")


def batch_digest(batch: dict) -> int:
    """A cheap fingerprint of the data a batch holds, summed into the log to show two runs
    saw the same samples in the same order."""
    import zlib

    return zlib.crc32(batch["tokens"].numpy().tobytes()) ^ zlib.crc32(batch["doc_pos"].numpy().tobytes())


def model_inputs(batch: dict, family: str, device) -> tuple:
    if family == "blt":
        return batch["tokens"].to(device), batch["patch_lengths"].to(device), batch["doc_ids"].to(device)
    return batch["tokens"].to(device), batch["doc_ids"].to(device)


def all_reduce_sums(sums: LossSums, device) -> LossSums:
    t = sums.as_tensor().to(device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return LossSums.from_tensor(t.cpu())


def all_reduce_floats(values: list[float], device) -> list[float]:
    """Sums over every rank (float64: FLOP counts overflow what reduce_int's int64 holds)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.cpu().tolist()


def measure_per_sample(cfg: Config, spec, rank: int, world_size: int, probe_bytes: float = 8e6,
                       max_batches: int = 4000) -> tuple[float, float]:
    """(raw bytes, useful training FLOPs) one sample holds, measured on this rank's own data
    stream (a separate loader: the training loader's state is untouched) over about `probe_bytes`
    (documents are up to tens of KB: a short probe sees only a few of them). Deterministic, so a
    resumed run derives the same step count. BLT samples hold fewer bytes and patches than their
    slots (whole patches only) and a BPE token covers a data-dependent number of bytes: a guess
    from the config (assumed patch size, bytes per token) would miss a FLOP budget by the
    difference, and unequally for the two families."""
    from blt_dist.data.loader import Loader

    probe = Loader(spec, rank, world_size)
    total, flops, batches = 0, 0.0, 0
    while total < probe_bytes and batches < max_batches:
        batch = next(probe)
        total += int(batch["target_bytes"].sum())
        flops += batch_flops(cfg, batch).useful
        batches += 1
    measured = torch.tensor([total, flops, batches * spec.micro_batch_size], dtype=torch.float64)
    if dist.is_initialized():  # every rank must derive the same step count
        dist.all_reduce(measured)
    return float(measured[0] / measured[2]), float(measured[1] / measured[2])


def train_flops_per_byte(cfg: Config) -> float:
    from blt_dist.flops import SampleShape, train_flops_per_byte as counter

    return counter(cfg.model, SampleShape.from_data(cfg.data))


def batch_flops(cfg: Config, batch: dict):
    """(useful, executed) training FLOPs of one micro-batch from what its samples really hold:
    filled byte slots (or tokens) and, for BLT, patches; executed counts every slot, padding
    included (flops.batch_train_flops). The assumed mean patch size plays no part."""
    from blt_dist.flops import SampleShape, batch_train_flops

    positions = (batch["doc_ids"] >= 0).sum(dim=1).tolist()  # padding has doc id -1
    patches = (batch["patch_lengths"] > 0).sum(dim=1).tolist() if cfg.model.family == "blt" else None
    return batch_train_flops(cfg.model, SampleShape.from_data(cfg.data), positions, patches)


def params_total(cfg: Config) -> int:
    from blt_dist.flops import params_by_component

    return sum(params_by_component(cfg.model).values())


def total_steps_for(cfg: Config, dp_size: int, measure) -> tuple[int, str]:
    """(steps, how they were derived): train.max_steps if set, else the steps whose bytes meet
    train.max_bytes or whose useful training FLOPs meet train.flops, from `measure()` -> (bytes,
    useful FLOPs) per sample, measured on the run's data (only called then). The LR schedule
    needs the count up front; the log reports the FLOPs and bytes actually spent."""
    t = cfg.train
    if t.max_steps:
        return t.max_steps, "train.max_steps"
    if not (t.max_bytes or t.flops):
        raise UserError("train: set one of max_steps, max_bytes or flops to define the run length")
    bytes_per_sample, flops_per_sample = measure()
    samples_per_step = t.micro_batch_size * t.grad_accum * dp_size
    if t.max_bytes:
        steps = max(1, round(t.max_bytes / (bytes_per_sample * samples_per_step)))
        return steps, f"train.max_bytes={t.max_bytes:.3g} at {bytes_per_sample:.1f} measured bytes/sample"
    steps = max(1, round(t.flops / (flops_per_sample * samples_per_step)))
    return steps, (f"train.flops={t.flops:.3g} at {flops_per_sample:.3g} measured useful FLOPs/sample "
                   f"({bytes_per_sample:.1f} bytes, {flops_per_sample / bytes_per_sample:.3g} FLOPs/byte)")


def check_memory(cfg: Config, world_size: int, device) -> None:
    """Fails fast, before allocating, when weights + gradients + AdamW state cannot fit on CPU."""
    if device.type != "cpu":
        return
    params = params_total(cfg)
    shard = world_size if cfg.parallel.zero_stage >= 1 else 1
    # fp32 weights 4 B + grads 4 B (sharded at ZeRO-2+) + Adam moments 8 B (sharded at ZeRO-1+)
    per_param = 4 + (4 / shard if cfg.parallel.zero_stage >= 2 else 4) + 8 / shard
    if cfg.parallel.zero_stage >= 3:
        per_param = 16 / shard
    needed = params * per_param * (world_size if device.type == "cpu" else 1)  # all ranks share this machine
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if needed > 0.9 * available:
        raise UserError(
            f"model: {params / 1e9:.2f}B parameters need about {needed / 1e9:.1f} GB for weights, gradients and "
            f"AdamW state on this machine ({world_size} ranks, ZeRO-{cfg.parallel.zero_stage}), before activations; "
            f"{available / 1e9:.1f} GB is free. Use a smaller config, more machines, or a GPU cluster."
        )


def provenance() -> dict:
    import deepspeed

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


def evaluate(engine, cfg: Config, family: str, device, batches: int, dp_rank: int, dp_size: int) -> LossSums:
    """bpb on the first `batches` batches of the validation data (the same ones every time)."""
    from dataclasses import replace

    from blt_dist.data.loader import Loader, LoaderSpec

    spec = replace(LoaderSpec.from_config(cfg, family, split="val"), shuffle=False)
    loader = Loader(spec, dp_rank, dp_size)
    sums = LossSums()
    pipelined = cfg.parallel.pipeline_stages > 1
    engine.eval()
    with torch.no_grad():
        for _ in range(batches):
            batch = next(loader)
            if pipelined:
                from blt_dist.parallel.pipeline import pipeline_batch

                engine.eval_batch(iter([pipeline_batch(batch, family)]), num_micro_batches=1)
                if engine.is_last_stage():
                    sums = sums.add(engine.module.loss_fn.take_sums())
                continue
            logits = engine(*model_inputs(batch, family, device))
            sums = sums.add(loss_and_sums(logits, batch["targets"].to(device), batch["target_bytes"].to(device))[1])
    engine.train()
    return all_reduce_sums(sums, device)


# ---------------------------------------------------------------------------------------------
# The loop


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


def train(cfg: Config, stop: "StopRequest | None" = None) -> int:
    """Runs (or resumes) a training run; returns the process exit status (0 also when an agreed
    stop ended it early after saving: `stop.stopped` tells the two apart)."""
    from blt_dist.parallel.engine import init_distributed

    stop = stop or StopRequest()  # before the slow set-up, so an early signal is not lost
    env = init_distributed(cfg.parallel.backend)
    try:
        return _train(cfg, env, stop)
    except BaseException:
        # no barrier here: the other ranks may not reach it; just release the process group
        if dist.is_initialized():
            dist.destroy_process_group()
        raise


def _train(cfg: Config, env, stop: StopRequest) -> int:
    import deepspeed

    from blt_dist.data.loader import Loader, LoaderSpec
    from blt_dist.model import build_model
    from blt_dist.parallel.engine import (
        apply_activation_checkpointing,
        data_parallel_size,
        deepspeed_config,
        optimizer_groups,
        set_lr,
        shutdown_distributed,
    )

    # -- setup -------------------------------------------------------------------------------
    family = cfg.model.family
    run_dir = Path(cfg.run.dir)
    ds_config = deepspeed_config(cfg, env.world_size)
    dp_size = data_parallel_size(cfg, env.world_size)
    check_memory(cfg, env.world_size, env.device)
    origin = provenance()
    if env.is_main:
        save_resolved(cfg, run_dir)
        (run_dir / "deepspeed.json").write_text(json.dumps(ds_config, indent=2) + "\n")
        (run_dir / "provenance.json").write_text(json.dumps(origin, indent=2) + "\n")

    seed_everything(cfg.run.seed)  # identical initial weights on every rank
    pipelined = cfg.parallel.pipeline_stages > 1
    if pipelined:
        from blt_dist.flops import SampleShape
        from blt_dist.parallel.pipeline import build_pipeline

        model = build_pipeline(cfg.model, cfg.parallel.pipeline_stages, cfg.train.activation_checkpointing,
                               cfg.run.seed, SampleShape.from_data(cfg.data))
    else:
        model = build_model(cfg.model)
        if cfg.train.activation_checkpointing:
            apply_activation_checkpointing(model)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=optimizer_groups(model, cfg.optim.weight_decay), config=ds_config
    )
    # every stage of a pipeline reads the same batches: the loader is indexed by data-parallel rank
    dp_rank = engine.grid.get_data_parallel_rank() if pipelined else env.rank
    loader = Loader(LoaderSpec.from_config(cfg, family), dp_rank, dp_size, cfg.data.num_workers)
    if family == "blt" and cfg.data.entropy_model:
        from blt_dist.data.entropies import check_entropy_source
        from blt_dist.data.loader import ENTROPY_FORMAT, dataset_format

        if dataset_format(loader.spec) == ENTROPY_FORMAT:
            for path in filter(None, (cfg.data.train, cfg.data.val)):
                check_entropy_source(path, cfg.data.entropy_model)
    flops_per_byte = train_flops_per_byte(cfg)
    total_steps, length_source = total_steps_for(
        cfg, dp_size, lambda: measure_per_sample(cfg, loader.spec, dp_rank, dp_size)
    )
    marker_info = {
        "world_size": env.world_size,
        "global_batch": ds_config["train_batch_size"],
        "dataset_fingerprint": loader.fingerprint,
        "zero_stage": cfg.parallel.zero_stage,
        "pipeline_stages": cfg.parallel.pipeline_stages,
        "family": family,
    }
    seed_everything(cfg.run.seed + env.rank)  # per-rank streams for anything random from here on

    # -- auto-resume -------------------------------------------------------------------------
    step, seen = 0, {"bytes": 0, "targets": 0, "flops": 0.0, "flops_executed": 0.0}
    wandb_id = None
    resume_dir = Path(cfg.checkpoint.resume_from) if cfg.checkpoint.resume_from else run_dir
    tag = checkpoint.choose_for_resume(resume_dir, env.is_main) if cfg.checkpoint.resume else None
    if tag is None and cfg.checkpoint.resume_from:
        raise UserError(f"checkpoint.resume_from: {resume_dir} holds no complete checkpoint")
    if tag is not None:
        _, _, marker = checkpoint.verify(checkpoint.checkpoint_root(resume_dir) / tag)
        must_match = ("world_size", "pipeline_stages", "global_batch", "dataset_fingerprint")
        checkpoint.check_compatible(marker, {k: marker_info[k] for k in must_match})
        state = checkpoint.load(engine, resume_dir, tag, env.rank)
        loader.load_state_dict(state["loader"])
        checkpoint.set_rng_state(state["rng"])
        step, seen, wandb_id = state["step"], {**seen, **state["seen"]}, state.get("wandb_id")
    dropped = drop_metrics_after(run_dir, step) if env.is_main else 0
    # wandb resumes its run: the id is in every checkpoint, and in the run dir from the first
    # start on, so a job stopped before its first checkpoint continues the same wandb run too
    id_file = run_dir / "wandb_id"
    if wandb_id is None and id_file.is_file():
        wandb_id = id_file.read_text().strip() or None
    log = MetricsLogger(run_dir, env.is_main, cfg.log, to_dict(cfg), wandb_id)
    if env.is_main and log.wandb_id and log.wandb_id != wandb_id:
        id_file.write_text(log.wandb_id + "\n")
    peak, peak_source = peak_flops(cfg.train.dtype, env.device)
    log.info(
        f"{family}: {params_total(cfg) / 1e6:.2f}M params, {flops_per_byte:.3g} train FLOPs/byte at the nominal shape, "
        f"{total_steps} steps ({length_source}), {env.world_size} ranks ({env.backend}), ZeRO-{cfg.parallel.zero_stage}, {cfg.train.dtype}; "
        f"MFU peak {peak / 1e12:.3f} TFLOP/s from {peak_source}"
        + (f"; resumed from {tag} (step {step})" if tag else "")
        + (f"; Slurm restart {os.environ['SLURM_RESTART_COUNT']}" if "SLURM_RESTART_COUNT" in os.environ else "")
    )
    if dropped:
        log.info(f"metrics.jsonl: dropped {dropped} records after step {step} (logged before a crash, replayed now)")

    def save(at_step: int) -> bool:
        rank_state = {
            "step": at_step, "seen": seen, "loader": loader.state_dict(), "rng": checkpoint.rng_state(),
            "wandb_id": log.wandb_id, "config": to_dict(cfg), "provenance": origin,
        }
        ok = checkpoint.save(engine, run_dir, at_step, rank_state, marker_info, env.rank, log=log.info)
        if ok and env.is_main:
            checkpoint.prune(run_dir, cfg.checkpoint.keep_last, cfg.checkpoint.permanent_every)
        return ok

    # -- the loop ----------------------------------------------------------------------------
    faults = Faults(os.environ.get("BLT_FAULTS", ""))
    nonfinite_in_a_row = 0
    plain_optimizer = cfg.parallel.zero_stage == 0 and cfg.train.dtype == "fp32"
    window = _new_window()
    # pipeline stages all read the same batches: count each data-parallel batch on one of them
    counts_batches = not pipelined or engine.is_last_stage()
    last_saved = step if tag else -1
    while step < total_steps:
        lr = lr_at(step, total_steps, cfg.optim)
        set_lr(engine, lr)
        started = time.perf_counter()
        data_started = time.perf_counter()
        batches = [next(loader) for _ in range(cfg.train.grad_accum)]
        window["data_time"] += time.perf_counter() - data_started
        step_useful = step_executed = 0.0  # training FLOPs of this step's batches
        for batch in batches:
            window["digest"] = (window["digest"] + batch_digest(batch)) % (1 << 62)
            if not counts_batches:
                continue
            useful, executed = batch_flops(cfg, batch)
            step_useful, step_executed = step_useful + useful, step_executed + executed
            window["filled"] += int((batch["doc_ids"] >= 0).sum())
            if family == "blt":
                window["patches"] += int((batch["patch_lengths"] > 0).sum())
        poison = step + 1 in faults.nan_at_steps
        if pipelined:
            step_sums, nonfinite, gnorm = _pipeline_step(engine, batches, family)
        else:
            step_sums, nonfinite, gnorm = _plain_step(engine, batches, family, env.device, plain_optimizer, poison)
        step += 1
        window["time"] += time.perf_counter() - started
        window["steps"] += 1
        if not nonfinite:
            window["gnorm"] = gnorm
        faults.after_step(step, env.rank)

        if nonfinite:
            nonfinite_in_a_row += 1
            log.info(f"step {step}: non-finite loss; update skipped ({nonfinite_in_a_row} in a row)")
            if nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
                log.info(f"aborting: {nonfinite_in_a_row} consecutive non-finite losses; the last checkpoint is intact")
                log.close()
                shutdown_distributed()
                return 1
        else:
            nonfinite_in_a_row = 0
            window["sums"] = window["sums"].add(step_sums)
            # FLOPs seen, like bytes seen, are those of the steps that updated the model
            window["flops"] += step_useful
            window["flops_executed"] += step_executed

        stop_now = stop.agreed()
        save_now = bool(cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or stop_now or step == total_steps

        # -- log (also right before every save: the bytes and FLOPs a checkpoint records, and the
        # metrics a resumed run continues from, then include every step up to it)
        if step % cfg.log.every == 0 or save_now:
            sums = all_reduce_sums(window["sums"], env.device)
            useful, executed = all_reduce_floats([window["flops"], window["flops_executed"]], env.device)
            seen["bytes"] += sums.bytes
            seen["targets"] += sums.targets
            seen["flops"] += useful
            seen["flops_executed"] += executed
            elapsed = max(window["time"], 1e-9)
            bytes_per_s = sums.bytes / elapsed
            # MFU counts the useful FLOPs (the model's work on real bytes: comparable across
            # families); mfu_executed counts every slot the static shapes run, padding included
            # (the hardware's view). Both over the matmul peak of every rank together.
            job_peak = env.world_size * peak
            samples = window["steps"] * ds_config["train_batch_size"]
            record = {
                "step": step, "total_steps": total_steps, "loss": sums.mean_nll, "bpb": sums.bpb, "lr": lr,
                "grad_norm": window["gnorm"], "data_digest": reduce_int(window["digest"]),
                "bytes_per_s": bytes_per_s, "tflops": useful / elapsed / 1e12,
                "mfu": useful / elapsed / job_peak if peak == peak else float("nan"),
                "mfu_executed": executed / elapsed / job_peak if peak == peak else float("nan"),
                "padding_fraction": 1 - useful / executed if executed else float("nan"),
                "memory_gb": memory_gb(env.device), "data_fraction": window["data_time"] / elapsed,
                "eta_s": elapsed / window["steps"] * (total_steps - step),
                "bytes_seen": seen["bytes"], "flops_seen": seen["flops"], "flops_executed_seen": seen["flops_executed"],
            }
            if family == "blt":
                patches = reduce_int(window["patches"])
                record["mean_patch_size"] = sums.bytes / max(patches, 1)
                record["patches_per_sample"] = patches / samples
                record["byte_slots_per_sample"] = reduce_int(window["filled"]) / samples
            log.log(record, format_line(record))
            window = _new_window()

        # -- eval
        if cfg.data.val and ((cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == total_steps):
            val = evaluate(engine, cfg, family, env.device, cfg.train.eval_batches, dp_rank, dp_size)
            log.log({"step": step, "val_bpb": val.bpb, "val_loss": val.mean_nll, "val_bytes": val.bytes},
                    f"step {step}/{total_steps} | val bpb {val.bpb:.4f} | val loss {val.mean_nll:.4f} ({val.bytes} bytes)")

        # -- checkpoint, stop
        if save_now:
            if save(step):
                last_saved = step
        if stop_now:
            log.info(f"stopped by {stop.signal_name or 'a signal on another rank'} at step {step}; checkpoint saved; "
                     "rerun the same command to resume")
            break

    if step == total_steps and last_saved != step:
        log.info(f"training finished at step {step}, but its final checkpoint could not be written (see above); "
                 f"the newest checkpoint is step {last_saved}")
        log.close()
        shutdown_distributed()
        return 1
    if step == total_steps and env.is_main:
        from blt_dist.export import save_export

        tag_dir = checkpoint.checkpoint_root(run_dir) / checkpoint.tag_for(step)
        export_dir = save_export(checkpoint.consolidated_state_dict(tag_dir), cfg, run_dir / "export", {"step": step})
        log.info(f"done: {step} steps; weights exported to {export_dir}")
    log.close()
    shutdown_distributed()
    return 0


def _new_window() -> dict:
    """What accumulates between two log lines."""
    return {"sums": LossSums(), "time": 0.0, "data_time": 0.0, "patches": 0, "filled": 0, "steps": 0, "digest": 0,
            "gnorm": float("nan"), "flops": 0.0, "flops_executed": 0.0}


def _plain_step(engine, batches, family, device, plain_optimizer: bool, poison: bool) -> tuple:
    """Forward/backward per micro-batch, one optimizer update: (sums, non-finite?, grad norm)."""
    total, nonfinite, gnorm = LossSums(), False, float("nan")
    for batch in batches:
        logits = engine(*model_inputs(batch, family, device))
        loss, sums = loss_and_sums(logits, batch["targets"].to(device), batch["target_bytes"].to(device))
        if poison:  # fault injection (tests)
            loss, sums = loss * float("nan"), LossSums(float("nan"), sums.targets, sums.bytes)
        nonfinite |= not math.isfinite(sums.nll)
        total = total.add(sums)
        engine.backward(loss)
        if engine.is_gradient_accumulation_boundary():
            nonfinite = bool(reduce_int(nonfinite, "max"))
            if nonfinite and plain_optimizer:
                _skip_update(engine)  # DeepSpeed's ZeRO-0 fp32 path has no overflow check
                return total, True, gnorm
            if engine.zero_optimization_stage() == 0 and not nonfinite:  # ZeRO-0 does not track it
                gnorm = _grad_norm(engine)
        engine.step()  # ZeRO-1/2/3 and bf16 see non-finite gradients and skip the update themselves
    if engine.zero_optimization_stage() > 0:
        gnorm = float(engine.get_global_grad_norm() or float("nan"))
    return total, nonfinite, gnorm


def _pipeline_step(engine, batches, family) -> tuple:
    """DeepSpeed's pipeline schedule runs all micro-batches and the update in train_batch. The
    loss sums live on the last stage; a non-finite loss is seen after the step (ZeRO-1 skips the
    update itself; the abort after max_nonfinite_steps still applies)."""
    from blt_dist.parallel.pipeline import pipeline_batch

    engine.train_batch(data_iter=iter([pipeline_batch(b, family) for b in batches]))
    sums = engine.module.loss_fn.take_sums() if engine.is_last_stage() else LossSums()
    nonfinite = bool(reduce_int(not math.isfinite(sums.nll), "max"))
    return sums, nonfinite, float(engine.get_global_grad_norm() or float("nan"))


def _grad_norm(engine) -> float:
    """Global L2 norm of the (already all-reduced) gradients, for ZeRO-0."""
    grads = [p.grad.detach().float() for p in engine.module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else float("nan")


def _skip_update(engine) -> None:
    """Ends a step without an update, keeping DeepSpeed's counters as engine.step() would."""
    engine.zero_grad()
    engine.micro_steps += 1
    engine.global_steps += 1
    engine.global_samples += engine.train_batch_size()


# ---------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.dry_run:
        print(to_yaml(cfg), end="")
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
