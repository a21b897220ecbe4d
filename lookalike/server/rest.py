"""The REST API and the web page, served by one FastAPI app over a SearchService.

Files are only ever served by catalog id: no request field becomes a path, and no URL or path
in a request is fetched.
"""

from __future__ import annotations

import json
import logging
import mimetypes
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from importlib import resources
from typing import TYPE_CHECKING, Annotated, Any, BinaryIO, Literal

from fastapi import FastAPI, File, Form, Header, Query, Request, Response, UploadFile
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from lookalike.catalog import ImageRecord
from lookalike.core.collection import Collection
from lookalike.core.filters import parse_sort, parse_where
from lookalike.core.results import SearchResponse
from lookalike.core.search import MAX_QUERY_PARTS
from lookalike.errors import (
    ImageError,
    LookalikeError,
    NotFoundError,
    PayloadTooLargeError,
    RequestError,
)
from lookalike.server.service import SearchService, ServiceLimits
from lookalike.server.status import public_message, status_of

if TYPE_CHECKING:
    from lookalike.dedup.finder import DuplicateImage

_log = logging.getLogger(__name__)

# Catalog ids are positive SQLite integers.
ImageId = Annotated[int, PathParam(ge=1, le=2**63 - 1, description="catalog id of an image")]

# Multipart framing and form fields on top of the image itself.
_FORM_OVERHEAD = 64 * 1024

# What the filter and sort fields of /search and /images/{id}/similar take.
_WHERE_HELP = (
    "a metadata filter KEY OP VALUE, OP one of = != >= <= > < ~= (~= case-insensitive "
    "substring); dates compare as dates (taken>=2024-01-01), numbers as numbers; repeat the "
    "field for several, all must hold; images without the key never match"
)
_NEAR_HELP = "LAT,LON,KM: only photos whose GPS position is within KM km of LAT,LON"
_WITHIN_HELP = "S,W,N,E: only photos whose GPS position is inside this box (degrees)"
_SORT_HELP = (
    "order the k best results by a metadata key (taken; -taken for newest first), those "
    "without it last; default: by score"
)

DedupMethod = Literal["exact", "perceptual", "embedding", "verified"]


class Match(BaseModel):
    """One search result. A copy search (``copies``) also gives ``copy_probability``, the
    calibrated probability that it is a copy of the query, and ``transform``, how the query
    was made from this image (null when too few keypoints agree to say)."""

    id: int
    score: float
    filename: str
    width: int
    height: int
    metadata: dict[str, Any] = Field(default_factory=dict)
    url: str
    thumbnail_url: str
    copy_probability: float | None = None
    transform: TransformReply | None = None


class SearchReply(BaseModel):
    """Results, best first; ``no_close_match`` when the threshold removed every candidate.
    ``next_offset`` is the ``offset`` of the next page, null when this page came back short
    (a full page may be followed by an empty one). ``partial`` is true when part of a sharded
    index did not answer: the results are the best of the shards that did."""

    results: list[Match]
    metric: str
    threshold: float | None
    no_close_match: bool
    best_score: float | None
    offset: int = 0
    next_offset: int | None = None
    partial: bool = False


class ImageItem(BaseModel):
    """One image of the collection."""

    id: int
    filename: str
    width: int
    height: int
    metadata: dict[str, Any] = Field(default_factory=dict)
    url: str
    thumbnail_url: str


class BrowseReply(BaseModel):
    """One page of the collection; ``total`` images pass the filters."""

    items: list[ImageItem]
    total: int
    offset: int
    next_offset: int | None


class TransformReply(BaseModel):
    """What turned the keeper into a verified duplicate: mirrored left to right or not, then
    rotated ``rotation_degrees`` counter-clockwise and scaled by ``scale`` (its size over the
    keeper's), as ``inliers`` matched keypoints agree."""

    rotation_degrees: float
    scale: float
    mirrored: bool
    inliers: int


