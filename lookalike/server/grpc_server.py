"""gRPC front end over a SearchService: the classic ``SimilarImage`` contract and ``lookalike.v1``.

``SimilarImage/FindSimilar`` takes a square image as raw pixels and answers with the five most
similar indexed images as raw RGB pixels at the same size. ``lookalike.v1.Lookalike`` searches
with encoded image files and returns ids, scores and metadata, and adds and removes images
(with the bearer token in the ``authorization`` call metadata when the service has one).

Errors become status codes by the table the REST API uses too (lookalike.server.status): server
faults are logged and answered with a fixed message (INTERNAL "internal server error" for
unexpected ones, UNAVAILABLE when the catalog cannot be reached), so no traceback, server path
or database URL reaches a client.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from collections.abc import Callable
from concurrent import futures
from typing import Any, TypeVar

import grpc
import numpy as np
from PIL import Image

from lookalike.core.results import SearchResponse
from lookalike.errors import (
    ImageError,
    LookalikeError,
    NotFoundError,
    PayloadTooLargeError,
    RequestError,
    VectorIndexError,
)
from lookalike.knn.base import Metric
from lookalike.server.protos import lookalike_v1_pb2 as v1
from lookalike.server.protos import lookalike_v1_pb2_grpc as v1_grpc
from lookalike.server.protos import similar_image_pb2 as classic
from lookalike.server.protos import similar_image_pb2_grpc as classic_grpc
from lookalike.server.service import SearchService
from lookalike.server.status import public_message, status_of

__all__ = [
    "FIND_SIMILAR_COUNT",
    "MESSAGE_OVERHEAD",
    "SIMILARITIES",
    "LookalikeServicer",
    "SimilarImageServicer",
    "create_grpc_server",
]

_log = logging.getLogger(__name__)

# Protobuf framing and the other fields of a request, on top of the image bytes themselves.
MESSAGE_OVERHEAD = 64 * 1024

# The classic contract's similarity names and the metrics they stand for.
SIMILARITIES = {"CosineDistance": Metric.COSINE, "EuclideanDistance": Metric.EUCLIDEAN}

# How many images FindSimilar answers with (imageOut1 .. imageOut5).
FIND_SIMILAR_COUNT = 5

# Bytes per pixel of the raw pixels FindSimilar accepts, and the PIL mode they are in.
_CHANNEL_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}

# Extra candidates FindSimilar ranks, in case an image is removed while it reads the pixels.
_SPARE_CANDIDATES = 3

_DEFAULT_K = 10

_Servicer = TypeVar("_Servicer")
_Request = TypeVar("_Request")
_Reply = TypeVar("_Reply")


class _Failure(Exception):
    """A request that ends with a status code of the classic contract's own (FindSimilar's
    "needs five images"); every other error is answered by the shared table."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _status(error: Exception, service: SearchService | None) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client gets for an error, by the shared table; server
    faults are logged here in full."""
    entry = status_of(error)
    if entry.server_fault:
        _log.error("gRPC request failed: %s", error, exc_info=error)
    private = service.private_locations() if service is not None else []
    return entry.grpc, public_message(error, private)


def _guarded(
    method: Callable[[_Servicer, _Request, grpc.ServicerContext], _Reply],
) -> Callable[[_Servicer, _Request, grpc.ServicerContext], _Reply]:
    """Run an RPC method, turning every exception into a status code and a clear message."""

    @functools.wraps(method)
    def run(self: _Servicer, request: _Request, context: grpc.ServicerContext) -> _Reply:
        try:
            return method(self, request, context)
        except _Failure as failure:
            code, message = failure.code, str(failure)
        except Exception as error:
            service = getattr(self, "service", None)
            code, message = _status(error, service if isinstance(service, SearchService) else None)
        context.abort(code, message)
        raise AssertionError("context.abort raises")  # pragma: no cover

    return run


def _check_upload_size(data: bytes, limit: int, field: str) -> None:
    """Refuse image bytes over the upload limit (RESOURCE_EXHAUSTED, the status gRPC itself
    gives oversized messages)."""
    if len(data) > limit:
        raise PayloadTooLargeError(f"{field}: {len(data)} bytes exceeds the limit of {limit} bytes")


def _named(error: ImageError, field: str) -> ImageError:
    """The same error naming the request field instead of the input kind (``<bytes>``)."""
    return type(error)(field, error.reason)


def _bearer(context: grpc.ServicerContext) -> str | None:
    """The token of an ``authorization: Bearer <token>`` call metadata entry, if any."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


