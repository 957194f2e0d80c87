"""The loop's collectives go through parallel/collectives.py, which puts their tensors where the
backend reduces (NCCL: the GPU). CPU CI cannot run NCCL; tools/gpu_check.sh runs the trainer on
it. What CPU can show: no module calls a torch.distributed collective directly, the device
decision follows the backend, and the functions reduce correctly on a real gloo group."""
from __future__ import annotations

import ast
import datetime
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from blt_dist.parallel import collectives

REPO = Path(__file__).resolve().parents[1]
COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast", "broadcast_object_list",
    "reduce", "reduce_scatter", "reduce_scatter_tensor", "gather", "gather_object", "scatter", "scatter_object_list",
    "all_to_all", "all_to_all_single", "barrier", "monitored_barrier", "send", "recv", "isend", "irecv",
}
THE_PLACE = REPO / "blt_dist" / "parallel" / "collectives.py"


def direct_collective_calls(source: str) -> list[tuple[int, str]]:
    """(line, call) for every torch.distributed collective called in `source`."""
    tree = ast.parse(source)
    aliases = {"torch.distributed"}  # names bound to the torch.distributed module
    direct = set()  # collective functions imported by name
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name == "torch.distributed" and a.asname}
        elif isinstance(node, ast.ImportFrom):
            if node.module == "torch":
                aliases |= {a.asname or a.name for a in node.names if a.name == "distributed"}
            if node.module == "torch.distributed":
                direct |= {a.asname or a.name for a in node.names if a.name in COLLECTIVES}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in direct:
            found.append((node.lineno, func.id))
        elif isinstance(func, ast.Attribute) and func.attr in COLLECTIVES and ast.unparse(func.value) in aliases:
            found.append((node.lineno, ast.unparse(func)))
    return found


def test_no_module_calls_a_collective_outside_parallel_collectives():
    offenders = []
    for path in sorted([*(REPO / "blt_dist").rglob("*.py"), *(REPO / "launch").rglob("*.py")]):
        if path == THE_PLACE:
            continue
        offenders += [f"{path.relative_to(REPO)}:{line}: {call}" for line, call in direct_collective_calls(path.read_text())]
    assert not offenders, "call these through blt_dist/parallel/collectives.py:\n" + "\n".join(offenders)


@pytest.mark.parametrize("source", [
    "import torch.distributed as dist\ndist.all_reduce(t)\n",
    "import torch.distributed\ntorch.distributed.barrier()\n",
    "from torch import distributed as d\nd.broadcast_object_list(x, src=0)\n",
    "from torch.distributed import all_gather_object\nall_gather_object(a, b)\n",
])
def test_the_scan_sees_every_spelling(source):
    assert direct_collective_calls(source)


def test_the_device_follows_the_backend(monkeypatch):
    monkeypatch.setattr(collectives, "is_distributed", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert collectives.collective_device() == torch.device("cuda", 3)
    monkeypatch.setattr(dist, "get_backend", lambda *a: "gloo")
    assert collectives.collective_device() == torch.device("cpu")


def test_without_a_process_group_values_pass_through():
    assert not dist.is_initialized()
    t = torch.tensor([1.5, 2.0])
    assert collectives.all_reduce(t) is t
    assert collectives.reduce_int(7, "max") == 7
    assert collectives.reduce_floats([1.0, 2.5]) == [1.0, 2.5]
    assert collectives.broadcast_object({"a": 1}) == {"a": 1}
    assert collectives.all_gather_object("x") == ["x"]
    collectives.barrier()


def test_on_a_real_gloo_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        t = torch.tensor([1.0, 2.0], dtype=torch.float64)
        reduced = collectives.all_reduce(t, "max")
        assert reduced is not t and reduced.tolist() == [1.0, 2.0] and reduced.device == t.device
        assert collectives.reduce_int(True, "min") == 1
        assert collectives.reduce_floats([3e20, 1.0]) == [3e20, 1.0]  # float64: beyond int64
        assert collectives.broadcast_object(["tag"]) == ["tag"]
        assert collectives.all_gather_object(5) == [5]
        collectives.barrier()
    finally:
        collectives.shutdown()
    assert not dist.is_initialized()
