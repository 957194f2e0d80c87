"""Lets `import streaming` work beside a CPU torch that PyPI's torchvision cannot load.

mosaicml-streaming's package __init__ imports `streaming.vision` (its image-dataset zoo),
which imports torchvision. PyPI's Linux torchvision wheels are CUDA builds; next to the CPU
torch they fail at import ("operator torchvision::nms does not exist"), and with torchvision
removed the import fails too. blt-dist never uses streaming.vision.

`install()` adds an import hook: when `streaming.vision` is imported and torchvision cannot
be, `streaming.vision` becomes a placeholder module whose attributes raise an ImportError
that says why. Where torchvision works (a GPU user's matched install), nothing changes.
tools/install.sh registers this hook in the venv with a .pth file, so plain
`import streaming` works in any Python started from that venv, not only inside blt-dist.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

_GUARDED = "streaming.vision"


def _torchvision_usable() -> bool:
    try:
        # lazy: this probe is the point: does torchvision load beside this torch?
        import torchvision  # noqa: F401
    except Exception:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        return False
    return True


class _Placeholder(types.ModuleType):
    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise ImportError(
            f"{_GUARDED}.{attr} is unavailable: torchvision cannot be imported beside this torch build "
            "(blt-dist does not need it; install a torchvision that matches your torch to use it)"
        )


class _Loader(importlib.abc.Loader):
    def create_module(self, spec):
        return _Placeholder(spec.name)

    def exec_module(self, module):
        module.__path__ = []


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _GUARDED or _torchvision_usable():
            return None
        return importlib.machinery.ModuleSpec(fullname, _Loader(), is_package=True)


def install() -> None:
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
