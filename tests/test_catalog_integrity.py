"""The catalog's integrity, on SQLite and PostgreSQL (pgvector and bytea vectors) alike: other
models' vectors survive an unchanged file, every vector read is checked against its checksum,
the state token tells a restored catalog from the one it was copied from, file names that are
not UTF-8 round-trip byte for byte, a damaged SQLite file raises a typed error, and a catalog
of schema version 3 upgrades in place to version 4.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import sqlite3
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lookalike.catalog import Catalog, ImageRecord, SqliteCatalog
from lookalike.catalog.paths import from_catalog, to_catalog
from lookalike.catalog.postgres_schema import MIGRATIONS as POSTGRES_MIGRATIONS
from lookalike.catalog.schema import MIGRATIONS as SQLITE_MIGRATIONS
from lookalike.catalog.schema import SCHEMA_VERSION as SQLITE_SCHEMA_VERSION
from lookalike.encoders import EncoderIdentity, PreprocessConfig
from lookalike.errors import CatalogCorruptError, CatalogError, CorruptVectorError

CONFIG = PreprocessConfig(resolution=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
KINDS = ["sqlite", "postgresql-pgvector", "postgresql-bytea"]
REPAIR = "lookalike check --repair"


def identity(name: str = "m", dim: int = 7) -> EncoderIdentity:
    return EncoderIdentity(name, "head", dim, "ab" * 32, CONFIG)


def record(path: str, content: str = "h") -> ImageRecord:
    return ImageRecord(path, content, size=10, mtime=1.5, width=4, height=3)


def random_vectors(count: int, dim: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(count, dim)).astype(np.float32)


def crc(values: np.ndarray) -> int:
    return zlib.crc32(np.asarray(values, dtype="<f4").tobytes())


@dataclass
class Where:
    """Where a catalog of one kind lives (a SQLite file or a PostgreSQL database), to open it
    and to change its rows behind its back."""

    kind: str
    location: str
    server: Any = None

    @property
    def storage(self) -> str:
        return self.kind.partition("-")[2]

    def open(self) -> Catalog:
        if self.kind == "sqlite":
            return SqliteCatalog(self.location)
        from lookalike.catalog.postgres import PostgresCatalog

        return PostgresCatalog(self.location, vector_storage=self.storage)

    def sql(self, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run one statement on the database directly, bypassing the catalog."""
        if self.kind == "sqlite":
            with closing(sqlite3.connect(self.location)) as db:
                rows = db.execute(statement.replace("%s", "?"), params).fetchall()
                db.commit()
                return rows
        import psycopg

        with psycopg.connect(self.location, autocommit=True) as db:
            cursor = db.execute(statement, params)
            return cursor.fetchall() if cursor.description else []

    def vector_value(self, values: np.ndarray) -> tuple[str, Any]:
        """A SQL placeholder and parameter that store ``values`` as this kind stores vectors."""
        if self.storage == "pgvector":
            return "%s::vector", "[" + ",".join(repr(float(v)) for v in values) + "]"
        return "%s", np.asarray(values, dtype="<f4").tobytes()

    def backup(self) -> str:
        """A copy of the (closed) catalog, as a backup would keep it; returns where."""
        if self.kind == "sqlite":
            shutil.copyfile(self.location, self.location + ".backup")
            return self.location + ".backup"
        name = self.location.rpartition("/")[2]
        self._admin(f'CREATE DATABASE "{name}_backup" TEMPLATE "{name}"')
        return f"{name}_backup"

    def restore(self, backup: str) -> None:
        """Put a backup back in the (closed) catalog's place."""
        if self.kind == "sqlite":
            for leftover in (self.location + "-wal", self.location + "-shm"):
                Path(leftover).unlink(missing_ok=True)
            shutil.copyfile(backup, self.location)
            return
        name = self.location.rpartition("/")[2]
        self._admin(f'DROP DATABASE "{name}" WITH (FORCE)')
        self._admin(f'ALTER DATABASE "{backup}" RENAME TO "{name}"')

    def _admin(self, statement: str) -> None:
        import psycopg

        for attempt in range(50):  # a closed catalog's server process may linger a moment
            try:
                with psycopg.connect(self.server.url(), autocommit=True) as db:
                    db.execute(statement)
                return
            except psycopg.errors.ObjectInUse:
                if attempt == 49:
                    raise
                time.sleep(0.1)

    def overwrite_vector(self, image_id: int, model_id: int, values: np.ndarray) -> None:
        """Replace a stored vector's values without its checksum, as damage or a hand edit."""
        mark, value = self.vector_value(values)
        self.sql(
            f"UPDATE vectors SET vector = {mark} WHERE image_id = %s AND model_id = %s",
            (value, image_id, model_id),
        )


