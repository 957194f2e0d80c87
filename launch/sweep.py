"""`blt-dist sweep GRID.yaml [family:]key=value ... [--dry-run] [--backend slurm|local]`

A scaling sweep: sizes x families x training-FLOP budgets x seeds, one run each. A run is the
shipped config `configs/<family>/<size>.yaml` with `train.flops` set to its budget; the trainer
turns the budget into a step count from the FLOP counter and the bytes per sample it measures
on its data. A BPE or byte-level run's shape is not read from a file either: it is the FLOP
counter's match (blt_dist.flops.match_bpe, match_byte) to the BLT config of the same size, the
BPE one at the bytes per token `blt-dist tokenizer` measured (the .json beside data.tokenizer;
bpe:data.bytes_per_token=B overrides it, and a tokenizer made elsewhere needs it): at an assumed
value the baseline's real cost per byte differs from the BLT's by their ratio. Nothing in a
run's length or shape is set by hand.

    RUN_DIR = <out>/<family>-<size>-<budget>-s<seed>

Rerunning the same command skips finished runs (an export exists), leaves queued or running
ones alone, resubmits the rest (they resume from their newest checkpoint), then writes
<out>/results.csv. `--backend local` runs the same sweep here without Slurm, one run after
another, each in its own process. `--dry-run` prints the grid with parameters, training FLOPs
and the GPU-hours / node-hours it would cost at an assumed MFU (the grid file's `estimate`).

Grid file (configs/sweeps/*.yaml):

    name: tiny
    out: runs/sweeps/tiny            # default runs/sweeps/<name>
    sizes: [tiny]
    families: [blt, bpe, byte]
    flops: [4.0e+9, 8.0e+9]          # budgets for every size; or flops_per_size: {125m: [...]}
    seeds: [0]
    overrides: {all: [...], blt: [...], bpe: [...], byte: [...]}   # dotted config overrides
    launch: {tasks_per_node: 1, time_min: 30}         # launch.* for every run
    launch_per_size: {3b: {nodes: 8}}                 # launch.* for one size
    estimate: {gpu: H100, peak_tflops: 989, mfu: 0.4, gpus_per_node: 8}
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from blt_dist.config import Config, LaunchConfig, load_config, save_resolved
from blt_dist.data.tokenizer import measured_bytes_per_token
from blt_dist.errors import ConfigError, UserError
from blt_dist.flops import (
    INFERENCE_MATCH_TOLERANCE,
    SampleShape,
    bytes_per_sample,
    human_count,
    inference_flops_per_byte,
    match_blt_inference,
    match_bpe,
    match_byte,
    params_by_component,
    patches_for,
    train_flops_per_byte,
)
from blt_dist.model.weights import WEIGHTS
from launch import records
from launch.slurm import launch_run, quote_override
from launch.slurm_cli import queue_state, require_slurm

FAMILIES = ("blt", "bpe", "byte")
MATCHED_FAMILIES = ("bpe", "byte")  # shaped by the FLOP counter from the BLT of the same size
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RESULT_COLUMNS = ("run", "family", "size", "seed", "params", "flop_budget", "flops_spent", "bytes_seen",
                  "mean_patch_size", "final_val_bpb", "wandb_id", "status", "run_dir")


@dataclass
class EstimateSpec:
    gpu: str = "H100"
    peak_tflops: float = 989.0  # dense bf16 per GPU
    mfu: float = 0.4  # assumed model FLOP utilisation for the GPU-hour estimate
    gpus_per_node: int = 8


@dataclass
class SweepSpec:
    name: str = ""
    out: str = ""
    sizes: List[str] = field(default_factory=list)
    families: List[str] = field(default_factory=lambda: list(FAMILIES))
    flops: List[float] = field(default_factory=list)
    flops_per_size: Dict[str, List[float]] = field(default_factory=dict)
    seeds: List[int] = field(default_factory=lambda: [0])
    # budget (as a string, e.g. "1.0e+12") -> its seeds, replacing `seeds` there: more seeds
    # where runs are cheap, for the seed spread of a scaling fit (issue #21, item 5)
    seeds_per_flops: Dict[str, List[int]] = field(default_factory=dict)
    # BLT mean patch sizes (bytes/patch) for the fixed-inference-cost axis (issue #21, item 1)
    patch_sizes: List[float] = field(default_factory=list)
    overrides: Dict[str, List[str]] = field(default_factory=dict)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    launch_per_size: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # size -> launch.* keys
    estimate: EstimateSpec = field(default_factory=EstimateSpec)
    command_line: Dict[str, List[str]] = field(default_factory=dict)  # set from the CLI, not the file

    def seeds_for(self, budget: float) -> list[int]:
        """seeds_per_flops' seeds for this budget, else `seeds`."""
        for key, seeds in self.seeds_per_flops.items():
            if math.isclose(float(key), budget, rel_tol=1e-9):
                return list(seeds)
        return list(self.seeds)

    def overrides_for(self, family: str) -> list[str]:
        """Grid file (all, then family), then command line (all, then family)."""
        return [*self.overrides.get("all", []), *self.overrides.get(family, []),
                *self.command_line.get("all", []), *self.command_line.get(family, [])]


