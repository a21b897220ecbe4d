"""Keeps a collection's vector indexes consistent with its catalog.

Each (model, metric) pair has one index file under ``<collection>/indexes``. Its header records
the catalog generation it reflects, so a file left behind by an older state, another model, or
a crash is rebuilt from the catalog rather than used; a corrupt file is rebuilt too. Changes
made through the collection are applied to the loaded index incrementally when nothing else
wrote to the catalog in between.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lookalike.catalog import SqliteCatalog
from lookalike.errors import CorruptIndexError, VectorIndexError
from lookalike.indexes import Index, choose_spec, create_index, load_index, read_index_header
from lookalike.indexes.base import Metric, SearchHits, l2_normalize

AUTO = "auto"

# Below this many vectors the collection's mean is too noisy to centre on.
CENTER_MIN_VECTORS = 256


class PreparedIndex:
    """An index plus the transform its vectors went through before being added.

    For cosine search, vectors are L2-normalised and centred on the collection's mean (learned
    from the collection, unsupervised): cosine on centred vectors ignores the direction every
    embedding shares, which measured +4 points of class-level mAP on clothing-small (0.486 ->
    0.528). Euclidean distance is unchanged by centring and dot products are left raw.
    """

    def __init__(self, index: Index, center: np.ndarray | None = None) -> None:
        self.index = index
        self.center = None if center is None else np.asarray(center, dtype=np.float32)

    @property
    def metric(self) -> Metric:
        return self.index.metric

    def __len__(self) -> int:
        return len(self.index)

    def transform(self, vectors: np.ndarray) -> np.ndarray:
        """Raw vectors as the index holds them."""
        vectors = np.asarray(vectors, dtype=np.float32).reshape(-1, self.index.dim)
        if self.center is None:
            return vectors
        centred = l2_normalize(vectors) - self.center
        return l2_normalize(centred)

    def search(self, queries: np.ndarray, k: int) -> SearchHits:
        """Search with raw query vectors."""
        return self.index.search(self.transform(queries), k)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add raw vectors."""
        self.index.add(ids, self.transform(vectors))

    def remove(self, ids: np.ndarray) -> int:
        return self.index.remove(ids)

    def save(self, path: Path, metadata: dict) -> None:
        center = None if self.center is None else self.center.tolist()
        self.index.save(path, metadata={**metadata, "center": center})


