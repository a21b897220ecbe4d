"""The one file format every index backend saves to.

Layout (all integers little-endian)::

    magic      8 bytes   b"LKLIDX\\r\\n" (the CR/LF catches text-mode mangling)
    length     uint32    byte length of the JSON header
    crc32      uint32    CRC-32 of the JSON header bytes
    header     JSON      format, version, backend, spec, dim, metric, count, options, state,
                         and one entry per payload section (name, dtype, shape, offset, nbytes,
                         crc32)
    padding    zeros up to a 64-byte boundary
    payload    the sections' raw bytes, each starting on a 64-byte boundary

Everything a loader needs is in the header, so ``load_index(path)`` takes no arguments. Every
byte is covered by a checksum and the file size must match the header exactly, so truncation,
bit flips and trailing garbage are all reported as :class:`CorruptIndexError` instead of being
used. Payloads are plain numeric arrays (faiss/annoy structures are stored as byte arrays), so
loading never unpickles anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lookalike.errors import CorruptIndexError, StorageError, VectorIndexError

FORMAT_NAME = "lookalike.index"
FORMAT_VERSION = 1
MAGIC = b"LKLIDX\r\n"
_PREFIX = struct.Struct("<8sII")
_ALIGN = 64
_MAX_HEADER_BYTES = 16 * 1024 * 1024
# Only plain little-endian numeric dtypes: nothing that could need pickle to rebuild.
_DTYPES = frozenset({"<f2", "<f4", "<f8", "<i4", "<i8", "<u4", "<u8", "|u1", "|b1"})


@dataclass(frozen=True)
class IndexFile:
    """A parsed index file: its JSON header and its named arrays."""

    header: dict[str, Any]
    arrays: dict[str, np.ndarray]

    @property
    def backend(self) -> str:
        return str(self.header["backend"])

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.header["options"])

    @property
    def state(self) -> dict[str, Any]:
        return dict(self.header["state"])

    def array(self, name: str) -> np.ndarray:
        """A named section; a missing one means the file is not what its header claims."""
        try:
            return self.arrays[name]
        except KeyError:
            raise CorruptIndexError(f"index file lacks the {name!r} section") from None


def _aligned(offset: int) -> int:
    return -(-offset // _ALIGN) * _ALIGN


def _as_bytes(array: np.ndarray) -> memoryview:
    # ``.data`` is ``memoryview(...)`` of the array (numpy types ``__buffer__`` for 3.12+ only).
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8).data


def write_index_file(
    path: str | Path,
    *,
    backend: str,
    spec: str,
    dim: int,
    metric: str,
    count: int,
    options: dict[str, Any],
    state: dict[str, Any],
    arrays: dict[str, np.ndarray],
    metadata: dict[str, Any] | None = None,
) -> None:
    """Write an index file atomically: a temporary file in the same folder, synced to disk,
    then renamed over ``path``. When that fails (a full disk, a read-only folder) the
    temporary file is removed, an older file at ``path`` is left as it was, and
    :class:`StorageError` names ``path``.

    ``metadata`` is the owner's JSON (e.g. which catalog state the index reflects); it comes
    back from :func:`read_index_header` without reading the payload.
    """
    path = Path(path)
    sections = []
    prepared = []
    offset = 0
    for name, raw in arrays.items():
        array = np.ascontiguousarray(raw)
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        if array.dtype.str not in _DTYPES:
            raise VectorIndexError(f"cannot store a {array.dtype} array in an index file")
        data = _as_bytes(array)
        sections.append(
            {
                "name": name,
                "dtype": array.dtype.str,
                "shape": list(array.shape),
                "offset": offset,
                "nbytes": data.nbytes,
                "crc32": zlib.crc32(data),
            }
        )
        prepared.append((offset, data))
        offset = _aligned(offset + data.nbytes)
    header = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "backend": backend,
        "spec": spec,
        "dim": int(dim),
        "metric": metric,
        "count": int(count),
        "options": options,
        "state": state,
        "metadata": metadata or {},
        "sections": sections,
        "payload_bytes": offset,
    }
    header_bytes = json.dumps(header, sort_keys=True).encode("utf-8")
    start = _aligned(_PREFIX.size + len(header_bytes))
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(_PREFIX.pack(MAGIC, len(header_bytes), zlib.crc32(header_bytes)))
            handle.write(header_bytes)
            for section_offset, data in prepared:
                handle.write(b"\0" * (start + section_offset - handle.tell()))
                handle.write(data)
            handle.write(b"\0" * (start + offset - handle.tell()))
            handle.flush()
            os.fsync(handle.fileno())  # on disk before it replaces the old file
        os.replace(temporary, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise StorageError.from_os_error(error, path) from error
        raise
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: not every system can open a folder)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _require(condition: bool, path: Path, reason: str) -> None:
    if not condition:
        raise CorruptIndexError(f"{path}: {reason}")


def read_index_file(path: str | Path) -> IndexFile:
    """Read and verify an index file; any inconsistency raises CorruptIndexError."""
    path = Path(path)
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed below, after a size check
    except OSError as error:
        raise VectorIndexError(f"{path}: cannot open index file ({error})") from error
    with handle:
        size = os.fstat(handle.fileno()).st_size
        header, start = _read_header(handle, size, path)
        _require(
            size == start + header["payload_bytes"],
            path,
            f"file is {size} bytes but its header describes {start + header['payload_bytes']}"
            " (truncated or trailing data)",
        )
        arrays = {}
        for section in header["sections"]:
            array = _read_section(handle, section, start, header["payload_bytes"], path)
            arrays[section["name"]] = array
    return IndexFile(header, arrays)


def read_index_header(path: str | Path) -> dict[str, Any]:
    """The verified JSON header of an index file, without reading its payload."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            return _read_header(handle, os.fstat(handle.fileno()).st_size, path)[0]
    except OSError as error:
        raise VectorIndexError(f"{path}: cannot open index file ({error})") from error


