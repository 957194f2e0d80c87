"""Read the verse text of a SWORD zText Bible module (sword-text-web, -kjv, -sparv) without libsword.

A zText module stores each testament as three files: `.bzz` (zlib-compressed blocks, one per
book when the module's BlockType=BOOK), `.bzs` (per block: offset, compressed size, raw size;
little-endian u32s) and `.bzv` (per verse slot: block number u32, offset in the raw block u32,
size u16). Verse slots also cover book and chapter headings; empty slots are skipped. Verse text
carries OSIS/ThML/GBF markup: notes and Strong's numbers are dropped, words kept.
"""
from __future__ import annotations

import html
import re
import struct
import zlib
from pathlib import Path

_NOTE = re.compile(r"<note\b.*?</note>|<RF>.*?<Rf>|<(?:RB|RW|WH|WG|WT)[^>]*>", re.S)
_TAG = re.compile(r"<[^>]*>")
_NEXT_WORD = re.compile(r"(?:<[^>]*>)*\w")  # a word follows, possibly after markup
_SPACE = re.compile(r"[ \t\r\n]+")


def _verse_text(markup: str) -> str:
    # A footnote sits between a word and the next one without spaces ("God<note>..</note>created"):
    # it becomes a space before a word, nothing before punctuation.
    def drop_note(match: re.Match) -> str:
        following = _NEXT_WORD.match(markup, match.end())
        return " " if following else ""

    text = _TAG.sub("", _NOTE.sub(drop_note, markup))
    return _SPACE.sub(" ", html.unescape(text)).strip()


def read_testament(directory: Path, testament: str, encoding: str = "utf-8") -> list[list[str]]:
    """Verses of one testament ("ot" or "nt") grouped by compressed block, in canonical order."""
    directory = Path(directory)
    index_path = directory / f"{testament}.bzs"
    if not index_path.exists():
        return []
    block_index = index_path.read_bytes()
    verse_index = (directory / f"{testament}.bzv").read_bytes()
    compressed = (directory / f"{testament}.bzz").read_bytes()
    raw_blocks: dict[int, bytes] = {}
    groups: dict[int, list[str]] = {}
    for pos in range(0, len(verse_index) - 9, 10):
        block, offset, size = struct.unpack_from("<IIH", verse_index, pos)
        if size == 0:
            continue
        if block not in raw_blocks:
            start, csize, _ = struct.unpack_from("<III", block_index, 12 * block)
            raw_blocks[block] = zlib.decompress(compressed[start : start + csize])
        text = _verse_text(raw_blocks[block][offset : offset + size].decode(encoding, errors="replace"))
        if text:
            groups.setdefault(block, []).append(text)
    return [groups[block] for block in sorted(groups)]


def module_books(module_dir: Path, encoding: str = "utf-8") -> list[list[str]]:
    """All blocks (books, for BlockType=BOOK modules) of a module, Old Testament first."""
    return read_testament(module_dir, "ot", encoding) + read_testament(module_dir, "nt", encoding)