@dataclass
class PlannedRun:
    name: str
    family: str
    size: str
    seed: int
    budget: float
    cfg: Config

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run.dir)


# ---------------------------------------------------------------------------------------------
# The grid


def load_sweep(path: Path, cli_overrides: list[str] = ()) -> SweepSpec:
    """Reads and checks a grid file; every rejection names its key path."""
    if not path.is_file():
        raise UserError(f"sweep file not found: {path}")
    try:
        raw = OmegaConf.load(path)
        if "command_line" in raw:  # a field for the CLI's overrides, not a grid file key
            raise ConfigError("command_line", f"{path}: unknown key; put overrides under overrides.all/blt/bpe")
        merged = OmegaConf.merge(OmegaConf.structured(SweepSpec), raw)
        spec: SweepSpec = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or ""
        message = str(err).strip().splitlines()[0]
        if "not in struct" in message.lower() or type(err).__name__ == "ConfigKeyError":
            parent = key.rpartition(".")[0]
            known = [f.name for f in dataclasses.fields(SweepSpec) if f.name != "command_line"]
            message = "unknown key" + (f" under {parent}" if parent else "; known keys: " + ", ".join(known))
        raise ConfigError(key, f"{path}: {message}") from err
    spec.name = spec.name or path.stem
    spec.out = spec.out or f"runs/sweeps/{spec.name}"
    for i, family in enumerate(spec.families):
        if family not in FAMILIES:
            raise ConfigError(f"families[{i}]", f"{path}: unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    if not spec.sizes:
        raise ConfigError("sizes", f"{path}: no sizes")
    for i, size in enumerate(spec.sizes):
        missing = [f for f in spec.families if not (CONFIGS / f / f"{size}.yaml").is_file()]
        matched = any(f in MATCHED_FAMILIES for f in spec.families)
        if missing or matched and not (CONFIGS / "blt" / f"{size}.yaml").is_file():
            known = sorted(p.stem for p in (CONFIGS / "blt").glob("*.yaml") if not p.stem.startswith("_"))
            raise ConfigError(f"sizes[{i}]", f"{path}: unknown size {size!r}; expected one of {', '.join(known)}")
    for section in ("flops_per_size", "launch_per_size"):
        for key in getattr(spec, section):
            if key not in spec.sizes:
                raise ConfigError(f"{section}.{key}", f"{path}: {key!r} is not one of the sweep's sizes")
    for size in spec.sizes:
        budgets = spec.flops_per_size.get(size, spec.flops)
        if not budgets:
            raise ConfigError("flops", f"{path}: no FLOP budget for size {size!r} (set flops or flops_per_size.{size})")
        for j, budget in enumerate(budgets):
            if not (budget > 0 and math.isfinite(budget)):
                key = f"flops_per_size.{size}[{j}]" if size in spec.flops_per_size else f"flops[{j}]"
                raise ConfigError(key, f"{path}: expected a positive FLOP budget, got {budget}")
    all_budgets = {b for size in spec.sizes for b in spec.flops_per_size.get(size, spec.flops)}
    for key, seeds in spec.seeds_per_flops.items():
        try:
            budget = float(key)
        except ValueError:
            raise ConfigError(f"seeds_per_flops.{key}", f"{path}: expected a FLOP budget as the key, got {key!r}") from None
        if not any(math.isclose(budget, b, rel_tol=1e-9) for b in all_budgets):
            raise ConfigError(f"seeds_per_flops.{key}", f"{path}: {budget:g} is not one of the sweep's budgets "
                              f"({', '.join(f'{b:g}' for b in sorted(all_budgets))})")
        if not seeds or len(set(seeds)) != len(seeds):
            raise ConfigError(f"seeds_per_flops.{key}", f"{path}: expected distinct seeds, got {list(seeds)}")
    for key in spec.overrides:
        if key != "all" and key not in FAMILIES:
            raise ConfigError(f"overrides.{key}", f"{path}: expected 'all' or a family ({', '.join(FAMILIES)})")
    if not 0 < spec.estimate.mfu <= 1:
        raise ConfigError("estimate.mfu", f"{path}: expected a fraction in (0, 1], got {spec.estimate.mfu}")
    if spec.patch_sizes:
        _check_patch_sizes(spec, path)
    # The command line comes last: it wins over the grid file's overrides, family ones included.
    for item in cli_overrides:
        family, sep, rest = item.partition(":")
        if sep and "=" in rest and "=" not in family:
            if family not in FAMILIES:
                raise ConfigError("", f"override {item!r}: {family!r} is not a family ({', '.join(FAMILIES)})")
            spec.command_line.setdefault(family, []).append(rest)
        else:
            spec.command_line.setdefault("all", []).append(item)
    return spec


def _check_patch_sizes(spec: SweepSpec, path: Path) -> None:
    """Refuse, before anything runs, a patch size no threshold can give: a patch holds 1 to
    max_patch_length bytes, so the mean over the entropies lies in [1, max_patch_length] whatever
    the threshold (the exact reachable range needs the entropies: `blt-dist calibrate` reports it)."""
    if "blt" not in spec.families:
        raise ConfigError("patch_sizes", f"{path}: patch sizes are a BLT axis, but the sweep has no blt family")
    for size in spec.sizes:
        longest = load_config(CONFIGS / "blt" / f"{size}.yaml", spec.overrides_for("blt")).data.patching.max_patch_length
        for i, target in enumerate(spec.patch_sizes):
            if not 1 <= target <= longest:
                raise ConfigError(f"patch_sizes[{i}]", f"{path}: a mean patch size of {target:g} bytes cannot be reached "
                                  f"by any threshold for BLT {size}: patches hold 1 to data.patching.max_patch_length="
                                  f"{longest} bytes, so their mean lies in [1, {longest}]")


def _launch_overrides(launch: LaunchConfig) -> list[str]:
    """The grid's launch section as launch.* overrides (only what differs from the defaults)."""
    defaults = LaunchConfig()
    return [f"launch.{f.name}={quote_override(getattr(launch, f.name))}" for f in dataclasses.fields(LaunchConfig)
            if getattr(launch, f.name) != getattr(defaults, f.name)]


def _budget_name(budget: float) -> str:
    """4e9 -> '4e9', 1.9e18 -> '1.9e18' (run directory names)."""
    mantissa, exponent = f"{budget:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def plan(spec: SweepSpec) -> list[PlannedRun]:
    """Every run's resolved config, in grid order (size, family, budget, seed)."""
    if spec.patch_sizes and "bpe" not in spec.families:
        raise ConfigError("patch_sizes", "the fixed-inference-cost axis matches each BLT to its BPE twin: add bpe "
                          "to families")
    out = Path(spec.out).resolve()
    runs = []
    for size in spec.sizes:
        family_overrides = {f: spec.overrides_for(f) for f in FAMILIES}
        matched_shape: dict[str, list[str]] = {}  # family -> the overrides that give it its shape
        if any(f in MATCHED_FAMILIES for f in spec.families):
            blt = load_config(CONFIGS / "blt" / f"{size}.yaml", family_overrides["blt"])
        if "bpe" in spec.families:
            bpe = load_config(CONFIGS / "bpe" / f"{size}.yaml", family_overrides["bpe"])
            measured = measured_bytes_per_token(bpe.data.tokenizer) if bpe.data.tokenizer else None
            given = any(o.split("=", 1)[0] == "data.bytes_per_token" for o in family_overrides["bpe"])
            if measured is not None and not given:  # the tokenizer's own measurement, not the config's guess
                family_overrides["bpe"] = [*family_overrides["bpe"], f"data.bytes_per_token={measured:.4f}"]
                bpe = load_config(CONFIGS / "bpe" / f"{size}.yaml", family_overrides["bpe"])
            if bpe.model.vocab_size != blt.model.bpe_vocab_size:
                raise ConfigError("model.vocab_size", f"BPE {size}: vocabulary {bpe.model.vocab_size} differs from the "
                                  f"BLT twin's model.bpe_vocab_size={blt.model.bpe_vocab_size} it is matched at")
            # the BPE config's bytes per token (overrides included: a measured value is used)
            shape = dataclasses.replace(SampleShape.from_data(blt.data), bytes_per_token=bpe.data.bytes_per_token)
            match = match_bpe(blt.model, shape)
            matched_shape["bpe"] = [f"model.dim={match['dim']}", f"model.n_layers={match['n_layers']}",
                                    f"model.n_heads={match['n_heads']}",
                                    f"data.tokens_per_sample={match['tokens_per_sample']}"]
        if "byte" in spec.families:
            match = match_byte(blt.model, SampleShape.from_data(blt.data))
            matched_shape["byte"] = [f"model.dim={match['dim']}", f"model.n_layers={match['n_layers']}",
                                     f"model.n_heads={match['n_heads']}", f"data.seq_len={match['seq_len']}"]
        variants = [(family, "", []) for family in spec.families]
        if spec.patch_sizes:
            bpe_cfg = load_config(CONFIGS / "bpe" / f"{size}.yaml", [*family_overrides["bpe"], *matched_shape["bpe"]])
            variants = [v for v in variants if v[0] != "blt"] + [
                ("blt", f"p{target:g}", patch_size_overrides(blt, bpe_cfg, target)) for target in spec.patch_sizes]
        for family, variant, variant_overrides in variants:
            for budget in spec.flops_per_size.get(size, spec.flops):
                for seed in spec.seeds_for(budget):
                    name = "-".join(filter(None, (family, variant, size, _budget_name(budget), f"s{seed}")))
                    overrides = [
                        *family_overrides[family], *matched_shape.get(family, []), *variant_overrides,
                        *_launch_overrides(spec.launch),
                        *(f"launch.{k}={quote_override(v)}" for k, v in spec.launch_per_size.get(size, {}).items()),
                        f"train.flops={budget}", "train.max_steps=0", "train.max_bytes=0",
                        f"run.seed={seed}", f"run.dir={out / name}", f"run.name={name}",
                    ]
                    cfg = load_config(CONFIGS / family / f"{size}.yaml", overrides)
                    runs.append(PlannedRun(name, family, size, seed, budget, cfg))
    return runs


def patch_size_overrides(blt: Config, bpe: Config, target: float) -> list[str]:
    """The BLT of the fixed-inference-cost axis at mean patch size `target`: its threshold
    calibrated to `target` on the training entropies, its patch slots scaled, and its latent
    resized (flops.match_blt_inference) so that its inference FLOPs per byte equal the BPE
    twin's within 2%. Refused, with the reason, where either cannot be done."""
    patching = blt.data.patching
    if patching.mode in ("entropy", "monotonic"):
        if not blt.data.train:
            raise UserError(f"patch_sizes: calibrating a threshold to {target:g} bytes/patch needs the training "
                            "entropies (data.train, an entropy dataset)")
        # lazy: the calibration reads a sample of the entropy shards (streaming, 2 s to import)
        from blt_dist.data.calibrate import calibrate_threshold, sample_documents

        _, docs = sample_documents(blt.data.train)
        result = calibrate_threshold([(ids, H) for _, ids, H in docs], mode=patching.mode, target_mean_size=target,
                                     max_patch_length=patching.max_patch_length)
        key = "threshold" if patching.mode == "entropy" else "threshold_r"
        rule = [f"data.patching.{key}={getattr(result, key)!r}"]
    elif patching.mode == "static" and float(target).is_integer():
        rule = [f"data.patching.patch_size={int(target)}"]
    else:
        raise UserError(f"patch_sizes: {patching.mode!r} patching has no threshold to calibrate to {target:g} "
                        "bytes/patch (use entropy or monotonic, or static with whole sizes)")
    base = SampleShape.from_data(blt.data)
    sample = dataclasses.replace(base, patch_size=target,
                                 patches_per_sample=patches_for(target, blt.data.byte_capacity, base))
    match = match_blt_inference(bpe.model, SampleShape.from_data(bpe.data), blt.model, sample)
    if abs(match["ratio_to_bpe"] - 1) > INFERENCE_MATCH_TOLERANCE:
        raise UserError(f"patch_sizes: no latent shape gives the BLT at {target:g} bytes/patch the BPE twin's "
                        f"inference FLOPs/byte within {INFERENCE_MATCH_TOLERANCE:.0%} "
                        f"(closest x{match['ratio_to_bpe']:.3f})")
    return [*rule, f"data.patching.target_mean_size={target}", f"data.patches_per_sample={match['patches_per_sample']}",
            f"model.dim={match['dim']}", f"model.n_layers={match['n_layers']}", f"model.n_heads={match['n_heads']}",
            "model.n_kv_heads=null"]


# ---------------------------------------------------------------------------------------------
# Estimates (dry run)


def estimate(run: PlannedRun, spec: SweepSpec) -> dict:
    """Parameters, FLOPs per byte, nominal steps and GPU/node-hours of one run."""
    cfg = run.cfg
    shape = SampleShape.from_data(cfg.data)
    per_byte = train_flops_per_byte(cfg.model, shape)
    sample_bytes = bytes_per_sample(cfg.model, shape)
    la = cfg.launch
    world = la.nodes * (la.gpus_per_node or la.tasks_per_node)
    data_parallel = max(1, world // cfg.parallel.pipeline_stages)
    bytes_per_step = sample_bytes * cfg.train.micro_batch_size * cfg.train.grad_accum * data_parallel
    gpu_hours = run.budget / (spec.estimate.peak_tflops * 1e12 * spec.estimate.mfu) / 3600
    return {
        "params": sum(params_by_component(cfg.model).values()),
        "flops_per_byte": per_byte,
        "inference_flops_per_byte": inference_flops_per_byte(cfg.model, shape),
        "bytes": run.budget / per_byte,
        "steps": max(1, round(run.budget / (per_byte * bytes_per_step))),
        "gpu_hours": gpu_hours,
        "node_hours": gpu_hours / spec.estimate.gpus_per_node,
    }


def format_plan(runs: list[PlannedRun], spec: SweepSpec) -> str:
    e = spec.estimate
    header = (f"sweep {spec.name}: {len(runs)} runs -> {Path(spec.out).resolve()}\n"
              f"estimates assume {e.mfu:.0%} MFU of {e.peak_tflops:g} TFLOP/s per {e.gpu} (dense bf16), "
              f"{e.gpus_per_node} GPUs per node; steps at the nominal bytes per sample (the trainer measures them)\n")
    columns = f"{'run':<26} {'family':<6} {'size':<5} {'params':>8} {'train FLOPs':>11} {'FLOPs/byte':>10} " \
              f"{'infer/byte':>10} {'bytes':>9} {'steps':>8} {'GPU-h':>9} {'node-h':>8}"
    lines = [header, columns, "-" * len(columns)]
    total_gpu = 0.0
    for run in runs:
        est = estimate(run, spec)
        total_gpu += est["gpu_hours"]
        lines.append(f"{run.name:<26} {run.family:<6} {run.size:<5} {human_count(est['params']):>8} {run.budget:>11.3g} "
                     f"{est['flops_per_byte']:>10.3g} {est['inference_flops_per_byte']:>10.3g} "
                     f"{human_count(est['bytes']):>9} {est['steps']:>8,} "
                     f"{est['gpu_hours']:>9.1f} {est['gpu_hours'] / e.gpus_per_node:>8.1f}")
    lines.append(f"total: {total_gpu:,.1f} GPU-hours, {total_gpu / e.gpus_per_node:,.1f} node-hours")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Status and results


def is_finished(run_dir: Path) -> bool:
    return (run_dir / "export" / WEIGHTS).is_file()


def run_status(run_dir: Path, backend: str) -> str:
    """finished | failed | queued | running | unfinished | new."""
    if is_finished(run_dir):
        return "finished"
    if backend == "slurm":
        submission = records.read_submission(run_dir)
        if submission and submission.get("job_ids"):
            state = (queue_state(submission["job_ids"][-1]["job_id"]) or "").split()
            if state and state[0] in ("PENDING", "REQUEUED", "REQUEUE_HOLD", "CONFIGURING"):
                return "queued"
            if state and state[0] in ("RUNNING", "COMPLETING", "SUSPENDED", "SIGNALING"):
                return "running"
    if (run_dir / "FAILED").is_file():
        return "failed"
    return "unfinished" if (run_dir / "metrics.jsonl").is_file() else "new"


def collect(runs: list[PlannedRun], backend: str) -> list[dict]:
    """One row per run, from its metrics.jsonl and run directory."""
    rows = []
    for run in runs:
        run_dir = run.run_dir
        records = []
        if (run_dir / "metrics.jsonl").is_file():
            records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        train = [r for r in records if "loss" in r]
        val = [r for r in records if "val_bpb" in r]
        patches = sum((b - a) / r["mean_patch_size"] for a, b, r in
                      zip([0] + [r["bytes_seen"] for r in train], [r["bytes_seen"] for r in train], train)
                      if r.get("mean_patch_size"))
        last = train[-1] if train else {}
        wandb_file = run_dir / "wandb_id"
        rows.append({
            "run": run.name, "family": run.family, "size": run.size, "seed": run.seed,
            "params": sum(params_by_component(run.cfg.model).values()), "flop_budget": run.budget,
            "flops_spent": last.get("flops_seen", 0.0), "bytes_seen": last.get("bytes_seen", 0),
            "mean_patch_size": round(last["bytes_seen"] / patches, 4) if patches else "",
            "final_val_bpb": val[-1]["val_bpb"] if val else "",
            "wandb_id": wandb_file.read_text().strip() if wandb_file.is_file() else "",
            "status": run_status(run_dir, backend), "run_dir": str(run_dir),
        })
    return rows


def write_results(rows: list[dict], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.csv"
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------------------------------
# Backends


def run_local(run: PlannedRun) -> int:
    """One run in its own process (DeepSpeed keeps process-group state per process)."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    config = save_resolved(run.cfg, run.run_dir)
    with open(run.run_dir / "train.log", "a") as log:
        print(f"[sweep] {run.name}: training (log: {run.run_dir / 'train.log'})", flush=True)
        return subprocess.run([sys.executable, "-m", "blt_dist.cli", "train", str(config)],
                              stdout=log, stderr=subprocess.STDOUT).returncode


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n", 1)[1]
    parser.add_argument("grid", type=Path, help="sweep file (configs/sweeps/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="[family:]key=value",
                        help="config overrides for every run, or for one family (blt:data.train=DIR)")
    parser.add_argument("--backend", choices=("slurm", "local"), default="slurm",
                        help="slurm: one job per run; local: here, one run after another")
    parser.add_argument("--dry-run", action="store_true", help="print the grid and its cost; submit nothing")


def run(args: argparse.Namespace) -> int:
    spec = load_sweep(args.grid, args.overrides)
    runs = plan(spec)
    if args.dry_run:
        print(format_plan(runs, spec))
        return 0
    if args.backend == "slurm":
        require_slurm()
    missing = [r for r in runs if not r.cfg.data.train]
    if missing:
        raise UserError(f"{missing[0].name}: data.train is not set (give it in the sweep file's overrides "
                        f"or on the command line, e.g. {missing[0].family}:data.train=DIR)")
    submitted, failed = 0, 0
    for planned in runs:
        status = run_status(planned.run_dir, args.backend)
        if status in ("finished", "queued", "running"):
            print(f"[sweep] {planned.name}: {status}, skipped")
            continue
        if args.backend == "local":
            code = run_local(planned)
            failed += code != 0
            print(f"[sweep] {planned.name}: " + ("finished" if code == 0 else f"failed (exit {code})"), flush=True)
        else:
            job_id = launch_run(planned.cfg, sys.argv[1:])
            submitted += 1
            print(f"[sweep] {planned.name}: {'resubmitted' if status != 'new' else 'submitted'} as job {job_id}")
    path = write_results(collect(runs, args.backend), Path(spec.out).resolve())
    finished = sum(is_finished(r.run_dir) for r in runs)
    print(f"[sweep] {finished}/{len(runs)} runs finished, {submitted} submitted; results: {path}")
    return 1 if failed else 0