class SimilarImageServicer(classic_grpc.SimilarImageServicer):  # type: ignore[misc]
    """The classic ``SimilarImage`` service: raw square pixels in, the five nearest out."""

    def __init__(self, service: SearchService) -> None:
        self.service = service

    @_guarded
    def FindSimilar(
        self, request: classic.ImageFileIn, context: grpc.ServicerContext
    ) -> classic.ImageFileOut:
        """The five indexed images most like the query, best first, as raw RGB pixels."""
        if not request.value and not request.image_size and not request.similarity:
            raise RequestError(
                "empty request: value (raw pixels), image_size and similarity are required"
            )
        metric = SIMILARITIES.get(request.similarity)
        if metric is None:
            raise RequestError(
                f"unknown similarity {request.similarity!r}; expected one of: "
                + ", ".join(SIMILARITIES)
            )
        size = self._side(request.image_size)
        query = self._query(request.value, size)
        limits = self.service.limits
        k = max(FIND_SIMILAR_COUNT, min(limits.max_k, FIND_SIMILAR_COUNT + _SPARE_CANDIDATES))
        response = self.service.search(query, k=k, metric=metric)
        images: list[bytes] = []
        for result in response.results:
            try:
                images.append(self.service.image_pixels(result.id, size).tobytes())
            except (NotFoundError, ImageError):
                # Removed meanwhile, or its file is unreadable or no longer the one indexed
                # (SearchService.image_pixels reads only the catalogued file, unchanged).
                continue
            if len(images) == FIND_SIMILAR_COUNT:
                break
        if len(images) < FIND_SIMILAR_COUNT:
            raise _Failure(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"FindSimilar answers with {FIND_SIMILAR_COUNT} images, but the collection "
                f"has only {len(images)}; index at least {FIND_SIMILAR_COUNT} images",
            )
        return classic.ImageFileOut(
            imageOut1=images[0],
            imageOut2=images[1],
            imageOut3=images[2],
            imageOut4=images[3],
            imageOut5=images[4],
        )

    def _side(self, image_size: float) -> int:
        """The square's side: a positive whole number within the pixel limit, and small
        enough that the reply (five RGB images of that side) stays within
        ``max_find_similar_size``."""
        if not math.isfinite(image_size) or image_size < 1 or image_size != int(image_size):
            raise RequestError(f"image_size must be a positive whole number, got {image_size}")
        side = int(image_size)
        limits = self.service.limits
        if side * side > limits.max_pixels:
            raise RequestError(
                f"image_size {side} means {side * side} pixels, over the limit of "
                f"{limits.max_pixels}"
            )
        if side * side * 3 > limits.max_upload_bytes:
            # Each reply image is as large as an RGB upload of that size: bound it alike.
            raise RequestError(
                f"image_size {side} means {side * side * 3} bytes per RGB reply image, over "
                f"the limit of {limits.max_upload_bytes}"
            )
        if side > limits.max_find_similar_size:
            # The reply holds five such images: bounded so that a client can receive it.
            reply = FIND_SIMILAR_COUNT * side * side * 3
            raise RequestError(
                f"image_size {side} is over the limit of {limits.max_find_similar_size}: the "
                f"reply would hold {FIND_SIMILAR_COUNT} RGB images of {side} x {side} "
                f"({reply / 1e6:.1f} MB); ask for an image_size of at most "
                f"{limits.max_find_similar_size}"
            )
        return side

    def _query(self, value: bytes, side: int) -> Image.Image:
        """Raw L, LA, RGB or RGBA pixels of a side x side square as an RGB image."""
        if not value:
            raise RequestError("value is empty: send the image's raw pixels")
        _check_upload_size(value, self.service.limits.max_upload_bytes, "value")
        area = side * side
        channels = len(value) // area
        if len(value) % area or channels not in _CHANNEL_MODES:
            expected = ", ".join(f"{area * c} ({mode})" for c, mode in _CHANNEL_MODES.items())
            raise RequestError(
                f"value has {len(value)} bytes, which fits no {side} x {side} image; "
                f"expected one of {expected}"
            )
        pixels = np.frombuffer(value, dtype=np.uint8).reshape(side, side, channels)
        try:
            return self.service.decode(pixels, name="value")  # LA, RGBA flattened on white
        except ImageError as error:
            raise _named(error, "value") from None


def _metric(name: str) -> Metric:
    """A search metric by name, cosine when empty."""
    try:
        metric = Metric.parse(name or Metric.COSINE)
    except VectorIndexError:
        metric = None
    if metric is None or metric is Metric.HAMMING:  # hamming needs binary codes
        raise RequestError(f"unknown metric {name!r}; expected one of: cosine, euclidean, dot")
    return metric


