"""The SQLite catalog: images, their metadata and vectors, in one file that needs no server."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from lookalike.catalog.base import (
    FileState,
    ImageRecord,
    checked_vectors,
    chunks,
    fresh_local_feature_rows,
    local_feature_rows,
    model_summaries,
)
from lookalike.catalog.schema import MIGRATIONS, SCHEMA_VERSION
from lookalike.encoders.base import EncoderIdentity
from lookalike.errors import CatalogError, CatalogUnavailableError, ModelMismatchError

# SQLite result codes that mean the file cannot be opened or read now, not that it is wrong.
_UNAVAILABLE = {"SQLITE_CANTOPEN", "SQLITE_IOERR", "SQLITE_PERM", "SQLITE_BUSY", "SQLITE_LOCKED"}


class SqliteCatalog:
    """Catalog backed by one SQLite file (WAL mode, so readers never block the indexer)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.last_written_generation: int | None = None
        try:
            self._db = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
        except sqlite3.DatabaseError as error:
            code = str(getattr(error, "sqlite_errorname", ""))  # SQLITE_IOERR_READ: SQLITE_IOERR
            unavailable = "_".join(code.split("_")[:2]) in _UNAVAILABLE
            kind = CatalogUnavailableError if unavailable else CatalogError
            raise kind(f"{self.path}: not a usable lookalike catalog ({error})") from error

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
                self._db.execute(f"PRAGMA user_version = {number + 1}")

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

    def get_setting(self, key: str, default: str | None = None) -> str | None:
        """A value from the settings table."""
        row = self._db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def set_setting(self, key: str, value: str) -> None:
        """Store a value in the settings table."""
        with self._transaction() as db:
            db.execute(
                "INSERT INTO settings (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

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

    def models(self) -> list[dict[str, Any]]:
        """Every model that has stored vectors here, with its vector count."""
        rows = self._db.execute(
            "SELECT m.id, m.key, m.name, m.layer, m.dim, "
            "(SELECT COUNT(*) FROM vectors v WHERE v.model_id = m.id) FROM models m ORDER BY m.id"
        ).fetchall()
        return model_summaries(rows)

    def model_dim(self, model_id: int) -> int:
        """The vector dimension of a registered model."""
        row = self._db.execute("SELECT dim FROM models WHERE id = ?", (model_id,)).fetchone()
        if row is None:
            raise CatalogError(f"no model with id {model_id}")
        return int(row[0])

    # -- images ----------------------------------------------------------------------------

    def file_states(self, prefix: str = "") -> dict[str, FileState]:
        """Path -> stored state, for every image whose path starts with ``prefix``."""
        rows = self._db.execute(
            "SELECT path, id, size, mtime, content_hash FROM images WHERE substr(path, 1, ?) = ?",
            (len(prefix), prefix),
        )
        return {path: FileState(i, size, mtime, h) for path, i, size, mtime, h in rows}

    def store(
        self, records: Sequence[ImageRecord], vectors: np.ndarray, model_id: int
    ) -> list[int]:
        """Insert or update images by path together with their vectors, in one transaction."""
        vectors = checked_vectors(records, vectors, self.model_dim(model_id))
        ids = []
        now = time.time()
        with self._transaction() as db:
            for record, vector in zip(records, vectors, strict=True):
                row = db.execute(
                    "INSERT INTO images (path, content_hash, size, mtime, width, height, metadata,"
                    " added_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (path) DO UPDATE SET"
                    " content_hash = excluded.content_hash, size = excluded.size,"
                    " mtime = excluded.mtime, width = excluded.width, height = excluded.height"
                    " RETURNING id",
                    (
                        record.path,
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
                # A changed file invalidates the vectors every other model made of it. Naming
                # the models lets the (model_id, image_id) key find the rows; ``image_id = ?``
                # alone would scan the whole table, once per stored image.
                db.execute(
                    "DELETE FROM vectors WHERE model_id IN (SELECT id FROM models WHERE id != ?)"
                    " AND image_id = ?",
                    (model_id, image_id),
                )
                db.execute(
                    "INSERT OR REPLACE INTO vectors (image_id, model_id, vector) VALUES (?, ?, ?)",
                    (image_id, model_id, vector.tobytes()),
                )
                db.execute("DELETE FROM failures WHERE path = ?", (record.path,))
                ids.append(image_id)
            self._bump_generation(db)
        return ids

    def touch(self, image_id: int, size: int, mtime: float) -> None:
        """Record a new size/mtime for a file whose content hash did not change."""
        with self._transaction() as db:
            db.execute(
                "UPDATE images SET size = ?, mtime = ? WHERE id = ?", (size, mtime, image_id)
            )

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

    def ids_for_paths(self, paths: Iterable[str]) -> dict[str, int]:
        """Path -> id for the given paths that are in the catalog."""
        found = {}
        for chunk in chunks(list(paths), 500):
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(f"SELECT path, id FROM images WHERE path IN ({marks})", chunk)
            found.update(dict(rows))
        return found

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
                found[i] = ImageRecord(path, h, size, mtime, w, hgt, json.loads(meta), id=i)
        return found

    def ids_missing_vectors(self, model_id: int) -> list[tuple[int, str]]:
        """(id, path) of images that have no vector from this model yet."""
        rows = self._db.execute(
            "SELECT i.id, i.path FROM images i WHERE NOT EXISTS "
            "(SELECT 1 FROM vectors v WHERE v.image_id = i.id AND v.model_id = ?) ORDER BY i.id",
            (model_id,),
        )
        return [(int(i), p) for i, p in rows]

    def vectors(self, model_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 [n], vectors float32 [n, dim]) of every image this model embedded."""
        dim = self.model_dim(model_id)
        rows = self._db.execute(
            "SELECT image_id, vector FROM vectors WHERE model_id = ? ORDER BY image_id", (model_id,)
        ).fetchall()
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        blob = b"".join(r[1] for r in rows)
        matrix = np.frombuffer(blob, dtype=np.float32).reshape(len(rows), dim).copy()
        return ids, matrix

    def vector(self, image_id: int, model_id: int) -> np.ndarray | None:
        """One image's vector from one model, or None when it has none."""
        row = self._db.execute(
            "SELECT vector FROM vectors WHERE image_id = ? AND model_id = ?", (image_id, model_id)
        ).fetchone()
        return None if row is None else np.frombuffer(row[0], dtype=np.float32).copy()

    def vectors_for(self, ids: Sequence[int], model_id: int) -> np.ndarray:
        """float32 [len(ids), dim]: the vectors of these images in the given order."""
        dim = self.model_dim(model_id)
        found: dict[int, bytes] = {}
        for chunk in chunks([int(i) for i in ids], 500):
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                "SELECT image_id, vector FROM vectors "
                f"WHERE model_id = ? AND image_id IN ({marks})",
                [model_id, *chunk],
            )
            found.update(rows)
        missing = [i for i in ids if int(i) not in found]
        if missing:
            raise CatalogError(f"no vectors stored for images {missing[:5]}")
        blob = b"".join(found[int(i)] for i in ids)
        return np.frombuffer(blob, dtype=np.float32).reshape(len(ids), dim).copy()

    def count(self) -> int:
        """Number of images in the catalog."""
        return int(self._db.execute("SELECT COUNT(*) FROM images").fetchone()[0])

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

    def paths(self) -> dict[str, int]:
        """Path -> id of every image."""
        return dict(self._db.execute("SELECT path, id FROM images"))

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

    def ids_missing_local_features(self, kind: str) -> list[tuple[int, str]]:
        """(id, path) of images without local features of this kind."""
        rows = self._db.execute(
            "SELECT i.id, i.path FROM images i WHERE NOT EXISTS (SELECT 1 FROM local_features f"
            " WHERE f.image_id = i.id AND f.kind = ?) ORDER BY i.id",
            (kind,),
        )
        return [(int(i), p) for i, p in rows]

    def local_features_summary(self) -> dict[str, tuple[int, int]]:
        """Kind -> (images, total bytes) of the stored local features."""
        rows = self._db.execute(
            "SELECT kind, COUNT(*), COALESCE(SUM(LENGTH(data)), 0) FROM local_features "
            "GROUP BY kind ORDER BY kind"
        )
        return {kind: (int(n), int(size)) for kind, n, size in rows}

    # -- failures and change tracking ------------------------------------------------------

    def record_failure(self, path: str, reason: str) -> None:
        """Remember a file that could not be indexed, for the run summary and ``info``."""
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO failures (path, reason, at) VALUES (?, ?, ?)",
                (path, reason, time.time()),
            )

    def failures(self) -> list[tuple[str, str]]:
        """(path, reason) of every file that failed in its latest attempt."""
        return list(self._db.execute("SELECT path, reason FROM failures ORDER BY path"))

    def clear_failures(self, paths: Iterable[str]) -> None:
        """Forget failures of files that are gone."""
        with self._transaction() as db:
            db.executemany("DELETE FROM failures WHERE path = ?", [(p,) for p in paths])

    @property
    def generation(self) -> int:
        """A counter bumped by every change to images or vectors; indexes compare it to know
        whether they are stale."""
        return int(self.get_setting("generation", "0") or 0)

    def _bump_generation(self, db: sqlite3.Connection) -> None:
        row = db.execute(
            "INSERT INTO settings (key, value) VALUES ('generation', '1') ON CONFLICT (key) "
            "DO UPDATE SET value = CAST(value AS INTEGER) + 1 RETURNING value"
        ).fetchone()
        # Lets the caller tell its own change from a concurrent writer's: if this is one more
        # than the generation it last saw, nobody else wrote in between.
        self.last_written_generation = int(row[0])
