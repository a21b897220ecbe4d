"""Paths as the catalog stores them: any Python ``str``, losslessly, as valid UTF-8 text.

A file name that is not valid UTF-8 reaches Python with surrogate escapes (``os.fsdecode``
turns byte 0xE9 into U+DCE9), which neither SQLite nor PostgreSQL can store as text. At the
catalog's boundary every path goes through :func:`to_catalog` on the way in and
:func:`from_catalog` on the way out, a per-character mapping:

* a surrogate U+D800..U+DFFF becomes a private-use character U+F0000 + ((code - 0xDC00) mod
  0x800), so the escaped byte ``b`` (U+DC00 + b) becomes U+F0000 + b;
* NUL (which PostgreSQL text cannot hold) becomes U+F0800;
* a real character of the block used here, U+F0000..U+F08FF, is kept after the marker U+F08FF.

Every character maps to the same text wherever it stands and the result is a prefix code, so
``from_catalog(to_catalog(p)) == p`` for every ``str`` and ``to_catalog(prefix)`` is a prefix
of ``to_catalog(path)`` exactly when ``prefix`` is a prefix of ``path``: prefix queries keep
working. Paths without these characters (all ordinary ones) are stored unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TypeVar

_K = TypeVar("_K")

_BASE = 0xF0000  # surrogates map to U+F0000..U+F07FF
_NUL = chr(0xF0800)
_MARKER = chr(0xF08FF)  # before a real character of U+F0000..U+F08FF

# What to_catalog changes: surrogates, NUL and the block this module uses.
_SPECIAL = re.compile("[\x00\ud800-\udfff\U000f0000-\U000f08ff]")
# What from_catalog changes: an escaped character (marker and what it keeps) or a mapped one.
_MAPPED = re.compile("\U000f08ff(.)|[\U000f0000-\U000f08fe]", re.DOTALL)


def _encode(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    if code == 0:
        return _NUL
    if code < 0xE000:  # a surrogate
        return chr(_BASE + ((code - 0xDC00) & 0x7FF))
    return _MARKER + char


def _decode(match: re.Match[str]) -> str:
    kept = match.group(1)
    if kept is not None:
        return kept
    char = match.group()
    if char == _NUL:
        return "\x00"
    if ord(char) < 0xF0800:
        return chr(0xD800 + ((ord(char) - _BASE + 0x400) & 0x7FF))
    return char  # not produced by to_catalog: kept as it is


def to_catalog(path: str) -> str:
    """``path`` as valid UTF-8 text for the catalog (see the module documentation)."""
    if path.isascii() and "\x00" not in path:
        return path
    return _SPECIAL.sub(_encode, path)


def from_catalog(text: str) -> str:
    """The path that :func:`to_catalog` turned into ``text``."""
    if text.isascii():
        return text
    return _MAPPED.sub(_decode, text)


def needs_mapping(path: str) -> bool:
    """Whether ``to_catalog(path)`` differs from ``path``."""
    return _SPECIAL.search(path) is not None


def remapped(rows: Iterable[tuple[_K, str]]) -> list[tuple[str, _K]]:
    """(text, key) for each stored (key, path) that :func:`to_catalog` changes, longest path
    first: a catalog written before paths were mapped is brought up to date by updating them
    in this order, which never collides with a path not yet updated (a mapped path is longer
    than its original, and every path it could equal is updated before it)."""
    changed = [(to_catalog(path), key) for key, path in rows if needs_mapping(path)]
    return sorted(changed, key=lambda item: -len(item[0]))
