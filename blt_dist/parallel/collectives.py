"""Every collective the loop, the checkpoints and the probes run, in one place.

NCCL reduces CUDA tensors only: a process group made by `deepspeed.init_distributed("nccl")`
has no CPU backend, and `all_reduce` of a CPU tensor raises "No backend type associated with
device type cpu". So a collective's tensor is placed on the device its backend reduces on
(`collective_device`: the current GPU for NCCL, the CPU for gloo), moved there here and back
by the caller's choice. Nothing else calls `torch.distributed` collectives directly
(tests/test_collectives.py reads every module to check), so a new call site cannot reintroduce
a CPU tensor on NCCL.

Without a process group (one plain process) every function returns its input unchanged.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist

OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def collective_device() -> torch.device:
    """Where this process group's collectives must find their tensors."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """The reduction of `tensor` over every rank, on the device `tensor` is on (a copy moves to
    the collective device and back only when the two differ). Does not modify `tensor`."""
    if not is_distributed():
        return tensor
    device = collective_device()
    reduced = tensor.to(device, copy=True)
    dist.all_reduce(reduced, op=OPS[op])
    return reduced.to(tensor.device)


def reduce_int(value: int, op: str = "sum") -> int:
    """One integer over every rank ("sum", "min" or "max"): flags (stop, non-finite, save
    succeeded) and counts. A host sync: call it where the loop needs the answer now."""
    if not is_distributed():
        return int(value)
    return int(all_reduce(torch.tensor([int(value)], dtype=torch.int64), op).item())


def reduce_floats(values: Sequence[float]) -> list[float]:
    """Sums over every rank in float64 (FLOP counts overflow what an int64 reduce holds)."""
    if not is_distributed():
        return [float(v) for v in values]
    return all_reduce(torch.tensor(list(values), dtype=torch.float64)).tolist()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` of rank `src` on every rank (pickled; torch moves it to the current GPU on NCCL)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list:
    """Every rank's `obj`, in rank order."""
    if not is_distributed():
        return [obj]
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, obj)
    return every


def shutdown() -> None:
    """Barrier, then destroy: without the barrier about 1 in 3 ZeRO-1/2 runs aborted at exit
    (FIELD-NOTES)."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def abandon() -> None:
    """Releases the process group without a barrier (after an error: the other ranks may never
    reach one)."""
    if is_distributed():
        dist.destroy_process_group()
