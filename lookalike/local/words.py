"""Candidate pairs from local features: images that share finely quantised SIFT descriptors.

A copy keeps many of its source's keypoints whatever was done to it: SIFT descriptors do not
change with rotation, scale, crop or a uniform change of brightness, and a mirror permutes
their components in a known way (``local.matching.mirror_descriptors``). So quantised
finely ("visual words"), a copy shares many words with its source even when its global
embedding has drifted far (a 10-45 degree rotation on grocery-store falls to cosine
0.6-0.75, below hundreds of other photos of the same shelves), while unrelated photos share
almost none.

Words are mirror-invariant: each descriptor is averaged with its mirror image before it is
quantised, so a mirrored copy shares its source's words and one pass covers both
orientations (what that averages away hardly tells copies apart). Each image votes with
``WORD_KEYPOINTS`` of its keypoints spread over a ``GRID`` x ``GRID`` grid, the strongest of
each cell first: the strongest of a whole image can all sit on the black edges of a rotated
copy or on an overlaid caption. Descriptors are projected by PCA to ``PCA_DIMS`` dimensions
and product-quantised with ``SUBQUANTIZERS`` x ``CENTROIDS`` centroids (2^24 words), both
fitted to a seeded sample of the collection's own descriptors (a run is deterministic).
Pairs come from an inverted file of the words, never from an N x N comparison; a word held
by more than ``MAX_POSTING`` images says nothing and is skipped, which also bounds the work.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from lookalike.local.matching import MIRROR_ORDER

if TYPE_CHECKING:
    from lookalike.local.features import LocalFeatures

# 160 rather than 96: on clothing-small's train split a copy shared 4 words or more with its
# source 96% of the time with 96 voters, 98% with 160 (rotations with black corners 83% ->
# 92%, captions 93% -> 96%), 99% with all 256, at 1.7 times the word index's work.
WORD_KEYPOINTS = 160
GRID = 4
PCA_DIMS = 24
SUBQUANTIZERS = 6
CENTROIDS = 16
TRAIN_SAMPLE = 50_000
# Images whose keypoints train the quantiser (a seeded sample of the scope).
TRAIN_IMAGES = 2_000
# A word held by more images than this is a stop word: it links nothing.
MAX_POSTING = 64
# Each image keeps this many of its best word neighbours as candidates, if they share enough.
PER_IMAGE = 3
MIN_SHARED = 4
# Images read and quantised at a time: bounds memory whatever the size of the collection.
CHUNK = 4_096


def symmetric(descriptors: np.ndarray) -> np.ndarray:
    """float32 descriptors averaged with their mirror images: the same for both."""
    values = np.asarray(descriptors, dtype=np.float32)
    averaged: np.ndarray = (values + values[:, MIRROR_ORDER]) * 0.5
    return averaged


def voting_rows(features: Sequence[LocalFeatures], count: int = WORD_KEYPOINTS) -> np.ndarray:
    """bool [sum of keypoints]: which keypoints of these images (concatenated) vote: up to
    ``count`` each, spread over a ``GRID`` x ``GRID`` grid: the strongest of each cell
    (features are stored strongest first), as many from each, then the strongest of the
    rest. One pass over all the images' keypoints (per-image numpy calls cost more than the
    work)."""
    sizes = np.array([len(f) for f in features], dtype=np.int64)
    total = int(sizes.sum())
    if not total:
        return np.zeros(0, dtype=bool)
    image = np.repeat(np.arange(len(features)), sizes)
    order_in_image = np.arange(total) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    points = np.concatenate([f.points for f in features]).astype(np.float32)
    widths = np.repeat(np.array([f.width for f in features], dtype=np.float32), sizes)
    heights = np.repeat(np.array([f.height for f in features], dtype=np.float32), sizes)
    columns = np.clip((points[:, 0] * GRID / widths).astype(np.int64), 0, GRID - 1)
    rows = np.clip((points[:, 1] * GRID / heights).astype(np.int64), 0, GRID - 1)
    cell = image * GRID**2 + columns * GRID + rows
    # Rank within (image, cell) in stored order.
    by_cell = np.lexsort((order_in_image, cell))
    sorted_cells = cell[by_cell]
    starts = np.searchsorted(sorted_cells, sorted_cells, side="left")
    rank = np.empty(total, dtype=np.int64)
    rank[by_cell] = np.arange(total) - starts
    chosen = rank < count // GRID**2
    # Then the strongest of the others, up to ``count`` an image.
    room = count - np.bincount(image, weights=chosen, minlength=len(features)).astype(np.int64)
    rest = ~chosen
    running = np.cumsum(rest)
    first = np.cumsum(sizes) - sizes
    rest_rank = running - 1 - np.repeat(running[first] - rest[first], sizes)
    chosen |= rest & (rest_rank < np.repeat(room, sizes))
    return chosen


@dataclass(frozen=True)
class WordQuantizer:
    """PCA then a product quantiser: (symmetrised) descriptors [n, 128] to int64 words."""

    mean: np.ndarray
    components: np.ndarray
    centroids: np.ndarray  # [SUBQUANTIZERS, CENTROIDS, PCA_DIMS // SUBQUANTIZERS]

    def words(self, descriptors: np.ndarray) -> np.ndarray:
        """One mirror-invariant word per descriptor, in 0 .. CENTROIDS^SUBQUANTIZERS - 1."""
        # The mirror permutation is an involution, so projecting the averaged descriptor is
        # projecting the descriptor on the averaged components: no permuted copy is made.
        folded = (self.components + self.components[:, MIRROR_ORDER]) * 0.5
        projected = np.asarray(descriptors, dtype=np.float32) @ folded.T
        projected -= self.mean @ self.components.T
        subspaces, count, width = self.centroids.shape
        words = np.zeros(len(projected), dtype=np.int64)
        for part in range(subspaces):
            chunk = np.ascontiguousarray(projected[:, part * width : (part + 1) * width])
            centres = self.centroids[part]
            # Nearest centroid by squared distance; |chunk|^2 is the same for every centroid.
            scores = chunk @ centres.T
            scores -= 0.5 * (centres * centres).sum(1)
            words = words * count + np.argmax(scores, axis=1)
        return words


def train_quantizer(sample: np.ndarray, *, seed: int = 0) -> WordQuantizer:
    """A :class:`WordQuantizer` fitted to a sample of descriptors [n, 128] (n >= 256)."""
    import faiss

    data = symmetric(sample)
    mean = data.mean(axis=0)
    centred = data - mean
    # Principal axes: eigenvectors of the 128 x 128 covariance, largest first.
    values, vectors = np.linalg.eigh(centred.T @ centred)
    components = np.ascontiguousarray(vectors[:, np.argsort(values)[::-1][:PCA_DIMS]].T)
    projected = np.ascontiguousarray(centred @ components.T, dtype=np.float32)
    width = PCA_DIMS // SUBQUANTIZERS
    centres = np.zeros((SUBQUANTIZERS, CENTROIDS, width), dtype=np.float32)
    for part in range(SUBQUANTIZERS):
        kmeans = faiss.Kmeans(width, CENTROIDS, niter=20, seed=seed + part, verbose=False)
        kmeans.train(np.ascontiguousarray(projected[:, part * width : (part + 1) * width]))
        centres[part] = kmeans.centroids
    return WordQuantizer(mean.astype(np.float32), components.astype(np.float32), centres)


def training_sample(descriptors: Iterable[np.ndarray], *, seed: int = 0) -> np.ndarray:
    """Up to ``TRAIN_SAMPLE`` descriptors drawn (seeded) from these images'."""
    parts = [d for d in descriptors if len(d)]
    pooled = np.concatenate(parts) if parts else np.zeros((0, 128), np.uint8)
    if len(pooled) <= TRAIN_SAMPLE:
        return pooled
    rows = np.random.default_rng(seed).choice(len(pooled), TRAIN_SAMPLE, replace=False)
    sample: np.ndarray = pooled[np.sort(rows)]
    return sample


