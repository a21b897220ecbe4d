"""The ingest pipeline: decode, embed and extract local features in batches, then store.

An executor (threads in this process, or :mod:`lookalike.distributed` on Ray) turns file
paths into :class:`Batch` es of decoded records, vectors and local features, and nothing
else; :class:`IngestPipeline` alone writes them to the catalog, one batch per transaction, so
a run that is killed keeps every batch it finished, and the next run only does what is left:
nothing is duplicated, nothing is lost.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import importlib
import io
import os
import re
import stat
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
from lookalike.errors import ImageError, LookalikeError
from lookalike.images import image_size, load_image
from lookalike.local.features import SiftConfig

# Formats that Pillow decodes only when built with their library or given a plugin: scanned
# like the others, decoded when something registered can, else reported with what to install.
PLUGIN_FORMATS: dict[str, tuple[str, str]] = {
    ".heic": ("HEIC", "install pillow-heif"),
    ".heif": ("HEIF", "install pillow-heif"),
    ".avif": ("AVIF", "install pillow-avif-plugin or a Pillow built with AVIF support"),
    ".jxl": ("JPEG XL", "install pillow-jxl-plugin"),
}
# Plugins that register themselves with Pillow when imported (pillow-heif needs a call).
_PLUGIN_MODULES = {
    ".heic": ("pillow_heif", "register_heif_opener"),
    ".heif": ("pillow_heif", "register_heif_opener"),
    ".avif": ("pillow_avif", None),
    ".jxl": ("pillow_jxl", None),
}
RAW_SUFFIXES = frozenset({".dng", ".cr2", ".nef", ".arw"})
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp",
     ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico", *PLUGIN_FORMATS, *RAW_SUFFIXES}
)  # fmt: skip

# Files above this size are reported and not read (``Collection.index(max_file_bytes=...)``).
DEFAULT_MAX_FILE_BYTES = 256 * 1024**2

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


_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(?:I?B)?\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """A byte count from ``text``: a plain number of bytes, or a number with a K, M, G or T
    suffix (powers of 1024; ``50M``, ``50MB``, ``50MiB`` and ``1.5G`` all work)."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise LookalikeError(f"{text!r} is not a size: use bytes, or a number with K, M or G")
    size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if size < 1:
        raise LookalikeError(f"{text!r}: a size limit must be at least one byte")
    return size


def format_size(size: int) -> str:
    """``size`` bytes for people: ``50 MB`` (exact multiples of 1024 shown whole), ``1.5 GB``."""
    for unit in ("TB", "GB", "MB", "KB"):
        scale = _UNITS[unit[0]]
        if size >= scale:
            value = size / scale
            return f"{value:.0f} {unit}" if size % scale == 0 else f"{value:.1f} {unit}"
    return f"{size} bytes"


@dataclass
class ScanResult:
    """What a folder scan found: the image files to consider with their ``os.stat`` (taken
    once, following symlinks), and the entries that cannot be indexed with the reason."""

    files: dict[str, os.stat_result] = field(default_factory=dict)
    failed: list[tuple[str, str]] = field(default_factory=list)


