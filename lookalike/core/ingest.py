"""The ingest pipeline: decode, embed and extract local features in batches, then store.

An executor (threads in this process, or :mod:`lookalike.distributed` on Ray) turns file
paths into :class:`Batch` es of decoded records, vectors and local features, and nothing
else; :class:`IngestPipeline` alone writes them to the catalog, one batch per transaction, so
a run that is killed keeps every batch it finished, and the next run only does what is left:
nothing is duplicated, nothing is lost.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from lookalike.catalog import Catalog, FileState, ImageRecord
from lookalike.core.derived import VectorIndexes
from lookalike.core.local_store import LocalFeatureKind, LocalFeatureStore
from lookalike.encoders.base import Encoder
from lookalike.encoders.preprocess import PreprocessConfig, resize_for_model
from lookalike.errors import ImageError
from lookalike.images import image_size, load_image
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
    # A model switch this run worked on: "done" (the new model answers now), "pending" (images
    # of the collection still lack its vectors; the old model keeps answering), or None.
    switch: str | None = None

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


@dataclass(frozen=True)
class EncoderRecipe:
    """How to build the collection's encoder anywhere (picklable): its registry name and
    options. Executors in other processes build their encoder from it."""

    name: str
    options: dict[str, Any]

    def build(self) -> Encoder:
        from lookalike.encoders.registry import create_encoder

        return create_encoder(self.name, **self.options)


@dataclass
class Batch:
    """One batch ready to store: the files that decoded (with pixels dropped once used),
    their vectors in the same order, their local features when asked for, and the files
    that failed with the reason."""

    decoded: list[Decoded]
    vectors: np.ndarray
    local_features: list[bytes | None] | None = None
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def files(self) -> int:
        return len(self.decoded) + len(self.failed)


def embed_batch(encoder: Encoder, decoded: list[Decoded], local: LocalFeatureKind | None) -> Batch:
    """Embed the files of ``decoded`` that decoded, and extract their local features: SIFT
    was computed while decoding, patch tokens are computed here from the same pixels."""
    good = [d for d in decoded if d.error is None]
    failed = [(d.path, d.error or "") for d in decoded if d.error is not None]
    if not good:
        empty = np.empty((0, encoder.dim), dtype=np.float32)
        return Batch([], empty, [] if local else None, failed)
    pixels = np.stack([d.pixels for d in good if d.pixels is not None])
    vectors = encoder.embed_pixels(pixels)
    features: list[bytes | None] | None = None
    if local is not None:
        if local.patch_tokens:
            features = list(local.from_pixels(encoder, pixels))
        else:
            features = [d.local_features for d in good]
    slim = [Decoded(d.path, record=d.record) for d in good]
    return Batch(slim, vectors, features, failed)


ProgressFiles = Callable[[int], None]


class IngestExecutor(Protocol):
    """Turns file paths into batches; never writes the catalog."""

    def batches(
        self,
        paths: list[str],
        *,
        encoder: Encoder,
        recipe: EncoderRecipe,
        local: LocalFeatureKind | None,
        batch_size: int,
    ) -> Iterator[Batch]: ...


@dataclass(frozen=True)
class ThreadExecutor:
    """Decodes in ``workers`` threads of this process and embeds here (0 decodes inline)."""

    workers: int | None = None

    def batches(
        self,
        paths: list[str],
        *,
        encoder: Encoder,
        recipe: EncoderRecipe,
        local: LocalFeatureKind | None,
        batch_size: int,
    ) -> Iterator[Batch]:
        workers = min(os.cpu_count() or 1, 4) if self.workers is None else self.workers
        sift = local.sift if local is not None else None
        pending: list[Decoded] = []
        for decoded in decode_all(paths, encoder.preprocess, workers=workers, local=sift):
            pending.append(decoded)
            if sum(1 for d in pending if d.error is None) >= batch_size:
                yield embed_batch(encoder, pending, local)
                pending = []
        if pending:
            yield embed_batch(encoder, pending, local)


class IngestPipeline:
    """The one place where ingest writes: a batch's records and vectors in one catalog
    transaction, its local features, and the loaded vector indexes updated in step."""

    def __init__(
        self,
        catalog: Catalog,
        indexes: VectorIndexes,
        local_store: LocalFeatureStore,
        *,
        model_id: int,
        model_key: str,
    ) -> None:
        self.catalog = catalog
        self.indexes = indexes
        self.local_store = local_store
        self.model_id = model_id
        self.model_key = model_key

    def run(
        self,
        batches: Iterable[Batch],
        known: dict[str, FileState],
        report: IndexReport,
        *,
        local: LocalFeatureKind | None,
        total: int,
        progress: ProgressCallback | None = None,
    ) -> None:
        """Store every batch, recording failures, reporting progress, and save the indexes."""
        if progress:
            progress(0, total)
        done = 0
        try:
            for batch in batches:
                self.store(batch, known, report, local)
                done += batch.files
                if progress:
                    progress(min(done, total), total)
        finally:
            self.indexes.flush()

    def store(
        self,
        batch: Batch,
        known: dict[str, FileState],
        report: IndexReport,
        local: LocalFeatureKind | None,
    ) -> list[int]:
        """Write one batch; returns the catalog ids of its images, in order."""
        for path, reason in batch.failed:
            report.failed.append((path, reason))
            self.catalog.record_failure(path, reason)
        if not batch.decoded:
            return []
        records = [d.record for d in batch.decoded if d.record is not None]
        before = self.catalog.state
        ids = self.catalog.store(records, batch.vectors, self.model_id)
        self.indexes.apply(
            self.model_key,
            before=before,
            after=self.catalog.last_written_state,
            changes=1,
            added=(np.asarray(ids, dtype=np.int64), batch.vectors),
        )
        if local is not None and batch.local_features is not None:
            hashes = {i: r.content_hash for i, r in zip(ids, records, strict=True)}
            self.local_store.save(local, ids, batch.local_features, hashes)
        updated = sum(1 for d in batch.decoded if d.path in known)
        report.updated += updated
        report.added += len(batch.decoded) - updated
        return ids
