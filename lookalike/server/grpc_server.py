"""gRPC front end over a SearchService: the classic ``SimilarImage`` contract and ``lookalike.v1``.

``SimilarImage/FindSimilar`` was published in two versions that share the method path and
field numbers, and one server answers both, each in its own form (see
:func:`read_find_similar` for how a request's version is told):

* version 1 (similar_image.proto) takes a square image as raw pixels and answers with the five
  most similar indexed images as raw RGB pixels at the same size;
* version 2 (similar_image_v2.proto) takes an image file as base64 text and answers with the
  five as base64 text of JPEG files (at most ``FIND_SIMILAR_V2_SIDE`` pixels a side, the
  reply within the 4 MiB a gRPC client receives by default).

``lookalike.v1.Lookalike`` searches
with encoded image files and returns ids, scores and metadata, and adds and removes images
(with the bearer token in the ``authorization`` call metadata when the service has one).

Errors become status codes by the table the REST API uses too (lookalike.server.status): server
faults are logged and answered with a fixed message (INTERNAL "internal server error" for
unexpected ones, UNAVAILABLE when the catalog cannot be reached), so no traceback, server path
or database URL reaches a client.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import json
import logging
import math
import os
import re
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import grpc
import numpy as np

# protobuf ships no type information (types-protobuf would add it): the ignores stay quiet
# either way.
from google.protobuf import empty_pb2  # type: ignore[import-untyped, unused-ignore]
from google.protobuf.message import DecodeError  # type: ignore[import-untyped, unused-ignore]
from google.protobuf.unknown_fields import (  # type: ignore[import-untyped, unused-ignore]
    UnknownFieldSet,
)
from PIL import Image

from lookalike.core.filters import parse_where
from lookalike.core.results import SearchResponse, SearchResult
from lookalike.core.search import MAX_QUERY_PARTS, SearchArgs
from lookalike.errors import (
    ImageError,
    LookalikeError,
    NotFoundError,
    PayloadTooLargeError,
    RequestError,
    VectorIndexError,
)
from lookalike.images import load_image
from lookalike.knn.base import Metric
from lookalike.server.protos import lookalike_v1_pb2 as v1
from lookalike.server.protos import lookalike_v1_pb2_grpc as v1_grpc
from lookalike.server.protos import similar_image_pb2 as classic
from lookalike.server.protos import similar_image_pb2_grpc as classic_grpc
from lookalike.server.protos import similar_image_v2_pb2 as classic_v2
from lookalike.server.service import SearchService
from lookalike.server.status import public_message, status_of

__all__ = [
    "FIND_SIMILAR_COUNT",
    "FIND_SIMILAR_V2_REPLY_BYTES",
    "FIND_SIMILAR_V2_SIDE",
    "MESSAGE_OVERHEAD",
    "SIMILARITIES",
    "SIMILARITIES_V2",
    "LookalikeServicer",
    "SimilarImageServicer",
    "create_grpc_server",
    "read_find_similar",
]

_log = logging.getLogger(__name__)

# Protobuf framing and the other fields of a request, on top of the image bytes themselves.
MESSAGE_OVERHEAD = 64 * 1024

# The classic contract's similarity names and the metrics they stand for.
SIMILARITIES = {"CosineDistance": Metric.COSINE, "EuclideanDistance": Metric.EUCLIDEAN}

# Version 2 of the classic contract also accepts "Test", which searches as EuclideanDistance.
SIMILARITIES_V2 = {**SIMILARITIES, "Test": Metric.EUCLIDEAN}

# How many images FindSimilar answers with (imageOut1 .. imageOut5).
FIND_SIMILAR_COUNT = 5

# Version 2 answers with JPEG files of at most this many pixels a side (aspect ratio kept):
# enough to look at, and five of them fit a reply a client accepts.
FIND_SIMILAR_V2_SIDE = 1024

# The most a version 2 reply holds: the 4 MiB a gRPC client receives by default. An image
# whose base64 JPEG would take more than its fifth of it (less some framing) is sent at a
# lower quality or size instead (_V2_RENDITIONS).
FIND_SIMILAR_V2_REPLY_BYTES = 4 * 1024 * 1024
_V2_IMAGE_BUDGET = (FIND_SIMILAR_V2_REPLY_BYTES - 1024) // FIND_SIMILAR_COUNT

# The renditions a version 2 reply image is tried in, (longest side, JPEG quality), until its
# base64 text fits the budget; the last one always does (a 256 px JPEG is under 200 kB).
_V2_RENDITIONS = ((FIND_SIMILAR_V2_SIDE, 90), (FIND_SIMILAR_V2_SIDE, 75), (768, 75), (512, 75))
_V2_LAST_RENDITION = (256, 60)

# Characters a base64 image may hold: both alphabets (standard and URL-safe), padding and
# whitespace (line breaks of MIME-style base64 are ignored).
_NOT_BASE64 = re.compile(r"[^A-Za-z0-9+/=_\-\s]")
_URL_SAFE = str.maketrans("-_", "+/")

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


def _similarity(name: str, known: dict[str, Metric]) -> Metric:
    """The metric a classic request's ``similarity`` names, or a RequestError listing them."""
    metric = known.get(name)
    if metric is None:
        raise RequestError(f"unknown similarity {name!r}; expected one of: " + ", ".join(known))
    return metric


