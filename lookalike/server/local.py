"""The local route: ``lookalike search`` on the server's own machine asks the running server.

``lookalike serve`` announces the server in the collection folder with a random key (see
:mod:`lookalike.cli.remote`); this route answers only requests that carry that key, so only
someone who can read the collection folder (and so its catalog) gets answers from it. It
searches through the same path as ``POST /search`` (``SearchService.search_many``) and
answers the results as the library returns them, file paths included, so the command line
prints exactly what a local search prints. It is not part of the public API (not in the
OpenAPI schema), and the request names no file: the images travel as bytes.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import FastAPI, Header
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from lookalike.core.results import SearchResponse
from lookalike.errors import NotFoundError, RequestError
from lookalike.server.service import SearchService

LOCAL_SEARCH_PATH = "/local/search"  # lookalike.cli.remote.LOCAL_SEARCH_PATH


class LocalSearch(BaseModel):
    """A ``lookalike search``, as the command line parsed it; images as base64 file bytes."""

    images: list[str] = Field(default_factory=list)
    negatives: list[str] = Field(default_factory=list)
    names: list[str] = Field(default_factory=list)
    text: str | None = None
    weights: list[float] | None = None
    k: int = 10
    metric: str = "cosine"
    threshold: float | None = None
    where: list[str] = Field(default_factory=list)
    near: str | None = None
    within: str | None = None
    sort: str | None = None
    query_expansion: int = 0
    rerank: int = 0
    multi_crop: bool = False
    no_copy_views: bool = False
    copies: bool = False


def _decoded(items: list[str]) -> list[bytes]:
    try:
        return [base64.b64decode(item, validate=True) for item in items]
    except (binascii.Error, ValueError) as error:
        raise RequestError(f"an image is not valid base64 ({error})") from None


def add_local_search(app: FastAPI, service: SearchService, key: str) -> None:
    """Add the local route to ``app``, answering requests whose ``X-Lookalike-Key`` is
    ``key`` (others hear 404, as if there were no such route)."""

    @app.post(LOCAL_SEARCH_PATH, include_in_schema=False)
    async def local_search(
        body: LocalSearch,
        x_lookalike_key: Annotated[str | None, Header()] = None,
    ) -> dict[str, Any]:
        if x_lookalike_key is None or not hmac.compare_digest(x_lookalike_key, key):
            raise NotFoundError("no such route")
        images, negatives = _decoded(body.images), _decoded(body.negatives)

        def run() -> SearchResponse:
            return service.search_many(
                images,
                negatives=negatives,
                text=body.text,
                weights=body.weights,
                names=body.names,
                k=body.k,
                metric=body.metric,
                threshold=body.threshold,
                where=body.where,
                near=body.near,
                within=body.within,
                sort=body.sort,
                query_expansion=body.query_expansion,
                rerank=body.rerank,
                multi_crop=body.multi_crop,
                copy_views=not body.no_copy_views,
                copies=body.copies,
            )

        response = await run_in_threadpool(run)
        return {
            "metric": response.metric.value,
            "threshold": response.threshold,
            "no_close_match": response.no_close_match,
            "best_score": response.best_score,
            "partial": response.partial,
            "results": [asdict(result) for result in response.results],
        }