def _first_of_runs(ordered: np.ndarray) -> np.ndarray:
    first = np.ones(len(ordered), dtype=bool)
    first[1:] = ordered[1:] != ordered[:-1]
    return first


def _ranges(lengths: np.ndarray) -> np.ndarray:
    """0..n-1 for each n in ``lengths``, concatenated."""
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    ranged: np.ndarray = np.arange(int(lengths.sum()), dtype=np.int64) - starts
    return ranged


def shared_words(
    images: np.ndarray, words: np.ndarray, *, max_posting: int = MAX_POSTING
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a, b, shared) with a < b: how many distinct words images a and b (< 2^24) share, for
    every pair that shares one; ``images``/``words`` hold one entry per descriptor. Words
    held by more than ``max_posting`` images are skipped."""
    # One sort of (word, image) keys: unique entries, grouped by word.
    keys = np.sort((np.asarray(words, dtype=np.int64) << 24) | np.asarray(images, np.int64))
    keys = keys[_first_of_runs(keys)]
    word_of, image_of = keys >> 24, keys & 0xFFFFFF
    first = np.flatnonzero(_first_of_runs(word_of))
    lengths = np.diff(np.append(first, len(keys)))
    useful = (lengths >= 2) & (lengths <= max_posting)
    starts, lengths = first[useful], lengths[useful]
    # Every pair within each posting list.
    offsets = _ranges(lengths)
    position = np.repeat(starts, lengths) + offsets
    partners = np.repeat(lengths, lengths) - 1 - offsets
    left = np.repeat(position, partners)
    right = left + 1 + _ranges(partners)
    pairs = np.sort((image_of[left] << 24) | image_of[right])
    unique = np.flatnonzero(_first_of_runs(pairs))
    counts = np.diff(np.append(unique, len(pairs)))
    pairs = pairs[unique]
    return pairs >> 24, pairs & 0xFFFFFF, counts


def best_pairs(
    a: np.ndarray, b: np.ndarray, shared: np.ndarray, *, per_image: int, min_shared: int
) -> np.ndarray:
    """Positions of the pairs sharing at least ``min_shared`` words that are among the
    ``per_image`` best (most shared) of a or of b: each image keeps its few most likely
    copies, whatever the others around it share."""
    keep = np.flatnonzero(shared >= min_shared)
    if not len(keep):
        return keep
    ends = np.concatenate([a[keep], b[keep]])
    scores = np.concatenate([shared[keep], shared[keep]])
    pair = np.concatenate([keep, keep])
    order = np.lexsort((pair, -scores, ends))
    ends, pair = ends[order], pair[order]
    first = _first_of_runs(ends)
    group_start = np.maximum.accumulate(np.where(first, np.arange(len(ends)), 0))
    chosen: np.ndarray = np.unique(pair[np.arange(len(ends)) - group_start < per_image])
    return chosen


class WordIndex:
    """The shared visual words of every pair of images in a scope that shares one: ``ids``
    (sorted catalog ids) and, per pair, positions ``a`` < ``b`` in it and the ``count``.
    ``learned`` is False when the scope had too few keypoints to learn words from (a
    handful of images): then no pair shares a word, and that says nothing."""

    def __init__(
        self,
        ids: Sequence[int],
        a: np.ndarray,
        b: np.ndarray,
        shared: np.ndarray,
        *,
        learned: bool = True,
    ):
        self.ids = np.asarray(ids, dtype=np.int64)
        self.a, self.b, self.count = a, b, shared
        self.learned = learned
        # Positions are < 2^24 (see shared_words): one int64 key a pair.
        self._keys = (a << 24) | b

    def candidates(
        self, *, per_image: int = PER_IMAGE, min_shared: int = MIN_SHARED
    ) -> list[tuple[int, int]]:
        """(smaller id, larger id) pairs each image keeps (see :func:`best_pairs`)."""
        chosen = best_pairs(self.a, self.b, self.count, per_image=per_image, min_shared=min_shared)
        return [(int(self.ids[self.a[i]]), int(self.ids[self.b[i]])) for i in chosen]

    def shared(self, pairs: Sequence[tuple[int, int]]) -> np.ndarray:
        """How many words each (id, id) pair shares (0 when none, or not in the scope)."""
        counts = np.zeros(len(pairs), dtype=np.int64)
        if not len(pairs) or not len(self._keys):
            return counts
        ends = np.asarray(pairs, dtype=np.int64)
        at = np.minimum(np.searchsorted(self.ids, ends), len(self.ids) - 1)
        known = (self.ids[at] == ends).all(axis=1)
        low, high = np.minimum(at[:, 0], at[:, 1]), np.maximum(at[:, 0], at[:, 1])
        keys = (low << 24) | high
        slot = np.minimum(np.searchsorted(self._keys, keys), len(self._keys) - 1)
        hit = known & (self._keys[slot] == keys)
        counts[hit] = self.count[slot[hit]]
        return counts


class FeatureSource(Protocol):
    """Where the words' local features come from: stored ones, and (when extracting) the
    others read from the images' files (dedup's ``Verifier``)."""

    def stored(self, ids: Sequence[int], *, check: bool = True) -> dict[int, LocalFeatures]:
        """The stored features of these images that decode."""
        ...

    def prefetch(self, ids: Sequence[int], workers: int | None) -> None:
        """Extract the features of these images (kept for :meth:`features`)."""
        ...

    def features(self, image_id: int) -> LocalFeatures | None:
        """One image's features, stored or extracted."""
        ...