@pytest.fixture(params=KINDS)
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Where:
    if request.param == "sqlite":
        return Where("sqlite", str(tmp_path / "c.sqlite"))
    server = request.getfixturevalue("postgres")
    if request.param.endswith("pgvector") and not server.has_pgvector:
        pytest.skip("this PostgreSQL build has no pgvector")
    return Where(request.param, server.create_database(), server)


@pytest.fixture
def catalog(where: Where) -> Iterator[Catalog]:
    with where.open() as opened:
        yield opened


# -- (d) paths --------------------------------------------------------------------------------


def test_paths_map_every_string_losslessly_to_utf8_and_keep_prefixes() -> None:
    pieces = [chr(c) for c in (0, 0xD800, 0xDBFF, 0xDC00, 0xDCE9, 0xDCFF, 0xDFFF)]
    pieces += [chr(c) for c in (0xF0000, 0xF00E9, 0xF0100, 0xF07FF, 0xF0800, 0xF08FF, 0xF0900)]
    pieces += ["a", "/", "é", "\U0001f600", "\ue000"]
    rng = random.Random(7)
    for _ in range(5000):
        path = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 8)))
        other = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 8)))
        text = to_catalog(path)
        text.encode("utf-8")  # no surrogates left
        assert "\x00" not in text  # PostgreSQL text cannot hold NUL
        assert from_catalog(text) == path
        assert to_catalog(path + other).startswith(text)
        assert to_catalog(other).startswith(text) == other.startswith(path)
    assert to_catalog("/photos/ordinary é.jpg") == "/photos/ordinary é.jpg"


def test_a_file_name_that_is_not_utf8_round_trips_byte_for_byte(
    catalog: Catalog, tmp_path: Path
) -> None:
    folder = os.fsencode(tmp_path / "photos")
    os.mkdir(folder)
    raw = os.path.join(folder, b"caf\xe9.jpg")  # Latin-1 é: not valid UTF-8
    with open(raw, "wb") as file:
        file.write(b"not really a jpeg")
    (listed,) = os.listdir(os.fsdecode(folder))
    path = os.path.join(os.fsdecode(folder), listed)  # as a folder walk finds it
    assert os.fsencode(path) == raw and "\udce9" in path
    lookalike = path[: -len("caf\udce9.jpg")] + "caf\U000f00e9.jpg"  # a real private-use char
    model = catalog.register_model(identity())
    ids = catalog.store([record(path, "h1"), record(lookalike, "h2")], np.ones((2, 7)), model)
    assert ids[0] != ids[1] and catalog.count() == 2
    stored = catalog.images(ids)
    assert os.fsencode(stored[ids[0]].path) == raw
    assert stored[ids[1]].path == lookalike
    prefix = os.fsdecode(folder) + "/caf\udce9"
    assert list(catalog.file_states(prefix)) == [path]
    assert catalog.file_states(prefix)[path].id == ids[0]
    assert set(catalog.file_states(os.fsdecode(folder) + "/")) == {path, lookalike}
    assert catalog.ids_for_paths([path, lookalike]) == {path: ids[0], lookalike: ids[1]}
    assert catalog.paths() == {path: ids[0], lookalike: ids[1]}
    other = catalog.register_model(identity("other"))
    assert sorted(catalog.ids_missing_vectors(other)) == sorted(
        zip(ids, [path, lookalike], strict=True)
    )
    bad = os.fsdecode(os.path.join(folder, b"\xff\xfe.png"))
    catalog.record_failure(bad, "unreadable")
    assert [os.fsencode(p) for p, _ in catalog.failures()] == [
        os.path.join(folder, b"\xff\xfe.png")
    ]
    catalog.clear_failures([bad])
    assert catalog.failures() == []
    with open(os.fsencode(catalog.images([ids[0]])[ids[0]].path), "rb") as file:
        assert file.read() == b"not really a jpeg"  # the path found is the file itself


# -- (a) other models' vectors ----------------------------------------------------------------


