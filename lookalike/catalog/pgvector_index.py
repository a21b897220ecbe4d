"""HNSW indexes of pgvector inside PostgreSQL: the SQL of lookalike's ``pgvector`` backend.

The index lives in the database, on the column that already holds the vectors, so every
process connected to the database searches the same index, and PostgreSQL keeps it in step
with every ``INSERT`` and ``DELETE`` itself: nothing is built per server, nothing is rebuilt
after another server's write.

What one index reads is a :class:`VectorColumn`: a table, its id and vector columns, an
optional predicate (the catalog's ``vectors`` table holds every model's vectors, so each model
gets a partial index, ``WHERE model_id = N``) and an optional SQL function applied to each
vector first (cosine collections are centred on their mean: :func:`create_center_function`).
The index is an expression index on ``fn(vector)::halfvec(dim)`` (or ``vector(dim)``) with the
operator class of the metric: cosine ``<=>``, euclidean ``<->``, dot ``<#>`` (pgvector's
negative inner product). A query orders by the same expression, so the planner uses the index;
scores are computed again from the float32 column for the rows returned, so they are what the
other backends report (cosine similarity, L2 distance, dot product), not half-precision ones.

Searches use pgvector's iterative index scans (0.8+): with a filter, the scan goes on past
``ef_search`` candidates until enough rows pass it or ``max_scan_tuples`` were visited.
:func:`search` with ``complete=True`` then answers from an exact scan of the rows that pass
when the index scan came back short, so a selective filter still returns ``k`` results.

Everything takes a psycopg connection in autocommit mode, so the same functions serve the
catalog (:class:`lookalike.catalog.postgres.PostgresCatalog`) and benchmarks on a table of
their own (:func:`create_vector_table`, :func:`build_index`, :func:`search`).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from lookalike.errors import CatalogError, IndexSpecError

if TYPE_CHECKING:
    import psycopg

TYPES = ("halfvec", "vector")
# pgvector's limits on the dimensions an HNSW index takes, by stored type.
MAX_DIMS = {"halfvec": 4000, "vector": 2000}
METRICS = ("cosine", "euclidean", "dot")
ITERATIVE = {"relaxed": "relaxed_order", "strict": "strict_order", "off": "off"}
MIN_VERSION = (0, 8, 0)  # iterative index scans
# pgvector's own limits on hnsw.ef_search.
EF_SEARCH_MAX = 1000

_OPERATORS = {"cosine": "<=>", "euclidean": "<->", "dot": "<#>"}
_OPCLASSES = {"cosine": "cosine_ops", "euclidean": "l2_ops", "dot": "ip_ops"}
_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")
# Advisory locks of lookalike's index builds: (this class, a hash of the index name). The
# migration lock uses the one-number form, a separate key space.
_LOCK_CLASS = 0x6C6B
_LOCK_POLL_SECONDS = 0.2
_INT8_OID = 20
# The scan settings each connection's session has (apply_scan), so they are sent only when
# they change; a new connection (after a reconnect) starts with none.
_APPLIED: weakref.WeakKeyDictionary[Any, tuple[str, str, str]] = weakref.WeakKeyDictionary()
# Connections that send numpy rows as pgvector values (register_vector), with the type's oid.
_DUMPING: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class HnswBuild:
    """How an HNSW graph is built: the stored ``type`` (``halfvec``: half the size, dims up to
    4000; ``vector``: float32, up to 2000), links per node ``m`` and the candidate list while
    inserting ``ef_construction`` (pgvector's defaults), and the ``maintenance_work_mem`` the
    build may use in MB (a graph that fits builds many times faster; 0: the server's)."""

    type: str = "halfvec"
    m: int = 16
    ef_construction: int = 64
    build_memory_mb: int = 1024

    def __post_init__(self) -> None:
        if self.type not in TYPES:
            raise IndexSpecError(f"pgvector: type must be one of {'|'.join(TYPES)}")
        if not 2 <= self.m <= 100:
            raise IndexSpecError(f"pgvector: M must be between 2 and 100, got {self.m}")
        if not 4 <= self.ef_construction <= 1000 or self.ef_construction < 2 * self.m:
            raise IndexSpecError(
                f"pgvector: efConstruction must be between 4 and 1000 and at least 2*M, "
                f"got {self.ef_construction}"
            )
        if self.build_memory_mb < 0:
            raise IndexSpecError("pgvector: build_memory_mb must be 0 or more")


@dataclass(frozen=True)
class HnswScan:
    """How a query walks the graph: the candidate list ``ef_search``, ``iterative`` index
    scans (``relaxed``: continue until enough rows pass the filter, results re-sorted here;
    ``strict``: continue in exact distance order; ``off``: one candidate list) and the most
    tuples an iterative scan visits, ``max_scan_tuples``."""

    ef_search: int = 40
    iterative: str = "relaxed"
    max_scan_tuples: int = 20_000

    def __post_init__(self) -> None:
        if not 1 <= self.ef_search <= EF_SEARCH_MAX:
            raise IndexSpecError(
                f"pgvector: ef_search must be between 1 and {EF_SEARCH_MAX}, got {self.ef_search}"
            )
        if self.iterative not in ITERATIVE:
            raise IndexSpecError(f"pgvector: iterative must be one of {'|'.join(ITERATIVE)}")
        if self.max_scan_tuples < 1:
            raise IndexSpecError("pgvector: max_scan_tuples must be at least 1")


@dataclass(frozen=True)
class VectorColumn:
    """The vectors one index covers: ``table`` (aliased ``v`` in queries) with its ``id`` and
    vector ``column``, their ``dim`` and ``metric``, the rows it covers (``predicate``, SQL on
    the table's columns; empty: all) and the SQL function applied to each vector first
    (``transform``, e.g. the centring of :func:`create_center_function`; None: none)."""

    table: str
    id: str
    column: str
    dim: int
    metric: str
    predicate: str = ""
    transform: str | None = None

    def __post_init__(self) -> None:
        for name in (self.table, self.id, self.column, self.transform or "x"):
            _identifier(name)
        if self.metric not in METRICS:
            raise IndexSpecError(
                f"pgvector indexes compare by {', '.join(METRICS)}, not {self.metric!r}"
            )
        if self.dim < 1:
            raise IndexSpecError(f"pgvector: bad dimension {self.dim}")

    def value(self, alias: str = "") -> str:
        """The float32 vector an index of this column holds, as SQL (before its cast)."""
        column = f"{alias}.{self.column}" if alias else self.column
        return f"{self.transform}({column})" if self.transform else column

    def indexed(self, type: str, alias: str = "") -> str:
        """The expression the index is built on (and that a query must order by)."""
        return f"({self.value(alias)})::{type}({self.dim})"

    @property
    def operator(self) -> str:
        return _OPERATORS[self.metric]


# The catalog's tables (postgres_schema.py): every model's vectors in one table, so each model
# gets a partial index; filters read the images joined to them (aliased ``i``).
CATALOG_VECTORS = "vectors"
IMAGES_JOIN = "JOIN images i ON i.id = v.image_id"


def catalog_column(model_id: int, dim: int, metric: str) -> VectorColumn:
    """The vectors of one model in the catalog's ``vectors`` table."""
    return VectorColumn(
        CATALOG_VECTORS, "image_id", "vector", dim, metric, f"model_id = {int(model_id)}"
    )


def catalog_setting(db: psycopg.Connection, key: str) -> str | None:
    """A value of the catalog's settings table, read on ``db`` (a build's own connection)."""
    row = db.execute("SELECT value FROM settings WHERE key = %s", (key,)).fetchone()
    return None if row is None else str(row[0])


def mean_direction(db: psycopg.Connection, column: VectorColumn) -> tuple[np.ndarray, int] | None:
    """The mean of the column's L2-normalised vectors (computed by the server, in double
    precision) and how many there are; None when there are none."""
    row = db.execute(
        f"SELECT avg(l2_normalize({column.column}))::float4[], count(*) FROM {column.table}"
        + (f" WHERE {column.predicate}" if column.predicate else "")
    ).fetchone()
    if row is None or row[0] is None:
        return None
    return np.asarray(row[0], dtype=np.float32), int(row[1])


def version(db: psycopg.Connection) -> tuple[int, ...] | None:
    """The pgvector extension's version in this database, or None without it."""
    row = db.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
    if row is None:
        return None
    return tuple(int(part) for part in re.findall(r"\d+", str(row[0])))


def check_version(db: psycopg.Connection) -> tuple[int, ...]:
    """The pgvector version, or ``IndexSpecError`` when the database has none or one older
    than 0.8 (no iterative index scans)."""
    found = version(db)
    if found is None:
        raise IndexSpecError("the database has no pgvector extension")
    if found < MIN_VERSION:
        shown = ".".join(map(str, found))
        raise IndexSpecError(
            f"pgvector {shown} is too old: the pgvector index needs 0.8 or newer (iterative "
            "index scans); ALTER EXTENSION vector UPDATE"
        )
    return found


def index_name(prefix: str, *parts: object) -> str:
    """A deterministic index (or function) name: ``prefix`` and a digest of ``parts`` (what
    the index depends on), short enough for PostgreSQL's 63-byte identifiers."""
    digest = hashlib.sha1(repr(parts).encode()).hexdigest()[:10]
    return _identifier(f"{prefix}_{digest}")


def index_status(db: psycopg.Connection, name: str) -> str | None:
    """``"valid"``, ``"invalid"`` (a build that failed or is still running) or None."""
    row = db.execute(
        "SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass(%s)", (name,)
    ).fetchone()
    if row is None:
        return None
    return "valid" if row[0] else "invalid"


def center_digest(center: np.ndarray) -> str:
    """A short digest of a centre's float32 values: the version of a centring function."""
    values = np.ascontiguousarray(center, dtype="<f4")
    return hashlib.sha1(values.tobytes()).hexdigest()[:12]


def create_center_function(db: psycopg.Connection, name: str, center: np.ndarray) -> None:
    """Create (once) the IMMUTABLE function ``name(vector)``: the vector L2-normalised minus
    ``center``, what a cosine collection's index holds (see ``core/transform.py``)."""
    _identifier(name)
    values = np.asarray(center, dtype=np.float32).reshape(-1)
    if db.execute("SELECT to_regprocedure(%s)", (f"{name}(vector)",)).fetchone() != (None,):
        return
    literal = "[" + ",".join(repr(float(x)) for x in values) + "]"
    db.execute(
        f"CREATE FUNCTION {name}(vector) RETURNS vector LANGUAGE sql IMMUTABLE PARALLEL SAFE "
        f"AS $$ SELECT l2_normalize($1) - '{literal}'::vector({len(values)}) $$"
    )


def drop_function(db: psycopg.Connection, name: str) -> None:
    """Drop a centring function (and nothing that still uses it: that fails)."""
    db.execute(f"DROP FUNCTION IF EXISTS {_identifier(name)}(vector)")


def functions(db: psycopg.Connection, prefix: str) -> list[str]:
    """The names of functions in the current schema that start with ``prefix``."""
    rows = db.execute(
        "SELECT proname FROM pg_proc WHERE pronamespace = current_schema()::regnamespace "
        "AND starts_with(proname, %s) ORDER BY proname",
        (prefix,),
    ).fetchall()
    return [str(row[0]) for row in rows]


def indexes(db: psycopg.Connection, table: str, prefix: str) -> list[str]:
    """The names of indexes on ``table`` whose names start with ``prefix``."""
    rows = db.execute(
        "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "WHERE i.indrelid = to_regclass(%s) AND starts_with(c.relname, %s) ORDER BY c.relname",
        (_identifier(table), prefix),
    ).fetchall()
    return [str(row[0]) for row in rows]


def create_index(
    db: psycopg.Connection,
    name: str,
    column: VectorColumn,
    build: HnswBuild,
    *,
    concurrently: bool = True,
) -> None:
    """Build the HNSW index ``name`` on ``column`` (``CONCURRENTLY``: writers go on meanwhile).
    An invalid leftover of the same name (a build that was interrupted) is dropped first.
    ``db`` must be in autocommit mode; the caller serialises builds (:func:`build_lock`)."""
    if column.dim > MAX_DIMS[build.type]:
        raise IndexSpecError(
            f"pgvector: an HNSW index on {build.type} takes at most {MAX_DIMS[build.type]} "
            f"dimensions; these vectors have {column.dim}"
            + (" (type=halfvec takes up to 4000)" if build.type == "vector" else "")
        )
    _identifier(name)
    if index_status(db, name) == "invalid":
        drop_index(db, name, concurrently=concurrently)
    where = f" WHERE {column.predicate}" if column.predicate else ""
    opclass = f"{build.type}_{_OPCLASSES[column.metric]}"
    if build.build_memory_mb:
        memory = f"{build.build_memory_mb}MB"
        db.execute("SELECT set_config('maintenance_work_mem', %s, false)", (memory,))
    try:
        db.execute(
            f"CREATE INDEX {'CONCURRENTLY ' if concurrently else ''}IF NOT EXISTS {name} "
            f"ON {column.table} USING hnsw (({column.indexed(build.type)}) {opclass}) "
            f"WITH (m = {int(build.m)}, ef_construction = {int(build.ef_construction)}){where}"
        )
    finally:
        if build.build_memory_mb and not db.broken:
            db.execute("RESET maintenance_work_mem")


def drop_index(db: psycopg.Connection, name: str, *, concurrently: bool = True) -> None:
    """Drop an index if it exists (``CONCURRENTLY``: searches using it finish first)."""
    db.execute(f"DROP INDEX {'CONCURRENTLY ' if concurrently else ''}IF EXISTS {_identifier(name)}")


@contextlib.contextmanager
def build_lock(db: psycopg.Connection, name: str, *, wait: bool) -> Iterator[bool]:
    """Hold the advisory lock of building index ``name`` (session-level, so that a
    ``CREATE INDEX CONCURRENTLY`` can run under it): yields True when this session holds it,
    False when another one does and ``wait`` is False. Waiting polls (a blocked statement
    would hold a snapshot the concurrent build waits for: a deadlock)."""
    key = (_LOCK_CLASS, name)
    statement = "SELECT pg_try_advisory_lock(%s, hashtext(%s))"
    while True:
        row = db.execute(statement, key).fetchone()
        if row is not None and row[0]:
            break
        if not wait:
            yield False
            return
        time.sleep(_LOCK_POLL_SECONDS)
    try:
        yield True
    finally:
        if not db.broken:
            db.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", key)


def count(db: psycopg.Connection, column: VectorColumn) -> int:
    """How many vectors the index of ``column`` covers."""
    where = f" WHERE {column.predicate}" if column.predicate else ""
    row = db.execute(f"SELECT count(*) FROM {column.table}{where}").fetchone()
    return int(row[0]) if row else 0


def score_sql(column: VectorColumn, alias: str = "v") -> str:
    """SQL of the score of a row against the query parameter ``%s`` (a pgvector value), in
    float32 and in the convention of the other backends: cosine similarity, L2 distance, dot."""
    value = column.value(alias)
    query = f"%s::vector({column.dim})"
    if column.metric == "cosine":
        return f"1 - ({value} <=> {query})"
    if column.metric == "dot":
        return f"-({value} <#> {query})"
    return f"{value} <-> {query}"


def search(
    db: psycopg.Connection,
    column: VectorColumn,
    queries: np.ndarray,
    k: int,
    *,
    type: str = "halfvec",
    scan: HnswScan | None = None,
    join: str = "",
    where: str = "",
    params: Sequence[Any] = (),
    complete: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best rows of ``column`` for each query row (already transformed as the index
    holds vectors), by the HNSW index of ``type`` when there is one (else PostgreSQL scans):
    (ids int64 [n, k], scores float32 [n, k]) best first, empty slots id -1.

    ``join`` (SQL after ``FROM table v``) and ``where`` (a condition with ``%s`` placeholders
    for ``params``) filter the rows; a filtered scan asks for ``max(k, ef_search)`` rows and
    keeps the best ``k``. ``complete``: when the index scan found fewer rows than it asked for
    (a selective filter, ``max_scan_tuples`` reached), answer from an exact scan of every row
    that passes instead, so fewer than ``k`` means fewer exist. The scan settings
    go to ``db``'s session (:func:`apply_scan`): ``db`` must be in autocommit mode."""
    queries = np.asarray(queries, dtype=np.float32).reshape(-1, column.dim)
    scan = scan or HnswScan()
    if type not in TYPES:
        raise IndexSpecError(f"pgvector: type must be one of {'|'.join(TYPES)}")
    ids = np.full((len(queries), k), -1, dtype=np.int64)
    worst = -np.inf if column.metric in ("cosine", "dot") else np.inf
    scores = np.full((len(queries), k), worst, dtype=np.float32)
    if k < 1 or not len(queries):
        return ids, scores
    conditions = " AND ".join(f"({c})" for c in (column.predicate, where) if c)
    condition = f" WHERE {conditions}" if conditions else ""
    head = (
        f"SELECT v.{column.id}, {score_sql(column)} AS score FROM {column.table} v {join}"
        f"{condition} ORDER BY "
    )
    by_index = (
        f"{head}{column.indexed(type, 'v')} {column.operator} %s::vector::{type}({column.dim})"
        " LIMIT %s"
    )
    # Ordered by the float32 score, which no index serves: an exact scan of the rows passing.
    descending = " DESC" if column.metric in ("cosine", "dot") else ""
    exact = f"{head}score{descending}, v.{column.id} LIMIT %s"
    # Without iterative scans, a candidate list shorter than k cannot return k rows.
    ef_search = scan.ef_search if scan.iterative != "off" else max(scan.ef_search, k)
    apply_scan(db, replace(scan, ef_search=min(ef_search, EF_SEARCH_MAX)))
    if db not in _DUMPING:
        register_vector(db)  # sent in binary: a list of floats costs more than the search
    # A filtered scan returns rows in the order it meets them passing: asked for a whole
    # candidate list of them, the k best among those are the k best far more often. Fewer
    # than that means the scan ran out (max_scan_tuples, or fewer rows pass at all): the
    # exact scan of the rows that pass then costs little more and misses none.
    limit = max(k, min(scan.ef_search, EF_SEARCH_MAX)) if where else k
    for row, values in enumerate(queries):
        found = db.execute(by_index, (values, *params, values, limit)).fetchall()
        if complete and len(found) < limit:
            found = db.execute(exact, (values, *params, k)).fetchall()
        _fill(ids[row], scores[row], found, higher_is_better=bool(descending))
    return ids, scores


def apply_scan(db: psycopg.Connection, scan: HnswScan) -> None:
    """Give ``db``'s session the scan settings (they touch HNSW scans only), in one statement
    and only when they change: a search is then one round trip."""
    values = (str(scan.ef_search), ITERATIVE[scan.iterative], str(scan.max_scan_tuples))
    if _APPLIED.get(db) == values:
        return
    db.execute(
        "SELECT set_config('hnsw.ef_search', %s, false), "
        "set_config('hnsw.iterative_scan', %s, false), "
        "set_config('hnsw.max_scan_tuples', %s, false)",
        values,
    )
    _APPLIED[db] = values


def _fill(
    ids: np.ndarray, scores: np.ndarray, found: list[tuple[Any, ...]], *, higher_is_better: bool
) -> None:
    """Rows of (id, score) into one result row, best first (an iterative scan in relaxed
    order, and half-precision distances, may leave neighbours slightly out of order)."""
    if not found:
        return
    got_ids = np.array([int(r[0]) for r in found], dtype=np.int64)
    got = np.array([float(r[1]) for r in found], dtype=np.float64)
    keys = -got if higher_is_better else got
    order = np.lexsort((got_ids, keys))[: len(ids)]
    ids[: len(order)] = got_ids[order]
    scores[: len(order)] = got[order]


# -- on a table of one's own (benchmarks) ---------------------------------------------------


def register_vector(db: psycopg.Connection) -> int:
    """Let ``db`` send numpy rows as pgvector ``vector`` values in binary (what
    :func:`create_vector_table` copies with); returns the type's oid."""
    import struct

    from psycopg.adapt import Dumper
    from psycopg.pq import Format
    from psycopg.types import TypeInfo

    info = TypeInfo.fetch(db, "vector")
    if info is None:
        raise CatalogError("the database has no pgvector extension")
    vector_oid = info.oid

    class VectorDumper(Dumper):
        format = Format.BINARY
        oid = vector_oid

        def dump(self, obj: np.ndarray) -> bytes:
            values = np.ascontiguousarray(obj, dtype=">f4").reshape(-1)
            return struct.pack(">HH", len(values), 0) + values.tobytes()

    db.adapters.register_dumper(np.ndarray, VectorDumper)
    _DUMPING[db] = vector_oid
    return vector_oid


def create_vector_table(
    db: psycopg.Connection, table: str, ids: np.ndarray, vectors: np.ndarray
) -> VectorColumn:
    """A new table ``table (id bigint primary key, vector vector(dim))`` holding ``vectors``
    under ``ids`` (replacing one of that name), loaded by binary COPY; returns its column for
    :func:`build_index` and :func:`search` (metric cosine; ``dataclasses.replace`` another)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    dim = int(vectors.shape[1])
    _identifier(table)
    vector_oid = register_vector(db)
    db.execute(f"DROP TABLE IF EXISTS {table}")
    db.execute(f"CREATE TABLE {table} (id bigint PRIMARY KEY, vector vector({dim}) NOT NULL)")
    with (
        db.cursor() as cursor,
        cursor.copy(f"COPY {table} (id, vector) FROM STDIN (FORMAT BINARY)") as copy,
    ):
        copy.set_types([_INT8_OID, vector_oid])
        for image_id, vector in zip(np.asarray(ids, dtype=np.int64).tolist(), vectors, strict=True):
            copy.write_row((image_id, vector))
    db.execute(f"ANALYZE {table}")
    return VectorColumn(table=table, id="id", column="vector", dim=dim, metric="cosine")


def build_index(
    db: psycopg.Connection, column: VectorColumn, build: HnswBuild | None = None
) -> str:
    """Build the HNSW index of ``column`` as lookalike builds the catalog's (not
    concurrently: nobody else writes a benchmark's table); returns its name."""
    build = build or HnswBuild()
    name = index_name(f"{column.table}_hnsw", column, build)
    create_index(db, name, column, build, concurrently=False)
    return name


def _identifier(name: str) -> str:
    """``name`` if it is a plain lower-case SQL identifier (everything put into statements
    here by name is one), else ``CatalogError``."""
    if not _IDENTIFIER.fullmatch(name):
        raise CatalogError(f"not a plain SQL identifier: {name!r}")
    return name