def _text(value: Any) -> str:
    """A metadata value as a string: scalars as str() (as ``where`` compares), else JSON."""
    if isinstance(value, str | int | float | bool):
        return str(value)
    return json.dumps(value)


def _search_reply(response: SearchResponse) -> v1.SearchReply:
    reply = v1.SearchReply(
        matches=[
            v1.Match(
                id=result.id,
                path=os.path.basename(result.path),
                score=result.score,
                metadata={key: _text(value) for key, value in result.metadata.items()},
                width=result.width,
                height=result.height,
            )
            for result in response.results
        ],
        no_close_match=response.no_close_match,
        metric=response.metric.value,
    )
    if response.best_score is not None:
        reply.best_score = response.best_score
    return reply


class LookalikeServicer(v1_grpc.LookalikeServicer):  # type: ignore[misc]
    """The ``lookalike.v1.Lookalike`` service: search, add, remove and stats."""

    def __init__(self, service: SearchService) -> None:
        self.service = service

    @_guarded
    def Search(self, request: v1.SearchRequest, context: grpc.ServicerContext) -> v1.SearchReply:
        """The k indexed images most like the uploaded file, best first."""
        _check_upload_size(request.image, self.service.limits.max_upload_bytes, "image")
        k = self.service.check_k(request.k or _DEFAULT_K)
        metric = _metric(request.metric)
        threshold = request.threshold if request.HasField("threshold") else None
        if threshold is not None and not math.isfinite(threshold):
            raise RequestError(f"threshold must be a finite number, got {threshold}")
        try:
            response = self.service.search(
                request.image,
                name="image",
                k=k,
                metric=metric,
                threshold=threshold,
                where=dict(request.where),
                query_expansion=request.query_expansion,
                rerank=request.rerank,
                multi_crop=request.multi_crop,
            )
        except ImageError as error:
            raise _named(error, "image") from None
        return _search_reply(response)

    @_guarded
    def Add(self, request: v1.AddRequest, context: grpc.ServicerContext) -> v1.AddReply:
        """Index an uploaded file (needs the bearer token when the service has one)."""
        self.service.check_token(_bearer(context))
        if not request.image:
            raise RequestError("image: the image is empty")
        _check_upload_size(request.image, self.service.limits.max_upload_bytes, "image")
        try:
            image_id = self.service.add(
                request.image, filename=request.filename, metadata=dict(request.metadata)
            )
        except ImageError as error:
            raise _named(error, "image") from None
        return v1.AddReply(id=image_id)

    @_guarded
    def Remove(self, request: v1.RemoveRequest, context: grpc.ServicerContext) -> v1.RemoveReply:
        """Remove an image by id (needs the bearer token when the service has one)."""
        self.service.check_token(_bearer(context))
        self.service.remove(request.id)
        return v1.RemoveReply()

    @_guarded
    def Stats(self, request: v1.StatsRequest, context: grpc.ServicerContext) -> v1.StatsReply:
        """How many images, which model and which index."""
        stats = self.service.stats()
        reply = v1.StatsReply(
            images=stats["images"],
            model=stats["model"],
            layer=stats["layer"],
            dim=stats["dim"],
            index_spec=stats["index_spec"],
            schema_version=stats["schema_version"],
        )
        if stats["index_kind"] is not None:
            reply.index_kind = stats["index_kind"]
        return reply


def create_grpc_server(
    service: SearchService,
    *,
    host: str = "127.0.0.1",
    port: int = 50051,
    max_workers: int = 8,
) -> tuple[grpc.Server, int]:
    """Start a gRPC server with both services; returns it and its port (port 0: a free one).

    Messages over the service's upload limit (plus framing) are refused by gRPC itself with
    RESOURCE_EXHAUSTED. The port is bound exclusively: a port in use raises LookalikeError
    rather than being shared. Stop the server with ``server.stop(grace)``. The model loads at
    the first request unless the caller runs ``service.warm_up()`` first.
    """
    limit = service.limits.max_upload_bytes + MESSAGE_OVERHEAD
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="lookalike-grpc"),
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.so_reuseport", 0),
        ],
    )
    classic_grpc.add_SimilarImageServicer_to_server(SimilarImageServicer(service), server)
    v1_grpc.add_LookalikeServicer_to_server(LookalikeServicer(service), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as error:
        raise LookalikeError(f"cannot listen for gRPC on {address}: {error}") from None
    if not bound:
        raise LookalikeError(f"cannot listen for gRPC on {address}")
    server.start()
    return server, bound