def default_memory_budget() -> int:
    """A quarter of physical memory: what an automatically chosen index may use."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 4 << 30


@dataclass
class _Loaded:
    index: PreparedIndex
    generation: int
    dirty: bool = False


class CatalogIndexes:
    """Loads, rebuilds and updates the vector indexes of one catalog."""

    def __init__(
        self,
        catalog: SqliteCatalog,
        folder: Path,
        *,
        spec: str = AUTO,
        memory_budget_bytes: int | None = None,
    ) -> None:
        self.catalog = catalog
        self.folder = folder
        self.spec = spec
        self.memory_budget_bytes = memory_budget_bytes or default_memory_budget()
        self.rebuilds = 0  # observable, so tests can tell a rebuild from an incremental update
        self._loaded: dict[tuple[str, Metric], _Loaded] = {}

    def path(self, model_key: str, metric: Metric) -> Path:
        """The file of one model's index for one metric."""
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model_key)
        return self.folder / f"{safe}.{metric.value}.lkx"

    def spec_for(self, n: int, dim: int) -> str:
        """The configured spec, or the automatic choice for n vectors."""
        if self.spec != AUTO:
            return self.spec
        return choose_spec(n, dim, memory_budget_bytes=self.memory_budget_bytes)

    def get(self, model_id: int, model_key: str, dim: int, metric: Metric) -> PreparedIndex:
        """An index that reflects the catalog as it is now."""
        generation = self.catalog.generation
        key = (model_key, metric)
        loaded = self._loaded.get(key)
        if loaded is not None and loaded.generation == generation:
            return loaded.index
        index = self._load_fresh(model_key, dim, metric, generation)
        if index is None:
            index = self._rebuild(model_id, model_key, dim, metric, generation)
        self._loaded[key] = _Loaded(index, generation)
        return index

    def _load_fresh(
        self, model_key: str, dim: int, metric: Metric, generation: int
    ) -> PreparedIndex | None:
        path = self.path(model_key, metric)
        if not path.exists():
            return None
        try:
            header = read_index_header(path)
            meta = header.get("metadata", {})
            expected = {"generation": generation, "model": model_key, "configured_spec": self.spec}
            if any(meta.get(k) != v for k, v in expected.items()) or header["dim"] != dim:
                return None
            if self.spec == AUTO and _backend(meta.get("spec", "")) != _backend(
                self.spec_for(header["count"], dim)
            ):
                return None  # the collection grew past the point where another kind fits
            center = meta.get("center")
            return PreparedIndex(load_index(path), None if center is None else np.array(center))
        except (CorruptIndexError, VectorIndexError):
            return None  # rebuilt from the catalog instead of being trusted

    def _rebuild(
        self, model_id: int, model_key: str, dim: int, metric: Metric, generation: int
    ) -> PreparedIndex:
        ids, vectors = self.catalog.vectors(model_id)
        spec = self.spec_for(len(ids), dim)
        center = None
        if metric is Metric.COSINE and len(ids) >= CENTER_MIN_VECTORS:
            center = l2_normalize(vectors).mean(axis=0)
        index = PreparedIndex(create_index(spec, dim=dim, metric=metric), center)
        if len(ids):
            index.add(ids, vectors)
        self._save(index, model_key, metric, generation, spec)
        self.rebuilds += 1
        return index

    def _save(
        self, index: PreparedIndex, model_key: str, metric: Metric, generation: int, spec: str
    ) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        metadata = {
            "generation": generation,
            "model": model_key,
            "configured_spec": self.spec,
            "spec": spec,
        }
        index.save(self.path(model_key, metric), metadata)

    def apply(
        self,
        model_key: str,
        *,
        before: int,
        after: int | None,
        changes: int,
        added: tuple[np.ndarray, np.ndarray] | None = None,
        removed: np.ndarray | None = None,
    ) -> None:
        """Bring loaded indexes from generation ``before`` to ``after`` by replaying our own
        ``changes`` catalog writes: ``added`` vectors of ``model_key`` and ``removed`` image
        ids. If anyone else wrote meanwhile, the indexes are forgotten and rebuilt on next use.
        """
        if changes == 0 or after is None:
            return
        added_ids = added[0] if added is not None else np.empty(0, dtype=np.int64)
        removed = removed if removed is not None else np.empty(0, dtype=np.int64)
        for key, loaded in list(self._loaded.items()):
            loaded_model = key[0]
            if loaded.generation != before or after != before + changes:
                del self._loaded[key]
                continue
            if loaded_model == model_key:
                loaded.index.remove(removed)
                if added is not None and len(added_ids):
                    loaded.index.add(*added)
            else:
                # Storing a changed file drops the vectors other models made of it.
                loaded.index.remove(np.concatenate([removed, added_ids]))
            loaded.generation = after
            loaded.dirty = True

    def load_existing(self, model_key: str, dim: int) -> None:
        """Load the up-to-date index files of a model, so that changes about to be made are
        applied to them incrementally instead of forcing a rebuild later."""
        generation = self.catalog.generation
        for metric in Metric:
            key = (model_key, metric)
            if key not in self._loaded:
                index = self._load_fresh(model_key, dim, metric, generation)
                if index is not None:
                    self._loaded[key] = _Loaded(index, generation)

    def flush(self) -> None:
        """Save every index changed in memory since it was loaded or last saved."""
        for (model_key, metric), loaded in self._loaded.items():
            if loaded.dirty:
                spec = loaded.index.index.spec
                self._save(loaded.index, model_key, metric, loaded.generation, spec)
                loaded.dirty = False

    def forget(self) -> None:
        """Drop every loaded index (they reload from their files on next use)."""
        self._loaded.clear()


def _backend(spec: str) -> str:
    return spec.partition(":")[0].strip().lower()
