"""The distributed environment of one Slurm task, derived from SLURM_* variables.

DeepSpeed's `init_distributed` (and torch's env:// rendezvous) read RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT. Under srun every task already knows its place; this module turns
Slurm's names for it into those, so the trainer runs unchanged under torchrun or Slurm:

    RANK        = SLURM_PROCID                 WORLD_SIZE       = SLURM_NTASKS
    LOCAL_RANK  = SLURM_LOCALID                LOCAL_WORLD_SIZE = tasks on this node
    MASTER_ADDR = first host of SLURM_JOB_NODELIST
    MASTER_PORT = derived from the job id, below Linux's ephemeral range (32768-60999), so
                  that it never collides with a port the kernel hands out to another connection.

Pure functions of the environment (a dict), so they are unit-tested without Slurm.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping, Optional

PORT_BASE = 20000  # ports [20000, 32000): above the usual service ports, below 32768
PORT_SPAN = 12000


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list -> host names, in order.

    'gpu[001-004,010]' -> gpu001 gpu002 gpu003 gpu004 gpu010 (zero padding kept);
    'a1,b[2-3]' -> a1 b2 b3; 'n[1-2]-ib[3,5]' -> n1-ib3 n1-ib5 n2-ib3 n2-ib5."""
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        hosts.extend(_expand_one(item))
    if not hosts:
        raise ValueError(f"empty Slurm node list: {nodelist!r}")
    return hosts


def _split_top_level(text: str) -> list[str]:
    """Splits on commas that are not inside brackets."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced brackets in Slurm node list: {text!r}")
        elif char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced brackets in Slurm node list: {text!r}")
    items.append(text[start:])
    return [item for item in items if item]


def _expand_one(item: str) -> list[str]:
    match = re.search(r"\[([^\[\]]*)\]", item)
    if match is None:
        return [item]
    prefix, suffix = item[: match.start()], item[match.end():]
    names = []
    for part in match.group(1).split(","):
        low, _, high = part.partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise ValueError(f"bad range {part!r} in Slurm node list item {item!r}")
        width = len(low)
        for number in range(int(low), int(high or low) + 1):
            names.append(f"{prefix}{number:0{width}d}")
    # the suffix may hold more brackets: expand each name's remainder
    return [name + rest for name in names for rest in _expand_one(suffix)] if suffix else names


def master_port(job_id: int | str) -> int:
    """A port every task of the job derives alike, different for neighbouring job ids."""
    return PORT_BASE + int(job_id) % PORT_SPAN


def tasks_on_node(tasks_per_node: str, node_index: int) -> int:
    """SLURM_TASKS_PER_NODE ('2(x3),1' = 2,2,2,1) -> the count on node `node_index`."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            raise ValueError(f"bad SLURM_TASKS_PER_NODE {tasks_per_node!r}")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts[node_index]


@dataclass(frozen=True)
class TaskEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    master_addr: str
    master_port: int
    job_id: str
    restart_count: int

    def torch_variables(self) -> dict[str, str]:
        """What torch / DeepSpeed read (env:// rendezvous)."""
        return {
            "RANK": str(self.rank),
            "LOCAL_RANK": str(self.local_rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "GROUP_RANK": str(self.node_rank),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


def task_env(environ: Mapping[str, str]) -> TaskEnv:
    """This task's place in the job, from Slurm's variables (as srun sets them for each task)."""
    missing = [k for k in ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_NODELIST") if k not in environ]
    if missing:
        raise RuntimeError(f"not inside a Slurm task (missing {', '.join(missing)}); run under srun/sbatch")
    # an array task has its own SLURM_JOB_ID; SLURM_ARRAY_JOB_ID is shared by all of them
    job_id = environ["SLURM_JOB_ID"]
    node_rank = int(environ.get("SLURM_NODEID", 0))
    per_node = environ.get("SLURM_TASKS_PER_NODE") or environ.get("SLURM_NTASKS_PER_NODE") or environ["SLURM_NTASKS"]
    return TaskEnv(
        rank=int(environ["SLURM_PROCID"]),
        local_rank=int(environ.get("SLURM_LOCALID", 0)),
        world_size=int(environ["SLURM_NTASKS"]),
        local_world_size=tasks_on_node(per_node, node_rank),
        node_rank=node_rank,
        master_addr=expand_nodelist(environ["SLURM_JOB_NODELIST"])[0],
        master_port=master_port(job_id),
        job_id=job_id,
        restart_count=int(environ.get("SLURM_RESTART_COUNT", 0) or 0),
    )


def export_task_env(environ: Optional[dict] = None) -> TaskEnv:
    """Derives this task's environment and exports the torch variables into os.environ."""
    env = task_env(os.environ if environ is None else environ)
    os.environ.update(env.torch_variables())
    return env
