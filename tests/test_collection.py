"""A collection end to end on real photos: index, search, incremental updates, bad files;
each test runs on a SQLite and on a PostgreSQL catalog."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import PHOTO_NAMES, photo, variants

from lookalike.core.collection import Collection
from lookalike.errors import EmptyCollectionError, LookalikeError


@pytest.fixture
def folder(photo_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "photos"
    shutil.copytree(photo_dir, target)
    return target


@pytest.fixture
def collection(tmp_path: Path, encoder, catalog_db):
    with Collection(tmp_path / "collection", db=catalog_db()) as opened:
        opened.use_encoder(encoder)  # share the session's encoder; building one takes seconds
        yield opened


def all_images(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.jpg"))


def test_index_then_each_image_finds_itself_first(collection: Collection, folder: Path) -> None:
    report = collection.index(folder, batch_size=4, workers=2)
    assert (report.added, report.failed) == (len(PHOTO_NAMES), [])
    assert len(collection) == len(PHOTO_NAMES)
    for path in all_images(folder):
        response = collection.search(path, k=3)
        assert response[0].path == str(path.resolve())
        assert response[0].score == pytest.approx(1.0, abs=1e-4)
        assert response[1].score < 0.9
        assert [r.score for r in response] == sorted((r.score for r in response), reverse=True)


@pytest.mark.parametrize("edit", ["half", "crop", "bright", "mirror"])
def test_a_query_not_in_the_collection_finds_its_original(
    collection: Collection, folder: Path, edit: str
) -> None:
    collection.index(folder, workers=0)
    for name in ("astronaut", "coffee", "chelsea"):
        query = variants(photo(name))[edit]
        best = collection.search(query, k=2)
        assert Path(best[0].path).stem == name
        assert best[0].score > 0.75
        assert best[0].score - best[1].score > 0.1


def test_metrics_agree_on_the_best_match(collection: Collection, folder: Path) -> None:
    collection.index(folder, workers=0)
    query = variants(photo("rocket"))["half"]
    cosine = collection.search(query, k=3, metric="cosine")
    euclidean = collection.search(query, k=3, metric="euclidean")
    dot = collection.search(query, k=3, metric="dot")
    assert Path(cosine[0].path).stem == Path(euclidean[0].path).stem == "rocket"
    assert Path(dot[0].path).stem == "rocket"
    assert [r.score for r in euclidean] == sorted(r.score for r in euclidean)
    assert euclidean[0].score > 0


def test_threshold_gives_no_close_match(collection: Collection, folder: Path) -> None:
    collection.index(folder, workers=0)
    from skimage import data

    unrelated = data.checkerboard()
    loose = collection.search(unrelated, k=3, threshold=0.0)
    strict = collection.search(unrelated, k=3, threshold=0.95)
    assert len(loose) == 3
    assert strict.no_close_match
    assert strict.best_score is not None and strict.best_score < 0.95
    close = collection.search(folder / "astronaut.jpg", k=3, threshold=0.95)
    assert [Path(r.path).stem for r in close] == ["astronaut"]
    far = collection.search(folder / "astronaut.jpg", k=3, metric="euclidean", threshold=1e-3)
    assert [Path(r.path).stem for r in far] == ["astronaut"]


def test_files_moved_between_runs_keep_their_ids_and_are_not_embedded_again(
    collection: Collection, folder: Path
) -> None:
    collection.index(folder, workers=0)
    before = collection.catalog.paths()
    rocket, cat = folder / "rocket.jpg", folder / "nested" / "chelsea.jpg"
    rocket_id, cat_id = before[str(rocket.resolve())], before[str(cat.resolve())]
    (folder / "moved").mkdir()
    os.rename(rocket, folder / "moved" / "rocket renamed.jpg")  # keeps its mtime
    shutil.copyfile(cat, folder / "cat-copy.jpg")  # a copy, then the original deleted: new mtime
    cat.unlink()
    # Same size, other bytes: a new image, not a move.
    other = folder / "nested" / "deeper" / "coffee.jpg"
    data = bytearray(other.read_bytes())
    data[-3] ^= 0xFF
    (folder / "other.jpg").write_bytes(bytes(data))
    other.unlink()

    report = collection.index(folder, workers=0)
    assert (report.moved, report.added, report.removed) == (2, 1, 1)
    assert report.embedded == 1  # only the edited file
    after = collection.catalog.paths()
    assert after[str((folder / "moved" / "rocket renamed.jpg").resolve())] == rocket_id
    assert after[str((folder / "cat-copy.jpg").resolve())] == cat_id
    assert collection.search(photo("rocket"), k=1)[0].id == rocket_id
    again = collection.index(folder, workers=0)
    assert (again.moved, again.embedded, again.unchanged) == (0, 0, 6)


def test_reindex_is_incremental(collection: Collection, folder: Path) -> None:
    collection.index(folder, workers=0)
    again = collection.index(folder, workers=0)
    assert (again.added, again.updated, again.removed, again.unchanged) == (0, 0, 0, 6)

    (folder / "rocket.jpg").unlink()
    photo("chelsea").rotate(90, expand=True).save(folder / "new_cat.jpg")
    changed = folder / "nested" / "chelsea.jpg"
    photo("camera").save(changed)
    os.utime(changed, (1_000_000, 1_000_000))
    report = collection.index(folder, workers=0)
    assert (report.added, report.updated, report.removed, report.unchanged) == (1, 1, 1, 4)
    assert len(collection) == 6
    found = collection.search(photo("camera"), k=1)
    assert found[0].path == str(changed.resolve())
    paths = [r.path for r in collection.search(photo("rocket"), k=10)]
    assert str((folder / "rocket.jpg").resolve()) not in paths


def test_bad_files_are_skipped_and_listed(collection: Collection, folder: Path) -> None:
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("not an image")
    good = (folder / "astronaut.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "readme.txt").write_text("ignored: not an image suffix")
    report = collection.index(folder, workers=2)
    failed = {Path(p).name for p, _ in report.failed}
    assert failed == {"empty.jpg", "notes.png", "truncated.jpg"}
    assert report.added == len(PHOTO_NAMES)
    assert {Path(p).name for p, _ in collection.info().failures} == failed
    (folder / "empty.jpg").unlink()
    collection.index(folder, workers=0)
    assert {Path(p).name for p, _ in collection.info().failures} == failed - {"empty.jpg"}


def test_metadata_from_csv_comes_back_with_results(
    collection: Collection, folder: Path, tmp_path: Path
) -> None:
    csv_path = tmp_path / "meta.csv"
    csv_path.write_text(
        "filename,title,artist\n"
        "astronaut.jpg,Eileen Collins,NASA\n"
        "nested/chelsea.jpg,Chelsea the cat,Stefan\n"
        "missing.jpg,Nobody,None\n"
    )
    collection.index(folder, workers=0, metadata_csv=csv_path)
    hit = collection.search(folder / "astronaut.jpg", k=1)[0]
    assert hit.metadata == {"title": "Eileen Collins", "artist": "NASA"}
    cat = collection.search(photo("chelsea"), k=1)[0]
    assert cat.metadata["title"] == "Chelsea the cat"
    only_nasa = collection.search(photo("chelsea"), k=5, where={"artist": "NASA"})
    assert [Path(r.path).stem for r in only_nasa] == ["astronaut"]


def test_remove_by_path_and_id(collection: Collection, folder: Path) -> None:
    collection.index(folder, workers=0)
    first = collection.search(folder / "rocket.jpg", k=1)[0]
    assert collection.remove([first.id]) == 1
    assert collection.remove([folder / "astronaut.jpg"]) == 1
    assert len(collection) == 4
    stems = {Path(r.path).stem for r in collection.search(photo("rocket"), k=10)}
    assert "rocket" not in stems and "astronaut" not in stems


def test_switching_model_never_mixes_vectors(
    tmp_path: Path, folder: Path, encoder, catalog_db
) -> None:
    with Collection(tmp_path / "c", db=catalog_db()) as collection:
        collection.use_encoder(encoder)
        collection.index(folder, workers=0)
    with Collection(tmp_path / "c", layer="stage6") as mid:
        assert mid.info().models[0]["vectors"] == 6
        report = mid.index(folder, workers=0)
        assert report.updated == 6 and report.added == 0
        assert mid.encoder.dim == 192
        _, vectors = mid.catalog.vectors(mid.model_id)
        assert vectors.shape == (6, 192)
        assert mid.search(folder / "astronaut.jpg", k=1)[0].score == pytest.approx(1.0, abs=1e-4)
    with Collection(tmp_path / "c") as reopened:
        assert reopened.layer == "stage6"  # the choice is remembered


def test_searching_an_empty_collection_is_a_clear_error(collection: Collection) -> None:
    with pytest.raises(EmptyCollectionError):
        collection.search(photo("coffee"))


def test_bad_search_arguments(collection: Collection, folder: Path) -> None:
    collection.index(folder, workers=0)
    with pytest.raises(LookalikeError, match="unknown metric"):
        collection.search(photo("coffee"), metric="manhattan")
    with pytest.raises(LookalikeError, match="k must be"):
        collection.search(photo("coffee"), k=0)
    with pytest.raises(LookalikeError, match="not a folder"):
        collection.index(folder / "nope")
    with pytest.raises(LookalikeError, match="dim"):
        collection.search_vector(np.ones(5))


def test_k_larger_than_the_collection(collection: Collection, folder: Path) -> None:
    collection.index(folder, workers=0)
    assert len(collection.search(photo("coffee"), k=100)) == len(PHOTO_NAMES)


def test_two_folders_keep_their_own_images_and_failures(
    collection: Collection, folder: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    other.mkdir()
    photo("coffee").save(other / "cup.jpg")
    (other / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    collection.index(other, workers=0)
    collection.index(folder, workers=0)
    assert len(collection) == len(PHOTO_NAMES) + 1  # indexing one folder keeps the other's
    assert [Path(p).name for p, _ in collection.info().failures] == ["broken.jpg"]


def test_a_home_relative_folder_and_collection_path_are_expanded(
    photo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, encoder
) -> None:
    """``Collection("~/...")`` and ``index("~/...")``, as the README writes them, mean the
    home folder, not a folder called "~" in the current one."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    shutil.copytree(photo_dir, tmp_path / "Pictures")
    with Collection("~/photos", encoder=encoder) as collection:
        assert collection.path == tmp_path / "photos"
        assert collection.index("~/Pictures", workers=0).added == len(PHOTO_NAMES)
    assert not (tmp_path / "~").exists()
