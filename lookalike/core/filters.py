"""Metadata filters and sort keys: which results a search keeps, and in what order it shows them.

A condition is ``KEY OP VALUE`` with OP one of ``=``, ``!=``, ``>=``, ``<=``, ``>``, ``<``
and ``~=`` (case-insensitive substring). Values compare by kind, decided per image:

- numbers numerically when both sides are numbers (``iso>=400``, ``lat<0``);
- dates as dates when both sides are dates: a bound may be partial (``2024``, ``2024-05``,
  ``2024-05-01``, ``2024-05-01T10:30``) and stands for that whole span, so ``>=`` and ``<``
  compare with its start (``taken>=2024-01-01`` is from that day's start), ``<=`` and ``>``
  with its end (``taken<=2024-06-30`` includes the 30th), ``=`` means within it and ``!=``
  outside it. Photos are compared by the wall-clock time they were taken, their offset aside;
  a bound with an offset (``2024-05-01T10:00+02:00``, ``...Z``) compares instants, taking
  a time without an offset to be in the bound's;
- anything else as text (``=`` and ``!=`` exactly, the others in code-point order).

An image without the key never matches a condition, ``!=`` included. ``width`` and
``height`` fall back to the pixel size the catalog stores. Every condition must hold.

GPS: :class:`Near` keeps images whose ``lat``/``lon`` lie within a radius (great-circle
distance), :class:`Within` those inside a box (west > east crosses the antimeridian).

Sorting (:class:`SortKey`): the results that pass are the top ``k`` by score; a sort key then
orders those ``k`` by a metadata value (``taken``, or ``-taken`` for newest first), ties and
images without the value keeping their score order, images without it last.
"""

from __future__ import annotations

import calendar
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeVar

from lookalike.errors import RequestError

__all__ = [
    "OPERATORS",
    "Condition",
    "Filter",
    "Near",
    "SortKey",
    "Where",
    "make_filter",
    "matches",
    "parse_condition",
    "parse_near",
    "parse_sort",
    "parse_where",
    "parse_within",
    "sort_items",
]

# Two-character operators first, so that ">=" is not read as ">".
OPERATORS = ("!=", ">=", "<=", "~=", "=", ">", "<")

# The old mapping form {KEY: VALUE} (each an "=" condition), expression strings, or one string.
Where = Mapping[str, Any] | Sequence["str | Condition"] | str

_EARTH_RADIUS_KM = 6371.0088
_NUMBER = re.compile(r"[+\-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+\-]?\d+)?", re.ASCII)
# ISO 8601 as people type it (2024, 2024-05, 2024-05-01, 2024-05-01T10:30[:15[.5]][+02:00]);
# EXIF's 2024:05:01 10:30:15 as CSV files may hold it.
_DATE = re.compile(
    r"(?P<year>\d{4})(?:(?P<sep>[-:])(?P<month>\d{2})(?:(?P=sep)(?P<day>\d{2})"
    r"(?:[T ](?P<hour>\d{2}):(?P<minute>\d{2})(?::(?P<second>\d{2})(?:\.(?P<fraction>\d{1,9}))?)?"
    r"(?P<zone>Z|[+\-]\d{2}:?\d{2})?)?)?)?",
    re.IGNORECASE,
)
_SEARCH_KEY = re.compile(r"[^\s=!<>~]+")
_EPOCH = datetime(1970, 1, 1)
_MICROSECOND = timedelta(microseconds=1)
_SECOND = 1_000_000  # microseconds
_DAY = 86_400 * _SECOND

_T = TypeVar("_T", bound="HasMetadata")


class HasMetadata(Protocol):
    """What filters and sorting read: a catalog record or a search result."""

    @property
    def metadata(self) -> dict[str, Any]: ...

    @property
    def width(self) -> int: ...

    @property
    def height(self) -> int: ...


# -- values -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Span:
    """A date or time as typed: wall-clock microseconds (since 1970, as if UTC) from ``start``
    up to (not including) ``end``, and the UTC offset it gave (microseconds east), if any.
    Integers, so that no date at the ends of the calendar overflows in arithmetic."""

    start: int
    end: int
    offset: int | None


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        # float() strips other whitespace than str.strip() (a stored "\x1c5"), so it reads
        # the stripped text; a number past float range ("1e400") is no number to compare.
        text = value.strip()
        if _NUMBER.fullmatch(text):
            number = float(text)
            return number if math.isfinite(number) else None
    return None