def test_an_unchanged_file_keeps_other_models_vectors_and_a_changed_one_drops_them(
    catalog: Catalog,
) -> None:
    small = catalog.register_model(identity("small", 7))
    big = catalog.register_model(identity("big", 9))
    first = random_vectors(2, 7, seed=1)
    ids = catalog.store([record("/a.jpg", "h1"), record("/b.jpg", "h1")], first, small)
    catalog.store([record("/a.jpg", "h1"), record("/b.jpg", "h1")], np.ones((2, 9)), big)
    # Same content stored for another model: the first model's vectors stay, bit for bit.
    np.testing.assert_array_equal(catalog.vectors_for(ids, small), first)
    assert catalog.ids_missing_vectors(small) == []
    assert [m["vectors"] for m in catalog.models()] == [2, 2]
    # New content of /a.jpg, stored for the big model: its small vector is stale and goes.
    catalog.store([record("/a.jpg", "h2")], np.full((1, 9), 2.0), big)
    assert catalog.vector(ids[0], small) is None
    assert catalog.ids_missing_vectors(small) == [(ids[0], "/a.jpg")]
    np.testing.assert_array_equal(catalog.vector(ids[0], big), np.full(9, 2.0))
    np.testing.assert_array_equal(catalog.vector(ids[1], small), first[1])
    # A changed file stored for the same model keeps only the new vector.
    catalog.store([record("/b.jpg", "h3")], np.full((1, 7), 3.0), small)
    assert catalog.vector(ids[1], big) is None
    np.testing.assert_array_equal(catalog.vector(ids[1], small), np.full(7, 3.0))


# -- (b) vector checksums ---------------------------------------------------------------------


def test_a_vector_changed_behind_the_catalogs_back_is_refused_by_every_read(
    where: Where, catalog: Catalog
) -> None:
    model = catalog.register_model(identity())
    vectors = random_vectors(3, 7)
    ids = catalog.store([record(f"/{n}.jpg") for n in "abc"], vectors, model)
    changed = vectors[1].copy()
    changed[3] += 0.5  # one value, the same length
    where.overwrite_vector(ids[1], model, changed)
    reads: list[Callable[[], object]] = [
        lambda: catalog.vectors(model),
        lambda: catalog.vector(ids[1], model),
        lambda: catalog.vectors_for(ids, model),
        lambda: catalog.vectors_for([ids[1]], model),
    ]
    for read in reads:
        with pytest.raises(CorruptVectorError, match=REPAIR) as caught:
            read()
        assert caught.value.ids == [ids[1]]
        assert str(ids[1]) in str(caught.value)
    np.testing.assert_array_equal(catalog.vector(ids[0], model), vectors[0])
    np.testing.assert_array_equal(catalog.vectors_for([ids[2], ids[0]], model), vectors[[2, 0]])


def test_a_stored_vector_of_the_wrong_length_is_refused(where: Where, catalog: Catalog) -> None:
    model = catalog.register_model(identity())
    vectors = random_vectors(2, 7)
    ids = catalog.store([record("/a.jpg"), record("/b.jpg")], vectors, model)
    where.overwrite_vector(ids[0], model, vectors[0][:6])
    for read in (
        lambda: catalog.vectors(model),
        lambda: catalog.vectors_for(ids, model),
        lambda: catalog.vector(ids[0], model),
    ):
        with pytest.raises(CorruptVectorError, match=REPAIR):
            read()
    assert catalog.verify_vectors(model) == [ids[0]]


def test_verify_integrity_and_drop_vectors_find_and_repair_damage(
    where: Where, catalog: Catalog
) -> None:
    small = catalog.register_model(identity("small", 7))
    big = catalog.register_model(identity("big", 9))
    ids = catalog.store([record(f"/{n}.jpg") for n in "abcd"], random_vectors(4, 7), small)
    catalog.store([record(f"/{n}.jpg") for n in "abcd"], random_vectors(4, 9), big)
    assert catalog.verify_vectors() == [] and catalog.integrity() == []
    where.overwrite_vector(ids[2], small, np.zeros(7))
    where.overwrite_vector(ids[0], big, np.zeros(9))
    assert catalog.verify_vectors(small) == [ids[2]]
    assert catalog.verify_vectors(big) == [ids[0]]
    assert catalog.verify_vectors() == [ids[0], ids[2]]
    (problem,) = catalog.integrity()
    assert "2 image(s) fail their checksum" in problem and REPAIR in problem
    # The repair: forget the damaged vectors, so that the next run embeds those images again.
    before = catalog.generation
    assert catalog.drop_vectors([ids[2]], small) == 1
    assert catalog.drop_vectors([ids[0]], big) == 1
    assert catalog.generation == before + 2
    assert catalog.ids_missing_vectors(small) == [(ids[2], "/c.jpg")]
    assert catalog.verify_vectors() == [] and catalog.integrity() == []
    assert catalog.vectors(small)[0].tolist() == [ids[0], ids[1], ids[3]]
    assert catalog.drop_vectors([ids[2]], small) == 0 and catalog.generation == before + 2


