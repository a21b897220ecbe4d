"""The catalog's versioned schema: each migration takes the database one version up.

``PRAGMA user_version`` holds the version. Migrations only ever append to this list, so an
old catalog is upgraded step by step and a newer one is refused instead of misread.
"""

from __future__ import annotations

MIGRATIONS: tuple[str, ...] = (
    # 1: images, the models that embedded them, their vectors, and files that failed.
    """
    CREATE TABLE settings (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    CREATE TABLE models (
        id             INTEGER PRIMARY KEY,
        key            TEXT NOT NULL UNIQUE,
        name           TEXT NOT NULL,
        layer          TEXT NOT NULL,
        dim            INTEGER NOT NULL,
        weights_sha256 TEXT NOT NULL,
        preprocess     TEXT NOT NULL,
        created_at     REAL NOT NULL
    );
    CREATE TABLE images (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        path         TEXT NOT NULL UNIQUE,
        content_hash TEXT NOT NULL,
        size         INTEGER NOT NULL,
        mtime        REAL NOT NULL,
        width        INTEGER NOT NULL,
        height       INTEGER NOT NULL,
        metadata     TEXT NOT NULL DEFAULT '{}',
        added_at     REAL NOT NULL
    );
    CREATE INDEX images_content_hash ON images (content_hash);
    CREATE TABLE vectors (
        image_id INTEGER NOT NULL REFERENCES images (id) ON DELETE CASCADE,
        model_id INTEGER NOT NULL REFERENCES models (id),
        vector   BLOB NOT NULL,
        PRIMARY KEY (model_id, image_id)
    );
    CREATE TABLE failures (
        path   TEXT PRIMARY KEY,
        reason TEXT NOT NULL,
        at     REAL NOT NULL
    );
    """,
    # 2: local features (SIFT keypoints and descriptors) of images, for re-ranking by
    # geometric verification. One row per image; ``kind`` names how they were extracted. The
    # trigger drops them when an image's content changes, so they are never stale.
    """
    CREATE TABLE local_features (
        image_id INTEGER PRIMARY KEY REFERENCES images (id) ON DELETE CASCADE,
        kind     TEXT NOT NULL,
        data     BLOB NOT NULL
    );
    CREATE TRIGGER local_features_stale AFTER UPDATE OF content_hash ON images
    WHEN old.content_hash IS NOT new.content_hash
    BEGIN
        DELETE FROM local_features WHERE image_id = new.id;
    END;
    """,
    # 3: deleting an image (a cascade from images) finds its vectors through this index;
    # without it every deletion scanned the whole vectors table (3.3 s to remove 100 of 20,000
    # images).
    """
    CREATE INDEX vectors_image ON vectors (image_id);
    """,
    # 4: integrity. Storing a file for one model no longer drops the other models' vectors of
    # it; the trigger drops every model's vectors when its content changes. Each vector has a
    # checksum, CRC32 of its little-endian float32 bytes, verified on every read (filled for
    # existing rows by the migration's Python step, see ``PYTHON_STEPS``). The "state" setting
    # is a random token drawn afresh with every generation bump, so a catalog restored from a
    # backup never repeats an old state.
    """
    ALTER TABLE vectors ADD COLUMN checksum INTEGER;
    CREATE TRIGGER vectors_stale AFTER UPDATE OF content_hash ON images
    WHEN old.content_hash IS NOT new.content_hash
    BEGIN
        DELETE FROM vectors WHERE image_id = new.id;
    END;
    INSERT INTO settings (key, value) VALUES ('state', lower(hex(randomblob(16))))
    ON CONFLICT (key) DO UPDATE SET value = excluded.value;
    """,
    # 5: an image may keep features of several kinds (its SIFT and its grayscale thumbnail
    # for the default search's pixel check), one row per image and kind.
    """
    DROP TRIGGER local_features_stale;
    CREATE TABLE local_features_by_kind (
        image_id INTEGER NOT NULL REFERENCES images (id) ON DELETE CASCADE,
        kind     TEXT NOT NULL,
        data     BLOB NOT NULL,
        PRIMARY KEY (image_id, kind)
    );
    INSERT INTO local_features_by_kind (image_id, kind, data)
    SELECT image_id, kind, data FROM local_features;
    DROP TABLE local_features;
    ALTER TABLE local_features_by_kind RENAME TO local_features;
    CREATE TRIGGER local_features_stale AFTER UPDATE OF content_hash ON images
    WHEN old.content_hash IS NOT new.content_hash
    BEGIN
        DELETE FROM local_features WHERE image_id = new.id;
    END;
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)

PYTHON_STEPS = frozenset({4})
"""Versions whose migration ends with a step run from Python, in the same transaction, in both
dialects, for what SQL alone cannot compute. 4: fill the checksum of every stored vector, and
store paths that hold characters of the private-use block of :mod:`lookalike.catalog.paths`
as that module maps them (paths never held surrogates or NUL before)."""