class DuplicateItem(ImageItem):
    """One image of a group of duplicates: ``score`` compares it with the suggested keeper
    (cosine, or differing bits for the perceptual method; null for the keeper and exact
    copies), ``inliers`` counts verified matches and ``transform`` estimates the edit
    (verified method only)."""

    size: int
    modified: float
    score: float | None = None
    inliers: int | None = None
    transform: TransformReply | None = None


class DuplicateGroupReply(BaseModel):
    """Images judged duplicates of ``keeper``, the one suggested to keep."""

    keeper: DuplicateItem
    duplicates: list[DuplicateItem]


class DuplicatesReply(BaseModel):
    """One page of the groups of duplicates (``total`` groups, ``duplicates`` images besides
    their keepers, among ``images``); ``can_move`` says whether this server moves them."""

    method: str
    threshold: float | None
    min_inliers: int | None
    images: int
    total: int
    duplicates: int
    failed: int
    offset: int
    next_offset: int | None
    can_move: bool
    groups: list[DuplicateGroupReply]


class MoveChoice(BaseModel):
    """The keeper of one group and the ids of its images to move."""

    keeper: int = Field(ge=1, le=2**63 - 1)
    move: list[Annotated[int, Field(ge=1, le=2**63 - 1)]] = Field(min_length=1, max_length=1000)


class MoveRequest(BaseModel):
    """Which duplicates to move, among those found by ``method`` (and ``threshold``,
    ``min_inliers``) as GET /duplicates found them; ``confirm`` must be true."""

    confirm: bool = False
    method: DedupMethod = "verified"
    threshold: float | None = Field(default=None, allow_inf_nan=False)
    min_inliers: int | None = Field(default=None, ge=3, le=10_000)
    groups: list[MoveChoice] = Field(min_length=1, max_length=10_000)


class MovedImage(BaseModel):
    """What happened to one image asked to move: ``moved``, or why it was left in place
    (``target exists``, ``source missing``, ``failed: ...``)."""

    id: int
    filename: str
    status: str


class MoveReply(BaseModel):
    """How many of the chosen duplicates moved (out of the collection), and each outcome."""

    moved: int
    skipped: int
    results: list[MovedImage]


class Added(BaseModel):
    """The id of an image that was added."""

    id: int


def _error_reply(error: BaseException, service: SearchService) -> JSONResponse:
    """The answer to an error, by the shared table (lookalike.server.status): server faults
    are logged in full and answered with a fixed message, client errors with their own text
    scrubbed of server paths and database URLs."""
    entry = status_of(error)
    if entry.server_fault:
        _log.error("request failed: %s", error, exc_info=error)
    return JSONResponse(
        {"detail": public_message(error, service.private_locations())},
        status_code=entry.http,
    )


def _chunks(handle: BinaryIO, size: int) -> Iterator[bytes]:
    """The first ``size`` bytes of an open file, a chunk at a time; closes it."""
    with handle:
        while size > 0:
            chunk = handle.read(min(size, 1 << 20))
            if not chunk:
                return
            size -= len(chunk)
            yield chunk


def _parse_weights(text: str | None) -> list[float] | None:
    """The ``weights`` form field: comma-separated numbers."""
    if text is None or not text.strip():
        return None
    try:
        return [float(item) for item in text.split(",")]
    except ValueError:
        raise RequestError(
            "weights takes comma-separated numbers (images, negatives, text)"
        ) from None


