"""Annoy (random projection trees): compact, mmap-friendly approximate search.

An Annoy index cannot take new items once built, so this backend keeps the float vectors,
builds the forest lazily on the first search after any change, and rebuilds it from scratch
after every add or remove. That suits collections that change in batches; it makes
"add one, search, add one" loops slow. Angular distances are converted to cosine similarity
(``cos = 1 - d**2 / 2``) so scores follow the common conventions.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any, ClassVar

import numpy as np

from lookalike.errors import CorruptIndexError, VectorIndexError
from lookalike.knn._common import (
    Option,
    RowStore,
    RowStoreIndex,
    as_new_ids,
    check_int,
    search_rows,
)
from lookalike.knn._format import IndexFile
from lookalike.knn.base import Metric, SearchHits, as_vectors

_ANNOY_METRIC = {Metric.COSINE: "angular", Metric.EUCLIDEAN: "euclidean", Metric.DOT: "dot"}


def _annoy_class() -> Any:
    try:
        from annoy import AnnoyIndex as Annoy
    except ImportError as error:  # pragma: no cover - annoy is a dependency
        raise VectorIndexError("the annoy backend needs annoy (pip install annoy)") from error
    return Annoy


class AnnoyIndex(RowStoreIndex):
    """Random-projection forest from Spotify's Annoy, rebuilt lazily after changes."""

    backend: ClassVar[str] = "annoy"
    metrics: ClassVar[tuple[Metric, ...]] = (Metric.COSINE, Metric.DOT, Metric.EUCLIDEAN)
    options: ClassVar[dict[str, Option]] = {
        "trees": Option(int, 50, "number of trees; more: better recall, bigger index"),
        "search_k": Option(int, -1, "nodes inspected per query; -1 means trees * k"),
        "seed": Option(int, 0, "seed of the tree construction"),
    }

    def __init__(
        self,
        *,
        dim: int,
        metric: str | Metric = Metric.COSINE,
        trees: int = 50,
        search_k: int = -1,
        seed: int = 0,
    ) -> None:
        self._setup(dim, metric)
        self.trees = check_int(self.backend, "trees", trees, low=1, high=100_000)
        self.search_k = check_int(self.backend, "search_k", search_k, low=-1)
        self.seed = check_int(self.backend, "seed", seed, low=0, high=2**31 - 1)
        self._store = RowStore(vectors=np.empty((0, self.dim), dtype=np.float32))
        self._forest: Any = None  # built lazily; None means "stale or never built"

    def _options(self) -> dict[str, Any]:
        return {"trees": self.trees, "search_k": self.search_k, "seed": self.seed}

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        vectors = as_vectors(vectors, self.dim)
        ids = as_new_ids(ids, len(vectors))
        self._store.upsert(ids, vectors=vectors)
        self._forest = None

    def _invalidate(self) -> None:
        self._forest = None

    def build(self) -> None:
        """Build the forest now (searching builds it too when it is stale)."""
        if self._forest is not None or not len(self._store):
            return
        forest = _annoy_class()(self.dim, _ANNOY_METRIC[self.metric])
        forest.set_seed(self.seed)
        for position, vector in enumerate(self._store["vectors"]):
            forest.add_item(position, vector)
        forest.build(self.trees)
        self._forest = forest

    def search(self, queries: np.ndarray, k: int) -> SearchHits:
        return search_rows(as_vectors(queries, self.dim), k, len(self), self.metric, self._run)

    def _run(self, queries: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
        self.build()
        positions = np.full((len(queries), width), -1, dtype=np.int64)
        scores = np.zeros((len(queries), width), dtype=np.float32)
        for row, query in enumerate(queries):
            found, distances = self._forest.get_nns_by_vector(
                query, width, search_k=self.search_k, include_distances=True
            )
            positions[row, : len(found)] = found
            scores[row, : len(found)] = distances
        if self.metric is Metric.COSINE:
            # Annoy's angular distance is the L2 distance of the normalised vectors.
            scores = 1.0 - scores**2 / 2.0
        ids = np.where(positions >= 0, self._store.ids[positions], -1)
        return ids, scores

    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        arrays = {"ids": self._store.ids, "vectors": self._store["vectors"]}
        self.build()
        if self._forest is not None:
            # Saving the built forest spares a rebuild (minutes at millions of items) on load.
            arrays["forest"] = self._forest_bytes()
        return {}, arrays

    def _forest_bytes(self) -> np.ndarray:
        handle, name = tempfile.mkstemp(suffix=".annoy")
        os.close(handle)
        try:
            # Annoy's save() re-maps the index from the file it wrote; a fresh copy is loaded
            # so this object does not depend on a temporary file.
            self._forest.save(name)
            data = np.fromfile(name, dtype=np.uint8)
            self._forest = self._map_forest(data)
        finally:
            _unlink(name)
        return data

    def _map_forest(self, data: np.ndarray) -> Any:
        handle, name = tempfile.mkstemp(suffix=".annoy")
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(data.data)  # ndarray.data is memoryview(data)
            forest = _annoy_class()(self.dim, _ANNOY_METRIC[self.metric])
            if not forest.load(name, prefault=True):
                raise CorruptIndexError("the stored annoy forest cannot be loaded")
        except OSError as error:
            raise CorruptIndexError(
                f"the stored annoy forest cannot be loaded ({error})"
            ) from error
        finally:
            # The mapping stays valid after unlinking on POSIX; elsewhere the file may remain.
            _unlink(name)
        if forest.get_n_items() != len(self._store):
            raise CorruptIndexError("the stored annoy forest does not match the stored vectors")
        return forest

    def _restore(self, state: dict[str, Any], file: IndexFile) -> None:
        self._store.restore(file.array("ids"), vectors=file.array("vectors"))
        if "forest" in file.arrays:
            self._forest = self._map_forest(file.arrays["forest"])


def _unlink(name: str) -> None:
    # Windows refuses to delete a mapped file; the temporary file is then left behind.
    with contextlib.suppress(OSError):
        os.unlink(name)