# -- (c) the state token ----------------------------------------------------------------------


def test_the_state_changes_with_every_write(catalog: Catalog) -> None:
    generation, token = catalog.state
    assert generation == catalog.generation == 0
    assert re.fullmatch("[0-9a-f]{32}", token)  # a fresh catalog has one from its migration
    assert catalog.last_written_state is None
    model = catalog.register_model(identity())
    seen = {token}
    writes: list[Callable[[], object]] = [
        lambda: catalog.store([record("/a.jpg"), record("/b.jpg")], np.ones((2, 7)), model),
        lambda: catalog.store([record("/a.jpg", "h2")], np.ones((1, 7)), model),
        lambda: catalog.drop_vectors([1], model),
        lambda: catalog.remove([2]),
    ]
    for write in writes:
        write()
        state = catalog.state
        assert state == catalog.last_written_state == (generation + 1, state[1])
        assert catalog.last_written_generation == state[0] == catalog.generation
        assert state[1] not in seen
        generation = state[0]
        seen.add(state[1])
    catalog.set_setting("colour", "red")  # not a change to images or vectors
    assert catalog.state == (generation, state[1])


def test_a_restored_backup_written_again_gets_a_new_state(where: Where) -> None:
    with where.open() as catalog:
        model = catalog.register_model(identity())
        catalog.store([record("/a.jpg")], np.ones((1, 7)), model)
    backup = where.backup()
    with where.open() as catalog:
        catalog.store([record("/b.jpg")], np.ones((1, 7)), model)
        stale = catalog.state  # an index file saved now would be stamped with this
        catalog.store([record("/c.jpg")], np.ones((1, 7)), model)
    where.restore(backup)
    with where.open() as restored:
        assert restored.paths().keys() == {"/a.jpg"}
        restored.store([record("/d.jpg")], np.ones((1, 7)), model)
        generation, token = restored.state
        assert generation == stale[0]  # the generation alone cannot tell them apart
        assert token != stale[1]
        assert restored.last_written_state == (generation, token)


# -- (e) a damaged SQLite file ----------------------------------------------------------------


def written_catalog(path: Path, count: int = 400, dim: int = 64) -> tuple[list[int], np.ndarray]:
    """A closed SQLite catalog of ``count`` images with vectors (model 1), all in the main
    file (closing checkpoints the write-ahead log)."""
    vectors = random_vectors(count, dim, seed=5)
    with SqliteCatalog(path) as catalog:
        model = catalog.register_model(identity(dim=dim))
        ids = catalog.store([record(f"/p/{i:04d}.jpg") for i in range(count)], vectors, model)
        catalog.store_local_features([(ids[0], "sift", b"features")])
        catalog.record_failure("/p/bad.jpg", "truncated")
    assert not Path(f"{path}-wal").exists()
    return ids, vectors


