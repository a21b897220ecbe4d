"""The ``pgvector`` index backend: search runs inside the PostgreSQL catalog.

Spec (``--index``): ``pgvector`` with options ``type=halfvec|vector`` (halfvec: half the size,
dims up to 4000), ``M=16``, ``efConstruction=64``, ``ef_search=40``,
``iterative=relaxed|strict|off``, ``max_scan_tuples=20000``, ``build_memory_mb=1024``;
``shared`` is pgvector with its defaults, and a typed error where the catalog is not
PostgreSQL with the pgvector extension (0.8 or newer).

Each (model, metric) gets one HNSW index on the catalog's ``vectors`` table, built once in the
database under an advisory lock (:mod:`lookalike.catalog.pgvector_index`) and found by its
deterministic name by every other server: nothing is built per server, nothing is written
under ``indexes/``, and PostgreSQL keeps the index in step with every write.

Cosine collections are centred on their mean as the other backends centre them
(:class:`~lookalike.core.transform.PreparedIndex`): the index holds ``l2_normalize(v) - c`` (an
IMMUTABLE SQL function per centre), the query is transformed here, and scores are the cosine
similarity of the transformed vectors, as every backend reports them. The centre lives in the
catalog setting ``pgvector_center:<model id>`` so every server uses the same one, and it is
learned again by the other backends' rule (``RELEARN_FACTOR``: the collection grew to twice,
or shrank to half, the size it was learned on; first at ``CENTER_MIN_VECTORS``). Relearning
builds the new index concurrently while the old one keeps answering, then switches the
setting in one transaction that bumps the generation, and drops the old index. Whitening is
not offered (an ``IndexSpecError``): the index would need a projected copy of every vector.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from lookalike.catalog import pgvector_index as sql
from lookalike.catalog.pgvector_index import HnswBuild, HnswScan, VectorColumn
from lookalike.core.filters import Filter
from lookalike.core.sql_filters import filter_sql
from lookalike.core.transform import CENTER_MIN_VECTORS, PreparedIndex
from lookalike.errors import IndexSpecError, VectorIndexError
from lookalike.knn._common import Option
from lookalike.knn.base import Metric, SearchHits, as_vectors

if TYPE_CHECKING:
    from pathlib import Path

    import psycopg

    from lookalike.catalog.postgres import PostgresCatalog

BACKEND = "pgvector"
SHARED = "shared"  # search shared by every server: pgvector where the catalog offers it
CENTER_SETTING = "pgvector_center:{model_id}"
# The ef_search values a tuner tries, ascending (pgvector takes 1..1000).
EF_SEARCH_VALUES = (16, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256, 384, 512, 768, 1000)

OPTIONS: dict[str, Option] = {
    "type": Option(sql.TYPES, "halfvec", "stored type: halfvec (2 bytes a value) or vector"),
    "M": Option(int, 16, "links per node of the HNSW graph"),
    "efConstruction": Option(int, 64, "candidate list while building"),
    "ef_search": Option(int, 40, "candidate list while searching (the tuning knob)"),
    "iterative": Option(tuple(sql.ITERATIVE), "relaxed", "iterative index scans"),
    "max_scan_tuples": Option(int, 20_000, "most tuples an iterative scan visits"),
    "build_memory_mb": Option(int, 1024, "maintenance_work_mem of the build (0: server's)"),
}


@dataclass(frozen=True)
class PgvectorSpec:
    """A parsed ``pgvector`` spec: how the graph is built and how it is searched."""

    build: HnswBuild = field(default_factory=HnswBuild)
    scan: HnswScan = field(default_factory=HnswScan)

    def __str__(self) -> str:
        b, s = self.build, self.scan
        return (
            f"{BACKEND}:type={b.type},M={b.m},efConstruction={b.ef_construction},"
            f"ef_search={s.ef_search},iterative={s.iterative},max_scan_tuples={s.max_scan_tuples}"
            + (f",build_memory_mb={b.build_memory_mb}" if b.build_memory_mb != 1024 else "")
        )


def backend_of(spec: str) -> str:
    """The backend name a spec starts with (lower case)."""
    return spec.partition(":")[0].strip().lower() if isinstance(spec, str) else ""


def is_catalog_spec(spec: str) -> bool:
    """Whether ``spec`` names an index held by the catalog (``pgvector`` or ``shared``)."""
    return backend_of(spec) in (BACKEND, SHARED)


def parse_pgvector(spec: str) -> PgvectorSpec:
    """A ``pgvector[:options]`` or ``shared`` spec, checked; bad ones raise IndexSpecError."""
    name, _, rest = spec.partition(":")
    name = name.strip().lower()
    if name == SHARED:
        if rest.strip():
            raise IndexSpecError(f"shared takes no options; give them to pgvector: {spec!r}")
        return PgvectorSpec()
    if name != BACKEND:
        raise IndexSpecError(f"not a pgvector spec: {spec!r}")
    canonical = {option.lower(): option for option in OPTIONS}
    valid = ", ".join(f"{option}={OPTIONS[option].default!r}" for option in OPTIONS)
    values: dict[str, Any] = {}
    for item in rest.split(",") if rest.strip() else []:
        key, equals, text = item.partition("=")
        option = canonical.get(key.strip().lower())
        if not equals or not text.strip():
            raise IndexSpecError(f"{BACKEND}: expected name=value, got {item.strip()!r}")
        if option is None:
            raise IndexSpecError(f"{BACKEND}: unknown option {key.strip()!r}; valid: {valid}")
        if option in values:
            raise IndexSpecError(f"{BACKEND}: option {option!r} given twice")
        values[option] = OPTIONS[option].parse(BACKEND, option, text)
    get = {name: values.get(name, option.default) for name, option in OPTIONS.items()}
    return PgvectorSpec(
        HnswBuild(get["type"], get["M"], get["efConstruction"], get["build_memory_mb"]),
        HnswScan(get["ef_search"], get["iterative"], get["max_scan_tuples"]),
    )


def resolve_spec(spec: str, catalog: object, *, whitening: int = 0) -> str:
    """``spec`` unchanged, or for ``pgvector``/``shared`` its full form once ``catalog`` is
    known to hold such an index: a PostgreSQL catalog whose vectors are pgvector values, with
    pgvector 0.8 or newer, and no whitening; anything else raises ``IndexSpecError`` saying
    why (so ``--index pgvector`` fails when the collection opens, not at its first search)."""
    if not is_catalog_spec(spec):
        return spec
    parsed = parse_pgvector(spec)
    postgres = _postgres(catalog, spec)
    if whitening:
        raise IndexSpecError(
            f"{backend_of(spec)}: whitening is not offered by the pgvector index (it would "
            "need a whitened copy of every vector); use --whiten 0 or another index"
        )
    postgres.run(sql.check_version)
    return str(parsed)


def _postgres(catalog: object, spec: str) -> PostgresCatalog:
    from lookalike.catalog.postgres import PostgresCatalog

    name = backend_of(spec)
    if not isinstance(catalog, PostgresCatalog):
        location = getattr(catalog, "location", "this catalog")
        raise IndexSpecError(
            f"--index {name} searches inside a PostgreSQL catalog with the pgvector extension; "
            f"{location} is not one (give --db postgresql://...), or use another index"
        )
    if catalog.vector_storage != "pgvector":
        raise IndexSpecError(
            f"--index {name} needs the catalog's vectors stored as pgvector values; "
            f"{catalog.location} stores them as bytea (its server had no pgvector extension "
            "when the catalog was created)"
        )
    return catalog


class CatalogHnswIndex:
    """The knn-level face of one model's HNSW index inside the catalog: ``search`` and
    ``search_filtered`` run SQL, ``len`` is the number of vectors the model has (counted
    once per catalog state). Vectors are added and removed by the catalog's own writes;
    PostgreSQL keeps the index in step, so ``add``, ``remove`` and ``save`` are refused."""

    held_by_catalog = True
    tuning_knob = "ef_search"

    def __init__(
        self,
        catalog: PostgresCatalog,
        column: VectorColumn,
        spec: PgvectorSpec,
        count: int,
        name: str,
    ) -> None:
        self.catalog = catalog
        self.column = column
        self.config = spec
        self.dim = column.dim
        self.metric = Metric.parse(column.metric)
        self.count = count
        self.name = name  # the index's name in the database

    @property
    def spec(self) -> str:
        return str(self.config)

    def __len__(self) -> int:
        return self.count

    @property
    def tuning_value(self) -> int:
        return self.config.scan.ef_search

    def tuning_values(self) -> list[int]:
        """The ef_search values a tuner may try, ascending."""
        return list(EF_SEARCH_VALUES)

    def set_tuning(self, value: int) -> None:
        """Search with ``ef_search=value`` from now on (this object only)."""
        scan = replace(self.config.scan, ef_search=int(value))
        self.config = replace(self.config, scan=scan)

    def search(self, queries: np.ndarray, k: int) -> SearchHits:
        """Best-first top-``k`` of each (already transformed) query row."""
        return self._search(queries, k, "", ())

    def search_filtered(self, queries: np.ndarray, k: int, where: Filter) -> SearchHits:
        """Like :meth:`search` among the images that pass the SQL form of ``where``
        (:func:`lookalike.core.sql_filters.filter_sql`: never narrower than
        ``where.matches``, which callers still check). Complete: fewer than ``k`` hits
        means fewer images pass."""
        clause = filter_sql(where)
        return self._search(queries, k, clause.sql, clause.params, filtered=True)

    def _search(
        self,
        queries: np.ndarray,
        k: int,
        where: str,
        params: tuple[Any, ...],
        *,
        filtered: bool = False,
    ) -> SearchHits:
        queries = as_vectors(queries, self.dim)
        width = max(0, min(int(k), self.count))
        join = sql.IMAGES_JOIN if filtered else ""

        def run(db: psycopg.Connection) -> tuple[np.ndarray, np.ndarray]:
            return sql.search(
                db,
                self.column,
                queries,
                width,
                type=self.config.build.type,
                scan=self.config.scan,
                join=join,
                where=where,
                params=params,
                complete=True,
            )

        ids, scores = self.catalog.run(run)
        return SearchHits(ids, scores, self.metric)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        raise VectorIndexError("a pgvector index follows the catalog: store the vectors there")

    def remove(self, ids: np.ndarray) -> int:
        raise VectorIndexError("a pgvector index follows the catalog: remove the images there")

    def save(self, path: str | Path, *, metadata: dict[str, Any] | None = None) -> None:
        raise VectorIndexError("a pgvector index lives in the database; it has no file")


def held_by_catalog(index: object) -> bool:
    """Whether a loaded index (a PreparedIndex) is one the catalog holds (nothing to apply,
    save or rebuild in this process)."""
    return bool(getattr(getattr(index, "index", None), "held_by_catalog", False))


@dataclass(frozen=True)
class _Center:
    """A cosine collection's centre as the catalog records it."""

    vector: np.ndarray | None
    learned_on: int

    @property
    def version(self) -> str:
        return "none" if self.vector is None else sql.center_digest(self.vector)

    def to_json(self) -> str:
        assert self.vector is not None
        data = base64.b64encode(np.asarray(self.vector, dtype="<f4").tobytes()).decode("ascii")
        return json.dumps({"learned_on": self.learned_on, "center": data})

    @classmethod
    def from_json(cls, text: str | None, dim: int) -> _Center:
        if not text:
            return cls(None, 0)
        try:
            data = json.loads(text)
            vector = np.frombuffer(base64.b64decode(data["center"]), dtype="<f4")
            if vector.shape != (dim,):
                raise ValueError(f"a centre of {vector.size} values for dim {dim}")
            return cls(vector.astype(np.float32), int(data["learned_on"]))
        except (ValueError, KeyError, TypeError) as error:
            raise VectorIndexError(
                f"the catalog's pgvector centre is unreadable: {error}"
            ) from error


