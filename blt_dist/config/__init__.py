"""The config tree: typed dataclasses, YAML files with inheritance, dotted overrides.

    cfg = load_config("configs/blt/tiny.yaml", ["optim.lr=3e-4", "train.max_steps=10"])

A YAML file may name a parent with `extends: other.yaml` (a path relative to the file, or
a list of them, merged left to right); the child's keys override the parent's. Overrides on
the command line use dotted keys. OmegaConf checks keys and types against the dataclasses
below; `validate` then checks values and combinations. Every rejection is a ConfigError that
names the full key path and what was expected; the CLI prints it as one line and exits 2.

The model's section (ModelConfig) is in model.py beside this file. Ground layer: imports only
errors and vocab, so every wing can read a config.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from blt_dist.config.model import ModelConfig, check_against_data
from blt_dist.errors import ConfigError

__all__ = ["Config", "ConfigError", "load_config", "save_resolved", "to_yaml"]


@dataclass
class RunConfig:
    dir: str = "runs/default"  # run directory: resolved config, checkpoints, metrics.jsonl
    name: str = ""  # human-readable run name (wandb); defaults to the run dir's name
    seed: int = 0


@dataclass
class PatchingConfig:
    mode: str = "entropy"  # entropy | monotonic | space | static | byte
    threshold: Optional[float] = None  # entropy mode: new patch after a byte with H > threshold (nats)
    threshold_r: Optional[float] = None  # monotonic mode: H_i - H_{i-1} > threshold_r
    patch_size: int = 4  # static mode
    max_patch_length: int = 16  # every mode
    bos_alone: bool = False  # every BOS a patch of its own, as HF/Meta patch (needed for an HF export)
    target_mean_size: float = 4.5  # bytes per patch: what `calibrate` aims for and FLOP estimates assume


@dataclass
class MixtureEntry:
    content_type: str = ""  # a content type (stream) of data.train
    weight: float = 0.0  # its share of an epoch's bytes (weights are normalised; 0 leaves it out)


@dataclass
class DataConfig:
    train: str = ""  # shard directory (byte shards; entropy shards for BLT)
    val: str = ""  # shard directory for periodic evaluation ("" = none)
    seq_len: int = 1024  # bytes per sample (byte LM / entropy model)
    tokens_per_sample: int = 256  # BPE baseline
    patches_per_sample: int = 256  # BLT: fixed patch count per sample
    byte_capacity: int = 1024  # BLT: fixed byte capacity per sample (padded, masked)
    tokenizer: str = ""  # sentencepiece model for the BPE baseline
    entropy_model: str = ""  # BLT: entropy-model export; entropy datasets made by another model are refused
    bytes_per_token: float = 4.4  # BPE: measured by `blt-dist tokenizer`; FLOPs/byte = FLOPs/token / this
    patching: PatchingConfig = field(default_factory=PatchingConfig)
    shuffle: bool = True
    shuffle_seed: int = 1234
    num_workers: int = 0
    # logical data streams, fixed when a run starts (0: ranks x max(num_workers, 1), the order
    # of runs before lanes existed); a run resumes at any world size, exactly, from the same
    # global sequence of micro-batches (data/loader.py); a multiple of every world size you may
    # resume at keeps each lane on one rank
    lanes: int = 0
    # > 0: the epoch's shuffle is one of blocks of this many shards, then of the documents in a
    # block, so a lane reads a bounded window of shards (for a node cache smaller than the data)
    shuffle_block_shards: int = 0
    # remote datasets (data.train/val as s3://..., gs://, ...; data/remote.py): the node cache
    # (default $BLT_DIST_CACHE/datasets), its size in bytes (0: unbounded), shards fetched ahead
    cache_dir: str = ""
    cache_limit: float = 0
    prefetch_shards: int = 2
    # weighted mixture of data.train's content types, in bytes (data/mixture.py); [] = each
    # document once per epoch. `blt-dist train --dry-run` prints each stream's bytes and repeats
    mixture: list[MixtureEntry] = field(default_factory=list)


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: fraction of steps spent decaying
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping


@dataclass
class TrainConfig:
    # Run length: exactly one of these should be set; max_steps wins if several are.
    max_steps: int = 0
    flops: float = 0.0  # training FLOP budget (3x forward, entropy model excluded)
    max_bytes: int = 0  # raw bytes predicted
    micro_batch_size: int = 8  # per rank
    grad_accum: int = 1
    dtype: str = "fp32"  # fp32 | bf16 | fp16 (fp16 needs a GPU)
    activation_checkpointing: bool = False
    eval_every: int = 0  # steps; 0 = only at the end
    # validation: whole documents of each content type of data.val's val split up to this many
    # bytes (0 = every document), the documents `compare` scores with its default --eval-bytes
    eval_bytes: int = 60000
    max_nonfinite_steps: int = 5  # consecutive NaN/inf losses before aborting
    # deterministic GPU kernels (torch.use_deterministic_algorithms, cuBLAS workspace): a resumed
    # run then repeats the uninterrupted one bit for bit on a GPU too, at some speed. CPU runs are
    # deterministic without it.
    deterministic: bool = False
    # continued pretraining / fine-tuning: a model export (`blt-dist train`, `export`, `import-hf`)
    # whose weights start a fresh run (new optimizer, step 0); its model section must equal this
    # run's. Ignored on resume: the checkpoint holds the weights from then on
    init_from: str = ""


@dataclass
class ParallelConfig:
    zero_stage: int = 0  # 0..3
    pipeline_stages: int = 1  # >1 uses DeepSpeed PipelineModule (needs zero_stage <= 1)
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | gloo | nccl
    # Elements per gradient-reduction bucket (DeepSpeed's reduce_bucket_size); 0 = DeepSpeed's
    # default, 5e8. ZeRO-3 keeps one such buffer per rank for the whole run: 954 MiB in bf16
    # whatever the model's size (measured, blt-dist memory).
    reduce_bucket_size: float = 0  # may be written 5e7


@dataclass
class CheckpointConfig:
    every: int = 0  # steps between checkpoints; 0 = only at the end and on a stop signal
    keep_last: int = 2  # ephemeral checkpoints kept
    permanent_every: int = 0  # steps; checkpoints at multiples of this are never deleted
    # periodic saves that may fail (disk full, I/O errors) before the run stops; 0 = the first
    # failed save stops it (training on without checkpoints would lose everything at a crash)
    max_failed_saves: int = 0
    resume: bool = True  # resume from the newest complete checkpoint in run.dir
    resume_from: str = ""  # another run dir to resume from (must hold a complete checkpoint)


@dataclass
class LogConfig:
    every: int = 10  # steps between log lines / metrics.jsonl records
    wandb: bool = False
    wandb_project: str = "blt-dist"
    wandb_mode: str = "offline"  # offline | online | disabled
    progress: bool = True  # progress bars in offline tools


@dataclass
class LaunchConfig:
    """Slurm resources and restart policy for `blt-dist launch` / `sweep` (launch/)."""

    job_name: str = ""  # default: the run directory's name
    partition: str = ""  # "" = the cluster's default partition
    account: str = ""
    qos: str = ""
    constraint: str = ""  # sbatch --constraint (node features)
    exclude: str = ""  # sbatch --exclude (node list)
    nodes: int = 1
    # > 0: ask for min_nodes..nodes (sbatch --nodes=MIN-MAX); a job, or a requeue of it, that
    # gets fewer nodes continues at the smaller world size (elastic resume, training/elastic.py)
    min_nodes: int = 0
    gpus_per_node: int = 0  # > 0: one task per GPU (tasks_per_node is then ignored)
    tasks_per_node: int = 1  # CPU clusters: ranks per node
    cpus_per_task: int = 2
    mem_gb: int = 0  # 0 = the cluster's default
    time_min: int = 60
    signal_delay_s: int = 120  # USR2 this long before the time limit -> agreed save + requeue
    max_requeues: int = 100  # preemptions + time limits that requeue the job
    max_retries: int = 2  # failures (a task that raises or dies) retried before the job gives up
    require_clean: bool = False  # refuse to submit from a working tree with uncommitted changes
    # sbatch --overcommit: more tasks than CPUs (one machine standing in for several nodes)
    overcommit: bool = False


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)


# ---------------------------------------------------------------------------------------------
# Loading


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> DictConfig:
    """Reads one YAML file and, depth first, the files it `extends`."""
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise ConfigError("extends", f"inheritance cycle: {cycle}")
    if not path.is_file():
        where = f" (extended by {chain[-1]})" if chain else ""
        raise ConfigError("", f"config file not found: {path}{where}")
    try:
        node = OmegaConf.load(path)
    except Exception as err:  # yaml.YAMLError and friends: report the file, not a traceback
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError("", f"cannot parse {path}: {first_line}") from err
    if node is None or not isinstance(node, DictConfig):
        raise ConfigError("", f"{path}: expected a mapping at the top level")
    parents = node.pop("extends", None)
    if parents is None:
        return node
    if isinstance(parents, str):
        parents = [parents]
    merged = OmegaConf.create()
    for parent in parents:
        if not isinstance(parent, str):
            raise ConfigError("extends", f"{path}: expected a path or a list of paths")
        merged = OmegaConf.merge(merged, _read_yaml(path.parent / parent, (*chain, path)))
    return OmegaConf.merge(merged, node)


def _omegaconf_error(err: OmegaConfBaseException) -> ConfigError:
    """Turns OmegaConf's multi-line message into '<full key>: <what was expected>'."""
    key = getattr(err, "full_key", None) or ""
    message = str(err).strip().splitlines()[0]
    if type(err).__name__ == "ConfigKeyError" or "not in struct" in message.lower():
        parent = key.rpartition(".")[0]
        known = _known_keys(parent)
        hint = f"; known keys under {parent or 'the root'}: {', '.join(known)}" if known else ""
        return ConfigError(key, f"unknown key{hint}")
    return ConfigError(key, message)


