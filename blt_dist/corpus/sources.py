"""Every corpus source: which packages it needs, its licence, and how its text is extracted.

An extractor receives the unpacked packages and yields (source_id, text) pairs: one natural
document each (a chapter, a Bible book, a fortune, a manual section, a source file, a dictionary
entry), its text already decoded and normalised. `source_id` is "<package>:<path>[#part]" and is
unique; hold-out selection hashes it, so it must not depend on anything but the package content.
"""
from __future__ import annotations

import ast
import gettext
import gzip
import re
import sysconfig
import textwrap
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

from blt_dist.corpus import rdata, sword
from blt_dist.corpus.fetch import Package
from blt_dist.corpus.text import decode, is_language, keep_language, normalise

Docs = Iterator[tuple[str, str]]
Extractor = Callable[[Mapping[str, Package]], Iterable[tuple[str, str]]]

# Content types whose held-out lines must not occur in training (natural language).
NATURAL_LANGUAGE = ("prose", "technical", "multilingual")
CONTENT_TYPES = ("prose", "technical", "multilingual", "code", "math", "structured")


@dataclass(frozen=True)
class Source:
    name: str                      # output file stem: train/<content_type>/<name>.jsonl
    content_type: str
    packages: tuple[str, ...]      # Debian package names, "pip:name==version", or "stdlib"
    licence: str
    extract: Extractor
    cap_full: int                  # text bytes kept in the full recipe (sampled by hash of id)
    cap_small: int | None = None   # bytes in the small test recipe; None = not in it
    languages: tuple[str, ...] = ("en",)
    code_language: str | None = None
    notes: str = ""
    extra: dict = field(default_factory=dict)


def _files(root: Path, pattern: str, exclude: tuple[str, ...] = ()) -> list[Path]:
    """Regular files under `root` matching a glob, sorted, no symlinks (aliases would duplicate)."""
    return sorted(p for p in root.glob(pattern)
                  if p.is_file() and not p.is_symlink() and not any(x in p.as_posix() for x in exclude))


def _split_on_headings(text: str, heading: re.Pattern, min_bytes: int = 512) -> list[str]:
    """Cut at lines matching `heading`; text before the first heading joins the first section."""
    starts = [m.start() for m in heading.finditer(text)]
    if not starts:
        return [text]
    bounds = [0, *starts[1:], len(text)] if starts[0] < 200 else [0, *starts, len(text)]
    sections: list[str] = []
    pending = ""
    for a, b in zip(bounds, bounds[1:]):
        # Headings can match captions and tables of contents too: a "section" that is little
        # more than its heading joins the next one instead of becoming a document of its own.
        pending += text[a:b]
        if len(pending.encode()) >= min_bytes:
            sections.append(pending)
            pending = ""
    if pending.strip():
        if sections:
            sections[-1] += pending
        else:
            sections.append(pending)
    return sections


# ---------------------------------------------------------------- prose

_AUSTEN_CHAPTER = re.compile(r"^(?:CHAPTER|Chapter)\s+[0-9IVXLC]+\b.*$", re.M)


def austen(pkgs: Mapping[str, Package]) -> Docs:
    db = pkgs["r-cran-janeaustenr"].root / "usr/lib/R/site-library/janeaustenr/data/Rdata"
    for book, lines in sorted(rdata.read_lazyload_db(db).items()):
        text = normalise("\n".join(line or "" for line in lines))
        for i, chapter in enumerate(_split_on_headings(text, _AUSTEN_CHAPTER)):
            yield f"r-cran-janeaustenr:data/{book}#chapter{i:03d}", chapter


_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (?:THIS|THE) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^(?:\*\*\* ?END OF (?:THIS|THE) PROJECT GUTENBERG|End of (?:the )?Project Gutenberg).*$",
                            re.M | re.I)
_MOBY_CHAPTER = re.compile(r"^(?:CHAPTER \d+\.|Epilogue$).*$", re.M)


def strip_gutenberg(text: str) -> str:
    """The book between Project Gutenberg's START and END markers (licence text dropped)."""
    start, end = _GUTENBERG_START.search(text), _GUTENBERG_END.search(text)
    if start is None or end is None:
        raise ValueError("Project Gutenberg START/END markers not found")
    return normalise(text[start.end() : end.start()])