def verify_index_file(path: str | Path, *, chunk_bytes: int = 16 * 1024 * 1024) -> dict[str, Any]:
    """Verify every checksum and size of an index file without loading its payload (read in
    chunks of ``chunk_bytes``); returns its header. Raises as :func:`read_index_file` does."""
    path = Path(path)
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed below, after a size check
    except OSError as error:
        raise VectorIndexError(f"{path}: cannot open index file ({error})") from error
    with handle:
        size = os.fstat(handle.fileno()).st_size
        header, start = _read_header(handle, size, path)
        payload = header["payload_bytes"]
        _require(
            size == start + payload,
            path,
            f"file is {size} bytes but its header describes {start + payload}"
            " (truncated or trailing data)",
        )
        for section in header["sections"]:
            name, offset, nbytes = _section_extent(section, payload, path)
            handle.seek(start + offset)
            crc, left = 0, nbytes
            while left:
                block = handle.read(min(left, chunk_bytes))
                _require(len(block) > 0, path, f"section {name!r} is truncated")
                crc = zlib.crc32(block, crc)
                left -= len(block)
            _require(crc == section["crc32"], path, f"section {name!r} checksum mismatch")
    return header


def _read_header(handle: Any, size: int, path: Path) -> tuple[dict[str, Any], int]:
    """The header and the payload's start offset; the handle is left after the header."""
    prefix = handle.read(_PREFIX.size)
    _require(len(prefix) == _PREFIX.size, path, "too short to be an index file")
    magic, header_length, header_crc = _PREFIX.unpack(prefix)
    _require(magic == MAGIC, path, "not a lookalike index file (bad magic bytes)")
    _require(
        header_length <= min(_MAX_HEADER_BYTES, size - _PREFIX.size),
        path,
        "truncated header",
    )
    header_bytes = handle.read(header_length)
    _require(zlib.crc32(header_bytes) == header_crc, path, "header checksum mismatch")
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptIndexError(f"{path}: unreadable header ({error})") from error
    _check_header(header, path)
    return header, _aligned(_PREFIX.size + header_length)


def _check_header(header: Any, path: Path) -> None:
    _require(isinstance(header, dict), path, "header is not a JSON object")
    _require(header.get("format") == FORMAT_NAME, path, "not a lookalike index file")
    version = header.get("version")
    _require(isinstance(version, int), path, "header has no format version")
    _require(
        version <= FORMAT_VERSION,
        path,
        f"written in format version {version}; this lookalike reads up to {FORMAT_VERSION}",
    )
    for key, kind in (
        ("backend", str),
        ("spec", str),
        ("dim", int),
        ("metric", str),
        ("count", int),
        ("options", dict),
        ("state", dict),
        ("sections", list),
        ("payload_bytes", int),
    ):
        _require(isinstance(header.get(key), kind), path, f"header field {key!r} is missing")
    _require(header["dim"] > 0 and header["count"] >= 0, path, "header has impossible sizes")


def _section_extent(section: Any, payload_bytes: int, path: Path) -> tuple[str, int, int]:
    """(name, offset, nbytes) of a section entry that is consistent with its payload."""
    _require(isinstance(section, dict), path, "bad section entry")
    name, dtype, shape = section.get("name"), section.get("dtype"), section.get("shape")
    offset, nbytes, crc = section.get("offset"), section.get("nbytes"), section.get("crc32")
    _require(isinstance(name, str), path, "section without a name")
    _require(dtype in _DTYPES, path, f"section {name!r} has unsupported dtype {dtype!r}")
    _require(
        isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape),
        path,
        f"section {name!r} has a bad shape",
    )
    _require(
        isinstance(offset, int) and isinstance(nbytes, int) and isinstance(crc, int),
        path,
        f"section {name!r} has a bad offset or size",
    )
    expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    _require(
        nbytes == expected and offset >= 0 and offset + nbytes <= payload_bytes,
        path,
        f"section {name!r} does not fit the payload",
    )
    return name, offset, nbytes


def _read_section(
    handle: Any, section: Any, start: int, payload_bytes: int, path: Path
) -> np.ndarray:
    name, offset, nbytes = _section_extent(section, payload_bytes, path)
    result = np.empty(section["shape"], dtype=np.dtype(section["dtype"]))
    view = _as_bytes(result)
    handle.seek(start + offset)
    _require(handle.readinto(view) == nbytes, path, f"section {name!r} is truncated")
    _require(zlib.crc32(view) == section["crc32"], path, f"section {name!r} checksum mismatch")
    return result