def _voters(
    verifier: FeatureSource,
    ids: Sequence[int],
    workers: int | None,
    *,
    extract: bool = True,
    keypoints: int = WORD_KEYPOINTS,
) -> tuple[list[int], np.ndarray, np.ndarray]:
    """(ids with keypoints, the voting descriptors of all of them concatenated, the position
    in those ids of each descriptor): stored features read without their checksum and let
    go, the others extracted once and kept by the verifier (with ``extract``; else left
    out)."""
    stored = verifier.stored(ids, check=False)
    if extract:
        verifier.prefetch([i for i in ids if i not in stored], workers)
    owners, features = [], []
    for image_id in ids:
        found = stored.get(image_id)
        if found is None and extract:
            found = verifier.features(image_id)
        if found is not None and len(found):
            owners.append(image_id)
            features.append(found)
    if not features:
        return [], np.zeros((0, 128), np.uint8), np.zeros(0, np.int64)
    chosen = voting_rows(features, keypoints)
    descriptors = np.concatenate([f.descriptors for f in features])[chosen]
    positions = np.repeat(np.arange(len(features)), [len(f) for f in features])[chosen]
    return owners, descriptors, positions


def _words_of(
    verifier: FeatureSource,
    ids: Sequence[int],
    workers: int | None,
    *,
    extract: bool = True,
    keypoints: int = WORD_KEYPOINTS,
) -> tuple[WordQuantizer, list[int], np.ndarray, np.ndarray] | None:
    """(the quantiser fitted to these images, those with keypoints, and one (position among
    them, word) per voting descriptor), or None with too few keypoints to learn words from."""
    ids = sorted(ids)
    rng = np.random.default_rng(0)
    chosen = sorted(rng.choice(len(ids), size=min(len(ids), TRAIN_IMAGES), replace=False))
    _, voting, _ = _voters(verifier, [ids[i] for i in chosen], workers, extract=extract)
    sample = training_sample([voting])
    if len(sample) < 256:
        return None
    quantizer = train_quantizer(sample)
    owners: list[int] = []
    entries, words = [], []
    for start in range(0, len(ids), CHUNK):
        part = ids[start : start + CHUNK]
        found, descriptors, positions = _voters(
            verifier, part, workers, extract=extract, keypoints=keypoints
        )
        entries.append(positions + len(owners))
        owners.extend(found)
        words.append(quantizer.words(descriptors))
    return quantizer, owners, np.concatenate(entries), np.concatenate(words)


