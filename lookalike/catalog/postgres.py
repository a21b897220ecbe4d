"""The PostgreSQL catalog: one database that many lookalike servers share.

It answers every call exactly as :class:`~lookalike.catalog.sqlite.SqliteCatalog` does, over
the same schema versions. Vectors live in a pgvector ``vector`` column when the server has the
extension, else in ``bytea``; both read back as the same float32 arrays, bit for bit.

Several processes may write at once: each write is one transaction, rows are locked in a fixed
order so writers do not deadlock (and the rare deadlock or serialisation failure is retried),
and the generation counter is bumped under the settings row's lock, so every change gets its
own generation number and :mod:`lookalike.core.derived` can tell its own change from anyone
else's.
"""

from __future__ import annotations

import json
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from lookalike.catalog.base import (
    FileState,
    ImageRecord,
    checked_vectors,
    fresh_local_feature_rows,
    local_feature_rows,
    model_summaries,
)
from lookalike.catalog.postgres_schema import MIGRATIONS, VERSION_TABLE
from lookalike.catalog.schema import SCHEMA_VERSION
from lookalike.encoders.base import EncoderIdentity
from lookalike.errors import CatalogError, CatalogUnavailableError, ModelMismatchError

if TYPE_CHECKING:
    import psycopg

T = TypeVar("T")

VECTOR_STORAGES = ("auto", "pgvector", "bytea")

# Any fixed number: lookalike processes migrating the same database take turns on it.
_MIGRATION_LOCK = 0x6C6F6F6B
_WRITE_ATTEMPTS = 5