def _outputs(images: Sequence[Any]) -> dict[str, Any]:
    """The five results as the classic reply's ``imageOut1`` .. ``imageOut5`` fields."""
    return {f"imageOut{position}": image for position, image in enumerate(images, 1)}


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


@dataclass(frozen=True)
class _Unreadable:
    """A FindSimilar request that is neither version's message; answered INVALID_ARGUMENT."""

    reason: str


# Wire types of the fields that tell the versions apart.
_LENGTH_DELIMITED = 2
_FIXED32 = 5

_EMPTY_FIND_SIMILAR = (
    "empty request: send value (raw pixels), image_size and similarity (version 1), or image "
    "(an image file as base64 text) and similarity (version 2)"
)


def read_find_similar(data: bytes) -> Any:
    """A FindSimilar request as version 1's or version 2's ImageFileIn (or an _Unreadable),
    told apart by the fields present on the wire.

    Both put the image in field 1 (v1 ``bytes value``: raw pixels, v2 ``string image``: base64
    of an image file); the other fields differ: v1 has ``float image_size = 2`` and ``string
    similarity = 3``, v2 ``string similarity = 4``. So field 2 or 3 means version 1, field 4
    version 2, and both at once are refused. Field 1 alone (or nothing) is an error in either
    version, since both need a similarity: it is read as version 2 when it holds base64 text of
    a recognisable image file, else as version 1, only so that the error speaks that version's
    words. The image's length is never used: base64 text of 3 * n * n characters is still v2.

    Never raises: gRPC would answer an exception here as INTERNAL "Exception deserializing
    request!", so a malformed message becomes an _Unreadable that FindSimilar refuses with
    INVALID_ARGUMENT.
    """
    try:
        fields = UnknownFieldSet(empty_pb2.Empty.FromString(data))
    except DecodeError:
        return _Unreadable("the request is not a valid protobuf message (ImageFileIn)")
    present = {(field.field_number, field.wire_type) for field in fields}
    version_1 = (2, _FIXED32) in present or (3, _LENGTH_DELIMITED) in present
    version_2 = (4, _LENGTH_DELIMITED) in present
    if version_1 and version_2:
        return _Unreadable(
            "the request mixes the two versions of ImageFileIn: image_size (field 2) and "
            "similarity (field 3) are version 1's, similarity (field 4) is version 2's"
        )
    if not version_1 and not version_2:
        if not present:
            return _Unreadable(_EMPTY_FIND_SIMILAR)
        image = [field.data for field in fields if field.field_number == 1]
        version_2 = bool(image) and isinstance(image[-1], bytes) and _is_base64_image(image[-1])
    message_class = classic_v2.ImageFileIn if version_2 else classic.ImageFileIn
    try:
        return message_class.FromString(data)
    except DecodeError:
        if version_2:
            return _Unreadable("image and similarity must be UTF-8 text (image: base64)")
        return _Unreadable("similarity must be UTF-8 text")


def _is_base64_image(data: bytes) -> bool:
    """Whether ``data`` is base64 text of a file PIL recognises as an image."""
    try:
        decoded = _base64_file(data.decode("ascii"))
        with Image.open(io.BytesIO(decoded)):
            return True
    except Exception:  # not text, not base64, not an image (PIL raises many kinds)
        return False


def _base64_file(text: str) -> bytes:
    """The bytes of version 2's ``image``: base64 text, standard or URL-safe alphabet, with
    or without padding; whitespace (line breaks) is ignored. RequestError when it is not."""
    bad = _NOT_BASE64.search(text)
    if bad is not None:
        raise RequestError(
            f"image is not valid base64: {bad.group()!r} at position {bad.start()} is not a "
            "base64 character; send the image file as base64.b64encode(data).decode()"
        )
    compact = "".join(text.split()).translate(_URL_SAFE)
    if not compact:
        raise RequestError("image is empty: send an image file as base64 text")
    digits = compact.rstrip("=")
    if "=" in digits or len(compact) - len(digits) > 2 or len(digits) % 4 == 1:
        raise RequestError(
            f"image is not valid base64: {len(compact)} characters with "
            f"{len(compact) - len(digits)} '=' cannot be base64 text (the padding or the "
            "length is wrong, or the text is cut short); send the image file as "
            "base64.b64encode(data).decode()"
        )
    try:
        return base64.b64decode(digits + "=" * (-len(digits) % 4), validate=True)
    except binascii.Error as error:  # pragma: no cover - the checks above rule it out
        raise RequestError(f"image is not valid base64: {error}") from None


