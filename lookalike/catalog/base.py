"""What every catalog offers, whichever database holds it, and how a location picks one.

A catalog is either one SQLite file (no server, one machine) or a PostgreSQL database that
several lookalike processes on several machines share. Both keep the same tables, reached
through the same versioned migrations, and answer the same calls the same way.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np

from lookalike.catalog.paths import from_catalog, to_catalog
from lookalike.encoders.base import EncoderIdentity
from lookalike.errors import CatalogError, CorruptVectorError, ModelMismatchError

POSTGRES_SCHEMES = ("postgresql://", "postgres://")

_T = TypeVar("_T")


@dataclass(frozen=True)
class ImageRecord:
    """One image file as the catalog stores it."""

    path: str
    content_hash: str
    size: int
    mtime: float
    width: int
    height: int
    metadata: dict[str, Any] = field(default_factory=dict)
    id: int | None = None


@dataclass(frozen=True)
class FileState:
    """What the catalog knows of a file, enough to tell whether it changed on disk."""

    id: int
    size: int
    mtime: float
    content_hash: str


@runtime_checkable
class Catalog(Protocol):
    """Images, their metadata, the models that embedded them and their vectors.

    ``generation`` is bumped by every change to images or vectors, by any process sharing the
    catalog; ``last_written_generation`` is the value this object's own latest change set,
    so a caller can tell whether anyone else wrote in between. ``state`` is the generation
    with a random token drawn afresh in the same transaction as every bump: a catalog restored
    from a backup and changed again reaches an old generation number, never an old state, so
    files derived from the catalog should be stamped with the whole state.
    ``last_written_state`` is the state this object's own latest change set.

    Every vector is stored with a checksum (CRC32 of its little-endian float32 bytes) that
    every read verifies: vectors changed outside lookalike or damaged on disk raise
    ``CorruptVectorError`` instead of being returned. ``verify_vectors`` lists them,
    ``drop_vectors`` forgets them so that they are embedded again, and ``integrity`` reports
    every problem found.

    Paths are any ``str``, including file names that are not valid UTF-8 (surrogate escapes,
    as ``os.fsdecode`` gives them): see :mod:`lookalike.catalog.paths`.
    """

    last_written_generation: int | None
    last_written_state: tuple[int, str] | None

    def close(self) -> None: ...
    def __enter__(self) -> Catalog: ...
    def __exit__(self, *exc: object) -> None: ...
    @property
    def location(self) -> str: ...
    @property
    def schema_version(self) -> int: ...
    @property
    def generation(self) -> int: ...
    @property
    def state(self) -> tuple[int, str]: ...
    def get_setting(self, key: str, default: str | None = None) -> str | None: ...
    def set_setting(self, key: str, value: str) -> None: ...
    def set_settings(self, values: Mapping[str, str | None]) -> None: ...
    def register_model(self, identity: EncoderIdentity) -> int: ...
    def models(self) -> list[dict[str, Any]]: ...
    def model_dim(self, model_id: int) -> int: ...
    def file_states(self, prefix: str = "") -> dict[str, FileState]: ...
    def file_states_by_hash(self, hashes: Iterable[str]) -> dict[str, FileState]:
        """Path -> stored state of every image whose content hash is one of ``hashes``
        (where a file that was moved may have been indexed before)."""
        ...

    def store(
        self, records: Sequence[ImageRecord], vectors: np.ndarray, model_id: int
    ) -> list[int]: ...
    def touch(self, image_id: int, size: int, mtime: float) -> None: ...
    def remove(self, ids: Iterable[int]) -> int: ...
    def move_paths(self, moves: Mapping[str, str]) -> dict[str, int]:
        """Rename catalogued files, old path -> new path, in one transaction: each keeps its
        id, vectors, local features and metadata (nothing is embedded again). Returns new
        path -> id of the images moved; an old path the catalog does not hold is skipped.

        The batch moves at once, so swaps and chains (a -> b, b -> a) work. A new path that
        holds another image not moved away in the same batch is replaced: that image is
        removed, which bumps the generation. A rename alone changes no vector, so, like
        metadata, it leaves the generation (and every derived file) as it was. Two old paths
        moved to one new path raise ``CatalogError``.
        """
        ...

    def move_path(self, old: str, new: str) -> int | None:
        """Rename one catalogued file (see :meth:`move_paths`); returns its id, or None
        when the catalog does not hold ``old``."""
        ...

    def ids_for_paths(self, paths: Iterable[str]) -> dict[str, int]: ...
    def images(self, ids: Sequence[int]) -> dict[int, ImageRecord]: ...
    def ids_missing_vectors(self, model_id: int) -> list[tuple[int, str]]: ...
    def vectors(self, model_id: int) -> tuple[np.ndarray, np.ndarray]: ...
    def vector(self, image_id: int, model_id: int) -> np.ndarray | None: ...
    def vectors_for(self, ids: Sequence[int], model_id: int) -> np.ndarray: ...
    def verify_vectors(self, model_id: int | None = None) -> list[int]: ...
    def drop_vectors(self, ids: Iterable[int], model_id: int) -> int: ...
    def drop_vectors_except(self, model_id: int) -> int: ...
    def integrity(self) -> list[str]: ...
    def count(self) -> int: ...
    def update_metadata(self, image_id: int, metadata: dict[str, Any]) -> None: ...
    def paths(self) -> dict[str, int]: ...
    def store_local_features(
        self,
        items: Sequence[tuple[int, str, bytes]],
        *,
        content_hashes: Mapping[int, str] | None = None,
    ) -> int:
        """Store (image id, kind, serialised features), replacing what an image had of that
        kind, in one transaction; returns how many rows were written.

        ``content_hashes`` (id -> the hash of the content the features were computed from)
        skips images whose content changed meanwhile, so a slow writer cannot store features
        of an old version. Features are dropped by the schema when an image's content hash
        changes and with the image itself. Unknown ids raise ``CatalogError``.
        """
        ...

    def local_features(self, ids: Iterable[int], kind: str) -> dict[int, bytes]: ...
    def ids_missing_local_features(self, kind: str) -> list[tuple[int, str]]: ...
    def ids_with_local_features(self, kind: str) -> list[int]: ...
    def local_features_summary(self) -> dict[str, tuple[int, int]]: ...
    def record_failure(self, path: str, reason: str) -> None: ...
    def failures(self) -> list[tuple[str, str]]: ...
    def clear_failures(self, paths: Iterable[str]) -> None: ...


def is_postgres_url(location: str | Path) -> bool:
    """Whether a catalog location names a PostgreSQL database rather than a SQLite file."""
    return isinstance(location, str) and location.lower().startswith(POSTGRES_SCHEMES)


def chunks(items: list[_T], size: int) -> Iterator[list[_T]]:
    """``items`` in consecutive slices of at most ``size``."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def checked_vectors(records: Sequence[ImageRecord], vectors: np.ndarray, dim: int) -> np.ndarray:
    """``vectors`` as float32, one row of the model's ``dim`` per record, else
    ``ModelMismatchError``."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.shape != (len(records), dim):
        raise ModelMismatchError(
            f"expected {len(records)} vectors of dim {dim} for this model, got {vectors.shape}"
        )
    return vectors


def vector_checksum(vector: np.ndarray) -> int:
    """The checksum stored with a vector: CRC32 of its little-endian float32 bytes."""
    return zlib.crc32(np.ascontiguousarray(vector, dtype="<f4").data)


def decode_checked(
    blobs: Sequence[bytes],
    checksums: Sequence[int],
    dim: int,
    *,
    header: int = 0,
    byte_order: str = "<",
) -> tuple[np.ndarray, np.ndarray]:
    """(float32 [n, dim], bool [n]): stored vector values decoded, and which of them fail:
    a wrong length, or a checksum (-1 for none) other than the values'. Values are ``header``
    bytes, then ``dim`` float32 in ``byte_order``; rows that fail may hold anything.

    One pass of CRC32 over the values, from C: about a quarter of the cost of reading them."""
    count = len(blobs)
    width = header + 4 * dim
    expected = np.fromiter(checksums, dtype=np.int64, count=count)
    sized = np.fromiter(map(len, blobs), dtype=np.int64, count=count) == width
    good = blobs if sized.all() else [b for b, ok in zip(blobs, sized, strict=True) if ok]
    # Copied row by row into one uninitialised buffer: faster than joining the values into
    # one bytes object and copying that again into a writable array.
    buffer = np.empty(len(good) * width, dtype=np.uint8)
    view = buffer.data
    for row, blob in enumerate(good):
        view[row * width : (row + 1) * width] = blob
    words = buffer.view(f"{byte_order}f4").reshape(len(good), width // 4)
    values = words[:, header // 4 :]
    matrix = values if header == 0 and values.dtype == np.float32 else values.astype(np.float32)
    # Raw little-endian float32 values are their own checksum input; else the decoded rows.
    raw = header == 0 and byte_order == "<"
    source = good if raw else np.ascontiguousarray(matrix, dtype="<f4")
    computed = np.fromiter(map(zlib.crc32, source), dtype=np.int64, count=len(good))
    failed = ~sized
    if len(good) == count:
        return matrix, computed != expected
    failed[sized] = computed != expected[sized]
    full = np.zeros((count, dim), dtype=np.float32)
    full[sized] = matrix
    return full, failed


def corrupt_vectors(location: str, ids: Iterable[int], model_id: int | None) -> CorruptVectorError:
    """The error for vectors of ``ids`` that failed their checksum."""
    bad = sorted({int(i) for i in ids})
    shown = ", ".join(map(str, bad[:10])) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
    model = "" if model_id is None else f" of model {model_id}"
    return CorruptVectorError(
        f"{location}: the stored vectors{model} of {len(bad)} image(s) (ids {shown}) fail "
        "their checksum: they were changed outside lookalike or damaged on disk; run "
        "`lookalike check --repair` to re-embed them",
        bad,
    )


def checksum_summary(bad: Sequence[int]) -> list[str]:
    """What :meth:`Catalog.integrity` reports of images whose vectors fail their checksum."""
    if not bad:
        return []
    shown = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
    return [
        f"vectors of {len(bad)} image(s) fail their checksum (ids {shown}); run "
        "`lookalike check --repair` to re-embed them"
    ]


def model_summaries(rows: Iterable[Sequence[Any]]) -> list[dict[str, Any]]:
    """What :meth:`Catalog.models` returns, from (id, key, name, layer, dim, vector count)
    rows."""
    names = ("id", "key", "name", "layer", "dim", "vectors")
    return [dict(zip(names, (*row[:5], int(row[5])), strict=True)) for row in rows]


def planned_moves(moves: Mapping[str, str]) -> list[tuple[str, str]]:
    """The (old, new) pairs of a :meth:`Catalog.move_paths` batch, as the catalog stores
    paths, without those that stay in place; ``CatalogError`` when two share a new path."""
    pairs = [(to_catalog(old), to_catalog(new)) for old, new in moves.items() if old != new]
    targets = [new for _, new in pairs]
    if len(set(targets)) != len(targets):
        twice = sorted({new for new in targets if targets.count(new) > 1})
        raise CatalogError(f"several files cannot move to one path: {from_catalog(twice[0])}")
    return pairs


def local_feature_rows(items: Iterable[tuple[int, str, bytes]]) -> list[tuple[int, str, bytes]]:
    """(image id, kind, data) items as plain int, str and bytes, ready to store."""
    return [(int(i), str(kind), bytes(data)) for i, kind, data in items]


def fresh_local_feature_rows(
    rows: list[tuple[int, str, bytes]],
    current: Mapping[int, str],
    content_hashes: Mapping[int, str] | None,
) -> list[tuple[int, str, bytes]]:
    """The rows to store, given each image's ``current`` content hash: those whose features
    were computed from that content (or whose content was not given). An id the catalog does
    not have raises ``CatalogError``."""
    unknown = sorted({r[0] for r in rows if r[0] not in current})
    if unknown:
        raise CatalogError(f"no images with ids {unknown[:5]} to store local features of")
    if content_hashes is None:
        return rows
    return [row for row in rows if content_hashes.get(row[0]) in (None, current[row[0]])]