class PostgresCatalog:
    """Catalog in a PostgreSQL database, addressed by a ``postgresql://`` URL.

    ``vector_storage`` matters when the catalog is created: ``auto`` uses pgvector when the
    server has it (creating the extension if allowed) and ``bytea`` otherwise; ``pgvector`` or
    ``bytea`` insist, and an existing catalog stored the other way is refused.
    """

    def __init__(self, url: str, *, vector_storage: str = "auto") -> None:
        if vector_storage not in VECTOR_STORAGES:
            raise CatalogError(
                f"vector storage must be one of {', '.join(VECTOR_STORAGES)}, "
                f"got {vector_storage!r}"
            )
        self._url = url
        self.last_written_generation: int | None = None
        self._lock = threading.RLock()
        self._db = self._connect()
        try:
            self._migrate(vector_storage)
            self.vector_storage = self._stored_vector_type()
            if vector_storage != "auto" and vector_storage != self.vector_storage:
                raise CatalogError(
                    f"{self.location} stores vectors as {self.vector_storage}, not {vector_storage}"
                )
            self._register_vector_type()
        except BaseException:
            self._db.close()
            raise

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def location(self) -> str:
        """The database URL, without its password."""
        return redact_url(self._url)

    def close(self) -> None:
        """Close the connection; the object is unusable afterwards."""
        self._db.close()

    def __enter__(self) -> PostgresCatalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connect(self) -> psycopg.Connection:
        try:
            import psycopg
        except ImportError as error:
            raise CatalogError(
                "a PostgreSQL catalog needs psycopg: pip install 'psycopg[binary]'"
            ) from error
        try:
            # Autocommit: reads are single statements and never hold a transaction open;
            # writes open one explicitly.
            return psycopg.connect(self._url, autocommit=True, connect_timeout=10)
        except psycopg.Error as error:
            kind = CatalogUnavailableError if _unreachable(error) else CatalogError
            raise kind(f"cannot connect to {self.location}: {error}") from error

    def _connection(self) -> psycopg.Connection:
        import psycopg

        # A server restart breaks the connection; the next call opens a new one.
        if self._db.broken:
            broken, self._db = self._db, self._connect()
            try:
                self._register_vector_type()
            except psycopg.Error as error:
                self._db.close()
                self._db = broken  # still broken: the next call connects again
                raise self._failure(error) from error
        return self._db

    def _failure(self, error: Exception, what: str = "") -> CatalogError:
        """A psycopg error as a typed one: CatalogUnavailableError when the server cannot be
        reached or the connection broke, else CatalogError; neither names the password."""
        if _unreachable(error):
            return CatalogUnavailableError(f"{self.location} cannot be reached: {error}")
        return CatalogError(f"{self.location}: {what or error}")

    @property
    def schema_version(self) -> int:
        return int(self._one(f"SELECT version FROM {VERSION_TABLE}")[0])

    def _migrate(self, vector_storage: str) -> None:
        import psycopg

        db = self._db
        try:
            with db.transaction():
                db.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                db.execute(f"CREATE TABLE IF NOT EXISTS {VERSION_TABLE} (version INTEGER NOT NULL)")
                row = db.execute(f"SELECT version FROM {VERSION_TABLE}").fetchone()
                if row is None:
                    db.execute(f"INSERT INTO {VERSION_TABLE} (version) VALUES (0)")
                version = 0 if row is None else int(row[0])
                if version > SCHEMA_VERSION:
                    raise CatalogError(
                        f"{self.location} has schema version {version}, newer than this "
                        f"lookalike understands ({SCHEMA_VERSION}); upgrade lookalike"
                    )
                for number in range(version, SCHEMA_VERSION):
                    script = MIGRATIONS[number]
                    if "{vector_type}" in script:
                        script = script.replace("{vector_type}", self._vector_type(vector_storage))
                    db.execute(script)
                    db.execute(f"UPDATE {VERSION_TABLE} SET version = %s", (number + 1,))
        except psycopg.Error as error:
            raise self._failure(error, f"not a usable lookalike catalog ({error})") from error

    def _vector_type(self, vector_storage: str) -> str:
        """The column type for vectors in a new catalog (inside the migration transaction)."""
        import psycopg

        if vector_storage == "bytea":
            return "bytea"
        db = self._db
        if db.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'").fetchone():
            return "vector"
        if db.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'").fetchone():
            try:
                with db.transaction():  # a savepoint: a refusal leaves the migration going
                    db.execute("CREATE EXTENSION IF NOT EXISTS vector")
                return "vector"
            except psycopg.Error as error:
                if vector_storage == "pgvector":
                    raise CatalogError(f"cannot create the pgvector extension: {error}") from error
                return "bytea"
        if vector_storage == "pgvector":
            raise CatalogError(f"the server of {self.location} has no pgvector extension")
        return "bytea"

    def _stored_vector_type(self) -> str:
        row = self._one(
            "SELECT t.typname FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
            "WHERE a.attrelid = 'vectors'::regclass AND a.attname = 'vector'"
        )
        return "pgvector" if row[0] == "vector" else "bytea"

    def _register_vector_type(self) -> None:
        """Exchange pgvector values in binary: rows of float32 out, raw bytes in."""
        if self.vector_storage != "pgvector":
            return
        from psycopg.adapt import Dumper, Loader
        from psycopg.pq import Format
        from psycopg.types import TypeInfo

        info = TypeInfo.fetch(self._db, "vector")
        if info is None:
            raise CatalogError(f"{self.location}: the pgvector extension is gone")

        class VectorDumper(Dumper):
            format = Format.BINARY
            oid = info.oid

            def dump(self, obj: np.ndarray) -> bytes:
                return encode_pgvector(obj)

        class RawLoader(Loader):
            format = Format.BINARY

            def load(self, data: Any) -> bytes:
                return bytes(data)

        self._db.adapters.register_dumper(np.ndarray, VectorDumper)
        self._db.adapters.register_loader(info.oid, RawLoader)

    # -- statements ------------------------------------------------------------------------

    def _rows(self, sql: str, params: Sequence[Any] = (), *, binary: bool = False) -> list[tuple]:
        import psycopg

        with self._lock:
            try:
                return self._connection().execute(sql, params, binary=binary).fetchall()
            except psycopg.Error as error:
                raise self._failure(error) from error

    def _one(self, sql: str, params: Sequence[Any] = ()) -> tuple:
        rows = self._rows(sql, params)
        return rows[0] if rows else ()

    def _write(self, work: Callable[[psycopg.Connection], T]) -> T:
        """Run ``work`` in one transaction, again when it lost a deadlock or a serialisation
        conflict to a concurrent writer (it then had no effect)."""
        import psycopg
        from psycopg import errors

        for attempt in range(_WRITE_ATTEMPTS):
            with self._lock:
                db = self._connection()
                try:
                    with db.transaction():
                        return work(db)
                except (errors.DeadlockDetected, errors.SerializationFailure) as error:
                    if attempt == _WRITE_ATTEMPTS - 1:
                        raise CatalogError(f"{self.location}: {error}") from error
                except psycopg.Error as error:
                    raise self._failure(error) from error
            time.sleep(0.01 * 2**attempt)
        raise AssertionError("unreachable")

    # -- settings and models ---------------------------------------------------------------

    def get_setting(self, key: str, default: str | None = None) -> str | None:
        """A value from the settings table."""
        row = self._one("SELECT value FROM settings WHERE key = %s", (key,))
        return row[0] if row else default

    def set_setting(self, key: str, value: str) -> None:
        """Store a value in the settings table."""
        self._write(
            lambda db: db.execute(
                "INSERT INTO settings (key, value) VALUES (%s, %s) "
                "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                (key, value),
            )
        )

    def register_model(self, identity: EncoderIdentity) -> int:
        """The id under which vectors of this encoder identity are stored (created if new)."""
        row = self._one("SELECT id, dim FROM models WHERE key = %s", (identity.key,))
        if not row:

            def insert(db: psycopg.Connection) -> tuple:
                # Two servers registering the same model at once end up with the same id.
                db.execute(
                    "INSERT INTO models (key, name, layer, dim, weights_sha256, preprocess,"
                    " created_at) VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (key) DO NOTHING",
                    (
                        identity.key,
                        identity.model,
                        identity.layer,
                        identity.dim,
                        identity.weights_sha256,
                        json.dumps(identity.preprocess.to_dict()),
                        time.time(),
                    ),
                )
                return db.execute(
                    "SELECT id, dim FROM models WHERE key = %s", (identity.key,)
                ).fetchone()

            row = self._write(insert)
        if row[1] != identity.dim:
            raise ModelMismatchError(f"model {identity.key} was stored with dim {row[1]}")
        return int(row[0])

    def models(self) -> list[dict[str, Any]]:
        """Every model that has stored vectors here, with its vector count."""
        rows = self._rows(
            "SELECT m.id, m.key, m.name, m.layer, m.dim, "
            "(SELECT COUNT(*) FROM vectors v WHERE v.model_id = m.id) FROM models m ORDER BY m.id"
        )
        return model_summaries(rows)

    def model_dim(self, model_id: int) -> int:
        """The vector dimension of a registered model."""
        row = self._one("SELECT dim FROM models WHERE id = %s", (int(model_id),))
        if not row:
            raise CatalogError(f"no model with id {model_id}")
        return int(row[0])

    # -- images ----------------------------------------------------------------------------

    def file_states(self, prefix: str = "") -> dict[str, FileState]:
        """Path -> stored state, for every image whose path starts with ``prefix``."""
        rows = self._rows(
            "SELECT path, id, size, mtime, content_hash FROM images WHERE starts_with(path, %s)",
            (prefix,),
        )
        return {path: FileState(i, size, mtime, h) for path, i, size, mtime, h in rows}

    def store(
        self, records: Sequence[ImageRecord], vectors: np.ndarray, model_id: int
    ) -> list[int]:
        """Insert or update images by path together with their vectors, in one transaction."""
        from psycopg.types.json import Jsonb

        vectors = checked_vectors(records, vectors, self.model_dim(model_id))
        if not records:
            return []
        # Rows are locked in path order, the same in every writer, so writers never deadlock.
        order = sorted(range(len(records)), key=lambda i: records[i].path)
        now = time.time()
        image_rows = [
            (r.path, r.content_hash, r.size, r.mtime, r.width, r.height, Jsonb(r.metadata), now)
            for r in (records[i] for i in order)
        ]
        model_id = int(model_id)

        def work(db: psycopg.Connection) -> list[int]:
            ids = [0] * len(records)
            with db.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO images (path, content_hash, size, mtime, width, height, metadata,"
                    " added_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (path) DO"
                    " UPDATE SET content_hash = EXCLUDED.content_hash, size = EXCLUDED.size,"
                    " mtime = EXCLUDED.mtime, width = EXCLUDED.width, height = EXCLUDED.height"
                    " RETURNING id",
                    image_rows,
                    returning=True,
                )
                for position in order:
                    ids[position] = int(cursor.fetchone()[0])
                    cursor.nextset()
                # A changed file invalidates the vectors every other model made of it.
                cursor.execute(
                    "DELETE FROM vectors WHERE image_id = ANY(%s::bigint[]) AND model_id <> %s",
                    (sorted(set(ids)), model_id),
                )
                cursor.executemany(
                    "INSERT INTO vectors (image_id, model_id, vector) VALUES (%s, %s, %s) "
                    "ON CONFLICT (model_id, image_id) DO UPDATE SET vector = EXCLUDED.vector",
                    [(ids[i], model_id, self._encode(vectors[i])) for i in order],
                )
                cursor.execute(
                    "DELETE FROM failures WHERE path = ANY(%s::text[])",
                    ([r.path for r in records],),
                )
                self._bump_generation(cursor)
            return ids

        return self._write(work)

    def touch(self, image_id: int, size: int, mtime: float) -> None:
        """Record a new size/mtime for a file whose content hash did not change."""
        self._write(
            lambda db: db.execute(
                "UPDATE images SET size = %s, mtime = %s WHERE id = %s",
                (size, mtime, int(image_id)),
            )
        )

    def remove(self, ids: Iterable[int]) -> int:
        """Delete images (and their vectors) by id; returns how many existed."""
        ids = sorted({int(i) for i in ids})
        if not ids:
            return 0

        def work(db: psycopg.Connection) -> int:
            with db.cursor() as cursor:
                cursor.execute("DELETE FROM images WHERE id = ANY(%s::bigint[])", (ids,))
                removed = cursor.rowcount
                if removed:
                    self._bump_generation(cursor)
            return removed

        return self._write(work)

    def ids_for_paths(self, paths: Iterable[str]) -> dict[str, int]:
        """Path -> id for the given paths that are in the catalog."""
        paths = list(paths)
        if not paths:
            return {}
        rows = self._rows("SELECT path, id FROM images WHERE path = ANY(%s::text[])", (paths,))
        return dict(rows)

    def images(self, ids: Sequence[int]) -> dict[int, ImageRecord]:
        """Records of the given ids (unknown ids are left out)."""
        ids = [int(i) for i in ids]
        if not ids:
            return {}
        rows = self._rows(
            "SELECT id, path, content_hash, size, mtime, width, height, metadata FROM images "
            "WHERE id = ANY(%s::bigint[])",
            (ids,),
        )
        return {
            i: ImageRecord(path, h, size, mtime, w, hgt, meta, id=i)
            for i, path, h, size, mtime, w, hgt, meta in rows
        }

    def ids_missing_vectors(self, model_id: int) -> list[tuple[int, str]]:
        """(id, path) of images that have no vector from this model yet."""
        rows = self._rows(
            "SELECT i.id, i.path FROM images i WHERE NOT EXISTS "
            "(SELECT 1 FROM vectors v WHERE v.image_id = i.id AND v.model_id = %s) ORDER BY i.id",
            (int(model_id),),
        )
        return [(int(i), p) for i, p in rows]

    def vectors(self, model_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 [n], vectors float32 [n, dim]) of every image this model embedded."""
        dim = self.model_dim(model_id)
        rows = self._rows(
            "SELECT image_id, vector FROM vectors WHERE model_id = %s ORDER BY image_id",
            (int(model_id),),
            binary=True,
        )
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        return ids, self._decode([r[1] for r in rows], dim)

    def vector(self, image_id: int, model_id: int) -> np.ndarray | None:
        """One image's vector from one model, or None when it has none."""
        rows = self._rows(
            "SELECT vector FROM vectors WHERE image_id = %s AND model_id = %s",
            (int(image_id), int(model_id)),
            binary=True,
        )
        if not rows:
            return None
        blob = rows[0][0]
        dim = (len(blob) - 4) // 4 if self.vector_storage == "pgvector" else len(blob) // 4
        return self._decode([blob], dim)[0]

    def vectors_for(self, ids: Sequence[int], model_id: int) -> np.ndarray:
        """float32 [len(ids), dim]: the vectors of these images in the given order."""
        dim = self.model_dim(model_id)
        wanted = [int(i) for i in ids]
        rows = self._rows(
            "SELECT image_id, vector FROM vectors WHERE model_id = %s "
            "AND image_id = ANY(%s::bigint[])",
            (int(model_id), wanted),
            binary=True,
        )
        found = dict(rows)
        missing = [i for i in wanted if i not in found]
        if missing:
            raise CatalogError(f"no vectors stored for images {missing[:5]}")
        return self._decode([found[i] for i in wanted], dim)

    def count(self) -> int:
        """Number of images in the catalog."""
        return int(self._one("SELECT COUNT(*) FROM images")[0])

    def update_metadata(self, image_id: int, metadata: dict[str, Any]) -> None:
        """Merge keys into an image's metadata."""
        from psycopg.types.json import Jsonb

        updated = self._write(
            lambda db: (
                db.execute(
                    "UPDATE images SET metadata = metadata || %s WHERE id = %s",
                    (Jsonb(metadata), int(image_id)),
                ).rowcount
            )
        )
        if not updated:
            raise CatalogError(f"no image with id {image_id}")

    def paths(self) -> dict[str, int]:
        """Path -> id of every image."""
        return dict(self._rows("SELECT path, id FROM images"))

    # -- local features --------------------------------------------------------------------

    def store_local_features(
        self,
        items: Sequence[tuple[int, str, bytes]],
        *,
        content_hashes: Mapping[int, str] | None = None,
    ) -> int:
        """See :meth:`lookalike.catalog.base.Catalog.store_local_features`."""
        rows = local_feature_rows(items)
        if not rows:
            return 0

        def work(db: psycopg.Connection) -> int:
            # The share lock keeps another writer from changing the content in between.
            current = dict(
                db.execute(
                    "SELECT id, content_hash FROM images WHERE id = ANY(%s::bigint[]) "
                    "ORDER BY id FOR SHARE",
                    (sorted({r[0] for r in rows}),),
                ).fetchall()
            )
            keep = fresh_local_feature_rows(rows, current, content_hashes)
            with db.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO local_features (image_id, kind, data) VALUES (%s, %s, %s) "
                    "ON CONFLICT (image_id) DO UPDATE SET kind = EXCLUDED.kind,"
                    " data = EXCLUDED.data",
                    keep,
                )
            return len(keep)

        return self._write(work)

    def local_features(self, ids: Iterable[int], kind: str) -> dict[int, bytes]:
        """Id -> serialised local features of this kind, for the given ids that have them."""
        ids = [int(i) for i in ids]
        if not ids:
            return {}
        rows = self._rows(
            "SELECT image_id, data FROM local_features "
            "WHERE kind = %s AND image_id = ANY(%s::bigint[])",
            (kind, ids),
        )
        return {int(i): bytes(data) for i, data in rows}

    def ids_missing_local_features(self, kind: str) -> list[tuple[int, str]]:
        """(id, path) of images without local features of this kind."""
        rows = self._rows(
            "SELECT i.id, i.path FROM images i WHERE NOT EXISTS (SELECT 1 FROM local_features f"
            " WHERE f.image_id = i.id AND f.kind = %s) ORDER BY i.id",
            (kind,),
        )
        return [(int(i), p) for i, p in rows]

    def local_features_summary(self) -> dict[str, tuple[int, int]]:
        """Kind -> (images, total bytes) of the stored local features."""
        rows = self._rows(
            "SELECT kind, COUNT(*), COALESCE(SUM(octet_length(data)), 0) FROM local_features "
            'GROUP BY kind ORDER BY kind COLLATE "C"'
        )
        return {kind: (int(n), int(size)) for kind, n, size in rows}

    # -- failures and change tracking ------------------------------------------------------

    def record_failure(self, path: str, reason: str) -> None:
        """Remember a file that could not be indexed, for the run summary and ``info``."""
        self._write(
            lambda db: db.execute(
                "INSERT INTO failures (path, reason, at) VALUES (%s, %s, %s) "
                "ON CONFLICT (path) DO UPDATE SET reason = EXCLUDED.reason, at = EXCLUDED.at",
                (path, reason, time.time()),
            )
        )

    def failures(self) -> list[tuple[str, str]]:
        """(path, reason) of every file that failed in its latest attempt."""
        return [tuple(row) for row in self._rows("SELECT path, reason FROM failures ORDER BY path")]

    def clear_failures(self, paths: Iterable[str]) -> None:
        """Forget failures of files that are gone."""
        paths = list(paths)
        if paths:
            self._write(
                lambda db: db.execute("DELETE FROM failures WHERE path = ANY(%s::text[])", (paths,))
            )

    @property
    def generation(self) -> int:
        """A counter bumped by every change to images or vectors, by any process sharing the
        catalog; indexes compare it to know whether they are stale."""
        return int(self.get_setting("generation", "0") or 0)

    def _bump_generation(self, cursor: psycopg.Cursor) -> None:
        # The row lock taken here is held until commit, so concurrent writers get consecutive,
        # distinct generations in commit order.
        row = cursor.execute(
            "INSERT INTO settings (key, value) VALUES ('generation', '1') ON CONFLICT (key) "
            "DO UPDATE SET value = (settings.value::bigint + 1)::text RETURNING value"
        ).fetchone()
        self.last_written_generation = int(row[0])

    # -- vectors in and out ----------------------------------------------------------------

    def _encode(self, vector: np.ndarray) -> np.ndarray | bytes:
        if self.vector_storage == "pgvector":
            return vector  # dumped by the registered binary dumper
        return np.ascontiguousarray(vector, dtype="<f4").tobytes()

    def _decode(self, blobs: list[bytes], dim: int) -> np.ndarray:
        """float32 [len(blobs), dim] from column values as the server sent them in binary."""
        if self.vector_storage == "pgvector":
            return decode_pgvectors(blobs, dim)
        matrix = np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(blobs), dim)
        return matrix.astype(np.float32)