def _serialize_reply(reply: Any) -> bytes:
    """Either version's ImageFileOut on the wire."""
    return bytes(reply.SerializeToString())


def _add_similar_image(servicer: SimilarImageServicer, server: grpc.Server) -> None:
    """Serve ``/SimilarImage/FindSimilar`` for both versions of the contract: requests are
    read by :func:`read_find_similar`, replies written with their own version's message."""
    handlers = {
        "FindSimilar": grpc.unary_unary_rpc_method_handler(
            servicer.FindSimilar,
            request_deserializer=read_find_similar,
            response_serializer=_serialize_reply,
        )
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("SimilarImage", handlers),)
    )
    server.add_registered_method_handlers("SimilarImage", handlers)


def _jpeg_base64(image: Image.Image) -> str:
    """An image as base64 text of a JPEG file of at most FIND_SIMILAR_V2_SIDE pixels a side,
    in the first rendition whose text fits a fifth of the version 2 reply."""
    for side, quality in (*_V2_RENDITIONS, _V2_LAST_RENDITION):
        if max(image.size) > side:
            image = image.copy()
            image.thumbnail((side, side), Image.Resampling.LANCZOS, reducing_gap=3.0)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality)
        text = base64.b64encode(buffer.getvalue()).decode("ascii")
        if len(text) <= _V2_IMAGE_BUDGET:
            break
    return text


class SimilarImageServicer(classic_grpc.SimilarImageServicer):  # type: ignore[misc]
    """The classic ``SimilarImage`` service, both versions: raw square pixels (v1) or a
    base64 image file (v2) in, the five nearest out in the same form."""

    def __init__(self, service: SearchService) -> None:
        self.service = service

    @_guarded
    def FindSimilar(self, request: Any, context: grpc.ServicerContext) -> Any:
        """The five indexed images most like the query, best first: version 1's ImageFileOut
        (raw RGB pixels) for a version 1 request, version 2's (base64 JPEG files) for v2."""
        if isinstance(request, _Unreadable):
            raise RequestError(request.reason)
        if isinstance(request, classic_v2.ImageFileIn):
            return self._find_similar_v2(request)
        return self._find_similar_v1(request)

    def _find_similar_v1(self, request: Any) -> Any:
        """Version 1: raw square pixels in, raw RGB pixels of the same size out."""
        if not request.value and not request.image_size and not request.similarity:
            raise RequestError(
                "empty request: value (raw pixels), image_size and similarity are required"
            )
        metric = _similarity(request.similarity, SIMILARITIES)
        size = self._side(request.image_size)
        query = self._query(request.value, size)
        response = self.service.search(query, k=self._k(), metric=metric)
        images = self._five(
            response, lambda image_id: self.service.image_pixels(image_id, size).tobytes()
        )
        return classic.ImageFileOut(**_outputs(images))

    def _find_similar_v2(self, request: Any) -> Any:
        """Version 2: an image file as base64 text in, base64 JPEG files out."""
        if not request.image and not request.similarity:
            raise RequestError(
                "empty request: image (an image file as base64 text) and similarity are required"
            )
        metric = _similarity(request.similarity, SIMILARITIES_V2)
        data = self._image_file(request.image)
        try:
            response = self.service.search(data, name="image", k=self._k(), metric=metric)
        except ImageError as error:
            raise _named(error, "image") from None
        images = self._five(response, self._reply_file)
        return classic_v2.ImageFileOut(**_outputs(images))

    def _k(self) -> int:
        """How many candidates to rank: five, and spares within max_k."""
        limits = self.service.limits
        return max(FIND_SIMILAR_COUNT, min(limits.max_k, FIND_SIMILAR_COUNT + _SPARE_CANDIDATES))

    def _five(self, response: SearchResponse, render: Callable[[int], _Reply]) -> list[_Reply]:
        """The first five results that can still be read, each rendered by ``render``."""
        images: list[_Reply] = []
        for result in response.results:
            try:
                images.append(render(result.id))
            except (NotFoundError, ImageError):
                # Removed meanwhile, or its file is unreadable or no longer the one indexed
                # (SearchService.open_file reads only the catalogued file, unchanged).
                continue
            if len(images) == FIND_SIMILAR_COUNT:
                break
        if len(images) < FIND_SIMILAR_COUNT:
            raise _Failure(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"FindSimilar answers with {FIND_SIMILAR_COUNT} images, but the collection "
                f"has only {len(images)}; index at least {FIND_SIMILAR_COUNT} images",
            )
        return images

    def _image_file(self, text: str) -> bytes:
        """Version 2's image: its base64 text within the upload limit, decoded."""
        limit = self.service.limits.max_upload_bytes
        if len(text) > limit:
            # The text is what travels: bounded as an upload is, so the file itself may be
            # three quarters of the limit (what fits a message gRPC accepts).
            raise PayloadTooLargeError(
                f"image: {len(text)} characters of base64 exceed the limit of {limit} "
                f"(an image file of at most {limit // 4 * 3} bytes)"
            )
        return _base64_file(text)

    def _reply_file(self, image_id: int) -> str:
        """An indexed image as version 2 answers it: base64 text of a JPEG file, read only
        from its checked file (see SearchService.open_file)."""
        record, handle = self.service.open_file(image_id)
        with handle:
            image = load_image(
                handle,
                max_pixels=max(self.service.limits.max_pixels, record.width * record.height),
                draft_size=FIND_SIMILAR_V2_SIDE,
            )
        return _jpeg_base64(image)

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


