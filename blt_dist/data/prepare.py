"""`blt-dist prepare`: raw inputs -> MDS byte shards (one sample per document), train/val split.

Inputs, in the order given:
  * a directory: every regular file below it, sorted by path (dot-files and dot-directories
    are skipped and counted). A file's content type is its first directory level below the
    input directory (`corpus/train/code/x.jsonl` -> `code`), or `default` at the top level.
  * a `.jsonl` file: one document per non-blank line, the text in a JSON field (`text`).
  * any other file: one document, its raw bytes exactly as on disk.
`--content-type NAME` puts everything in one content type.

Bytes are kept exactly: invalid UTF-8, NUL, emoji and empty documents are stored as they are.
JSON strings carry text, not bytes; lone surrogates from Python's `surrogateescape` (U+DC80..
U+DCFF) are turned back into the raw bytes they stand for, any other lone surrogate is an error.

The split is a pure function of (split seed, document bytes): a document lands in val when
its hash falls below --val-fraction, so identical documents always share a split and adding
documents never moves existing ones. `--sample-fraction F` keeps each document with probability F
by the same kind of hash (another salt): a deterministic slice that keeps every content type in
proportion, recorded in the manifest with the documents and bytes it left out. Everything is written to a temporary directory beside
--out, read back and checked (byte count and fingerprint), then published by one rename.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from blt_dist.data.shards import (
    COLUMNS,
    FORMAT,
    MANIFEST,
    SHARD_HASHES,
    ByteDataset,
    StreamHash,
    dataset_fingerprint,
    index_digest,
    iter_stream,
    publish,
    write_lengths,
)
from blt_dist.errors import UserError

CONTENT_TYPE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class Document:
    content_type: str
    source: str  # 'path' or 'path:line'
    data: bytes


@dataclass
class InputStats:
    files: int = 0
    skipped_hidden: int = 0
    blank_jsonl_lines: int = 0


# ---------------------------------------------------------------------------------------------
# Reading inputs


def _content_type(name: str, where: Path) -> str:
    if not CONTENT_TYPE_RE.match(name):
        raise UserError(f"{where}: content type {name!r} must match {CONTENT_TYPE_RE.pattern}")
    return name


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror or err})") from err


def _jsonl_documents(path: Path, content_type: str, text_field: str, stats: InputStats) -> Iterator[Document]:
    lines = _read_bytes(path).split(b"\n")
    if lines[-1] == b"":  # the empty tail after a final newline is not a line
        lines.pop()
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            stats.blank_jsonl_lines += 1
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            reason = err.msg if isinstance(err, json.JSONDecodeError) else "not UTF-8"
            raise UserError(f"{path}:{line_number}: malformed JSON line ({reason})") from err
        if not isinstance(record, dict) or text_field not in record:
            raise UserError(f"{path}:{line_number}: expected a JSON object with a {text_field!r} field")
        text = record[text_field]
        if not isinstance(text, str):
            raise UserError(f"{path}:{line_number}: field {text_field!r} is {type(text).__name__}, expected a string")
        try:
            data = text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError as err:
            raise UserError(f"{path}:{line_number}: text holds a lone surrogate at character {err.start}") from err
        yield Document(content_type, f"{path}:{line_number}", data)


def _file_documents(path: Path, content_type: str, text_field: str, stats: InputStats) -> Iterator[Document]:
    stats.files += 1
    if path.suffix == ".jsonl":
        yield from _jsonl_documents(path, content_type, text_field, stats)
    else:
        yield Document(content_type, str(path), _read_bytes(path))


def list_input_files(inputs: list[Path], content_type: str | None, stats: InputStats) -> list[tuple[Path, str]]:
    """Every input file with its content type, in a deterministic order."""
    files: list[tuple[Path, str]] = []
    for root in inputs:
        if not root.exists():
            raise UserError(f"{root}: no such file or directory")
        if root.is_file():
            files.append((root, _content_type(content_type or "default", root)))
            continue
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root)
            if any(part.startswith(".") for part in rel.parts):
                stats.skipped_hidden += path.is_file()
                continue
            if path.is_dir():
                continue
            if not path.is_file():
                raise UserError(f"{path}: not a regular file")
            name = content_type or (rel.parts[0] if len(rel.parts) > 1 else "default")
            files.append((path, _content_type(name, path)))
    if not files:
        raise UserError(f"no input files under {', '.join(map(str, inputs))}")
    return files


# ---------------------------------------------------------------------------------------------
# Writing shards


def split_of(data: bytes, val_fraction: float, split_seed: int) -> str:
    if val_fraction <= 0.0:
        return "train"
    digest = hashlib.sha256(split_seed.to_bytes(8, "little", signed=True) + data).digest()
    return "val" if int.from_bytes(digest[:8], "little") / 2**64 < val_fraction else "train"


def sampled(data: bytes, sample_fraction: float, split_seed: int) -> bool:
    """Whether `--sample-fraction` keeps this document (salted apart from the split's hash)."""
    if sample_fraction >= 1.0:
        return True
    digest = hashlib.sha256(b"sample" + split_seed.to_bytes(8, "little", signed=True) + data).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < sample_fraction


def prepare(
    inputs: list[Path],
    out: Path,
    *,
    val_fraction: float = 0.01,
    split_seed: int = 0,
    shard_size: str = "64mb",
    content_type: str | None = None,
    text_field: str = "text",
    sample_fraction: float = 1.0,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Writes the dataset and returns its manifest (also written to OUT/dataset.json)."""
    # lazy: `import streaming` costs 2 s over torch (measured); only shard I/O needs it
    from streaming import MDSWriter

    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if not 0.0 < sample_fraction <= 1.0:
        raise UserError(f"--sample-fraction must be in (0, 1], got {sample_fraction}")
    _check_output(out, force)
    stats = InputStats()
    files = list_input_files(inputs, content_type, stats)
    total_input_bytes = sum(path.stat().st_size for path, _ in files)

    tmp = out.parent / f".{out.name}.tmp-prepare"
    if tmp.exists():  # left by a crashed run: never published, safe to discard
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    writers: dict[tuple[str, str], MDSWriter] = {}
    hashes: dict[tuple[str, str], StreamHash] = defaultdict(StreamHash)
    counts: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])  # documents, bytes
    lengths: dict[tuple[str, str], list[int]] = defaultdict(list)  # every document's bytes (lengths.npy)
    left_out = [0, 0]  # documents, bytes not kept by --sample-fraction
    try:
        with tqdm(total=total_input_bytes, unit="B", unit_scale=True, desc="prepare", disable=not progress) as bar:
            for path, ctype in files:
                for doc in _file_documents(path, ctype, text_field, stats):
                    if not sampled(doc.data, sample_fraction, split_seed):
                        left_out[0] += 1
                        left_out[1] += len(doc.data)
                        continue
                    key = (split_of(doc.data, val_fraction, split_seed), doc.content_type)
                    if key not in writers:
                        writers[key] = MDSWriter(
                            out=str(tmp / key[0] / key[1]), columns=COLUMNS, size_limit=shard_size, hashes=SHARD_HASHES
                        )
                    writers[key].write({"data": doc.data, "doc": counts[key][0], "source": doc.source})
                    hashes[key].add_document(doc.data)
                    lengths[key].append(len(doc.data))
                    counts[key][0] += 1
                    counts[key][1] += len(doc.data)
                bar.update(path.stat().st_size)
        for writer in writers.values():
            writer.finish()
        lengths_sha256 = {key: write_lengths(tmp / key[0] / key[1], values) for key, values in lengths.items()}
        manifest = _manifest(tmp, counts, hashes, lengths_sha256, val_fraction, split_seed, inputs)
        if sample_fraction < 1.0:
            manifest["sample"] = {"fraction": sample_fraction, "left_out_documents": left_out[0],
                                  "left_out_bytes": left_out[1]}
        _check_written(tmp, manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest["input_stats"] = vars(stats)
    return manifest


def _check_output(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MANIFEST).is_file():
            raise UserError(f"{out}: exists and holds other data; refusing to write a dataset there")
        if not force:
            raise UserError(f"{out}: a prepared dataset already exists (pass --force to replace it)")


def _manifest(tmp: Path, counts, hashes, lengths_sha256, val_fraction: float, split_seed: int, inputs: list[Path]) -> dict:
    splits: dict[str, dict] = {}
    for (split, ctype), (documents, nbytes) in sorted(counts.items()):
        index = json.loads((tmp / split / ctype / "index.json").read_text())
        splits.setdefault(split, {})[ctype] = {
            "documents": documents,
            "bytes": nbytes,
            "shards": len(index["shards"]),
            "sha256": hashes[(split, ctype)].hexdigest(),
            "index_sha256": index_digest(tmp / split / ctype),  # the root of trust for the shards' hashes
            "lengths_sha256": lengths_sha256[(split, ctype)],
        }
    return {
        "format": FORMAT,
        "fingerprint": dataset_fingerprint({key: h.hexdigest() for key, h in hashes.items()}),
        "splits": splits,
        "val_fraction": val_fraction,
        "split_seed": split_seed,
        "inputs": [str(p) for p in inputs],
    }


def _check_written(tmp: Path, manifest: dict) -> None:
    """Reads every shard back: document count, byte count and content hash must match."""
    for split, types in manifest["splits"].items():
        for ctype, expected in types.items():
            documents, nbytes, digest = 0, 0, StreamHash()
            for sample in iter_stream(tmp / split / ctype):
                if sample["doc"] != documents:
                    raise RuntimeError(f"{split}/{ctype}: document {documents} read back as {sample['doc']}")
                documents += 1
                nbytes += len(sample["data"])
                digest.add_document(sample["data"])
            got = (documents, nbytes, digest.hexdigest())
            want = (expected["documents"], expected["bytes"], expected["sha256"])
            if got != want:
                raise RuntimeError(f"{split}/{ctype}: wrote {want} (documents, bytes, sha256) but read back {got}")


def format_summary(manifest: dict) -> str:
    rows = [("split", "content type", "documents", "bytes", "shards")]
    for split, types in sorted(manifest["splits"].items(), key=lambda kv: kv[0] != "train"):
        for ctype, s in sorted(types.items()):
            rows.append((split, ctype, f"{s['documents']:,}", f"{s['bytes']:,}", str(s["shards"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", type=Path, help="directories, .txt or .jsonl files")
    parser.add_argument("--out", type=Path, required=True, help="dataset directory to create")
    parser.add_argument("--val-fraction", type=float, default=0.01, help="share of documents for validation")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the train/val hash split")
    parser.add_argument("--shard-size", default="64mb", help="MDS shard size limit, e.g. 16mb (default 64mb)")
    parser.add_argument("--content-type", default=None, help="one content type for all inputs")
    parser.add_argument("--text-field", default="text", help="JSONL field holding the text")
    parser.add_argument("--sample-fraction", type=float, default=1.0,
                        help="keep each document with this probability (a seeded hash of its bytes: every content "
                             "type in proportion; the manifest records what was left out)")
    parser.add_argument("--force", action="store_true", help="replace an existing prepared dataset")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    manifest = prepare(
        args.inputs,
        args.out,
        val_fraction=args.val_fraction,
        split_seed=args.split_seed,
        shard_size=args.shard_size,
        content_type=args.content_type,
        text_field=args.text_field,
        sample_fraction=args.sample_fraction,
        force=args.force,
        progress=not args.no_progress,
    )
    ByteDataset(args.out)  # what later stages will open: check it opens
    stats = manifest["input_stats"]
    total_docs = sum(s["documents"] for t in manifest["splits"].values() for s in t.values())
    total_bytes = sum(s["bytes"] for t in manifest["splits"].values() for s in t.values())
    print(format_summary(manifest))
    print(
        f"{total_docs:,} documents, {total_bytes:,} bytes in == {total_bytes:,} bytes out (read back and checked)"
        f" from {stats['files']} files; fingerprint {manifest['fingerprint'][:16]}"
    )
    if "sample" in manifest:
        s = manifest["sample"]
        print(f"--sample-fraction {s['fraction']:g}: left out {s['left_out_documents']:,} documents, "
              f"{s['left_out_bytes']:,} bytes")
    skipped = [f"{stats['skipped_hidden']} hidden files"] if stats["skipped_hidden"] else []
    skipped += [f"{stats['blank_jsonl_lines']} blank JSONL lines"] if stats["blank_jsonl_lines"] else []
    if skipped:
        print(f"skipped (not documents): {', '.join(skipped)}", file=sys.stderr)
    return 0
