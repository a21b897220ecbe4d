"""HNSW graph search via faiss ``IndexHNSWFlat`` or, with ``sq``, ``IndexHNSWSQ``.

Metrics: cosine is inner product on normalised vectors, dot is inner product, euclidean is L2
(faiss returns squared distances; the square root is taken).

Storage (``sq``): the graph nodes hold the vectors it compares while inserting and searching.
- ``sq=0`` (default): float32, ``4 * dim`` bytes per vector, exact scores.
- ``sq=16``: float16, ``2 * dim`` bytes. No training; on L2-normalised embeddings the rounding
  (about 3 significant digits) costs almost no recall (0.998 recall@10 for an exhaustive
  scan of 200k x 1280 EfficientNet-like vectors), and the graph walk is as fast or faster.
- ``sq=8``: 8 bits per component with a per-dimension range, ``dim`` bytes. The ranges are
  the minimum and maximum of each dimension, widened by 5% on each side for later vectors
  (values outside are clipped). They are trained on everything stored once at least
  ``_SQ8_TRAIN_MIN`` vectors are there (normally on the first, bulk add); until then the
  graph keeps float32 storage, so a small first batch never fixes badly estimated ranges.
  The rounding caps recall@10 near 0.98 on such data, so it needs a larger ``ef`` than float
  storage for the same recall.
Scores returned with ``sq`` are computed on the stored (rounded) vectors, so they are close
to, not exactly, the true similarities. Queries are never quantised.

No second copy: only the graph holds the vectors. Rebuilding (compaction, the switch of an
``sq=8`` index to 8-bit storage) reconstructs them from the graph in chunks; decoding and
re-encoding a quantised vector gives back the same code, so compaction loses nothing more.
Vectors are normalised and added in chunks of ``ADD_CHUNK`` rows, so adding n vectors does
not make a normalised float copy of all of them, and the storage grows once per ``add``
rather than by doubling (see ``_reserve``).

Removal: faiss HNSW graphs cannot delete nodes. Removed (and replaced, on upsert) vectors are
marked deleted instead, and searches pass faiss a bitmap ``IDSelector`` of live nodes, so
deleted nodes still route the graph walk but never appear in results (no over-fetching
guesswork). When deleted nodes reach a quarter of the graph it is rebuilt from the live
vectors, which bounds the wasted memory and the recall loss from routing through dead nodes.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np

from lookalike.errors import CorruptIndexError, IndexSpecError
from lookalike.knn._common import (
    BaseIndex,
    Option,
    as_new_ids,
    check_int,
    import_faiss,
    search_rows,
)
from lookalike.knn._format import IndexFile
from lookalike.knn.base import Metric, SearchHits, as_vectors
from lookalike.knn.exact import faiss_metric, faiss_ready, faiss_scores

_COMPACT_FRACTION = 0.25
_COMPACT_MIN_DELETED = 256
ADD_CHUNK = 16_384  # rows normalised / reconstructed per faiss call: bounds float temporaries
_SQ8_TRAIN_MIN = 16_384  # sq=8 keeps float storage until this many vectors are stored
_SQ8_MARGIN = 0.05  # trained ranges are widened by this fraction of their width on each side
SQ_CHOICES = (0, 8, 16)
# The ef values the tuner tries (lookalike.knn.tuning). It stops at 512: past that the cheap
# graph gained little recall for much time at 100k x 1280 (realistic vectors: 0.993 at ef=384,
# 0.994 at 1024, at less than half the speed; the hard Gaussian mixture: 0.67 at 1024, 0.69 at
# 2048), so the tuner moves on to an inverted file instead (see choose_spec).
EF_VALUES = (16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 512)


def stored_bytes(dim: int, sq: int) -> int:
    """Bytes one vector takes in the graph's storage for an ``sq`` setting."""
    return {0: 4 * dim, 16: 2 * dim, 8: dim}[sq]


def _reserve(graph: Any, rows: int) -> None:
    """Make room for ``rows`` more vectors in the graph's storage in one step.

    faiss appends codes with ``std::vector::resize``, which doubles the capacity and copies:
    adding in chunks would hold the old and the new buffer at once, up to twice the final size
    (measured: 700 instead of 520 MiB for 200k float16 vectors of 1280 dims). Resizing up and
    back down leaves the capacity in place, so the chunks fill it without reallocating.
    """
    storage = import_faiss().downcast_index(graph.storage)
    codes = storage.codes
    size = codes.size()
    codes.resize(size + rows * storage.code_size)
    codes.resize(size)