def encode_pgvector(vector: np.ndarray) -> bytes:
    """pgvector's binary form: dimension and a reserved word (uint16 each), then big-endian
    float32 values."""
    values = np.ascontiguousarray(vector, dtype=">f4").reshape(-1)
    return struct.pack(">HH", len(values), 0) + values.tobytes()


def decode_pgvectors(blobs: list[bytes], dim: int) -> np.ndarray:
    """float32 [n, dim] from pgvector binary values, all of dimension ``dim``."""
    if any(len(blob) != 4 + 4 * dim for blob in blobs):
        raise CatalogError(f"stored vectors do not have the model's dimension {dim}")
    # The 4-byte header has the size of one value: drop it as a column.
    matrix = np.frombuffer(b"".join(blobs), dtype=">f4").reshape(len(blobs), dim + 1)
    return matrix[:, 1:].astype(np.float32)


def _unreachable(error: Exception) -> bool:
    """Whether a psycopg error means the server cannot be reached or the connection is gone
    (rather than a bad statement or a refused change)."""
    import psycopg
    from psycopg import errors

    if isinstance(error, errors.TransactionRollback):  # a lost race, retried by writers
        return False
    return isinstance(error, psycopg.OperationalError | psycopg.InterfaceError)


def redact_url(url: str) -> str:
    """A connection URL without its password, fit for messages and files."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"  # an IPv6 address
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}@" if parts.username else ""
    return urlunsplit(parts._replace(netloc=user + host))