def _span(text: str) -> _Span | None:
    """The span a date text stands for, or None when it is not a date."""
    match = _DATE.fullmatch(text.strip())
    if match is None:
        return None
    parts = match.groupdict()
    try:
        start = datetime(
            int(parts["year"]),
            int(parts["month"] or 1),
            int(parts["day"] or 1),
            int(parts["hour"] or 0),
            int(parts["minute"] or 0),
            int(parts["second"] or 0),
            int((parts["fraction"] or "0")[:6].ljust(6, "0")),
        )
    except ValueError:
        return None
    offset = None
    if parts["zone"]:
        offset = _offset(parts["zone"])
        if offset is None:
            return None
    if parts["fraction"] is not None:
        length = 1
    elif parts["second"] is not None:
        length = _SECOND
    elif parts["minute"] is not None:
        length = 60 * _SECOND
    elif parts["day"] is not None:
        length = _DAY
    elif parts["month"] is not None:
        length = calendar.monthrange(start.year, start.month)[1] * _DAY
    else:
        length = (366 if calendar.isleap(start.year) else 365) * _DAY
    first = (start - _EPOCH) // _MICROSECOND
    return _Span(first, first + length, offset)


def _offset(zone: str) -> int | None:
    """A UTC offset ("Z", "+02:00", "-0530") in microseconds east; None when out of range."""
    if zone.upper() == "Z":
        return 0
    digits = zone[1:].replace(":", "")
    hours, minutes = int(digits[:2]), int(digits[2:])
    if hours > 14 or minutes >= 60:
        return None
    east = (hours * 60 + minutes) * 60 * _SECOND
    return -east if zone[0] == "-" else east


def _moment(value: Any) -> tuple[int, int | None] | None:
    """A stored value as the moment it names (a partial date: its start): wall-clock
    microseconds and the UTC offset, if any; None when it is not a date."""
    if not isinstance(value, str) or _number(value) is not None:
        return None
    span = _span(value)
    return (span.start, span.offset) if span is not None else None


