"""What the web page lists besides search results: the collection in a chosen order, and the
metadata keys it can filter and sort on, each with its kind (text, number or date).

Pure functions over catalog records; :class:`~lookalike.server.service.SearchService` calls
them under its lock and caches their answers per catalog state.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from lookalike.catalog import ImageRecord
from lookalike.core.filters import make_filter, parse_sort, sort_items

# Orders that are not metadata keys: the file's path and its modification time.
BUILTIN_SORTS = ("path", "mtime")

# A text key with at most this many distinct values lists them, for a picker.
MAX_LISTED_VALUES = 30

_ISO_DATE = re.compile(
    r"\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?)?"
)


def date_value(value: Any) -> float | None:
    """An ISO 8601 date or date-time as seconds since the epoch (a time without a UTC offset
    is taken as UTC, a date alone as that day's start), else None."""
    if not isinstance(value, str) or not _ISO_DATE.fullmatch(value.strip()):
        return None
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def number_value(value: Any) -> float | None:
    """A finite number (or a text that is one), else None; booleans are not numbers."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def value_kind(value: Any) -> str:
    """``number``, ``date`` or ``text``: how a metadata value compares."""
    if number_value(value) is not None:
        return "number"
    if date_value(value) is not None:
        return "date"
    return "text"


def metadata_keys(records: Iterable[ImageRecord]) -> list[dict[str, Any]]:
    """Every metadata key of ``records``, sorted: its kind (the kind of all its values, text
    when they differ), how many images have it, the smallest and largest value for numbers
    and dates, and the values themselves for a text key that has few."""
    seen: dict[str, _KeySummary] = {}
    for record in records:
        for key, value in record.metadata.items():
            if value is not None and not isinstance(value, dict | list):
                seen.setdefault(key, _KeySummary()).add(value)
    return [seen[key].summary(key) for key in sorted(seen)]


class _KeySummary:
    """What one metadata key holds, gathered value by value."""

    def __init__(self) -> None:
        self.kinds: set[str] = set()
        self.count = 0
        self.values: set[str] = set()
        self.low: tuple[float, Any] | None = None
        self.high: tuple[float, Any] | None = None

    def add(self, value: Any) -> None:
        kind = value_kind(value)
        self.kinds.add(kind)
        self.count += 1
        if len(self.values) <= MAX_LISTED_VALUES:
            self.values.add(str(value))
        position = number_value(value) if kind == "number" else date_value(value)
        if position is not None:
            if self.low is None or position < self.low[0]:
                self.low = (position, value)
            if self.high is None or position > self.high[0]:
                self.high = (position, value)

    def summary(self, key: str) -> dict[str, Any]:
        kind = next(iter(self.kinds)) if len(self.kinds) == 1 else "text"
        summary: dict[str, Any] = {"key": key, "kind": kind, "count": self.count}
        if kind == "text" and len(self.values) <= MAX_LISTED_VALUES:
            summary["values"] = sorted(self.values)
        elif kind != "text" and self.low is not None and self.high is not None:
            summary["min"], summary["max"] = self.low[1], self.high[1]
        return summary


def ordered_ids(
    records: Sequence[ImageRecord],
    *,
    where: Sequence[str] = (),
    near: str | None = None,
    within: str | None = None,
    sort: str = "",
) -> list[int]:
    """The ids of ``records`` that pass the filters (``where``, ``near``, ``within``, as POST
    /search takes them: :func:`lookalike.core.filters.make_filter`), in the order ``sort``
    names: ``path`` (the default), ``mtime``, or a metadata key ordered as search results
    are (:func:`lookalike.core.filters.sort_items`: images without it last); a leading
    ``-`` sorts descending."""
    found = make_filter(list(where), near=near, within=within)
    kept = [r for r in records if found.matches(r)]
    by_path = sorted(kept, key=lambda r: (os.path.dirname(r.path), os.path.basename(r.path)))
    spec = (sort or "").strip()
    descending = spec.startswith("-")
    builtin = spec.removeprefix("-").strip()
    if builtin in ("", "path", "score"):  # browsing has no query to score against
        ordered = list(reversed(by_path)) if descending else by_path
    elif builtin == "mtime":
        ordered = sorted(by_path, key=lambda r: r.mtime, reverse=descending)
    else:
        ordered = sort_items(by_path, parse_sort(spec))
    return [int(r.id or 0) for r in ordered]
