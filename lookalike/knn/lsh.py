"""Locality-sensitive hashing with random hyperplanes (pure numpy), re-ranked exactly.

Each of ``tables`` hash tables maps a vector to ``bits`` sign bits, one per random hyperplane.
A query collects every stored vector that shares a bucket with it in any table (and, with
``probe=1``, the buckets at Hamming distance 1 of its own: ``bits`` more per table), then
scores those candidates exactly with the stored float vectors. So scores are exact; only
recall is approximate.

The hyperplanes pass through a centre fixed at the first ``add`` (the mean of that batch)
rather than through the origin: embeddings often live in one orthant (e.g. after a ReLU),
where hyperplanes through the origin barely split the data. For ``cosine`` and ``dot`` the
directions (normalised vectors) are hashed, for ``euclidean`` the raw vectors.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from lookalike.errors import CorruptIndexError
from lookalike.knn._common import (
    Option,
    RowStore,
    RowStoreIndex,
    as_new_ids,
    check_int,
    search_rows,
)
from lookalike.knn._format import IndexFile
from lookalike.knn.base import Metric, SearchHits, as_vectors, l2_normalize
from lookalike.knn.exact import score_matrix, top_k


class LSHIndex(RowStoreIndex):
    """Random-hyperplane LSH with multi-table buckets and exact re-ranking."""

    backend: ClassVar[str] = "lsh"
    metrics: ClassVar[tuple[Metric, ...]] = (Metric.COSINE, Metric.DOT, Metric.EUCLIDEAN)
    options: ClassVar[dict[str, Option]] = {
        "bits": Option(int, 16, "hyperplanes per table; about log2(n / 16) suits n vectors"),
        "tables": Option(int, 8, "hash tables; more: better recall, more memory and time"),
        "probe": Option(int, 1, "also visit buckets at this Hamming distance (0 or 1)"),
        "seed": Option(int, 0, "seed of the random hyperplanes"),
    }

    def __init__(
        self,
        *,
        dim: int,
        metric: str | Metric = Metric.COSINE,
        bits: int = 16,
        tables: int = 8,
        probe: int = 1,
        seed: int = 0,
    ) -> None:
        self._setup(dim, metric)
        self.bits = check_int(self.backend, "bits", bits, low=1, high=64)
        self.tables = check_int(self.backend, "tables", tables, low=1, high=1024)
        self.probe = check_int(self.backend, "probe", probe, low=0, high=1)
        self.seed = check_int(self.backend, "seed", seed, low=0, high=2**63 - 1)
        rng = np.random.default_rng(self.seed)
        planes = rng.standard_normal((self.dim, self.tables * self.bits))
        self._planes = planes.astype(np.float32)
        self._center: np.ndarray | None = None
        self._store = RowStore(
            vectors=np.empty((0, self.dim), dtype=np.float32),
            codes=np.empty((0, self.tables), dtype=np.uint64),
        )
        self._buckets: tuple[np.ndarray, np.ndarray] | None = None

    def _options(self) -> dict[str, Any]:
        return {"bits": self.bits, "tables": self.tables, "probe": self.probe, "seed": self.seed}

    def _keys(self, vectors: np.ndarray) -> np.ndarray:
        return vectors if self.metric is Metric.EUCLIDEAN else l2_normalize(vectors)

    def _hash(self, vectors: np.ndarray) -> np.ndarray:
        """One uint64 code per table for each row."""
        assert self._center is not None
        codes = np.zeros((len(vectors), self.tables), dtype=np.uint64)
        weights = np.left_shift(np.uint64(1), np.arange(self.bits, dtype=np.uint64))
        for start in range(0, len(vectors), 8192):  # bounds the temporary sign matrix
            chunk = self._keys(vectors[start : start + 8192]) - self._center
            signs = (chunk @ self._planes > 0).reshape(len(chunk), self.tables, self.bits)
            codes[start : start + len(chunk)] = (signs * weights).sum(axis=2, dtype=np.uint64)
        return codes

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        vectors = as_vectors(vectors, self.dim)
        ids = as_new_ids(ids, len(vectors))
        if not len(ids):
            return
        if self._center is None:
            self._center = self._keys(vectors).mean(axis=0).astype(np.float32)
        self._store.upsert(ids, vectors=vectors, codes=self._hash(vectors))
        self._buckets = None

    def _invalidate(self) -> None:
        self._buckets = None

    def _sorted_buckets(self) -> tuple[np.ndarray, np.ndarray]:
        """Per table, codes sorted with the row order: bucket lookup is a binary search."""
        if self._buckets is None:
            codes = self._store["codes"].T
            order = np.argsort(codes, axis=1, kind="stable")
            self._buckets = (np.take_along_axis(codes, order, axis=1), order)
        return self._buckets

    def search(self, queries: np.ndarray, k: int) -> SearchHits:
        return search_rows(as_vectors(queries, self.dim), k, len(self), self.metric, self._run)

    def _run(self, queries: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
        sorted_codes, order = self._sorted_buckets()
        n = len(self._store)
        flips = [np.uint64(0)]
        if self.probe:
            flips += list(np.left_shift(np.uint64(1), np.arange(self.bits, dtype=np.uint64)))
        probes = self._hash(queries)[:, :, None] ^ np.array(flips, dtype=np.uint64)
        lows = np.empty(probes.shape, dtype=np.int64)
        highs = np.empty(probes.shape, dtype=np.int64)
        for table in range(self.tables):
            lows[:, table] = np.searchsorted(sorted_codes[table], probes[:, table], "left")
            highs[:, table] = np.searchsorted(sorted_codes[table], probes[:, table], "right")
        # Offsets into the flattened per-table orders, so each (table, probe) range of every
        # query can be gathered in one vectorised step.
        lows += (np.arange(self.tables, dtype=np.int64) * n)[None, :, None]
        highs += (np.arange(self.tables, dtype=np.int64) * n)[None, :, None]
        flat_order = order.reshape(-1)
        higher = self.metric.higher_is_better
        ids = np.full((len(queries), width), -1, dtype=np.int64)
        scores = np.zeros((len(queries), width), dtype=np.float32)
        for row in range(len(queries)):
            starts, lengths = lows[row].reshape(-1), (highs[row] - lows[row]).reshape(-1)
            total = int(lengths.sum())
            if total == 0:
                continue
            candidates = np.unique(flat_order[_concat_ranges(starts, lengths, total)])
            vectors = self._store["vectors"][candidates]
            found = score_matrix(queries[row : row + 1], vectors, self.metric)
            positions, values = top_k(found, width, higher_is_better=higher)
            ids[row, : positions.shape[1]] = self._store.ids[candidates[positions[0]]]
            scores[row, : positions.shape[1]] = values[0]
        return ids, scores

    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        arrays: dict[str, np.ndarray] = {
            "planes": self._planes,
            "ids": self._store.ids,
            "vectors": self._store["vectors"],
            "codes": self._store["codes"],
        }
        if self._center is not None:
            arrays["center"] = self._center
        return {}, arrays

    def _restore(self, state: dict[str, Any], file: IndexFile) -> None:
        planes = file.array("planes")
        if planes.shape != self._planes.shape or planes.dtype != np.float32:
            raise CorruptIndexError("stored hyperplanes do not match bits, tables and dim")
        self._planes = planes
        self._center = file.arrays.get("center")
        self._store.restore(
            file.array("ids"), vectors=file.array("vectors"), codes=file.array("codes")
        )
        if len(self._store) and (self._center is None or self._center.shape != (self.dim,)):
            raise CorruptIndexError("stored vectors without a hashing centre")


def _concat_ranges(starts: np.ndarray, lengths: np.ndarray, total: int) -> np.ndarray:
    """``concatenate([arange(s, s + l) for s, l in zip(starts, lengths)])`` without a loop."""
    offsets = np.cumsum(lengths) - lengths
    ranges: np.ndarray = np.arange(total, dtype=np.int64) - np.repeat(offsets - starts, lengths)
    return ranges
