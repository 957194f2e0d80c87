"""`blt-dist launch CONFIG [key=value ...] --nodes N --gpus-per-node G --partition P --time MIN`

Submits one training run to Slurm through submitit: one task per GPU (or `--tasks-per-node`
ranks per CPU node), each running the ordinary trainer with its rank from SLURM_* (see
launch/slurm_env.py and launch/task.py). Before anything is submitted the run directory gets

    config.yaml              the resolved config (paths made absolute), which the job trains
    code/, code.json         a snapshot of the code at the submitted revision (+ code.diff if dirty)
    launch/submission.json   command line, resources, job ids;  launch/job.sbatch: the exact script
    continue.sh              one command that resubmits the run after a crash or a cancel

`--dry-run` prints the sbatch script and the resolved config and submits nothing.
`--continue RUN_DIR` resubmits an existing run (same config and code snapshot; resource flags
given with it override the recorded ones); the trainer resumes from its newest checkpoint, at
the new world size if the resources changed it (elastic resume: same data order, grad_accum
derived from the run's global batch). `--nodes MIN-MAX` lets Slurm start (or requeue) the job
on fewer nodes than MAX; the run continues at whatever world size it gets.

    blt-dist launch configs/blt/1b.yaml run.dir=/shared/runs/blt-1b data.train=... \\
        --nodes 2 --gpus-per-node 8 --partition gpu --time 1440
"""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path

import submitit

from blt_dist import shims
from blt_dist.config import Config, load_config, save_resolved, to_yaml
from blt_dist.data.remote import is_remote
from blt_dist.errors import UserError
from launch import records
from launch.slurm_cli import queue_state, require_slurm, test_submission
from launch.snapshot import take_snapshot
from launch.task import TrainTask

# Config fields that hold paths: made absolute at submission, since the job runs elsewhere.
PATH_FIELDS = (("run", "dir"), ("data", "train"), ("data", "val"), ("data", "tokenizer"),
               ("data", "entropy_model"), ("checkpoint", "resume_from"))

# --flag -> launch.<key>, so that the flags and dotted overrides are one thing.
RESOURCE_FLAGS = {
    "gpus_per_node": int, "tasks_per_node": int, "cpus_per_task": int, "partition": str,
    "account": str, "qos": str, "constraint": str, "exclude": str, "job_name": str, "max_retries": int,
}
RENAMED_FLAGS = {"time": ("time_min", int), "mem": ("mem_gb", int), "signal_lead": ("signal_delay_s", int)}


def absolute_paths(cfg: Config) -> Config:
    for section, key in PATH_FIELDS:
        part = getattr(cfg, section)
        value = getattr(part, key)
        if value and not is_remote(value):  # s3://... and other URLs stay as they are
            setattr(part, key, str(Path(value).expanduser().resolve()))
    return cfg


def resource_overrides(args: argparse.Namespace) -> list[str]:
    """The resource flags given on the command line, as launch.* overrides."""
    out = []
    for flag, kind in RESOURCE_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            out.append(f"launch.{flag}={quote_override(value)}")
    for flag, (key, kind) in RENAMED_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            out.append(f"launch.{key}={quote_override(value)}")
    nodes = getattr(args, "nodes", None)
    if nodes is not None:
        low, _, high = nodes.partition("-")
        if not (low.isdigit() and (not high or high.isdigit())):
            raise UserError(f"--nodes: {nodes!r} is not N or MIN-MAX")
        out += [f"launch.nodes={int(high or low)}", f"launch.min_nodes={int(low) if high else 0}"]
    for flag in ("require_clean", "overcommit"):
        if getattr(args, flag, False):
            out.append(f"launch.{flag}=true")
    return out


