"""Read character data out of R's lazy-load databases (`data/Rdata.rdb` + `.rdx`) without R.

R packages such as r-cran-janeaustenr ship their data sets as a lazy-load database: the `.rdx`
index is one compressed serialized R list naming each object's (offset, length) in the `.rdb`,
and each `.rdb` entry is a compressed serialized R object. Only the parts of R's XDR
serialization format (R Internals, "Serialization formats") that data sets use are decoded here:
vectors, strings, pairlists with attributes, symbols, references and ALTREP wrappers.
Closures and byte code are rejected with a clear error rather than guessed at.
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from pathlib import Path

# SEXP type codes (R's Rinternals.h) and the special pseudo-types used only in serialization.
_NILSXP, _SYMSXP, _LISTSXP, _CLOSXP, _ENVSXP, _PROMSXP, _LANGSXP = 0, 1, 2, 3, 4, 5, 6
_CHARSXP, _LGLSXP, _INTSXP, _REALSXP, _CPLXSXP, _STRSXP, _DOTSXP = 9, 10, 13, 14, 15, 16, 17
_VECSXP, _EXPRSXP, _RAWSXP, _S4SXP = 19, 20, 24, 25
_ALTREP_SXP, _ATTRLISTSXP, _ATTRLANGSXP = 238, 239, 240
_SINGLETONS = {254, 253, 252, 251, 250, 242, 241}  # NILVALUE, GLOBALENV, UNBOUND, MISSINGARG, BASENAMESPACE, EMPTYENV, BASEENV
_REFSXP, _PERSISTSXP, _PACKAGESXP, _NAMESPACESXP = 255, 247, 248, 249

_LATIN1_MASK = 1 << 2  # CHARSXP encoding flags, in the "levels" bits of the item header
_ASCII_MASK = 1 << 6


class RDataError(ValueError):
    """The file is not an R serialization this reader understands."""


class RVector(list):
    """An R vector: its elements, plus R attributes (names, class, ...) as a dict."""

    def __init__(self, items=(), attrs: dict | None = None):
        super().__init__(items)
        self.attrs = attrs or {}


class _Reader:
    def __init__(self, data: bytes):
        if data[:2] != b"X\n":
            raise RDataError(f"not an XDR R serialization (starts {data[:2]!r})")
        self.data, self.pos, self.refs = data, 2, []
        version = self.int()
        self.int(), self.int()  # writer R version, minimal reader version
        if version == 3:
            self.pos += 4 + self.int() - 4  # native encoding name; R >= 3.5 writes UTF-8 here
            self.pos += 4
        elif version != 2:
            raise RDataError(f"unsupported R serialization version {version}")

    def int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two 32-bit halves
            upper, lower = self.int(), self.int()
            n = (upper << 32) + (lower & 0xFFFFFFFF)
        return n

    def item(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, bool(flags & (1 << 9)), bool(flags & (1 << 10))
        levels = flags >> 12
        if kind in _SINGLETONS:
            return None
        if kind == _REFSXP:
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if kind == _PERSISTSXP:
            value = self._string_vector()
            self.refs.append(value)
            return value
        if kind in (_PACKAGESXP, _NAMESPACESXP):
            value = ("namespace", self._string_vector())
            self.refs.append(value)
            return value
        if kind == _SYMSXP:
            name = self.item()
            self.refs.append(("symbol", name))
            return ("symbol", name)
        if kind == _ENVSXP:
            self.int()  # locked
            env: dict = {}
            self.refs.append(env)
            env["enclos"], env["frame"], env["hashtab"], env["attrs"] = self.item(), self.item(), self.item(), self.item()
            return env
        if kind in (_LISTSXP, _LANGSXP, _CLOSXP, _PROMSXP, _DOTSXP, _ATTRLISTSXP, _ATTRLANGSXP):
            return self._pairlist(flags)
        if kind == _CHARSXP:
            n = self.int()
            if n == -1:
                return None  # NA_character_
            raw = self.data[self.pos : self.pos + n]
            self.pos += n
            encoding = "latin-1" if levels & _LATIN1_MASK else "utf-8"
            return raw.decode(encoding, errors="strict" if not levels & _ASCII_MASK else "replace")
        if kind == _ALTREP_SXP:
            info, state, attrs = self.item(), self.item(), self.item()
            return self._altrep(info, state, attrs)
        if kind in (_LGLSXP, _INTSXP):
            n = self.length()
            value = RVector(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
        elif kind == _REALSXP:
            n = self.length()
            value = RVector(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        elif kind == _CPLXSXP:
            n = self.length()
            pairs = struct.unpack_from(f">{2 * n}d", self.data, self.pos)
            value = RVector(complex(pairs[i], pairs[i + 1]) for i in range(0, 2 * n, 2))
            self.pos += 16 * n
        elif kind == _STRSXP:
            value = RVector(self.item() for _ in range(self.length()))
        elif kind in (_VECSXP, _EXPRSXP):
            value = RVector(self.item() for _ in range(self.length()))
        elif kind == _RAWSXP:
            n = self.length()
            value = RVector([self.data[self.pos : self.pos + n]])
            self.pos += n
        elif kind == _S4SXP:
            value = RVector()
        else:
            raise RDataError(f"R object type {kind} is not supported (only data, not code, can be read)")
        if has_attr:
            value.attrs = self._attributes(self.item())
        del has_tag
        return value

    def _pairlist(self, flags: int) -> RVector:
        """A pairlist (CONS cells chained through CDR), read iteratively: lists can be long."""
        cells: list = []
        tags: list = []
        attrs = None
        while True:
            kind = flags & 0xFF
            if kind in _SINGLETONS:
                break
            if kind not in (_LISTSXP, _LANGSXP, _CLOSXP, _PROMSXP, _DOTSXP, _ATTRLISTSXP, _ATTRLANGSXP):
                raise RDataError(f"pairlist ends in an unexpected object of type {kind}")
            if flags & (1 << 9):
                cell_attrs = self._attributes(self.item())
                attrs = attrs or cell_attrs
            tag = self.item() if flags & (1 << 10) else None
            tags.append(tag[1] if isinstance(tag, tuple) and tag and tag[0] == "symbol" else None)
            cells.append(self.item())
            flags = self.int()
        value = RVector(cells, attrs)
        value.attrs.setdefault("tags", tags)
        return value

    def _attributes(self, pairlist) -> dict:
        if not isinstance(pairlist, RVector):
            return {}
        return {tag: item for tag, item in zip(pairlist.attrs.get("tags", []), pairlist)}

    def _altrep(self, info, state, attrs):
        """ALTREP objects serialize their class and a state; rebuild the plain vector."""
        class_name = info[0][1] if isinstance(info, RVector) and info and isinstance(info[0], tuple) else None
        if class_name == "compact_intseq" or class_name == "compact_realseq":
            n, start, step = int(state[0]), state[1], state[2]
            value = RVector(start + i * step for i in range(n))
        elif class_name in ("wrap_integer", "wrap_real", "wrap_string", "wrap_logical", "wrap_list"):
            value = RVector(state[0])
        elif class_name == "deferred_string":
            value = RVector(str(x) for x in state[0])
        else:
            raise RDataError(f"ALTREP class {class_name!r} is not supported")
        value.attrs = self._attributes(attrs)
        return value

    def _string_vector(self) -> list:
        if self.int() != 0:
            raise RDataError("malformed persistent string vector")
        return [self.item() for _ in range(self.int())]


def unserialize(data: bytes):
    """Decode one XDR-serialized R object (after decompression)."""
    return _Reader(data).item()


def _decompress(blob: bytes) -> bytes:
    """A lazy-load record: 4-byte big-endian raw length, then (zlib | type byte + bzip2/xz/none)."""
    expected = struct.unpack(">I", blob[:4])[0]
    marker = blob[4:5]
    if marker == b"2":
        data = bz2.decompress(blob[5:])
    elif marker == b"X":
        data = lzma.decompress(blob[5:])
    elif marker == b"0":
        data = blob[5:]
    else:
        data = zlib.decompress(blob[4:])
    if len(data) != expected:
        raise RDataError(f"record decompressed to {len(data)} bytes, header says {expected}")
    return data


def read_lazyload_db(base: Path) -> dict[str, object]:
    """All objects of a lazy-load database, `base` being the path without `.rdb`/`.rdx`."""
    base = Path(base)
    raw_index = base.with_suffix(".rdx").read_bytes()
    # data/Rdata.rdx is written by R's save() path: a gzip file, not a lazy-load record.
    index_data = gzip.decompress(raw_index) if raw_index[:2] == b"\x1f\x8b" else _decompress(raw_index)
    index = unserialize(index_data)
    fields = dict(zip(index.attrs["names"], index))
    rdb = base.with_suffix(".rdb").read_bytes()
    objects = {}
    for name, (offset, size) in zip(fields["variables"].attrs["names"], fields["variables"]):
        objects[name] = unserialize(_decompress(rdb[int(offset) : int(offset) + int(size)]))
    return objects