def _reply(
    response: SearchResponse, *, k: int, offset: int, max_depth: int, sort: str | None
) -> SearchReply:
    """The reply of one page of results (``response`` holds that page only); the next page
    is offered while it stays within ``max_depth`` results, and never for a sorted search
    (the k best in that order are all it lists)."""
    more = len(response.results) == k and offset + 2 * k <= max_depth and not parse_sort(sort)
    return SearchReply(
        results=[
            Match(
                id=r.id,
                score=r.score,
                filename=os.path.basename(r.path),
                width=r.width,
                height=r.height,
                metadata=r.metadata,
                url=f"/images/{r.id}",
                thumbnail_url=f"/images/{r.id}/thumbnail",
                copy_probability=r.copy_probability,
                transform=None if r.transform is None else TransformReply(**asdict(r.transform)),
            )
            for r in response.results
        ],
        metric=response.metric.value,
        threshold=response.threshold,
        # A later page that is empty means the list ended, not that nothing was close.
        no_close_match=response.no_close_match and offset == 0,
        best_score=response.best_score,
        offset=offset,
        partial=response.partial,
        next_offset=offset + k if more else None,
    )


def _item(record: ImageRecord) -> ImageItem:
    image_id = int(record.id or 0)
    return ImageItem(
        id=image_id,
        filename=os.path.basename(record.path),
        width=record.width,
        height=record.height,
        metadata=record.metadata,
        url=f"/images/{image_id}",
        thumbnail_url=f"/images/{image_id}/thumbnail",
    )


def _duplicate_item(image: DuplicateImage, records: dict[int, ImageRecord]) -> DuplicateItem:
    record = records.get(image.id)
    return DuplicateItem(
        id=image.id,
        filename=os.path.basename(image.path),
        width=image.width,
        height=image.height,
        metadata=record.metadata if record is not None else {},
        url=f"/images/{image.id}",
        thumbnail_url=f"/images/{image.id}/thumbnail",
        size=image.size,
        modified=image.mtime,
        score=image.score,
        inliers=image.inliers,
        transform=None if image.transform is None else TransformReply(**asdict(image.transform)),
    )


def _bearer(authorization: str | None) -> str | None:
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return None


async def _read_upload(upload: UploadFile, limits: ServiceLimits) -> bytes:
    data = await upload.read(limits.max_upload_bytes + 1)
    if len(data) > limits.max_upload_bytes:
        raise PayloadTooLargeError(
            f"{upload.filename or 'upload'}: exceeds the limit of {limits.max_upload_bytes} bytes"
        )
    return data


