"""`blt-dist entropies ... --slurm [--parts N] [--array-parallelism K]`: the entropy pass as a Slurm array.

One array task per part: task I runs exactly `blt-dist entropies ... --part I/N` (same function,
same output layout), so an array and one process write the same bytes. Parts whose shards are
all complete are not submitted again; the task that completes the last shard merges the index
and writes dataset.json (compute_entropy_dataset does this whichever process it is), so no
dependent merge job is needed. Array logs and submitit files go to OUT.slurm/ beside the output
(the output directory itself holds only the dataset).
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import submitit

from blt_dist.data.entropies import compute_entropy_dataset, list_shards, part_complete
from blt_dist.data.remote import is_remote
from blt_dist.data.shards import ByteDataset
from blt_dist.errors import UserError
from launch.slurm_cli import require_slurm


@dataclasses.dataclass(frozen=True)
class EntropyPart:
    """The function one array task runs (pickled by submitit)."""

    model: str
    data: str
    out: str
    parts: int
    batch_positions: int
    dtype: str
    device: str = "auto"  # CUDA when the task has a GPU
    workers: int = 1  # processes per task (one per GPU on a multi-GPU task)

    def __call__(self, part: int) -> dict:
        result = compute_entropy_dataset(self.model, self.data, self.out, part=(part, self.parts),
                                         batch_positions=self.batch_positions, progress=False, dtype=self.dtype,
                                         device=self.device, workers=self.workers)
        print(f"part {part}/{self.parts}: {result.done} shards computed, {result.skipped} skipped; "
              + ("merged the dataset" if result.manifest else f"{result.pending} shards of other parts pending"),
              flush=True)
        return {"part": part, "done": result.done, "merged": result.manifest is not None}


def parts_to_submit(data: Path, out: Path, parts: int) -> list[int]:
    """Parts with at least one shard not yet complete in OUT."""
    todo = {t.number % parts for t in list_shards(ByteDataset(data)) if not part_complete(out, t)}
    return sorted(todo)


def add_slurm_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Slurm array (--slurm)")
    group.add_argument("--slurm", action="store_true", help="submit one Slurm array task per part instead of running here")
    group.add_argument("--parts", type=int, default=0, metavar="N",
                       help="array size (default: one part per input shard, at most 64)")
    group.add_argument("--array-parallelism", type=int, default=16, metavar="K", help="array tasks running at once")
    group.add_argument("--partition", default="")
    group.add_argument("--account", default="")
    group.add_argument("--qos", default="")
    group.add_argument("--time", type=int, default=60, metavar="MIN", help="time limit per array task")
    group.add_argument("--cpus-per-task", type=int, default=2)
    group.add_argument("--mem", type=int, default=0, metavar="GB")
    group.add_argument("--gpus-per-task", type=int, default=0)
    group.add_argument("--wait", action="store_true", help="block until every array task has ended; fail if one failed")


def run_slurm(args: argparse.Namespace) -> int:
    require_slurm()
    if args.part != (0, 1):
        raise UserError("--part and --slurm exclude each other: --slurm submits every part (--parts N)")
    if args.force:
        raise UserError("--force with --slurm: delete the output yourself first (every array task would delete the others' work)")
    # --data may be a URL (s3://...): the array tasks read it through their node's cache
    data = args.data if is_remote(args.data) else Path(args.data).resolve()
    if is_remote(args.out):
        raise UserError(f"--out {args.out}: --slurm writes to a directory (the array's logs and merge live beside "
                        "it); for a URL run `blt-dist entropies --out URL --part I/N` in your own array, or upload "
                        "a finished directory")
    out, model = Path(args.out).resolve(), args.model.resolve()
    shards = len(list_shards(ByteDataset(data)))
    parts = args.parts or min(shards, 64)
    if parts < 1:
        raise UserError(f"--parts must be positive, got {parts}")
    if (out / "dataset.json").is_file():
        print(f"{out}: already complete; nothing submitted")
        return 0
    todo = parts_to_submit(data, out, parts)
    task = EntropyPart(str(model), str(data), str(out), parts, args.batch_positions, args.dtype, args.device,
                       args.workers)
    if not todo:  # every shard done, merge missing (a task died after its last shard): merge here, it is cheap
        task(0)
        return 0

    folder = out.with_name(out.name + ".slurm")
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=0)
    params = {"job_name": f"entropies-{out.name}", "time": args.time, "cpus_per_task": args.cpus_per_task,
              "ntasks_per_node": 1, "nodes": 1, "array_parallelism": args.array_parallelism,
              "setup": [f"export OMP_NUM_THREADS={args.cpus_per_task}"], "additional_parameters": {"requeue": True}}
    for key in ("partition", "account", "qos"):
        if getattr(args, key):
            params[key] = getattr(args, key)
    if args.mem:
        params["mem"] = f"{args.mem}G"
    if args.gpus_per_task:
        params["gpus_per_task"] = args.gpus_per_task
    executor.update_parameters(**params)
    try:
        jobs = executor.map_array(task, todo)
    except Exception as err:
        lines = str(err).strip().splitlines()
        detail = next((line for line in lines if "error" in line.lower()), lines[-1] if lines else repr(err))
        raise UserError(f"sbatch refused the array: {detail}") from err
    skipped = parts - len(todo)
    array_id = jobs[0].job_id.split("_")[0]
    print(f"submitted array {array_id}: parts {_ranges(todo)} of {parts} ({skipped} complete, skipped); "
          f"logs in {folder}; the last part to finish merges {out}")
    if args.wait:
        return _wait(jobs, out)
    return 0


def _wait(jobs, out: Path) -> int:
    failed = []
    for job in jobs:
        try:
            job.result()
        except Exception as err:  # the task's traceback, as submitit recorded it
            failed.append((job.job_id, str(err).strip().splitlines()[-1] if str(err).strip() else repr(err)))
    if failed:
        for job_id, why in failed:
            print(f"array task {job_id} failed: {why}")
        return 1
    for _ in range(20):  # the merging task writes dataset.json before it returns; allow for a slow filesystem
        if (out / "dataset.json").is_file():
            print(f"{out}: complete")
            return 0
        time.sleep(0.5)
    print(f"{out}: every array task ended but dataset.json is missing; rerun the same command to merge")
    return 1


def _ranges(numbers: list[int]) -> str:
    spans, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            spans.append(f"{start}" if start == n else f"{start}-{n}")
            start = None
    return ",".join(spans)
