"""The recipes: which sources each builds and how much of each it keeps.

`full` is the default training corpus (~50 MB of text); `small` takes a few of the same sources
with small caps (a few MB, for tests); `pip` is the fallback for machines without apt: only the
running Python's standard library and pinned PyPI wheels.
"""
from __future__ import annotations

from blt_dist.corpus import sources as s
from blt_dist.corpus.sources import Source

KB, MB = 1024, 1024 * 1024
PD, GPL2, GPL3 = "public domain", "GPL-2+", "GPL-3+"

APT_SOURCES: tuple[Source, ...] = (
    # prose: novels, Bibles, quotations, a satirical dictionary
    Source("austen", "prose", ("r-cran-janeaustenr",), "MIT (package); novels public domain", s.austen,
           cap_full=3 * MB, cap_small=400 * KB),
    Source("moby-dick", "prose", ("r-cran-tokenizers",), "MIT (package); novel public domain", s.melville,
           cap_full=2 * MB),
    Source("bible-web", "prose", ("sword-text-web",), PD, s.bible("sword-text-web", "engWEB2015eb"),
           cap_full=2 * MB),
    Source("bible-kjv", "prose", ("sword-text-kjv",), PD, s.bible("sword-text-kjv", "engKJV2006eb"),
           cap_full=1500 * KB),
    Source("fortunes-en", "prose", ("fortunes",), "BSD-4-clause (fortune-mod)", s.fortunes("fortunes", "fortunes"),
           cap_full=3 * MB, cap_small=250 * KB),
    Source("devils-dictionary", "prose", ("dict-devil",), PD, s.dictd("dict-devil", "devil"),
           cap_full=2 * MB, cap_small=100 * KB),
    # technical English
    Source("python-docs", "technical", ("python3.11-doc",), "PSF-2.0", s.python_docs,
           cap_full=4 * MB, cap_small=300 * KB),
    Source("debian-reference-en", "technical", ("debian-reference-en",), GPL2, s.debian_reference("en"),
           cap_full=2 * MB, cap_small=200 * KB),
    Source("jargon", "technical", ("dict-jargon",), PD, s.dictd("dict-jargon", "jargon"),
           cap_full=3 * MB, cap_small=100 * KB),
    Source("foldoc", "technical", ("dict-foldoc",), "GFDL-1.1+", s.dictd("dict-foldoc", "foldoc"),
           cap_full=3 * MB),
    # multilingual: Latin with diacritics, Cyrillic, Greek, CJK, Arabic script, Devanagari
    *(Source(f"debian-reference-{lang}", "multilingual", (f"debian-reference-{lang}",), GPL2,
             s.debian_reference(lang), cap_full=1500 * KB, cap_small=cap_small, languages=(lang.split("-")[0],))
      for lang, cap_small in (("de", None), ("fr", None), ("es", None), ("it", None), ("pt", None),
                              ("ja", 150 * KB), ("zh-cn", None))),
    Source("fortunes-de", "multilingual", ("fortunes-de",), GPL2, s.fortunes("fortunes-de", "fortunes", "de"),
           cap_full=800 * KB, cap_small=100 * KB, languages=("de",)),
    Source("fortunes-ru", "multilingual", ("fortunes-ru",), "public domain / various",
           s.fortunes("fortunes-ru", "fortunes", "ru", ("koi8-r",)),
           cap_full=800 * KB, cap_small=100 * KB, languages=("ru",)),
    Source("fortunes-es", "multilingual", ("fortunes-es",), GPL2, s.fortunes("fortunes-es", "fortunes", "es"),
           cap_full=1 * MB, languages=("es",)),
    Source("fortunes-it", "multilingual", ("fortunes-it",), GPL2, s.fortunes("fortunes-it", "fortunes", "it"),
           cap_full=1 * MB, languages=("it",)),
    Source("fortunes-pl", "multilingual", ("fortunes-pl",), "GPL-2+ / various",
           s.fortunes("fortunes-pl", "fortunes", "pl", ("iso-8859-2",)), cap_full=1 * MB, languages=("pl",)),
    Source("fortunes-cs", "multilingual", ("fortunes-cs",), GPL2,
           s.fortunes("fortunes-cs", "fortunes", "cs", ("iso-8859-2",)), cap_full=1 * MB, languages=("cs",)),
    Source("bible-es-rv1909", "multilingual", ("sword-text-sparv",), PD, s.bible("sword-text-sparv", "spaRV1909eb"),
           cap_full=1 * MB, languages=("es",)),
    *(Source(f"gnome-help-{lang}", "multilingual", ("gnome-user-docs",), "CC-BY-SA-3.0", s.gnome_help(directory, lang),
             cap_full=1 * MB, languages=(lang,), notes="only paragraphs written in the language's script")
      for directory, lang in (("fa", "fa"), ("mr", "mr"), ("el", "el"), ("uk", "uk"),
                              ("ru", "ru"), ("zh_CN", "zh"))),
    # code: seven languages
    Source("python", "code", ("libpython3.11-stdlib",), "PSF-2.0",
           s.files("libpython3.11-stdlib", "usr/lib/python3.11", "**/*.py", exclude=("/test/", "/tests/")),
           cap_full=2 * MB, cap_small=300 * KB, code_language="Python"),
    Source("go", "code", ("golang-1.19-src",), "BSD-3-clause",
           s.files("golang-1.19-src", "usr/share/go-1.19/src", "**/*.go", exclude=("testdata",)),
           cap_full=2 * MB, code_language="Go"),
    Source("c", "code", ("libc6-dev",), "LGPL-2.1+",
           s.files("libc6-dev", "usr/include", "**/*.h"), cap_full=1500 * KB, code_language="C"),
    Source("perl", "code", ("perl-modules-5.36",), "GPL-1+ or Artistic",
           s.files("perl-modules-5.36", "usr/share/perl/5.36.0", "**/*.pm", exclude=("unicore",), fallback=("latin-1",)),
           cap_full=1500 * KB, code_language="Perl"),
    Source("ruby", "code", ("libruby3.1",), "Ruby or BSD-2-clause",
           s.files("libruby3.1", "usr/lib/ruby/3.1.0", "**/*.rb"), cap_full=1500 * KB, code_language="Ruby"),
    Source("javascript", "code", ("node-lodash",), "MIT",
           s.files("node-lodash", "usr/share/nodejs/lodash", "**/*.js", exclude=(".min.js", "/fp/")),
           cap_full=1 * MB, cap_small=100 * KB, code_language="JavaScript"),
    Source("shell", "code", ("bash-completion",), GPL2,
           s.files("bash-completion", "usr/share/bash-completion", "**/*"), cap_full=1 * MB, cap_small=100 * KB,
           code_language="Shell (bash)"),
    # math
    Source("pari-doc", "math", ("pari-doc",), GPL2, s.files("pari-doc", "usr/share/pari/doc", "*.tex",
                                                            fallback=("latin-1",)),
           cap_full=3 * MB, cap_small=300 * KB),
    # structured
    Source("iso-codes", "structured", ("iso-codes",), "LGPL-2.1+",
           s.files("iso-codes", "usr/share/iso-codes/json", "*.json"), cap_full=2 * MB, cap_small=300 * KB),
    Source("unicode-data", "structured", ("unicode-data",), "Unicode-DFS-2016",
           s.files("unicode-data", "usr/share/unicode", "**/*.txt"), cap_full=2 * MB),
    Source("cldr", "structured", ("unicode-cldr-core",), "Unicode-DFS-2016",
           s.files("unicode-cldr-core", "usr/share/unicode/cldr/common", "main/*.xml"), cap_full=2 * MB),
)

