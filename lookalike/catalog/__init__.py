"""Catalogs: where images, metadata and vectors live."""

from lookalike.catalog.sqlite import FileState, ImageRecord, SqliteCatalog

__all__ = ["FileState", "ImageRecord", "SqliteCatalog"]
