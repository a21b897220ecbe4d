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
import uuid
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from lookalike.catalog.base import (
    FileState,
    ImageRecord,
    checked_vectors,
    checksum_summary,
    corrupt_vectors,
    decode_checked,
    fresh_local_feature_rows,
    local_feature_rows,
    model_summaries,
    planned_moves,
    vector_checksum,
)
from lookalike.catalog.paths import from_catalog, remapped, to_catalog
from lookalike.catalog.postgres_schema import MIGRATIONS, VERSION_TABLE
from lookalike.catalog.schema import PYTHON_STEPS, SCHEMA_VERSION
from lookalike.encoders.base import EncoderIdentity
from lookalike.errors import CatalogError, CatalogUnavailableError, ModelMismatchError
from lookalike.exif import EXIF_KEYS

if TYPE_CHECKING:
    import psycopg

T = TypeVar("T")

VECTOR_STORAGES = ("auto", "pgvector", "bytea")

# Any fixed number: lookalike processes migrating the same database take turns on it.
_MIGRATION_LOCK = 0x6C6F6F6B
_WRITE_ATTEMPTS = 5
_VERIFY_PAGE = 5000  # vectors checked per statement by verify_vectors and migration 4
# A re-indexed file's metadata: what its file says now (EXIF keys, dropped when the file no
# longer has them) over what was stored, so that metadata from elsewhere (a CSV) is kept.
_MERGED_METADATA = (
    f"(images.metadata - ARRAY[{', '.join(repr(k) for k in EXIF_KEYS)}]::text[])"
    " || EXCLUDED.metadata"
)


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
        self.last_written_state: tuple[int, str] | None = None
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
                    if number + 1 in PYTHON_STEPS:
                        self._python_step(db, number + 1)
                    db.execute(f"UPDATE {VERSION_TABLE} SET version = %s", (number + 1,))
        except psycopg.Error as error:
            raise self._failure(error, f"not a usable lookalike catalog ({error})") from error

    def _python_step(self, db: psycopg.Connection, version: int) -> None:
        """What migration ``version`` computes in Python (see ``schema.PYTHON_STEPS``), in the
        migration's transaction; pgvector values come as raw binary here (no loader yet)."""
        if version != 4:
            raise AssertionError(f"no Python step for version {version}")
        typname = db.execute(
            "SELECT t.typname FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
            "WHERE a.attrelid = 'vectors'::regclass AND a.attname = 'vector'"
        ).fetchone()
        pgvector = typname is not None and typname[0] == "vector"
        last: tuple[int, int] = (-1, -1)
        while rows := db.execute(
            "SELECT model_id, image_id, vector FROM vectors WHERE (model_id, image_id) > (%s, %s)"
            " ORDER BY model_id, image_id LIMIT %s",
            (*last, _VERIFY_PAGE),
            binary=True,
        ).fetchall():
            with db.cursor() as cursor:
                cursor.executemany(
                    "UPDATE vectors SET checksum = %s WHERE model_id = %s AND image_id = %s",
                    [(stored_checksum(blob, pgvector), m, i) for m, i, blob in rows],
                )
            last = (int(rows[-1][0]), int(rows[-1][1]))
        with db.cursor() as cursor:
            images: list[tuple[str, int]] = remapped(
                db.execute("SELECT id, path FROM images").fetchall()
            )
            cursor.executemany("UPDATE images SET path = %s WHERE id = %s", images)
            failed: list[tuple[str, str]] = remapped(
                db.execute("SELECT path, path FROM failures").fetchall()
            )
            cursor.executemany("UPDATE failures SET path = %s WHERE path = %s", failed)

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
        vector_oid = info.oid  # a class body does not see the narrowing of ``info``

        class VectorDumper(Dumper):
            format = Format.BINARY
            oid = vector_oid

            def dump(self, obj: np.ndarray) -> bytes:
                return encode_pgvector(obj)

        class RawLoader(Loader):
            format = Format.BINARY

            def load(self, data: Any) -> bytes:
                return bytes(data)

        self._db.adapters.register_dumper(np.ndarray, VectorDumper)
        self._db.adapters.register_loader(info.oid, RawLoader)

    # -- statements ------------------------------------------------------------------------

    def _rows(
        self, sql: str, params: Sequence[Any] = (), *, binary: bool = False
    ) -> list[tuple[Any, ...]]:
        import psycopg

        with self._lock:
            try:
                return self._connection().execute(sql, params, binary=binary).fetchall()
            except psycopg.Error as error:
                raise self._failure(error) from error

    def _one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...]:
        rows = self._rows(sql, params)
        return rows[0] if rows else ()

    def run(self, work: Callable[[psycopg.Connection], T], *, own: bool = False) -> T:
        """Run ``work`` on this catalog's connection (autocommit: ``work`` opens any
        transaction itself) under its lock, psycopg errors raised as typed ones: the pgvector
        index's statements (:mod:`lookalike.catalog.pgvector_index`). ``own``: on a new
        connection of its own instead, closed afterwards, for long work (building an index)
        that should hold neither this object's connection nor its lock."""
        import psycopg

        if own:
            db = self._connect()
            try:
                return work(db)
            except psycopg.Error as error:
                raise self._failure(error) from error
            finally:
                db.close()
        with self._lock:
            try:
                return work(self._connection())
            except psycopg.Error as error:
                raise self._failure(error) from error

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

    def set_settings(self, values: Mapping[str, str | None]) -> None:
        """Set (or, for None, delete) several settings in one transaction that also bumps the
        generation, so every process sees them change together and notices."""

        def work(db: psycopg.Connection) -> None:
            with db.cursor() as cursor:
                for key, value in values.items():
                    if value is None:
                        cursor.execute("DELETE FROM settings WHERE key = %s", (key,))
                    else:
                        cursor.execute(
                            "INSERT INTO settings (key, value) VALUES (%s, %s) "
                            "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                            (key, value),
                        )
                self._bump_generation(cursor)

        self._write(work)

    def register_model(self, identity: EncoderIdentity) -> int:
        """The id under which vectors of this encoder identity are stored (created if new)."""
        row = self._one("SELECT id, dim FROM models WHERE key = %s", (identity.key,))
        if not row:

            def insert(db: psycopg.Connection) -> tuple[Any, ...]:
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
                found = db.execute(
                    "SELECT id, dim FROM models WHERE key = %s", (identity.key,)
                ).fetchone()
                assert found is not None  # inserted just now, or by the other server
                return found

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
            (to_catalog(prefix),),
        )
        return {
            from_catalog(path): FileState(i, size, mtime, h) for path, i, size, mtime, h in rows
        }

    def file_states_by_hash(self, hashes: Iterable[str]) -> dict[str, FileState]:
        """See :meth:`lookalike.catalog.base.Catalog.file_states_by_hash`."""
        wanted = sorted(set(hashes))
        if not wanted:
            return {}
        rows = self._rows(
            "SELECT path, id, size, mtime, content_hash FROM images"
            " WHERE content_hash = ANY(%s::text[])",
            (wanted,),
        )
        return {
            from_catalog(path): FileState(i, size, mtime, h) for path, i, size, mtime, h in rows
        }

    def store(
        self, records: Sequence[ImageRecord], vectors: np.ndarray, model_id: int
    ) -> list[int]:
        """Insert or update images by path together with their vectors, in one transaction.

        A file whose content hash changed loses every model's vectors of it (the schema's
        trigger); storing an unchanged file for one model keeps the other models' vectors."""
        from psycopg.types.json import Jsonb

        vectors = checked_vectors(records, vectors, self.model_dim(model_id))
        if not records:
            return []
        paths = [to_catalog(r.path) for r in records]
        # Rows are locked in path order, the same in every writer, so writers never deadlock.
        order = sorted(range(len(records)), key=lambda i: paths[i])
        now = time.time()
        image_rows = [
            (paths[i], r.content_hash, r.size, r.mtime, r.width, r.height, Jsonb(r.metadata), now)
            for i, r in ((i, records[i]) for i in order)
        ]
        model_id = int(model_id)

        def work(db: psycopg.Connection) -> list[int]:
            ids = [0] * len(records)
            with db.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO images (path, content_hash, size, mtime, width, height, metadata,"
                    " added_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (path) DO"
                    " UPDATE SET content_hash = EXCLUDED.content_hash, size = EXCLUDED.size,"
                    " mtime = EXCLUDED.mtime, width = EXCLUDED.width, height = EXCLUDED.height,"
                    f" metadata = {_MERGED_METADATA} RETURNING id",
                    image_rows,
                    returning=True,
                )
                for position in order:
                    inserted = cursor.fetchone()
                    assert inserted is not None  # RETURNING gives each row's id
                    ids[position] = int(inserted[0])
                    cursor.nextset()
                cursor.executemany(
                    "INSERT INTO vectors (image_id, model_id, vector, checksum)"
                    " VALUES (%s, %s, %s, %s) ON CONFLICT (model_id, image_id) DO UPDATE"
                    " SET vector = EXCLUDED.vector, checksum = EXCLUDED.checksum",
                    [
                        (ids[i], model_id, self._encode(vectors[i]), vector_checksum(vectors[i]))
                        for i in order
                    ],
                )
                cursor.execute("DELETE FROM failures WHERE path = ANY(%s::text[])", (paths,))
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

    def move_paths(self, moves: Mapping[str, str]) -> dict[str, int]:
        """See :meth:`lookalike.catalog.base.Catalog.move_paths`."""
        pairs = planned_moves(moves)
        if not pairs:
            return {}

        def work(db: psycopg.Connection) -> list[tuple[str, str, int]]:
            with db.cursor() as cursor:
                # Rows are locked in path order, as ``store`` does, so writers never deadlock.
                rows = cursor.execute(
                    "SELECT path, id FROM images WHERE path = ANY(%s::text[])"
                    " ORDER BY path FOR UPDATE",
                    ([old for old, _ in pairs],),
                ).fetchall()
                ids = {path: int(i) for path, i in rows}
                present = [(old, new, ids[old]) for old, new in pairs if old in ids]
                if not present:
                    return []
                vacated = {old for old, _, _ in present}
                taken = [new for _, new, _ in present if new not in vacated]
                cursor.execute("DELETE FROM images WHERE path = ANY(%s::text[])", (taken,))
                replaced = cursor.rowcount
                # Every image leaves its path first, so a swap or a chain never meets a path
                # that is still taken (paths are unique).
                token = uuid.uuid4().hex
                cursor.executemany(
                    "UPDATE images SET path = %s WHERE id = %s",
                    [(f"moving:{token}:{i}", i) for _, _, i in present],
                )
                cursor.executemany(
                    "UPDATE images SET path = %s WHERE id = %s", [(n, i) for _, n, i in present]
                )
                cursor.execute(
                    "DELETE FROM failures WHERE path = ANY(%s::text[])",
                    ([new for _, new, _ in present],),
                )
                if replaced:
                    self._bump_generation(cursor)
            return present

        return {from_catalog(new): i for _, new, i in self._write(work)}

    def move_path(self, old: str, new: str) -> int | None:
        """See :meth:`lookalike.catalog.base.Catalog.move_path`."""
        return self.move_paths({old: new}).get(new)

    def ids_for_paths(self, paths: Iterable[str]) -> dict[str, int]:
        """Path -> id for the given paths that are in the catalog."""
        asked = {to_catalog(p): p for p in paths}
        if not asked:
            return {}
        rows = self._rows(
            "SELECT path, id FROM images WHERE path = ANY(%s::text[])", (list(asked),)
        )
        return {asked[path]: int(i) for path, i in rows}

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
            i: ImageRecord(from_catalog(path), h, size, mtime, w, hgt, meta, id=i)
            for i, path, h, size, mtime, w, hgt, meta in rows
        }

    def ids_missing_vectors(self, model_id: int) -> list[tuple[int, str]]:
        """(id, path) of images that have no vector from this model yet."""
        rows = self._rows(
            "SELECT i.id, i.path FROM images i WHERE NOT EXISTS "
            "(SELECT 1 FROM vectors v WHERE v.image_id = i.id AND v.model_id = %s) ORDER BY i.id",
            (int(model_id),),
        )
        return [(int(i), from_catalog(p)) for i, p in rows]

    def vectors(self, model_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 [n], vectors float32 [n, dim]) of every image this model embedded;
        ``CorruptVectorError`` when any fails its checksum."""
        dim = self.model_dim(model_id)
        rows = self._rows(
            "SELECT image_id, vector, COALESCE(checksum, -1) FROM vectors WHERE model_id = %s"
            " ORDER BY image_id",
            (int(model_id),),
            binary=True,
        )
        ids, blobs, checksums = zip(*rows, strict=True) if rows else ((), (), ())
        matrix, failed = self._decode_checked(blobs, checksums, dim)
        found = np.array(ids, dtype=np.int64)
        if failed.any():
            raise corrupt_vectors(self.location, found[failed].tolist(), model_id)
        return found, matrix

    def vector(self, image_id: int, model_id: int) -> np.ndarray | None:
        """One image's vector from one model, or None when it has none;
        ``CorruptVectorError`` when it fails its checksum."""
        rows = self._rows(
            "SELECT vector, COALESCE(checksum, -1) FROM vectors"
            " WHERE image_id = %s AND model_id = %s",
            (int(image_id), int(model_id)),
            binary=True,
        )
        if not rows:
            return None
        blob, checksum = rows[0]
        dim = (len(blob) - 4) // 4 if self.vector_storage == "pgvector" else len(blob) // 4
        matrix, failed = self._decode_checked([blob], [checksum], dim)
        if failed.any():
            raise corrupt_vectors(self.location, [image_id], model_id)
        vector: np.ndarray = matrix[0]
        return vector

    def vectors_for(self, ids: Sequence[int], model_id: int) -> np.ndarray:
        """float32 [len(ids), dim]: the vectors of these images in the given order;
        ``CorruptVectorError`` when any fails its checksum."""
        dim = self.model_dim(model_id)
        wanted = [int(i) for i in ids]
        rows = self._rows(
            "SELECT image_id, vector, COALESCE(checksum, -1) FROM vectors WHERE model_id = %s "
            "AND image_id = ANY(%s::bigint[])",
            (int(model_id), wanted),
            binary=True,
        )
        found = {int(i): (blob, checksum) for i, blob, checksum in rows}
        missing = [i for i in wanted if i not in found]
        if missing:
            raise CatalogError(f"no vectors stored for images {missing[:5]}")
        matrix, failed = self._decode_checked(
            [found[i][0] for i in wanted], [found[i][1] for i in wanted], dim
        )
        if failed.any():
            raise corrupt_vectors(self.location, np.array(wanted)[failed].tolist(), model_id)
        return matrix

    def verify_vectors(self, model_id: int | None = None) -> list[int]:
        """Ids of the images whose stored vectors (of ``model_id``, else of every model) fail
        their checksum or have the wrong length, in order; reads every vector once."""
        if model_id is None:
            models = [(int(m), int(d)) for m, d in self._rows("SELECT id, dim FROM models")]
        else:
            models = [(int(model_id), self.model_dim(model_id))]
        bad: set[int] = set()
        for model, dim in models:
            last = -1
            while rows := self._rows(
                "SELECT image_id, vector, COALESCE(checksum, -1) FROM vectors"
                " WHERE model_id = %s AND image_id > %s ORDER BY image_id LIMIT %s",
                (model, last, _VERIFY_PAGE),
                binary=True,
            ):
                ids, blobs, checksums = zip(*rows, strict=True)
                _, failed = self._decode_checked(blobs, checksums, dim)
                bad.update(np.array(ids, dtype=np.int64)[failed].tolist())
                last = int(ids[-1])
        return sorted(bad)

    def drop_vectors(self, ids: Iterable[int], model_id: int) -> int:
        """Forget these images' vectors of one model (so that they are embedded again, as
        ``ids_missing_vectors`` then lists them); returns how many were stored."""
        ids = sorted({int(i) for i in ids})
        if not ids:
            return 0

        def work(db: psycopg.Connection) -> int:
            with db.cursor() as cursor:
                cursor.execute(
                    "DELETE FROM vectors WHERE model_id = %s AND image_id = ANY(%s::bigint[])",
                    (int(model_id), ids),
                )
                dropped = cursor.rowcount
                if dropped:
                    self._bump_generation(cursor)
            return dropped

        return self._write(work)

    def drop_vectors_except(self, model_id: int) -> int:
        """Forget the vectors of every model but ``model_id`` (after a model switch);
        returns how many were stored."""

        def work(db: psycopg.Connection) -> int:
            with db.cursor() as cursor:
                cursor.execute("DELETE FROM vectors WHERE model_id != %s", (int(model_id),))
                dropped = cursor.rowcount
                if dropped:
                    self._bump_generation(cursor)
            return dropped

        return self._write(work)

    def integrity(self) -> list[str]:
        """Problems found: vectors that fail their checksum; empty when the catalog is
        healthy (the server itself keeps its pages consistent)."""
        return checksum_summary(self.verify_vectors())

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
        return {from_catalog(path): int(i) for path, i in self._rows("SELECT path, id FROM images")}

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
            current: dict[int, str] = dict(
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
                    "ON CONFLICT (image_id, kind) DO UPDATE SET data = EXCLUDED.data",
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
        return [(int(i), from_catalog(p)) for i, p in rows]

    def ids_with_local_features(self, kind: str) -> list[int]:
        """Ids of the images with local features of this kind, in order."""
        rows = self._rows(
            "SELECT image_id FROM local_features WHERE kind = %s ORDER BY image_id", (kind,)
        )
        return [int(i) for (i,) in rows]

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
                (to_catalog(path), reason, time.time()),
            )
        )

    def failures(self) -> list[tuple[str, str]]:
        """(path, reason) of every file that failed in its latest attempt."""
        rows = self._rows("SELECT path, reason FROM failures ORDER BY path")
        return [(from_catalog(path), reason) for path, reason in rows]

    def clear_failures(self, paths: Iterable[str]) -> None:
        """Forget failures of files that are gone."""
        paths = [to_catalog(p) for p in paths]
        if paths:
            self._write(
                lambda db: db.execute("DELETE FROM failures WHERE path = ANY(%s::text[])", (paths,))
            )

    @property
    def generation(self) -> int:
        """A counter bumped by every change to images or vectors, by any process sharing the
        catalog; indexes compare it to know whether they are stale."""
        return int(self.get_setting("generation", "0") or 0)

    @property
    def state(self) -> tuple[int, str]:
        """(generation, token), read together by one statement: the token is drawn afresh
        with every generation bump, so a catalog restored from a backup and changed again,
        whose generation may equal an older one, still has a state of its own."""
        rows = dict(
            self._rows("SELECT key, value FROM settings WHERE key IN ('generation', 'state')")
        )
        return int(rows.get("generation") or 0), str(rows.get("state") or "")

    def _bump_generation(self, cursor: psycopg.Cursor) -> None:
        # The row lock taken here is held until commit, so concurrent writers get consecutive,
        # distinct generations in commit order.
        row = cursor.execute(
            "INSERT INTO settings (key, value) VALUES ('generation', '1') ON CONFLICT (key) "
            "DO UPDATE SET value = (settings.value::bigint + 1)::text RETURNING value"
        ).fetchone()
        assert row is not None  # the upsert always returns its row
        token = uuid.uuid4().hex
        cursor.execute(
            "INSERT INTO settings (key, value) VALUES ('state', %s) ON CONFLICT (key) "
            "DO UPDATE SET value = EXCLUDED.value",
            (token,),
        )
        self.last_written_generation = int(row[0])
        self.last_written_state = (int(row[0]), token)

    # -- vectors in and out ----------------------------------------------------------------

    def _encode(self, vector: np.ndarray) -> np.ndarray | bytes:
        if self.vector_storage == "pgvector":
            return vector  # dumped by the registered binary dumper
        return np.ascontiguousarray(vector, dtype="<f4").tobytes()

    def _decode_checked(
        self, blobs: Sequence[bytes], checksums: Sequence[int], dim: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(float32 [len(blobs), dim], bool [len(blobs)] failing their checksum) from column
        values as the server sent them in binary."""
        if self.vector_storage == "pgvector":
            return decode_checked(blobs, checksums, dim, header=4, byte_order=">")
        return decode_checked(blobs, checksums, dim)


def encode_pgvector(vector: np.ndarray) -> bytes:
    """pgvector's binary form: dimension and a reserved word (uint16 each), then big-endian
    float32 values."""
    values = np.ascontiguousarray(vector, dtype=">f4").reshape(-1)
    return struct.pack(">HH", len(values), 0) + values.tobytes()


def stored_checksum(blob: bytes, pgvector: bool) -> int:
    """The checksum of a stored vector value as the server sends it in binary: CRC32 of its
    float32 values, little-endian (a pgvector value is a header and big-endian values)."""
    if not pgvector:
        return zlib.crc32(blob)
    return zlib.crc32(np.frombuffer(blob, dtype=">f4", offset=4).astype("<f4").tobytes())


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
