"""The Index protocol every vector-index backend implements, plus shared helpers.

Conventions every backend follows:
- ids are int64, vectors float32 of shape [n, dim]; binary backends take packed uint8 codes.
- ``add`` with an id already present replaces its vector (upsert); the same id twice in one
  call is an error, because which vector wins would be arbitrary.
- ``search`` returns best-first results of width ``min(k, len(index))``. An approximate
  backend may find fewer hits for a query; the empty slots hold id -1 and the worst possible
  score (-inf for similarities, +inf for distances), which is why ids must be non-negative.
- scores: similarity for ``cosine`` and ``dot`` (higher is better), distance for
  ``euclidean`` (true L2, not squared) and ``hamming`` (lower is better).
- ``save`` writes the backend's own metadata into the file, so ``load_index(path)`` needs
  no arguments.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from lookalike.errors import DimensionMismatchError, VectorIndexError


class Metric(str, enum.Enum):
    """How two vectors are compared."""

    COSINE = "cosine"
    EUCLIDEAN = "euclidean"
    DOT = "dot"
    HAMMING = "hamming"

    @property
    def higher_is_better(self) -> bool:
        """True when scores are similarities, False when they are distances."""
        return self in (Metric.COSINE, Metric.DOT)

    @classmethod
    def parse(cls, value: str | Metric) -> Metric:
        """Accept a Metric or its name (case-insensitive); raise a clear error otherwise."""
        if isinstance(value, Metric):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            names = ", ".join(m.value for m in cls)
            raise VectorIndexError(f"unknown metric {value!r}; expected one of: {names}") from None


@dataclass(frozen=True)
class SearchHits:
    """Batched search results: row i holds the best-first hits of query i. ``partial`` is set
    when part of the index did not answer (a sharded index with a lost shard): the hits are
    the best of the shards that did, and ``missing`` names the shards that did not."""

    ids: np.ndarray  # int64 [n_queries, width]
    scores: np.ndarray  # float32 [n_queries, width]
    metric: Metric
    partial: bool = False
    missing: tuple[int, ...] = ()

    def __len__(self) -> int:
        return int(self.ids.shape[0])


@runtime_checkable
class Index(Protocol):
    """What every backend offers, whatever structure it uses inside."""

    dim: int
    metric: Metric

    @property
    def spec(self) -> str:
        """The spec string that rebuilds an equivalent, empty index."""
        ...

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Insert or replace vectors under the given ids."""
        ...

    def remove(self, ids: np.ndarray) -> int:
        """Remove these ids; unknown ids are ignored. Returns how many were removed."""
        ...

    def search(self, queries: np.ndarray, k: int) -> SearchHits:
        """Best-first top-k for each query row."""
        ...

    def save(self, path: str | Path, *, metadata: dict[str, Any] | None = None) -> None:
        """Write the index, its own settings and the caller's ``metadata`` to one file."""
        ...

    def __len__(self) -> int: ...


@runtime_checkable
class Tunable(Protocol):
    """An index with one search-time knob that trades speed for recall (HNSW's ``ef``, an
    inverted file's ``nprobe``, pgvector's ``ef_search``): recall does not fall as the value
    rises. ``lookalike.knn.tuning`` learns the cheapest value that reaches a recall target
    through this protocol and ``search`` alone."""

    @property
    def tuning_knob(self) -> str:
        """The knob's name as the spec spells it, e.g. ``"ef"`` or ``"nprobe"``."""
        ...

    @property
    def tuning_value(self) -> int:
        """The value searches use now."""
        ...

    def tuning_values(self) -> list[int]:
        """The candidate values, ascending; the last one gives this index's best recall."""
        ...

    def set_tuning(self, value: int) -> None:
        """Search with ``value`` from now on (it is saved with the index)."""
        ...


def as_ids(ids: np.ndarray | list[int]) -> np.ndarray:
    """Validate and convert ids to a 1-D int64 array without duplicates."""
    array = np.asarray(ids, dtype=np.int64).reshape(-1)
    if len(np.unique(array)) != len(array):
        raise VectorIndexError("the same id appears more than once in one call")
    return array


def as_vectors(vectors: np.ndarray, dim: int, *, dtype: type = np.float32) -> np.ndarray:
    """Validate a [n, dim] matrix (a single vector is accepted as one row)."""
    array: np.ndarray = np.asarray(vectors, dtype=dtype)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] != dim:
        raise DimensionMismatchError(
            f"expected vectors of dimension {dim}, got an array of shape {np.shape(vectors)}"
        )
    if dtype is np.float32 and not np.all(np.isfinite(array)):
        raise VectorIndexError("vectors contain NaN or infinity")
    return np.ascontiguousarray(array)


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation; all-zero rows stay zero instead of becoming NaN."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    normalized: np.ndarray = (vectors / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)
    return normalized
