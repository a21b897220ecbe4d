"""A collection's vector indexes stay consistent with its catalog, whatever happens to the files,
on a SQLite and on a PostgreSQL catalog."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import photo, variants

from lookalike.core.collection import Collection
from lookalike.errors import IndexSpecError
from lookalike.knn import ExactIndex, read_index_header


@pytest.fixture
def folder(photo_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "photos"
    shutil.copytree(photo_dir, target)
    return target


def open_collection(path: Path, encoder, **options) -> Collection:
    collection = Collection(path, **options)
    collection.use_encoder(encoder)
    return collection


def index_file(collection: Collection) -> Path:
    return collection.indexes.path(
        collection.encoder.identity.key, collection.vector_index().metric
    )


def test_small_collections_use_exact_search(
    tmp_path: Path, folder: Path, encoder, catalog_db
) -> None:
    with open_collection(tmp_path / "c", encoder, db=catalog_db()) as collection:
        collection.index(folder, workers=0)
        assert isinstance(collection.vector_index().index, ExactIndex)
        assert collection.info().index_spec == "auto"
        header = read_index_header(index_file(collection))
        assert header["metadata"]["generation"] == collection.catalog.generation
        assert header["count"] == 6


@pytest.mark.parametrize("spec", ["hnsw:M=8,ef=64", "annoy:trees=10", "lsh:bits=4,tables=4"])
def test_a_named_spec_finds_what_exact_finds(
    tmp_path: Path, folder: Path, encoder, spec: str, catalog_db
) -> None:
    with (
        open_collection(tmp_path / "exact", encoder, index_spec="exact", db=catalog_db()) as exact,
        open_collection(tmp_path / "ann", encoder, index_spec=spec, db=catalog_db()) as ann,
    ):
        exact.index(folder, workers=0)
        ann.index(folder, workers=0)
        assert ann.vector_index().index.spec.startswith(spec.partition(":")[0])
        for name in ("astronaut", "coffee", "rocket"):
            query = variants(photo(name))["half"]
            expected = [Path(r.path).name for r in exact.search(query, k=3)]
            found = [Path(r.path).name for r in ann.search(query, k=3)]
            assert found[0] == expected[0] == f"{name}.jpg"
    with Collection(tmp_path / "ann") as reopened:
        assert reopened.info().index_spec == spec  # remembered by the collection


def test_changes_update_the_index_without_a_rebuild(
    tmp_path: Path, folder: Path, encoder, catalog_db
) -> None:
    db = catalog_db()
    with open_collection(tmp_path / "c", encoder, index_spec="hnsw:M=8", db=db) as collection:
        collection.index(folder, workers=0)
        collection.search(photo("coffee"), k=1)
        rebuilds = collection.indexes.rebuilds
        photo("camera").save(folder / "camera.jpg")
        collection.index(folder, workers=0)
        collection.remove([folder / "rocket.jpg"])
        found = collection.search(photo("camera"), k=6)
        assert Path(found[0].path).name == "camera.jpg"
        assert "rocket.jpg" not in {Path(r.path).name for r in found}
        assert collection.indexes.rebuilds == rebuilds
        header = read_index_header(index_file(collection))
        assert header["metadata"]["generation"] == collection.catalog.generation
        assert header["count"] == 6


def test_a_change_by_another_process_is_seen(
    tmp_path: Path, folder: Path, encoder, catalog_db
) -> None:
    with (
        open_collection(tmp_path / "c", encoder, db=catalog_db()) as first,
        open_collection(tmp_path / "c", encoder) as second,
    ):
        first.index(folder, workers=0)
        assert Path(first.search(folder / "rocket.jpg", k=1)[0].path).name == "rocket.jpg"
        second.remove([folder / "rocket.jpg"])
        names = {Path(r.path).name for r in first.search(folder / "rocket.jpg", k=10)}
        assert "rocket.jpg" not in names and len(names) == 5


def test_a_stale_index_file_is_rebuilt_not_used(
    tmp_path: Path, folder: Path, encoder, catalog_db
) -> None:
    with open_collection(tmp_path / "c", encoder, db=catalog_db()) as collection:
        collection.index(folder, workers=0)
        path = index_file(collection)
        old = path.read_bytes()
        collection.remove([folder / "astronaut.jpg"])
    path.write_bytes(old)  # e.g. restored from a backup taken before the removal
    with open_collection(tmp_path / "c", encoder) as reopened:
        names = {Path(r.path).name for r in reopened.search(photo("astronaut"), k=10)}
        assert "astronaut.jpg" not in names
        assert reopened.indexes.rebuilds == 1


def test_a_corrupt_index_file_is_rebuilt(tmp_path: Path, folder: Path, encoder, catalog_db) -> None:
    with open_collection(tmp_path / "c", encoder, db=catalog_db()) as collection:
        collection.index(folder, workers=0)
        path = index_file(collection)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with open_collection(tmp_path / "c", encoder) as reopened:
        best = reopened.search(photo("coffee"), k=1)[0]
        assert Path(best.path).name == "coffee.jpg"
        assert reopened.indexes.rebuilds == 1
    assert read_index_header(path)["count"] == 6  # rewritten whole


def test_a_bad_spec_is_refused_up_front(tmp_path: Path) -> None:
    with pytest.raises(IndexSpecError, match="unknown index backend"):
        Collection(tmp_path / "c", index_spec="kdtree")
    with pytest.raises(IndexSpecError, match="unknown option"):
        Collection(tmp_path / "c", index_spec="hnsw:depth=3")
