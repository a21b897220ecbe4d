"""``lookalike check [--repair]``: the whole collection verified (catalog file, vector
checksums, derived files, files changed on disk), what can be repaired repaired, and a catalog
too damaged to open explained in one line. Damage is done behind lookalike's back: bytes of
the SQLite file overwritten, a PostgreSQL row updated by SQL, an index file's bytes flipped,
a photo replaced."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
from conftest import photo, variants

from lookalike.core.check import CheckReport
from lookalike.core.collection import Collection
from lookalike.errors import CorruptVectorError
from lookalike.knn import read_index_file
from lookalike.knn.base import Metric


def lookalike(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lookalike.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_one_error_line(result: subprocess.CompletedProcess[str], *words: str) -> str:
    """A failed command that said why in one line on stderr, without a traceback."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lookalike: error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def folder(photo_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "photos"
    shutil.copytree(photo_dir, target)
    return target


def indexed(path: Path, folder: Path, encoder, db: str | None = None) -> Collection:
    collection = Collection(path, db=db)
    collection.use_encoder(encoder)
    collection.index(folder, workers=0)
    collection.search(photo("coffee"), k=1)  # writes the cosine index file
    return collection


def image_id(collection: Collection, path: Path) -> int:
    return collection.catalog.ids_for_paths([str(path)])[str(path)]


def first(collection: Collection, query) -> str:
    return Path(collection.search(query, k=3)[0].path).name


def test_a_healthy_collection_has_no_problems(
    tmp_path: Path, folder: Path, collection_encoder, catalog_db
) -> None:
    db = catalog_db()
    with indexed(tmp_path / "c", folder, collection_encoder, db) as collection:
        report = collection.check()
        assert isinstance(report, CheckReport)
        assert report.problems == [] and report.healthy, report.findings
        assert report.images == 6
        repaired = collection.check(repair=True)
        assert repaired.problems == [] and repaired.re_embedded == 0 and repaired.removed == 0
    if db is None:
        result = lookalike("-c", str(tmp_path / "c"), "check")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "no problems" in result.stdout


def damage_blob_on_disk(catalog_file: Path, vector: np.ndarray) -> int:
    """Overwrite values of a stored vector in the SQLite file's own bytes (SQLite never sees
    the change, the generation stays); returns how many copies were changed."""
    data = bytearray(catalog_file.read_bytes())
    blob = np.ascontiguousarray(vector, dtype="<f4").tobytes()
    needle = blob[64:128]  # within the first page of the value
    changed = 0
    start = data.find(needle)
    while start >= 0:
        data[start : start + 16] = np.full(4, 7.5, dtype="<f4").tobytes()
        changed += 1
        start = data.find(needle, start + 1)
    catalog_file.write_bytes(bytes(data))
    return changed


def test_a_vector_damaged_on_disk_is_refused_reported_and_re_embedded(
    tmp_path: Path, folder: Path, collection_encoder
) -> None:
    path = tmp_path / "c"
    chelsea = folder / "nested" / "chelsea.jpg"
    with indexed(path, folder, collection_encoder) as collection:
        damaged = image_id(collection, chelsea)
        vector = collection.catalog.vector(damaged, collection.model_id)
        assert vector is not None
    assert damage_blob_on_disk(path / "catalog.sqlite", vector) >= 1
    shutil.rmtree(path / "indexes")  # the index must be rebuilt from the catalog's vectors

    with Collection(path) as collection:
        collection.use_encoder(collection_encoder)
        with pytest.raises(CorruptVectorError) as caught:
            collection.search(photo("chelsea"), k=3)  # refused, not ranked wrongly
        assert caught.value.ids == [damaged]
    assert_one_error_line(
        lookalike("-c", str(path), "search", str(chelsea)), "fail their checksum", "check --repair"
    )

    found = lookalike("-c", str(path), "check", "--json")
    assert found.returncode == 1, found.stderr
    report = json.loads(found.stdout)
    assert not report["healthy"]
    (problem,) = report["problems"]
    assert problem["kind"] == "vectors" and problem["ids"] == [damaged]
    assert problem["repaired"] is None
    text = lookalike("-c", str(path), "check")
    assert text.returncode == 1 and "fail their checksum" in text.stdout, text.stdout
    assert "--repair" in text.stdout

    repaired = lookalike("-c", str(path), "check", "--repair")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert "re-embedded 1" in repaired.stdout, repaired.stdout
    again = lookalike("-c", str(path), "check")
    assert again.returncode == 0, again.stdout

    searched = lookalike("-c", str(path), "search", str(chelsea), "--json", "-k", "3")
    assert searched.returncode == 0, searched.stderr
    assert Path(json.loads(searched.stdout)["results"][0]["path"]).name == "chelsea.jpg"
    with Collection(path) as collection:
        collection.use_encoder(collection_encoder)
        assert first(collection, variants(photo("chelsea"))["half"]) == "chelsea.jpg"
        assert collection.catalog.verify_vectors() == []


