"""The SQLite catalog: schema versions, storing and replacing, removal, models kept apart."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from lookalike.catalog import ImageRecord, SqliteCatalog
from lookalike.catalog.schema import SCHEMA_VERSION
from lookalike.encoders import EncoderIdentity, PreprocessConfig
from lookalike.errors import CatalogError, ModelMismatchError

CONFIG = PreprocessConfig(resolution=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def identity(name: str = "m", dim: int = 7) -> EncoderIdentity:
    return EncoderIdentity(name, "head", dim, "ab" * 32, CONFIG)


def record(path: str, content: str = "h", **metadata: str) -> ImageRecord:
    return ImageRecord(path, content, size=10, mtime=1.5, width=4, height=3, metadata=metadata)


@pytest.fixture
def catalog(tmp_path: Path):
    with SqliteCatalog(tmp_path / "c.sqlite") as opened:
        yield opened


def test_fresh_catalog_is_at_the_latest_schema(catalog: SqliteCatalog) -> None:
    assert catalog.schema_version == SCHEMA_VERSION
    assert catalog.count() == 0


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    SqliteCatalog(path).close()
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(CatalogError, match="newer than this lookalike"):
        SqliteCatalog(path)


def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(CatalogError, match="not a usable lookalike catalog"):
        SqliteCatalog(path)


def test_store_round_trips_records_and_vectors_exactly(catalog: SqliteCatalog) -> None:
    model = catalog.register_model(identity())
    vectors = np.random.default_rng(3).normal(size=(3, 7)).astype(np.float32)
    ids = catalog.store(
        [record("/a.jpg", title="A"), record("/b.jpg"), record("/c.jpg")], vectors, model
    )
    stored_ids, stored = catalog.vectors(model)
    assert stored_ids.tolist() == ids
    np.testing.assert_array_equal(stored, vectors)
    assert catalog.images([ids[0]])[ids[0]].metadata == {"title": "A"}


def test_storing_a_path_again_replaces_it(catalog: SqliteCatalog) -> None:
    model = catalog.register_model(identity())
    first = catalog.store([record("/a.jpg", "h1")], np.ones((1, 7)), model)
    second = catalog.store([record("/a.jpg", "h2")], np.full((1, 7), 2.0), model)
    assert first == second
    assert catalog.count() == 1
    _, vectors = catalog.vectors(model)
    assert vectors.tolist() == [[2.0] * 7]
    assert catalog.images(first)[first[0]].content_hash == "h2"


def test_models_are_kept_apart(catalog: SqliteCatalog) -> None:
    small = catalog.register_model(identity("small", 7))
    big = catalog.register_model(identity("big", 9))
    assert small != big
    assert catalog.register_model(identity("small", 7)) == small
    catalog.store([record("/a.jpg")], np.ones((1, 7)), small)
    assert catalog.vectors(big)[0].size == 0
    assert catalog.ids_missing_vectors(big) == [(1, "/a.jpg")]
    with pytest.raises(ModelMismatchError):
        catalog.store([record("/b.jpg")], np.ones((1, 7)), big)


def test_removal_cascades_to_vectors_and_bumps_generation(catalog: SqliteCatalog) -> None:
    model = catalog.register_model(identity())
    ids = catalog.store([record("/a.jpg"), record("/b.jpg")], np.ones((2, 7)), model)
    before = catalog.generation
    assert catalog.remove([ids[0], 999]) == 1
    assert catalog.generation > before
    assert catalog.vectors(model)[0].tolist() == [ids[1]]


def test_metadata_merges(catalog: SqliteCatalog) -> None:
    model = catalog.register_model(identity())
    (image_id,) = catalog.store([record("/a.jpg", title="A")], np.ones((1, 7)), model)
    catalog.update_metadata(image_id, {"artist": "B"})
    assert catalog.images([image_id])[image_id].metadata == {"title": "A", "artist": "B"}
    with pytest.raises(CatalogError):
        catalog.update_metadata(12345, {"x": "y"})


def test_failures_are_remembered_until_the_file_is_indexed(catalog: SqliteCatalog) -> None:
    model = catalog.register_model(identity())
    catalog.record_failure("/bad.jpg", "truncated")
    assert catalog.failures() == [("/bad.jpg", "truncated")]
    catalog.store([record("/bad.jpg")], np.ones((1, 7)), model)
    assert catalog.failures() == []
