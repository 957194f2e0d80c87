"""The private upstream code blt-dist relies on (blt_dist/shims.py) is what it was written against."""
from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

import pytest

from blt_dist import shims

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(shims.UPSTREAM))
def test_upstream_code_under_each_shim_is_unchanged(name):
    up = shims.UPSTREAM[name]
    installed = version(up.package)
    assert shims.source_sha256(up.functions) == up.source_sha256, (
        f"shim {name!r} was written against {up.package} {up.version}; {installed} is installed and its code "
        f"under the shim changed: re-read {', '.join(up.functions)}, adjust blt_dist/shims.py, then update the hash"
    )


def test_the_hash_sees_a_change(monkeypatch):
    up = shims.UPSTREAM["sbatch_script"]
    real = shims.upstream_source
    monkeypatch.setattr(shims, "upstream_source", lambda f: real(f) + "# changed upstream\n")
    assert shims.source_sha256(up.functions) != up.source_sha256


def test_pyproject_pins_the_versions_the_shims_were_written_against():
    text = (REPO / "pyproject.toml").read_text()
    for up in shims.UPSTREAM.values():
        match = re.search(rf'"{re.escape(up.package)}>=([\d.]+),<([\d.]+)"', text)
        assert match, f"pyproject.toml: pin {up.package} to a tested range (>=X,<Y)"
        low, high = (tuple(int(x) for x in v.split(".")) for v in match.groups())
        written = tuple(int(x) for x in up.version.split("."))
        assert low <= written < high, (up.package, match.group(0), up.version)
