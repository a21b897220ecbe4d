"""Inverted file with scalar-quantised vectors via faiss ``IndexIVFScalarQuantizer``.

The lists hold the vectors themselves, as float16 (``sq=16``, default), 8-bit codes
(``sq=8``) or float32 (``sq=0``), so scores need no re-ranking: a query visits the ``nprobe``
clusters nearest to it and scans their vectors in order, which is cache-friendly work compared
with a graph walk's random accesses. On embeddings dense with near-duplicates (1M vectors
mixed from 3,781 real ones) the clusters keep a query's neighbours together, so a handful of
them reaches the recall an HNSW graph needs a long candidate list for
(``benchmarks/results/ann_1m.md``).

Everything else (the flat phase before ``16 * nlist`` vectors have arrived, training on a
sample, removal, the HNSW coarse quantiser, saving) is the IVF-PQ backend's.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from lookalike.errors import CorruptIndexError, IndexSpecError
from lookalike.knn._common import Option, check_int, import_faiss
from lookalike.knn.base import Metric
from lookalike.knn.ivfpq import (
    _COARSE_POINTS_PER_CENTROID,
    _POINTS_PER_CENTROID,
    IVFPQIndex,
)

SQ_CHOICES = (0, 8, 16)


class IVFIndex(IVFPQIndex):
    """faiss IVF with float16 / 8-bit / float32 vectors in its lists."""

    backend: ClassVar[str] = "ivf"
    options: ClassVar[dict[str, Option]] = {
        "nlist": Option(int, 1024, "coarse clusters; about 2 sqrt(n) suits n vectors"),
        "nprobe": Option(int, 8, "clusters visited per query"),
        "sq": Option(int, 16, "stored precision: 16 float16, 8 8-bit codes, 0 float32"),
        "quantizer": Option(("flat", "hnsw"), "flat", "how the nearest clusters are found"),
    }

    def __init__(
        self,
        *,
        dim: int,
        metric: str | Metric = Metric.COSINE,
        nlist: int = 1024,
        nprobe: int = 8,
        sq: int = 16,
        quantizer: str = "flat",
    ) -> None:
        self._setup_lists(dim, metric, nlist, nprobe, quantizer)
        self.sq = check_int(self.backend, "sq", sq, low=0, high=16)
        if self.sq not in SQ_CHOICES:
            raise IndexSpecError(f"ivf: sq must be one of 0|8|16, got {sq}")
        self.rerank = 0  # the lists hold the vectors: scores need no second pass
        self._store = self._empty_store()
        self._ivf: Any = None

    @property
    def _stored_dtype(self) -> type:
        # Before training the vectors wait in the flat store, as compactly as the lists will
        # hold them (8-bit codes need trained ranges, so those wait as float16).
        return np.float32 if self.sq == 0 else np.float16

    def _options(self) -> dict[str, Any]:
        return {
            "nlist": self.nlist,
            "nprobe": self.nprobe,
            "sq": self.sq,
            "quantizer": self.quantizer,
        }

    def _train_size(self) -> int:
        return _POINTS_PER_CENTROID * self.nlist

    def _training_points(self) -> int:
        return _COARSE_POINTS_PER_CENTROID * self.nlist

    def _new_ivf(self, quantizer: Any, metric: int) -> Any:
        faiss = import_faiss()
        if self.sq == 0:
            return faiss.IndexIVFFlat(quantizer, self.dim, self.nlist, metric)
        qtype = faiss.ScalarQuantizer.QT_fp16 if self.sq == 16 else faiss.ScalarQuantizer.QT_8bit
        return faiss.IndexIVFScalarQuantizer(quantizer, self.dim, self.nlist, qtype, metric)

    def _check_restored(self, ivf: Any) -> None:
        faiss = import_faiss()
        expected = self._new_ivf(faiss.IndexFlat(self.dim, ivf.metric_type), ivf.metric_type)
        if type(ivf) is not type(expected) or ivf.d != self.dim or ivf.nlist != self.nlist:
            raise CorruptIndexError("the stored index is not an IVF index of this kind")
        if self.sq and ivf.sq.qtype != expected.sq.qtype:
            raise CorruptIndexError("the stored IVF storage does not match the header")