def overwrite_vector_by_sql(collection: Collection, db: str | None, image: int) -> None:
    """Change a stored vector with an SQL UPDATE that leaves its checksum as it was."""
    model = collection.model_id
    values = np.full(collection.encoder.dim, 0.25, dtype=np.float32)
    if db is None:
        with closing(sqlite3.connect(collection.path / "catalog.sqlite")) as connection:
            connection.execute(
                "UPDATE vectors SET vector = ? WHERE image_id = ? AND model_id = ?",
                (values.astype("<f4").tobytes(), image, model),
            )
            connection.commit()
        return
    import psycopg

    storage = getattr(collection.catalog, "vector_storage", "bytea")
    if storage == "pgvector":
        mark, value = "%s::vector", "[" + ",".join(repr(float(v)) for v in values) + "]"
    else:
        mark, value = "%s", values.astype("<f4").tobytes()
    with psycopg.connect(db, autocommit=True) as connection:
        connection.execute(
            f"UPDATE vectors SET vector = {mark} WHERE image_id = %s AND model_id = %s",
            (value, image, model),
        )


def test_a_vector_changed_by_sql_is_reported_and_repaired(
    tmp_path: Path, folder: Path, collection_encoder, catalog_db
) -> None:
    db = catalog_db()
    with indexed(tmp_path / "c", folder, collection_encoder, db) as collection:
        damaged = image_id(collection, folder / "nested" / "deeper" / "coffee.jpg")
        overwrite_vector_by_sql(collection, db, damaged)
        collection.indexes.forget()
        shutil.rmtree(tmp_path / "c" / "indexes")
        with pytest.raises(CorruptVectorError):
            collection.search(photo("coffee"), k=3)

        report = collection.check()
        assert not report.healthy
        (problem,) = report.problems
        assert problem.kind == "vectors" and list(problem.ids) == [damaged]

        repaired = collection.check(repair=True)
        assert repaired.healthy and repaired.re_embedded == 1, repaired.findings
        assert collection.check().problems == []
        assert first(collection, variants(photo("coffee"))["half"]) == "coffee.jpg"


def flip_bytes(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at : at + 8] = bytes(b ^ 0xFF for b in data[at : at + 8])
    path.write_bytes(bytes(data))


def test_a_corrupt_index_file_is_reported_and_rebuilt_and_a_stale_one_noted(
    tmp_path: Path, folder: Path, collection_encoder
) -> None:
    with indexed(tmp_path / "c", folder, collection_encoder) as collection:
        index_file = collection.indexes.path(collection.encoder.identity.key, Metric.COSINE)
        flip_bytes(index_file, index_file.stat().st_size - 100)
        leftover = index_file.with_name(f".{index_file.name}.999.tmp")
        leftover.write_bytes(b"half")  # what a killed writer leaves (an hour ago)
        os.utime(leftover, (leftover.stat().st_atime - 3600, leftover.stat().st_mtime - 3600))

        report = collection.check()
        assert not report.healthy
        (problem,) = report.problems
        assert problem.kind == "derived" and problem.subject == str(index_file)
        assert "corrupt" in problem.detail
        assert any(note.subject == str(leftover) for note in report.notes)

        repaired = collection.check(repair=True)
        assert repaired.healthy, repaired.findings
        assert str(index_file) in repaired.rebuilt
        read_index_file(index_file)  # whole again, every checksum verified
        assert not leftover.exists()
        assert collection.check().findings == []

        # A file stamped for an older state of the catalog is not a problem: it is rebuilt
        # on next use.
        collection.catalog.remove([image_id(collection, folder / "rocket.jpg")])
        stale = collection.check()
        assert stale.healthy and stale.problems == []
        (note,) = stale.notes
        assert note.subject == str(index_file) and "stale" in note.detail
        assert first(collection, photo("chelsea")) == "chelsea.jpg"