def _known_keys(dotted: str) -> list[str]:
    """The field names of the dataclass at `dotted` (for 'unknown key' hints)."""
    node: Any = Config
    for part in filter(None, dotted.split(".")):
        node = typing.get_type_hints(node).get(part) if dataclasses.is_dataclass(node) else None
        if node is None:
            return []
    return [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []


def parse_overrides(overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError("", f"override {item!r}: expected key.path=value")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as err:
        raise _omegaconf_error(err) from err


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Loads a YAML file (or only the defaults), applies overrides, validates, returns a Config."""
    schema = OmegaConf.structured(Config)
    layers = [_read_yaml(Path(path))] if path is not None else []
    layers.append(parse_overrides(overrides))
    try:
        merged = OmegaConf.merge(schema, *layers)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _omegaconf_error(err) from err
    assert isinstance(cfg, Config)
    validate(cfg)
    return cfg


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_resolved(cfg: Config, run_dir: str | Path) -> Path:
    """Writes the resolved config into the run directory (atomically)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / "config.yaml"
    tmp = target.with_suffix(".yaml.tmp")
    tmp.write_text(to_yaml(cfg))
    tmp.replace(target)
    return target


# ---------------------------------------------------------------------------------------------
# Validation: values and combinations the types alone cannot express.


def _choice(key: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(key, f"expected one of {', '.join(choices)}, got {value!r}")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok or (isinstance(value, float) and not math.isfinite(value)):
        raise ConfigError(key, f"expected a {'non-negative' if allow_zero else 'positive'} number, got {value!r}")


def validate(cfg: Config) -> None:
    d, p = cfg.data, cfg.data.patching
    _choice("data.patching.mode", p.mode, ("entropy", "monotonic", "space", "static", "byte"))
    _positive("data.patching.patch_size", p.patch_size)
    _positive("data.patching.max_patch_length", p.max_patch_length)
    _positive("data.patching.target_mean_size", p.target_mean_size)
    _positive("data.bytes_per_token", d.bytes_per_token)
    for key in ("seq_len", "tokens_per_sample", "patches_per_sample", "byte_capacity"):
        _positive(f"data.{key}", getattr(d, key))
    _positive("data.num_workers", d.num_workers, allow_zero=True)
    _positive("data.lanes", d.lanes, allow_zero=True)
    for key in ("shuffle_block_shards", "cache_limit", "prefetch_shards"):
        _positive(f"data.{key}", getattr(d, key), allow_zero=True)
    for i, entry in enumerate(d.mixture):
        if not entry.content_type:
            raise ConfigError(f"data.mixture[{i}].content_type", "expected a content type of data.train")
        _positive(f"data.mixture[{i}].weight", entry.weight, allow_zero=True)
    if d.mixture and sum(entry.weight for entry in d.mixture) <= 0:
        raise ConfigError("data.mixture", "the weights sum to 0: nothing would be read")
    if d.mixture and d.shuffle_block_shards:
        raise ConfigError("data.mixture", "not supported with data.shuffle_block_shards yet (the blocks' shuffle "
                          "does not know the mixture's repeats); set one of them")

    o = cfg.optim
    _positive("optim.lr", o.lr)
    _choice("optim.schedule", o.schedule, ("cosine", "wsd", "constant"))
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError("optim.min_lr_ratio", f"expected a value in [0, 1], got {o.min_lr_ratio}")
    if not 0.0 < o.decay_fraction <= 1.0:
        raise ConfigError("optim.decay_fraction", f"expected a value in (0, 1], got {o.decay_fraction}")
    for key in ("beta1", "beta2"):
        if not 0.0 <= getattr(o, key) < 1.0:
            raise ConfigError(f"optim.{key}", f"expected a value in [0, 1), got {getattr(o, key)}")
    for key in ("warmup_steps", "weight_decay", "grad_clip"):
        _positive(f"optim.{key}", getattr(o, key), allow_zero=True)
    _positive("optim.eps", o.eps)

    t = cfg.train
    for key in ("max_steps", "flops", "max_bytes", "eval_every", "eval_bytes"):
        _positive(f"train.{key}", getattr(t, key), allow_zero=True)
    for key in ("micro_batch_size", "grad_accum", "max_nonfinite_steps"):
        _positive(f"train.{key}", getattr(t, key))
    _choice("train.dtype", t.dtype, ("fp32", "bf16", "fp16"))

    par = cfg.parallel
    if par.zero_stage not in (0, 1, 2, 3):
        raise ConfigError("parallel.zero_stage", f"expected 0, 1, 2 or 3, got {par.zero_stage}")
    _positive("parallel.pipeline_stages", par.pipeline_stages)
    _choice("parallel.backend", par.backend, ("auto", "gloo", "nccl"))
    _positive("parallel.reduce_bucket_size", par.reduce_bucket_size, allow_zero=True)
    if par.pipeline_stages > 1 and par.zero_stage >= 2:
        raise ConfigError(
            "parallel.zero_stage",
            f"pipeline parallelism (pipeline_stages={par.pipeline_stages}) needs zero_stage <= 1, "
            f"got {par.zero_stage} (DeepSpeed refuses ZeRO-2/3 with pipelines)",
        )

    c = cfg.checkpoint
    for key in ("every", "permanent_every", "max_failed_saves"):
        _positive(f"checkpoint.{key}", getattr(c, key), allow_zero=True)
    _positive("checkpoint.keep_last", c.keep_last)

    _positive("log.every", cfg.log.every)
    _choice("log.wandb_mode", cfg.log.wandb_mode, ("offline", "online", "disabled"))

    la = cfg.launch
    for key in ("nodes", "tasks_per_node", "cpus_per_task", "time_min"):
        _positive(f"launch.{key}", getattr(la, key))
    for key in ("gpus_per_node", "mem_gb", "signal_delay_s", "max_requeues", "max_retries", "min_nodes"):
        _positive(f"launch.{key}", getattr(la, key), allow_zero=True)
    if la.min_nodes > la.nodes:
        raise ConfigError("launch.min_nodes", f"{la.min_nodes} is more than launch.nodes={la.nodes}")
    if la.signal_delay_s >= la.time_min * 60:
        raise ConfigError("launch.signal_delay_s", f"{la.signal_delay_s} s is not shorter than the time limit "
                          f"(launch.time_min={la.time_min}): the stop signal would come at the start")

    problems = cfg.model.validate("model") + check_against_data(cfg.model, cfg.data)
    if problems:
        raise ConfigError(*problems[0])


# ---------------------------------------------------------------------------------------------
# Command-line plumbing shared by every command that takes a config.


def add_config_arguments(parser) -> None:
    """`CONFIG [key.path=value ...] [--dry-run]`, as used by train, flops, launch, eval."""
    parser.add_argument("config", help="YAML config file (may `extends:` others)")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="dotted overrides, e.g. optim.lr=3e-4")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")


def config_from_args(args) -> Config:
    return load_config(args.config, args.overrides)
