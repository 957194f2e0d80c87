"""Text hygiene shared by every source: decoding, line endings, splitting, language checks."""
from __future__ import annotations

import functools
import re
import unicodedata

MAX_DOC_BYTES = 64 * 1024  # documents above this are split at paragraph, then line, boundaries

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_BLANK_LINES = re.compile(r"\n{3,}")


def decode(raw: bytes, fallbacks: tuple[str, ...] = ()) -> str:
    """Bytes -> clean text: UTF-8 first, then the source's known legacy encodings, in order.

    A file that is neither raises UnicodeDecodeError: a source must name its encoding rather
    than have mojibake slip into the corpus.
    """
    for encoding in ("utf-8", *fallbacks):
        try:
            text = raw.decode(encoding)
            break
        except UnicodeDecodeError:
            if encoding == (fallbacks[-1] if fallbacks else "utf-8"):
                raise
    return normalise(text)


def normalise(text: str) -> str:
    """\\n line endings, no BOM, no control characters (tabs and newlines stay), no trailing blanks."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", text).strip("\n") + "\n" if text.strip() else ""


def split_large(text: str, max_bytes: int = MAX_DOC_BYTES) -> list[str]:
    """Split a document into parts of at most `max_bytes` UTF-8 bytes at the coarsest boundary.

    Paragraphs (blank-line separated) are packed greedily; a paragraph that alone is too big
    is packed line by line; a single line that is too big is cut by characters.
    """
    if len(text.encode()) <= max_bytes:
        return [text]
    max_bytes -= 1  # normalise() ends every part with a newline
    units: list[str] = []
    for paragraph in text.split("\n\n"):
        if len(paragraph.encode()) + 2 <= max_bytes:
            units.append(paragraph + "\n\n")
            continue
        for line in paragraph.split("\n"):
            while len(line.encode()) + 1 > max_bytes:
                cut = max_bytes // 4  # characters: at most 4 bytes each, so this always fits
                units.append(line[:cut])
                line = line[cut:]
            units.append(line + "\n")
        units.append("\n")
    parts, current, size = [], [], 0
    for unit in units:
        n = len(unit.encode())
        if current and size + n > max_bytes:
            parts.append("".join(current))
            current, size = [], 0
        current.append(unit)
        size += n
    parts.append("".join(current))
    return [normalise(p) for p in parts if p.strip()]


@functools.lru_cache(maxsize=65536)
def script_of(char: str) -> str:
    """The Unicode script family of a letter, from its character name (LATIN, CYRILLIC, CJK, ...)."""
    name = unicodedata.name(char, "")
    if not name:
        return "UNKNOWN"
    first = name.split()[0]
    if first in ("HIRAGANA", "KATAKANA", "CJK", "HANGUL", "IDEOGRAPHIC"):
        return "CJK"
    return first


def script_share(text: str, scripts: frozenset[str]) -> float:
    """Fraction of the letters in `text` that belong to `scripts` (0 when there are no letters)."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return 0.0
    return sum(script_of(c) in scripts for c in letters) / len(letters)


# Short function-word lists: enough to tell a paragraph in the language from an untranslated
# English one (translated manuals often leave whole sections in English).
STOPWORDS = {
    "en": "the and of to is in that it for with as are this be on by not or from you",
    "de": "der die das und ist nicht mit sich auf für ein eine den dem des zu von auch werden",
    "fr": "le la les et est des une pour que dans qui pas sur par sont avec vous être",
    "es": "el la los las de que y en es por para con una del se al lo como más",
    "it": "il la di che e è per una sono con non del della le gli si anche come",
    "pt": "o a os as de que e é para com uma do da em não se por mais",
    "pl": "nie i w się na że to jest z do jak co ale tak po od",
    "cs": "a je se na že v to s z do jak ale by o jsou není",
}
_STOPWORD_SETS = {lang: frozenset(words.split()) for lang, words in STOPWORDS.items()}
_WORD = re.compile(r"\w+")

# Languages written in a non-Latin script: a paragraph counts as the language when most of its
# letters are in that script.
SCRIPTS = {
    "ru": frozenset({"CYRILLIC"}), "uk": frozenset({"CYRILLIC"}), "el": frozenset({"GREEK"}),
    "ja": frozenset({"CJK"}), "zh": frozenset({"CJK"}), "fa": frozenset({"ARABIC"}),
    "ar": frozenset({"ARABIC"}), "hi": frozenset({"DEVANAGARI"}), "mr": frozenset({"DEVANAGARI"}),
}
SCRIPT_NAMES = {"de": "Latin", "fr": "Latin", "es": "Latin", "it": "Latin", "pt": "Latin", "pl": "Latin",
                "cs": "Latin", "ru": "Cyrillic", "uk": "Cyrillic", "el": "Greek", "ja": "CJK (kana + kanji)",
                "zh": "CJK (hanzi)", "fa": "Arabic", "ar": "Arabic", "hi": "Devanagari", "mr": "Devanagari"}


def is_language(paragraph: str, lang: str, min_script_share: float = 0.5) -> bool:
    """Whether a paragraph is written in `lang` (not English left untranslated, not a code listing)."""
    if lang in SCRIPTS:
        return script_share(paragraph, SCRIPTS[lang]) >= min_script_share
    words = [w.lower() for w in _WORD.findall(paragraph)]
    own = sum(w in _STOPWORD_SETS[lang] for w in words)
    english = sum(w in _STOPWORD_SETS["en"] for w in words)
    return own >= 2 and own > english


def keep_language(text: str, lang: str) -> str:
    """The paragraphs of `text` that are in `lang`, in order."""
    kept = [p for p in text.split("\n\n") if p.strip() and is_language(p, lang)]
    return normalise("\n\n".join(kept))