def word_index(
    verifier: FeatureSource, ids: Sequence[int], workers: int | None = None
) -> WordIndex:
    """The :class:`WordIndex` of these catalog images, from their local features (stored,
    or extracted by the verifier)."""
    ids = sorted(ids)
    empty = np.zeros(0, dtype=np.int64)
    found = _words_of(verifier, ids, workers) if len(ids) >= 2 else None
    if found is None:
        return WordIndex(ids, empty, empty, empty, learned=False)  # too few keypoints
    _, owners, entries, words = found
    if len(owners) < 2:
        return WordIndex(owners, empty, empty, empty)
    a, b, shared = shared_words(entries, words)
    return WordIndex(owners, a, b, shared)


class WordLookup:
    """The visual words of a reference's images, for query images from outside it: which
    reference images share the most words with a query (its copies, whatever their
    cosine). Words held by more than ``MAX_POSTING`` reference images are stop words."""

    def __init__(
        self, quantizer: WordQuantizer, ids: Sequence[int], entries: np.ndarray, words: np.ndarray
    ) -> None:
        self.quantizer = quantizer
        self.ids = np.asarray(ids, dtype=np.int64)
        keys = np.sort((np.asarray(words, dtype=np.int64) << 24) | np.asarray(entries, np.int64))
        keys = keys[_first_of_runs(keys)]
        word_of = keys >> 24
        first = np.flatnonzero(_first_of_runs(word_of))
        lengths = np.diff(np.append(first, len(keys)))
        useful = np.repeat(lengths <= MAX_POSTING, lengths)
        # Postings: (word, reference position) sorted by word, stop words left out.
        self._words, self._positions = word_of[useful], keys[useful] & 0xFFFFFF

    def candidates(
        self, features: LocalFeatures, *, limit: int, min_shared: int = MIN_SHARED
    ) -> list[tuple[int, int]]:
        """(reference id, shared words) of the ``limit`` reference images sharing the most
        distinct words (at least ``min_shared``) with ``features``, most first."""
        if not len(features) or not len(self._words):
            return []
        # Every keypoint of the query looks (a crop holds few of its source's voters, and
        # a query is one image: its keypoints cost nothing to quantise).
        words = np.unique(self.quantizer.words(features.descriptors))
        starts = np.searchsorted(self._words, words, side="left")
        ends = np.searchsorted(self._words, words, side="right")
        lengths = ends - starts
        holders = self._positions[np.repeat(starts, lengths) + _ranges(lengths)]
        counts = np.bincount(holders, minlength=len(self.ids)) if len(holders) else holders
        ranked = np.argsort(-counts, kind="stable")[:limit]
        return [(int(self.ids[i]), int(counts[i])) for i in ranked if counts[i] >= min_shared]


def word_lookup(
    verifier: FeatureSource,
    ids: Sequence[int],
    workers: int | None = None,
    *,
    extract: bool = True,
    keypoints: int = WORD_KEYPOINTS,
) -> WordLookup | None:
    """The :class:`WordLookup` of these catalog images (their stored local features, and
    with ``extract`` the others' extracted by the verifier), or None when they hold too few
    keypoints to learn words from."""
    found = _words_of(verifier, ids, workers, extract=extract, keypoints=keypoints) if ids else None
    if found is None:
        return None
    quantizer, owners, entries, words = found
    return WordLookup(quantizer, owners, entries, words)
