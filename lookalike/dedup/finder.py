"""Finding groups of duplicate images in a collection.

Methods:
- ``exact``: the same bytes (the catalog's SHA-256 content hash).
- ``perceptual``: 64-bit DCT pHashes within ``threshold`` differing bits, a flipped copy
  included (see :mod:`lookalike.dedup.perceptual`); candidates from a faiss binary index.
- ``embedding``: cosine similarity of the stored embeddings (L2-normalised, not centred, so a
  threshold means the same in every collection) at least ``threshold``; candidates from the
  collection's own vector index.
- ``verified`` (the default): copies confirmed by SIFT matching, the mirrored image tried
  too: one RANSAC similarity (any rotation, scale and crop) must explain nearly all
  tentative matches with at least ``min_inliers`` inliers, to a fraction of a pixel (see
  :mod:`lookalike.dedup.verification`); each duplicate reports the transform (rotation,
  scale, mirror). Candidates are images that share visual words of their keypoints (found
  whatever the embedding says, e.g. rotations; :mod:`lookalike.local.words`) and each
  image's nearest embedding neighbours at cosine ``threshold`` or more. Stored local
  features are used when the collection has them; otherwise every image in scope is read
  once to extract them.

Groups never come from an N x N comparison: candidates are k-NN searches of an index (or an
inverted file of words), linked into components, and each component is split into
star-shaped groups around a keeper (see :mod:`lookalike.dedup.grouping`), so every duplicate
in a group matched its keeper. The keeper is the image with the most pixels, then the oldest
file (modification time), then the path; for ``verified``, pixels of picture: the padded
corners of a copy rotated on a grown canvas do not count.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, cast

import numpy as np

from lookalike.catalog import FileState, ImageRecord
from lookalike.dedup.grouping import (
    SEARCH_BUDGET,
    hamming_pairs,
    neighbour_pairs,
    star_groups,
    union_find_groups,
)
from lookalike.errors import DedupError

if TYPE_CHECKING:
    from lookalike.core.collection import Collection
    from lookalike.dedup.verification import CopyRule, Verifier
    from lookalike.local.matching import EstimatedTransform


class Method(str, enum.Enum):
    """How two images are judged duplicates."""

    EXACT = "exact"
    PERCEPTUAL = "perceptual"
    EMBEDDING = "embedding"
    VERIFIED = "verified"

    @classmethod
    def parse(cls, value: str | Method) -> Method:
        """A Method from its name, or ``DedupError`` listing the valid ones."""
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(m.value for m in cls)
            raise DedupError(f"unknown dedup method {value!r}; expected one of: {names}") from None


# Tuned on grocery-store's training split with transformed copies (benchmarks/
# dedup_accuracy.py; results in benchmarks/results/dedup_accuracy.md). Embeddings alone
# cannot separate a rotated copy (cosine 0.55-0.8) from another photo of the same shelf (up
# to ~0.95), nor can SIFT inliers (different shots share up to ~170): one transform that
# explains 90% of the tentative matches to within 0.35 pixel can. The verified threshold
# only picks embedding candidates; candidates also come from shared visual words.
DEFAULT_METHOD = Method.VERIFIED
DEFAULT_THRESHOLDS: dict[Method, float | None] = {
    Method.EXACT: None,
    Method.PERCEPTUAL: 10,
    Method.EMBEDDING: 0.90,
    Method.VERIFIED: 0.75,
}
DEFAULT_MIN_INLIERS = 10
# The copy test beyond inliers (see lookalike.dedup.verification): the share of tentative
# SIFT matches one similarity explains, and the median residual of its inliers in pixels of
# the ~512-pixel feature frames.
MIN_AGREEMENT = 0.9
# 0.3 was best on the tuning split (precision 0.9985 against 0.9944, the same recall), but
# keypoints are stored as float16 (0.25 px steps in the 256-512 range), and heavy JPEG on
# smooth photos moves them by about that: 0.35 leaves them the room.
MAX_RESIDUAL = 0.35
# The pixel test (see lookalike.dedup.verification.PixelRule), tuned on grocery-store's train
# split. A pair the keypoints do not prove is a copy when half its textured blocks are alike
# once aligned (captions hide up to half) and their shifts stray at most 0.08 px (median, in
# the coarser frame) from one motion: copies strayed 0.079 px at most, second photos with
# half their blocks alike 0.095 or more (a product moved in front of a still shelf).
# A pair the keypoints prove with fewer than 40 inliers needs 37% of its blocks alike: the
# different products they took for copies had 6-33% (a shared logo), copies 42-100%.
MIN_ALIKE = 0.5
MAX_DRIFT = 0.08
SURE_INLIERS = 40
MIN_SUPPORT = 0.37
# Nearest neighbours asked of the index per image; more are asked for images whose k
# nearest all pass the threshold.
NEIGHBOURS = 16
# HNSW search list while looking for duplicates (the index's own ef serves search quality).
DEDUP_EF = 40
# Embedding neighbours per image that the verified method checks, and their search list.
VERIFIED_NEIGHBOURS = 3
VERIFIED_EF = 10
# Keepers with at least this share of the most picture pixels are as large (5%: scales are
# estimated to ~1%, areas to twice that, and a rotated copy's picture is an estimate).
SAME_PICTURE = 0.95


@dataclass(frozen=True)
class DuplicateImage:
    """One image of a group. ``score`` compares it to the keeper (None for the keeper and for
    exact copies): cosine similarity for ``embedding`` and ``verified``, differing bits for
    ``perceptual``; ``inliers`` counts the verified matches and ``transform`` says what turned
    the keeper into this image: rotation, scale, mirror (``verified`` only)."""

    id: int
    path: str
    width: int
    height: int
    size: int
    mtime: float
    score: float | None = None
    inliers: int | None = None
    transform: EstimatedTransform | None = None

    @property
    def pixels(self) -> int:
        return self.width * self.height


@dataclass(frozen=True)
class DuplicateGroup:
    """Images judged duplicates of ``keeper``, the one to keep."""

    keeper: DuplicateImage
    duplicates: list[DuplicateImage]

    @property
    def members(self) -> list[DuplicateImage]:
        return [self.keeper, *self.duplicates]


@dataclass
class DedupReport:
    """What a dedup run found. ``failed`` lists (path, reason) of files in scope that could
    not be read, now or when they were indexed; they are left out of every group."""

    method: Method
    threshold: float | None
    images: int
    groups: list[DuplicateGroup] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    min_inliers: int | None = None

    @property
    def duplicates(self) -> int:
        """How many images are duplicates of a keeper."""
        return sum(len(g.duplicates) for g in self.groups)


def find_duplicates(
    collection: Collection,
    *,
    method: str | Method = DEFAULT_METHOD,
    threshold: float | None = None,
    under: str | Path | None = None,
    min_inliers: int | None = None,
    workers: int | None = None,
) -> DedupReport:
    """Groups of duplicates among the collection's images (those under the folder ``under``
    only, when given), each with a suggested keeper. ``threshold`` defaults per method to
    ``DEFAULT_THRESHOLDS``: differing bits (at most) for ``perceptual``, cosine similarity
    (at least) for ``embedding`` and ``verified``; ``exact`` takes none."""
    started = time.perf_counter()
    method = Method.parse(method)
    threshold = _check_threshold(method, threshold)
    min_inliers = check_min_inliers(method, min_inliers)
    scope = _scope(collection, under)
    report = DedupReport(method, threshold, len(scope.states), min_inliers=min_inliers)
    report.failed.extend(scope.failures)
    if len(scope.states) > 1:
        finder = _FINDERS[method]
        report.groups = finder(collection, scope, threshold, min_inliers, workers, report.failed)
    report.failed.sort()
    report.seconds = time.perf_counter() - started
    return report


def check_min_inliers(method: Method, min_inliers: int | None) -> int | None:
    """The minimum SIFT inliers a ``verified`` match needs (its default when None), or
    None for the other methods; ``DedupError`` when it is given for another method or is
    below 3 (fewer points cannot fix a transform)."""
    if min_inliers is not None and method is not Method.VERIFIED:
        raise DedupError("min_inliers applies to the verified method only")
    if min_inliers is None and method is Method.VERIFIED:
        min_inliers = DEFAULT_MIN_INLIERS
    if min_inliers is not None and min_inliers < 3:
        raise DedupError(f"min_inliers must be at least 3, got {min_inliers}")
    return min_inliers


def _check_threshold(method: Method, threshold: float | None) -> float | None:
    if method is Method.EXACT:
        if threshold is not None:
            raise DedupError("the exact method takes no threshold: it compares content hashes")
        return None
    if threshold is None:
        return DEFAULT_THRESHOLDS[method]
    threshold = float(threshold)
    if method is Method.PERCEPTUAL:
        if not (0 <= threshold <= 64 and threshold == int(threshold)):
            raise DedupError(f"a perceptual threshold is 0..64 differing bits, got {threshold}")
        return int(threshold)
    if not -1.0 <= threshold <= 1.0:
        raise DedupError(f"an {method.value} threshold is a cosine in [-1, 1], got {threshold}")
    return threshold


@dataclass(frozen=True)
class _Scope:
    """The images to deduplicate: path -> catalog state, and recorded failures."""

    states: dict[str, FileState]
    failures: list[tuple[str, str]]

    def ids(self) -> np.ndarray:
        return np.sort(np.fromiter((s.id for s in self.states.values()), dtype=np.int64))

    @functools.cached_property
    def id_set(self) -> frozenset[int]:
        """The ids in scope, for membership tests (built once, not per query)."""
        return frozenset(s.id for s in self.states.values())


def _scope(collection: Collection, under: str | Path | None) -> _Scope:
    prefix = ""
    if under is not None:
        root = Path(under).resolve()
        if not root.is_dir():
            raise DedupError(f"{under}: not a folder")
        prefix = str(root) + os.sep
    states = collection.catalog.file_states(prefix)
    failures = [(p, r) for p, r in collection.catalog.failures() if p.startswith(prefix)]
    return _Scope(states, failures)


def _image(
    record: ImageRecord,
    score: float | None = None,
    detail: Detail | None = None,
) -> DuplicateImage:
    inliers, transform = detail if detail is not None else (None, None)
    return DuplicateImage(
        id=int(record.id or 0),
        path=record.path,
        width=record.width,
        height=record.height,
        size=record.size,
        mtime=record.mtime,
        score=score,
        inliers=inliers,
        transform=transform,
    )


def keeper_order(records: Sequence[ImageRecord]) -> list[ImageRecord]:
    """Records in the order they are preferred as keeper: most pixels, then the oldest file,
    then the path (so the choice is deterministic)."""
    return sorted(records, key=lambda r: (-(r.width * r.height), r.mtime, r.path))


# What a verified match adds to a score: inliers and the estimated transform.
Detail = tuple[int | None, "EstimatedTransform | None"]
# A matcher judges candidates against a keeper (both catalog ids): a bool mask, a score per
# candidate, and a detail per candidate or None.
Matcher = Callable[[int, np.ndarray], tuple[np.ndarray, np.ndarray, list[Detail] | None]]


def _groups_from_pairs(
    collection: Collection,
    pairs: Sequence[tuple[int, int]],
    match: Matcher,
    order: Callable[[list[ImageRecord]], list[ImageRecord]] = keeper_order,
) -> list[DuplicateGroup]:
    """Components of the pairs (catalog ids), split into star groups around keepers taken
    in ``order``."""
    ids = np.unique(np.asarray(pairs, dtype=np.int64).reshape(-1))
    if not len(ids):
        return []
    positions = np.searchsorted(ids, np.asarray(pairs, dtype=np.int64))
    records = collection.catalog.images(ids.tolist())
    groups: list[DuplicateGroup] = []
    for component in union_find_groups(len(ids), map(tuple, positions)):
        ordered = order([records[int(ids[p])] for p in component if int(ids[p]) in records])
        extras: dict[int, Detail | None] = {}

        def judge(
            keeper: int,
            others: np.ndarray,
            ordered: list[ImageRecord] = ordered,
            extras: dict[int, Detail | None] = extras,
        ) -> tuple[np.ndarray, np.ndarray]:
            keeper_id = int(ordered[keeper].id or 0)
            other_ids = np.array([int(ordered[o].id or 0) for o in others], dtype=np.int64)
            mask, scores, details = match(keeper_id, other_ids)
            if details is not None:
                extras.update(zip(other_ids.tolist(), details, strict=True))
            return mask, scores

        for keeper, members, scores in star_groups(range(len(ordered)), judge):
            duplicates = [
                _image(ordered[m], float(s), extras.get(int(ordered[m].id or 0)))
                for m, s in zip(members, scores, strict=True)
            ]
            groups.append(DuplicateGroup(_image(ordered[keeper]), duplicates))
    return _sorted_groups(groups)


def _sorted_groups(groups: list[DuplicateGroup]) -> list[DuplicateGroup]:
    for group in groups:
        group.duplicates.sort(key=lambda d: d.path)
    return sorted(groups, key=lambda g: g.keeper.path)


# -- exact ------------------------------------------------------------------------------------


def _exact(
    collection: Collection,
    scope: _Scope,
    threshold: float | None,
    min_inliers: int | None,
    workers: int | None,
    failed: list[tuple[str, str]],
) -> list[DuplicateGroup]:
    by_hash: dict[str, list[int]] = {}
    for state in scope.states.values():
        by_hash.setdefault(state.content_hash, []).append(state.id)
    sets = [ids for ids in by_hash.values() if len(ids) > 1]
    records = collection.catalog.images([i for ids in sets for i in ids])
    groups: list[DuplicateGroup] = []
    for ids in sets:
        ordered = keeper_order([records[i] for i in ids if i in records])
        if len(ordered) > 1:
            groups.append(DuplicateGroup(_image(ordered[0]), [_image(r) for r in ordered[1:]]))
    return _sorted_groups(groups)


# -- perceptual -------------------------------------------------------------------------------


def _perceptual(
    collection: Collection,
    scope: _Scope,
    threshold: float | None,
    min_inliers: int | None,
    workers: int | None,
    failed: list[tuple[str, str]],
) -> list[DuplicateGroup]:
    from lookalike.dedup.perceptual import CACHE_FILE, PerceptualHashCache, hash_files
    from lookalike.knn.binary import popcount

    assert threshold is not None  # every method but exact has one (see _check_threshold)
    files = sorted((path, state.content_hash) for path, state in scope.states.items())
    cache = PerceptualHashCache(Path(collection.path) / CACHE_FILE)
    ids, codes, mirrored = [], [], []
    try:
        for hashed in hash_files(files, cache, workers=workers):
            if hashed.value is None:
                failed.append((hashed.path, hashed.error or "unreadable"))
                continue
            ids.append(scope.states[hashed.path].id)
            codes.append(np.frombuffer(hashed.value.code, dtype=np.uint8))
            mirrored.append(np.frombuffer(hashed.value.mirrored, dtype=np.uint8))
    finally:
        cache.close()
    if len(ids) < 2:
        return []
    image_ids = np.asarray(ids, dtype=np.int64)
    code_matrix, mirror_matrix = np.stack(codes), np.stack(mirrored)
    pairs = hamming_pairs(code_matrix, int(threshold), mirror_matrix)
    row_of = {int(i): row for row, i in enumerate(image_ids.tolist())}
    words = code_matrix.view(">u8").reshape(-1)
    mirror_words = mirror_matrix.view(">u8").reshape(-1)

    def match(keeper: int, others: np.ndarray) -> tuple[np.ndarray, np.ndarray, None]:
        rows = np.array([row_of[int(o)] for o in others], dtype=np.int64)
        here = row_of[keeper]
        bits = np.minimum(
            popcount(words[rows] ^ words[here]), popcount(words[rows] ^ mirror_words[here])
        ).astype(np.float64)
        return bits <= threshold, bits, None

    id_pairs = [(int(image_ids[a]), int(image_ids[b])) for a, b, _ in pairs]
    return _groups_from_pairs(collection, id_pairs, match)


# -- embedding and verified -------------------------------------------------------------------


class _SearchList(Protocol):
    """An index backend with an HNSW search list (``ef``)."""

    ef: int


@contextlib.contextmanager
def _search_list(backend: object, ef: int) -> Iterator[None]:
    """An HNSW backend searched with a search list of at most ``ef`` meanwhile (others as
    they are)."""
    default: int | None = getattr(backend, "ef", None)
    if default is not None:
        cast("_SearchList", backend).ef = min(default, ef)
    try:
        yield
    finally:
        if default is not None:
            cast("_SearchList", backend).ef = default


class _Embeddings:
    """The collection's stored vectors, L2-normalised, and candidate pairs from its index.

    Every vector is loaded (the index may return neighbours outside the scope, and they
    count when deciding whether to widen a search), normalised in place: one copy, linear in
    the size of the collection.
    """

    def __init__(self, collection: Collection, scope: _Scope) -> None:
        self.collection = collection
        self.ids, self.unit = collection.catalog.vectors(collection.model_id)
        norms = np.linalg.norm(self.unit, axis=1, keepdims=True)
        np.divide(self.unit, np.maximum(norms, 1e-12), out=self.unit)
        self.scope = np.isin(self.ids, scope.ids())

    def rows(self, ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.ids, np.asarray(ids, dtype=np.int64))

    def cosine(self, keeper: int, others: np.ndarray) -> np.ndarray:
        cosine: np.ndarray = (
            self.unit[self.rows(others)] @ self.unit[self.rows(np.array([keeper]))[0]]
        )
        return cosine

    def nearest_pairs(self, threshold: float, k: int) -> list[tuple[int, int]]:
        """(smaller id, larger id) of each scope image and its ``k`` nearest neighbours in
        the scope at cosine >= threshold, from one k-NN search per image of the
        collection's index (with a short HNSW search list): no range search, the pairs a
        check is worth."""
        index = self.collection.vector_index("cosine")
        queries = np.flatnonzero(self.scope)
        inside = self.scope
        found: list[np.ndarray] = []
        with _search_list(index.index, VERIFIED_EF):
            for start in range(0, len(queries), SEARCH_BUDGET // (k + 1)):
                rows = queries[start : start + SEARCH_BUDGET // (k + 1)]
                hits = index.search(self.unit[rows], min(k + 1, len(index)))
                valid = hits.ids >= 0
                hit_rows = self.rows(np.where(valid, hits.ids, self.ids[0]))
                cosine = np.einsum("qd,qkd->qk", self.unit[rows], self.unit[hit_rows])
                keep = valid & (cosine >= threshold) & inside[hit_rows]
                keep &= hit_rows != rows[:, None]
                own = np.broadcast_to(self.ids[rows][:, None], keep.shape)[keep]
                other = self.ids[hit_rows][keep]
                found.append(np.stack([np.minimum(own, other), np.maximum(own, other)], axis=1))
        if not found:
            return []
        pairs = np.unique(np.concatenate(found), axis=0)
        return [(int(a), int(b)) for a, b in pairs]

    def candidate_pairs(self, threshold: float) -> list[tuple[int, int]]:
        """Pairs of scope images (catalog ids) at cosine >= threshold, from k-NN searches of
        the collection's index. The index ranks; the test is the plain cosine of the stored
        vectors, since the index's own scores may be centred or quantised."""
        index = self.collection.vector_index("cosine")
        unit = self.unit

        def search(rows: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
            hits = index.search(unit[rows], width)
            found = hits.ids >= 0
            hit_rows = self.rows(np.where(found, hits.ids, self.ids[0]))
            cosine = np.einsum("qd,qkd->qk", unit[rows], unit[hit_rows])
            cosine[~found] = -np.inf
            return hits.ids, cosine

        queries = np.flatnonzero(self.scope)
        # Near-duplicates are each other's nearest neighbours by a wide margin, so a short
        # HNSW candidate list finds them, at a fraction of the search-quality default's
        # cost (planted-pair recall in benchmarks/dedup.py).
        with _search_list(index.index, DEDUP_EF):
            pairs = neighbour_pairs(
                search,
                queries,
                self.ids[queries],
                lambda scores: scores >= threshold,
                k=NEIGHBOURS,
                total=len(index),
            )
        inside = set(self.ids[queries].tolist())
        return [(a, b) for a, b in pairs if a in inside and b in inside]


def _embedding(
    collection: Collection,
    scope: _Scope,
    threshold: float | None,
    min_inliers: int | None,
    workers: int | None,
    failed: list[tuple[str, str]],
) -> list[DuplicateGroup]:
    assert threshold is not None  # every method but exact has one (see _check_threshold)
    embeddings = _Embeddings(collection, scope)
    if len(embeddings.ids) < 2:
        return []

    def match(keeper: int, others: np.ndarray) -> tuple[np.ndarray, np.ndarray, None]:
        cosine = embeddings.cosine(keeper, others)
        return cosine >= threshold, cosine, None

    return _groups_from_pairs(collection, embeddings.candidate_pairs(threshold), match)


def _verified(
    collection: Collection,
    scope: _Scope,
    threshold: float | None,
    min_inliers: int | None,
    workers: int | None,
    failed: list[tuple[str, str]],
) -> list[DuplicateGroup]:
    from lookalike.dedup.verification import Verifier

    # Both are set for the verified method (see _check_threshold and find_duplicates).
    assert threshold is not None and min_inliers is not None
    embeddings = _Embeddings(collection, scope)
    if len(embeddings.ids) < 2:
        return []
    verifier = Verifier(collection, failed)
    candidates = verified_candidates(embeddings, verifier, threshold, workers)
    rule = copy_rule(min_inliers)
    return verified_groups(collection, embeddings, verifier, candidates, rule, workers)


def verified_candidates(
    embeddings: _Embeddings, verifier: Verifier, threshold: float, workers: int | None
) -> list[tuple[int, int]]:
    """Pairs of scope images worth verifying: those that share the visual words of their
    keypoints (a rotated or cropped copy, whatever its cosine), and each image's nearest
    embedding neighbours at cosine ``threshold`` or more that share a word (an overlay can
    hide most of a copy's keypoints, not its look); all of those when the scope is too small
    to learn words from."""
    from lookalike.local.words import word_index

    words = word_index(verifier, embeddings.ids[embeddings.scope].tolist(), workers)
    candidates = set(words.candidates())
    near = embeddings.nearest_pairs(threshold, VERIFIED_NEIGHBOURS)
    shared = words.shared(near)
    candidates.update(
        p for p, count in zip(near, shared, strict=True) if count or not words.learned
    )
    return sorted(candidates)


def verified_groups(
    collection: Collection,
    embeddings: _Embeddings,
    verifier: Verifier,
    candidates: Sequence[tuple[int, int]],
    rule: CopyRule,
    workers: int | None = None,
) -> list[DuplicateGroup]:
    """Groups of the candidate pairs that ``rule`` confirms, each member a verified copy of
    its keeper; the keeper has the most picture pixels (see ``order`` below)."""
    involved = sorted({i for pair in candidates for i in pair})
    verifier.forget(involved)
    verifier.prefetch(involved, workers)
    # Confirmed pairs only link images into components; each member still has to be a copy
    # of its group's keeper (``match``), where a pair the pixels refute is refused: so the
    # links skip the refutation and its file reads.
    confirmed = [(a, b) for a, b in candidates if verifier.is_copy(a, b, rule, refute=False)]

    def match(keeper: int, others: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[Detail]]:
        checks = [verifier.check(keeper, other) for other in others.tolist()]
        mask = np.array([verifier.is_copy(keeper, o, rule) for o in others.tolist()], dtype=bool)
        details: list[Detail] = [(c.inliers, c.transform) for c in checks]
        return mask, embeddings.cosine(keeper, others), details

    def order(records: list[ImageRecord]) -> list[ImageRecord]:
        """Keeper order by picture pixels rather than canvas pixels: a copy rotated on a
        grown canvas is no better a keeper for its padded corners. An image's picture is
        its canvas times the least share any copy of it (verified against it) finds to be
        picture. Images are weighed largest canvas first, until no canvas left can beat the
        best picture; among those with about as much picture (within ``SAME_PICTURE``, the
        precision of the estimate), the oldest file, then the path."""
        ordered = keeper_order(records)
        ids = [int(r.id or 0) for r in ordered]
        picture: dict[int, float] = {}
        for record, image_id in zip(ordered, ids, strict=True):
            pixels = record.width * record.height
            if picture and pixels < SAME_PICTURE * max(picture.values()):
                break
            shares = [
                verifier.check(image_id, other).source_content
                for other in ids
                if other != image_id and verifier.is_copy(image_id, other, rule, refute=False)
            ]
            picture[image_id] = pixels * min(shares, default=1.0)
        most = max(picture.values())
        keeper = min(
            (
                r
                for r, i in zip(ordered, ids, strict=True)
                if picture.get(i, 0.0) >= SAME_PICTURE * most
            ),
            key=lambda r: (r.mtime, r.path),
        )
        return [keeper] + [r for r in ordered if r is not keeper]

    return _groups_from_pairs(collection, confirmed, match, order)


def copy_rule(min_inliers: int) -> CopyRule:
    """The copy test of the verified method with this many inliers at least."""
    from lookalike.dedup.verification import CopyRule, PixelRule

    pixels = PixelRule(MIN_ALIKE, MAX_DRIFT, SURE_INLIERS, MIN_SUPPORT)
    return CopyRule(min_inliers, MIN_AGREEMENT, MAX_RESIDUAL, pixels)


_FINDERS = {
    Method.EXACT: _exact,
    Method.PERCEPTUAL: _perceptual,
    Method.EMBEDDING: _embedding,
    Method.VERIFIED: _verified,
}
