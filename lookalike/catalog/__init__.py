"""Catalogs: where images, metadata and vectors live (a SQLite file or a PostgreSQL database)."""

from __future__ import annotations

from pathlib import Path

from lookalike.catalog.base import Catalog, FileState, ImageRecord, is_postgres_url
from lookalike.catalog.sqlite import SqliteCatalog


def open_catalog(location: str | Path) -> Catalog:
    """The catalog at ``location``: a ``postgresql://`` (or ``postgres://``) URL opens a
    PostgreSQL database, anything else is the path of a SQLite file."""
    if is_postgres_url(location):
        from lookalike.catalog.postgres import PostgresCatalog

        return PostgresCatalog(str(location))
    return SqliteCatalog(location)


__all__ = [
    "Catalog",
    "FileState",
    "ImageRecord",
    "SqliteCatalog",
    "is_postgres_url",
    "open_catalog",
]
