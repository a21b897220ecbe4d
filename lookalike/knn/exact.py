"""Exact (brute-force) search: the reference every other backend is tested against.

``engine=numpy`` (default) scans a float32 matrix with numpy; ``engine=faiss`` keeps the vectors
in a faiss ``IndexFlatIP``/``IndexFlatL2`` behind an ``IndexIDMap2`` (same results, faster
multi-threaded scans on large collections).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from lookalike.errors import CorruptIndexError
from lookalike.knn._common import (
    BaseIndex,
    Option,
    RowStore,
    as_new_ids,
    check_choice,
    import_faiss,
    search_rows,
)
from lookalike.knn._format import IndexFile
from lookalike.knn.base import Metric, SearchHits, as_vectors, l2_normalize

_ENGINES = ("numpy", "faiss")


def top_k(scores: np.ndarray, k: int, *, higher_is_better: bool) -> tuple[np.ndarray, np.ndarray]:
    """Column positions and values of the best k entries of each row, best first."""
    n = scores.shape[1]
    k = min(k, n)
    if k == 0:
        empty = np.empty((scores.shape[0], 0))
        return empty.astype(np.int64), empty.astype(np.float32)
    keyed = -scores if higher_is_better else scores
    if k < n:
        part = np.argpartition(keyed, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(n), (scores.shape[0], n))
    part_keys = np.take_along_axis(keyed, part, axis=1)
    order = np.argsort(part_keys, axis=1, kind="stable")
    positions = np.take_along_axis(part, order, axis=1)
    return positions.astype(np.int64), np.take_along_axis(scores, positions, axis=1)


def score_matrix(queries: np.ndarray, database: np.ndarray, metric: Metric) -> np.ndarray:
    """Scores of every query against every database row, in the metric's convention."""
    scores: np.ndarray
    if metric is Metric.COSINE:
        scores = l2_normalize(queries) @ l2_normalize(database).T
        return scores
    if metric is Metric.DOT:
        scores = queries @ database.T
        return scores
    if metric is Metric.EUCLIDEAN:
        squared = (
            np.einsum("ij,ij->i", queries, queries)[:, None]
            - 2.0 * (queries @ database.T)
            + np.einsum("ij,ij->i", database, database)[None, :]
        )
        scores = np.sqrt(np.maximum(squared, 0.0))
        return scores
    raise CorruptIndexError(f"the exact float index does not support metric {metric.value!r}")


def prepared_scores(
    queries: np.ndarray, stored: np.ndarray, metric: Metric, squared_norms: np.ndarray | None
) -> np.ndarray:
    """Like ``score_matrix`` for rows already passed through ``faiss_ready`` (normalised for
    cosine), with their squared norms precomputed for euclidean: no per-query database pass."""
    scores: np.ndarray
    if metric is Metric.COSINE:
        scores = l2_normalize(queries) @ stored.T
        return scores
    if metric is Metric.DOT:
        scores = queries @ stored.T
        return scores
    assert squared_norms is not None
    squared = np.einsum("ij,ij->i", queries, queries)[:, None] - 2.0 * (queries @ stored.T)
    scores = np.sqrt(np.maximum(squared + squared_norms[None, :], 0.0))
    return scores


def faiss_metric(metric: Metric) -> int:
    """The faiss metric type: cosine is inner product on normalised vectors."""
    faiss = import_faiss()
    metric_type: int = faiss.METRIC_L2 if metric is Metric.EUCLIDEAN else faiss.METRIC_INNER_PRODUCT
    return metric_type


def faiss_ready(vectors: np.ndarray, metric: Metric) -> np.ndarray:
    """What faiss should store or query for this metric (normalised for cosine)."""
    return l2_normalize(vectors) if metric is Metric.COSINE else vectors


def faiss_scores(distances: np.ndarray, metric: Metric) -> np.ndarray:
    """faiss L2 indexes return squared distances; the convention is true L2."""
    if metric is Metric.EUCLIDEAN:
        scores: np.ndarray = np.sqrt(np.maximum(distances, 0.0))
        return scores
    return distances


class ExactIndex(BaseIndex):
    """Keeps every vector in memory and scans them all for each query batch."""

    backend: ClassVar[str] = "exact"
    metrics: ClassVar[tuple[Metric, ...]] = (Metric.COSINE, Metric.DOT, Metric.EUCLIDEAN)
    options: ClassVar[dict[str, Option]] = {
        "engine": Option(_ENGINES, "numpy", "numpy scan, or faiss IndexFlat + IndexIDMap2"),
    }

    def __init__(
        self, *, dim: int, metric: str | Metric = Metric.COSINE, engine: str = "numpy"
    ) -> None:
        self._setup(dim, metric)
        self.engine = check_choice(self.backend, "engine", engine, _ENGINES)
        # Rows as faiss_ready() makes them: cosine vectors are normalised once, at add time.
        self._store = RowStore(vectors=np.empty((0, self.dim), dtype=np.float32))
        self._squared_norms: np.ndarray | None = None  # euclidean only, rebuilt after changes
        self._faiss: Any = None
        if self.engine == "faiss":
            faiss = import_faiss()
            flat = faiss.IndexFlat(self.dim, faiss_metric(self.metric))
            self._faiss = faiss.IndexIDMap2(flat)

    def _options(self) -> dict[str, Any]:
        return {"engine": self.engine}

    def __len__(self) -> int:
        if self._faiss is not None:
            return int(self._faiss.ntotal)
        return len(self._store)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        vectors = as_vectors(vectors, self.dim)
        ids = as_new_ids(ids, len(vectors))
        if self._faiss is None:
            self._store.upsert(ids, vectors=faiss_ready(vectors, self.metric))
            self._squared_norms = None
            return
        self._faiss.remove_ids(ids)
        self._faiss.add_with_ids(faiss_ready(vectors, self.metric), ids)

    def remove(self, ids: np.ndarray) -> int:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if self._faiss is None:
            self._squared_norms = None
            return self._store.remove(ids)
        return int(self._faiss.remove_ids(ids)) if len(ids) else 0

    def search(self, queries: np.ndarray, k: int) -> SearchHits:
        return search_rows(as_vectors(queries, self.dim), k, len(self), self.metric, self._run)

    def _run(self, queries: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
        if self._faiss is not None:
            distances, ids = self._faiss.search(faiss_ready(queries, self.metric), width)
            return ids, faiss_scores(distances, self.metric)
        stored = self._store["vectors"]
        if self.metric is Metric.EUCLIDEAN and self._squared_norms is None:
            self._squared_norms = np.einsum("ij,ij->i", stored, stored)
        scores = prepared_scores(queries, stored, self.metric, self._squared_norms)
        positions, values = top_k(scores, width, higher_is_better=self.metric.higher_is_better)
        return self._store.ids[positions], values

    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        if self._faiss is not None:
            faiss = import_faiss()
            return {}, {"faiss": faiss.serialize_index(self._faiss)}
        return {}, {"ids": self._store.ids, "vectors": self._store["vectors"]}

    def _restore(self, state: dict[str, Any], file: IndexFile) -> None:
        if self._faiss is None:
            self._store.restore(file.array("ids"), vectors=file.array("vectors"))
            return
        faiss = import_faiss()
        index = faiss.deserialize_index(file.array("faiss"))
        if not isinstance(index, faiss.IndexIDMap2) or index.d != self.dim:
            raise CorruptIndexError("the stored faiss index is not a flat IDMap2 index")
        if index.metric_type != faiss_metric(self.metric):
            raise CorruptIndexError("the stored faiss index uses another metric")
        self._faiss = index
