"""Typed errors raised by lookalike. The library never prints or exits; callers catch these."""

from __future__ import annotations


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


class CatalogError(LookalikeError):
    """The catalog is unreadable, from a newer schema, or asked something inconsistent."""


class CatalogUnavailableError(CatalogError):
    """The catalog's database cannot be reached or opened right now (a PostgreSQL server that
    is down or refuses the connection, a SQLite file that cannot be opened); servers answer
    HTTP 503 / UNAVAILABLE, and a retry may succeed."""


class CatalogCorruptError(CatalogError):
    """The catalog's database file is damaged (a corrupt page, a truncated file): restore a
    backup, or run ``lookalike check --repair``. The message names the file."""


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


class AuthError(LookalikeError):
    """A write request lacks the configured bearer token (HTTP 401)."""


class DistributedError(LookalikeError):
    """Distributed work could not run: Ray is not installed, the cluster cannot be reached, or
    every worker was lost."""