def open_index(
    catalog: object,
    model_id: int,
    dim: int,
    metric: Metric,
    spec: str,
    *,
    whitening: int = 0,
) -> PreparedIndex:
    """The pgvector index of one model and metric as it is in the catalog now: found by name,
    or built in the database when it does not exist yet, or re-centred when the collection
    grew past the rule every backend follows (by whichever process takes the build lock;
    the others go on meanwhile with what there is: the old index, or a scan)."""
    if metric is Metric.HAMMING:
        raise IndexSpecError("pgvector indexes float vectors: hamming needs binary codes")
    postgres = _postgres(catalog, spec)
    if whitening and metric is Metric.COSINE:
        resolve_spec(spec, catalog, whitening=whitening)  # raises, saying why
    parsed = parse_pgvector(spec)
    key = CENTER_SETTING.format(model_id=int(model_id))
    column = sql.catalog_column(model_id, dim, metric.value)
    count = postgres.run(lambda db: sql.count(db, column))
    center = _Center(None, 0)
    if metric is Metric.COSINE:
        center = _Center.from_json(postgres.get_setting(key), dim)
    name = _index_name(model_id, metric, parsed, center)
    due = metric is Metric.COSINE and _relearning_due(center, count)
    if due or postgres.run(lambda db: sql.index_status(db, name)) != "valid":
        center = postgres.run(
            lambda db: _maintain(db, postgres, column, model_id, parsed, center), own=True
        )
        name = _index_name(model_id, metric, parsed, center)
    index = CatalogHnswIndex(postgres, _centred(column, model_id, center), parsed, count, name)
    return PreparedIndex(index, center.vector, None, center.learned_on)