def quote_override(value) -> str:
    """A value for a dotted override. OmegaConf parses them as YAML: strings are quoted so that
    names like "a: b" or "1e3" stay strings."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return str(value)


def tasks_per_node(cfg: Config) -> int:
    return cfg.launch.gpus_per_node or cfg.launch.tasks_per_node


def executor_parameters(cfg: Config, run_dir: Path) -> dict:
    """submitit SlurmExecutor parameters (sbatch options, setup and teardown lines)."""
    la = cfg.launch
    code = run_dir / "code"
    params: dict = {
        "job_name": la.job_name or run_dir.name,
        "time": la.time_min,
        "nodes": la.nodes,
        "ntasks_per_node": tasks_per_node(cfg),
        "cpus_per_task": la.cpus_per_task,
        "signal_delay_s": la.signal_delay_s,
        # One failed task stops the whole step, so the batch shell can count it and retry.
        "srun_args": ["--kill-on-bad-exit=1"],
        "setup": [
            f"export PYTHONPATH={shlex.quote(str(code))}${{PYTHONPATH:+:$PYTHONPATH}}",
            f"export OMP_NUM_THREADS={la.cpus_per_task}",
        ],
        # $? is srun's status: the next line must come straight after the command
        "teardown": [
            "srun_status=$?",
            f"{shlex.quote(sys.executable)} -m launch.task after-srun {shlex.quote(str(run_dir))} \"$srun_status\"",
        ],
        # `scontrol requeue` needs a requeueable job; clusters may default to JobRequeue=0
        "additional_parameters": {"requeue": True},
    }
    if la.min_nodes:  # submitit counts tasks from the int "nodes"; sbatch reads the range
        params["additional_parameters"]["nodes"] = f"{la.min_nodes}-{la.nodes}"
    if la.overcommit:  # sbatch accepts more tasks than CPUs only as --ntasks with --overcommit
        del params["ntasks_per_node"]
        params["additional_parameters"].update(ntasks=la.nodes * tasks_per_node(cfg), overcommit=True)
    if la.gpus_per_node:
        params["gpus_per_node"] = la.gpus_per_node
    for key in ("partition", "account", "qos", "constraint", "exclude"):
        if getattr(la, key):
            params[key] = getattr(la, key)
    if la.mem_gb:
        params["mem"] = f"{la.mem_gb}G"
    return params


def render_sbatch(cfg: Config, run_dir: Path) -> str:
    """The sbatch script submitit will write for this run (for --dry-run; needs no Slurm)."""
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(run_dir / "slurm"))])
    return shims.sbatch_script(command, run_dir / "slurm", **executor_parameters(cfg, run_dir))


def check_not_running(run_dir: Path) -> None:
    submission = records.read_submission(run_dir)
    if not submission or not submission.get("job_ids"):
        return
    job_id = submission["job_ids"][-1]["job_id"]
    state = queue_state(job_id)
    if state and state.split()[0] in ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "CONFIGURING",
                                      "COMPLETING", "SUSPENDED", "RESIZING", "SIGNALING"):
        raise UserError(f"{run_dir} already has job {job_id} ({state}); wait for it or `scancel {job_id}` first")


def prepare_run_dir(cfg: Config, run_dir: Path, argv: list[str], snapshot: bool = True) -> None:
    """Everything the job needs in the run directory, before it is submitted."""
    run_dir.mkdir(parents=True, exist_ok=True)
    code = take_snapshot(run_dir, require_clean=cfg.launch.require_clean) if snapshot else None
    save_resolved(cfg, run_dir)
    submission = records.read_submission(run_dir) or {}
    submission.update(
        command_line=shlex.join([Path(sys.argv[0]).name, *argv]) if argv else "",
        cwd=str(Path.cwd()),
        resources=dataclasses.asdict(cfg.launch),
        python=sys.executable,
    )
    if code is not None:
        submission["code"] = code
    records.write_submission(run_dir, submission)
    records.write_continue_script(run_dir)


def submit(cfg: Config, run_dir: Path) -> str:
    """Submits the run; returns the Slurm job id. sbatch's own error is shown when it refuses."""
    check = records.launch_dir(run_dir) / "test-only.sbatch"
    check.write_text(render_sbatch(cfg, run_dir))
    try:
        test_submission(check)
    except UserError as err:
        records.add_event(run_dir, "submit_failed", reason=str(err))
        raise
    finally:
        check.unlink()
    executor = submitit.SlurmExecutor(folder=run_dir / "slurm", max_num_timeout=0)
    executor.update_parameters(**executor_parameters(cfg, run_dir))
    try:
        job = executor.submit(TrainTask(str(run_dir)))
    except Exception as err:  # submitit's FailedJobError carries sbatch's stderr
        message = str(err).strip().splitlines()
        detail = next((line for line in message if "error" in line.lower()), message[-1] if message else repr(err))
        records.add_event(run_dir, "submit_failed", reason=detail)
        raise UserError(f"sbatch refused the job: {detail}") from err
    records.add_job_id(run_dir, job.job_id, Path(job.paths.submission_file).read_text())
    records.add_event(run_dir, "submitted", job_id=job.job_id)
    return job.job_id


