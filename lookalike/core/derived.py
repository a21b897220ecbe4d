"""Files derived from the catalog (vector indexes, hash codes), kept in step with it.

Every derived file carries a stamp: the catalog's random identity and the state it reflects
(the generation, and a random token the catalog draws afresh with every change). A file whose
stamp differs from the catalog's (an older state, another catalog, a crash, a restored
backup whose generation happens to match) is rebuilt from the catalog rather than trusted; a
corrupt one too.
:class:`DerivedFileStore` holds that rule and the in-memory copies for every kind of derived
file; :class:`VectorIndexes` is the kind that serves vector search, applying the collection's
own writes to the loaded indexes incrementally.

Searches never need to write: when a derived file cannot be saved (a full disk, a read-only
folder), the copy in memory serves, a warning is logged, and the file is written again (or
rebuilt) on a later use. Every file is written to a temporary file in its folder and renamed
into place, so a failed write leaves neither a half-written file nor a temporary one.
"""

from __future__ import annotations

import logging
import re
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from lookalike.catalog import Catalog
from lookalike.core.pgvector import held_by_catalog, is_catalog_spec, open_index
from lookalike.core.transform import (
    CENTER_MIN_VECTORS,
    PreparedIndex,
    default_memory_budget,
    expected_whitening,
    learn_whitening,
)
from lookalike.errors import CorruptIndexError, StorageError, VectorIndexError
from lookalike.knn import choose_spec, create_index, parse_auto, read_index_header
from lookalike.knn.base import Metric, l2_normalize
from lookalike.knn.tuning import Tuning, build_tuned

AUTO = "auto"
CATALOG_ID_SETTING = "catalog_id"
# The folders of a collection that hold derived files, and the suffix those files have (a
# hash head's .npz beside its codes is trained, not derived, and is never touched).
DERIVED_FOLDERS = ("indexes", "hashing")
DERIVED_SUFFIX = ".lkx"
# Temporary files older than this are left over by a writer that was killed (younger ones may
# be another process's write in progress).
LEFTOVER_AGE_SECONDS = 60.0

_log = logging.getLogger(__name__)

T = TypeVar("T")


State = tuple[int, str]  # a catalog's (generation, token)


class CatalogState(Protocol):
    """What derived files need of a catalog: its state and its settings."""

    @property
    def state(self) -> State: ...

    def get_setting(self, key: str) -> str | None: ...

    def set_setting(self, key: str, value: str) -> None: ...


