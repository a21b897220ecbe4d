"""Both catalogs (SQLite, and PostgreSQL with pgvector or bytea vectors) by the same tests:
schema versions, storing and replacing, removal, models kept apart, local features."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from lookalike.catalog import Catalog, ImageRecord, SqliteCatalog
from lookalike.catalog.schema import SCHEMA_VERSION
from lookalike.encoders import EncoderIdentity, PreprocessConfig
from lookalike.errors import CatalogError, ModelMismatchError

CONFIG = PreprocessConfig(resolution=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def identity(name: str = "m", dim: int = 7) -> EncoderIdentity:
    return EncoderIdentity(name, "head", dim, "ab" * 32, CONFIG)


def record(path: str, content: str = "h", **metadata: str) -> ImageRecord:
    return ImageRecord(path, content, size=10, mtime=1.5, width=4, height=3, metadata=metadata)


@pytest.fixture(params=["sqlite", "postgresql-pgvector", "postgresql-bytea"])
def catalog(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "sqlite":
        opened: Catalog = SqliteCatalog(tmp_path / "c.sqlite")
    else:
        from lookalike.catalog.postgres import PostgresCatalog

        server = request.getfixturevalue("postgres")
        storage = request.param.partition("-")[2]
        if storage == "pgvector" and not server.has_pgvector:
            pytest.skip("this PostgreSQL build has no pgvector")
        opened = PostgresCatalog(server.create_database(), vector_storage=storage)
    with opened:
        yield opened


def test_fresh_catalog_is_at_the_latest_schema(catalog: Catalog) -> None:
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


def test_store_round_trips_records_and_vectors_exactly(catalog: Catalog) -> None:
    model = catalog.register_model(identity())
    vectors = np.random.default_rng(3).normal(size=(3, 7)).astype(np.float32)
    ids = catalog.store(
        [record("/a.jpg", title="A"), record("/b.jpg"), record("/c.jpg")], vectors, model
    )
    stored_ids, stored = catalog.vectors(model)
    assert stored_ids.tolist() == ids
    np.testing.assert_array_equal(stored, vectors)
    assert catalog.images([ids[0]])[ids[0]].metadata == {"title": "A"}


def test_storing_a_path_again_replaces_it(catalog: Catalog) -> None:
    model = catalog.register_model(identity())
    first = catalog.store([record("/a.jpg", "h1")], np.ones((1, 7)), model)
    second = catalog.store([record("/a.jpg", "h2")], np.full((1, 7), 2.0), model)
    assert first == second
    assert catalog.count() == 1
    _, vectors = catalog.vectors(model)
    assert vectors.tolist() == [[2.0] * 7]
    assert catalog.images(first)[first[0]].content_hash == "h2"


def test_models_are_kept_apart(catalog: Catalog) -> None:
    small = catalog.register_model(identity("small", 7))
    big = catalog.register_model(identity("big", 9))
    assert small != big
    assert catalog.register_model(identity("small", 7)) == small
    catalog.store([record("/a.jpg")], np.ones((1, 7)), small)
    assert catalog.vectors(big)[0].size == 0
    assert catalog.ids_missing_vectors(big) == [(1, "/a.jpg")]
    with pytest.raises(ModelMismatchError):
        catalog.store([record("/b.jpg")], np.ones((1, 7)), big)


def test_removal_cascades_to_vectors_and_bumps_generation(catalog: Catalog) -> None:
    model = catalog.register_model(identity())
    ids = catalog.store([record("/a.jpg"), record("/b.jpg")], np.ones((2, 7)), model)
    before = catalog.generation
    assert catalog.remove([ids[0], 999]) == 1
    assert catalog.generation > before
    assert catalog.vectors(model)[0].tolist() == [ids[1]]


def test_metadata_merges(catalog: Catalog) -> None:
    model = catalog.register_model(identity())
    (image_id,) = catalog.store([record("/a.jpg", title="A")], np.ones((1, 7)), model)
    catalog.update_metadata(image_id, {"artist": "B"})
    assert catalog.images([image_id])[image_id].metadata == {"title": "A", "artist": "B"}
    with pytest.raises(CatalogError):
        catalog.update_metadata(12345, {"x": "y"})


def test_failures_are_remembered_until_the_file_is_indexed(catalog: Catalog) -> None:
    model = catalog.register_model(identity())
    catalog.record_failure("/bad.jpg", "truncated")
    assert catalog.failures() == [("/bad.jpg", "truncated")]
    catalog.store([record("/bad.jpg")], np.ones((1, 7)), model)
    assert catalog.failures() == []


def test_special_float_values_round_trip_bit_for_bit(catalog: Catalog) -> None:
    model = catalog.register_model(identity(dim=6))
    tiny = np.finfo(np.float32).smallest_subnormal
    vectors = np.array(
        [[0.0, -0.0, tiny, -tiny, np.finfo(np.float32).max, 1 / 3]], dtype=np.float32
    )
    (image_id,) = catalog.store([record("/a.jpg")], vectors, model)
    for stored in (
        catalog.vectors(model)[1],
        catalog.vectors_for([image_id], model),
        catalog.vector(image_id, model)[None, :],
    ):
        assert stored.dtype == np.float32
        assert stored.tobytes() == vectors.tobytes()


def test_vectors_for_keeps_the_order_asked_and_names_missing_ids(catalog: Catalog) -> None:
    model = catalog.register_model(identity())
    vectors = np.arange(21, dtype=np.float32).reshape(3, 7)
    ids = catalog.store([record("/a.jpg"), record("/b.jpg"), record("/c.jpg")], vectors, model)
    np.testing.assert_array_equal(catalog.vectors_for(ids[::-1], model), vectors[::-1])
    assert catalog.vector(999, model) is None
    with pytest.raises(CatalogError, match="999"):
        catalog.vectors_for([ids[0], 999], model)


def test_a_batch_naming_a_path_twice_keeps_the_last(catalog: Catalog) -> None:
    model = catalog.register_model(identity())
    ids = catalog.store(
        [record("/a.jpg", "h1"), record("/b.jpg"), record("/a.jpg", "h2")],
        np.array([[1.0] * 7, [2.0] * 7, [3.0] * 7]),
        model,
    )
    assert ids[0] == ids[2] != ids[1]
    assert catalog.count() == 2
    assert catalog.vector(ids[0], model).tolist() == [3.0] * 7
    assert catalog.images([ids[0]])[ids[0]].content_hash == "h2"


def test_new_content_drops_other_models_vectors_and_local_features(
    catalog: Catalog,
) -> None:
    small = catalog.register_model(identity("small", 7))
    big = catalog.register_model(identity("big", 9))
    (image_id,) = catalog.store([record("/a.jpg", "h1")], np.ones((1, 7)), small)
    catalog.store([record("/a.jpg", "h1")], np.ones((1, 9)), big)
    assert catalog.store_local_features([(image_id, "sift", b"old")]) == 1
    stale = catalog.store_local_features(
        [(image_id, "sift", b"stale")], content_hashes={image_id: "h0"}
    )
    assert stale == 0
    assert catalog.local_features([image_id], "sift") == {image_id: b"old"}
    assert catalog.local_features_summary() == {"sift": (1, 3)}
    assert catalog.vector(image_id, big) is not None
    catalog.store([record("/a.jpg", "h1")], np.full((1, 7), 2.0), small)  # same content
    assert catalog.local_features([image_id], "sift") == {image_id: b"old"}
    # An unchanged file keeps every model's vectors (a model switch builds beside them)...
    assert catalog.vector(image_id, big) is not None
    catalog.store([record("/a.jpg", "h2")], np.full((1, 7), 3.0), small)  # new content
    assert catalog.vector(image_id, big) is None  # ... new content drops the others'
    assert catalog.local_features([image_id], "sift") == {}
    assert catalog.ids_missing_local_features("sift") == [(image_id, "/a.jpg")]
    with pytest.raises(CatalogError, match="no images with ids"):
        catalog.store_local_features([(4242, "sift", b"x")])


def test_file_states_paths_and_settings(catalog: Catalog) -> None:
    model = catalog.register_model(identity())
    ids = catalog.store(
        [record("/photos/a.jpg"), record("/photos/b.jpg"), record("/photos2/c.jpg")],
        np.ones((3, 7)),
        model,
    )
    states = catalog.file_states("/photos/")
    assert sorted(states) == ["/photos/a.jpg", "/photos/b.jpg"]
    assert states["/photos/a.jpg"].id == ids[0]
    assert states["/photos/a.jpg"].mtime == 1.5
    assert len(catalog.file_states()) == 3
    assert catalog.ids_for_paths(["/photos2/c.jpg", "/nope.jpg"]) == {"/photos2/c.jpg": ids[2]}
    catalog.touch(ids[0], size=99, mtime=2.25)
    assert catalog.file_states("/photos/a.jpg")["/photos/a.jpg"].size == 99
    assert catalog.paths() == dict(
        zip(["/photos/a.jpg", "/photos/b.jpg", "/photos2/c.jpg"], ids, strict=True)
    )
    assert catalog.get_setting("colour", "none") == "none"
    catalog.set_setting("colour", "red")
    catalog.set_setting("colour", "blue")
    assert catalog.get_setting("colour") == "blue"
    assert [m["vectors"] for m in catalog.models()] == [3]
    catalog.clear_failures([])
    assert catalog.remove([]) == 0