def launch_run(cfg: Config, argv: list[str], dry_run: bool = False, snapshot: bool = True) -> str | None:
    """Resolved config -> run directory -> Slurm job (the launch and sweep entry point)."""
    cfg = absolute_paths(cfg)
    run_dir = Path(cfg.run.dir)
    if dry_run:
        print("# sbatch script\n" + render_sbatch(cfg, run_dir))
        print("# resolved config\n" + to_yaml(cfg), end="")
        return None
    if not cfg.data.train:
        raise UserError("data.train: no training dataset (prepare one with `blt-dist prepare`, then data.train=DIR)")
    for section, key in PATH_FIELDS[1:]:  # the job would only fail on them later, and be retried
        value = getattr(getattr(cfg, section), key)
        if value and not is_remote(value) and not Path(value).exists():
            raise UserError(f"{section}.{key}: {value} does not exist")

    require_slurm()  # before anything is written
    check_not_running(run_dir)
    prepare_run_dir(cfg, run_dir, argv, snapshot=snapshot)
    return submit(cfg, run_dir)


# ---------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n", 1)[1]
    parser.add_argument("config", nargs="?", help="YAML config file (not with --continue)")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="dotted overrides, e.g. optim.lr=3e-4")
    parser.add_argument("--continue", dest="continue_dir", metavar="RUN_DIR", type=Path,
                        help="resubmit an existing run directory (its config and code snapshot)")
    res = parser.add_argument_group("resources (each sets the launch.* key of the same name)")
    res.add_argument("--nodes", metavar="N|MIN-MAX", help="nodes; MIN-MAX lets a (requeued) job start on fewer")
    res.add_argument("--gpus-per-node", type=int, help="GPUs per node; one task per GPU")
    res.add_argument("--tasks-per-node", type=int, help="ranks per node on a CPU cluster (no GPUs)")
    res.add_argument("--cpus-per-task", type=int)
    res.add_argument("--mem", type=int, metavar="GB", help="memory per node in GB (launch.mem_gb)")
    res.add_argument("--time", type=int, metavar="MIN", help="time limit in minutes (launch.time_min)")
    res.add_argument("--partition")
    res.add_argument("--account")
    res.add_argument("--qos")
    res.add_argument("--constraint")
    res.add_argument("--exclude", help="nodes to avoid")
    res.add_argument("--job-name")
    res.add_argument("--signal-lead", type=int, metavar="S",
                     help="USR2 this many seconds before the time limit (launch.signal_delay_s)")
    res.add_argument("--max-retries", type=int, help="failures retried before the job gives up")
    res.add_argument("--overcommit", action="store_true",
                     help="more tasks than CPUs (sbatch --overcommit; one machine standing in for more)")
    parser.add_argument("--require-clean", action="store_true",
                        help="refuse a working tree with uncommitted changes (otherwise its diff is recorded)")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script and resolved config; submit nothing")


def run(args: argparse.Namespace) -> int:
    argv = sys.argv[1:]
    if args.continue_dir is not None:
        if args.config:
            raise UserError("--continue takes a run directory, not a config file")
        run_dir = args.continue_dir.resolve()
        if not (run_dir / "config.yaml").is_file() or not (run_dir / "code").is_dir():
            raise UserError(f"{run_dir} is not a launched run directory (no config.yaml and code/ snapshot)")
        cfg = load_config(run_dir / "config.yaml", resource_overrides(args))
        cfg.run.dir = str(run_dir)
        (run_dir / "FAILED").unlink(missing_ok=True)
        job_id = launch_run(cfg, argv, dry_run=args.dry_run, snapshot=False)
    else:
        if not args.config:
            raise UserError("give a config file (or --continue RUN_DIR)")
        cfg = load_config(args.config, [*args.overrides, *resource_overrides(args)])
        job_id = launch_run(cfg, argv, dry_run=args.dry_run)
    if job_id is not None:
        run_dir = Path(cfg.run.dir)
        print(f"submitted job {job_id}: {run_dir}\n  logs:     {run_dir / 'slurm'}\n"
              f"  metrics:  {run_dir / 'metrics.jsonl'}\n  status:   {run_dir / 'launch' / 'status.json'}\n"
              f"  continue: {run_dir / 'continue.sh'}")
    return 0