def safe_name(name: str) -> str:
    """``name`` with everything but letters, digits, '.', '_' and '-' replaced, for a file."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


@dataclass
class Loaded(Generic[T]):
    """A derived object in memory and the catalog state it reflects."""

    value: T
    state: State
    dirty: bool = False


class DerivedFileStore:
    """The in-memory copies and the freshness rule of every file derived from one catalog."""

    def __init__(self, catalog: CatalogState, folder: Path) -> None:
        self.catalog = catalog
        self.folder = folder
        self.builds = 0  # observable, so tests can tell a rebuild from a reuse
        self._loaded: dict[Any, Loaded[Any]] = {}
        self._unrecorded_id: str | None = None

    def path(self, *parts: str) -> Path:
        """A file under the collection folder, each part made safe for a file name."""
        return self.folder.joinpath(*(safe_name(p) for p in parts))

    def catalog_id(self) -> str:
        """The catalog's random identity: a folder switched to another catalog, whose
        generation may happen to be the same, never uses the old one's files. Recorded on
        first use; when the catalog's disk is full, an identity of this process's own serves
        (files stamped with it are rebuilt later, so a search still needs no write)."""
        value = self.catalog.get_setting(CATALOG_ID_SETTING)
        if value is None:
            if self._unrecorded_id is not None:
                return self._unrecorded_id
            drawn = uuid.uuid4().hex
            try:
                self.catalog.set_setting(CATALOG_ID_SETTING, drawn)
            except StorageError as error:
                _log.warning("%s (recording the catalog's identity for derived files)", error)
                self._unrecorded_id = drawn
                return drawn
            value = self.catalog.get_setting(CATALOG_ID_SETTING) or ""
        return value

    def stamp(self, state: State) -> dict[str, Any]:
        """What a derived file saved at catalog ``state`` records about its catalog."""
        return {"catalog": self.catalog_id(), "generation": state[0], "state": state[1]}

    def is_current(self, metadata: Mapping[str, Any], state: State) -> bool:
        """Whether a file's recorded stamp matches the catalog at ``state``."""
        return all(metadata.get(k) == v for k, v in self.stamp(state).items())

    def stamped_now(self, metadata: Mapping[str, Any]) -> bool:
        """Whether a file's recorded stamp matches the catalog as it is now, without
        recording an identity for a catalog that has none (none of its files is current)."""
        recorded = self.catalog.get_setting(CATALOG_ID_SETTING)
        state = self.catalog.state
        stamp = {"catalog": recorded, "generation": state[0], "state": state[1]}
        return recorded is not None and all(metadata.get(k) == v for k, v in stamp.items())

    def get(
        self,
        key: Any,
        *,
        load: Callable[[State], T | None],
        build: Callable[[State], T],
        still_valid: Callable[[T], bool] = lambda _: True,
    ) -> T:
        """The derived object ``key`` as of the catalog's state now: the copy in memory if it
        is current, else ``load(state)`` (which returns None for a stale or corrupt file),
        else ``build(state)``."""
        state = self.catalog.state
        loaded = self._loaded.get(key)
        if loaded is not None and loaded.state == state and still_valid(loaded.value):
            return loaded.value  # type: ignore[no-any-return]
        value = load(state)
        if value is None:
            value = build(state)
            self.builds += 1
        self._loaded[key] = Loaded(value, state)
        return value

    def save(self, path: Path, write: Callable[[], None], *, quiet: bool = False) -> bool:
        """Write the derived file ``path`` with ``write`` (which writes atomically, as the knn
        index writer does). When the disk refuses (full, read-only, failing) log a warning
        (at debug level when ``quiet``) and return False: the copy in memory still serves,
        and the file is written or rebuilt on a later use."""
        try:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                write()
            except OSError as error:
                raise StorageError.from_os_error(error, path) from error
        except StorageError as error:
            _log.log(
                logging.DEBUG if quiet else logging.WARNING,
                "%s; the copy in memory serves meanwhile, and the file is written again once "
                "there is room",
                error,
            )
            return False
        return True

    def files(self) -> list[Path]:
        """Every derived file under the collection folder (vector indexes, hash codes)."""
        found: set[Path] = set()
        for name in DERIVED_FOLDERS:
            folder = self.folder / name
            if folder.is_dir():
                found.update(
                    p
                    for p in folder.rglob(f"*{DERIVED_SUFFIX}")
                    if p.is_file() and not p.name.startswith(".")
                )
        return sorted(found)

    def leftovers(self, *, min_age: float = LEFTOVER_AGE_SECONDS) -> list[Path]:
        """Temporary files under the derived folders that a killed writer left behind (those
        modified less than ``min_age`` seconds ago may be a write in progress: not listed)."""
        now = time.time()
        found: list[Path] = []
        for name in DERIVED_FOLDERS:
            folder = self.folder / name
            if not folder.is_dir():
                continue
            for path in folder.rglob("*"):
                temporary = (path.name.startswith(".") and path.name.endswith(".tmp")) or (
                    path.name.endswith(".partial")
                )
                try:
                    old = now - path.stat().st_mtime >= min_age
                except OSError:
                    continue
                if temporary and old and path.is_file():
                    found.append(path)
        return sorted(found)

    def keep(self, key: Any, value: object, state: State) -> None:
        """Hold ``value`` in memory as ``key`` at catalog ``state``."""
        self._loaded[key] = Loaded(value, state)

    def loaded(self) -> dict[Any, Loaded[Any]]:
        """The objects in memory, by key (the dict itself: callers may drop entries)."""
        return self._loaded

    def drop(self, key: Any) -> None:
        """Forget one object in memory (it reloads or rebuilds on next use)."""
        self._loaded.pop(key, None)

    def forget(self) -> None:
        """Forget every object in memory."""
        self._loaded.clear()


