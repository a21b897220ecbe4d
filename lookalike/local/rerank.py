"""Re-scoring candidates by local-feature verification (SIFT), given their stored features,
and telling copies apart: the probability that a candidate is the source of the query, with
the transform that made one from the other."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
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
    mirror_features,
)

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
        found.append(mirror_features(found[0]))
    return found


# -- copies -----------------------------------------------------------------------------------

# The "is a copy" probability is two logistic regressions fitted by
# ``benchmarks/copy_calibration.py fit`` on every candidate a copy search verified on the
# grocery-store train split (100 sources x 16 attacks plus 296 held-out photos without a copy;
# the query's source is the one positive). First the candidate alone:
#   P = 1 / (1 + exp(-(b0 + b1 ln(1 + inliers) + b2 sqrt(inliers) + b3 score)))
# (the square root beside the log lets it rise steeply between 30 and 100 inliers, where photos
# of one shelf end and copies begin: held-out log loss 0.046 against 0.062 with the log alone).
# Then in the query's context: the same terms plus b4 ln(1 + background), where background is
# the most inliers among the query's other verified candidates that alone are unlikely copies
# (how well anything else of that scene verifies). Alone, the probability fitted on
# grocery-store was far too cautious on clothing-small (every candidate at 0.1 or more was a
# copy; 74% of the copies reached 0.5); in context 93% do, and its expected calibration error
# there fell from 0.0095 to 0.0023 (benchmarks/results/copy_calibration.md), still cautious.
# The best other candidate's inliers instead of the background did better still on the suite
# (98%), but would count a second copy of the photo in the collection against the first.
COPY_CALIBRATION = (-10.564, -1.251, 1.221, 6.159)  # b0..b3, the candidate alone
COPY_CONTEXT_CALIBRATION = (-8.079, -0.481, 1.245, 6.505, -1.686)  # b0..b4, in context
# A candidate is returned as a copy from this probability on.
COPY_PROBABILITY = 0.5


@dataclass(frozen=True)
class CopyCheck:
    """One candidate checked as the source of a query: the RANSAC inliers of the better of
    the query and its mirror image, its global ``score``, ``probability`` that it is a copy
    (calibrated, see :func:`copy_probabilities`), and ``transform``, how the query was made
    from the candidate (None when too few keypoints agree to say)."""

    inliers: int
    probability: float
    transform: EstimatedTransform | None = None
    score: float = 0.0


def copy_probability(inliers: int, score: float, background: int | None = None) -> float:
    """The calibrated probability that a candidate with this many inliers and this global
    score (cosine, after copy views) is the source of the query: alone, or given the
    ``background`` (see ``COPY_CONTEXT_CALIBRATION``)."""
    count = max(0, inliers)
    terms = [1.0, math.log1p(count), math.sqrt(count), score]
    weights: tuple[float, ...] = COPY_CALIBRATION
    if background is not None:
        terms.append(math.log1p(max(0, background)))
        weights = COPY_CONTEXT_CALIBRATION
    logit = sum(w * t for w, t in zip(weights, terms, strict=True))
    return 1.0 / (1.0 + math.exp(-min(60.0, max(-60.0, logit))))


def copy_probabilities(inliers: Sequence[int], scores: Sequence[float]) -> list[float]:
    """The calibrated probabilities of all the verified candidates of one query, each in the
    context of the others: its background is the most inliers among the others whose
    probability alone is under ``COPY_PROBABILITY`` (so a second copy of the photo does not
    count against the first)."""
    alone = [copy_probability(i, s) for i, s in zip(inliers, scores, strict=True)]
    unlikely = sorted(
        (
            (int(i), k)
            for k, (i, p) in enumerate(zip(inliers, alone, strict=True))
            if p < COPY_PROBABILITY
        ),
        reverse=True,
    )
    found = []
    for k, (count, score) in enumerate(zip(inliers, scores, strict=True)):
        others = [i for i, j in unlikely[:2] if j != k]
        found.append(copy_probability(count, score, others[0] if others else 0))
    return found


def in_context(checks: Sequence[CopyCheck]) -> list[CopyCheck]:
    """``checks`` of one query with their probabilities in context (:func:`copy_probabilities`)."""
    probabilities = copy_probabilities([c.inliers for c in checks], [c.score for c in checks])
    return [replace(c, probability=p) for c, p in zip(checks, probabilities, strict=True)]


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


# A query view that verifies with this many inliers ends the search over views: fewer (but
# more than ``min_inliers``) and the mirror image is tried too, as a flipped copy of a nearly
# symmetric garment verifies weakly unmirrored (10-24 inliers for the 7.5% of clothing-small
# flips that a copy search missed) and strongly mirrored.
ENOUGH_INLIERS = 40


def best_verification(
    queries: Sequence[LocalFeatures], candidate: LocalFeatures, rule: RerankRule = DEFAULT_RULE
) -> tuple[int, Verification]:
    """(which query view, its verification) of the first view that verifies against
    ``candidate`` with ``ENOUGH_INLIERS``, else of the one with the most: the later views
    (a mirror) cost nothing when the first verifies well."""
    best: tuple[int, Verification] | None = None
    for position, view in enumerate(queries):
        found = rule.verify(view, candidate)
        if best is None or found.inliers > best[1].inliers:
            best = (position, found)
        if found.inliers >= max(rule.min_inliers, ENOUGH_INLIERS):
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
    :func:`rerank_candidates`. ``queries[0]`` is the query and any later views are its
    :func:`~lookalike.local.matching.mirror_features` (same rows), so a transform is fitted
    to the query's own points and a mirror shows as ``mirrored``. A candidate without
    features checks 0 inliers."""
    scores = np.empty(len(candidates), dtype=np.float64)
    checks = []
    for position, (_, score, features) in enumerate(candidates):
        scores[position] = float(score)
        if features is None or len(features) < rule.min_inliers:
            checks.append(CopyCheck(0, copy_probability(0, score), score=score))
            continue
        _, found = best_verification(queries, features, rule)
        scores[position] = rule.score(float(score), found.inliers)
        transform = _transform(queries[0], features, found)
        probability = copy_probability(found.inliers, score)
        checks.append(CopyCheck(found.inliers, probability, transform, score))
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
