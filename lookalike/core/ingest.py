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
import os
import re
import stat
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from lookalike.catalog import Catalog, FileState, ImageRecord
from lookalike.core.derived import VectorIndexes
from lookalike.core.local_store import LocalFeatureKind, LocalFeatureStore
from lookalike.encoders.base import Encoder
from lookalike.encoders.preprocess import PreprocessConfig, resize_for_model
from lookalike.errors import DecompressionBombError, ImageError, LookalikeError
from lookalike.exif import photo_metadata
from lookalike.images import (
    DEFAULT_MAX_PIXELS,
    RAW_SUFFIXES,
    VECTOR_SUFFIXES,
    decoder_available,
    read_photo,
)
from lookalike.local.features import SiftConfig
from lookalike.local.pixels import Thumbnail

# Formats that Pillow decodes only when built with their library or given a plugin: scanned
# like the others, decoded when the decoder is there (``read_photo`` registers it), else
# reported with what to install.
PLUGIN_FORMATS: dict[str, tuple[str, str]] = {
    ".heic": ("HEIC", "install pillow-heif"),
    ".heif": ("HEIF", "install pillow-heif"),
    ".hif": ("HEIF", "install pillow-heif"),
    ".avif": ("AVIF", "install a Pillow built with AVIF support (Pillow 11.3+ wheels are)"),
    ".jxl": ("JPEG XL", "install pillow-jxl-plugin"),
}
# Camera RAW (rawpy) and SVG (refused with its reason) are scanned too, so that nothing a
# photo folder holds is skipped silently.
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".mpo", ".png", ".apng", ".gif", ".bmp", ".dib", ".tif",
     ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico",
     *PLUGIN_FORMATS, *RAW_SUFFIXES, *VECTOR_SUFFIXES}
)  # fmt: skip
# A RAW file with a JPEG of the same stem beside it is skipped (the camera wrote both).
JPEG_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif"})

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
    # Files found renamed or moved since the last run (same bytes): their paths were updated,
    # nothing embedded again.
    moved: int = 0
    # Files and folders left out on purpose (hidden, system, excluded, RAW beside a JPEG),
    # with the reason: not failures.
    skipped: list[tuple[str, str]] = field(default_factory=list)
    # Images indexed before lookalike kept thumbnails that got one this run (read, not
    # embedded again).
    thumbnails: int = 0
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
    ``local_features`` holds its serialised SIFT features when they were asked for;
    ``thumbnail`` its serialised grayscale thumbnail (:mod:`lookalike.local.pixels`)."""

    path: str
    record: ImageRecord | None = None
    pixels: np.ndarray | None = None
    error: str | None = None
    local_features: bytes | None = None
    thumbnail: bytes | None = None


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
    once, following symlinks), the entries that cannot be indexed with the reason, and those
    the :class:`ScanRules` leave out on purpose (hidden, system or excluded folders and files,
    RAW files with a JPEG beside them) with the reason."""

    files: dict[str, os.stat_result] = field(default_factory=dict)
    failed: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def is_image_name(name: str) -> bool:
    """Whether a file name has a suffix the scan looks at (any case), hidden files excluded."""
    return not name.startswith(".") and has_image_suffix(name)


def has_image_suffix(name: str) -> bool:
    """Whether a file name has a suffix the scan looks at, in any case."""
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


# The ignore file an indexed folder may hold: one glob per line, like --exclude.
IGNORE_FILE = ".lookalikeignore"
# Folders that tools, NASes and operating systems fill with copies, thumbnails and deleted
# files: never photos of the library, skipped even with ``include_hidden`` (matched in any case).
SYSTEM_FOLDERS = frozenset(
    {".git", ".hg", ".svn", "@eadir", ".thumbnails", "$recycle.bin", "system volume information",
     ".trash", ".trashes", ".spotlight-v100", ".fseventsd", ".appledouble", "__macosx",
     "#recycle", "@recycle", "#snapshot", ".@__thumb", "lost+found", ".lookalike"}
)  # fmt: skip
DEFAULT_MAX_MEGAPIXELS = DEFAULT_MAX_PIXELS / 1_000_000


