"""A copy of the code a job runs, taken when it is submitted.

A job may wait hours in the queue and be requeued for days; the tree it was submitted from
keeps changing. The job therefore runs the snapshot (launch/ puts it first on PYTHONPATH), and
the run directory says exactly what that code was: the git revision, whether the tree was dirty,
and, if it was, the diff against that revision.

    RUN_DIR/code/            the git-tracked files as they are in the working tree, plus files
                             git does not ignore but does not track yet (new modules)
    RUN_DIR/code.json        revision, dirty flag, file count, the untracked files, where the diff is
    RUN_DIR/code.diff        `git diff HEAD` (only for a dirty tree)
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from blt_dist.errors import UserError

# Without git (an unpacked release), these are the packages a job needs.
PACKAGES = ("blt_dist", "launch", "tools")
MAX_UNTRACKED_BYTES = 1 << 20


def _git(repo: Path, *args: str) -> str:
    result = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(result.stderr.strip() or f"git {' '.join(args)} failed")
    return result.stdout


def repo_root() -> Path:
    """The checkout the running code comes from."""
    return Path(__file__).resolve().parents[1]


def tracked_files(repo: Path) -> list[str] | None:
    """Paths git tracks (None when `repo` is not a git checkout)."""
    try:
        out = _git(repo, "ls-files", "-z", "--cached")
    except (OSError, RuntimeError, subprocess.SubprocessError):
        return None
    return [p for p in out.split("\0") if p]


def take_snapshot(run_dir: Path, repo: Path | None = None, require_clean: bool = False) -> dict:
    """Copies the code into run_dir/code and records what it is. Refuses a dirty tree when
    `require_clean`. An existing snapshot is replaced only as a whole (written next to it, then
    swapped in), so a crash never leaves half of one."""
    repo = repo or repo_root()
    files = tracked_files(repo)
    record: dict = {"source": str(repo)}
    if files is None:
        files = [str(p.relative_to(repo)) for pkg in PACKAGES for p in (repo / pkg).rglob("*.py")]
        files += [name for name in ("pyproject.toml",) if (repo / name).is_file()]
        record.update(revision="unknown (not a git checkout)", dirty=None)
        diff = ""
    else:
        record["revision"] = _git(repo, "rev-parse", "HEAD").strip()
        diff = _git(repo, "diff", "HEAD", "--binary")
        untracked = [p for p in _git(repo, "ls-files", "--others", "--exclude-standard", "-z").split("\0") if p]
        # new files the tracked code may import; a large one is data left lying about, not code
        record["untracked"] = [p for p in untracked if (repo / p).stat().st_size <= MAX_UNTRACKED_BYTES]
        record["untracked_too_large_not_copied"] = sorted(set(untracked) - set(record["untracked"]))
        files = files + record["untracked"]
        record["dirty"] = bool(diff) or bool(untracked)
        if record["dirty"] and require_clean:
            changed = _git(repo, "status", "--short").strip().splitlines()
            raise UserError(
                f"the working tree has uncommitted changes ({len(changed)} paths, e.g. {changed[0].strip()}); "
                "commit them or drop --require-clean (the diff is then recorded in the run directory)"
            )
    staging = run_dir / "code.partial"
    shutil.rmtree(staging, ignore_errors=True)
    copied = 0
    for rel in files:
        source = repo / rel
        if not source.is_file():  # deleted in the working tree but still tracked
            continue
        target = staging / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
        copied += 1
    final = run_dir / "code"
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    record["files"] = copied
    if diff:
        (run_dir / "code.diff").write_text(diff)
        record["diff"] = "code.diff"
    (run_dir / "code.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