def _filters(request: v1.SearchRequest) -> SearchArgs:
    """The filter and sort options of a search request: the ``where`` map and the
    ``filters`` expressions together, the GPS circle and box when set, and the sort key."""
    near = request.near if request.HasField("near") else None
    within = request.within if request.HasField("within") else None
    return SearchArgs(
        where=[*parse_where(dict(request.where)), *parse_where(list(request.filters))],
        near=None if near is None else (near.lat, near.lon, near.km),
        within=None if within is None else (within.south, within.west, within.north, within.east),
        sort=request.sort or None,
    )


def _match(result: SearchResult) -> v1.Match:
    match = v1.Match(
        id=result.id,
        path=os.path.basename(result.path),
        score=result.score,
        metadata={key: _text(value) for key, value in result.metadata.items()},
        width=result.width,
        height=result.height,
    )
    if result.copy_probability is not None:
        match.copy_probability = result.copy_probability
    if result.transform is not None:
        match.transform.CopyFrom(v1.Transform(**asdict(result.transform)))
    return match


def _search_reply(response: SearchResponse) -> v1.SearchReply:
    reply = v1.SearchReply(
        matches=[_match(result) for result in response.results],
        no_close_match=response.no_close_match,
        metric=response.metric.value,
        partial=response.partial,
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
        limit = self.service.limits.max_upload_bytes
        images = ([request.image] if request.image else []) + list(request.images)
        negatives = list(request.negatives)
        if len(images) + len(negatives) > MAX_QUERY_PARTS:
            raise RequestError(f"a query may have at most {MAX_QUERY_PARTS} parts")
        for number, data in enumerate(images):
            _check_upload_size(data, limit, "image" if number == 0 else f"images[{number}]")
        for number, data in enumerate(negatives):
            _check_upload_size(data, limit, f"negatives[{number}]")
        k = self.service.check_k(request.k or _DEFAULT_K)
        metric = _metric(request.metric)
        threshold = request.threshold if request.HasField("threshold") else None
        if threshold is not None and not math.isfinite(threshold):
            raise RequestError(f"threshold must be a finite number, got {threshold}")
        combined = bool(request.images or negatives or request.text or request.weights)
        filters = _filters(request)
        try:
            if not combined:
                response = self.service.search(
                    request.image,
                    name="image",
                    k=k,
                    metric=metric,
                    threshold=threshold,
                    query_expansion=request.query_expansion,
                    rerank=request.rerank,
                    multi_crop=request.multi_crop,
                    copy_views=not request.no_copy_views,
                    copies=request.copies,
                    where=filters["where"],
                    near=filters["near"],
                    within=filters["within"],
                    sort=filters["sort"],
                )
            else:
                response = self.service.search_many(
                    images,
                    negatives=negatives,
                    text=request.text or None,
                    weights=list(request.weights) or None,
                    k=k,
                    metric=metric,
                    threshold=threshold,
                    query_expansion=request.query_expansion,
                    rerank=request.rerank,
                    multi_crop=request.multi_crop,
                    copy_views=not request.no_copy_views,
                    copies=request.copies,
                    where=filters["where"],
                    near=filters["near"],
                    within=filters["within"],
                    sort=filters["sort"],
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
    _add_similar_image(SimilarImageServicer(service), server)
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
