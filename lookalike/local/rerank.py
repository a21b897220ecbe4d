"""Re-scoring candidates by local-feature verification (SIFT), given their stored features."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
from PIL import Image, ImageOps

from lookalike.images import ImageSource, load_image
from lookalike.local.errors import CorruptLocalFeaturesError
from lookalike.local.features import (
    QUERY_CONFIG,
    LocalFeatures,
    SiftConfig,
    extract,
)
from lookalike.local.matching import DEFAULT_RULE, RerankRule, rerank

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
    best: np.ndarray = np.max(np.stack(scores), axis=0)
    return best


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


def decode_stored(
    stored: dict[int, bytes], ids: Sequence[int], decode: Callable[[bytes], T]
) -> list[T | None]:
    """The stored local features of ``ids``, decoded, in order: None for an image without
    them or with corrupt ones (its global score still ranks it)."""
    features: list[T | None] = []
    for image_id in ids:
        data = stored.get(image_id)
        try:
            features.append(None if data is None else decode(data))
        except CorruptLocalFeaturesError:
            features.append(None)
    return features