def _text(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


_MISSING = object()


def _value(item: HasMetadata, key: str) -> Any:
    """The value ``key`` has for ``item``, or ``_MISSING``."""
    metadata = item.metadata
    if key in metadata:
        return metadata[key]
    if key in ("width", "height"):
        size = int(getattr(item, key, 0) or 0)
        if size > 0:
            return size
    return _MISSING


# -- conditions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Condition:
    """One ``KEY OP VALUE`` condition (see the module docstring for how values compare)."""

    key: str
    op: str
    value: str
    # The value as a number and as a date span, when it reads as one, and case-folded.
    _as_number: float | None = field(init=False, repr=False, compare=False)
    _as_span: _Span | None = field(init=False, repr=False, compare=False)
    _folded: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.op not in OPERATORS:
            raise RequestError(
                f"where: unknown operator {self.op!r}; use one of {' '.join(OPERATORS)}"
            )
        if not self.key:
            raise RequestError(f"where: {self} has no key")
        if self.op in (">=", "<=", ">", "<") and not self.value:
            raise RequestError(f"where: {self} needs a value to compare with")
        object.__setattr__(self, "_as_number", _number(self.value))
        object.__setattr__(self, "_as_span", _span(self.value))
        object.__setattr__(self, "_folded", self.value.casefold())

    def __str__(self) -> str:
        return f"{self.key}{self.op}{self.value}"

    def holds(self, value: Any) -> bool:
        """Whether a stored value meets the condition."""
        if self.op == "~=":
            return self._folded in _text(value).casefold()
        if self._as_number is not None:
            number = _number(value)
            if number is not None:
                return _compare(self.op, number, self._as_number)
        if self._as_span is not None:
            moment = _moment(value)
            if moment is not None:
                return _within_span(self.op, moment, self._as_span)
        return _compare(self.op, _text(value), self.value)


def _compare(op: str, left: Any, right: Any) -> bool:
    if op == "=":
        return bool(left == right)
    if op == "!=":
        return bool(left != right)
    if op == ">=":
        return bool(left >= right)
    if op == "<=":
        return bool(left <= right)
    if op == ">":
        return bool(left > right)
    return bool(left < right)


def _within_span(op: str, moment: tuple[int, int | None], span: _Span) -> bool:
    wall, offset = moment
    if span.offset is None:
        # The wall-clock time the photo was taken, its offset aside.
        value, start, end = wall, span.start, span.end
    else:
        # Instants; a time without an offset is taken to be in the bound's.
        value = wall - (span.offset if offset is None else offset)
        start, end = span.start - span.offset, span.end - span.offset
    if op == "=":
        return start <= value < end
    if op == "!=":
        return not start <= value < end
    if op == ">=":
        return value >= start
    if op == ">":
        return value >= end
    if op == "<":
        return value < start
    return value < end  # <=: up to the end of the span


def parse_condition(text: str) -> Condition:
    """A condition from ``KEY OP VALUE`` text (``taken>=2024-01-01``, ``camera~=pixel``,
    ``label=cat``); spaces around the operator are allowed."""
    position, op = _first_operator(text)
    if op is None:
        raise RequestError(
            f"where expects KEY=VALUE or KEY OP VALUE with OP one of {' '.join(OPERATORS)} "
            f"(e.g. taken>=2024-01-01, camera~=pixel), got {text!r}"
        )
    key, value = text[:position].strip(), text[position + len(op) :].strip()
    if not key:
        raise RequestError(f"where: {text!r} has no key before {op!r}")
    return Condition(key, op, value)


def _first_operator(text: str) -> tuple[int, str | None]:
    best: tuple[int, str | None] = (len(text), None)
    for op in OPERATORS:
        position = text.find(op)
        # Earliest wins; at the same place the longer one (">=" over ">") came first.
        if position != -1 and position < best[0]:
            best = (position, op)
    return best


def parse_where(items: Where | None) -> tuple[Condition, ...]:
    """Conditions from expression strings (``["taken>=2024", "camera~=pixel"]``), one such
    string, or the mapping form ``{KEY: VALUE}`` (each ``KEY=VALUE``); bad ones raise
    ``RequestError``."""
    if items is None:
        return ()
    if isinstance(items, str):
        return (parse_condition(items),)
    if isinstance(items, Mapping):
        return tuple(Condition(str(key), "=", _text(value)) for key, value in items.items())
    conditions = []
    for item in items:
        if isinstance(item, Condition):
            conditions.append(item)
        elif isinstance(item, str):
            conditions.append(parse_condition(item))
        else:
            raise RequestError(f"where takes KEY OP VALUE strings, got {item!r}")
    return tuple(conditions)


# -- GPS ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Near:
    """Within ``km`` kilometres (great-circle distance) of ``lat``, ``lon``."""

    lat: float
    lon: float
    km: float

    def __post_init__(self) -> None:
        _check_lat(self.lat, "near")
        _check_lon(self.lon, "near")
        if not math.isfinite(self.km) or self.km <= 0:
            raise RequestError(f"near: the radius must be a positive number of km, got {self.km}")

    def holds(self, lat: float, lon: float) -> bool:
        """Whether a position is inside the circle."""
        return distance_km(self.lat, self.lon, lat, lon) <= self.km


@dataclass(frozen=True)
class Within:
    """Inside the box from ``south`` to ``north`` and ``west`` to ``east`` (degrees; a box with
    west > east crosses the antimeridian)."""

    south: float
    west: float
    north: float
    east: float

    def __post_init__(self) -> None:
        _check_lat(self.south, "within")
        _check_lat(self.north, "within")
        _check_lon(self.west, "within")
        _check_lon(self.east, "within")
        if self.south > self.north:
            raise RequestError(
                f"within: south ({self.south}) is north of north ({self.north}); give "
                "SOUTH,WEST,NORTH,EAST"
            )

    def holds(self, lat: float, lon: float) -> bool:
        """Whether a position is inside the box."""
        if not self.south <= lat <= self.north:
            return False
        if self.west <= self.east:
            return self.west <= lon <= self.east
        return lon >= self.west or lon <= self.east


def distance_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in km (haversine, mean Earth radius)."""
    phi1, phi2 = math.radians(lat1), math.radians(lat2)
    dphi, dlambda = phi2 - phi1, math.radians(lon2 - lon1)
    a = math.sin(dphi / 2) ** 2 + math.cos(phi1) * math.cos(phi2) * math.sin(dlambda / 2) ** 2
    return 2 * _EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


def _check_lat(value: float, name: str) -> None:
    if not (math.isfinite(value) and -90 <= value <= 90):
        raise RequestError(f"{name}: latitude must be between -90 and 90, got {value}")


def _check_lon(value: float, name: str) -> None:
    if not (math.isfinite(value) and -180 <= value <= 180):
        raise RequestError(f"{name}: longitude must be between -180 and 180, got {value}")


def _numbers(value: str | Sequence[float], count: int, name: str, form: str) -> list[float]:
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        numbers = [float(item) for item in items]
    except (TypeError, ValueError):
        numbers = []
    if len(numbers) != count:
        raise RequestError(f"{name} expects {form}, got {value!r}")
    return numbers


def parse_near(value: Near | str | Sequence[float] | None) -> Near | None:
    """A :class:`Near` from ``"LAT,LON,KM"`` or three numbers (None stays None)."""
    if value is None or isinstance(value, Near):
        return value
    if isinstance(value, str) and not value.strip():
        return None
    lat, lon, km = _numbers(value, 3, "near", "LAT,LON,KM (e.g. 48.85,2.35,10)")
    return Near(lat, lon, km)


def parse_within(value: Within | str | Sequence[float] | None) -> Within | None:
    """A :class:`Within` from ``"SOUTH,WEST,NORTH,EAST"`` or four numbers (None stays None)."""
    if value is None or isinstance(value, Within):
        return value
    if isinstance(value, str) and not value.strip():
        return None
    south, west, north, east = _numbers(
        value, 4, "within", "SOUTH,WEST,NORTH,EAST (e.g. 48.8,2.2,48.9,2.5)"
    )
    return Within(south, west, north, east)


# -- all of them --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Filter:
    """Every condition, the circle and the box together: what an image must meet."""

    conditions: tuple[Condition, ...] = ()
    near: Near | None = None
    within: Within | None = None

    def __bool__(self) -> bool:
        return bool(self.conditions) or self.near is not None or self.within is not None

    def matches(self, item: HasMetadata) -> bool:
        """Whether a record (or result) meets every part of the filter."""
        for condition in self.conditions:
            value = _value(item, condition.key)
            if value is _MISSING or not condition.holds(value):
                return False
        if self.near is None and self.within is None:
            return True
        lat, lon = _number(item.metadata.get("lat")), _number(item.metadata.get("lon"))
        if lat is None or lon is None:
            return False
        if self.near is not None and not self.near.holds(lat, lon):
            return False
        return self.within is None or self.within.holds(lat, lon)


def make_filter(
    where: Where | None = None,
    *,
    near: Near | str | Sequence[float] | None = None,
    within: Within | str | Sequence[float] | None = None,
) -> Filter:
    """A :class:`Filter` from the forms the library, CLI and servers take; bad parts raise
    ``RequestError``."""
    return Filter(parse_where(where), parse_near(near), parse_within(within))


def matches(record: HasMetadata, where: Filter | Where | None) -> bool:
    """Whether ``record`` meets ``where`` (a :class:`Filter` or anything :func:`parse_where`
    takes). An image without a key never matches (``label=None`` is not "no label")."""
    if not where:
        return True
    found = where if isinstance(where, Filter) else make_filter(where)
    return found.matches(record)


# -- sorting ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SortKey:
    """Order by a metadata value, ascending or (``descending``) descending."""

    key: str
    descending: bool = False

    def __str__(self) -> str:
        return f"-{self.key}" if self.descending else self.key


def parse_sort(text: str | SortKey | None) -> SortKey | None:
    """A sort key from ``KEY`` or ``-KEY``; None, empty and ``score`` mean best first."""
    if text is None or isinstance(text, SortKey):
        return text
    cleaned = text.strip()
    if cleaned in ("", "score"):
        return None
    descending = cleaned.startswith("-")
    key = cleaned[1:].strip() if descending else cleaned
    if key == "score":
        raise RequestError("sort: results come best first by score; '-score' is not an order")
    if not _SEARCH_KEY.fullmatch(key):
        raise RequestError(
            f"sort expects a metadata key, optionally with a leading '-' for descending "
            f"(e.g. taken, -taken), got {text!r}"
        )
    return SortKey(key, descending)


def sort_items(items: Sequence[_T], sort: SortKey | None) -> list[_T]:
    """``items`` ordered by ``sort``'s key (numbers, then dates by wall-clock time, then
    text); items without the key last; ties and those keep their order. None: unchanged."""
    if sort is None:
        return list(items)
    keyed = []
    missing = []
    for item in items:
        value = _value(item, sort.key)
        if value is _MISSING or value is None:
            missing.append(item)
        else:
            keyed.append((_sort_value(value), item))
    keyed.sort(key=lambda pair: pair[0], reverse=sort.descending)
    return [item for _, item in keyed] + missing


def _sort_value(value: Any) -> tuple[int, Any]:
    number = _number(value)
    if number is not None:
        return (0, number)
    moment = _moment(value)
    if moment is not None:
        return (1, moment[0])  # the wall-clock time
    return (2, _text(value))
