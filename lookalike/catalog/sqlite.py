"""The SQLite catalog: images, their metadata and vectors, in one file that needs no server."""

from __future__ import annotations

import functools
import json
import sqlite3
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import numpy as np

from lookalike.catalog.base import (
    FileState,
    ImageRecord,
    checked_vectors,
    checksum_summary,
    chunks,
    corrupt_vectors,
    decode_checked,
    fresh_local_feature_rows,
    local_feature_rows,
    model_summaries,
    planned_moves,
)
from lookalike.catalog.paths import from_catalog, remapped, to_catalog
from lookalike.catalog.schema import MIGRATIONS, PYTHON_STEPS, SCHEMA_VERSION
from lookalike.encoders.base import EncoderIdentity
from lookalike.errors import (
    CatalogCorruptError,
    CatalogError,
    CatalogStorageError,
    CatalogUnavailableError,
    ModelMismatchError,
)
from lookalike.exif import EXIF_KEYS

# SQLite result codes that mean the file cannot be opened or read now, not that it is wrong.
_UNAVAILABLE = {"SQLITE_CANTOPEN", "SQLITE_IOERR", "SQLITE_PERM", "SQLITE_BUSY", "SQLITE_LOCKED"}
# ... and those that mean the file is damaged (or not a database at all).
_CORRUPT = {"SQLITE_CORRUPT", "SQLITE_NOTADB", "SQLITE_FORMAT"}
# ... and those that mean its disk is full (the shared-memory file could not grow, too).
_FULL = {"SQLITE_FULL", "SQLITE_IOERR_SHMSIZE"}
_VERIFY_PAGE = 5000  # vectors checked per statement by verify_vectors
# A re-indexed file's metadata: what its file says now (EXIF keys, dropped when the file no
# longer has them) over what was stored, so that metadata from elsewhere (a CSV) is kept.
_MERGED_METADATA = (
    f"json_patch(json_remove(images.metadata, {', '.join(repr('$.' + k) for k in EXIF_KEYS)}),"
    " excluded.metadata)"
)

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _guarded(
    method: Callable[Concatenate[SqliteCatalog, _P], _R],
) -> Callable[Concatenate[SqliteCatalog, _P], _R]:
    """``method`` raising lookalike's typed errors instead of SQLite's (see ``_typed``)."""

    @functools.wraps(method)
    def guarded(catalog: SqliteCatalog, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(catalog, *args, **kwargs)
        except sqlite3.Error as error:
            raise catalog._typed(error) from error

    return guarded


class SqliteCatalog:
    """Catalog backed by one SQLite file (WAL mode, so readers never block the indexer).

    Every public method raises lookalike's typed errors, never SQLite's: a damaged file (a
    corrupt page, a truncated file) ``CatalogCorruptError``, one that cannot be opened or read
    now ``CatalogUnavailableError``.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.last_written_generation: int | None = None
        self.last_written_state: tuple[int, str] | None = None
        try:
            self._db = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False)
        except sqlite3.Error as error:
            raise self._typed(error, "not a usable lookalike catalog: ") from error
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
        except sqlite3.Error as error:
            self._db.close()
            raise self._typed(error, "not a usable lookalike catalog: ") from error
        except BaseException:
            self._db.close()
            raise

    def _typed(self, error: sqlite3.Error, context: str = "") -> CatalogError:
        """SQLite's ``error`` as lookalike's: CatalogCorruptError for a damaged file,
        CatalogUnavailableError for one that cannot be opened or read now, CatalogStorageError
        for a full disk, else CatalogError; each names the file."""
        code = str(getattr(error, "sqlite_errorname", ""))  # SQLITE_IOERR_READ: SQLITE_IOERR
        family = "_".join(code.split("_")[:2])
        if family in _FULL or code in _FULL:
            return CatalogStorageError(
                f"no space left on device writing the catalog {self.path} ({error}): free some "
                "space, or move the collection (-c) or its catalog (--db); what was stored "
                "before this change is kept (an index run goes on where it stopped)",
                self.path,
            )
        if family in _UNAVAILABLE:
            return CatalogUnavailableError(f"{self.path}: {context}cannot be read now ({error})")
        if family in _CORRUPT or type(error) is sqlite3.DatabaseError:
            return CatalogCorruptError(
                f"{self.path}: {context}the catalog file is damaged ({error}); restore a "
                "backup, or run `lookalike check --repair`"
            )
        return CatalogError(f"{self.path}: {context}{error}")

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection; the object is unusable afterwards."""
        self._db.close()

    def __enter__(self) -> SqliteCatalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def location(self) -> str:
        """Where the catalog lives: the SQLite file's path."""
        return str(self.path)

    @property
    @_guarded
    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        version = self.schema_version
        if version > SCHEMA_VERSION:
            raise CatalogError(
                f"{self.path} has schema version {version}, newer than this lookalike "
                f"understands ({SCHEMA_VERSION}); upgrade lookalike"
            )
        for number in range(version, SCHEMA_VERSION):
            with self._transaction():
                self._db.executescript("BEGIN;" + MIGRATIONS[number])
                if number + 1 in PYTHON_STEPS:
                    self._python_step(number + 1)
                self._db.execute(f"PRAGMA user_version = {number + 1}")

    def _python_step(self, version: int) -> None:
        """What migration ``version`` computes in Python (see ``schema.PYTHON_STEPS``)."""
        if version != 4:
            raise AssertionError(f"no Python step for version {version}")
        db = self._db
        last = (-1, -1)
        while rows := db.execute(
            "SELECT model_id, image_id, vector FROM vectors WHERE (model_id, image_id) > (?, ?)"
            " ORDER BY model_id, image_id LIMIT ?",
            (*last, _VERIFY_PAGE),
        ).fetchall():
            db.executemany(
                "UPDATE vectors SET checksum = ? WHERE model_id = ? AND image_id = ?",
                [(zlib.crc32(blob), model, image) for model, image, blob in rows],
            )
            last = rows[-1][:2]
        for new, image_id in remapped(db.execute("SELECT id, path FROM images")):
            db.execute("UPDATE images SET path = ? WHERE id = ?", (new, image_id))
        for new, old in remapped(db.execute("SELECT path, path FROM failures")):
            db.execute("UPDATE failures SET path = ? WHERE path = ?", (new, old))

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        # Each write is one transaction, so a killed process leaves whole batches or nothing.
        try:
            yield self._db
            self._db.commit()
        except BaseException:
            self._db.rollback()
            raise

    # -- settings and models ---------------------------------------------------------------

    @_guarded
    def get_setting(self, key: str, default: str | None = None) -> str | None:
        """A value from the settings table."""
        row = self._db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    @_guarded
    def set_setting(self, key: str, value: str) -> None:
        """Store a value in the settings table."""
        with self._transaction() as db:
            db.execute(
                "INSERT INTO settings (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    @_guarded
    def set_settings(self, values: Mapping[str, str | None]) -> None:
        """Set (or, for None, delete) several settings in one transaction that also bumps the
        generation, so every process sees them change together and notices."""
        with self._transaction() as db:
            for key, value in values.items():
                if value is None:
                    db.execute("DELETE FROM settings WHERE key = ?", (key,))
                else:
                    db.execute(
                        "INSERT INTO settings (key, value) VALUES (?, ?) "
                        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                        (key, value),
                    )
            self._bump_generation(db)

    @_guarded
    def register_model(self, identity: EncoderIdentity) -> int:
        """The id under which vectors of this encoder identity are stored (created if new)."""
        row = self._db.execute(
            "SELECT id, dim FROM models WHERE key = ?", (identity.key,)
        ).fetchone()
        if row:
            if row[1] != identity.dim:
                raise ModelMismatchError(f"model {identity.key} was stored with dim {row[1]}")
            return int(row[0])
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO models (key, name, layer, dim, weights_sha256, preprocess, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
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
            assert cursor.lastrowid is not None  # set by the INSERT above
            return int(cursor.lastrowid)

    @_guarded
    def models(self) -> list[dict[str, Any]]:
        """Every model that has stored vectors here, with its vector count."""
        rows = self._db.execute(
            "SELECT m.id, m.key, m.name, m.layer, m.dim, "
            "(SELECT COUNT(*) FROM vectors v WHERE v.model_id = m.id) FROM models m ORDER BY m.id"
        ).fetchall()
        return model_summaries(rows)

    @_guarded
    def model_dim(self, model_id: int) -> int:
        """The vector dimension of a registered model."""
        row = self._db.execute("SELECT dim FROM models WHERE id = ?", (model_id,)).fetchone()
        if row is None:
            raise CatalogError(f"no model with id {model_id}")
        return int(row[0])

    # -- images ----------------------------------------------------------------------------

    @_guarded
    def file_states(self, prefix: str = "") -> dict[str, FileState]:
        """Path -> stored state, for every image whose path starts with ``prefix``."""
        prefix = to_catalog(prefix)
        rows = self._db.execute(
            "SELECT path, id, size, mtime, content_hash FROM images WHERE substr(path, 1, ?) = ?",
            (len(prefix), prefix),
        )
        return {
            from_catalog(path): FileState(i, size, mtime, h) for path, i, size, mtime, h in rows
        }

    @_guarded
    def file_states_by_hash(self, hashes: Iterable[str]) -> dict[str, FileState]:
        """See :meth:`lookalike.catalog.base.Catalog.file_states_by_hash`."""
        found: dict[str, FileState] = {}
        for chunk in chunks(sorted(set(hashes)), 500):
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                "SELECT path, id, size, mtime, content_hash FROM images"
                f" WHERE content_hash IN ({marks})",
                chunk,
            )
            found.update(
                (from_catalog(path), FileState(i, size, mtime, h))
                for path, i, size, mtime, h in rows
            )
        return found

    @_guarded
    def store(
        self, records: Sequence[ImageRecord], vectors: np.ndarray, model_id: int
    ) -> list[int]:
        """Insert or update images by path together with their vectors, in one transaction.

        A file whose content hash changed loses every model's vectors of it (the schema's
        trigger); storing an unchanged file for one model keeps the other models' vectors."""
        vectors = checked_vectors(records, vectors, self.model_dim(model_id))
        ids = []
        now = time.time()
        with self._transaction() as db:
            for record, vector in zip(records, vectors, strict=True):
                path = to_catalog(record.path)
                blob = np.ascontiguousarray(vector, dtype="<f4").tobytes()
                row = db.execute(
                    "INSERT INTO images (path, content_hash, size, mtime, width, height, metadata,"
                    " added_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (path) DO UPDATE SET"
                    " content_hash = excluded.content_hash, size = excluded.size,"
                    " mtime = excluded.mtime, width = excluded.width, height = excluded.height,"
                    f" metadata = {_MERGED_METADATA} RETURNING id",
                    (
                        path,
                        record.content_hash,
                        record.size,
                        record.mtime,
                        record.width,
                        record.height,
                        json.dumps(record.metadata),
                        now,
                    ),
                ).fetchone()
                image_id = int(row[0])
                db.execute(
                    "INSERT OR REPLACE INTO vectors (image_id, model_id, vector, checksum)"
                    " VALUES (?, ?, ?, ?)",
                    (image_id, model_id, blob, zlib.crc32(blob)),
                )
                db.execute("DELETE FROM failures WHERE path = ?", (path,))
                ids.append(image_id)
            self._bump_generation(db)
        return ids

    @_guarded
    def touch(self, image_id: int, size: int, mtime: float) -> None:
        """Record a new size/mtime for a file whose content hash did not change."""
        with self._transaction() as db:
            db.execute(
                "UPDATE images SET size = ?, mtime = ? WHERE id = ?", (size, mtime, image_id)
            )

    @_guarded
    def remove(self, ids: Iterable[int]) -> int:
        """Delete images (and their vectors) by id; returns how many existed."""
        ids = [int(i) for i in ids]
        if not ids:
            return 0
        with self._transaction() as db:
            removed = 0
            for chunk in chunks(ids, 500):
                marks = ",".join("?" * len(chunk))
                removed += db.execute(f"DELETE FROM images WHERE id IN ({marks})", chunk).rowcount
            if removed:
                self._bump_generation(db)
        return removed

    @_guarded
    def move_paths(self, moves: Mapping[str, str]) -> dict[str, int]:
        """See :meth:`lookalike.catalog.base.Catalog.move_paths`."""
        pairs = planned_moves(moves)
        if not pairs:
            return {}
        with self._transaction() as db:
            ids: dict[str, int] = {}
            for chunk in chunks([old for old, _ in pairs], 500):
                marks = ",".join("?" * len(chunk))
                rows = db.execute(f"SELECT path, id FROM images WHERE path IN ({marks})", chunk)
                ids.update((path, int(i)) for path, i in rows)
            present = [(old, new, ids[old]) for old, new in pairs if old in ids]
            if not present:
                return {}
            vacated = {old for old, _, _ in present}
            taken = [new for _, new, _ in present if new not in vacated]
            replaced = 0
            for path in taken:  # another image's path: that image is replaced
                replaced += db.execute("DELETE FROM images WHERE path = ?", (path,)).rowcount
            # Every image leaves its path first, so a swap or a chain never meets a path that
            # is still taken (paths are unique).
            token = uuid.uuid4().hex
            db.executemany(
                "UPDATE images SET path = ? WHERE id = ?",
                [(f"moving:{token}:{i}", i) for _, _, i in present],
            )
            db.executemany(
                "UPDATE images SET path = ? WHERE id = ?", [(new, i) for _, new, i in present]
            )
            db.executemany("DELETE FROM failures WHERE path = ?", [(new,) for _, new, _ in present])
            if replaced:
                self._bump_generation(db)
        return {from_catalog(new): i for _, new, i in present}

    def move_path(self, old: str, new: str) -> int | None:
        """See :meth:`lookalike.catalog.base.Catalog.move_path`."""
        return self.move_paths({old: new}).get(new)

    @_guarded
    def ids_for_paths(self, paths: Iterable[str]) -> dict[str, int]:
        """Path -> id for the given paths that are in the catalog."""
        asked = {to_catalog(p): p for p in paths}
        found: dict[str, int] = {}
        for chunk in chunks(list(asked), 500):
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(f"SELECT path, id FROM images WHERE path IN ({marks})", chunk)
            found.update((asked[path], int(i)) for path, i in rows)
        return found

    @_guarded
    def images(self, ids: Sequence[int]) -> dict[int, ImageRecord]:
        """Records of the given ids (unknown ids are left out)."""
        found: dict[int, ImageRecord] = {}
        for chunk in chunks([int(i) for i in ids], 500):
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                "SELECT id, path, content_hash, size, mtime, width, height, metadata FROM images "
                f"WHERE id IN ({marks})",
                chunk,
            )
            for i, path, h, size, mtime, w, hgt, meta in rows:
                found[i] = ImageRecord(
                    from_catalog(path), h, size, mtime, w, hgt, json.loads(meta), id=i
                )
        return found

    @_guarded
    def ids_missing_vectors(self, model_id: int) -> list[tuple[int, str]]:
        """(id, path) of images that have no vector from this model yet."""
        rows = self._db.execute(
            "SELECT i.id, i.path FROM images i WHERE NOT EXISTS "
            "(SELECT 1 FROM vectors v WHERE v.image_id = i.id AND v.model_id = ?) ORDER BY i.id",
            (model_id,),
        )
        return [(int(i), from_catalog(p)) for i, p in rows]

    @_guarded
    def vectors(self, model_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 [n], vectors float32 [n, dim]) of every image this model embedded;
        ``CorruptVectorError`` when any fails its checksum."""
        dim = self.model_dim(model_id)
        rows = self._db.execute(
            "SELECT image_id, vector, COALESCE(checksum, -1) FROM vectors WHERE model_id = ?"
            " ORDER BY image_id",
            (model_id,),
        ).fetchall()
        ids, blobs, checksums = zip(*rows, strict=True) if rows else ((), (), ())
        matrix, failed = decode_checked(blobs, checksums, dim)
        found = np.array(ids, dtype=np.int64)
        if failed.any():
            raise corrupt_vectors(self.location, found[failed].tolist(), model_id)
        return found, matrix

    @_guarded
    def vector(self, image_id: int, model_id: int) -> np.ndarray | None:
        """One image's vector from one model, or None when it has none;
        ``CorruptVectorError`` when it fails its checksum."""
        row = self._db.execute(
            "SELECT vector, COALESCE(checksum, -1) FROM vectors"
            " WHERE image_id = ? AND model_id = ?",
            (image_id, model_id),
        ).fetchone()
        if row is None:
            return None
        matrix, failed = decode_checked([row[0]], [row[1]], len(row[0]) // 4)
        if failed.any():
            raise corrupt_vectors(self.location, [image_id], model_id)
        vector: np.ndarray = matrix[0]
        return vector

    @_guarded
    def vectors_for(self, ids: Sequence[int], model_id: int) -> np.ndarray:
        """float32 [len(ids), dim]: the vectors of these images in the given order;
        ``CorruptVectorError`` when any fails its checksum."""
        dim = self.model_dim(model_id)
        wanted = [int(i) for i in ids]
        found: dict[int, tuple[bytes, int]] = {}
        for chunk in chunks(wanted, 500):
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                "SELECT image_id, vector, COALESCE(checksum, -1) FROM vectors "
                f"WHERE model_id = ? AND image_id IN ({marks})",
                [model_id, *chunk],
            )
            found.update((int(i), (blob, checksum)) for i, blob, checksum in rows)
        missing = [i for i in wanted if i not in found]
        if missing:
            raise CatalogError(f"no vectors stored for images {missing[:5]}")
        matrix, failed = decode_checked(
            [found[i][0] for i in wanted], [found[i][1] for i in wanted], dim
        )
        if failed.any():
            raise corrupt_vectors(self.location, np.array(wanted)[failed].tolist(), model_id)
        return matrix

    @_guarded
    def verify_vectors(self, model_id: int | None = None) -> list[int]:
        """Ids of the images whose stored vectors (of ``model_id``, else of every model) fail
        their checksum or have the wrong length, in order; reads every vector once."""
        if model_id is None:
            models = [(int(m), int(d)) for m, d in self._db.execute("SELECT id, dim FROM models")]
        else:
            models = [(int(model_id), self.model_dim(model_id))]
        bad: set[int] = set()
        for model, dim in models:
            last = -1
            while rows := self._db.execute(
                "SELECT image_id, vector, COALESCE(checksum, -1) FROM vectors"
                " WHERE model_id = ? AND image_id > ? ORDER BY image_id LIMIT ?",
                (model, last, _VERIFY_PAGE),
            ).fetchall():
                ids, blobs, checksums = zip(*rows, strict=True)
                _, failed = decode_checked(blobs, checksums, dim)
                bad.update(np.array(ids, dtype=np.int64)[failed].tolist())
                last = int(ids[-1])
        return sorted(bad)

    @_guarded
    def drop_vectors(self, ids: Iterable[int], model_id: int) -> int:
        """Forget these images' vectors of one model (so that they are embedded again, as
        ``ids_missing_vectors`` then lists them); returns how many were stored."""
        ids = sorted({int(i) for i in ids})
        dropped = 0
        with self._transaction() as db:
            for chunk in chunks(ids, 500):
                marks = ",".join("?" * len(chunk))
                dropped += db.execute(
                    f"DELETE FROM vectors WHERE model_id = ? AND image_id IN ({marks})",
                    [int(model_id), *chunk],
                ).rowcount
            if dropped:
                self._bump_generation(db)
        return dropped

    @_guarded
    def drop_vectors_except(self, model_id: int) -> int:
        """Forget the vectors of every model but ``model_id`` (after a model switch);
        returns how many were stored."""
        with self._transaction() as db:
            dropped = db.execute(
                "DELETE FROM vectors WHERE model_id != ?", (int(model_id),)
            ).rowcount
            if dropped:
                self._bump_generation(db)
        return int(dropped)

    @_guarded
    def integrity(self) -> list[str]:
        """Problems found: SQLite's ``PRAGMA integrity_check`` of the file, then vectors that
        fail their checksum; empty when the catalog is healthy. A file too damaged to check
        is one problem, not an exception."""
        try:
            found = [str(row[0]) for row in self._db.execute("PRAGMA integrity_check")]
        except sqlite3.DatabaseError as error:
            return [str(self._typed(error))]
        problems = [] if found == ["ok"] else [f"{self.path}: {problem}" for problem in found]
        try:
            problems += checksum_summary(self.verify_vectors())
        except CatalogError as error:  # too damaged to read every vector
            problems.append(str(error))
        return problems

    @_guarded
    def count(self) -> int:
        """Number of images in the catalog."""
        return int(self._db.execute("SELECT COUNT(*) FROM images").fetchone()[0])

    @_guarded
    def update_metadata(self, image_id: int, metadata: dict[str, Any]) -> None:
        """Merge keys into an image's metadata."""
        with self._transaction() as db:
            row = db.execute("SELECT metadata FROM images WHERE id = ?", (image_id,)).fetchone()
            if row is None:
                raise CatalogError(f"no image with id {image_id}")
            merged = {**json.loads(row[0]), **metadata}
            db.execute(
                "UPDATE images SET metadata = ? WHERE id = ?", (json.dumps(merged), image_id)
            )

    @_guarded
    def paths(self) -> dict[str, int]:
        """Path -> id of every image."""
        return {
            from_catalog(path): int(i)
            for path, i in self._db.execute("SELECT path, id FROM images")
        }

    # -- local features --------------------------------------------------------------------

    @_guarded
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
        with self._transaction() as db:
            current: dict[int, str] = {}
            for chunk in chunks([r[0] for r in rows], 500):
                marks = ",".join("?" * len(chunk))
                current.update(
                    db.execute(
                        f"SELECT id, content_hash FROM images WHERE id IN ({marks})", chunk
                    ).fetchall()
                )
            keep = fresh_local_feature_rows(rows, current, content_hashes)
            db.executemany(
                "INSERT OR REPLACE INTO local_features (image_id, kind, data) VALUES (?, ?, ?)",
                keep,
            )
        return len(keep)

    @_guarded
    def local_features(self, ids: Iterable[int], kind: str) -> dict[int, bytes]:
        """Id -> serialised local features of this kind, for the given ids that have them."""
        found: dict[int, bytes] = {}
        for chunk in chunks([int(i) for i in ids], 500):
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                "SELECT image_id, data FROM local_features "
                f"WHERE kind = ? AND image_id IN ({marks})",
                [kind, *chunk],
            )
            found.update((int(i), bytes(data)) for i, data in rows)
        return found

    @_guarded
    def ids_missing_local_features(self, kind: str) -> list[tuple[int, str]]:
        """(id, path) of images without local features of this kind."""
        rows = self._db.execute(
            "SELECT i.id, i.path FROM images i WHERE NOT EXISTS (SELECT 1 FROM local_features f"
            " WHERE f.image_id = i.id AND f.kind = ?) ORDER BY i.id",
            (kind,),
        )
        return [(int(i), from_catalog(p)) for i, p in rows]

    @_guarded
    def ids_with_local_features(self, kind: str) -> list[int]:
        """Ids of the images with local features of this kind, in order."""
        rows = self._db.execute(
            "SELECT image_id FROM local_features WHERE kind = ? ORDER BY image_id", (kind,)
        )
        return [int(i) for (i,) in rows]

    @_guarded
    def local_features_summary(self) -> dict[str, tuple[int, int]]:
        """Kind -> (images, total bytes) of the stored local features."""
        rows = self._db.execute(
            "SELECT kind, COUNT(*), COALESCE(SUM(LENGTH(data)), 0) FROM local_features "
            "GROUP BY kind ORDER BY kind"
        )
        return {kind: (int(n), int(size)) for kind, n, size in rows}

    # -- failures and change tracking ------------------------------------------------------

    @_guarded
    def record_failure(self, path: str, reason: str) -> None:
        """Remember a file that could not be indexed, for the run summary and ``info``."""
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO failures (path, reason, at) VALUES (?, ?, ?)",
                (to_catalog(path), reason, time.time()),
            )

    @_guarded
    def failures(self) -> list[tuple[str, str]]:
        """(path, reason) of every file that failed in its latest attempt."""
        rows = self._db.execute("SELECT path, reason FROM failures ORDER BY path")
        return [(from_catalog(path), reason) for path, reason in rows]

    @_guarded
    def clear_failures(self, paths: Iterable[str]) -> None:
        """Forget failures of files that are gone."""
        with self._transaction() as db:
            db.executemany("DELETE FROM failures WHERE path = ?", [(to_catalog(p),) for p in paths])

    @property
    @_guarded
    def generation(self) -> int:
        """A counter bumped by every change to images or vectors; indexes compare it to know
        whether they are stale."""
        return int(self.get_setting("generation", "0") or 0)

    @property
    @_guarded
    def state(self) -> tuple[int, str]:
        """(generation, token), read together: the token is drawn afresh with every
        generation bump, so a catalog restored from a backup and changed again, whose
        generation may equal an older one, still has a state of its own."""
        rows = dict(
            self._db.execute("SELECT key, value FROM settings WHERE key IN ('generation', 'state')")
        )
        return int(rows.get("generation") or 0), str(rows.get("state") or "")

    def _bump_generation(self, db: sqlite3.Connection) -> None:
        row = db.execute(
            "INSERT INTO settings (key, value) VALUES ('generation', '1') ON CONFLICT (key) "
            "DO UPDATE SET value = CAST(value AS INTEGER) + 1 RETURNING value"
        ).fetchone()
        token = uuid.uuid4().hex
        db.execute(
            "INSERT INTO settings (key, value) VALUES ('state', ?) ON CONFLICT (key) "
            "DO UPDATE SET value = excluded.value",
            (token,),
        )
        # Lets the caller tell its own change from a concurrent writer's: if this is one more
        # than the generation it last saw, nobody else wrote in between.
        self.last_written_generation = int(row[0])
        self.last_written_state = (int(row[0]), token)