@dataclass(frozen=True)
class ExcludePattern:
    """One compiled exclude pattern (gitignore-like, see :class:`ScanRules`): ``text`` as
    given, ``origin`` where it came from (``--exclude`` or the ignore file)."""

    text: str
    origin: str
    regex: re.Pattern[str]
    negate: bool
    folders_only: bool
    anchored: bool

    def matches(self, parts: tuple[str, ...], is_dir: bool) -> bool:
        """Whether it matches the entry at ``parts`` (its names below the root)."""
        if self.folders_only and not is_dir:
            return False
        text = "/".join(parts) if self.anchored else parts[-1]
        return self.regex.fullmatch(text) is not None


@functools.lru_cache(maxsize=1024)
def _glob(text: str, origin: str) -> ExcludePattern:
    pattern = text.strip()
    negate = pattern.startswith("!")
    pattern = pattern[1:] if negate else pattern
    folders_only = pattern.endswith("/")
    pattern = pattern.rstrip("/")
    anchored = "/" in pattern
    pattern = pattern.lstrip("/")
    if not pattern:
        raise LookalikeError(f"{origin}: {text!r} is not a pattern")
    try:
        regex = re.compile(_glob_regex(pattern), re.IGNORECASE | re.DOTALL)
    except re.error as error:
        raise LookalikeError(f"{origin}: bad pattern {text!r} ({error})") from error
    return ExcludePattern(text.strip(), origin, regex, negate, folders_only, anchored)


def _glob_regex(pattern: str) -> str:
    """The regular expression of a glob: ``*`` and ``?`` stay within a name, ``**`` crosses
    folders, ``[...]`` is a class (``[!...]`` negated)."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2 :]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1 : end]
            body = "^" + body[1:] if body.startswith("!") else body
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


def read_ignore_file(root: str | Path) -> tuple[str, ...]:
    """The patterns of ``root``'s ``.lookalikeignore`` (none when it has none): one per line,
    blank lines and ``#`` comments left out. Raises ``OSError`` when it exists but cannot be
    read. Read again only when the file changed (asked once per file event by a watcher)."""
    path = os.path.join(os.fspath(root), IGNORE_FILE)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return ()
    return _ignore_patterns(path, info.st_ino, info.st_mtime_ns, info.st_size)


@functools.lru_cache(maxsize=64)
def _ignore_patterns(path: str, inode: int, mtime_ns: int, size: int) -> tuple[str, ...]:
    """The patterns of the ignore file ``path`` as it was at that inode, time and size."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError:
        return ()
    except UnicodeDecodeError as error:
        raise LookalikeError(f"{path}: not UTF-8 text") from error
    return tuple(line.strip() for line in lines if line.strip() and not line.startswith("#"))


