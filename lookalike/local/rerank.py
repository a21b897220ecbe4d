"""Re-scoring candidates by local-feature verification (SIFT), given their stored features,
and telling copies apart: the probability that a candidate is the source of the query, with
the transform that made one from the other."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from PIL import Image

from lookalike.images import ImageSource, load_image
from lookalike.local.errors import CorruptLocalFeaturesError, LocalFeaturesError
from lookalike.local.features import (
    QUERY_CONFIG,
    LocalFeatures,
    SiftConfig,
    extract,
)
from lookalike.local.matching import (
    DEFAULT_RULE,
    EstimatedTransform,
    RerankRule,
    Verification,
    estimate_transform,
    verify,
)

# Where the SIFT descriptor of a mirrored patch takes each component from: OpenCV lays a
# descriptor out as 4 x 4 cells x 8 orientation bins in the keypoint's own frame, and a left-
# right mirror of the image mirrors that frame across its orientation axis: the cell rows
# swap and the orientation bins reverse (bin 0, the axis itself, stays).
_MIRROR_ORDER = np.arange(128).reshape(4, 4, 8)[::-1][..., (-np.arange(8)) % 8].reshape(-1).copy()

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
        found.append(mirrored(found[0]))
    return found


# -- copies -----------------------------------------------------------------------------------

# P(copy) = 1 / (1 + exp(-(b0 + b1 ln(1 + inliers) + b2 sqrt(inliers) + b3 score))): a
# logistic regression on every candidate a copy search verified on the grocery-store train
# split (100 sources x 16 attacks plus 296 held-out photos without a copy; the source is the
# one positive), fitted by ``benchmarks/copy_calibration.py fit``. The square root beside the
# log lets the probability rise steeply between 30 and 100 inliers, where same-shelf photos
# end and copies begin (held-out log loss 0.046 against 0.062 with the log alone). The
# reliability on clothing-small is in benchmarks/results/copy_calibration.md.
COPY_CALIBRATION = (-10.566, -1.250, 1.220, 6.160)
# A candidate is returned as a copy from this probability on.
COPY_PROBABILITY = 0.5


@dataclass(frozen=True)
class CopyCheck:
    """One candidate checked as the source of a query: the RANSAC inliers of the better of
    the query and its mirror image, ``probability`` that it is a copy (calibrated, see
    :func:`copy_probability`), and ``transform``, how the query was made from the candidate
    (None when too few keypoints agree to say)."""

    inliers: int
    probability: float
    transform: EstimatedTransform | None = None


def copy_probability(inliers: int, score: float) -> float:
    """The calibrated probability that a candidate with this many inliers and this global
    score (cosine, after copy views) is the source of the query."""
    bias, per_log, per_root, per_score = COPY_CALIBRATION
    count = max(0, inliers)
    logit = bias + per_log * math.log1p(count) + per_root * math.sqrt(count) + per_score * score
    return 1.0 / (1.0 + math.exp(-min(60.0, max(-60.0, logit))))


@dataclass(frozen=True)
class LogRerankRule(RerankRule):
    """:class:`RerankRule` with the bonus growing with the logarithm of the inliers:
    ``cosine + (1 - cosine) * weight * ln(1 + min(inliers, cap)) / ln(1 + cap)``. Photos of
    one shelf or one room verify too (up to ~60 inliers on grocery-store), so the linear
    rule's cap of 40 lifted them as high as a copy with 200; a log up to a far higher cap
    still ranks a copy above them and lifts a small copy's few inliers nearly as much."""

    def score(self, cosine: float, inliers: int) -> float:
        """The new score of a candidate with this cosine and this many inliers."""
        if inliers < self.min_inliers:
            return cosine
        gap = max(0.0, 1.0 - cosine)
        fraction = math.log1p(min(inliers, self.cap)) / math.log1p(self.cap)
        return cosine + gap * self.weight * fraction


