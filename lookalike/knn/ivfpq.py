"""Inverted file + product quantisation via faiss ``IndexIVFPQ``: compact, for very large sets.

- Training: the coarse quantiser (``nlist`` centroids) and the product quantiser (``m``
  sub-quantisers of ``2**nbits`` centroids) are trained on the stored vectors as soon as
  ``train_size(nlist, nbits)`` vectors (16 per centroid of the larger codebook) have arrived,
  or explicitly with ``train()``. Until then vectors are kept in flat float storage and searched
  exactly, so a small or growing collection never crashes and never gets a badly trained index.
- ``m`` must divide ``dim``: a spec that does not satisfies this raises IndexSpecError listing
  the valid values. Padding was rejected because it silently costs code bytes on dimensions
  that carry no information. Without ``m``, the divisor of ``dim`` closest to ``dim / 4`` is
  used, closest by ratio (about 4 dimensions per code byte at 8 bits; a prime dim gets m=dim).
- ``rerank=N`` fetches ``max(N, k)`` candidates and re-scores them exactly with float vectors
  kept beside the codes (costs ``4 * dim`` bytes per vector more, ``2 * dim`` with ``sq=16``,
  which keeps them as float16: on L2-normalised embeddings the rounding leaves recall
  unchanged and halves the memory); ``rerank=0`` keeps only codes.
- ``quantizer=hnsw`` finds the ``nprobe`` nearest clusters with an HNSW graph over the
  centroids instead of scanning all ``nlist`` of them: with thousands of 1280-d centroids the
  scan alone costs more than visiting the lists. k-means still assigns exactly while training.
- Removal (and the removal half of an upsert) uses faiss ``remove_ids``, which scans the
  inverted lists: O(n) per call (multi-threaded), so batch changes. A hash-table direct map
  would make it O(ids) but costs ~50 bytes per vector, more than the codes themselves.
- Scores of non-reranked hits are approximate (PQ distances); euclidean ones are square-rooted.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from lookalike.errors import CorruptIndexError, IndexSpecError, VectorIndexError
from lookalike.knn._common import (
    BaseIndex,
    Option,
    RowStore,
    as_new_ids,
    check_choice,
    check_int,
    import_faiss,
    search_rows,
)
from lookalike.knn._format import IndexFile
from lookalike.knn.base import Metric, SearchHits, as_vectors
from lookalike.knn.exact import faiss_metric, faiss_ready, faiss_scores, score_matrix, top_k

_POINTS_PER_CENTROID = 16
_RERANK_CHUNK = 64
_STORED_DTYPES = {0: np.float32, 16: np.float16}
_ADD_CHUNK = 16_384  # rows normalised per faiss call: bounds float temporaries
_COARSE_POINTS_PER_CENTROID = 32
_PQ_POINTS_PER_CENTROID = 64
_QUANTIZER_M = 32  # graph degree of the HNSW over the centroids
_QUANTIZER_EF = 128  # its search list: finds the nprobe nearest centroids almost exactly


def train_size(nlist: int, nbits: int) -> int:
    """Vectors needed before training: 16 per centroid of the larger codebook."""
    codebook: int = 2**nbits
    return _POINTS_PER_CENTROID * max(nlist, codebook)


def _training_sample(vectors: np.ndarray, most: int) -> np.ndarray:
    """float32 rows for k-means: all of them, or a seeded random subset of the ``most`` that
    training looks at (faiss would subsample the same way, but only after a full float copy)."""
    if len(vectors) > most:
        rows = np.sort(np.random.default_rng(0).choice(len(vectors), most, replace=False))
        vectors = vectors[rows]
    return np.ascontiguousarray(vectors, dtype=np.float32)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def default_m(dim: int) -> int:
    """The divisor of ``dim`` closest to ``dim / 4`` by ratio (the larger one on ties)."""
    return min(divisors(dim), key=lambda d: (abs(math.log(4 * d / dim)), -d))


class IVFPQIndex(BaseIndex):
    """faiss IVF-PQ with a flat fallback before training and optional exact re-ranking."""

    backend: ClassVar[str] = "ivfpq"
    tuning_knob: ClassVar[str] = "nprobe"
    metrics: ClassVar[tuple[Metric, ...]] = (Metric.COSINE, Metric.DOT, Metric.EUCLIDEAN)
    options: ClassVar[dict[str, Option]] = {
        "nlist": Option(int, 1024, "coarse clusters; about 4 * sqrt(n) suits n vectors"),
        "m": Option(int, 0, "PQ sub-quantisers, must divide dim; 0 picks one near dim / 4"),
        "nbits": Option(int, 8, "bits per sub-quantiser code"),
        "nprobe": Option(int, 16, "clusters visited per query"),
        "rerank": Option(int, 0, "re-score this many candidates exactly (0: off)"),
        "sq": Option(int, 0, "precision of the re-rank vectors: 0 float32, 16 float16"),
        "quantizer": Option(("flat", "hnsw"), "flat", "how the nearest clusters are found"),
    }

    def __init__(
        self,
        *,
        dim: int,
        metric: str | Metric = Metric.COSINE,
        nlist: int = 1024,
        m: int = 0,
        nbits: int = 8,
        nprobe: int = 16,
        rerank: int = 0,
        sq: int = 0,
        quantizer: str = "flat",
    ) -> None:
        self._setup_lists(dim, metric, nlist, nprobe, quantizer)
        m = check_int(self.backend, "m", m, low=0, high=self.dim)
        if m and self.dim % m:
            raise IndexSpecError(
                f"ivfpq: m={m} does not divide dim={self.dim}; valid m for this dimension: "
                + ", ".join(map(str, divisors(self.dim)))
            )
        self.m = m or default_m(self.dim)
        self.nbits = check_int(self.backend, "nbits", nbits, low=1, high=16)
        self.rerank = check_int(self.backend, "rerank", rerank, low=0, high=100_000)
        self.sq = check_int(self.backend, "sq", sq, low=0, high=16)
        if self.sq not in _STORED_DTYPES:
            raise IndexSpecError(f"ivfpq: sq must be 0 or 16, got {sq}")
        # Float vectors: everything before training, and afterwards only when re-ranking.
        self._store = self._empty_store()
        self._ivf: Any = None

    def _setup_lists(
        self, dim: int, metric: str | Metric, nlist: int, nprobe: int, quantizer: str
    ) -> None:
        """Validate and set what every inverted-file backend has: dim, metric, the clusters."""
        self._setup(dim, metric)
        self.nlist = check_int(self.backend, "nlist", nlist, low=1, high=2**20)
        self.nprobe = check_int(self.backend, "nprobe", nprobe, low=1, high=2**20)
        self.quantizer = check_choice(self.backend, "quantizer", quantizer, ("flat", "hnsw"))

    @property
    def _stored_dtype(self) -> type:
        """dtype of the float vectors kept beside the inverted lists (and before training)."""
        return _STORED_DTYPES[self.sq]

    def _empty_store(self) -> RowStore:
        return RowStore(vectors=np.empty((0, self.dim), dtype=self._stored_dtype))

    def _train_size(self) -> int:
        return train_size(self.nlist, self.nbits)

    def _training_points(self) -> int:
        codebook: int = 2**self.nbits
        return max(_COARSE_POINTS_PER_CENTROID * self.nlist, _PQ_POINTS_PER_CENTROID * codebook)

    def _new_ivf(self, quantizer: Any, metric: int) -> Any:
        """An untrained faiss IVF index over ``quantizer``, with its own training settings."""
        faiss = import_faiss()
        ivf = faiss.IndexIVFPQ(quantizer, self.dim, self.nlist, self.m, self.nbits, metric)
        ivf.pq.cp.min_points_per_centroid = 1  # the sample size is enforced by train_size()
        ivf.pq.cp.max_points_per_centroid = _PQ_POINTS_PER_CENTROID
        return ivf

    def _check_restored(self, ivf: Any) -> None:
        """Raise CorruptIndexError unless a loaded faiss index is the one the header says."""
        faiss = import_faiss()
        if not isinstance(ivf, faiss.IndexIVFPQ) or ivf.d != self.dim:
            raise CorruptIndexError("the stored index is not an IVF-PQ index of this dimension")
        if (ivf.nlist, ivf.pq.M, ivf.pq.nbits) != (self.nlist, self.m, self.nbits):
            raise CorruptIndexError("the stored IVF-PQ parameters do not match the header")

    def _options(self) -> dict[str, Any]:
        return {
            "nlist": self.nlist,
            "m": self.m,
            "nbits": self.nbits,
            "nprobe": self.nprobe,
            "rerank": self.rerank,
            "sq": self.sq,
            "quantizer": self.quantizer,
        }

    @property
    def tuning_value(self) -> int:
        """Clusters visited per query (``nprobe``): the knob the tuner sets."""
        return self.nprobe

    def tuning_values(self) -> list[int]:
        """``nprobe`` candidates: powers of sqrt(2), rounded, up to ``nlist``, where the scan
        is exhaustive (so the last value gives the recall of the stored precision)."""
        steps = range(2 * math.ceil(math.log2(self.nlist)) + 1)
        values = {min(self.nlist, round(2 ** (step / 2))) for step in steps}
        return sorted(values | {self.nlist})

    def set_tuning(self, value: int) -> None:
        """Visit ``value`` clusters per query from now on."""
        self.nprobe = check_int(self.backend, "nprobe", value, low=1, high=2**20)

    @property
    def is_trained(self) -> bool:
        return self._ivf is not None

    def __len__(self) -> int:
        return int(self._ivf.ntotal) if self._ivf is not None else len(self._store)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        vectors = as_vectors(vectors, self.dim)
        ids = as_new_ids(ids, len(vectors))
        if not len(ids):
            return
        if self._ivf is None:
            if len(self._store) + len(ids) < self._train_size():
                self._store.upsert(ids, vectors=vectors.astype(self._stored_dtype, copy=False))
                return
            # Enough to train: learn from a sample of the stored and the new vectors, then put
            # the new ones straight into the lists (a big first batch is never staged whole).
            self._store.remove(ids)
            most = self._training_points()
            sample = np.concatenate(
                [_training_sample(self._store["vectors"], most), _training_sample(vectors, most)]
            )
            self.train(sample)
        else:
            self._ivf.remove_ids(ids)
        self._add_to_ivf(self._ivf, ids, vectors)
        if self.rerank:
            self._store.upsert(ids, vectors=vectors.astype(self._stored_dtype, copy=False))

    def _add_to_ivf(self, ivf: Any, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add in chunks, so that no normalised float32 copy of a whole batch is ever made.

        The lists are assigned first and each list's storage grown once to its final size:
        growing them chunk by chunk would over-allocate by up to 2x (vector doubling)."""
        if not len(ids):
            return
        faiss = import_faiss()
        assign = np.empty(len(ids), dtype=np.int64)
        for start in range(0, len(ids), _ADD_CHUNK):
            block = faiss_ready(vectors[start : start + _ADD_CHUNK].astype(np.float32), self.metric)
            assign[start : start + len(block)] = ivf.quantizer.search(block, 1)[1][:, 0]
        lists = faiss.extract_index_ivf(ivf).invlists
        counts = np.bincount(assign[assign >= 0], minlength=ivf.nlist)
        for list_no in np.flatnonzero(counts).tolist():
            size = lists.list_size(list_no)
            lists.resize(list_no, size + int(counts[list_no]))
            lists.resize(list_no, size)  # shrinking keeps the capacity
        for start in range(0, len(ids), _ADD_CHUNK):
            block = faiss_ready(vectors[start : start + _ADD_CHUNK].astype(np.float32), self.metric)
            block = np.ascontiguousarray(block, dtype=np.float32)
            chunk_ids = np.ascontiguousarray(ids[start : start + len(block)], dtype=np.int64)
            chunk_assign = np.ascontiguousarray(assign[start : start + len(block)])
            ivf.add_core(
                len(block),
                faiss.swig_ptr(block),
                faiss.swig_ptr(chunk_ids),
                faiss.swig_ptr(chunk_assign),
            )

    def train(self, vectors: np.ndarray | None = None) -> None:
        """Train on ``vectors`` (or on the stored ones) and move stored vectors into the lists."""
        if self._ivf is not None:
            raise VectorIndexError(f"{self.backend}: the index is already trained")
        sample = self._store["vectors"] if vectors is None else as_vectors(vectors, self.dim)
        needed = self._train_size()
        if len(sample) < needed:
            raise VectorIndexError(
                f"{self.backend}: training {self.spec} needs at least {needed} vectors, "
                f"got {len(sample)}"
            )
        faiss = import_faiss()
        metric = faiss_metric(self.metric)
        if self.quantizer == "hnsw":
            quantizer = faiss.IndexHNSWFlat(self.dim, _QUANTIZER_M, metric)
            quantizer.hnsw.efSearch = _QUANTIZER_EF
        else:
            quantizer = faiss.IndexFlat(self.dim, metric)
        ivf = self._new_ivf(quantizer, metric)
        # k-means assigns with an exact scan whatever finds clusters at search time.
        clustering = faiss.IndexFlat(self.dim, metric)
        ivf.clustering_index = clustering
        # train_size() already enforces the sample size; this silences faiss's stderr warning.
        ivf.cp.min_points_per_centroid = 1
        # Coarse k-means on a random 32 points per centroid for 10 iterations, the codebooks on
        # 64 per centroid: more costs hours at millions of vectors (4,096 centroids of 1280-d
        # vectors) for little gain in recall once candidates are re-ranked.
        ivf.cp.max_points_per_centroid = _COARSE_POINTS_PER_CENTROID
        ivf.cp.niter = 10
        training = _training_sample(sample, self._training_points())
        ivf.train(faiss_ready(training, self.metric))
        ivf.clustering_index = None
        del clustering, training, sample
        self._add_to_ivf(ivf, self._store.ids, self._store["vectors"])
        self._ivf = ivf
        if not self.rerank:
            self._store = self._empty_store()

    def remove(self, ids: np.ndarray) -> int:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if self._ivf is None:
            return self._store.remove(ids)
        self._store.remove(ids)
        return int(self._ivf.remove_ids(ids)) if len(ids) else 0

    def search(self, queries: np.ndarray, k: int) -> SearchHits:
        return search_rows(as_vectors(queries, self.dim), k, len(self), self.metric, self._run)

    def _run(self, queries: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
        higher = self.metric.higher_is_better
        if self._ivf is None:
            floats = self._store["vectors"].astype(np.float32, copy=False)
            scores = score_matrix(queries, floats, self.metric)
            positions, values = top_k(scores, width, higher_is_better=higher)
            return self._store.ids[positions], values
        faiss = import_faiss()
        params = faiss.SearchParametersIVF()
        params.nprobe = min(self.nprobe, self.nlist)
        if self.quantizer == "hnsw":
            # Kept referenced until the search returns: faiss only holds a raw pointer.
            quantizer_params = faiss.SearchParametersHNSW()
            quantizer_params.efSearch = max(_QUANTIZER_EF, params.nprobe)
            params.quantizer_params = quantizer_params
        fetch = max(width, self.rerank) if self.rerank else width
        distances, ids = self._ivf.search(faiss_ready(queries, self.metric), fetch, params=params)
        if not self.rerank:
            return ids, faiss_scores(distances, self.metric)
        return self._rerank(queries, ids, width)

    def _rerank(
        self, queries: np.ndarray, candidates: np.ndarray, width: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores for the candidates; missing candidates get the worst score."""
        higher = self.metric.higher_is_better
        worst = -np.inf if higher else np.inf
        out_ids = np.empty((len(queries), width), dtype=np.int64)
        out_scores = np.empty((len(queries), width), dtype=np.float32)
        vectors = self._store["vectors"]
        for start in range(0, len(queries), _RERANK_CHUNK):  # bounds the gathered vectors
            stop = start + _RERANK_CHUNK
            positions = self._store.positions(candidates[start:stop])
            gathered = vectors[np.maximum(positions, 0)].astype(np.float32, copy=False)
            query = queries[start:stop]
            if self.metric is Metric.EUCLIDEAN:
                scores = np.linalg.norm(gathered - query[:, None, :], axis=2)
            else:
                scores = np.einsum("qcd,qd->qc", gathered, query)
                if self.metric is Metric.COSINE:
                    norms = (
                        np.linalg.norm(gathered, axis=2) * np.linalg.norm(query, axis=1)[:, None]
                    )
                    scores = scores / np.maximum(norms, 1e-12)
            scores = np.where(positions >= 0, scores, worst)
            order, values = top_k(scores, width, higher_is_better=higher)
            chosen = np.take_along_axis(positions, order, axis=1)
            out_ids[start:stop] = np.where(chosen >= 0, self._store.ids[chosen], -1)
            out_scores[start:stop] = values
        return out_ids, out_scores

    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        arrays = {"ids": self._store.ids, "vectors": self._store["vectors"]}
        if self._ivf is not None:
            arrays["ivf"] = import_faiss().serialize_index(self._ivf)
        return {"trained": self._ivf is not None}, arrays

    def _restore(self, state: dict[str, Any], file: IndexFile) -> None:
        self._store.restore(file.array("ids"), vectors=file.array("vectors"))
        if not state.get("trained"):
            return
        faiss = import_faiss()
        ivf = faiss.deserialize_index(file.array("ivf"))
        self._check_restored(ivf)
        kind = faiss.IndexHNSWFlat if self.quantizer == "hnsw" else faiss.IndexFlat
        if not isinstance(faiss.downcast_index(ivf.quantizer), kind):
            raise CorruptIndexError("the stored IVF-PQ quantizer does not match the header")
        if ivf.metric_type != faiss_metric(self.metric):
            raise CorruptIndexError("the stored IVF-PQ index uses another metric")
        if self.rerank and len(self._store) != ivf.ntotal:
            raise CorruptIndexError("stored re-rank vectors do not match the IVF-PQ index")
        self._ivf = ivf