@dataclass(frozen=True)
class ScanRules:
    """What an index run leaves out on purpose, and the megapixel cap.

    By default hidden files and folders (names starting with a dot) and system folders
    (:data:`SYSTEM_FOLDERS`: ``.git``, ``@eaDir``, ``.thumbnails``, ``$RECYCLE.BIN``...) are
    skipped, and so is a camera RAW file with a JPEG of the same name (any case) beside it,
    as the camera wrote both (``raw_with_jpeg=True`` indexes both). ``exclude`` holds globs,
    gitignore-like and matched in any case: a pattern without ``/`` matches a file or folder
    name at any depth (``*.tmp.jpg``, ``drafts``); one with ``/`` matches the path relative to
    the indexed folder (``2019/raw``, ``**/exports/*.jpg``); a trailing ``/`` matches folders
    only; a leading ``!`` takes back an earlier match; a folder's match covers everything in
    it. The indexed folder's ``.lookalikeignore`` adds its lines after these. Images above
    ``max_megapixels`` (None: Pillow's own limit only) are reported with their size.
    """

    exclude: tuple[str, ...] = ()
    include_hidden: bool = False
    raw_with_jpeg: bool = False
    max_megapixels: float | None = DEFAULT_MAX_MEGAPIXELS

    def __post_init__(self) -> None:
        if isinstance(self.exclude, str) or not all(isinstance(g, str) for g in self.exclude):
            raise LookalikeError(f"exclude must be a sequence of globs, got {self.exclude!r}")
        object.__setattr__(self, "exclude", tuple(self.exclude))
        for text in self.exclude:
            _glob(text, "--exclude")  # a bad pattern is refused now, not mid-run
        cap = self.max_megapixels
        if cap is not None and (
            isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0
        ):
            raise LookalikeError(f"max_megapixels must be a positive number, got {cap!r}")

    @property
    def max_pixels(self) -> int:
        """The megapixel cap in pixels (without a cap: more than any image has)."""
        if self.max_megapixels is None:
            return 2**62
        return max(1, round(self.max_megapixels * 1_000_000))

    def globs(self, root: str | Path) -> tuple[ExcludePattern, ...]:
        """The compiled patterns that apply below ``root``: ``exclude``, then the ignore
        file's (an unreadable ignore file raises ``OSError``)."""
        ignore = f"{IGNORE_FILE} in {os.fspath(root)}"
        return (
            *(_glob(text, "--exclude") for text in self.exclude),
            *(_glob(text, ignore) for text in read_ignore_file(root)),
        )

    def skip_reason(self, root: str, path: str, is_dir: bool) -> str | None:
        """Why the file or folder ``path`` below the indexed folder ``root`` is left out, or
        None when it is not: hidden, a system folder, an exclude pattern, a RAW file with a
        JPEG beside it. Every folder between ``root`` and ``path`` is checked too."""
        relative = os.path.relpath(path, root)
        if relative == "." or relative.startswith(".." + os.sep) or relative == "..":
            return None
        parts = tuple(relative.split(os.sep))
        try:
            globs = self.globs(root)
        except OSError:
            globs = self.globs_without_ignore_file()
        for depth in range(1, len(parts) + 1):
            last = depth == len(parts)
            reason = self._reason(parts[:depth], is_dir or not last, globs)
            if reason is not None:
                return reason if last else f"inside a skipped folder ({reason})"
        if is_dir or self.raw_with_jpeg or not _is_raw_name(parts[-1]):
            return None
        return self._raw_pair_reason(path, _jpeg_siblings(os.path.dirname(path)))

    def globs_without_ignore_file(self) -> tuple[ExcludePattern, ...]:
        """The ``exclude`` patterns alone, compiled."""
        return tuple(_glob(text, "--exclude") for text in self.exclude)

    def _reason(
        self, parts: tuple[str, ...], is_dir: bool, globs: Iterable[ExcludePattern]
    ) -> str | None:
        """Why the entry at ``parts`` (relative to the root) is skipped, looking at its own
        name and the patterns only (its folders were checked already)."""
        name = parts[-1]
        if is_dir and name.lower() in SYSTEM_FOLDERS:
            return f"system folder {name}"
        if name.startswith(".") and not self.include_hidden:
            return f"hidden {'folder' if is_dir else 'file'} {name}"
        excluded: ExcludePattern | None = None
        for glob in globs:
            if glob.matches(parts, is_dir):
                excluded = None if glob.negate else glob
        if excluded is not None:
            return f"excluded by pattern {excluded.text!r} ({excluded.origin})"
        return None

    def _raw_pair_reason(self, path: str, jpegs: dict[str, str]) -> str | None:
        if self.raw_with_jpeg:
            return None
        stem, suffix = os.path.splitext(os.path.basename(path))
        jpeg = jpegs.get(stem.lower()) if suffix.lower() in RAW_SUFFIXES else None
        if jpeg is None:
            return None
        return f"RAW file with a JPEG beside it ({jpeg}); raw_with_jpeg indexes both"


