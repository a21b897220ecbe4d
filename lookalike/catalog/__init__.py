"""Catalogs: where images, metadata and vectors live (a SQLite file or a PostgreSQL database)."""

from lookalike.catalog.base import (
    Catalog,
    FileState,
    ImageRecord,
    is_postgres_url,
    open_catalog,
)
from lookalike.catalog.sqlite import SqliteCatalog

__all__ = [
    "Catalog",
    "FileState",
    "ImageRecord",
    "SqliteCatalog",
    "is_postgres_url",
    "open_catalog",
]