def every_call(ids: list[int], dim: int) -> dict[str, Callable[[SqliteCatalog], object]]:
    """A call of every public method (and property) of a catalog, with arguments that make
    each read or write the database."""
    one = np.ones((1, dim))
    return {
        "vectors": lambda c: c.vectors(1),
        "vectors_for": lambda c: c.vectors_for(ids, 1),
        "vector": lambda c: c.vector(ids[200], 1),
        "get_setting": lambda c: c.get_setting("generation"),
        "set_setting": lambda c: c.set_setting("colour", "red"),
        "register_model": lambda c: c.register_model(identity("other", 3)),
        "models": lambda c: c.models(),
        "model_dim": lambda c: c.model_dim(1),
        "file_states": lambda c: c.file_states("/p/"),
        "store": lambda c: c.store([record("/p/0100.jpg", "new")], one, 1),
        "touch": lambda c: c.touch(ids[100], 11, 2.5),
        "remove": lambda c: c.remove(ids[190:210]),
        "ids_for_paths": lambda c: c.ids_for_paths(["/p/0001.jpg", "/p/0200.jpg"]),
        "images": lambda c: c.images(ids),
        "ids_missing_vectors": lambda c: c.ids_missing_vectors(1),
        "count": lambda c: c.count(),
        "update_metadata": lambda c: c.update_metadata(ids[200], {"a": "b"}),
        "paths": lambda c: c.paths(),
        "store_local_features": lambda c: c.store_local_features([(ids[200], "sift", b"x")]),
        "local_features": lambda c: c.local_features(ids, "sift"),
        "ids_missing_local_features": lambda c: c.ids_missing_local_features("sift"),
        "ids_with_local_features": lambda c: c.ids_with_local_features("sift"),
        "local_features_summary": lambda c: c.local_features_summary(),
        "record_failure": lambda c: c.record_failure("/p/worse.jpg", "empty"),
        "failures": lambda c: c.failures(),
        "clear_failures": lambda c: c.clear_failures(["/p/bad.jpg"]),
        "state": lambda c: c.state,
        "verify_vectors": lambda c: c.verify_vectors(),
        "drop_vectors": lambda c: c.drop_vectors(ids[195:205], 1),
        "drop_vectors_except": lambda c: c.drop_vectors_except(1),
        "set_settings": lambda c: c.set_settings({"a": "1", "b": None}),
        "schema_version": lambda c: c.schema_version,
        "generation": lambda c: c.generation,
        "move_path": lambda c: c.move_path("/p/0001.jpg", "/p/moved.jpg"),
        "move_paths": lambda c: c.move_paths({"/p/0002.jpg": "/p/moved2.jpg"}),
        "file_states_by_hash": lambda c: c.file_states_by_hash(["h1", "h2"]),
    }


def assert_corrupt_error(error: BaseException, path: Path) -> None:
    assert isinstance(error, CatalogCorruptError), repr(error)
    assert str(path) in str(error)
    assert "restore a backup" in str(error) and REPAIR in str(error)


