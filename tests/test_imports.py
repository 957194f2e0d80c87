"""The layers of the code, enforced: every import (inside functions too) runs down the layers,
no two modules import each other through any chain, and an import inside a function says why
it is there (`# lazy: <the measured cost it keeps off a path>`).

The layers, lowest first (README, "Reading the code"; DESIGN.md, "Layout"). A module may import
its own layer and the layers below it, never one above.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("blt_dist", "launch")

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("ground", ("blt_dist", "blt_dist._streaming_compat", "blt_dist.errors", "blt_dist.vocab", "blt_dist.hardware",
                "blt_dist.shims")),
    ("config", ("blt_dist.config",)),
    ("model", ("blt_dist.model",)),
    ("flops", ("blt_dist.flops",)),
    ("data", ("blt_dist.data", "blt_dist.corpus")),
    ("parallel", ("blt_dist.parallel",)),
    ("evaluation", ("blt_dist.evaluation",)),
    ("training", ("blt_dist.training",)),
    ("interop", ("blt_dist.interop",)),
    ("bench", ("blt_dist.bench",)),
    ("launch", ("launch",)),
    ("commands", ("blt_dist.cli", "blt_dist.demo")),
]
LAZY_MARK = "# lazy:"


def layer_of(module: str) -> int:
    """Index of the layer whose longest prefix names `module`; the bare package `blt_dist`
    (its __init__) is ground, and a prefix only matches whole name parts."""
    best, best_len = -1, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            whole = module == prefix
            below = module.startswith(prefix + ".") and prefix != "blt_dist"
            if (whole or below) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    return best


def project_modules(root: Path = REPO) -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def imports_of(module: str, source: str, known: set[str]) -> list[tuple[str, int, bool, str]]:
    """(imported project module, line, inside a function?, the line's text) for every import
    statement in `source` that names a project module."""
    tree = ast.parse(source)
    lines = source.splitlines()
    is_package = module in PACKAGES or any(m.startswith(module + ".") for m in known)
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            targets: list[str] = []
            if isinstance(child, ast.Import):
                targets = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = module.split(".") if is_package else module.split(".")[:-1]
                    parts = parts[: len(parts) - child.level + 1]
                    base = ".".join(parts + ([child.module] if child.module else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in child.names]
            for target in dict.fromkeys(targets):
                while target and target not in known:  # `import blt_dist.model.layers.x` -> the module part
                    target = target.rpartition(".")[0]
                if target and target != module:
                    found.append((target, child.lineno, in_function, lines[child.lineno - 1]))
            if isinstance(child, (ast.Import, ast.ImportFrom)) and in_function:
                text = lines[child.lineno - 1]
                # the comments and imports right above: one `# lazy:` comment may head a block of imports
                comment_above, at = [], child.lineno - 2
                while at >= 0 and lines[at].strip().startswith(("#", "import ", "from ")):
                    comment_above.append(lines[at])
                    at -= 1
                if not any(LAZY_MARK in line for line in [text, *comment_above]):
                    found.append(("<unmarked>", child.lineno, True, text))
            visit(child, nested)

    visit(tree, False)
    return found


def import_graph(sources: dict[str, str]) -> tuple[dict[str, set[str]], list[str]]:
    """(module -> imported project modules, problems found on the way)."""
    known = set(sources)
    graph: dict[str, set[str]] = {m: set() for m in sources}
    problems = []
    for module, source in sources.items():
        for target, line, in_function, text in imports_of(module, source, known):
            where = f"{module}:{line}"
            if target == "<unmarked>":
                problems.append(f"{where}: an import inside a function without a `{LAZY_MARK} <reason>` comment: "
                                f"{text.strip()} (move it to the top of the module)")
                continue
            graph[module].add(target)
            if layer_of(module) < layer_of(target):
                problems.append(f"{where}: {module} ({LAYERS[layer_of(module)][0]}) imports {target} "
                                f"({LAYERS[layer_of(target)][0]}), a higher layer")
    return graph, problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return found


def check(sources: dict[str, str]) -> list[str]:
    problems = [f"{m}: in no layer (add it to LAYERS in tests/test_imports.py)" for m in sources if layer_of(m) < 0]
    graph, found = import_graph(sources)
    problems += found
    problems += [f"import circle: {' <-> '.join(c)}" for c in cycles(graph)]
    return problems


def test_the_project_keeps_its_layers():
    sources = {m: p.read_text() for m, p in project_modules().items()}
    assert len(sources) > 50
    problems = check(sources)
    assert not problems, "\n".join(problems)


def test_nothing_under_blt_dist_but_the_commands_imports_launch():
    sources = {m: p.read_text() for m, p in project_modules().items()}
    graph, _ = import_graph(sources)
    wired = sorted(m for m, targets in graph.items()
                   if m.startswith("blt_dist") and any(t.split(".")[0] == "launch" for t in targets))
    assert set(wired) <= {"blt_dist.cli", "blt_dist.demo"}, wired


# The checker itself: each rule fails when broken (so the test above cannot pass vacuously).


GOOD = {
    "blt_dist": "",
    "blt_dist.errors": "",
    "blt_dist.data": "",
    "blt_dist.data.shards": "from blt_dist.errors import UserError\n",
    "blt_dist.training": "",
    "blt_dist.training.loop": "from blt_dist.data import shards\n",
}


def test_checker_accepts_downward_imports():
    assert check(GOOD) == []


@pytest.mark.parametrize("module, source, expected", [
    # the data plane reaching up into the trainer, at the top of the module or inside a function
    ("blt_dist.data.shards", "from blt_dist.training.loop import x\n", "a higher layer"),
    ("blt_dist.data.shards", "def f():\n    import blt_dist.training.loop  # lazy: test\n", "a higher layer"),
    ("blt_dist.data.shards", "def f():\n    from launch import slurm  # lazy: test\n", "a higher layer"),
    # an import inside a function with no reason given
    ("blt_dist.training.loop", "def f():\n    import json\n", "without a `# lazy: <reason>` comment"),
    # a circle inside one layer
    ("blt_dist.training", "from blt_dist.training import loop\n", "import circle"),
    # a module nobody placed
    ("blt_dist.newthing", "", "in no layer"),
])
def test_checker_rejects(module, source, expected):
    sources = {**GOOD, "launch": "", "launch.slurm": "", "blt_dist.training.loop": GOOD["blt_dist.training.loop"]}
    if module == "blt_dist.training":  # the circle: training/__init__ <-> training.loop
        sources["blt_dist.training.loop"] = "import blt_dist.training\n"
    sources[module] = source
    problems = check(sources)
    assert any(expected in p for p in problems), problems


def test_relative_imports_resolve():
    known = {"blt_dist", "blt_dist.data", "blt_dist.data.shards", "blt_dist.data.loader"}
    found = imports_of("blt_dist.data.loader", "from .shards import ByteDataset\nfrom . import shards\n", known)
    assert [f[0] for f in found] == ["blt_dist.data.shards", "blt_dist.data.shards"]