def melville(pkgs: Mapping[str, Package]) -> Docs:
    db = pkgs["r-cran-tokenizers"].root / "usr/lib/R/site-library/tokenizers/data/Rdata"
    book = strip_gutenberg(normalise(rdata.read_lazyload_db(db)["mobydick"][0]))
    # The table of contents repeats every chapter title: start at the body's first chapter.
    body_start = [m.start() for m in _MOBY_CHAPTER.finditer(book) if book[m.start():m.end()].startswith("CHAPTER 1.")]
    front, body = book[: body_start[-1]], book[body_start[-1]:]
    yield "r-cran-tokenizers:data/mobydick#front", front
    for i, chapter in enumerate(_split_on_headings(body, _MOBY_CHAPTER)):
        yield f"r-cran-tokenizers:data/mobydick#chapter{i:03d}", chapter


def bible(package: str, module: str) -> Extractor:
    def extract(pkgs: Mapping[str, Package]) -> Docs:
        module_dir = pkgs[package].root / "usr/share/sword/modules/texts/ztext" / module
        for i, verses in enumerate(sword.module_books(module_dir)):
            # One verse a line: verses are the natural lines of this text.
            yield f"{package}:{module}/book{i:03d}", normalise("\n".join(verses))
    return extract


def fortunes(package: str, subdir: str, lang: str = "en", fallback: tuple[str, ...] = ("cp1252",)) -> Extractor:
    def extract(pkgs: Mapping[str, Package]) -> Docs:
        root = pkgs[package].root / "usr/share/games" / subdir
        for path in _files(root, "**/*"):
            if path.suffix in (".dat", ".u8") or path.stat().st_size == 0:
                continue
            text = decode(path.read_bytes(), fallback)
            for i, entry in enumerate(re.split(r"(?m)^%\s*$", text)):
                entry = normalise(textwrap.dedent(entry)) if lang == "en" else keep_language(entry, lang)
                if len(entry) >= 20:  # skip empty separators and one-word stubs
                    yield f"{package}:{path.relative_to(root).as_posix()}#{i:05d}", entry
    return extract


_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _dictd_number(encoded: str) -> int:
    value = 0
    for char in encoded:
        value = value * 64 + _B64[char]
    return value


def dictd(package: str, name: str) -> Extractor:
    """Entries of a dictd database (.index: headword, base64 offset, base64 length)."""
    def extract(pkgs: Mapping[str, Package]) -> Docs:
        base = pkgs[package].root / "usr/share/dictd"
        data = gzip.decompress((base / f"{name}.dict.dz").read_bytes())  # dictzip is gzip-compatible
        seen = set()
        for line in (base / f"{name}.index").read_text(encoding="utf-8", errors="replace").splitlines():
            headword, offset, length = line.split("\t")[:3]
            start, size = _dictd_number(offset), _dictd_number(length)
            if headword.startswith("00-database") or start in seen:
                continue
            seen.add(start)
            text = normalise(textwrap.dedent(decode(data[start : start + size], ("latin-1",))))
            if text:
                yield f"{package}:{name}@{start:09d}", text
    return extract


# ---------------------------------------------------------------- technical and multilingual

def python_docs(pkgs: Mapping[str, Package]) -> Docs:
    root = pkgs["python3.11-doc"].root / "usr/share/doc/python3.11/html/_sources"
    # The changelog is mostly issue numbers; the rest is the reference, tutorial and HOWTOs.
    for path in _files(root, "**/*.rst.txt", exclude=("whatsnew/changelog",)):
        yield f"python3.11-doc:{path.relative_to(root).as_posix()}", decode(path.read_bytes())


_REFERENCE_SECTION = re.compile(r"^\d+\.\d+\.(?:\d+\.)?\s+\S.*$", re.M)


def debian_reference(lang: str) -> Extractor:
    package = f"debian-reference-{lang}"
    language = lang.split("-")[0]

    def extract(pkgs: Mapping[str, Package]) -> Docs:
        path = pkgs[package].root / f"usr/share/debian-reference/debian-reference.{lang}.txt.gz"
        text = decode(gzip.decompress(path.read_bytes()))
        for i, section in enumerate(_split_on_headings(text, _REFERENCE_SECTION)):
            lines = section.split("\n")
            # The body is indented by the text renderer; the heading line is not.
            section = normalise(lines[0] + "\n" + textwrap.dedent("\n".join(lines[1:])))
            if language != "en":
                section = keep_language(section, language)
            if section:
                yield f"{package}:debian-reference.{lang}.txt#section{i:04d}", section
    return extract


