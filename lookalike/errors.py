"""Typed errors raised by lookalike. The library never prints or exits; callers catch these."""

from __future__ import annotations

import errno
import os

# OS errors that are the disk's fault, not the caller's: full, over quota, read-only, failing.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG})

_STORAGE_WORDS = {
    errno.ENOSPC: ("no space left on device", "free some space or move the collection (-c)"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or move the collection (-c)"),
    errno.EFBIG: ("file too large for its file system", "move the collection (-c)"),
    errno.EROFS: ("read-only file system", "make it writable or move the collection (-c)"),
    errno.EIO: ("I/O error", "check the disk, or move the collection (-c)"),
}


class LookalikeError(Exception):
    """Base class of every error lookalike raises on purpose."""


class ImageError(LookalikeError):
    """An input could not be turned into RGB pixels. ``source`` names the file or input kind."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


class NotAnImageError(ImageError):
    """The input is empty, truncated, corrupt, or not an image format lookalike can decode."""


class DecompressionBombError(ImageError):
    """The image declares more pixels than the configured limit; it is refused before decoding
    (HTTP 413, gRPC RESOURCE_EXHAUSTED)."""


class EncoderError(LookalikeError):
    """An encoder could not be created or run (unknown name, missing weights, bad option)."""


class StorageError(LookalikeError):
    """A file could not be written (or read) because of the disk: it is full, over quota,
    read-only or failing. ``path`` names the file; the message says what to do. What was
    stored before is kept, and nothing half-written is left behind. Servers answer HTTP 507
    Insufficient Storage / gRPC RESOURCE_EXHAUSTED."""

    def __init__(self, message: str, path: str | os.PathLike[str] = "", errno: int | None = None):
        super().__init__(message)
        self.path = os.fspath(path)
        self.errno = errno

    @classmethod
    def from_os_error(
        cls,
        error: OSError,
        path: str | os.PathLike[str],
        *,
        action: str = "writing",
        fix: str | None = None,
    ) -> StorageError:
        """The error for ``error`` raised while ``action`` the file ``path``: "no space left
        on device writing PATH: free some space or move the collection (-c)"."""
        what, advice = _STORAGE_WORDS.get(
            error.errno or 0, (error.strerror or str(error), "check the disk")
        )
        return cls(f"{what} {action} {os.fspath(path)}: {fix or advice}", path, errno=error.errno)


def is_storage_failure(error: BaseException) -> bool:
    """Whether ``error`` is the disk's fault: a :class:`StorageError`, or an ``OSError`` such
    as ENOSPC (no space left), EDQUOT, EROFS or EIO."""
    if isinstance(error, StorageError):
        return True
    return isinstance(error, OSError) and error.errno in STORAGE_ERRNOS


class CatalogError(LookalikeError):
    """The catalog is unreadable, from a newer schema, or asked something inconsistent."""


class CatalogUnavailableError(CatalogError):
    """The catalog's database cannot be reached or opened right now (a PostgreSQL server that
    is down or refuses the connection, a SQLite file that cannot be opened); servers answer
    HTTP 503 / UNAVAILABLE, and a retry may succeed."""


class CatalogCorruptError(CatalogError):
    """The catalog's database file is damaged (a corrupt page, a truncated file): restore a
    backup, or run ``lookalike check --repair``. The message names the file."""


class CatalogStorageError(StorageError, CatalogError):
    """The catalog's database could not be written: its disk is full or failing (SQLite's
    "database or disk is full"). The change that failed was rolled back whole; everything
    stored before it (an index run's earlier batches) is kept. Answers like StorageError."""


class CorruptVectorError(CatalogError):
    """Stored vectors no longer match their checksums (changed outside lookalike, or damaged
    on disk); ``ids`` are the images whose vectors failed. ``lookalike check --repair``
    re-embeds them."""

    def __init__(self, message: str, ids: tuple[int, ...] | list[int] = ()) -> None:
        super().__init__(message)
        self.ids = [int(i) for i in ids]


class ModelMismatchError(CatalogError):
    """Vectors of one model/layer were about to be mixed with vectors of another."""


class HashingError(LookalikeError):
    """A hash head could not be trained, saved, loaded or applied (bad option, file or input)."""


class HashModelMismatchError(HashingError, ModelMismatchError):
    """A hash head was given vectors of another encoder than the one it was trained on."""


class DedupError(LookalikeError):
    """A dedup run was given a bad method, threshold or folder, or a move it cannot make."""


class FinetuneError(EncoderError):
    """A fine-tuning run got a bad option or dataset, or a fine-tuned encoder cannot be found,
    is corrupt, or no longer fits its base encoder."""


class VectorIndexError(LookalikeError):
    """An index was given bad input (wrong dimension, bad spec) or a corrupt file."""


class DimensionMismatchError(VectorIndexError):
    """Vectors or queries have a different dimension than the index."""


class IndexSpecError(VectorIndexError):
    """An index spec string could not be parsed or names an unknown backend or option."""


class CorruptIndexError(VectorIndexError):
    """An index file is truncated, corrupt, or does not belong to this catalog."""


class EmptyCollectionError(LookalikeError):
    """A search was asked of a collection that has no images yet (HTTP 409)."""


class RequestError(LookalikeError):
    """A request to a lookalike server is malformed or asks for more than allowed (HTTP 400)."""


class PayloadTooLargeError(RequestError):
    """A request's upload is over the server's size limit (HTTP 413, gRPC RESOURCE_EXHAUSTED)."""


class NotFoundError(LookalikeError):
    """A request names an image id that the collection does not hold (HTTP 404)."""


class FileChangedError(NotFoundError):
    """An image's file is on disk but is no longer the file that was indexed: modified, not a
    regular file any more, or a link to a file outside the indexed folders. Its bytes are not
    served; indexing its folder again brings the catalog in line (HTTP 409)."""


class AuthError(LookalikeError):
    """A write request lacks the configured bearer token (HTTP 401)."""


class DistributedError(LookalikeError):
    """Distributed work could not run: Ray is not installed, the cluster cannot be reached, or
    every worker was lost."""
