"""What a client is told about an error: one table for the REST and the gRPC front ends.

Each typed error (:mod:`lookalike.errors`) maps to an HTTP status, a gRPC status code and,
for errors that are the server's own fault (5xx), a fixed public message. An error class
without an entry of its own takes the entry of the nearest class in its MRO that has one, so
a new subclass answers like its parent; anything that is not a :class:`LookalikeError` is an
unexpected fault (500 / INTERNAL).

What reaches a client:

* server faults (5xx): only the entry's fixed message; the full error is for the server's log;
* client errors (4xx): the error's own text, with the server's folders replaced, absolute
  paths cut to their file name, and database URLs left out.

Payloads over a limit (:class:`PayloadTooLargeError`, :class:`DecompressionBombError`) answer
413 and RESOURCE_EXHAUSTED: the code gRPC itself gives a message over its size limit, so a
client sees one code for "too large" whichever limit refused it.

A full or failing disk (:class:`StorageError`, and an ``OSError`` such as ENOSPC raised by any
write on the way) answers 507 Insufficient Storage and RESOURCE_EXHAUSTED ("the entire file
system is out of space", in gRPC's own words), not 503 / UNAVAILABLE: a retry does not help
until someone frees space, and 503 invites clients and load balancers to retry at once.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import grpc

from lookalike.errors import (
    AuthError,
    CatalogError,
    CatalogUnavailableError,
    DecompressionBombError,
    EmptyCollectionError,
    EncoderError,
    FileChangedError,
    ImageError,
    LookalikeError,
    ModelMismatchError,
    NotFoundError,
    PayloadTooLargeError,
    RequestError,
    StorageError,
    is_storage_failure,
)

__all__ = [
    "ERROR_STATUSES",
    "INTERNAL",
    "ErrorStatus",
    "private_locations",
    "public_message",
    "scrub",
    "status_for",
    "status_of",
]


@dataclass(frozen=True)
class ErrorStatus:
    """How one kind of error is answered: HTTP status, gRPC code, and a fixed message when the
    error's own text must not reach the client (always so for server faults)."""

    http: int
    grpc: grpc.StatusCode
    public: str | None = None

    def __post_init__(self) -> None:
        if self.server_fault and self.public is None:
            raise ValueError("a server fault needs a fixed public message")

    @property
    def server_fault(self) -> bool:
        """Whether the server, not the request, is at fault (5xx): log it, tell little."""
        return self.http >= 500


INTERNAL = ErrorStatus(500, grpc.StatusCode.INTERNAL, "internal server error")

_INVALID = grpc.StatusCode.INVALID_ARGUMENT
_TOO_LARGE = grpc.StatusCode.RESOURCE_EXHAUSTED
_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION

ERROR_STATUSES: Mapping[type[BaseException], ErrorStatus] = MappingProxyType(
    {
        LookalikeError: INTERNAL,
        RequestError: ErrorStatus(400, _INVALID),
        PayloadTooLargeError: ErrorStatus(413, _TOO_LARGE),
        ImageError: ErrorStatus(400, _INVALID),
        DecompressionBombError: ErrorStatus(413, _TOO_LARGE),
        NotFoundError: ErrorStatus(404, grpc.StatusCode.NOT_FOUND),
        FileChangedError: ErrorStatus(409, _PRECONDITION),
        AuthError: ErrorStatus(401, grpc.StatusCode.UNAUTHENTICATED),
        # A fixed text: the library's message has named the collection's folder.
        EmptyCollectionError: ErrorStatus(
            409, _PRECONDITION, "the collection has no indexed images yet"
        ),
        ModelMismatchError: ErrorStatus(409, _PRECONDITION),
        CatalogError: ErrorStatus(500, grpc.StatusCode.INTERNAL, "the catalog cannot be read"),
        CatalogUnavailableError: ErrorStatus(
            503, grpc.StatusCode.UNAVAILABLE, "the catalog is unavailable"
        ),
        EncoderError: ErrorStatus(500, grpc.StatusCode.INTERNAL, "the encoder failed"),
        StorageError: ErrorStatus(
            507,
            _TOO_LARGE,
            "the server's disk is full or cannot be written; the request was not completed:"
            " retry once space is freed",
        ),
    }
)


def status_for(kind: type[BaseException]) -> ErrorStatus:
    """The entry of the nearest class in ``kind``'s MRO that has one; INTERNAL for others."""
    for cls in kind.__mro__:
        entry = ERROR_STATUSES.get(cls)
        if entry is not None:
            return entry
    return INTERNAL


def status_of(error: BaseException) -> ErrorStatus:
    """The entry for an exception; an ``OSError`` that is the disk's fault (no space left, a
    read-only or failing disk) answers as a :class:`StorageError`."""
    if not isinstance(error, LookalikeError) and is_storage_failure(error):
        return ERROR_STATUSES[StorageError]
    return status_for(type(error))


# Connection URLs of databases (with or without a password), up to the next blank or quote.
_URL = re.compile(
    r"\b(?:postgres(?:ql)?|mysql|sqlite)(?:\+\w+)?://(?:[^\s'\"<>]*[^\s'\"<>.,;:)])?",
    re.IGNORECASE,
)
# An absolute POSIX path of at least two components, not part of a URL or a relative path.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])/(?:[^\s/'\"<>]+/)+([^\s/'\",;:)<>]*)")


def scrub(text: str, private: Iterable[str | os.PathLike[str]] = ()) -> str:
    """``text`` without server locations: each ``private`` folder (and any path under it)
    becomes ``<collection>``, database URLs become ``<database>``, and other absolute paths are
    cut to their last component."""
    text = _URL.sub("<database>", text)
    folders = {os.fspath(folder).rstrip("/") for folder in private}
    for folder in sorted((f for f in folders if len(f) > 1), key=len, reverse=True):
        text = text.replace(folder, "<collection>")
    return _ABSOLUTE_PATH.sub(lambda match: match.group(1) or "<path>", text)


def public_message(error: BaseException, private: Iterable[str | os.PathLike[str]] = ()) -> str:
    """What a client may read about ``error``: the entry's fixed message when it has one,
    else the error's own text, scrubbed of server locations (see :func:`scrub`)."""
    entry = status_of(error)
    if entry.public is not None:
        return entry.public
    if isinstance(error, ImageError):
        # Named by the file's name at most: a server folder never reaches the client.
        text = f"{os.path.basename(error.source) or error.source}: {error.reason}"
    else:
        text = str(error)
    return scrub(text, private)


def private_locations(folder: str | os.PathLike[str]) -> list[str]:
    """A folder as given and as resolved, for :func:`scrub`."""
    path = Path(folder)
    locations = [str(path), str(path.absolute())]
    with contextlib.suppress(OSError, RuntimeError):  # a loop of links
        locations.append(str(path.resolve()))
    return locations
