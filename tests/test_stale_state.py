"""Index files never answer for another catalog state than their own.

Each index file is stamped with the catalog's id and its state: the generation and a random
token the catalog draws afresh with every write. Stamped with the generation alone (as before),
a file written at generation g answered for any catalog at generation g: a catalog restored
from a backup and changed once, a copied collection changed apart from its original. These
tests make each of those situations and check that every search answers from the catalog as
it is.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import photo

from lookalike.core.collection import Collection

# Three photo folders: indexed first, indexed "later" (and then lost to a restore), and the
# one change made after a restore.
FIRST = ("astronaut", "chelsea", "coffee")
LATER = ("rocket", "immunohistochemistry")
AFTER = ("retina",)

# A search for an image's own file scores about 1; any other photo of the set far less.
SAME = 0.99


def photos(folder: Path, names: tuple[str, ...]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        photo(name).save(folder / f"{name}.jpg", quality=92)
    return folder


def check(collection: Collection, gone: list[Path] = ()) -> list[tuple[int, ...]]:
    """Every catalogued image is found by its own file (k=1 returns itself), and no file in
    ``gone`` (not in the catalog) is found: its best match is another image. Returns each
    catalogued image's ranking, ids in order, for comparing collections."""
    catalogued = collection.catalog.paths()
    rankings = []
    for path, image_id in sorted(catalogued.items()):
        (best,) = collection.search(path, k=1).results
        assert (best.id, best.path) == (image_id, path), f"{Path(path).name} found {best}"
        assert best.score > SAME
        ranking = collection.search(path, k=len(catalogued)).results
        assert sorted(r.id for r in ranking) == sorted(catalogued.values())
        rankings.append(tuple(r.id for r in ranking))
    for path in gone:
        assert str(path.resolve()) not in catalogued
        for result in collection.search(path, k=len(catalogued)).results:
            assert catalogued.get(result.path) == result.id
            assert result.score < SAME, f"{path.name} (removed) found as {result}"
    return rankings


def files(folder: Path, names: tuple[str, ...]) -> list[Path]:
    return [folder / f"{name}.jpg" for name in names]


def test_a_restored_backup_changed_once_never_uses_the_newer_index_file(
    tmp_path: Path, encoder
) -> None:
    home = tmp_path / "collection"
    first = photos(tmp_path / "first", FIRST)
    later = photos(tmp_path / "later", LATER)
    after = photos(tmp_path / "after", AFTER)

    with Collection(home, encoder=encoder) as collection:
        collection.index(first, workers=0)
        check(collection)  # writes the index file
    backup = tmp_path / "backup.sqlite"
    shutil.copy2(home / "catalog.sqlite", backup)
    assert not (home / "catalog.sqlite-wal").exists()  # closed: the file is the whole catalog

    with Collection(home, encoder=encoder) as collection:
        collection.index(later, workers=0)  # one write
        check(collection)  # the index files now reflect FIRST + LATER
        newer_generation = collection.catalog.generation
    assert list(home.rglob("*.lkx")), "the test needs index files on disk"

    shutil.copy2(backup, home / "catalog.sqlite")  # restore the backup

    with Collection(home, encoder=encoder) as collection:
        collection.index(after, workers=0)  # one write: the generation of the newer files
        assert collection.catalog.generation == newer_generation, "the premise of the test"
        check(collection, gone=files(later, LATER))
    with Collection(home, encoder=encoder) as collection:  # and from the files it left
        check(collection, gone=files(later, LATER))


