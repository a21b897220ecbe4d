"""Re-ranking search results with local features: for a Collection and for benchmarks."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

import numpy as np
from PIL import Image, ImageOps

from lookalike.errors import LookalikeError
from lookalike.images import ImageSource, load_image
from lookalike.knn.base import Metric
from lookalike.local.errors import CorruptLocalFeaturesError
from lookalike.local.features import (
    DATABASE_CONFIG,
    QUERY_CONFIG,
    LocalFeatures,
    SiftConfig,
    extract,
)
from lookalike.local.matching import DEFAULT_RULE, RerankRule, rerank

if TYPE_CHECKING:
    from lookalike.core.collection import Collection, SearchResponse

# The catalog setting that names the kind of local features a collection stores.
LOCAL_FEATURES_SETTING = "local_features"

FeaturesLookup = Callable[[Sequence[int]], Sequence[LocalFeatures | None]]

T = TypeVar("T")


def query_features(
    query: ImageSource, config: SiftConfig = QUERY_CONFIG, *, mirror: bool = False
) -> list[LocalFeatures]:
    """The query's features, and those of its mirror image too when ``mirror`` is set
    (a similarity cannot map a mirrored copy onto its source)."""
    image = query if isinstance(query, Image.Image) else load_image(query)
    found = [extract(image, config)]
    if mirror:
        found.append(extract(ImageOps.mirror(image.convert("RGB")), config))
    return found


def rerank_candidates(
    queries: Sequence[LocalFeatures],
    candidates: Sequence[tuple[int, float, LocalFeatures | None]],
    rule: RerankRule = DEFAULT_RULE,
) -> np.ndarray:
    """``rerank`` with the best of several query views (e.g. the query and its mirror)."""
    scores = [rerank(view, candidates, rule=rule) for view in queries]
    return np.max(np.stack(scores), axis=0)


class LocalReranker:
    """A ``rerank`` hook for :func:`lookalike.evaluation.copydetect.run_copy_detection`.

    ``features_for`` returns the stored local features of database positions (None for an
    image that has none); the query is decoded only here, once per call.
    """

    def __init__(
        self,
        features_for: FeaturesLookup,
        *,
        query_config: SiftConfig = QUERY_CONFIG,
        rule: RerankRule = DEFAULT_RULE,
        mirror: bool = False,
    ) -> None:
        self.features_for = features_for
        self.query_config = query_config
        self.rule = rule
        self.mirror = mirror

    def __call__(
        self, query: Image.Image, candidate_ids: np.ndarray, scores: np.ndarray
    ) -> np.ndarray:
        ids = [int(i) for i in candidate_ids]
        features = self.features_for(ids)
        views = query_features(query, self.query_config, mirror=self.mirror)
        candidates = list(
            zip(ids, np.asarray(scores, dtype=np.float64).tolist(), features, strict=True)
        )
        return rerank_candidates(views, candidates, self.rule)


def collection_kind(collection: Collection) -> str:
    """The kind of local features a collection stores (the default configuration's if unset)."""
    return collection.catalog.get_setting(LOCAL_FEATURES_SETTING) or DATABASE_CONFIG.kind


def rerank_response(
    collection: Collection,
    query: ImageSource,
    response: SearchResponse,
    n: int,
    *,
    k: int | None = None,
    threshold: float | None = None,
    rule: RerankRule = DEFAULT_RULE,
    query_config: SiftConfig = QUERY_CONFIG,
    mirror: bool = False,
) -> SearchResponse:
    """``response`` with its first ``n`` results re-scored by local-feature verification
    (see :func:`lookalike.local.matching.rerank`), re-sorted, cut to ``k`` and filtered by
    ``threshold`` on the new scores (verification only raises scores, so a verified copy
    passes whatever threshold its cosine passed). Results without stored features keep their
    score; database images are never decoded. Corrupt stored features count as missing.

    ``response`` must rank by cosine (the rule moves scores towards 1), searched with at
    least ``max(n, k)`` results and no threshold, so that nothing is cut before verifying.
    """
    check_rerank(response, n)

    def sift_scores(head: list) -> np.ndarray:
        features = stored_local_features(
            collection, [r.id for r in head], collection_kind(collection), LocalFeatures.from_bytes
        )
        views = query_features(query, query_config, mirror=mirror)
        candidates = [(r.id, r.score, f) for r, f in zip(head, features, strict=True)]
        return rerank_candidates(views, candidates, rule)

    return rescore_response(response, n, sift_scores, k=k, threshold=threshold)


def check_rerank(response: SearchResponse, n: int) -> None:
    """Raise ``LookalikeError`` unless the first ``n`` results of ``response`` can be
    re-scored (``n`` is not negative, and the search ranked by cosine)."""
    if n < 0:
        raise LookalikeError(f"rerank must be 0 or more, got {n}")
    if n and response.metric is not Metric.COSINE:
        raise LookalikeError(
            f"re-ranking needs cosine scores; this search used {response.metric.value}"
        )


def stored_local_features(
    collection: Collection, ids: Sequence[int], kind: str, decode: Callable[[bytes], T]
) -> list[T | None]:
    """The local features of ``kind`` the catalog stores for ``ids``, decoded, in order; None
    for an image without them or with corrupt ones (its global score still ranks it)."""
    stored = collection.catalog.local_features(ids, kind)
    features: list[T | None] = []
    for image_id in ids:
        data = stored.get(image_id)
        try:
            features.append(None if data is None else decode(data))
        except CorruptLocalFeaturesError:
            features.append(None)
    return features


def rescore_response(
    response: SearchResponse,
    n: int,
    scores_of: Callable[[list], np.ndarray],
    *,
    k: int | None = None,
    threshold: float | None = None,
) -> SearchResponse:
    """``response`` with its first ``n`` results given the scores ``scores_of(results)``
    returns (never lower than their own), re-sorted, cut to ``k`` and filtered by
    ``threshold``."""
    results = list(response.results)
    head, tail = results[:n], results[n:]
    if head:
        scores = scores_of(head)
        order = np.argsort(-scores, kind="stable")
        head = [dataclasses.replace(head[i], score=float(scores[i])) for i in order]
    # Unverified results keep their scores, which are sorted, so head + tail stays sorted.
    results = head + tail
    if k is not None:
        results = results[:k]
    if threshold is not None:
        results = [r for r in results if r.score >= threshold]
    best = max((r.score for r in head + tail), default=None)
    return dataclasses.replace(response, results=results, threshold=threshold, best_score=best)
