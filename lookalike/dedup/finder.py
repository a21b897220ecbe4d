"""Finding groups of duplicate images in a collection.

Methods:
- ``exact``: the same bytes (the catalog's SHA-256 content hash).
- ``perceptual``: 64-bit DCT pHashes within ``threshold`` differing bits, a flipped copy
  included (see :mod:`lookalike.dedup.perceptual`); candidates from a faiss binary index.
- ``embedding``: cosine similarity of the stored embeddings (L2-normalised, not centred, so a
  threshold means the same in every collection) at least ``threshold``; candidates from the
  collection's own vector index.
- ``verified``: embedding candidates at a looser ``threshold``, each confirmed by SIFT
  matching and a RANSAC similarity with at least ``min_inliers`` inliers
  (:mod:`lookalike.local`), the mirrored image tried too. Stored local features are used
  when the collection has them; otherwise only the candidates' files are read.

Groups never come from an N x N comparison: candidates are k-NN searches of an index, linked
into components, and each component is split into star-shaped groups around a keeper (see
:mod:`lookalike.dedup.grouping`), so every duplicate in a group matched its keeper. The keeper
is the image with the most pixels, then the oldest file (modification time), then the path.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, cast

import numpy as np

from lookalike.catalog import FileState, ImageRecord
from lookalike.dedup.grouping import (
    hamming_pairs,
    neighbour_pairs,
    star_groups,
    union_find_groups,
)
from lookalike.errors import DedupError, ImageError

if TYPE_CHECKING:
    from lookalike.core.collection import Collection
    from lookalike.local.features import LocalFeatures


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


# Calibrated on clothing-small with transformed copies (benchmarks/dedup_accuracy.py,
# results in benchmarks/results/dedup.md). Embeddings alone cannot separate a cropped or
# rotated copy (cosine down to ~0.75) from another garment shot on the same background (up
# to ~0.94); SIFT inliers can, above the ~35 that a shared carpet or bedspread gives at most
# to different garments once the cosine is 0.85 or more.
DEFAULT_METHOD = Method.VERIFIED
DEFAULT_THRESHOLDS: dict[Method, float | None] = {
    Method.EXACT: None,
    Method.PERCEPTUAL: 10,
    Method.EMBEDDING: 0.90,
    Method.VERIFIED: 0.85,
}
DEFAULT_MIN_INLIERS = 25
# Nearest neighbours asked of the index per image; more are asked for images whose k
# nearest all pass the threshold.
NEIGHBOURS = 16
# HNSW search list while looking for duplicates (the index's own ef serves search quality).
DEDUP_EF = 40


@dataclass(frozen=True)
class DuplicateImage:
    """One image of a group. ``score`` compares it to the keeper (None for the keeper and for
    exact copies): cosine similarity for ``embedding`` and ``verified``, differing bits for
    ``perceptual``; ``inliers`` counts the verified matches (``verified`` only)."""

    id: int
    path: str
    width: int
    height: int
    size: int
    mtime: float
    score: float | None = None
    inliers: int | None = None

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
    record: ImageRecord, score: float | None = None, inliers: int | None = None
) -> DuplicateImage:
    return DuplicateImage(
        id=int(record.id or 0),
        path=record.path,
        width=record.width,
        height=record.height,
        size=record.size,
        mtime=record.mtime,
        score=score,
        inliers=inliers,
    )


def keeper_order(records: Sequence[ImageRecord]) -> list[ImageRecord]:
    """Records in the order they are preferred as keeper: most pixels, then the oldest file,
    then the path (so the choice is deterministic)."""
    return sorted(records, key=lambda r: (-(r.width * r.height), r.mtime, r.path))


# A matcher judges candidates against a keeper (both catalog ids): a bool mask, a score per
# candidate, and inliers per candidate or None.
Matcher = Callable[[int, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray | None]]


def _groups_from_pairs(
    collection: Collection, pairs: Sequence[tuple[int, int]], match: Matcher
) -> list[DuplicateGroup]:
    """Components of the pairs (catalog ids), split into star groups around keepers."""
    ids = np.unique(np.asarray(pairs, dtype=np.int64).reshape(-1))
    if not len(ids):
        return []
    positions = np.searchsorted(ids, np.asarray(pairs, dtype=np.int64))
    records = collection.catalog.images(ids.tolist())
    groups: list[DuplicateGroup] = []
    for component in union_find_groups(len(ids), map(tuple, positions)):
        ordered = keeper_order([records[int(ids[p])] for p in component if int(ids[p]) in records])
        extras: dict[int, int | None] = {}

        def judge(
            keeper: int,
            others: np.ndarray,
            ordered: list[ImageRecord] = ordered,
            extras: dict[int, int | None] = extras,
        ) -> tuple[np.ndarray, np.ndarray]:
            keeper_id = int(ordered[keeper].id or 0)
            other_ids = np.array([int(ordered[o].id or 0) for o in others], dtype=np.int64)
            mask, scores, inliers = match(keeper_id, other_ids)
            for other, count in zip(
                other_ids.tolist(), _or_none(inliers, len(others)), strict=True
            ):
                extras[other] = count
            return mask, scores

        for keeper, members, scores in star_groups(range(len(ordered)), judge):
            duplicates = [
                _image(ordered[m], float(s), extras.get(int(ordered[m].id or 0)))
                for m, s in zip(members, scores, strict=True)
            ]
            groups.append(DuplicateGroup(_image(ordered[keeper]), duplicates))
    return _sorted_groups(groups)


def _or_none(values: np.ndarray | None, n: int) -> list[int | None]:
    return [None] * n if values is None else [int(v) for v in values]


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
        backend = index.index
        default_ef: int | None = getattr(backend, "ef", None)
        if default_ef is not None:
            # Near-duplicates are each other's nearest neighbours by a wide margin, so a short
            # HNSW candidate list finds them, at a fraction of the search-quality default's
            # cost (planted-pair recall in benchmarks/dedup.py).
            cast("_SearchList", backend).ef = min(default_ef, DEDUP_EF)
        try:
            pairs = neighbour_pairs(
                search,
                queries,
                self.ids[queries],
                lambda scores: scores >= threshold,
                k=NEIGHBOURS,
                total=len(index),
            )
        finally:
            if default_ef is not None:
                cast("_SearchList", backend).ef = default_ef
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
    # Both are set for the verified method (see _check_threshold and find_duplicates).
    assert threshold is not None and min_inliers is not None
    embeddings = _Embeddings(collection, scope)
    if len(embeddings.ids) < 2:
        return []
    verifier = _Verifier(collection, min_inliers, failed)
    candidates = embeddings.candidate_pairs(threshold)
    verifier.prefetch(sorted({i for pair in candidates for i in pair}), workers)
    confirmed = [(a, b) for a, b in candidates if verifier.inliers(a, b) >= min_inliers]

    def match(keeper: int, others: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cosine = embeddings.cosine(keeper, others)
        inliers = np.array(
            [
                verifier.inliers(keeper, other) if similar else 0
                for other, similar in zip(
                    others.tolist(), (cosine >= threshold).tolist(), strict=True
                )
            ],
            dtype=np.int64,
        )
        return (cosine >= threshold) & (inliers >= min_inliers), cosine, inliers

    return _groups_from_pairs(collection, confirmed, match)


def mirror_features(features: LocalFeatures) -> LocalFeatures:
    """The SIFT features of the mirror image, from those of the image: x becomes
    ``width - 1 - x``; in each descriptor (4 x 4 cells x 8 orientation bins, in the
    keypoint's own frame) the cell rows swap and the orientation bins reverse, since a mirror
    reverses angles. Matches an extraction from the mirrored pixels without decoding again."""
    from lookalike.local.features import DESCRIPTOR_DIM, LocalFeatures

    points = features.points.astype(np.float32)
    points[:, 0] = features.width - 1 - points[:, 0]
    cells = features.descriptors.reshape(-1, 4, 4, 8)[:, ::-1][..., (-np.arange(8)) % 8]
    return LocalFeatures(
        points,
        cells.reshape(-1, DESCRIPTOR_DIM),
        features.width,
        features.height,
        features.scale,
    )


def best_inliers(views: Sequence[LocalFeatures], target: LocalFeatures, min_inliers: int) -> int:
    """The most RANSAC inliers any of ``views`` (an image's features, and their mirror)
    shares with ``target`` under the default match rule; stops at the first view that
    reaches ``min_inliers``."""
    from lookalike.local.matching import DEFAULT_RULE, verify

    best = 0
    for view in views:
        found = verify(
            view,
            target,
            ratio=DEFAULT_RULE.ratio,
            threshold=DEFAULT_RULE.threshold,
            min_matches=min_inliers,
        )
        best = max(best, found.inliers)
        if best >= min_inliers:
            break
    return best


class _Verifier:
    """Inliers of image pairs by SIFT matching and RANSAC, the mirror image of the first
    tried too; features from the catalog when stored, else extracted from the file once."""

    def __init__(
        self, collection: Collection, min_inliers: int, failed: list[tuple[str, str]]
    ) -> None:
        self.collection = collection
        self.min_inliers = min_inliers
        self.failed = failed
        stored = collection.local_store.kind()
        # Stored SIFT features are reused; patch tokens are no use to SIFT matching.
        self.kind = stored.name if stored is not None and stored.sift is not None else None
        self._features: dict[int, LocalFeatures | None] = {}
        self._mirrored: dict[int, LocalFeatures | None] = {}
        self._pairs: dict[tuple[int, int], int] = {}

    def inliers(self, a: int, b: int) -> int:
        """Inliers of the better of (a, b) and (mirrored a, b); cached."""
        key = (min(a, b), max(a, b))
        if key not in self._pairs:
            self._pairs[key] = self._count(*key)
        return self._pairs[key]

    def _count(self, a: int, b: int) -> int:
        source, target = self.features(a), self.features(b)
        if source is None or target is None:
            return 0
        mirrored = self.mirrored(a)
        assert mirrored is not None  # the mirror of features that exist
        return best_inliers((source, mirrored), target, self.min_inliers)

    def features(self, image_id: int) -> LocalFeatures | None:
        if image_id not in self._features:
            self.prefetch([image_id], 0)
        return self._features[image_id]

    def mirrored(self, image_id: int) -> LocalFeatures | None:
        if image_id not in self._mirrored:
            features = self.features(image_id)
            self._mirrored[image_id] = None if features is None else mirror_features(features)
        return self._mirrored[image_id]

    def prefetch(self, ids: Sequence[int], workers: int | None) -> None:
        """Load or extract the features of these images, extracting in ``workers`` threads
        (OpenCV and decoding release the GIL)."""
        from concurrent.futures import ThreadPoolExecutor

        from lookalike.local.errors import CorruptLocalFeaturesError
        from lookalike.local.features import LocalFeatures

        todo = [i for i in ids if i not in self._features]
        if self.kind is not None and todo:
            for image_id, data in self.collection.catalog.local_features(todo, self.kind).items():
                # Corrupt stored features are extracted again from the file below.
                with contextlib.suppress(CorruptLocalFeaturesError):
                    self._features[image_id] = LocalFeatures.from_bytes(data)
            todo = [i for i in todo if i not in self._features]
        records = self.collection.catalog.images(todo)
        paths = [(i, records[i].path) for i in todo if i in records]
        self._features.update((i, None) for i in todo if i not in records)
        workers = min(os.cpu_count() or 1, 4) if workers is None else workers
        if workers <= 1:
            extracted = map(_extract_file, paths)
            self._store(extracted)
            return
        with ThreadPoolExecutor(workers, thread_name_prefix="lookalike-sift") as pool:
            self._store(pool.map(_extract_file, paths))

    def _store(
        self, extracted: Iterable[tuple[int, str, LocalFeatures | None, str | None]]
    ) -> None:
        for image_id, path, features, error in extracted:
            self._features[image_id] = features
            if error is not None:
                self.failed.append((path, error))


def _extract_file(item: tuple[int, str]) -> tuple[int, str, LocalFeatures | None, str | None]:
    from lookalike.images import load_image
    from lookalike.local.features import DATABASE_CONFIG, extract

    image_id, path = item
    try:
        image = load_image(path, draft_size=DATABASE_CONFIG.max_side)
        return image_id, path, extract(image, DATABASE_CONFIG), None
    except ImageError as error:
        return image_id, path, None, error.reason


_FINDERS = {
    Method.EXACT: _exact,
    Method.PERCEPTUAL: _perceptual,
    Method.EMBEDDING: _embedding,
    Method.VERIFIED: _verified,
}
