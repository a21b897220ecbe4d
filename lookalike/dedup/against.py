"""Which new images already exist in a reference: a query set checked against a collection
(or the part of it under one folder), without grouping the reference against itself.

Each query image is compared only with reference images, by the same methods and thresholds
as :func:`lookalike.dedup.find_duplicates`: ``exact`` (same bytes), ``perceptual`` (pHash
bits, the mirror image too), ``embedding`` (cosine of the query's vector and the stored
vectors, candidates from the collection's index) and ``verified`` (embedding candidates
confirmed by the copy test of :mod:`lookalike.dedup.verification`, the mirrored query tried
too, with the estimated transform). As in ``find_duplicates``, ``verified`` also takes the
reference images that share the query's visual words (:mod:`lookalike.local.words`), so a
copy rotated or cropped far below the threshold is still found: from every reference image's
stored local features (``index --local-features``) and, for a reference of at most
``EXTRACT_AT_MOST`` images without them, from features extracted for the check. Query images
are read from their files and never added to the collection.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lookalike.dedup.finder import (
    DEFAULT_METHOD,
    NEIGHBOURS,
    Method,
    _check_threshold,
    _Scope,
    _scope,
    check_min_inliers,
    copy_rule,
)
from lookalike.errors import DedupError, ImageError

if TYPE_CHECKING:
    from lookalike.core.collection import Collection
    from lookalike.dedup.verification import PairCheck, Verifier
    from lookalike.local.alignment import PixelAlignment
    from lookalike.local.features import LocalFeatures
    from lookalike.local.matching import EstimatedTransform
    from lookalike.local.words import WordLookup

# Reference matches kept per query image, best first.
DEFAULT_MAX_MATCHES = 5
# Reference images sharing the most visual words with a query that are verified besides its
# embedding candidates: a photo kept several times in the reference has as many copies.
WORD_CANDIDATES = 10
# Reference images without stored local features are read and their features extracted for
# the visual words only up to this many (about 30 ms each); a larger reference uses the
# stored ones alone.
EXTRACT_AT_MOST = 2_000


@dataclass(frozen=True)
class ReferenceMatch:
    """A reference image a query image duplicates. ``score``: cosine similarity
    (``embedding``, ``verified``), differing bits (``perceptual``), None for ``exact``;
    ``inliers``: verified SIFT matches and ``transform``: what turned the reference image
    into the query image (``verified`` only)."""

    id: int
    path: str
    width: int
    height: int
    score: float | None = None
    inliers: int | None = None
    transform: EstimatedTransform | None = None


@dataclass(frozen=True)
class QueryResult:
    """One query image and the reference images it duplicates, best first (none: new)."""

    path: str
    matches: list[ReferenceMatch] = field(default_factory=list)

    @property
    def found(self) -> bool:
        """Whether the image already exists in the reference."""
        return bool(self.matches)


@dataclass
class AgainstReport:
    """What a check of query images against a reference found. ``failed`` lists (path,
    reason) of query files that could not be read, and reference files that could not be
    read now or when they were indexed."""

    method: Method
    threshold: float | None
    min_inliers: int | None
    reference_images: int
    results: list[QueryResult] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def found(self) -> list[QueryResult]:
        """The query images that already exist in the reference."""
        return [r for r in self.results if r.found]

    @property
    def new(self) -> list[QueryResult]:
        """The query images the reference does not hold."""
        return [r for r in self.results if not r.found]


def query_files(queries: str | Path) -> tuple[list[str], list[tuple[str, str]]]:
    """(image files, unreadable entries) of a query: one image file, or every image below
    a folder (the scan rules of indexing)."""
    from lookalike.core.ingest import scan_images

    path = Path(queries).expanduser()
    if path.is_file():
        return [str(path.resolve())], []
    if not path.is_dir():
        raise DedupError(f"{queries}: no such image file or folder")
    scan = scan_images(path.resolve())
    return sorted(scan.files), sorted(scan.failed)


def find_in_reference(
    queries: str | Path,
    reference: Collection,
    *,
    under: str | Path | None = None,
    method: str | Method = DEFAULT_METHOD,
    threshold: float | None = None,
    min_inliers: int | None = None,
    max_matches: int = DEFAULT_MAX_MATCHES,
    workers: int | None = None,
) -> AgainstReport:
    """Which images of ``queries`` (an image file or a folder) already exist in the
    ``reference`` collection (its images under the folder ``under`` only, when given),
    each with its best reference matches (at most ``max_matches``). Thresholds and
    ``min_inliers`` mean what they mean for ``find_duplicates``. The reference is never
    compared with itself, and a query file that is also in the reference is left out of
    the reference (it would find itself)."""
    started = time.perf_counter()
    method = Method.parse(method)
    threshold = _check_threshold(method, threshold)
    min_inliers = check_min_inliers(method, min_inliers)
    if max_matches < 1:
        raise DedupError(f"max_matches must be at least 1, got {max_matches}")
    paths, query_failures = query_files(queries)
    scope = _scope(reference, under)
    for path in paths:
        scope.states.pop(path, None)
    report = AgainstReport(method, threshold, min_inliers, len(scope.states))
    report.failed.extend(query_failures)
    report.failed.extend(scope.failures)
    if paths:
        check = _CHECKS[method]
        matches = (
            check(reference, scope, paths, threshold, min_inliers, workers, report.failed)
            if scope.states
            else {}
        )
        unreadable = {p for p, _ in report.failed}
        report.results = [
            QueryResult(path, matches.get(path, [])[:max_matches])
            for path in paths
            if path not in unreadable or matches.get(path)
        ]
    report.failed.sort()
    report.seconds = time.perf_counter() - started
    return report


# A check: (reference, scope, query paths, threshold, min_inliers, workers, failed) ->
# query path -> its matches, best first (queries without one may be left out).
Matches = dict[str, list[ReferenceMatch]]


# A reference image found for a query: (id, score, inliers, transform).
Found = tuple[int, float | None, int | None, "EstimatedTransform | None"]


def _matches(
    collection: Collection, found: Sequence[Found], order: Sequence[float]
) -> list[ReferenceMatch]:
    """ReferenceMatch of each found image, sorted by ``order`` (lower first), then path."""
    records = collection.catalog.images([item[0] for item in found])
    ranked = sorted(
        (
            (key, records[item[0]], item)
            for item, key in zip(found, order, strict=True)
            if item[0] in records
        ),
        key=lambda entry: (entry[0], entry[1].path),
    )
    return [
        ReferenceMatch(int(r.id or 0), r.path, r.width, r.height, score, inliers, transform)
        for _, r, (_, score, inliers, transform) in ranked
    ]


def _exact(
    collection: Collection,
    scope: _Scope,
    paths: list[str],
    threshold: float | None,
    min_inliers: int | None,
    workers: int | None,
    failed: list[tuple[str, str]],
) -> Matches:
    by_hash: dict[str, list[int]] = {}
    for state in scope.states.values():
        by_hash.setdefault(state.content_hash, []).append(state.id)
    found: Matches = {}
    for path in paths:
        try:
            with open(path, "rb") as handle:
                digest = hashlib.file_digest(handle, "sha256").hexdigest()
        except OSError as error:
            failed.append((path, error.strerror or str(error)))
            continue
        ids = by_hash.get(digest, [])
        if ids:
            found[path] = _matches(
                collection, [(i, None, None, None) for i in ids], [0.0] * len(ids)
            )
    return found


def _perceptual(
    collection: Collection,
    scope: _Scope,
    paths: list[str],
    threshold: float | None,
    min_inliers: int | None,
    workers: int | None,
    failed: list[tuple[str, str]],
) -> Matches:
    from lookalike.dedup.perceptual import CACHE_FILE, PerceptualHashCache, hash_files
    from lookalike.knn.binary import popcount

    assert threshold is not None  # every method but exact has one (see _check_threshold)
    files = sorted((path, state.content_hash) for path, state in scope.states.items())
    cache = PerceptualHashCache(Path(collection.path) / CACHE_FILE)
    ids, codes = [], []
    try:
        for hashed in hash_files(files, cache, workers=workers):
            if hashed.value is None:
                failed.append((hashed.path, hashed.error or "unreadable"))
                continue
            ids.append(scope.states[hashed.path].id)
            codes.append(hashed.value.code)
    finally:
        cache.close()
    if not ids:
        return {}
    # One 64-bit word per reference image: a query costs one XOR and popcount per image.
    words = np.frombuffer(b"".join(codes), dtype=">u8")
    found: Matches = {}
    # Query files are not in the cache (they are not catalogued): hashed afresh.
    for hashed in hash_files([(p, "") for p in paths], None, workers=workers):
        if hashed.value is None:
            failed.append((hashed.path, hashed.error or "unreadable"))
            continue
        code = np.frombuffer(hashed.value.code, dtype=">u8")[0]
        mirrored = np.frombuffer(hashed.value.mirrored, dtype=">u8")[0]
        bits = np.minimum(popcount(words ^ code), popcount(words ^ mirrored))
        hits = np.flatnonzero(bits <= threshold)
        if len(hits):
            scores = [float(bits[h]) for h in hits]
            found[hashed.path] = _matches(
                collection,
                [(ids[h], s, None, None) for h, s in zip(hits, scores, strict=True)],
                scores,
            )
    return found


def _unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    unit: np.ndarray = vectors / np.maximum(norms, 1e-12)
    return unit


def _candidates(
    collection: Collection, scope: _Scope, vector: np.ndarray, threshold: float
) -> list[tuple[int, float]]:
    """(reference id, cosine) at cosine >= threshold, from k-NN searches of the collection's
    index widened while its farthest hit still passes (a range search, as ``dedup`` does).
    The test is the plain cosine of the stored vectors, since the index's own scores may be
    centred or quantised; hits outside the scope count for widening but are dropped."""
    index = collection.vector_index("cosine")
    total = len(index)
    query = _unit(vector).reshape(1, -1)
    width = min(NEIGHBOURS, total)
    while True:
        hits = index.search(query, width)
        ids = hits.ids[0][hits.ids[0] >= 0]
        if not len(ids):
            return []
        found = _cosines(collection, vector, ids.tolist())
        if found[-1][1] < threshold or width >= total:
            break
        width = min(width * 4, total)
    inside = scope.id_set
    return [(i, c) for i, c in found if c >= threshold and i in inside]


def _embedded(
    collection: Collection, paths: list[str], failed: list[tuple[str, str]]
) -> list[tuple[str, np.ndarray]]:
    """(path, raw vector) of each query image that decodes, decoded as indexed images are."""
    embedded = []
    for path in paths:
        try:
            embedded.append((path, collection.embed(path)))
        except ImageError as error:
            failed.append((path, error.reason))
    return embedded


def _embedding(
    collection: Collection,
    scope: _Scope,
    paths: list[str],
    threshold: float | None,
    min_inliers: int | None,
    workers: int | None,
    failed: list[tuple[str, str]],
) -> Matches:
    assert threshold is not None  # every method but exact has one (see _check_threshold)
    found: Matches = {}
    for path, vector in _embedded(collection, paths, failed):
        hits = _candidates(collection, scope, vector, threshold)
        if hits:
            found[path] = _matches(
                collection, [(i, c, None, None) for i, c in hits], [-c for _, c in hits]
            )
    return found


def _verified(
    collection: Collection,
    scope: _Scope,
    paths: list[str],
    threshold: float | None,
    min_inliers: int | None,
    workers: int | None,
    failed: list[tuple[str, str]],
) -> Matches:
    from lookalike.dedup.verification import Verifier, check_pair
    from lookalike.local.matching import mirror_features

    # Both are set for the verified method (see _check_threshold and find_in_reference).
    assert threshold is not None and min_inliers is not None
    rule = copy_rule(min_inliers)
    verifier = Verifier(collection, failed)
    words = _word_lookup(verifier, scope, workers)
    found: Matches = {}
    for path, vector in _embedded(collection, paths, failed):
        query = _query_features(path, failed)
        if query is None:
            continue
        features, grey = query
        hits = dict(_candidates(collection, scope, vector, threshold))
        if words is not None:
            sharing = [i for i, _ in words.candidates(features, limit=WORD_CANDIDATES)]
            hits.update(_cosines(collection, vector, [i for i in sharing if i not in hits]))
        if not hits:
            continue
        verifier.prefetch(list(hits), workers)
        mirrored = mirror_features(features)
        confirmed: list[Found] = []
        for image_id, cosine in hits.items():
            target = verifier.features(image_id)
            if target is None:
                continue
            # Checked from the query; reversed, its transform turns the reference image into
            # the query, as find_duplicates reports a duplicate against its keeper.
            check = check_pair(features, target, mirrored=mirrored).reversed()
            if rule.confirms(check, partial(_aligned, verifier, image_id, check, grey)):
                confirmed.append((image_id, cosine, check.inliers, check.transform))
        if confirmed:
            found[path] = _matches(
                collection, confirmed, [-float(item[2] or 0) for item in confirmed]
            )
    return found


def _word_lookup(verifier: Verifier, scope: _Scope, workers: int | None) -> WordLookup | None:
    """The visual words of the reference scope (see ``EXTRACT_AT_MOST``)."""
    from lookalike.local.words import word_lookup

    ids = sorted(scope.id_set)
    return word_lookup(verifier, ids, workers, extract=len(ids) <= EXTRACT_AT_MOST)


def _cosines(collection: Collection, vector: np.ndarray, ids: list[int]) -> list[tuple[int, float]]:
    """(id, cosine of the query's vector and the stored one, plain: the index's own scores
    may be centred or quantised) of these reference images, in order."""
    if not ids:
        return []
    stored = _unit(collection.catalog.vectors_for(ids, collection.model_id))
    cosine = stored @ _unit(vector).reshape(-1)
    return [(i, float(c)) for i, c in zip(ids, cosine.tolist(), strict=True)]


def _aligned(
    verifier: Verifier, image_id: int, check: PairCheck, query: np.ndarray, refine: bool
) -> PixelAlignment:
    """The pixel alignment of a reference image and the query's grey pixels, by ``check``
    (reference to query)."""
    from lookalike.dedup.verification import aligned

    return aligned(check, verifier.grey(image_id), query, refine=refine)


def _query_features(
    path: str, failed: list[tuple[str, str]]
) -> tuple[LocalFeatures, np.ndarray] | None:
    """The query file's local features and its grey pixels in their frame (for the pixel
    test), from one read; None, noted in ``failed``, when it does not read."""
    from lookalike.images import load_image
    from lookalike.local.features import DATABASE_CONFIG, extract, frame_grey

    try:
        image = load_image(path, draft_size=DATABASE_CONFIG.max_side)
        features = extract(image, DATABASE_CONFIG)
    except ImageError as error:
        failed.append((path, error.reason))
        return None
    return features, frame_grey(image, features.width, features.height)


_CHECKS = {
    Method.EXACT: _exact,
    Method.PERCEPTUAL: _perceptual,
    Method.EMBEDDING: _embedding,
    Method.VERIFIED: _verified,
}

__all__ = [
    "DEFAULT_MAX_MATCHES",
    "AgainstReport",
    "QueryResult",
    "ReferenceMatch",
    "find_in_reference",
    "query_files",
]
