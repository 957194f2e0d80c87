"""`blt-dist patch`: show how a text is cut into patches.

    blt-dist patch "Hello world" --mode space
    blt-dist patch --file notes.txt --mode static --patch-size 4 --json
    blt-dist patch --file page.html --mode entropy --threshold 1.335 --entropy-model EXPORT_DIR --html out.html

The input is encoded like a training document (BOS + bytes + EOS) and patched with the same
code as the loaders (blt_dist.data.patching), so what you see is what the model gets. Output
covers every input byte exactly once with raw byte offsets; BOS and EOS are not shown (a patch
holding only BOS or EOS is left out, and `mean_patch_size` counts the patches shown, as
`calibrate` does). TEXT is taken as UTF-8 (undecodable command-line bytes pass through as the
raw bytes); --file is read as raw bytes, so invalid UTF-8 and binary are fine.
"""
from __future__ import annotations

import argparse
import html
import json
import os
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from blt_dist.data.entropies import document_entropies, load_entropy_model
from blt_dist.data.patching import ENTROPY_MODES, MODES, PatchingRule, patch_starts
from blt_dist.errors import UserError
from blt_dist.vocab import encode_document

EntropyFn = Callable[[np.ndarray], np.ndarray]  # encoded ids [T] -> entropies [T] (nats)


def load_entropy_fn(path: str) -> EntropyFn:
    """An entropy-model export (`blt-dist train` on configs/entropy/*) as a function: encoded
    ids [T] -> entropies [T], computed as `blt-dist entropies` computes them for the training
    data and rounded to float16 as the shards store them, so the layout shown is the one the
    loader would cut (a float32 value just above the threshold can round to one just below)."""
    model, cfg = load_entropy_model(path)
    window = cfg.model.attention_window

    def entropies(ids: np.ndarray) -> np.ndarray:
        return document_entropies(model, [ids], window)[0].astype(np.float16)

    return entropies


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", nargs="?", help="text to patch (UTF-8); or use --file")
    parser.add_argument("--file", help="read the input from this file as raw bytes")
    parser.add_argument("--mode", required=True, choices=MODES, help="patching mode")
    parser.add_argument(
        "--threshold", type=float, help="entropy: theta (nats); monotonic: theta_r, the rise over the previous byte"
    )
    parser.add_argument("--patch-size", type=int, default=4, help="static mode: bytes per patch (default 4)")
    parser.add_argument("--max-patch-length", type=int, default=16, help="longest patch in positions (default 16)")
    parser.add_argument(
        "--entropy-model", metavar="EXPORT_DIR", help="entropy-model export directory (entropy/monotonic modes)"
    )
    parser.add_argument("--json", action="store_true", help="print the patches as JSON")
    parser.add_argument("--html", metavar="OUT", help="write an HTML page colouring bytes by entropy")


@dataclass
class Patch:
    start: int  # byte offset in the input
    data: bytes
    entropies: Optional[np.ndarray]  # per byte, when an entropy model was given

    def as_json(self) -> dict:
        item = {"start": self.start, "length": len(self.data), "text": self.data.decode("utf-8", errors="replace")}
        if self.entropies is not None:
            item["entropies"] = [round(float(h), 4) for h in self.entropies]
        return item


def _read_input(args) -> bytes:
    if (args.text is None) == (args.file is None):
        raise UserError("give either TEXT or --file F (exactly one)")
    if args.file is not None:
        path = Path(args.file)
        if not path.is_file():
            raise UserError(f"--file {args.file}: no such file")
        return path.read_bytes()
    # argv was decoded with surrogateescape: encoding back the same way restores raw bytes
    return args.text.encode("utf-8", errors="surrogateescape")


def _rule(args) -> PatchingRule:
    if args.mode in ENTROPY_MODES and args.entropy_model is None:
        raise UserError(f"--mode {args.mode} needs entropies from an entropy model: pass --entropy-model EXPORT_DIR")
    if args.mode in ENTROPY_MODES and args.threshold is None:
        raise UserError(f"--mode {args.mode} needs --threshold X (nats; `blt-dist calibrate` finds one)")
    key = "threshold_r" if args.mode == "monotonic" else "threshold"
    return PatchingRule(
        args.mode, patch_size=args.patch_size, max_patch_length=args.max_patch_length, **{key: args.threshold}
    )


def cut_patches(data: bytes, ids: np.ndarray, starts: np.ndarray, entropies: Optional[np.ndarray]) -> list[Patch]:
    """Patches as byte ranges of `data` (encoded position p holds byte p - 1)."""
    edges = np.append(np.flatnonzero(starts), ids.size)
    patches = []
    for a, b in zip(edges[:-1], edges[1:]):
        first, last = max(int(a), 1) - 1, min(int(b), len(data) + 1) - 1  # drop BOS / EOS
        if last > first:
            H = None if entropies is None else entropies[first + 1 : last + 1]
            patches.append(Patch(first, data[first:last], H))
    return patches


def _visible(text: str) -> str:
    """Control characters other than newline and tab as escapes, so the terminal stays sane."""
    return "".join(
        ch if ch in "\n\t" or unicodedata.category(ch) != "Cc" else f"\\x{ord(ch):02x}" for ch in text
    )