def is_image_name(name: str) -> bool:
    """Whether a file name has a suffix the scan looks at (any case), hidden files excluded."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def scan_images(
    root: str | Path,
    *,
    follow_symlinks: bool = True,
    max_file_bytes: int | None = DEFAULT_MAX_FILE_BYTES,
) -> ScanResult:
    """Image files below ``root`` by suffix (any case), skipping hidden files and folders.

    One bad entry never stops the scan: an image name that is a dangling symlink, a symlink
    loop, not a regular file (a FIFO, a device), or larger than ``max_file_bytes`` (None: no
    limit), and a folder that cannot be read or was already scanned, land in ``failed`` with
    the reason. Symlinks to files and folders are followed (a folder reached twice, as a link
    back to an ancestor does, is scanned once), or with ``follow_symlinks=False`` reported as
    not followed. Paths are ``root`` joined with the names as listed (not resolved), as
    ``str``: a name that is not valid UTF-8 keeps its bytes as surrogate escapes
    (``os.fsdecode``). Real folders are scanned before folders reached through symlinks, so a
    folder linked from elsewhere in the tree keeps its real path.
    """
    result = ScanResult()
    top = os.fspath(root)
    try:
        info = os.stat(top)
    except OSError as error:
        result.failed.append((top, f"cannot read folder ({_why(error)})"))
        return result
    visited: dict[tuple[int, int], str] = {}
    folders: list[tuple[str, os.stat_result]] = [(top, info)]
    linked: list[tuple[str, os.stat_result]] = []  # scanned after every real folder
    while folders or linked:
        folder, info = folders.pop() if folders else linked.pop()
        first = visited.setdefault((info.st_dev, info.st_ino), folder)
        if first != folder:
            loop = folder.startswith(first.rstrip(os.sep) + os.sep)
            reason = (
                f"symlink loop back to {first}" if loop else f"folder already scanned as {first}"
            )
            result.failed.append((folder, reason))
            continue
        real, links = _scan_folder_entries(folder, result, follow_symlinks, max_file_bytes)
        folders.extend(reversed(real))
        linked.extend(reversed(links))
    return result


def _scan_folder_entries(
    folder: str, result: ScanResult, follow_symlinks: bool, max_file_bytes: int | None
) -> tuple[list[tuple[str, os.stat_result]], list[tuple[str, os.stat_result]]]:
    """Scan one folder into ``result``; returns its real sub-folders and those reached
    through symlinks, sorted by name."""
    try:
        with os.scandir(folder) as listing:
            entries = sorted(listing, key=lambda e: e.name)
    except OSError as error:
        result.failed.append((folder, f"cannot read folder ({_why(error)})"))
        return [], []
    real: list[tuple[str, os.stat_result]] = []
    links: list[tuple[str, os.stat_result]] = []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        path = os.path.join(folder, entry.name)
        image = is_image_name(entry.name)
        link = False
        try:
            link = entry.is_symlink()
            if not link and entry.is_dir(follow_symlinks=False):
                real.append((path, entry.stat(follow_symlinks=False)))
                continue
            if not (image or link):
                continue
            if link and not follow_symlinks:
                if image:
                    result.failed.append((path, "symlink not followed"))
                elif os.path.isdir(path):
                    result.failed.append((path, "symlink to a folder not followed"))
                continue
            info = os.stat(path)  # follows symlinks: the file that would be read
        except OSError as error:
            if image:
                result.failed.append((path, _stat_failure(path, error, link)))
            continue
        if stat.S_ISDIR(info.st_mode):
            (links if link else real).append((path, info))
        elif image:
            problem = _file_problem(info, max_file_bytes)
            if problem is None:
                result.files[path] = info
            else:
                result.failed.append((path, problem))
    return real, links


def _why(error: OSError) -> str:
    return error.strerror or str(error)


def _stat_failure(path: str, error: OSError, link: bool) -> str:
    """Why an entry that was listed cannot be read."""
    if error.errno == errno.ELOOP:
        return "symlink loop"
    if isinstance(error, FileNotFoundError):
        if link:
            try:
                return f"dangling symlink (its target {os.readlink(path)} does not exist)"
            except OSError:
                return "dangling symlink (its target does not exist)"
        return "no such file: deleted or moved after the folder was listed"
    if isinstance(error, PermissionError):
        return "permission denied"
    return f"cannot access file ({_why(error)})"


_SPECIAL_FILES = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a folder"),
)


def _file_problem(info: os.stat_result, max_file_bytes: int | None) -> str | None:
    """Why a file with this stat is not read, or None: only regular files within the limit."""
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for test, name in _SPECIAL_FILES if test(info.st_mode)), "special")
        return f"not a regular file: {kind}"
    if max_file_bytes is not None and info.st_size > max_file_bytes:
        return f"larger than the {format_size(max_file_bytes)} limit ({format_size(info.st_size)})"
    return None


def scan_folder(root: Path) -> Iterator[Path]:
    """Image files below ``root`` by suffix, skipping hidden files and folders and every
    entry :func:`scan_images` reports (with no size limit), in folder order."""
    for path in scan_images(root, max_file_bytes=None).files:
        yield Path(path)


def decode_file(path: str, config: PreprocessConfig, local: SiftConfig | None = None) -> Decoded:
    """Read a file once: hash its bytes, take its size, decode and resize it for the model,
    and extract its local features from the same decoded image when ``local`` is given.

    Only a regular file is read: the file is opened without blocking and the opened
    descriptor checked, so a FIFO or device swapped in after the folder was scanned is
    reported instead of hanging or reading forever; everything else is read from that
    descriptor too."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as error:
        return Decoded(path, error=_open_failure(error))
    try:
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(handle.fileno())
            problem = _file_problem(info, None)
            if problem is not None:
                return Decoded(path, error=problem)
            data = handle.read()
            _load_plugin(path)
            # The header is read through the open descriptor, never the path again.
            width, height = image_size(_descriptor_path(handle.fileno(), path))
        # SIFT wants more pixels than the encoder: let libjpeg shrink less when it runs.
        draft = config.resolution if local is None else max(config.resolution, local.max_side)
        image = load_image(io.BytesIO(data), draft_size=draft)
        pixels = resize_for_model(image, config)
        features = None
        if local is not None:
            from lookalike.local.features import extract

            features = extract(image, local).to_bytes()
    except ImageError as error:
        return Decoded(path, error=_decode_failure(path, error))
    except OSError as error:
        return Decoded(path, error=error.strerror or str(error))
    record = ImageRecord(
        path=path,
        content_hash=hashlib.sha256(data).hexdigest(),
        size=info.st_size,
        mtime=info.st_mtime,
        width=width,
        height=height,
    )
    return Decoded(path, record=record, pixels=pixels, local_features=features)


