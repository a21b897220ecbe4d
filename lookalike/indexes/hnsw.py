"""HNSW graph search via faiss ``IndexHNSWFlat``.

Metrics: cosine is inner product on normalised vectors, dot is inner product, euclidean is L2
(faiss returns squared distances; the square root is taken).

Removal: faiss HNSW graphs cannot delete nodes. Removed (and replaced, on upsert) vectors are
marked deleted instead, and searches pass faiss a bitmap ``IDSelector`` of live nodes, so
deleted nodes still route the graph walk but never appear in results (no over-fetching
guesswork). When deleted nodes reach a quarter of the graph it is rebuilt from the live
vectors, which bounds the wasted memory and the recall loss from routing through dead nodes.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from lookalike.errors import CorruptIndexError
from lookalike.indexes._common import (
    BaseIndex,
    Option,
    as_new_ids,
    check_int,
    import_faiss,
    search_rows,
)
from lookalike.indexes._format import IndexFile
from lookalike.indexes.base import Metric, SearchHits, as_vectors
from lookalike.indexes.exact import faiss_metric, faiss_ready, faiss_scores

_COMPACT_FRACTION = 0.25
_COMPACT_MIN_DELETED = 256


class HNSWIndex(BaseIndex):
    """Hierarchical navigable small-world graph (faiss) with tombstone deletion."""

    backend: ClassVar[str] = "hnsw"
    metrics: ClassVar[tuple[Metric, ...]] = (Metric.COSINE, Metric.DOT, Metric.EUCLIDEAN)
    options: ClassVar[dict[str, Option]] = {
        "M": Option(int, 32, "graph degree; more: better recall, more memory"),
        "efConstruction": Option(int, 200, "candidate list size while inserting"),
        "ef": Option(int, 128, "candidate list size while searching (raised to k if lower)"),
    }

    def __init__(
        self,
        *,
        dim: int,
        metric: str | Metric = Metric.COSINE,
        M: int = 32,  # the name HNSW papers and libraries use
        efConstruction: int = 200,
        ef: int = 128,
    ) -> None:
        self._setup(dim, metric)
        self.M = check_int(self.backend, "M", M, low=2, high=512)
        self.efConstruction = check_int(
            self.backend, "efConstruction", efConstruction, low=1, high=100_000
        )
        self.ef = check_int(self.backend, "ef", ef, low=1, high=100_000)
        self._graph = self._new_graph()
        self._labels = np.empty(0, dtype=np.int64)  # node -> id, -1 once deleted

    def _new_graph(self) -> Any:
        faiss = import_faiss()
        graph = faiss.IndexHNSWFlat(self.dim, self.M, faiss_metric(self.metric))
        graph.hnsw.efConstruction = self.efConstruction
        return graph

    def _options(self) -> dict[str, Any]:
        return {"M": self.M, "efConstruction": self.efConstruction, "ef": self.ef}

    def __len__(self) -> int:
        return int(np.count_nonzero(self._labels >= 0))

    @property
    def deleted(self) -> int:
        """Nodes still in the graph but marked deleted."""
        return len(self._labels) - len(self)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        vectors = as_vectors(vectors, self.dim)
        ids = as_new_ids(ids, len(vectors))
        if not len(ids):
            return
        self._mark_deleted(ids)
        self._graph.add(faiss_ready(vectors, self.metric))
        self._labels = np.concatenate([self._labels, ids])
        self._maybe_compact()

    def remove(self, ids: np.ndarray) -> int:
        removed = self._mark_deleted(np.asarray(ids, dtype=np.int64).reshape(-1))
        self._maybe_compact()
        return removed

    def _mark_deleted(self, ids: np.ndarray) -> int:
        if not len(ids) or not len(self._labels):
            return 0
        hit = np.isin(self._labels, ids) & (self._labels >= 0)
        self._labels[hit] = -1
        return int(np.count_nonzero(hit))

    def _maybe_compact(self) -> None:
        if self.deleted >= max(_COMPACT_MIN_DELETED, _COMPACT_FRACTION * len(self._labels)):
            self.compact()

    def compact(self) -> None:
        """Rebuild the graph from the live vectors, dropping deleted nodes."""
        if not self.deleted:
            return
        live = np.flatnonzero(self._labels >= 0)
        vectors = self._graph.reconstruct_n(0, len(self._labels))[live]
        graph = self._new_graph()
        if len(live):
            graph.add(np.ascontiguousarray(vectors))
        self._graph, self._labels = graph, self._labels[live]

    def search(self, queries: np.ndarray, k: int) -> SearchHits:
        return search_rows(as_vectors(queries, self.dim), k, len(self), self.metric, self._run)

    def _run(self, queries: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
        faiss = import_faiss()
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(self.ef, width)
        bitmap = None
        if self.deleted:
            # Kept referenced until the search returns: faiss only holds a raw pointer.
            bitmap = np.packbits(self._labels >= 0, bitorder="little")
            params.sel = faiss.IDSelectorBitmap(len(self._labels), faiss.swig_ptr(bitmap))
        distances, nodes = self._graph.search(
            faiss_ready(queries, self.metric), width, params=params
        )
        del bitmap
        ids = np.where(nodes >= 0, self._labels[nodes], -1)
        return ids, faiss_scores(distances, self.metric)

    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        faiss = import_faiss()
        return {}, {"graph": faiss.serialize_index(self._graph), "labels": self._labels}

    def _restore(self, state: dict[str, Any], file: IndexFile) -> None:
        faiss = import_faiss()
        graph = faiss.deserialize_index(file.array("graph"))
        labels = file.array("labels")
        if not isinstance(graph, faiss.IndexHNSWFlat) or graph.d != self.dim:
            raise CorruptIndexError("the stored graph is not an HNSW index of this dimension")
        if graph.metric_type != faiss_metric(self.metric) or graph.ntotal != len(labels):
            raise CorruptIndexError("the stored graph does not match its labels or metric")
        live = labels[labels >= 0]
        if labels.dtype != np.int64 or len(np.unique(live)) != len(live):
            raise CorruptIndexError("stored labels are not unique int64 ids")
        self._graph, self._labels = graph, labels
        self._graph.hnsw.efConstruction = self.efConstruction
