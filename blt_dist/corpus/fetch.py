"""Download and unpack packages into the corpus cache, reusing whatever is already there.

Debian packages are fetched with `apt-get download` and unpacked with `dpkg-deb -x`: nothing is
installed and no dependencies are pulled. PyPI wheels are fetched with `pip download --no-deps`
at pinned versions and unpacked with zipfile. Every unpacked tree is written to a temporary
directory and renamed into place, so a crash never leaves a half-unpacked tree that a later
build would trust.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from blt_dist.errors import UserError


class FetchError(UserError):
    """A package could not be downloaded or unpacked."""


@dataclass(frozen=True)
class Package:
    """An unpacked package: where its files are and exactly which build they came from."""

    name: str
    version: str
    root: Path
    archive: str  # the .deb or .whl file name, or "stdlib"


def apt_available() -> str | None:
    """None when apt can be used, otherwise the reason it cannot."""
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not on PATH"
    return None


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def _cached_debs(deb_dir: Path, name: str) -> list[Path]:
    return sorted(p for p in deb_dir.glob(f"{name}_*.deb") if p.name.split("_", 1)[0] == name)


def download_debs(names: list[str], cache: Path, log=print) -> dict[str, Path]:
    """The .deb of each package, downloading only those not in the cache (one apt call)."""
    deb_dir = cache / "debs"
    deb_dir.mkdir(parents=True, exist_ok=True)
    missing = [n for n in names if not _cached_debs(deb_dir, n)]
    if missing:
        log(f"corpus: downloading {len(missing)} Debian package(s) into {deb_dir}")
        result = _run(["apt-get", "download", "-q", *missing], deb_dir)
        if result.returncode != 0 and "Unable to locate package" in result.stderr:
            # A fresh machine has empty package lists: refresh once (needs root) and retry.
            log("corpus: apt package lists look empty; running `apt-get update` once")
            _run(["apt-get", "update", "-q"], deb_dir)
            result = _run(["apt-get", "download", "-q", *missing], deb_dir)
        if result.returncode != 0:
            lines = [ln for ln in result.stderr.splitlines() if ln.startswith("E:")] or result.stderr.splitlines()
            raise FetchError(f"apt-get download failed: {(lines or ['no message'])[0].strip()}")
    debs = {}
    for name in names:
        found = _cached_debs(deb_dir, name)
        if not found:
            raise FetchError(f"apt-get download produced no .deb for {name}")
        # Several versions can pile up in a long-lived cache; the newest file name wins,
        # and the manifest records exactly which one was used.
        debs[name] = found[-1]
    return debs


def unpack_deb(deb: Path, cache: Path) -> Package:
    target = cache / "unpacked" / deb.stem
    if not target.is_dir():
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        result = _run(["dpkg-deb", "-x", str(deb), str(tmp)], cache)
        if result.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FetchError(f"dpkg-deb -x {deb.name} failed: {result.stderr.strip()[:200]}")
        tmp.rename(target)
    version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True,
                             check=True).stdout.strip()
    return Package(name=deb.name.split("_", 1)[0], version=version, root=target, archive=deb.name)


def download_wheel(requirement: str, cache: Path, log=print) -> Package:
    """A pinned wheel ("name==version"), downloaded once and unpacked into the cache."""
    name, _, version = requirement.partition("==")
    wheel_dir = cache / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    prefix = name.lower().replace("-", "_") + "-" + version + "-"
    found = sorted(p for p in wheel_dir.glob("*.whl") if p.name.lower().startswith(prefix))
    if not found:
        log(f"corpus: downloading wheel {requirement}")
        result = _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                       "-d", str(wheel_dir), requirement], wheel_dir)
        found = sorted(p for p in wheel_dir.glob("*.whl") if p.name.lower().startswith(prefix))
        if result.returncode != 0 or not found:
            raise FetchError(f"pip download {requirement} failed: {result.stderr.strip().splitlines()[-1:]}")
    wheel = found[-1]
    target = cache / "unpacked" / wheel.stem
    if not target.is_dir():
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(tmp)
        tmp.rename(target)
    return Package(name=name, version=version, root=target, archive=wheel.name)
