"""Binary codes searched by Hamming distance.

Input is either float vectors, binarised as ``v > 0`` per dimension and packed with
``np.packbits`` (``dim`` bits in ``ceil(dim / 8)`` bytes), or, with ``packed=true``, codes that
are already packed (uint8 rows of ``ceil(dim / 8)`` bytes, ``dim`` being the number of bits;
unused trailing bits are ignored). Queries take the same form as the stored vectors.

Scores are Hamming distances (lower is better) and ``metric`` is always ``hamming``; the
constructor also accepts ``cosine`` (the usual default of callers) because sign bits of an
embedding approximate its angular similarity.

Engines: ``numpy`` scans exactly (XOR + popcount on 64-bit words; ties go to the earlier
stored row), ``faiss`` scans exactly with ``IndexBinaryFlat`` (SIMD, multi-threaded; tie order
may differ), ``hnsw`` searches approximately with ``IndexBinaryHNSW`` (options ``M``, ``ef``).
The faiss structures are derived from the stored codes: built on the first search after a
change and not saved, so a loaded ``hnsw`` index rebuilds its graph on first search.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from lookalike.errors import DimensionMismatchError, VectorIndexError
from lookalike.knn._common import (
    Option,
    RowStore,
    RowStoreIndex,
    as_new_ids,
    check_bool,
    check_choice,
    check_int,
    import_faiss,
    search_rows,
)
from lookalike.knn._format import IndexFile
from lookalike.knn.base import Metric, SearchHits, as_vectors

_ENGINES = ("numpy", "faiss", "hnsw")
_SCAN_BUDGET = 1 << 23  # 64-bit words per XOR block: about 64 MiB of temporaries
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def popcount(words: np.ndarray) -> np.ndarray:
    """Set bits per uint64 element (numpy 2 has a native popcount; older numpy a table)."""
    counts: np.ndarray
    if hasattr(np, "bitwise_count"):
        counts = np.bitwise_count(words)
        return counts
    counts = _POPCOUNT[words.view(np.uint8)]
    counts = counts.reshape(*words.shape, 8).sum(axis=-1, dtype=np.uint8)
    return counts


def hamming_matrix(queries: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Hamming distances between packed uint8 codes: [n_queries, n_codes] int32."""
    words = -(-codes.shape[1] // 8)
    query_words = _as_words(queries, words)
    code_words = _as_words(codes, words)
    out = np.zeros((len(queries), len(codes)), dtype=np.int32)
    step = max(1, _SCAN_BUDGET // max(1, len(codes) * words))
    for start in range(0, len(queries), step):
        block = query_words[start : start + step, None, :] ^ code_words[None, :, :]
        out[start : start + step] = popcount(block).sum(axis=2, dtype=np.int32)
    return out


def _as_words(codes: np.ndarray, words: int) -> np.ndarray:
    padded = np.zeros((len(codes), words * 8), dtype=np.uint8)
    padded[:, : codes.shape[1]] = codes
    return padded.view(np.uint64)


class BinaryIndex(RowStoreIndex):
    """Packed binary codes, exact or HNSW Hamming search."""

    backend: ClassVar[str] = "binary"
    metrics: ClassVar[tuple[Metric, ...]] = (Metric.HAMMING,)
    options: ClassVar[dict[str, Option]] = {
        "packed": Option(bool, False, "inputs are packed uint8 codes instead of float vectors"),
        "engine": Option(_ENGINES, "numpy", "numpy exact scan, faiss exact scan, or hnsw"),
        "M": Option(int, 32, "HNSW graph degree (engine=hnsw)"),
        "ef": Option(int, 128, "HNSW search candidate list size (engine=hnsw)"),
    }

    def __init__(
        self,
        *,
        dim: int,
        metric: str | Metric = Metric.HAMMING,
        packed: bool = False,
        engine: str = "numpy",
        M: int = 32,
        ef: int = 128,
    ) -> None:
        if Metric.parse(metric) is Metric.COSINE:
            metric = Metric.HAMMING
        self._setup(dim, metric)
        self.packed = check_bool(self.backend, "packed", packed)
        self.engine = check_choice(self.backend, "engine", engine, _ENGINES)
        self.M = check_int(self.backend, "M", M, low=2, high=512)
        self.ef = check_int(self.backend, "ef", ef, low=1, high=100_000)
        self.code_bytes = -(-self.dim // 8)
        # Masks the unused low-order bits of the last byte (packbits fills from the top bit).
        self._tail_mask = np.uint8((0xFF << (8 * self.code_bytes - self.dim)) & 0xFF)
        self._store = RowStore(codes=np.empty((0, self.code_bytes), dtype=np.uint8))
        self._faiss: Any = None

    def _options(self) -> dict[str, Any]:
        return {"packed": self.packed, "engine": self.engine, "M": self.M, "ef": self.ef}

    def encode(self, vectors: np.ndarray) -> np.ndarray:
        """Packed codes of inputs in this index's input form (float vectors or packed codes)."""
        if not self.packed:
            return np.packbits(as_vectors(vectors, self.dim) > 0, axis=1)
        array = np.asarray(vectors)
        if array.dtype != np.uint8:
            raise VectorIndexError(f"packed binary codes must be uint8, got {array.dtype}")
        if array.ndim == 1:
            array = array[None, :]
        if array.ndim != 2 or array.shape[1] != self.code_bytes:
            raise DimensionMismatchError(
                f"expected packed codes of {self.code_bytes} bytes ({self.dim} bits),"
                f" got an array of shape {np.shape(vectors)}"
            )
        codes = np.array(array, dtype=np.uint8, order="C")
        codes[:, -1] &= self._tail_mask
        return codes

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        codes = self.encode(vectors)
        ids = as_new_ids(ids, len(codes))
        self._store.upsert(ids, codes=codes)
        self._faiss = None

    def _invalidate(self) -> None:
        self._faiss = None

    def search(self, queries: np.ndarray, k: int) -> SearchHits:
        return search_rows(self.encode(queries), k, len(self), self.metric, self._run)

    def _run(self, queries: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
        if self.engine == "numpy":
            return self._scan(queries, width)
        index = self._faiss_index()
        distances, positions = index.search(queries, width)
        ids = np.where(positions >= 0, self._store.ids[positions], -1)
        return ids, distances.astype(np.float32)

    def _scan(self, queries: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
        codes = self._store["codes"]
        distances = hamming_matrix(queries, codes).astype(np.int64)
        # One integer key per (distance, row) makes ties deterministic: earlier rows first.
        keys = distances * len(codes) + np.arange(len(codes), dtype=np.int64)
        if width < len(codes):
            keys = np.partition(keys, width - 1, axis=1)[:, :width]
        keys = np.sort(keys, axis=1)
        positions = keys % len(codes)
        return self._store.ids[positions], (keys // len(codes)).astype(np.float32)

    def _faiss_index(self) -> Any:
        if self._faiss is None:
            faiss = import_faiss()
            bits = self.code_bytes * 8
            if self.engine == "hnsw":
                index = faiss.IndexBinaryHNSW(bits, self.M)
                index.hnsw.efSearch = self.ef
            else:
                index = faiss.IndexBinaryFlat(bits)
            index.add(self._store["codes"])
            self._faiss = index
        return self._faiss

    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {}, {"ids": self._store.ids, "codes": self._store["codes"]}

    def _restore(self, state: dict[str, Any], file: IndexFile) -> None:
        self._store.restore(file.array("ids"), codes=file.array("codes"))
