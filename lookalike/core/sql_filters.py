"""Metadata filters as a PostgreSQL ``WHERE`` condition on the catalog's ``images`` table, so
that an index inside the database (pgvector) filters while it scans.

The condition is never narrower than :meth:`lookalike.core.filters.Filter.matches`: every image
the filter keeps passes it. It may be broader; the search path checks each hit with
``Filter.matches`` again. It is exact where PostgreSQL can compare the same way, and lets the
row through where it might not, for Python to decide:

- ``KEY OP VALUE`` reads ``metadata -> KEY`` (``width``/``height`` fall back to the columns when
  the key is missing; any other missing key fails, ``!=`` included). JSON booleans and null
  are decided here, once, by :meth:`Condition.holds` itself.
- Strings of printable ASCII are compared exactly: numerically when both sides are numbers,
  as date spans when both are dates (parsed, checked and counted in microseconds as
  ``filters._span`` does, offsets included), else as text in code-point order (``COLLATE
  "C"``). ``~=`` lower-cases ASCII only (``translate``), locale aside. Strings with other
  characters (Unicode digits and case folding, control characters Python strips) pass.
- JSON numbers compare as float8, as Python compares them after ``json.loads``; numbers of
  magnitude outside 1e-300..1e300 (which float8 cannot hold the way Python does) pass, and so
  do non-integers under ``~=`` and text comparisons (Python prints floats its own way).
- Arrays and objects pass.
- ``near`` is the same haversine distance with a margin; ``within`` the same box.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from lookalike.core.filters import Condition, Filter, Near, Within

# Strings of printable ASCII only: the ones compared here rather than passed to Python.
_PLAIN = r"^[ -~]*$"
# Python's number syntax (filters._NUMBER) on ASCII, with the spaces strip() removes.
_NUMBER = r"^ *[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)? *$"
# Numbers float8 reads exactly as Python's float() does (no overflow to inf, no underflow).
_SAFE_NUMBER = r"^ *[+-]?([0-9]{1,200}(\.[0-9]{0,200})?|\.[0-9]{1,200})([eE][+-]?[0-9]{1,2})? *$"
_INTEGER = r"^-?[0-9]+$"
# filters._DATE, but for its back-reference (the second separator is checked in _VALID);
# groups: year, separator, month, separator, day, hour, minute, second, fraction, zone.
_DATE = (
    r"^([0-9]{4})(?:([-:])([0-9]{2})(?:([-:])([0-9]{2})(?:[T ]([0-9]{2}):([0-9]{2})"
    r"(?::([0-9]{2})(?:\.([0-9]{1,9}))?)?(Z|[+-][0-9]{2}:?[0-9]{2})?)?)?)?$"
)
# A date's parts ``d.p`` (groups of _DATE) as Python's datetime takes them: a real day of a
# year from 1 (both separators alike), hours, minutes and seconds in range, a zone within
# +-14:59.
_VALID = (
    "(d.p[4] IS NULL OR d.p[4] = d.p[2]) AND d.p[1]::int >= 1 AND "
    "(d.p[3] IS NULL OR d.p[3]::int BETWEEN 1 AND 12) AND "
    "(d.p[5] IS NULL OR d.p[5]::int BETWEEN 1 AND CASE d.p[3]::int WHEN 2 THEN "
    "CASE WHEN mod(d.p[1]::int, 4) = 0 AND "
    "(mod(d.p[1]::int, 100) <> 0 OR mod(d.p[1]::int, 400) = 0) THEN 29 ELSE 28 END "
    "WHEN 4 THEN 30 WHEN 6 THEN 30 WHEN 9 THEN 30 WHEN 11 THEN 30 "
    "ELSE 31 END) AND coalesce(d.p[6]::int, 0) <= 23 AND coalesce(d.p[7]::int, 0) <= 59 AND "
    "coalesce(d.p[8]::int, 0) <= 59 AND (d.p[10] IS NULL OR upper(d.p[10]) = 'Z' OR "
    "(substr(d.p[10], 2, 2)::int <= 14 AND right(d.p[10], 2)::int < 60))"
)
# Its wall-clock time in microseconds since 1970 (as if UTC, as filters._span counts), missing
# parts as _span fills them; the day number is Howard Hinnant's days_from_civil.
_YEAR = "(d.p[1]::int - CASE WHEN coalesce(d.p[3]::int, 1) <= 2 THEN 1 ELSE 0 END)"
_DAYS = (
    f"(({_YEAR} / 400) * 146097 + mod({_YEAR}, 400) * 365 + mod({_YEAR}, 400) / 4 - "
    f"mod({_YEAR}, 400) / 100 + (153 * mod(coalesce(d.p[3]::int, 1) + 9, 12) + 2) / 5 + "
    "coalesce(d.p[5]::int, 1) - 1 - 719468)"
)
_MICROS = (
    f"((({_DAYS}::bigint * 24 + coalesce(d.p[6]::int, 0)) * 60 + coalesce(d.p[7]::int, 0)) * "
    "60 + coalesce(d.p[8]::int, 0)) * 1000000 + rpad(left(coalesce(d.p[9], ''), 6), 6, '0')::int"
)
# Its UTC offset in microseconds east, NULL without one.
_OFFSET = (
    "CASE WHEN d.p[10] IS NULL THEN NULL WHEN upper(d.p[10]) = 'Z' THEN 0::bigint ELSE "
    "(CASE WHEN left(d.p[10], 1) = '-' THEN -1 ELSE 1 END) * (substr(d.p[10], 2, 2)::int * 60 + "
    "right(d.p[10], 2)::int)::bigint * 60000000 END"
)
_UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_LOWER = _UPPER.lower()
_FLOAT8_SAFE = "abs({x}::numeric) BETWEEN 1e-300 AND 1e300 OR {x}::numeric = 0"
_MARGIN = 1e-9  # relative, for the distances float8 and Python may round apart
_MARKER = re.compile("\x00([0-9]+)\x00")


@dataclass(frozen=True)
class SqlFilter:
    """A condition on the images row aliased ``i`` with ``%s`` placeholders for ``params``."""

    sql: str
    params: tuple[Any, ...]


class _Builder:
    """Parameters behind markers in SQL text: a marker may stand anywhere, any number of
    times; :meth:`finish` turns the text into ``%s`` placeholders and the values in order."""

    def __init__(self, alias: str) -> None:
        self.alias = alias
        self.values: list[Any] = []

    def p(self, value: Any) -> str:
        self.values.append(value)
        return f"\x00{len(self.values) - 1}\x00"

    def finish(self, text: str) -> SqlFilter:
        params: list[Any] = []

        def placeholder(match: re.Match[str]) -> str:
            params.append(self.values[int(match.group(1))])
            return "%s"

        return SqlFilter(_MARKER.sub(placeholder, text), tuple(params))

    def json(self, key: str) -> str:
        return f"({self.alias}.metadata -> {self.p(key)})"

    def text(self, key: str) -> str:
        return f"({self.alias}.metadata ->> {self.p(key)})"


def filter_sql(where: Filter, *, alias: str = "i") -> SqlFilter:
    """The condition (on ``images`` aliased ``alias``) that every image ``where`` keeps
    passes; ``TRUE`` for an empty filter."""
    built = _Builder(alias)
    parts = [_condition(built, condition) for condition in where.conditions]
    if where.near is not None or where.within is not None:
        parts.append(_position(built, where.near, where.within))
    return built.finish(" AND ".join(f"({p})" for p in parts) or "TRUE")


def _condition(b: _Builder, c: Condition) -> str:
    key = b.p(c.key)
    present = f"{b.alias}.metadata ? {key}"
    kind = f"jsonb_typeof({b.alias}.metadata -> {key})"
    string = _string(b, c)
    number = _number(b, c)
    boolean = _constant_json(b, c, (True, False))
    null = "TRUE" if c.holds(None) else "FALSE"
    missing = "FALSE"
    if c.key in ("width", "height"):
        missing = f"({b.alias}.{c.key} > 0 AND {_column(b, c, f'{b.alias}.{c.key}')})"
    return (
        f"CASE WHEN {present} THEN CASE {kind} WHEN 'string' THEN {string} "
        f"WHEN 'number' THEN {number} WHEN 'boolean' THEN {boolean} WHEN 'null' THEN {null} "
        f"ELSE TRUE END ELSE {missing} END"
    )


def _constant_json(b: _Builder, c: Condition, values: tuple[bool, ...]) -> str:
    """A JSON value of few possible values (booleans): decided here by Condition.holds."""
    kept = [value for value in values if c.holds(value)]
    if len(kept) == len(values):
        return "TRUE"
    if not kept:
        return "FALSE"
    literal = "true" if kept[0] else "false"
    return f"{b.json(c.key)} = '{literal}'::jsonb"


def _text_compare(b: _Builder, c: Condition, value: str) -> str:
    op = "<>" if c.op == "!=" else c.op
    return f'({value} COLLATE "C" {op} {b.p(c.value)})'


def _string(b: _Builder, c: Condition) -> str:
    s, plain = b.text(c.key), b.p(_PLAIN)
    if c.op == "~=":
        found = f"strpos(translate({s}, '{_UPPER}', '{_LOWER}'), {b.p(c.value.casefold())}) > 0"
        return f"CASE WHEN {s} !~ {plain} THEN TRUE ELSE {found} END"
    number = b.p(_NUMBER)
    branches = []
    if c._as_number is not None:
        compare = f"{s}::float8 {_sql_op(c.op)} {b.p(c._as_number)}"
        branches.append(
            f"WHEN {s} ~ {number} THEN CASE WHEN {s} ~ {b.p(_SAFE_NUMBER)} THEN {compare} "
            "ELSE TRUE END"
        )
    if c._as_span is not None:
        # A date Python reads is compared as its span; one it does not (the 31st of April)
        # as text, as Python compares it. OFFSET 0 keeps the planner from pulling the
        # subqueries up, which would match the pattern again for every use of a part.
        parts = f"regexp_match(btrim({s}, ' '), {b.p(_DATE)}, 'i')"
        moment = (
            f"SELECT CASE WHEN d.p IS NOT NULL AND {_VALID} THEN {_MICROS} END AS micros, "
            f"{_OFFSET} AS shift FROM (SELECT {parts} AS p OFFSET 0) d OFFSET 0"
        )
        dated = (
            f"(SELECT CASE WHEN w.micros IS NOT NULL THEN {_span_compare(b, c)} "
            f"ELSE {_text_compare(b, c, s)} END FROM ({moment}) w)"
        )
        branches.append(f"WHEN {s} !~ {number} THEN {dated}")
    return (
        f"CASE WHEN {s} !~ {plain} THEN TRUE {' '.join(branches)} ELSE {_text_compare(b, c, s)} END"
    )


def _number(b: _Builder, c: Condition) -> str:
    x, s = b.json(c.key), b.text(c.key)
    if c.op == "~=" or c._as_number is None:
        # Python prints integers as JSON does; other numbers its own way: those pass.
        if c.op == "~=":
            test = f"strpos({s}, {b.p(c.value.casefold())}) > 0"
        else:
            test = _text_compare(b, c, s)
        return f"CASE WHEN {s} ~ {b.p(_INTEGER)} THEN {test} ELSE TRUE END"
    compare = f"{x}::float8 {_sql_op(c.op)} {b.p(c._as_number)}"
    return f"CASE WHEN {_FLOAT8_SAFE.format(x=x)} THEN {compare} ELSE TRUE END"


def _column(b: _Builder, c: Condition, column: str) -> str:
    """The condition on an integer column (the stored pixel size)."""
    if c.op == "~=":
        return f"strpos({column}::text, {b.p(c.value.casefold())}) > 0"
    if c._as_number is not None:
        return f"{column}::float8 {_sql_op(c.op)} {b.p(c._as_number)}"
    return _text_compare(b, c, f"{column}::text")


def _sql_op(op: str) -> str:
    return "<>" if op == "!=" else op


def _span_compare(b: _Builder, c: Condition) -> str:
    """A stored date (``w.micros``, its offset ``w.shift``) against the condition's span, as
    filters._within_span compares: wall-clock times, or instants when the bound has an
    offset (a stored time without one taken to be in the bound's)."""
    span = c._as_span
    assert span is not None
    value, start, end = "w.micros", span.start, span.end
    if span.offset is not None:
        value = f"(w.micros - coalesce(w.shift, {b.p(span.offset)}))"
        start, end = start - span.offset, end - span.offset
    low, high = b.p(start), b.p(end)
    if c.op == "=":
        return f"({value} >= {low} AND {value} < {high})"
    if c.op == "!=":
        return f"({value} < {low} OR {value} >= {high})"
    if c.op == ">=":
        return f"{value} >= {low}"
    if c.op == ">":
        return f"{value} >= {high}"
    if c.op == "<":
        return f"{value} < {low}"
    return f"{value} < {high}"  # <=: up to the end of the span


def _position(b: _Builder, near: Near | None, within: Within | None) -> str:
    """``near`` and ``within`` on ``lat``/``lon`` read as filters._number reads them; a value
    this cannot read the way Python does passes."""
    lat, lat_unknown = _coordinate(b, "lat")
    lon, lon_unknown = _coordinate(b, "lon")
    tests = []
    if near is not None:
        radius = near.km * (1 + _MARGIN) + 1e-6
        tests.append(
            f"2 * 6371.0088 * asin(least(1.0, sqrt(power(sin((radians(g.lat) - "
            f"radians({b.p(near.lat)})) / 2), 2) + cos(radians({b.p(near.lat)})) * "
            f"cos(radians(g.lat)) * power(sin((radians(g.lon) - radians({b.p(near.lon)})) / 2), "
            f"2)))) <= {b.p(radius)}"
        )
    if within is not None:
        tests.append(
            f"g.lat BETWEEN {b.p(within.south - _MARGIN)} AND {b.p(within.north + _MARGIN)}"
        )
        west, east = b.p(within.west - _MARGIN), b.p(within.east + _MARGIN)
        joined = "AND" if within.west <= within.east else "OR"
        tests.append(f"(g.lon >= {west} {joined} g.lon <= {east})")
    known = " AND ".join(tests)
    return (
        f"(SELECT g.unknown OR (g.lat IS NOT NULL AND g.lon IS NOT NULL AND {known}) "
        f"FROM (SELECT {lat} AS lat, {lon} AS lon, ({lat_unknown} OR {lon_unknown}) AS unknown)"
        " g)"
    )


def _coordinate(b: _Builder, key: str) -> tuple[str, str]:
    """(float8 or NULL, whether the value is one this cannot read as Python does) of one
    metadata key, as SQL."""
    x, s = b.json(key), b.text(key)
    plain, number, safe_number = b.p(_PLAIN), b.p(_NUMBER), b.p(_SAFE_NUMBER)
    safe = _FLOAT8_SAFE.format(x=x)
    value = (
        f"CASE jsonb_typeof({x}) WHEN 'number' THEN CASE WHEN {safe} THEN {x}::float8 END "
        f"WHEN 'string' THEN CASE WHEN {s} ~ {plain} AND {s} ~ {safe_number} THEN {s}::float8 "
        "END END"
    )
    unknown = (
        f"CASE jsonb_typeof({x}) WHEN 'number' THEN NOT ({safe}) WHEN 'string' THEN "
        f"{s} !~ {plain} OR ({s} ~ {number} AND {s} !~ {safe_number}) ELSE FALSE END"
    )
    return value, unknown