class HNSWIndex(BaseIndex):
    """Hierarchical navigable small-world graph (faiss) with tombstone deletion."""

    backend: ClassVar[str] = "hnsw"
    tuning_knob: ClassVar[str] = "ef"
    metrics: ClassVar[tuple[Metric, ...]] = (Metric.COSINE, Metric.DOT, Metric.EUCLIDEAN)
    options: ClassVar[dict[str, Option]] = {
        "M": Option(int, 32, "graph degree; more: better recall, more memory"),
        "efConstruction": Option(int, 200, "candidate list size while inserting"),
        "ef": Option(int, 128, "candidate list size while searching (raised to k if lower)"),
        "sq": Option(int, 0, "stored precision: 0 float32, 16 float16, 8 8-bit quantised"),
    }

    def __init__(
        self,
        *,
        dim: int,
        metric: str | Metric = Metric.COSINE,
        M: int = 32,  # the name HNSW papers and libraries use
        efConstruction: int = 200,
        ef: int = 128,
        sq: int = 0,
    ) -> None:
        self._setup(dim, metric)
        self.M = check_int(self.backend, "M", M, low=2, high=512)
        self.efConstruction = check_int(
            self.backend, "efConstruction", efConstruction, low=1, high=100_000
        )
        self.ef = check_int(self.backend, "ef", ef, low=1, high=100_000)
        sq = check_int(self.backend, "sq", sq, low=0, high=16)
        if sq not in SQ_CHOICES:
            raise IndexSpecError(f"hnsw: sq must be one of 0|8|16, got {sq}")
        self.sq = sq
        self._graph = self._new_graph(quantised=self.sq == 16)
        self._labels = np.empty(0, dtype=np.int64)  # node -> id, -1 once deleted

    def _new_graph(self, *, quantised: bool, ranges: np.ndarray | None = None) -> Any:
        """An empty graph: float32 storage, or the ``sq`` storage. For ``sq=8``, ``ranges``
        (two rows: per-dimension low and high) trains the quantiser; without it the trained
        state of the current graph is copied."""
        faiss = import_faiss()
        metric = faiss_metric(self.metric)
        if not quantised:
            graph = faiss.IndexHNSWFlat(self.dim, self.M, metric)
        elif self.sq == 16:
            graph = faiss.IndexHNSWSQ(self.dim, faiss.ScalarQuantizer.QT_fp16, self.M, metric)
        else:
            graph = faiss.IndexHNSWSQ(self.dim, faiss.ScalarQuantizer.QT_8bit, self.M, metric)
            if ranges is not None:
                graph.train(np.ascontiguousarray(ranges, dtype=np.float32))
            else:
                # Copied, not re-derived, so re-encoding decoded vectors gives the same codes.
                source = faiss.downcast_index(self._graph.storage).sq.trained
                storage = faiss.downcast_index(graph.storage)
                faiss.copy_array_to_vector(faiss.vector_to_array(source), storage.sq.trained)
                storage.is_trained = graph.is_trained = True
        graph.hnsw.efConstruction = self.efConstruction
        return graph

    def _options(self) -> dict[str, Any]:
        return {"M": self.M, "efConstruction": self.efConstruction, "ef": self.ef, "sq": self.sq}

    @property
    def tuning_value(self) -> int:
        """The search candidate list size (``ef``): the knob the tuner sets."""
        return self.ef

    def tuning_values(self) -> list[int]:
        """Candidate ``ef`` values, ascending (see ``EF_VALUES``)."""
        return list(EF_VALUES)

    def set_tuning(self, value: int) -> None:
        """Search with candidate lists of ``value`` from now on."""
        self.ef = check_int(self.backend, "ef", value, low=1, high=100_000)

    def __len__(self) -> int:
        return int(np.count_nonzero(self._labels >= 0))

    @property
    def deleted(self) -> int:
        """Nodes still in the graph but marked deleted."""
        return len(self._labels) - len(self)

    @property
    def quantised(self) -> bool:
        """True once vectors are stored at the ``sq`` precision (always, for sq=16)."""
        return self.sq != 0 and not isinstance(self._graph, import_faiss().IndexHNSWFlat)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        vectors = as_vectors(vectors, self.dim)
        ids = as_new_ids(ids, len(vectors))
        if not len(ids):
            return
        self._mark_deleted(ids)
        if self.sq == 8 and not self.quantised and len(self) + len(ids) >= _SQ8_TRAIN_MIN:
            self._quantise(vectors)
        _reserve(self._graph, len(vectors))
        for start in range(0, len(vectors), ADD_CHUNK):
            self._graph.add(faiss_ready(vectors[start : start + ADD_CHUNK], self.metric))
        self._labels = np.concatenate([self._labels, ids])
        self._maybe_compact()

    def reserve(self, total: int) -> None:
        """Make room for ``total`` vectors in the graph's storage now (on an empty graph,
        exactly that much), so that adding them over several calls never reallocates it: a
        later ``add`` would otherwise double the storage's capacity, copying all of it (the
        tuner adds a held-out sample after the rest; see ``_reserve``)."""
        more = total - len(self._labels)
        if more > 0:
            _reserve(self._graph, more)

    def _quantise(self, incoming: np.ndarray) -> None:
        """Train the 8-bit ranges on the stored live vectors plus ``incoming`` and move the
        stored ones into a graph with 8-bit storage (dropping deleted nodes)."""
        low = np.full(self.dim, np.inf, dtype=np.float32)
        high = np.full(self.dim, -np.inf, dtype=np.float32)
        incoming_blocks = (
            faiss_ready(incoming[start : start + ADD_CHUNK], self.metric)
            for start in range(0, len(incoming), ADD_CHUNK)
        )  # lazily, one chunk at a time: no normalised copy of the whole batch
        stored_blocks = (block for _, block in self._live_blocks())
        for block in itertools.chain(stored_blocks, incoming_blocks):
            low = np.minimum(low, block.min(axis=0))
            high = np.maximum(high, block.max(axis=0))
        margin = (high - low) * _SQ8_MARGIN
        ranges = np.stack([low - margin, high + margin])
        self._rebuild(self._new_graph(quantised=True, ranges=ranges))

    def _live_blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(labels, vectors) of the live nodes, reconstructed ``ADD_CHUNK`` nodes at a time."""
        alive = self._labels >= 0
        for start in range(0, len(self._labels), ADD_CHUNK):
            stop = min(start + ADD_CHUNK, len(self._labels))
            keep = alive[start:stop]
            if keep.any():
                block = self._graph.reconstruct_n(start, stop - start)[keep]
                yield self._labels[start:stop][keep], np.ascontiguousarray(block)

    def _rebuild(self, graph: Any) -> None:
        """Re-insert the live vectors into ``graph`` (empty) and make it the current graph."""
        labels = [np.empty(0, dtype=np.int64)]
        _reserve(graph, len(self))
        for block_labels, block in self._live_blocks():
            graph.add(block)  # already as faiss_ready made them
            labels.append(block_labels)
        self._graph, self._labels = graph, np.concatenate(labels)

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
        if self.deleted:
            self._rebuild(self._new_graph(quantised=self.quantised))

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
        if isinstance(graph, faiss.IndexHNSWSQ):
            qtype = faiss.downcast_index(graph.storage).sq.qtype
            wanted = {16: faiss.ScalarQuantizer.QT_fp16, 8: faiss.ScalarQuantizer.QT_8bit}
            if wanted.get(self.sq) != qtype:
                raise CorruptIndexError(f"the stored graph's storage does not match sq={self.sq}")
        elif not isinstance(graph, faiss.IndexHNSWFlat) or self.sq == 16:
            raise CorruptIndexError("the stored graph is not an HNSW index of the expected kind")
        if graph.d != self.dim:
            raise CorruptIndexError("the stored graph is not an HNSW index of this dimension")
        if graph.metric_type != faiss_metric(self.metric) or graph.ntotal != len(labels):
            raise CorruptIndexError("the stored graph does not match its labels or metric")
        live = labels[labels >= 0]
        if labels.dtype != np.int64 or len(np.unique(live)) != len(live):
            raise CorruptIndexError("stored labels are not unique int64 ids")
        self._graph, self._labels = graph, labels
        self._graph.hnsw.efConstruction = self.efConstruction