def _open_failure(error: OSError) -> str:
    if isinstance(error, FileNotFoundError):
        return "no such file: deleted or moved before it could be read"
    if isinstance(error, PermissionError):
        return "permission denied"
    if error.errno == errno.ELOOP:
        return "symlink loop"
    if isinstance(error, IsADirectoryError):
        return "not a regular file: a folder"
    return f"cannot open file ({_why(error)})"


@functools.cache
def _descriptor_folder() -> str | None:
    """Where an open descriptor can be opened again by name (Linux: ``/proc/self/fd``)."""
    return "/proc/self/fd" if os.path.isdir("/proc/self/fd") else None


def _descriptor_path(fd: int, path: str) -> str:
    """A name that opens the very file ``fd`` has open (the path itself where the system
    offers none; it was just checked, so only a swap within microseconds could differ)."""
    folder = _descriptor_folder()
    return f"{folder}/{fd}" if folder is not None else path


@functools.cache
def _load_plugin_module(suffix: str) -> None:
    module_name, register = _PLUGIN_MODULES[suffix]
    try:
        module = importlib.import_module(module_name)
        if register is not None:
            getattr(module, register)()
    except Exception:
        return  # a missing or broken plugin only means the file is reported as undecodable


def _load_plugin(path: str) -> None:
    """Register the Pillow plugin for ``path``'s format when Pillow lacks it and the plugin
    is installed (tried once per format)."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix in _PLUGIN_MODULES:
        from PIL import Image

        if suffix not in Image.registered_extensions():
            _load_plugin_module(suffix)


def _decode_failure(path: str, error: ImageError) -> str:
    """The reason a file did not decode, saying what to install when its format needs a
    plugin that Pillow lacks."""
    if not error.reason.startswith("not a recognized image format"):
        return error.reason
    suffix = os.path.splitext(path)[1].lower()
    from PIL import Image

    if suffix in PLUGIN_FORMATS and suffix not in Image.registered_extensions():
        name, advice = PLUGIN_FORMATS[suffix]
        return f"cannot decode {name}: {advice}"
    if suffix in RAW_SUFFIXES:
        return (
            f"unsupported image format: camera RAW ({suffix}) cannot be decoded; "
            "convert it to JPEG or TIFF"
        )
    return error.reason


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


@dataclass(frozen=True)
class IngestJob:
    """What an executor is asked to do: turn ``paths`` into batches of ``batch_size`` images
    with ``encoder`` (built here) or ``recipe`` (to build it elsewhere), extracting ``local``
    features when set."""

    paths: list[str]
    encoder: Encoder
    recipe: EncoderRecipe
    local: LocalFeatureKind | None
    batch_size: int


class IngestExecutor(Protocol):
    """Turns a job's file paths into batches; never writes the catalog."""

    def batches(self, job: IngestJob) -> Iterator[Batch]: ...


@dataclass(frozen=True)
class ThreadExecutor:
    """Decodes in ``workers`` threads of this process and embeds here (0 decodes inline)."""

    workers: int | None = None

    def batches(self, job: IngestJob) -> Iterator[Batch]:
        """Batches of the job's files, in order."""
        workers = min(os.cpu_count() or 1, 4) if self.workers is None else self.workers
        encoder, local = job.encoder, job.local
        sift = local.sift if local is not None else None
        pending: list[Decoded] = []
        decoded_ok = 0
        for decoded in decode_all(job.paths, encoder.preprocess, workers=workers, local=sift):
            pending.append(decoded)
            decoded_ok += decoded.error is None
            if decoded_ok >= job.batch_size:
                yield embed_batch(encoder, pending, local)
                pending, decoded_ok = [], 0
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

    def record_failures(self, failed: Iterable[tuple[str, str]], report: IndexReport) -> None:
        """List files that cannot be indexed (a scan's or a batch's) in the run's report and
        in the catalog, for ``info``."""
        for path, reason in failed:
            report.failed.append((path, reason))
            self.catalog.record_failure(path, reason)

    def store(
        self,
        batch: Batch,
        known: dict[str, FileState],
        report: IndexReport,
        local: LocalFeatureKind | None,
    ) -> list[int]:
        """Write one batch; returns the catalog ids of its images, in order."""
        self.record_failures(batch.failed, report)
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
