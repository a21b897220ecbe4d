"""Metadata from a CSV file, matched to catalogued images by relative path or file name."""

from __future__ import annotations

from pathlib import Path

from lookalike.errors import LookalikeError


def read_metadata_csv(path: str | Path, *, key: str | None = None) -> dict[str, dict[str, str]]:
    """Rows of a CSV keyed by file name (or relative path), the other columns as metadata.

    The key column is ``key`` if given, else the first of file/filename/path/image/name that
    exists, else the first column.
    """
    import csv

    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            if not columns:
                raise LookalikeError(f"{path}: the metadata CSV has no header row")
            if key is None:
                preferred = ("file", "filename", "file_name", "path", "image", "name")
                lowered = {c.lower(): c for c in columns}
                key = next((lowered[p] for p in preferred if p in lowered), columns[0])
            elif key not in columns:
                raise LookalikeError(f"{path}: no column {key!r}; columns are {columns}")
            rows = {}
            for row in reader:
                name = (row.get(key) or "").strip()
                if name:
                    rows[name] = {c: v for c, v in row.items() if c != key and c is not None}
    except OSError as error:
        raise LookalikeError(f"cannot read metadata CSV {path}: {error}") from error
    return rows


def match_metadata(
    paths: dict[str, int], rows: dict[str, dict[str, str]]
) -> dict[int, dict[str, str]]:
    """Image id -> metadata, matching CSV keys to the end of stored paths (a relative path or a
    file name). A key that fits several images (the same file name in two folders) is skipped
    rather than guessed."""
    ambiguous = -1
    by_suffix: dict[str, int] = {}
    for path, image_id in paths.items():
        parts = Path(path).parts[1:] if Path(path).is_absolute() else Path(path).parts
        for start in range(len(parts)):
            suffix = "/".join(parts[start:])
            by_suffix[suffix] = image_id if suffix not in by_suffix else ambiguous
    matched = {}
    for name, metadata in rows.items():
        image_id = by_suffix.get(name.replace("\\", "/").removeprefix("./"), ambiguous)
        if image_id != ambiguous:
            matched[image_id] = metadata
    return matched