# The rule search re-ranking uses. Tuned on the grocery-store train split (100 sources x 16
# attacks, the top 20 after copy views re-ranked, widened as ``search`` does): recall@1 0.953
# with the linear rule (cap 40, weight 0.9), 0.976 linear with cap 160, 0.981-0.983 with the
# log (cap 120-200, weight 0.9-1); mean micro-AP 0.828 linear cap 40, 0.933 log cap 160
# weight 0.9, 0.948 log cap 160 weight 1 (the best; cap 120 with weight 1 ties too many at 1).
SEARCH_RULE = LogRerankRule(cap=160, weight=1.0)


def mirrored(features: LocalFeatures) -> LocalFeatures:
    """The features of the mirror image (left to right), from these without extracting
    again: each point's x reflected, each descriptor's components permuted. On grocery-store
    flips it verified with 93-98% of the inliers of SIFT run on the mirrored pixels."""
    points = features.points.astype(np.float32)
    points[:, 0] = features.width - points[:, 0]
    return LocalFeatures(
        points,
        features.descriptors[:, _MIRROR_ORDER],
        features.width,
        features.height,
        features.scale,
    )


def best_verification(
    queries: Sequence[LocalFeatures], candidate: LocalFeatures, rule: RerankRule = DEFAULT_RULE
) -> tuple[int, Verification]:
    """(which query view, its verification) of the first view that verifies against
    ``candidate`` with at least ``rule.min_inliers`` inliers, else of the one with the most:
    the later views (a mirror) cost nothing when the first verifies."""
    best: tuple[int, Verification] | None = None
    for position, view in enumerate(queries):
        found = verify(
            view,
            candidate,
            ratio=rule.ratio,
            threshold=rule.threshold,
            min_matches=rule.min_inliers,
        )
        if best is None or found.inliers > best[1].inliers:
            best = (position, found)
        if found.inliers >= rule.min_inliers:
            break
    assert best is not None, "at least one query view"
    return best


def rerank_candidates(
    queries: Sequence[LocalFeatures],
    candidates: Sequence[tuple[int, float, LocalFeatures | None]],
    rule: RerankRule = DEFAULT_RULE,
) -> np.ndarray:
    """New scores (see :func:`lookalike.local.matching.rerank`) with the first of several
    query views that verifies (e.g. the query, then its mirror)."""
    return verified_candidates(queries, candidates, rule)[0]


def verified_candidates(
    queries: Sequence[LocalFeatures],
    candidates: Sequence[tuple[int, float, LocalFeatures | None]],
    rule: RerankRule = DEFAULT_RULE,
) -> tuple[np.ndarray, list[CopyCheck]]:
    """(new scores, copy checks) of (id, global score, features) candidates, as
    :func:`rerank_candidates`. ``queries[0]`` is the query and any later views are
    :func:`mirrored` from it (same rows), so a transform is fitted to the query's own points
    and a mirror shows as ``mirrored``. A candidate without features checks 0 inliers."""
    scores = np.empty(len(candidates), dtype=np.float64)
    checks = []
    for position, (_, score, features) in enumerate(candidates):
        scores[position] = float(score)
        if features is None or len(features) < rule.min_inliers:
            checks.append(CopyCheck(0, copy_probability(0, score)))
            continue
        _, found = best_verification(queries, features, rule)
        scores[position] = rule.score(float(score), found.inliers)
        transform = _transform(queries[0], features, found)
        checks.append(CopyCheck(found.inliers, copy_probability(found.inliers, score), transform))
    return scores, checks


def _transform(
    query: LocalFeatures, candidate: LocalFeatures, found: Verification
) -> EstimatedTransform | None:
    """How the query was made from the candidate, fitted to the verified inliers."""
    pairs = found.inlier_pairs
    if found.inliers < 3 or pairs is None or len(pairs) < 3:
        return None
    try:
        return estimate_transform(
            candidate.points[pairs[:, 1]],
            query.points[pairs[:, 0]],
            source_scale=candidate.scale,
            target_scale=query.scale,
            inliers=found.inliers,
        )
    except LocalFeaturesError:  # the inliers all sit on one point: no geometry to tell
        return None


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