def create_app(service: SearchService, *, local_key: str | None = None) -> FastAPI:
    """The FastAPI app: the API under its paths, the web page at ``/``; with ``local_key``
    also the route ``lookalike search`` on this machine asks (:mod:`lookalike.server.local`)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.warm_up()  # the model and index load once, at startup
        yield

    app = FastAPI(
        title="lookalike",
        summary="Find the images that look like a query image.",
        version="1",
        lifespan=lifespan,
    )
    limits = service.limits
    page = resources.files("lookalike.server").joinpath("web/index.html").read_text("utf-8")
    if local_key:
        from lookalike.server.local import add_local_search

        add_local_search(app, service, local_key)

    @app.middleware("http")
    async def refuse_oversized_bodies(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limits.max_upload_bytes + _FORM_OVERHEAD:
            too_large = PayloadTooLargeError(
                f"request body exceeds {limits.max_upload_bytes} bytes"
            )
            return _error_reply(too_large, service)
        return await call_next(request)

    @app.exception_handler(LookalikeError)
    async def lookalike_error(_: Request, error: Exception) -> JSONResponse:
        return _error_reply(error, service)

    @app.exception_handler(Exception)
    async def unexpected_error(_: Request, error: Exception) -> JSONResponse:
        # Anything else is a fault of the server: logged here, "internal server error" there.
        return _error_reply(error, service)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def web_page() -> str:
        return page

    @app.get("/health", responses={503: {"description": "the catalog cannot be reached"}})
    def health() -> JSONResponse:
        """Readiness: the process answers and its catalog can be read (503 when not)."""
        state = service.health()
        return JSONResponse(state, status_code=200 if state["status"] == "ok" else 503)

    @app.get("/stats")
    def stats() -> dict[str, Any]:
        """How many images, which model and which index kind; and what the web page adapts
        to: ``text`` (the model embeds text), ``writes_need_token``, ``can_move_duplicates``
        and ``metadata_keys`` (each key with its kind: text, number or date)."""
        return {**service.stats(), **service.page_info()}

    @app.post("/search", response_model=SearchReply, responses={400: {}, 409: {}, 413: {}})
    async def search(
        image: Annotated[
            list[UploadFile] | None,
            File(description="the query image file; repeat the part for several positives"),
        ] = None,
        negative: Annotated[
            list[UploadFile] | None,
            File(description="a negative image to move away from (repeatable)"),
        ] = None,
        text: Annotated[
            str | None, Form(description="a text to combine with the images (CLIP models)")
        ] = None,
        weights: Annotated[
            str | None,
            Form(
                description="comma-separated positive weights, one per part in the order: "
                "images, negatives, text (default all 1)"
            ),
        ] = None,
        k: Annotated[int, Form(ge=1)] = 10,
        offset: Annotated[
            int, Form(ge=0, description="skip this many of the best (the next page)")
        ] = 0,
        metric: Annotated[str, Form(pattern="^(cosine|euclidean|dot)$")] = "cosine",
        threshold: Annotated[float | None, Form(allow_inf_nan=False)] = None,
        where: Annotated[list[str], Form(description=_WHERE_HELP)] = [],  # noqa: B006
        near: Annotated[str | None, Form(description=_NEAR_HELP)] = None,
        within: Annotated[str | None, Form(description=_WITHIN_HELP)] = None,
        sort: Annotated[str | None, Form(max_length=200, description=_SORT_HELP)] = None,
        query_expansion: Annotated[int, Form(ge=0, le=100)] = 0,
        rerank: Annotated[
            int, Form(ge=0, description="verify the best N by local features (0 to max k)")
        ] = 0,
        multi_crop: Annotated[
            bool,
            Form(
                description="also search with the query's centre and corner crops "
                "(single-image queries only)"
            ),
        ] = False,
        copy_views: Annotated[
            bool,
            Form(
                description="put candidates whose thumbnails show the query's pixels first, "
                "and also search with a rotated copy turned upright and a framed one without "
                "its border, so "
                "edited copies are found (single-image queries; default on)"
            ),
        ] = True,
        copies: Annotated[
            bool,
            Form(
                description="only verified copies of the image (local features), each with "
                "copy_probability and transform (needs local features)"
            ),
        ] = False,
    ) -> SearchReply:
        """The k indexed images most like the uploaded one, or like a combined query: the
        weighted sum of the parts' normalised vectors (negatives subtracted), renormalised.
        A text alone is a text search (CLIP models)."""
        image = image or []
        negatives = negative or []
        if len(image) + len(negatives) > MAX_QUERY_PARTS:
            raise RequestError(f"a query may have at most {MAX_QUERY_PARTS} parts")
        images = [await _read_upload(upload, limits) for upload in image]
        negative_data = [await _read_upload(upload, limits) for upload in negatives]
        parsed_weights = _parse_weights(weights)
        filters = parse_where(where)

        def run() -> SearchResponse:
            return service.search_many(
                images,
                negatives=negative_data,
                text=text or None,  # a form's empty field: no text
                weights=parsed_weights,
                names=[upload.filename or "upload" for upload in image],
                offset=offset,
                k=k,
                metric=metric,
                threshold=threshold,
                where=filters,
                near=near,
                within=within,
                sort=sort,
                query_expansion=query_expansion,
                rerank=rerank,
                multi_crop=multi_crop,
                copy_views=copy_views,
                copies=copies,
            )

        # Decoding and inference are CPU work: off the event loop, so it keeps accepting.
        response = await run_in_threadpool(run)
        return _reply(response, k=k, offset=offset, max_depth=limits.max_depth, sort=sort)

    @app.get("/images/{image_id}/similar", response_model=SearchReply, responses={404: {}})
    def similar(
        image_id: ImageId,
        k: Annotated[int, Query(ge=1)] = 10,
        offset: Annotated[int, Query(ge=0, description="skip this many of the best")] = 0,
        metric: Annotated[str, Query(pattern="^(cosine|euclidean|dot)$")] = "cosine",
        threshold: Annotated[float | None, Query(allow_inf_nan=False)] = None,
        where: Annotated[list[str], Query(description=_WHERE_HELP)] = [],  # noqa: B006
        near: Annotated[str | None, Query(description=_NEAR_HELP)] = None,
        within: Annotated[str | None, Query(description=_WITHIN_HELP)] = None,
        sort: Annotated[str | None, Query(max_length=200, description=_SORT_HELP)] = None,
    ) -> SearchReply:
        """The k indexed images most like an indexed one (from its stored vector)."""
        response = service.search_by_id(
            image_id,
            offset=offset,
            k=k,
            metric=metric,
            threshold=threshold,
            where=parse_where(where),
            near=near,
            within=within,
            sort=sort,
        )
        return _reply(response, k=k, offset=offset, max_depth=limits.max_depth, sort=sort)

    @app.get("/images", response_model=BrowseReply, responses={400: {}})
    def browse(
        offset: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, description="images per page")] = 50,
        where: Annotated[list[str], Query(description=_WHERE_HELP)] = [],  # noqa: B006
        near: Annotated[str | None, Query(description=_NEAR_HELP)] = None,
        within: Annotated[str | None, Query(description=_WITHIN_HELP)] = None,
        sort: Annotated[
            str,
            Query(
                max_length=200,
                description="path (default), mtime, or a metadata key such as taken; a "
                "leading - sorts descending",
            ),
        ] = "",
    ) -> BrowseReply:
        """The whole collection, a page at a time, filtered and sorted."""
        records, total = service.browse(
            offset=offset, limit=limit, where=where, near=near, within=within, sort=sort
        )
        end = offset + len(records)
        return BrowseReply(
            items=[_item(record) for record in records],
            total=total,
            offset=offset,
            next_offset=end if end < total else None,
        )

    @app.get("/duplicates", response_model=DuplicatesReply, responses={400: {}})
    def duplicates(
        method: Annotated[
            DedupMethod | None, Query(description="how duplicates are judged (default verified)")
        ] = None,
        threshold: Annotated[float | None, Query(allow_inf_nan=False)] = None,
        min_inliers: Annotated[int | None, Query(ge=3, le=10_000)] = None,
        offset: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=200, description="groups per page")] = 20,
    ) -> DuplicatesReply:
        """Groups of near-duplicate images, each with its suggested keeper (the most pixels,
        then the oldest file); found once per state of the collection, then paged."""
        report = service.duplicates(method=method, threshold=threshold, min_inliers=min_inliers)
        page = report.groups[offset : offset + limit]
        records = service.records([m.id for g in page for m in g.members])
        end = offset + len(page)
        return DuplicatesReply(
            method=report.method.value,
            threshold=report.threshold,
            min_inliers=report.min_inliers,
            images=report.images,
            total=len(report.groups),
            duplicates=report.duplicates,
            failed=len(report.failed),
            offset=offset,
            next_offset=end if end < len(report.groups) else None,
            can_move=service.duplicates_to is not None,
            groups=[
                DuplicateGroupReply(
                    keeper=_duplicate_item(group.keeper, records),
                    duplicates=[_duplicate_item(d, records) for d in group.duplicates],
                )
                for group in page
            ],
        )

    @app.post("/duplicates/move", response_model=MoveReply, responses={400: {}, 401: {}})
    def move_duplicates(
        request: MoveRequest, authorization: Annotated[str | None, Header()] = None
    ) -> MoveReply:
        """Move the chosen duplicates out of the collection, into the folder the server was
        started with (``lookalike serve --duplicates-to DIR``): needs the bearer token when
        one is configured, and ``confirm: true``. Files are never deleted or overwritten; a
        move whose target exists is skipped and reported."""
        service.check_token(_bearer(authorization))
        if service.duplicates_to is not None and not request.confirm:
            raise RequestError("moving files needs confirm: true")
        outcomes = service.move_duplicates(
            [(choice.keeper, choice.move) for choice in request.groups],
            method=request.method,
            threshold=request.threshold,
            min_inliers=request.min_inliers,
        )
        results = [
            MovedImage(id=image_id, filename=os.path.basename(move.source), status=move.status)
            for image_id, move in outcomes
        ]
        from lookalike.dedup.moving import MOVED

        moved = sum(1 for r in results if r.status == MOVED)
        return MoveReply(moved=moved, skipped=len(results) - moved, results=results)

    @app.get("/images/{image_id}", response_class=FileResponse, responses={404: {}, 409: {}})
    def original(image_id: ImageId) -> Response:
        """The indexed file itself, only while it is still the file that was indexed (409
        when it changed since)."""
        record, handle = service.open_file(image_id)
        name = os.path.basename(record.path)
        media_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        return StreamingResponse(
            _chunks(handle, record.size),
            media_type=media_type,
            headers={"Content-Length": str(record.size)},
        )

    @app.get(
        "/images/{image_id}/thumbnail",
        responses={200: {"content": {"image/jpeg": {}}}, 404: {}, 409: {}},
    )
    def thumbnail(image_id: ImageId) -> Response:
        """A small JPEG of the image (409 when its file changed since it was indexed)."""
        try:
            data = service.thumbnail(image_id)
        except ImageError as error:
            raise NotFoundError(f"image {image_id} can no longer be read: {error.reason}") from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.post("/images", status_code=201, response_model=Added, responses={401: {}, 400: {}})
    async def add(
        image: Annotated[UploadFile, File(description="the image file to add")],
        metadata: Annotated[str, Form(description="JSON object of metadata")] = "{}",
        authorization: Annotated[str | None, Header()] = None,
    ) -> Added:
        """Add an image to the collection (needs the bearer token when one is configured)."""
        service.check_token(_bearer(authorization))
        try:
            fields = json.loads(metadata)
        except json.JSONDecodeError as error:
            raise RequestError(f"metadata is not valid JSON: {error}") from None
        if not isinstance(fields, dict):
            raise RequestError("metadata must be a JSON object")
        data = await _read_upload(image, limits)
        added = await run_in_threadpool(
            service.add, data, filename=image.filename or "", metadata=fields
        )
        return Added(id=added)

    @app.delete("/images/{image_id}", status_code=204, responses={401: {}, 404: {}})
    def remove(
        image_id: ImageId, authorization: Annotated[str | None, Header()] = None
    ) -> Response:
        """Remove an image (needs the bearer token when one is configured)."""
        service.check_token(_bearer(authorization))
        service.remove(image_id)
        return Response(status_code=204)

    return app


def create_app_from_env() -> FastAPI:
    """App factory for ``uvicorn --factory`` and multi-worker serving: the collection folder
    comes from $LOOKALIKE_COLLECTION, its catalog from $LOOKALIKE_DB when set, the token
    from $LOOKALIKE_TOKEN, the folder duplicates move to from $LOOKALIKE_DUPLICATES_TO, and
    the key of the local route from $LOOKALIKE_LOCAL_KEY (set by ``lookalike serve``)."""
    path = os.environ.get("LOOKALIKE_COLLECTION")
    if not path:
        raise LookalikeError("set LOOKALIKE_COLLECTION to the collection folder to serve")
    threads = os.environ.get("LOOKALIKE_THREADS")
    collection = Collection(
        path, db=os.environ.get("LOOKALIKE_DB") or None, threads=int(threads) if threads else None
    )
    service = SearchService(
        collection,
        token=os.environ.get("LOOKALIKE_TOKEN"),
        duplicates_to=os.environ.get("LOOKALIKE_DUPLICATES_TO") or None,
    )
    return create_app(service, local_key=os.environ.get("LOOKALIKE_LOCAL_KEY") or None)