def test_a_copied_collection_and_its_original_change_apart(tmp_path: Path, encoder) -> None:
    original = tmp_path / "original"
    first = photos(tmp_path / "first", FIRST)
    later = photos(tmp_path / "later", LATER)
    after = photos(tmp_path / "after", AFTER)
    with Collection(original, encoder=encoder) as collection:
        collection.index(first, workers=0)
        check(collection)
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)

    # One write to each: the same generation, different images.
    with Collection(copy, encoder=encoder) as collection:
        collection.index(later, workers=0)
        check(collection, gone=files(after, AFTER))
        copy_generation = collection.catalog.generation
    with Collection(original, encoder=encoder) as collection:
        collection.index(after, workers=0)
        assert collection.catalog.generation == copy_generation, "the premise of the test"
        check(collection, gone=files(later, LATER))

    # Each folder's index files, copied over the other's, are never taken for its own.
    for source, target, gone in ((copy, original, LATER), (original, copy, AFTER)):
        stash = tmp_path / "stash"
        shutil.copytree(target / "indexes", stash)
        shutil.rmtree(target / "indexes")
        shutil.copytree(source / "indexes", target / "indexes")
        with Collection(target, encoder=encoder) as collection:
            folder = later if gone == LATER else after
            check(collection, gone=files(folder, gone))
        shutil.rmtree(target / "indexes")
        shutil.move(stash, target / "indexes")

    with Collection(copy, encoder=encoder) as collection:
        assert sorted(Path(p).stem for p in collection.catalog.paths()) == sorted(FIRST + LATER)
        check(collection, gone=files(after, AFTER))
    with Collection(original, encoder=encoder) as collection:
        assert sorted(Path(p).stem for p in collection.catalog.paths()) == sorted(FIRST + AFTER)
        check(collection, gone=files(later, LATER))


def test_two_folders_sharing_a_postgresql_catalog_answer_alike(
    postgres, tmp_path: Path, encoder
) -> None:
    url = postgres.create_database()
    first = photos(tmp_path / "first", FIRST)
    later = photos(tmp_path / "later", LATER)
    a = Collection(tmp_path / "server-a", db=url, encoder=encoder)
    b = Collection(tmp_path / "server-b", db=url, encoder=encoder)
    try:
        a.index(first, workers=0)
        assert check(b) == check(a)  # B sees A's writes
        b.index(later, workers=0)
        assert check(a) == check(b)  # and A sees B's
        assert len(a) == len(FIRST + LATER)
        removed = sorted(a.catalog.paths())[0]
        a.remove([removed])
        gone = [Path(removed)]
        assert check(b, gone=gone) == check(a, gone=gone)
        b.index(first, workers=0)  # B puts it back (a new id)
        rankings = check(b)
        assert check(a) == rankings
        for path in sorted(a.catalog.paths()):
            ids = [[r.id for r in c.search(path, k=5).results] for c in (a, b)]
            scores = [[r.score for r in c.search(path, k=5).results] for c in (a, b)]
            assert ids[0] == ids[1]
            assert scores[0] == pytest.approx(scores[1], abs=1e-5)
    finally:
        a.close()
        b.close()


def test_two_folders_sharing_a_restored_postgresql_catalog_use_neither_stale_file(
    postgres, tmp_path: Path, encoder
) -> None:
    """The catalog database restored from a backup, then changed once through one folder:
    both folders' index files are at that generation, and neither is used."""
    import psycopg
    from psycopg import sql

    name = f"restored_{tmp_path.name[-20:].replace('-', '_')}".lower()
    url = postgres.create_database(name)
    first = photos(tmp_path / "first", FIRST)
    later = photos(tmp_path / "later", LATER)
    after = photos(tmp_path / "after", AFTER)
    folders = (tmp_path / "server-a", tmp_path / "server-b")

    def admin(*statements: sql.Composed) -> None:
        with psycopg.connect(postgres.url(), autocommit=True) as db:
            for statement in statements:
                db.execute(statement)

    with Collection(folders[0], db=url, encoder=encoder) as a:
        a.index(first, workers=0)
        with Collection(folders[1], db=url, encoder=encoder) as b:
            assert check(b) == check(a)
    backup = sql.Identifier(name + "_backup")
    admin(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(backup, sql.Identifier(name)))
    with Collection(folders[0], db=url, encoder=encoder) as a:
        a.index(later, workers=0)
        with Collection(folders[1], db=url, encoder=encoder) as b:
            assert check(b) == check(a)  # both folders' files reflect FIRST + LATER
            newer_generation = a.catalog.generation
    admin(
        sql.SQL("DROP DATABASE {}").format(sql.Identifier(name)),
        sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), backup),
    )
    gone = files(later, LATER)
    with Collection(folders[0], db=url, encoder=encoder) as a:
        a.index(after, workers=0)
        assert a.catalog.generation == newer_generation, "the premise of the test"
        with Collection(folders[1], db=url, encoder=encoder) as b:
            assert check(b, gone=gone) == check(a, gone=gone)