def _maintain(
    db: psycopg.Connection,
    catalog: PostgresCatalog,
    column: VectorColumn,
    model_id: int,
    spec: PgvectorSpec,
    seen: _Center,
) -> _Center:
    """Under the build lock of this model and metric (one process at a time builds or drops
    its indexes): learn the centre again when due, building its index while the old one
    keeps answering, then switch every server to it at once (a generation bump); else build
    the index of the recorded centre if it is missing. Returns the centre to search with;
    another process holding the lock: ``seen``, as it is."""
    metric = Metric.parse(column.metric)
    key = CENTER_SETTING.format(model_id=int(model_id))
    with sql.build_lock(db, _prefix(model_id, metric), wait=False) as held:
        if not held:
            return seen
        center = _Center(None, 0)
        if metric is Metric.COSINE:  # read again: another process may have just switched
            center = _Center.from_json(sql.catalog_setting(db, key), column.dim)
        recorded = center
        switch = metric is Metric.COSINE and _relearning_due(center, sql.count(db, column))
        if switch:
            learned = sql.mean_direction(db, column)
            assert learned is not None  # relearning is due only with vectors there
            center = _Center(*learned)
        centred = _centred(column, model_id, center)
        if centred.transform is not None and center.vector is not None:
            sql.create_center_function(db, centred.transform, center.vector)
        name = _index_name(model_id, metric, spec, center)
        if sql.index_status(db, name) != "valid":
            sql.create_index(db, name, centred, spec.build)
        if switch:
            catalog.set_settings({key: center.to_json()})
        for old in sql.indexes(db, column.table, _prefix(model_id, metric) + "_"):
            if old != name:  # an older centre's, or other options'
                sql.drop_index(db, old)
        if switch:
            # The previous centres' functions stay: a server may be searching with one now.
            previous = (_centred(column, model_id, c).transform for c in (recorded, seen))
            keep = {centred.transform, *previous}
            for function in sql.functions(db, f"lookalike_center_{int(model_id)}_"):
                if function not in keep:
                    sql.drop_function(db, function)
        return center


def _relearning_due(center: _Center, count: int) -> bool:
    """The other backends' rule (PreparedIndex.needs_relearning) for a centre."""
    probe = PreparedIndex(_Probe(), center.vector, None, center.learned_on)  # type: ignore[arg-type]
    return count >= CENTER_MIN_VECTORS and probe.needs_relearning(count, 0)


class _Probe:
    """Just enough of an index for PreparedIndex's relearning rule (cosine, no whitening)."""

    metric = Metric.COSINE
    dim = 1


def _centred(column: VectorColumn, model_id: int, center: _Center) -> VectorColumn:
    if center.vector is None:
        return column
    return replace(column, transform=f"lookalike_center_{int(model_id)}_{center.version}")


def _index_name(model_id: int, metric: Metric, spec: PgvectorSpec, center: _Center) -> str:
    b = spec.build
    return sql.index_name(_prefix(model_id, metric), b.type, b.m, b.ef_construction, center.version)


def _prefix(model_id: int, metric: Metric) -> str:
    return f"lookalike_hnsw_{int(model_id)}_{metric.value}"