class VectorIndexes:
    """The vector index of each (model, metric) of one catalog: loaded from its file under
    ``indexes/``, rebuilt from the catalog when stale, and updated in place by the
    collection's own writes."""

    def __init__(
        self,
        store: DerivedFileStore,
        vectors: Callable[[int], tuple[np.ndarray, np.ndarray]],
        *,
        spec: str = AUTO,
        memory_budget_bytes: int | None = None,
        whitening: int = 0,
    ) -> None:
        self.store = store
        self.vectors = vectors  # model id -> (ids, vectors) of every stored image
        self.spec = spec
        self.whitening = whitening  # PCA-whitening dimensions for cosine indexes (0: none)
        self.memory_budget_bytes = memory_budget_bytes or default_memory_budget()

    @classmethod
    def for_catalog(cls, catalog: Catalog, folder: Path, **options: Any) -> VectorIndexes:
        """The vector indexes of ``catalog`` with their files under ``folder/indexes``."""
        return cls(DerivedFileStore(catalog, folder), catalog.vectors, **options)

    @property
    def rebuilds(self) -> int:
        """How many indexes were built from the catalog (not loaded or updated)."""
        return self.store.builds

    def path(self, model_key: str, metric: Metric) -> Path:
        """The file of one model's index for one metric."""
        return self.store.path("indexes", f"{model_key}.{metric.value}.lkx")

    def whitening_dims(self, dim: int) -> int:
        """The whitening dimensions for vectors of ``dim`` (never more than ``dim``)."""
        return min(self.whitening, dim)

    def spec_for(self, n: int, dim: int) -> str:
        """The configured spec, or for ``auto`` the structure chosen for n vectors before
        tuning (which may fall back to another: :mod:`lookalike.knn.tuning`)."""
        if parse_auto(self.spec) is None:
            return self.spec
        return choose_spec(n, dim, memory_budget_bytes=self.memory_budget_bytes)

    def get(self, model_id: int, model_key: str, dim: int, metric: Metric) -> PreparedIndex:
        """An index that reflects the catalog as it is now."""
        if is_catalog_spec(self.spec):
            # Held by the catalog (pgvector): found in the database (built there once), kept
            # in step by PostgreSQL; only its count is refreshed here, per catalog state.
            return self.store.get(
                (model_key, metric),
                load=lambda state: open_index(
                    self.store.catalog, model_id, dim, metric, self.spec, whitening=self.whitening
                ),
                build=lambda state: _never_built(),
            )
        whitening = self.whitening_dims(dim)
        return self.store.get(
            (model_key, metric),
            load=lambda state: self._load_fresh(model_key, dim, metric, state),
            build=lambda state: self._rebuild(model_id, model_key, dim, metric, state),
            still_valid=lambda index: not index.needs_relearning(len(index), whitening),
        )

    def _load_fresh(
        self, model_key: str, dim: int, metric: Metric, state: State
    ) -> PreparedIndex | None:
        path = self.path(model_key, metric)
        if not path.exists():
            return None
        try:
            header = read_index_header(path)
            meta = header.get("metadata", {})
            if not self.store.is_current(meta, state):
                return None
            configured = meta.get("configured_spec")
            if meta.get("model") != model_key or _canonical(configured) != _canonical(self.spec):
                return None
            if meta.get("input_dim", header["dim"]) != dim:
                return None
            if parse_auto(self.spec) is not None:
                tuning = Tuning.from_json(meta.get("tuning"))
                if tuning is None:
                    return None  # written before auto indexes were tuned
                if _backend(tuning.chosen) != _backend(
                    self.spec_for(header["count"], header["dim"])
                ):
                    return None  # the collection grew past the point where another kind fits
            index = PreparedIndex.from_file(path, meta)
            if index.needs_relearning(header["count"], self.whitening_dims(dim)):
                return None
            return index
        except (CorruptIndexError, VectorIndexError, OSError):
            return None  # rebuilt from the catalog instead of being trusted

    def _rebuild(
        self, model_id: int, model_key: str, dim: int, metric: Metric, state: State
    ) -> PreparedIndex:
        ids, vectors = self.vectors(model_id)
        center = whitening = None
        if metric is Metric.COSINE and len(ids) >= CENTER_MIN_VECTORS:
            unit = l2_normalize(vectors)
            center = unit.mean(axis=0)
            dims = expected_whitening(len(ids), self.whitening_dims(dim), metric)
            if dims:
                whitening = learn_whitening(unit - center, dims)
            del unit  # a full copy: gone before the index holds its own
        out_dim = dim if whitening is None else whitening.shape[1]
        spec = self.spec_for(len(ids), out_dim)
        index = PreparedIndex(
            create_index(spec, dim=out_dim, metric=metric), center, whitening, len(ids)
        )
        target = parse_auto(self.spec)
        if target is not None and len(ids):
            # Built from the vectors as the index holds them, its knob tuned on a held-out
            # sample of them; the structure may differ from ``spec`` (a fallback).
            prepared = index.transform(vectors)
            del vectors
            index.index, index.tuning = build_tuned(
                ids,
                prepared,
                metric=metric,
                target=target,
                memory_budget_bytes=self.memory_budget_bytes,
            )
            del prepared
            spec = index.index.spec
        elif len(ids):
            index.add(ids, vectors)
        elif target is not None:  # nothing to tune yet: an empty exact index answers exactly
            index.tuning = Tuning(target, 1.0, chosen=spec, spec=spec)
        self._save(index, model_key, metric, state, spec)  # a search answers even if not saved
        return index

    def tuning(self, model_key: str, metric: Metric) -> tuple[float | None, Tuning | None]:
        """The recall@10 of one model's index for ``metric`` and the tuning that measured it,
        from the copy in memory or the file if either reflects the catalog now: (1.0, None)
        for an exact index that is not ``auto``, (None, None) for another one or when the
        index has not been built since the last change (it is at the next search)."""
        loaded = self.store.loaded().get((model_key, metric))
        if loaded is not None and loaded.state == self.store.catalog.state:
            tuning = getattr(loaded.value, "tuning", None)
            index = getattr(loaded.value, "index", None)
            backend = getattr(index, "backend", "")
        else:
            try:
                header = read_index_header(self.path(model_key, metric))
                meta = header.get("metadata", {})
                if not self.store.stamped_now(meta):
                    return None, None
                tuning = Tuning.from_json(meta.get("tuning"))
            except (CorruptIndexError, VectorIndexError, OSError):
                return None, None
            backend = header.get("backend", "")
        if isinstance(tuning, Tuning):
            return tuning.recall, tuning
        return (1.0 if backend == "exact" else None), None

    def _save(
        self,
        index: PreparedIndex,
        model_key: str,
        metric: Metric,
        state: State,
        spec: str,
        *,
        quiet: bool = False,
    ) -> bool:
        """Save one index stamped with ``state``; False (and a warning) when the disk
        refused."""
        if held_by_catalog(index):
            return True  # it lives in the database: no file
        path = self.path(model_key, metric)
        metadata = {
            **self.store.stamp(state),
            "model": model_key,
            "configured_spec": self.spec,
            "spec": spec,
        }
        return self.store.save(path, lambda: index.save(path, metadata), quiet=quiet)

    def apply(
        self,
        model_key: str,
        *,
        before: State,
        after: State | None,
        changes: int,
        added: tuple[np.ndarray, np.ndarray] | None = None,
        removed: np.ndarray | None = None,
    ) -> None:
        """Bring loaded indexes from catalog state ``before`` to ``after`` by replaying our
        own ``changes`` catalog writes: ``added`` vectors of ``model_key`` and ``removed``
        image ids. If anyone else wrote meanwhile (the generation moved by more than our own
        changes), the indexes are forgotten and rebuilt on next use."""
        if changes == 0 or after is None:
            return
        added_ids = added[0] if added is not None else np.empty(0, dtype=np.int64)
        removed = removed if removed is not None else np.empty(0, dtype=np.int64)
        loaded_indexes = self.store.loaded()
        for key, loaded in list(loaded_indexes.items()):
            if not _is_index_key(key) or held_by_catalog(loaded.value):
                continue  # the catalog's own index followed the write already
            if loaded.state != before or after[0] != before[0] + changes:
                del loaded_indexes[key]
                continue
            index: PreparedIndex = loaded.value
            if key[0] == model_key:
                index.remove(removed)
                if added is not None and len(added_ids):
                    index.add(*added)
            else:
                # Storing a changed file drops the vectors other models made of it.
                index.remove(np.concatenate([removed, added_ids]))
            loaded.state = after
            loaded.dirty = True

    def load_existing(self, model_key: str, dim: int) -> None:
        """Load the up-to-date index files of a model, so that changes about to be made are
        applied to them incrementally instead of forcing a rebuild later."""
        state = self.store.catalog.state
        loaded = self.store.loaded()
        for metric in Metric:
            if (model_key, metric) not in loaded:
                index = self._load_fresh(model_key, dim, metric, state)
                if index is not None:
                    self.store.keep((model_key, metric), index, state)

    def flush(self) -> None:
        """Save every index changed in memory since it was loaded or last saved. One that
        cannot be saved (a full disk) stays in memory, marked to be saved by the next flush,
        with a warning: the catalog holds the change, so nothing is lost. Called while an
        error is already on its way up (ingest flushes in a ``finally``), the warning is
        logged at debug level: that error (a full catalog disk, say) already explains it."""
        quiet = sys.exc_info()[1] is not None
        for key, loaded in self.store.loaded().items():
            if _is_index_key(key) and loaded.dirty and not held_by_catalog(loaded.value):
                index: PreparedIndex = loaded.value
                state, spec = loaded.state, index.index.spec
                if self._save(index, key[0], key[1], state, spec, quiet=quiet):
                    loaded.dirty = False

    def forget(self) -> None:
        """Drop every loaded index (they reload from their files on next use)."""
        for key in [k for k in self.store.loaded() if _is_index_key(k)]:
            self.store.drop(key)


def _never_built() -> PreparedIndex:
    raise AssertionError("a catalog-held index is opened, never built here")


def _is_index_key(key: Any) -> bool:
    return isinstance(key, tuple) and len(key) == 2 and isinstance(key[1], Metric)


def _backend(spec: str) -> str:
    return spec.partition(":")[0].strip().lower()


def _canonical(spec: Any) -> Any:
    """A configured spec in one form: ``auto`` and ``auto:recall=0.95`` are the same."""
    try:
        target = parse_auto(spec) if isinstance(spec, str) else None
    except VectorIndexError:
        return spec
    return spec if target is None else f"auto:recall={target!r}"