def _is_dir(entry: os.DirEntry[str]) -> bool:
    """Whether ``entry`` is a folder or a symlink to one; False when that cannot be told (a
    symlink loop: reported when it is read)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _is_raw_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in RAW_SUFFIXES


def _jpeg_names(names: Iterable[str]) -> dict[str, str]:
    """Lower-cased stem -> name of the JPEG files among ``names``."""
    jpegs: dict[str, str] = {}
    for name in names:
        stem, suffix = os.path.splitext(name)
        if suffix.lower() in JPEG_SUFFIXES:
            jpegs.setdefault(stem.lower(), name)
    return jpegs


def _jpeg_siblings(folder: str) -> dict[str, str]:
    try:
        return _jpeg_names(os.listdir(folder or "."))
    except OSError:
        return {}


def scan_images(
    root: str | Path,
    *,
    follow_symlinks: bool = True,
    max_file_bytes: int | None = DEFAULT_MAX_FILE_BYTES,
    rules: ScanRules | None = None,
) -> ScanResult:
    """Image files below ``root`` by suffix (any case), leaving out what ``rules`` skip
    (default :class:`ScanRules`: hidden files and folders, system folders, RAW files with a
    JPEG beside them; plus ``root``'s ``.lookalikeignore``), listed in ``skipped``.

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
    rules = rules or ScanRules()
    result = ScanResult()
    top = os.fspath(root)
    try:
        info = os.stat(top)
    except OSError as error:
        result.failed.append((top, f"cannot read folder ({_why(error)})"))
        return result
    try:
        globs = rules.globs(top)
    except OSError as error:
        result.failed.append(
            (os.path.join(top, IGNORE_FILE), f"cannot read ignore file ({_why(error)})")
        )
        globs = rules.globs_without_ignore_file()
    scan = _FolderScan(result, follow_symlinks, max_file_bytes, rules, globs)
    visited: dict[tuple[int, int], str] = {}
    folders: list[_Folder] = [(top, info, ())]
    linked: list[_Folder] = []  # scanned after every real folder
    while folders or linked:
        folder, info, parts = folders.pop() if folders else linked.pop()
        first = visited.setdefault((info.st_dev, info.st_ino), folder)
        if first != folder:
            loop = folder.startswith(first.rstrip(os.sep) + os.sep)
            reason = (
                f"symlink loop back to {first}" if loop else f"folder already scanned as {first}"
            )
            result.failed.append((folder, reason))
            continue
        real, links = scan.folder(folder, parts)
        folders.extend(reversed(real))
        linked.extend(reversed(links))
    return result


# A folder to scan: its path, its stat, and its names below the root.
_Folder = tuple[str, os.stat_result, tuple[str, ...]]


@dataclass(frozen=True)
class _FolderScan:
    """Scans one folder at a time into ``result``, by the run's rules."""

    result: ScanResult
    follow_symlinks: bool
    max_file_bytes: int | None
    rules: ScanRules
    globs: tuple[ExcludePattern, ...]

    def folder(self, folder: str, parts: tuple[str, ...]) -> tuple[list[_Folder], list[_Folder]]:
        """Scan ``folder`` (``parts`` below the root); returns its real sub-folders and those
        reached through symlinks, sorted by name."""
        result = self.result
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError as error:
            result.failed.append((folder, f"cannot read folder ({_why(error)})"))
            return [], []
        jpegs = _jpeg_names(e.name for e in entries) if not self.rules.raw_with_jpeg else {}
        real: list[_Folder] = []
        links: list[_Folder] = []
        for entry in entries:
            path = os.path.join(folder, entry.name)
            names = (*parts, entry.name)
            image = has_image_suffix(entry.name)
            is_dir = _is_dir(entry)
            skip = self.rules._reason(names, is_dir, self.globs)
            if skip is None and image and not is_dir and jpegs:
                skip = self.rules._raw_pair_reason(path, jpegs)
            if skip is not None:
                if image or is_dir:
                    result.skipped.append((path, skip))
                continue
            link = False
            try:
                link = entry.is_symlink()
                if not link and entry.is_dir(follow_symlinks=False):
                    real.append((path, entry.stat(follow_symlinks=False), names))
                    continue
                if not (image or link):
                    continue
                if link and not self.follow_symlinks:
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
                (links if link else real).append((path, info, names))
            elif image:
                problem = _file_problem(info, self.max_file_bytes)
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


def scan_folder(root: Path, rules: ScanRules | None = None) -> Iterator[Path]:
    """Image files below ``root`` by suffix, leaving out what ``rules`` skip (hidden files
    and folders by default) and every entry :func:`scan_images` reports (with no size
    limit), in folder order."""
    for path in scan_images(root, max_file_bytes=None, rules=rules).files:
        yield Path(path)


def decode_file(
    path: str,
    config: PreprocessConfig,
    local: SiftConfig | None = None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Decoded:
    """Read a file once: hash its bytes, take its size, decode (:func:`read_photo`: HEIC,
    AVIF, JPEG XL and RAW too) and resize it for the model, and extract its local features
    from the same decoded image when ``local`` is given. Images above ``max_pixels`` are
    reported with their size and the cap.

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
        # SIFT wants more pixels than the encoder: let the decoder shrink less when it runs.
        draft = config.resolution if local is None else max(config.resolution, local.max_side)
        photo = read_photo(data, name=path, max_pixels=max_pixels, draft_size=draft)
        width, height = photo.size
        image = photo.image
        pixels = resize_for_model(image, config)
        thumbnail = Thumbnail.of(image).to_bytes()
        features = None
        if local is not None:
            from lookalike.local.features import extract

            features = extract(image, local).to_bytes()
    except ImageError as error:
        return Decoded(path, error=_decode_failure(path, error, max_pixels))
    except OSError as error:
        return Decoded(path, error=error.strerror or str(error))
    record = ImageRecord(
        path=path,
        content_hash=hashlib.sha256(data).hexdigest(),
        size=info.st_size,
        mtime=info.st_mtime,
        width=width,
        height=height,
        metadata=photo_metadata(photo),  # EXIF and XMP, from the same read
    )
    return Decoded(path, record=record, pixels=pixels, local_features=features, thumbnail=thumbnail)


def content_hash(path: str) -> str | None:
    """The SHA-256 of a file's bytes, as the catalog stores it (``decode_file`` hashes the
    bytes it decodes the same way), or None when the file cannot be read: the ingest
    pipeline reports why when it reads the file."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


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


_TOO_LARGE = re.compile(r"(\d+)x(\d+) = (\d+) pixels")


def _decode_failure(path: str, error: ImageError, max_pixels: int) -> str:
    """The reason a file did not decode: its size against the megapixel cap, what to install
    when its format needs a decoder that is missing, else the decoder's own reason."""
    if isinstance(error, DecompressionBombError):
        cap = f"the {max_pixels / 1e6:g}-megapixel cap (max_megapixels)"
        size = _TOO_LARGE.search(error.reason)
        if size is None:
            return f"too large for {cap}: {error.reason}"
        width, height, pixels = (int(g) for g in size.groups())
        return f"too large: {width}x{height} is {pixels / 1e6:.1f} megapixels, over {cap}"
    if not error.reason.startswith("not a recognized image format"):
        return error.reason
    suffix = os.path.splitext(path)[1].lower()
    if suffix in PLUGIN_FORMATS and not decoder_available(suffix):
        name, advice = PLUGIN_FORMATS[suffix]
        return f"cannot decode {name}: {advice}"
    return error.reason


def _decode_chunk(
    paths: list[str], config: PreprocessConfig, local: SiftConfig | None, max_pixels: int
) -> list[Decoded]:
    return [decode_file(p, config, local, max_pixels=max_pixels) for p in paths]


def decode_all(
    paths: list[str],
    config: PreprocessConfig,
    *,
    workers: int,
    chunk: int = 8,
    local: SiftConfig | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    processes: bool = False,
) -> Iterator[Decoded]:
    """Decoded files in input order, from ``workers`` threads (0 decodes inline), or worker
    processes with ``processes``; images above ``max_pixels`` are reported.

    Threads by default: JPEG decoding, resizing and hashing release the GIL, so threads
    decode in parallel with inference without pickling pixels between processes (measured
    faster on 2 cores than a process pool). Processes when a GPU embeds: it takes batches
    faster than this process's threads decode them (the Python parts of decoding hold the
    GIL), and the pixels it needs are small (224 x 224 x 3 bytes an image). At most a few
    chunks per worker are in flight, so memory stays flat however many files there are.
    """
    if workers <= 0:
        for path in paths:
            yield decode_file(path, config, local, max_pixels=max_pixels)
        return
    pool: Executor
    if processes:
        import multiprocessing

        # Spawned, not forked: this process may hold a CUDA context and threads, which a
        # forked child would inherit broken.
        context = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(workers, mp_context=context)
    else:
        pool = ThreadPoolExecutor(workers, thread_name_prefix="lookalike-decode")
    with pool:
        pending: deque[Future[list[Decoded]]] = deque()
        for start in range(0, len(paths), chunk):
            part = paths[start : start + chunk]
            pending.append(pool.submit(_decode_chunk, part, config, local, max_pixels))
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
    their vectors in the same order, their local features when asked for, their
    thumbnails, and the files that failed with the reason."""

    decoded: list[Decoded]
    vectors: np.ndarray
    local_features: list[bytes | None] | None = None
    failed: list[tuple[str, str]] = field(default_factory=list)
    thumbnails: list[bytes | None] = field(default_factory=list)

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
    return Batch(slim, vectors, features, failed, [d.thumbnail for d in good])


@dataclass(frozen=True)
class IngestJob:
    """What an executor is asked to do: turn ``paths`` into batches of ``batch_size`` images
    with ``encoder`` (built here) or ``recipe`` (to build it elsewhere), extracting ``local``
    features when set, and reporting images above ``max_pixels``."""

    paths: list[str]
    encoder: Encoder
    recipe: EncoderRecipe
    local: LocalFeatureKind | None
    batch_size: int
    max_pixels: int = DEFAULT_MAX_PIXELS


class IngestExecutor(Protocol):
    """Turns a job's file paths into batches; never writes the catalog."""

    def batches(self, job: IngestJob) -> Iterator[Batch]: ...


@dataclass(frozen=True)
class ThreadExecutor:
    """Decodes in ``workers`` threads of this process (0 decodes inline) and embeds here.

    ``processes`` decodes in ``workers`` worker processes instead; None (the default)
    decides: processes when the encoder runs its batches on a GPU, threads on the CPU."""

    workers: int | None = None
    processes: bool | None = None

    def batches(self, job: IngestJob) -> Iterator[Batch]:
        """Batches of the job's files, in order."""
        from lookalike.encoders.devices import runs_on_gpu

        encoder, local = job.encoder, job.local
        processes = runs_on_gpu(encoder) if self.processes is None else self.processes
        # A GPU takes batches faster than 4 decoders feed it: one decoder per core then.
        limit = (os.cpu_count() or 1) if processes else min(os.cpu_count() or 1, 4)
        workers = limit if self.workers is None else self.workers
        sift = local.sift if local is not None else None
        pending: list[Decoded] = []
        decoded_ok = 0
        decoding = decode_all(
            job.paths,
            encoder.preprocess,
            workers=workers,
            local=sift,
            max_pixels=job.max_pixels,
            processes=processes,
        )
        for decoded in decoding:
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
        hashes = {i: r.content_hash for i, r in zip(ids, records, strict=True)}
        if local is not None and batch.local_features is not None:
            self.local_store.save(local.name, ids, batch.local_features, hashes)
        if batch.thumbnails:
            self.local_store.save_thumbnails(ids, batch.thumbnails, hashes)
        updated = sum(1 for d in batch.decoded if d.path in known)
        report.updated += updated
        report.added += len(batch.decoded) - updated
        return ids