def test_changed_and_missing_files_are_reported_and_re_indexed(
    tmp_path: Path, folder: Path, collection_encoder
) -> None:
    coffee = folder / "nested" / "deeper" / "coffee.jpg"
    rocket = folder / "rocket.jpg"
    with indexed(tmp_path / "c", folder, collection_encoder) as collection:
        photo("camera").save(coffee, quality=92)  # another picture under the same name
        rocket.unlink()

        report = collection.check()
        assert not report.healthy
        by_subject = {p.subject: p for p in report.problems}
        assert set(by_subject) == {str(coffee), str(rocket)}
        assert (
            by_subject[str(coffee)].kind == "file" and "changed" in by_subject[str(coffee)].detail
        )
        assert "missing" in by_subject[str(rocket)].detail

        repaired = collection.check(repair=True)
        assert repaired.healthy, repaired.findings
        assert repaired.re_embedded == 1 and repaired.removed == 1
        assert collection.check().findings == []
        assert len(collection) == 5
        assert first(collection, variants(photo("camera"))["half"]) == "coffee.jpg"


def corrupt_settings_page(catalog_file: Path) -> None:
    """Overwrite the page holding the settings table with garbage (every command reads it)."""
    with closing(sqlite3.connect(catalog_file)) as db:
        (root,) = db.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = 'settings'"
        ).fetchone()
        (size,) = db.execute("PRAGMA page_size").fetchone()
    with open(catalog_file, "r+b") as handle:
        handle.seek((root - 1) * size)
        handle.write(bytes(range(256)) * (size // 256))


def test_a_corrupt_catalog_page_gives_one_clear_line_in_every_command(
    tmp_path: Path, folder: Path, collection_encoder
) -> None:
    path = tmp_path / "c"
    indexed(path, folder, collection_encoder).close()
    catalog_file = path / "catalog.sqlite"
    corrupt_settings_page(catalog_file)
    for command in (
        ["info"],
        ["index", str(folder), "-q"],
        ["search", str(folder / "rocket.jpg")],
        ["check"],
        ["check", "--repair"],
    ):
        result = lookalike("-c", str(path), *command)
        line = assert_one_error_line(result, str(catalog_file), "damaged")
        assert "Traceback" not in result.stderr
        if command[0] == "check":
            assert "restore" in line and "backup" in line
            assert "check --repair" not in line  # it would only say this again
    assert catalog_file.exists()  # nothing deleted on the way


def test_check_of_a_folder_without_a_collection_creates_nothing(tmp_path: Path) -> None:
    result = lookalike("-c", str(tmp_path / "none"), "check")
    assert_one_error_line(result, "no collection")
    assert not (tmp_path / "none").exists()


def test_a_damaged_catalog_that_still_opens_is_reported(
    tmp_path: Path, folder: Path, collection_encoder
) -> None:
    path = tmp_path / "c"
    indexed(path, folder, collection_encoder).close()
    catalog_file = path / "catalog.sqlite"
    with closing(sqlite3.connect(catalog_file)) as db:
        (root,) = db.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = 'images_content_hash'"
        ).fetchone()
        (size,) = db.execute("PRAGMA page_size").fetchone()
    with open(catalog_file, "r+b") as handle:  # an index page: the tables still read
        handle.seek((root - 1) * size + 8)
        handle.write(b"\x00\xff" * 64)
    with Collection(path) as collection:
        report = collection.check(repair=True)
    assert not report.healthy
    catalog_problems = [p for p in report.problems if p.kind == "catalog"]
    assert catalog_problems and all(p.repaired is None for p in catalog_problems)
    assert any(str(catalog_file) in p.subject for p in catalog_problems)
    assert all("backup" in p.advice for p in catalog_problems)
