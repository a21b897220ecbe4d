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
from importlib import resources
from typing import Annotated, Any, BinaryIO

from fastapi import FastAPI, File, Form, Header, Query, Request, Response, UploadFile
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from lookalike.core.collection import Collection
from lookalike.core.filters import parse_where
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

_log = logging.getLogger(__name__)

# Catalog ids are positive SQLite integers.
ImageId = Annotated[int, PathParam(ge=1, le=2**63 - 1, description="catalog id of an image")]

# Multipart framing and form fields on top of the image itself.
_FORM_OVERHEAD = 64 * 1024


class Match(BaseModel):
    """One search result."""

    id: int
    score: float
    filename: str
    width: int
    height: int
    metadata: dict[str, Any] = Field(default_factory=dict)
    url: str
    thumbnail_url: str


class SearchReply(BaseModel):
    """Results, best first; ``no_close_match`` when the threshold removed every candidate."""

    results: list[Match]
    metric: str
    threshold: float | None
    no_close_match: bool
    best_score: float | None


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


def _reply(response: SearchResponse) -> SearchReply:
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
            )
            for r in response.results
        ],
        metric=response.metric.value,
        threshold=response.threshold,
        no_close_match=response.no_close_match,
        best_score=response.best_score,
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


def create_app(service: SearchService) -> FastAPI:
    """The FastAPI app: the API under its paths, the web page at ``/``."""

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
        """How many images, which model and which index kind."""
        return service.stats()

    @app.post("/search", response_model=SearchReply, responses={400: {}, 409: {}, 413: {}})
    async def search(
        image: Annotated[
            list[UploadFile],
            File(description="the query image file; repeat the part for several positives"),
        ],
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
        metric: Annotated[str, Form(pattern="^(cosine|euclidean|dot)$")] = "cosine",
        threshold: Annotated[float | None, Form(allow_inf_nan=False)] = None,
        where: Annotated[list[str], Form(description="metadata filters, KEY=VALUE")] = [],  # noqa: B006
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
    ) -> SearchReply:
        """The k indexed images most like the uploaded one, or like a combined query: the
        weighted sum of the parts' normalised vectors (negatives subtracted), renormalised."""
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
                k=k,
                metric=metric,
                threshold=threshold,
                where=filters,
                query_expansion=query_expansion,
                rerank=rerank,
                multi_crop=multi_crop,
            )

        # Decoding and inference are CPU work: off the event loop, so it keeps accepting.
        return _reply(await run_in_threadpool(run))

    @app.get("/images/{image_id}/similar", response_model=SearchReply, responses={404: {}})
    def similar(
        image_id: ImageId,
        k: Annotated[int, Query(ge=1)] = 10,
        metric: Annotated[str, Query(pattern="^(cosine|euclidean|dot)$")] = "cosine",
        threshold: Annotated[float | None, Query(allow_inf_nan=False)] = None,
    ) -> SearchReply:
        """The k indexed images most like an indexed one (from its stored vector)."""
        return _reply(service.search_by_id(image_id, k=k, metric=metric, threshold=threshold))

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
    comes from $LOOKALIKE_COLLECTION, its catalog from $LOOKALIKE_DB when set, and the token
    from $LOOKALIKE_TOKEN."""
    path = os.environ.get("LOOKALIKE_COLLECTION")
    if not path:
        raise LookalikeError("set LOOKALIKE_COLLECTION to the collection folder to serve")
    threads = os.environ.get("LOOKALIKE_THREADS")
    collection = Collection(
        path, db=os.environ.get("LOOKALIKE_DB") or None, threads=int(threads) if threads else None
    )
    service = SearchService(collection, token=os.environ.get("LOOKALIKE_TOKEN"))
    return create_app(service)
