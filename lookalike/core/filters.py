"""Metadata filters: ``KEY=VALUE`` conditions that a result's metadata must meet."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lookalike.catalog import ImageRecord
from lookalike.errors import RequestError

Where = Mapping[str, Any]


def parse_where(items: Sequence[str]) -> dict[str, str]:
    """Metadata filters from ``KEY=VALUE`` strings, as the CLI and the REST API take them."""
    where = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RequestError(f"where expects KEY=VALUE, got {item!r}")
        where[key] = value
    return where


def matches(record: ImageRecord, where: Where | None) -> bool:
    """Whether ``record``'s metadata has every value ``where`` asks for, compared as text.
    An image without the key never matches (``label=None`` is not "no label")."""
    if not where:
        return True
    metadata = record.metadata
    return all(key in metadata and str(metadata[key]) == str(value) for key, value in where.items())
