"""Machinery shared by the backends: options, validation, row storage, saving and loading."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np

from lookalike.errors import CorruptIndexError, IndexSpecError, VectorIndexError
from lookalike.knn._format import IndexFile, read_index_file, write_index_file
from lookalike.knn.base import Metric, SearchHits, as_ids

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})

T = TypeVar("T", bound="BaseIndex")


@dataclass(frozen=True)
class Option:
    """One ``key=value`` option of a backend spec: how to parse it and its default."""

    kind: type | tuple[str, ...]  # int, bool, or the allowed strings
    default: Any
    help: str

    def parse(self, backend: str, name: str, text: str) -> Any:
        """Convert the text of a spec value; a bad value raises IndexSpecError."""
        text = text.strip()
        if isinstance(self.kind, tuple):
            if text.lower() in self.kind:
                return text.lower()
            allowed = "|".join(self.kind)
            raise IndexSpecError(f"{backend}: {name}={text!r} is not one of {allowed}")
        if self.kind is bool:
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise IndexSpecError(f"{backend}: {name}={text!r} is not a boolean (true/false)")
        try:
            return int(text)
        except ValueError:
            raise IndexSpecError(f"{backend}: {name}={text!r} is not an integer") from None

    def format(self, value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value)


def check_int(backend: str, name: str, value: Any, *, low: int, high: int | None = None) -> int:
    """Validate an integer option (booleans and floats are refused, not truncated)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise IndexSpecError(f"{backend}: {name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"between {low} and {high}"
        raise IndexSpecError(f"{backend}: {name} must be {bounds}, got {value}")
    return int(value)


def check_choice(backend: str, name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise IndexSpecError(f"{backend}: {name} must be one of {'|'.join(choices)}, got {value!r}")
    return str(value)


def check_bool(backend: str, name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise IndexSpecError(f"{backend}: {name} must be true or false, got {value!r}")
    return bool(value)


def import_faiss() -> ModuleType:
    """faiss is imported on first use so the numpy-only backends work without it."""
    try:
        import faiss
    except ImportError as error:  # pragma: no cover - faiss-cpu is a dependency
        raise VectorIndexError("this index backend needs faiss (pip install faiss-cpu)") from error
    return faiss


def check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise VectorIndexError(f"k must be a non-negative integer, got {k!r}")
    return int(k)


def worst_score(metric: Metric) -> float:
    """The score given to padding slots: worse than any real hit."""
    return -math.inf if metric.higher_is_better else math.inf


def make_hits(ids: np.ndarray, scores: np.ndarray, metric: Metric) -> SearchHits:
    """Wrap results, giving slots without a hit (id -1) the worst possible score."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    scores = np.array(scores, dtype=np.float32)
    scores[ids < 0] = worst_score(metric)
    return SearchHits(ids, scores, metric)


def empty_hits(n_queries: int, width: int, metric: Metric) -> SearchHits:
    ids = np.full((n_queries, width), -1, dtype=np.int64)
    return make_hits(ids, np.zeros((n_queries, width), dtype=np.float32), metric)


def fix_width(ids: np.ndarray, scores: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad (with -1) or cut result columns so that every row has exactly ``width`` slots."""
    have = ids.shape[1]
    if have >= width:
        return ids[:, :width], scores[:, :width]
    pad = ((0, 0), (0, width - have))
    return np.pad(ids, pad, constant_values=-1), np.pad(scores, pad, constant_values=0)


def as_new_ids(ids: np.ndarray | list[int], count: int) -> np.ndarray:
    """Ids for ``add``: int64, unique, non-negative (-1 marks an empty result slot)."""
    ids = as_ids(ids)
    if len(ids) != count:
        raise VectorIndexError(f"{len(ids)} ids for {count} vectors")
    if len(ids) and ids.min() < 0:
        raise VectorIndexError("ids must be non-negative (-1 marks an empty result slot)")
    return ids


class RowStore:
    """Ids plus aligned per-row arrays (vectors, codes...) with upsert and removal."""

    def __init__(self, **columns: np.ndarray) -> None:
        self.ids = np.empty(0, dtype=np.int64)
        self.columns = dict(columns)
        self._lookup: tuple[np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    def upsert(self, ids: np.ndarray, **rows: np.ndarray) -> None:
        """Append rows, first dropping any row already stored under one of these ids."""
        self.remove(ids)
        self.ids = np.concatenate([self.ids, ids])
        for name, values in rows.items():
            self.columns[name] = np.concatenate([self.columns[name], values])
        self._lookup = None

    def remove(self, ids: np.ndarray) -> int:
        if not len(self.ids):
            return 0
        keep = ~np.isin(self.ids, np.asarray(ids, dtype=np.int64))
        removed = int(len(keep) - np.count_nonzero(keep))
        if removed:
            self.ids = self.ids[keep]
            self.columns = {name: values[keep] for name, values in self.columns.items()}
            self._lookup = None
        return removed

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """Row positions of ids (same shape), -1 for ids not stored."""
        if self._lookup is None:
            order = np.argsort(self.ids, kind="stable")
            self._lookup = (self.ids[order], order)
        sorted_ids, order = self._lookup
        ids = np.asarray(ids, dtype=np.int64)
        if not len(sorted_ids):
            return np.full(ids.shape, -1, dtype=np.int64)
        slots = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
        found = sorted_ids[slots] == ids
        return np.where(found, order[slots], -1).astype(np.int64)

    def restore(self, ids: np.ndarray, **columns: np.ndarray) -> None:
        """Replace everything with loaded arrays, checking that they line up."""
        for name, values in columns.items():
            if len(values) != len(ids) or values.shape[1:] != self.columns[name].shape[1:]:
                raise CorruptIndexError(f"stored {name!r} do not match the stored ids")
            if values.dtype != self.columns[name].dtype:
                raise CorruptIndexError(f"stored {name!r} have dtype {values.dtype}")
        if len(np.unique(ids)) != len(ids):
            raise CorruptIndexError("stored ids are not unique")
        self.ids = ids.astype(np.int64, copy=False)
        self.columns = dict(columns)
        self._lookup = None


class BaseIndex:
    """Common behaviour: spec formatting, metric checks, and the shared file format.

    Subclasses declare ``backend``, ``metrics`` and ``options`` and implement ``_options``
    (the constructor keywords that rebuild them), ``_state`` (what to save) and ``_restore``.
    """

    backend: ClassVar[str]
    metrics: ClassVar[tuple[Metric, ...]]
    options: ClassVar[dict[str, Option]]

    dim: int
    metric: Metric

    if TYPE_CHECKING:
        # What every backend implements (see ``Index``): its constructor takes ``dim`` and
        # ``metric`` plus its own options as keywords.
        def __init__(self, *, dim: int, metric: str | Metric = ..., **options: Any) -> None: ...
        def add(self, ids: np.ndarray, vectors: np.ndarray) -> None: ...
        def remove(self, ids: np.ndarray) -> int: ...
        def search(self, queries: np.ndarray, k: int) -> SearchHits: ...

    def _setup(self, dim: int, metric: str | Metric) -> None:
        self.dim = check_int(self.backend, "dim", dim, low=1)
        self.metric = self._check_metric(Metric.parse(metric))

    @classmethod
    def _check_metric(cls, metric: Metric) -> Metric:
        if metric not in cls.metrics:
            names = ", ".join(m.value for m in cls.metrics)
            raise IndexSpecError(
                f"{cls.backend} does not support metric {metric.value!r}; it supports {names}"
            )
        return metric

    def _options(self) -> dict[str, Any]:
        raise NotImplementedError

    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        raise NotImplementedError

    def _restore(self, state: dict[str, Any], file: IndexFile) -> None:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def spec(self) -> str:
        """Backend name plus every option that differs from its default."""
        parts = [
            f"{name}={self.options[name].format(value)}"
            for name, value in self._options().items()
            if value != self.options[name].default
        ]
        return self.backend + (":" + ",".join(parts) if parts else "")

    def __repr__(self) -> str:
        name, metric = type(self).__name__, self.metric.value
        return f"<{name} {self.spec} dim={self.dim} metric={metric} n={len(self)}>"

    metadata: dict[str, Any] = {}  # noqa: RUF012 - replaced per instance by load

    def save(self, path: str | Path, *, metadata: dict[str, Any] | None = None) -> None:
        """Write the index, its spec, dim, metric, count and the owner's ``metadata`` to one
        file."""
        state, arrays = self._state()
        write_index_file(
            path,
            backend=self.backend,
            spec=self.spec,
            dim=self.dim,
            metric=self.metric.value,
            count=len(self),
            options=self._options(),
            state=state,
            arrays=arrays,
            metadata=metadata,
        )

    @classmethod
    def load(cls: type[T], path: str | Path) -> T:
        """Load a file written by this backend's ``save``."""
        file = read_index_file(path)
        if file.backend != cls.backend:
            raise CorruptIndexError(
                f"{path}: holds a {file.backend!r} index, not {cls.backend!r} (use load_index)"
            )
        return cls._from_file(file, path)

    @classmethod
    def _from_file(cls: type[T], file: IndexFile, path: str | Path) -> T:
        header = file.header
        try:
            index = cls(dim=header["dim"], metric=header["metric"], **file.options)
            index._restore(file.state, file)
            index.metadata = dict(header.get("metadata") or {})
        except CorruptIndexError as error:
            raise CorruptIndexError(f"{path}: {error}") from error
        except (VectorIndexError, TypeError, KeyError, ValueError, RuntimeError) as error:
            # A checksummed file whose content still does not make sense was not written by us.
            raise CorruptIndexError(f"{path}: inconsistent index file ({error})") from error
        if len(index) != header["count"]:
            raise CorruptIndexError(
                f"{path}: header says {header['count']} vectors, payload holds {len(index)}"
            )
        return index


class RowStoreIndex(BaseIndex):
    """A backend whose rows live in a ``RowStore`` and whose search structure (a forest,
    buckets, a faiss index) is derived from them and rebuilt lazily after a change."""

    _store: RowStore

    def __len__(self) -> int:
        return len(self._store)

    def remove(self, ids: np.ndarray) -> int:
        """Remove these ids; unknown ids are ignored. Returns how many were removed."""
        removed = self._store.remove(np.asarray(ids, dtype=np.int64).reshape(-1))
        if removed:
            self._invalidate()
        return removed

    def _invalidate(self) -> None:
        """Forget the derived search structure; it is rebuilt on next use."""


def search_rows(
    queries: np.ndarray,
    k: int,
    store_len: int,
    metric: Metric,
    run: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
) -> SearchHits:
    """Common search wrapper: width ``min(k, n)``, empty cases, padding of short rows."""
    width = min(check_k(k), store_len)
    if width == 0 or len(queries) == 0:
        return empty_hits(len(queries), width, metric)
    ids, scores = run(queries, width)
    ids, scores = fix_width(ids, scores, width)
    return make_hits(ids, scores, metric)
