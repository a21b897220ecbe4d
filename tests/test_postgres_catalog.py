"""What only the PostgreSQL catalog has to show: schema versions and storage kinds on a real
server, many writers at once, collections and servers on different folders sharing one catalog.

The tests shared with SQLite are in test_catalog.py, test_collection.py and
test_collection_indexes.py; these start the same session server (see conftest.postgres).
"""

from __future__ import annotations

import io
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import PHOTO_NAMES, free_port, photo, wait_healthy

from lookalike.catalog import ImageRecord, SqliteCatalog, is_postgres_url, open_catalog
from lookalike.catalog.postgres import PostgresCatalog
from lookalike.catalog.postgres_schema import MIGRATIONS as POSTGRES_MIGRATIONS
from lookalike.catalog.schema import SCHEMA_VERSION
from lookalike.core.collection import CATALOG_LINK, Collection
from lookalike.encoders import EncoderIdentity, PreprocessConfig
from lookalike.errors import CatalogError

psycopg = pytest.importorskip("psycopg")

CONFIG = PreprocessConfig(resolution=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
IDENTITY = EncoderIdentity("m", "head", 8, "ab" * 32, CONFIG)


def record(path: str, content: str = "h") -> ImageRecord:
    return ImageRecord(path, content, size=10, mtime=1.5, width=4, height=3)


def sql(url: str, statement: str) -> list[tuple]:
    with psycopg.connect(url, autocommit=True) as db:
        cursor = db.execute(statement)
        return cursor.fetchall() if cursor.description else []


def test_both_dialects_have_the_same_tables_and_columns(postgres, tmp_path: Path) -> None:
    assert len(POSTGRES_MIGRATIONS) == SCHEMA_VERSION
    url = postgres.create_database()
    PostgresCatalog(url).close()
    SqliteCatalog(tmp_path / "c.sqlite").close()
    rows = sql(
        url,
        "SELECT table_name, column_name FROM information_schema.columns "
        "WHERE table_schema = 'public' AND table_name <> 'lookalike_schema'",
    )
    in_postgres = {(table, column) for table, column in rows}
    with sqlite3.connect(tmp_path / "c.sqlite") as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        in_sqlite = {
            (table, column[1])
            for table in tables
            if not table.startswith("sqlite_")
            for column in db.execute(f"PRAGMA table_info({table})")
        }
    assert in_postgres == in_sqlite


def test_a_newer_schema_is_refused(postgres) -> None:
    url = postgres.create_database()
    PostgresCatalog(url).close()
    sql(url, "UPDATE lookalike_schema SET version = version + 1")
    with pytest.raises(CatalogError, match="newer than this lookalike"):
        PostgresCatalog(url)


def test_a_database_holding_something_else_is_refused_untouched(postgres) -> None:
    url = postgres.create_database()
    sql(url, "CREATE TABLE images (title TEXT); INSERT INTO images VALUES ('mine')")
    with pytest.raises(CatalogError, match="not a usable lookalike catalog"):
        PostgresCatalog(url)
    assert sql(url, "SELECT title FROM images") == [("mine",)]


def test_an_unreachable_server_is_a_clear_error_without_the_password(postgres) -> None:
    url = f"postgresql://someone:pa55word@127.0.0.1:{postgres.port}/does_not_exist"
    with pytest.raises(CatalogError, match="cannot connect") as caught:
        PostgresCatalog(url)
    assert "pa55word" not in str(caught.value)


def test_open_catalog_picks_the_backend_from_the_location(postgres, tmp_path: Path) -> None:
    url = postgres.create_database()
    assert is_postgres_url(url) and is_postgres_url(url.replace("postgresql", "postgres", 1))
    assert not is_postgres_url(str(tmp_path / "c.sqlite"))
    with open_catalog(url) as pg, open_catalog(tmp_path / "c.sqlite") as lite:
        assert isinstance(pg, PostgresCatalog) and isinstance(lite, SqliteCatalog)


def test_vectors_use_pgvector_when_the_server_has_it_and_bytea_otherwise(postgres) -> None:
    if not postgres.has_pgvector:
        pytest.skip("this PostgreSQL build has no pgvector")
    vectors = np.random.default_rng(1).normal(size=(2, 8)).astype(np.float32)
    urls = {}
    for storage in ("auto", "bytea"):
        urls[storage] = postgres.create_database()
        with PostgresCatalog(urls[storage], vector_storage=storage) as catalog:
            model = catalog.register_model(IDENTITY)
            catalog.store([record("/a.jpg"), record("/b.jpg")], vectors, model)
            assert catalog.vectors(model)[1].tobytes() == vectors.tobytes()
    with PostgresCatalog(urls["auto"]) as reopened:
        assert reopened.vector_storage == "pgvector"
    # The pgvector column is a real vector: the server computes with it.
    pair = "SELECT a.vector <=> b.vector FROM vectors a, vectors b WHERE a.image_id < b.image_id"
    (distance,) = sql(urls["auto"], pair)[0]
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    assert distance == pytest.approx(1 - float(unit[0] @ unit[1]), abs=1e-5)
    assert sql(urls["bytea"], "SELECT octet_length(vector) FROM vectors") == [(32,), (32,)]
    with pytest.raises(CatalogError, match="stores vectors as pgvector"):
        PostgresCatalog(urls["auto"], vector_storage="bytea")
    with pytest.raises(CatalogError, match="vector storage must be"):
        PostgresCatalog(urls["auto"], vector_storage="float16")


def test_processes_opening_a_new_catalog_at_once_migrate_it_once(postgres) -> None:
    url = postgres.create_database()
    versions, errors = [], []

    def open_it() -> None:
        try:
            with PostgresCatalog(url) as catalog:
                versions.append(catalog.schema_version)
        except CatalogError as error:  # pragma: no cover - the assertion below shows it
            errors.append(error)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and versions == [SCHEMA_VERSION] * 4
    assert sql(url, "SELECT COUNT(*) FROM lookalike_schema") == [(1,)]


def test_concurrent_writers_get_distinct_generations_and_never_deadlock(postgres) -> None:
    url = postgres.create_database()
    with PostgresCatalog(url) as first:
        model = first.register_model(IDENTITY)
        start = first.generation
    writers, rounds = 4, 8
    paths = [f"/shared/{i:03d}.jpg" for i in range(40)]
    seen: list[int] = []
    written: set[str] = set()
    errors: list[Exception] = []

    def write(seed: int) -> None:
        rng = random.Random(seed)
        try:
            with PostgresCatalog(url) as catalog:
                for _ in range(rounds):
                    # Overlapping batches in different orders: a naive upsert deadlocks here.
                    batch = rng.sample(paths, 20)
                    written.update(batch)
                    catalog.store([record(p) for p in batch], np.ones((20, 8)), model)
                    seen.append(catalog.last_written_generation)
        except Exception as error:  # pragma: no cover - the assertion below shows it
            errors.append(error)

    threads = [threading.Thread(target=write, args=(seed,)) for seed in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(seen) == list(range(start + 1, start + writers * rounds + 1))
    with PostgresCatalog(url) as catalog:
        assert catalog.generation == start + writers * rounds
        assert set(catalog.paths()) == written
        assert len(catalog.vectors(model)[0]) == len(written)


def test_two_folders_sharing_one_catalog_search_alike_and_see_each_other(
    postgres, photo_dir: Path, tmp_path: Path, encoder
) -> None:
    url = postgres.create_database()
    with (
        Collection(tmp_path / "one", db=url) as one,
        Collection(tmp_path / "two", db=url) as two,
    ):
        one.use_encoder(encoder)
        two.use_encoder(encoder)
        one.index(photo_dir, workers=0)
        for name in ("astronaut", "coffee"):
            expected = one.search(photo(name), k=6)
            found = two.search(photo(name), k=6)
            assert [(r.id, r.path) for r in found] == [(r.id, r.path) for r in expected]
            np.testing.assert_allclose([r.score for r in found], [r.score for r in expected])
        rebuilds = one.indexes.rebuilds
        extra = tmp_path / "extra"
        extra.mkdir()
        photo("camera").save(extra / "camera.jpg")
        added = two.add_file(extra / "camera.jpg")
        best = one.search(extra / "camera.jpg", k=1)[0]
        assert best.id == added and best.score == pytest.approx(1.0, abs=1e-4)
        assert one.indexes.rebuilds == rebuilds + 1  # its index was stale, so rebuilt
        two.remove([photo_dir / "rocket.jpg"])
        assert "rocket.jpg" not in {Path(r.path).name for r in one.search(photo("rocket"), k=7)}
        assert len(one) == len(two) == len(PHOTO_NAMES)


def test_pgvector_and_bytea_catalogs_give_identical_results(
    postgres, photo_dir: Path, tmp_path: Path, encoder
) -> None:
    if not postgres.has_pgvector:
        pytest.skip("this PostgreSQL build has no pgvector")
    responses = []
    for storage in ("pgvector", "bytea"):
        catalog = PostgresCatalog(postgres.create_database(), vector_storage=storage)
        with Collection(tmp_path / storage, db=catalog) as collection:
            collection.use_encoder(encoder)
            collection.index(photo_dir, workers=0)
            response = collection.search(photo("chelsea"), k=6, metric="euclidean")
            responses.append([(r.id, r.path, r.score) for r in response])
    assert responses[0] == responses[1]


def test_the_folder_remembers_its_catalog_but_not_the_password(
    postgres, photo_dir: Path, tmp_path: Path, encoder
) -> None:
    url = postgres.create_database()
    with_password = url.replace("postgres@", "postgres:hunter2@", 1)
    with Collection(tmp_path / "c", db=with_password) as collection:
        collection.use_encoder(encoder)
        collection.index(photo_dir, workers=0)
    link = (tmp_path / "c" / CATALOG_LINK).read_text()
    assert link.strip() == url and "hunter2" not in link
    assert not (tmp_path / "c" / "catalog.sqlite").exists()
    with Collection(tmp_path / "c") as reopened:
        assert isinstance(reopened.catalog, PostgresCatalog)
        assert len(reopened) == len(PHOTO_NAMES)


def test_a_folder_switched_to_another_catalog_never_uses_the_old_index(
    postgres, photo_dir: Path, tmp_path: Path, encoder
) -> None:
    few = tmp_path / "few"
    few.mkdir()
    for name in ("coffee", "rocket", "retina"):
        photo(name).save(few / f"{name}.jpg")
    big, small = postgres.create_database(), postgres.create_database()
    with Collection(tmp_path / "other", db=small) as other:
        other.use_encoder(encoder)
        other.index(few, workers=0)  # one batch: generation 1, as in the big catalog
    with Collection(tmp_path / "c", db=big) as collection:
        collection.use_encoder(encoder)
        collection.index(photo_dir, workers=0)
        generation = collection.catalog.generation
        collection.search(photo("coffee"), k=1)
    with Collection(tmp_path / "c", db=small) as switched:
        switched.use_encoder(encoder)
        assert switched.catalog.generation == generation
        found = switched.search(photo("coffee"), k=10)
        assert sorted(Path(r.path).name for r in found) == [
            "coffee.jpg",
            "retina.jpg",
            "rocket.jpg",
        ]
        assert switched.indexes.rebuilds == 1


def test_cli_and_a_multi_worker_server_share_the_catalog_with_a_library_user(
    postgres, photo_dir: Path, tmp_path: Path
) -> None:
    import httpx

    url = postgres.create_database()
    environment = {**os.environ, "LOOKALIKE_DB": url}
    cli = [sys.executable, "-m", "lookalike.cli"]
    indexed = subprocess.run(
        [*cli, "--db", url, "-c", str(tmp_path / "cli"), "index", str(photo_dir), "-q"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert indexed.returncode == 0, indexed.stderr
    assert f"{len(PHOTO_NAMES)} added" in indexed.stdout
    port = free_port()
    serve = ["serve", "--workers", "2", "--port", str(port), "--token", "t"]
    server = subprocess.Popen(
        [*cli, "-c", str(tmp_path / "served"), *serve],
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
            wait_healthy(http, server)
            # The library builds the encoder the CLI recorded (model, pooling, precision).
            with Collection(tmp_path / "library", db=url) as library:
                (image_id,) = library.catalog.ids_for_paths(
                    [str((photo_dir / "astronaut.jpg").resolve())]
                ).values()
                stored = library.catalog.vector(image_id, library.model_id)
                expected = [(r.id, r.score) for r in library.search_vector(stored, k=4)]
                # Several requests, so that both workers answer from the shared catalog: each
                # built its index from the catalog, and all agree to the last bit.
                for _ in range(4):
                    reply = http.get(f"/images/{image_id}/similar", params={"k": 4})
                    assert reply.status_code == 200, reply.text
                    assert [(r["id"], r["score"]) for r in reply.json()["results"]] == expected
                upload = _jpeg(photo("camera"))
                added = http.post(
                    "/images",
                    files={"image": ("camera.jpg", upload)},
                    headers={"Authorization": "Bearer t"},
                )
                assert added.status_code == 201, added.text
                best = library.search(io.BytesIO(upload), k=1)[0]
                assert best.id == added.json()["id"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        server.stderr.close()


def _jpeg(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()