def gnome_help(directory: str, lang: str) -> Extractor:
    """Paragraphs of the GNOME desktop help that are actually translated into `lang`.

    Most of gnome-user-docs' translations leave many paragraphs in English (measured: 1% of
    the Hindi pages' letters are Devanagari); only paragraphs in the language's script are kept.
    """
    def extract(pkgs: Mapping[str, Package]) -> Docs:
        root = pkgs["gnome-user-docs"].root / "usr/share/help" / directory / "gnome-help"
        for path in _files(root, "*.page"):
            paragraphs: list[str] = []

            def walk(element: ET.Element) -> None:
                tag = element.tag.rsplit("}", 1)[-1]
                if tag == "info":  # credits, licence and revision metadata repeated on every page
                    return
                if tag in ("title", "p"):
                    paragraph = " ".join("".join(element.itertext()).split())
                    if paragraph and is_language(paragraph, lang):
                        paragraphs.append(paragraph)
                    return
                for child in element:
                    walk(child)

            walk(ET.parse(path).getroot())
            text = normalise("\n\n".join(paragraphs))
            if len(text.encode()) >= 200:
                yield f"gnome-user-docs:{directory}/gnome-help/{path.name}", text
    return extract


# ---------------------------------------------------------------- code, math, structured

def files(package: str, subdir: str, pattern: str, exclude: tuple[str, ...] = (),
          fallback: tuple[str, ...] = ()) -> Extractor:
    """Each matching file is a document. Files that are not valid text in the given encodings
    (test fixtures in odd encodings, binary data) are skipped, not decoded into garbage."""
    def extract(pkgs: Mapping[str, Package]) -> Docs:
        root = pkgs[package].root / subdir
        for path in _files(root, pattern, exclude):
            try:
                text = decode(path.read_bytes(), fallback)
            except UnicodeDecodeError:
                continue
            if text:
                yield f"{package}:{subdir}/{path.relative_to(root).as_posix()}", text
    return extract


def stdlib_python(pkgs: Mapping[str, Package]) -> Docs:
    root = Path(sysconfig.get_paths()["stdlib"])
    exclude = ("site-packages", "dist-packages", "/test/", "/tests/", "idle_test", "__pycache__")
    for path in _files(root, "**/*.py", exclude):
        try:
            text = decode(path.read_bytes())
        except UnicodeDecodeError:
            continue
        yield f"python-stdlib:{path.relative_to(root).as_posix()}", text


def stdlib_topics(pkgs: Mapping[str, Package]) -> Docs:
    """pydoc's help topics: the Python language reference as plain text, shipped in the stdlib."""
    path = Path(sysconfig.get_paths()["stdlib"]) / "pydoc_data" / "topics.py"
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "topics":
            for name, text in sorted(ast.literal_eval(node.value).items()):
                yield f"python-stdlib:pydoc_data/topics.py#{name}", normalise(text)


def pycountry_names(requirement: str, langs: tuple[str, ...]) -> Extractor:
    """Country names translated into each language (gettext catalogues in the pycountry wheel)."""
    def extract(pkgs: Mapping[str, Package]) -> Docs:
        root = pkgs[f"pip:{requirement}"].root / "pycountry/locales"
        for lang in langs:
            for domain in ("iso3166-1", "iso639-3", "iso4217", "iso15924"):
                path = root / lang / "LC_MESSAGES" / f"{domain}.mo"
                if not path.exists():
                    continue
                with path.open("rb") as handle:
                    catalogue = gettext.GNUTranslations(handle)._catalog  # noqa: SLF001 - the only reader
                lines = [f"{k}: {v}" for k, v in sorted(catalogue.items()) if k and isinstance(k, str) and v != k]
                if lines:
                    yield f"pip:{requirement}:locales/{lang}/{domain}.mo", normalise("\n".join(lines))
    return extract
