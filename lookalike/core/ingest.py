"""Indexing a folder: find what changed, decode in worker threads, embed in batches, store.

The catalog is written one batch per transaction, so a run that is killed keeps every batch it
finished, and the next run only does what is left: nothing is duplicated, nothing is lost.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lookalike.catalog import ImageRecord
from lookalike.encoders.preprocess import PreprocessConfig, resize_for_model
from lookalike.errors import ImageError, LookalikeError
from lookalike.images import image_size, load_image

if TYPE_CHECKING:
    from lookalike.local.features import SiftConfig

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp",
     ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico"}
)  # fmt: skip

ProgressCallback = Callable[[int, int], None]


@dataclass
class IndexReport:
    """What an indexing run did."""

    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def embedded(self) -> int:
        return self.added + self.updated

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Decoded:
    """A file read, hashed and resized in a worker, or the reason it could not be.
    ``local_features`` holds its serialised SIFT features when they were asked for."""

    path: str
    record: ImageRecord | None = None
    pixels: np.ndarray | None = None
    error: str | None = None
    local_features: bytes | None = None


def scan_folder(root: Path) -> Iterator[Path]:
    """Image files below ``root`` by suffix, skipping hidden files and folders, sorted."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                yield Path(folder, name)


def decode_file(path: str, config: PreprocessConfig, local: SiftConfig | None = None) -> Decoded:
    """Read a file once: hash its bytes, take its size, decode and resize it for the model,
    and extract its local features from the same decoded image when ``local`` is given."""
    try:
        stat = os.stat(path)
        with open(path, "rb") as handle:
            data = handle.read()
        width, height = image_size(path)
        # SIFT wants more pixels than the encoder: let libjpeg shrink less when it runs.
        draft = config.resolution if local is None else max(config.resolution, local.max_side)
        image = load_image(io.BytesIO(data), draft_size=draft)
        pixels = resize_for_model(image, config)
        features = None
        if local is not None:
            from lookalike.local.features import extract

            features = extract(image, local).to_bytes()
    except ImageError as error:
        return Decoded(path, error=error.reason)
    except OSError as error:
        return Decoded(path, error=error.strerror or str(error))
    record = ImageRecord(
        path=path,
        content_hash=hashlib.sha256(data).hexdigest(),
        size=stat.st_size,
        mtime=stat.st_mtime,
        width=width,
        height=height,
    )
    return Decoded(path, record=record, pixels=pixels, local_features=features)


def _decode_chunk(
    paths: list[str], config: PreprocessConfig, local: SiftConfig | None
) -> list[Decoded]:
    return [decode_file(p, config, local) for p in paths]


def decode_all(
    paths: list[str],
    config: PreprocessConfig,
    *,
    workers: int,
    chunk: int = 8,
    local: SiftConfig | None = None,
) -> Iterator[Decoded]:
    """Decoded files in input order, from ``workers`` threads (0 decodes inline).

    Threads, not processes: JPEG decoding, resizing and hashing release the GIL, so threads
    decode in parallel with inference without pickling pixels between processes (measured
    faster on 2 cores than a process pool). At most a few chunks per worker are in flight, so
    memory stays flat however many files there are.
    """
    if workers <= 0:
        for path in paths:
            yield decode_file(path, config, local)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="lookalike-decode") as pool:
        pending: deque[Future[list[Decoded]]] = deque()
        for start in range(0, len(paths), chunk):
            pending.append(pool.submit(_decode_chunk, paths[start : start + chunk], config, local))
            if len(pending) >= 4 * workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


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