def test_a_catalog_file_truncated_under_an_open_catalog_raises_catalog_corrupt_error(
    tmp_path: Path,
) -> None:
    path = tmp_path / "c.sqlite"
    ids, _ = written_catalog(path)
    calls = every_call(ids, 64)
    with SqliteCatalog(path) as catalog:
        os.truncate(path, path.stat().st_size // 2)
        for name, call in calls.items():
            with pytest.raises(CatalogError) as caught:
                call(catalog)
            assert_corrupt_error(caught.value, path)
            assert not isinstance(caught.value, sqlite3.Error), name
        (problem,) = catalog.integrity()  # reported, not raised: a check lists what it finds
        assert "damaged" in problem and REPAIR in problem
    with pytest.raises(CatalogError) as reopening:
        SqliteCatalog(path)
    assert_corrupt_error(reopening.value, path)
    assert "not a usable lookalike catalog" in str(reopening.value)
    public = {name for name in dir(SqliteCatalog) if not name.startswith("_")}
    assert public - set(calls) == {"close", "integrity", "location"}  # every other one called


def test_a_page_of_garbage_in_a_catalog_file_raises_catalog_corrupt_error(
    tmp_path: Path,
) -> None:
    path = tmp_path / "c.sqlite"
    ids, vectors = written_catalog(path)
    data = path.read_bytes()
    page_size = int.from_bytes(data[16:18], "big")
    # The page holding the vector of the middle image, in the middle of the file.
    page = data.index(vectors[200].astype("<f4").tobytes()) // page_size
    assert 0.2 < page * page_size / len(data) < 0.8
    garbage = np.random.default_rng(9).integers(0, 256, page_size, dtype=np.uint8).tobytes()
    with open(path, "r+b") as file:
        file.seek(page * page_size)
        file.write(garbage)
    reading_the_page = {"vectors", "vectors_for", "vector", "verify_vectors"}
    for name, call in every_call(ids, 64).items():
        with SqliteCatalog(path) as catalog:
            try:
                call(catalog)
            except CatalogCorruptError as error:
                assert_corrupt_error(error, path)
                reading_the_page.discard(name)
            # Any other exception (a raw sqlite3.DatabaseError) fails the test here.
    assert reading_the_page == set()
    with SqliteCatalog(path) as catalog:
        problems = catalog.integrity()
    assert problems and all(str(path) in p or "checksum" in p for p in problems)


def test_integrity_is_empty_for_a_healthy_sqlite_catalog(tmp_path: Path) -> None:
    written_catalog(tmp_path / "c.sqlite")
    with SqliteCatalog(tmp_path / "c.sqlite") as catalog:
        assert catalog.integrity() == []


# -- migration 4 ------------------------------------------------------------------------------

OLD_VECTORS = np.array([[0.5, -1.25, 3.0, 0.125], [2.0, 0.0, -0.75, 8.0]], dtype=np.float32)
OLD_PATHS = ["/photos/a.jpg", "/photos/caf\U000f00e9.jpg"]  # the second: a private-use char


def create_version_3(where: Where) -> None:
    """A catalog as lookalike made it before migration 4: the first three migrations, then
    rows written the way that version wrote them (no checksums, no state token)."""
    if where.kind == "sqlite":
        with closing(sqlite3.connect(where.location)) as db:
            for script in SQLITE_MIGRATIONS[:3]:
                db.executescript(script)
            db.execute("PRAGMA user_version = 3")
    else:
        vector_type = "vector" if where.storage == "pgvector" else "bytea"
        if vector_type == "vector":
            where.sql("CREATE EXTENSION IF NOT EXISTS vector")
        where.sql("CREATE TABLE lookalike_schema (version INTEGER NOT NULL)")
        where.sql("INSERT INTO lookalike_schema (version) VALUES (3)")
        for script in POSTGRES_MIGRATIONS[:3]:
            where.sql(script.replace("{vector_type}", vector_type))
    where.sql("INSERT INTO settings (key, value) VALUES ('generation', '7')")
    where.sql(
        "INSERT INTO models (key, name, layer, dim, weights_sha256, preprocess, created_at)"
        " VALUES ('m', 'm', 'head', 4, 'ab', '{}', 0)"
    )
    for image_id, (path, values) in enumerate(zip(OLD_PATHS, OLD_VECTORS, strict=True), 1):
        where.sql(
            "INSERT INTO images (path, content_hash, size, mtime, width, height, metadata,"
            " added_at) VALUES (%s, 'h', 10, 1.5, 4, 3, '{}', 0)",
            (path,),
        )
        mark, value = where.vector_value(values)
        where.sql(
            f"INSERT INTO vectors (image_id, model_id, vector) VALUES (%s, 1, {mark})",
            (image_id, value),
        )
    where.sql("INSERT INTO failures (path, reason, at) VALUES (%s, 'bad', 0)", (OLD_PATHS[1],))
    where.sql("INSERT INTO local_features (image_id, kind, data) VALUES (1, 'sift', %s)", (b"old",))


def test_a_version_3_catalog_upgrades_in_place_to_the_current_version(where: Where) -> None:
    create_version_3(where)
    with where.open() as catalog:
        assert catalog.schema_version == SQLITE_SCHEMA_VERSION == len(POSTGRES_MIGRATIONS)
        # Migration 5: the image's SIFT stays, and a second kind (a thumbnail) sits beside it;
        # a changed file drops both.
        assert catalog.local_features([1], "sift") == {1: b"old"}
        catalog.store_local_features([(1, "gray32", b"thumb"), (1, "sift", b"new")])
        assert catalog.local_features([1, 2], "sift") == {1: b"new"}
        assert catalog.local_features([1, 2], "gray32") == {1: b"thumb"}
        assert catalog.ids_missing_local_features("gray32") == [(2, OLD_PATHS[1])]
        ids, vectors = catalog.vectors(1)
        assert ids.tolist() == [1, 2]
        assert vectors.tobytes() == OLD_VECTORS.tobytes()
        checksums = where.sql("SELECT image_id, checksum FROM vectors ORDER BY image_id")
        assert checksums == [(1, crc(OLD_VECTORS[0])), (2, crc(OLD_VECTORS[1]))]
        generation, token = catalog.state
        assert generation == 7 and re.fullmatch("[0-9a-f]{32}", token)
        assert catalog.verify_vectors() == [] and catalog.integrity() == []
        # Paths written before they were mapped read back as they were.
        assert catalog.paths() == dict(zip(OLD_PATHS, [1, 2], strict=True))
        assert catalog.failures() == [(OLD_PATHS[1], "bad")]
        # The upgraded catalog behaves as a new one: a second model's vectors of unchanged
        # files keep the first model's, and every write draws a new token.
        other = catalog.register_model(identity("other", 4))
        catalog.store([record(OLD_PATHS[0])], np.ones((1, 4)), other)
        np.testing.assert_array_equal(catalog.vector(1, 1), OLD_VECTORS[0])
        assert catalog.state[0] == 8 and catalog.state[1] != token