PYCOUNTRY = "pycountry==26.2.16"
PYBIND11 = "pybind11==3.1.0"
PIP_LANGUAGES = ("de", "fr", "es", "pl", "ru", "uk", "el", "ja", "zh_CN", "ar", "fa", "hi")

PIP_SOURCES: tuple[Source, ...] = (
    Source("python-topics", "technical", ("stdlib",), "PSF-2.0", s.stdlib_topics, cap_full=2 * MB),
    Source("python", "code", ("stdlib",), "PSF-2.0", s.stdlib_python, cap_full=4 * MB, code_language="Python"),
    Source("cpp", "code", (f"pip:{PYBIND11}",), "BSD-3-clause",
           s.files(f"pip:{PYBIND11}", "pybind11/include", "**/*.h"), cap_full=1 * MB, code_language="C++"),
    Source("iso-codes", "structured", (f"pip:{PYCOUNTRY}",), "LGPL-2.1+",
           s.files(f"pip:{PYCOUNTRY}", "pycountry/databases", "*.json"), cap_full=2 * MB),
    Source("country-names", "multilingual", (f"pip:{PYCOUNTRY}",), "LGPL-2.1+",
           s.pycountry_names(PYCOUNTRY, PIP_LANGUAGES), cap_full=3 * MB,
           languages=tuple(lang.split("_")[0] for lang in PIP_LANGUAGES),
           notes="translated names (countries, languages, currencies, scripts), not running text"),
)

RECIPES = ("full", "small", "pip")

# Held-out bytes per content type: at least this much, and at least this share of the type.
HELDOUT_MIN_BYTES = {"full": 256 * KB, "small": 32 * KB, "pip": 64 * KB}
HELDOUT_SHARE = 0.05


def recipe_sources(recipe: str) -> list[tuple[Source, int]]:
    """(source, byte cap) for each source of a recipe, sorted by content type then name."""
    if recipe == "pip":
        chosen = [(src, src.cap_full) for src in PIP_SOURCES]
    elif recipe == "small":
        chosen = [(src, src.cap_small) for src in APT_SOURCES if src.cap_small]
    else:
        chosen = [(src, src.cap_full) for src in APT_SOURCES]
    return sorted(chosen, key=lambda pair: (pair[0].content_type, pair[0].name))