def _terminal(patches: list[Patch], rule: PatchingRule, n_bytes: int, colour: bool) -> str:
    pieces = [_visible(p.data.decode("utf-8", errors="replace")) for p in patches]
    if colour:  # alternating backgrounds: exact boundaries even when the text contains '|'
        shown = "".join(f"\x1b[{(43, 46)[k % 2]};30m{s}\x1b[0m" for k, s in enumerate(pieces))
    else:
        shown = "|".join(pieces)
    mean = n_bytes / len(patches) if patches else 0.0
    lines = [shown, ""]
    if patches and patches[0].entropies is not None:
        lines.append("  start  length  H(first)  H(mean)  text")
        for p in patches:
            text = _visible(p.data.decode("utf-8", errors="replace")).replace("\n", "\\n")
            lines.append(
                f"{p.start:7d}  {len(p.data):6d}  {p.entropies[0]:8.3f}  {p.entropies.mean():7.3f}  {text}"
            )
        lines.append("")
    lines.append(
        f"{n_bytes} bytes, {len(patches)} patches, mean patch size {mean:.2f} bytes "
        f"(mode {rule.mode}, max_patch_length {rule.max_patch_length})"
    )
    return "\n".join(lines)


def _characters(data: bytes):
    """(text, byte length) per character; an undecodable byte is one U+FFFD of length 1."""
    i = 0
    while i < len(data):
        for width in (1, 2, 3, 4):
            try:
                yield data[i : i + width].decode("utf-8"), width
                i += width
                break
            except UnicodeDecodeError:
                continue
        else:
            yield "\ufffd", 1
            i += 1


def _html_page(patches: list[Patch], rule: PatchingRule, n_bytes: int) -> str:
    """Bytes coloured by entropy (white = predictable, red = surprising), as in the BLT paper's
    figure; a bar marks each patch start. Without entropies, patches alternate two colours."""
    top = max((float(p.entropies.max()) for p in patches if p.entropies is not None and p.entropies.size), default=0.0)
    spans = []
    for k, patch in enumerate(patches):
        offset = 0
        for ch, width in _characters(patch.data):
            where = patch.start + offset
            if patch.entropies is not None:
                h = float(patch.entropies[offset])  # the entropy before this character's first byte
                light = 100 - 55 * (h / top if top > 0 else 0.0)
                style, title = f"background:hsl(0,90%,{light:.0f}%)", f"byte {where}, H={h:.3f} nats"
            else:
                style, title = f"background:{('#fde68a', '#a5f3fc')[k % 2]}", f"byte {where}, patch {k}"
            if offset == 0:
                style += ";border-left:2px solid #222"
            text = "\u21b5\n" if ch == "\n" else _visible(ch)
            spans.append(f'<span style="{style}" title="{title}">{html.escape(text)}</span>')
            offset += width
    mean = n_bytes / len(patches) if patches else 0.0
    legend = (
        f"mode {rule.mode}, threshold {rule.threshold if rule.mode == 'entropy' else rule.threshold_r}"
        if rule.mode in ENTROPY_MODES
        else f"mode {rule.mode}"
    )
    return (
        "<!doctype html>\n<html><head><meta charset='utf-8'><title>blt-dist patches</title>"
        "<style>body{font-family:sans-serif} pre{font-family:monospace;font-size:15px;"
        "line-height:1.6;white-space:pre-wrap}</style></head><body>\n"
        f"<p>{html.escape(legend)}, max_patch_length {rule.max_patch_length}: {n_bytes} bytes, "
        f"{len(patches)} patches, mean patch size {mean:.2f} bytes. "
        f"{'Colour: entropy before each byte (white 0, red ' + format(top, '.2f') + ' nats). ' if top else ''}"
        "A bar marks each patch start; hover a character for details.</p>\n"
        f"<pre>{''.join(spans)}</pre>\n</body></html>\n"
    )


def run(args) -> int:
    data = _read_input(args)
    rule = _rule(args)
    ids = encode_document(data)
    entropies = None
    if args.entropy_model is not None:
        entropy_fn = load_entropy_fn(args.entropy_model)
        entropies = np.asarray(entropy_fn(ids), dtype=np.float32)
        if entropies.shape != ids.shape:
            raise UserError(f"the entropy model returned {entropies.shape} entropies for {ids.size} positions")
    starts = patch_starts(ids, entropies, rule)
    patches = cut_patches(data, ids, starts, entropies)

    if args.html:
        target = Path(args.html)
        target.write_text(_html_page(patches, rule, len(data)), encoding="utf-8")
        print(f"wrote {target}", file=sys.stderr)
    if args.json:
        report = {
            "patches": [p.as_json() for p in patches],
            "mean_patch_size": len(data) / len(patches) if patches else 0.0,
            "n_bytes": len(data),
            "mode": rule.mode,
        }
        print(json.dumps(report))
    else:
        colour = sys.stdout.isatty() and "NO_COLOR" not in os.environ
        print(_terminal(patches, rule, len(data), colour))
    return 0
