"""Near-duplicate detection: real photos with transformed copies, exact copies under other
names, a corrupt file, nested folders, keepers, moving duplicates aside, and the CLI."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import photo
from PIL import Image, ImageEnhance, ImageOps

from lookalike.cli.main import main
from lookalike.core.collection import Collection
from lookalike.dedup import (
    DEFAULT_THRESHOLDS,
    Method,
    find_duplicates,
    hamming,
    neighbour_pairs,
    phash,
    star_groups,
    union_find_groups,
)
from lookalike.dedup.moving import EXISTS, MOVED, PLANNED, apply_moves, plan_moves
from lookalike.errors import DedupError

NAMES = ("astronaut", "chelsea", "coffee", "rocket")
OLD, OLDER, NEWER = 946_684_800, 631_152_000, 1_262_304_000  # 2000, 1990, 2010


def edits(image: Image.Image) -> dict[str, Image.Image]:
    """Copies a photo library collects: smaller, cropped, brighter, mirrored, rotated."""
    width, height = image.size
    return {
        "half": image.resize((width // 2, height // 2), Image.Resampling.LANCZOS),
        "crop": image.crop((width // 12, height // 12, width - width // 12, height - height // 12)),
        "bright": ImageEnhance.Brightness(image).enhance(1.2),
        "mirror": ImageOps.mirror(image),
        "tilt": image.rotate(4, Image.Resampling.BICUBIC),
    }


def build_library(root: Path) -> Path:
    """Originals in ``photos/``, edited copies two levels down in ``edits/nested/``, a
    byte-identical copy of the astronaut under another name in ``backup/old/``, and a corrupt
    JPEG. Originals date from 2000, edits from 2010, the backup copy from 1990."""
    (root / "photos").mkdir(parents=True)
    (root / "edits" / "nested").mkdir(parents=True)
    (root / "backup" / "old").mkdir(parents=True)
    for name in NAMES:
        original = root / "photos" / f"{name}.jpg"
        photo(name).save(original, quality=92)
        os.utime(original, (OLD, OLD))
        for edit, image in edits(photo(name)).items():
            target = root / "edits" / "nested" / f"{name}-{edit}.jpg"
            image.save(target, quality=90)
            os.utime(target, (NEWER, NEWER))
    backup = root / "backup" / "old" / "IMG_0001.jpg"
    shutil.copyfile(root / "photos" / "astronaut.jpg", backup)
    os.utime(backup, (OLDER, OLDER))
    (root / "photos" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_library(tmp_path_factory.mktemp("library"))


@pytest.fixture(scope="module")
def collection(library: Path, tmp_path_factory: pytest.TempPathFactory):
    with Collection(tmp_path_factory.mktemp("collection") / "c") as collection:
        report = collection.index(library, workers=1)
        assert [Path(p).name for p, _ in report.failed] == ["broken.jpg"]
        yield collection


def source_of(path: str) -> str:
    """The photo a file was made from, by its name (the backup copy is the astronaut)."""
    stem = Path(path).stem
    return "astronaut" if stem == "IMG_0001" else stem.split("-")[0]


def group_names(report) -> list[set[str]]:
    return [{Path(m.path).stem for m in g.members} for g in report.groups]


def assert_pure(report) -> None:
    """No group mixes two different photos."""
    for group in report.groups:
        assert len({source_of(m.path) for m in group.members}) == 1, group


# -- exact ------------------------------------------------------------------------------------


def test_exact_finds_the_same_bytes_under_another_name(collection: Collection) -> None:
    report = find_duplicates(collection, method="exact")
    assert group_names(report) == [{"astronaut", "IMG_0001"}]
    (group,) = report.groups
    # Same size: the older file is kept.
    assert Path(group.keeper.path).name == "IMG_0001.jpg"
    assert group.duplicates[0].score is None
    assert report.images == len(NAMES) * 6 + 1


def test_a_corrupt_file_is_reported_not_fatal(collection: Collection) -> None:
    report = find_duplicates(collection, method="perceptual")
    assert [Path(p).name for p, _ in report.failed] == ["broken.jpg"]
    assert report.groups


# -- perceptual -------------------------------------------------------------------------------


def test_phash_is_imagehash_phash_and_mirrors_without_decoding_twice() -> None:
    imagehash = pytest.importorskip("imagehash")
    for name in NAMES:
        image = photo(name)
        ours = phash(image)
        theirs = np.packbits(imagehash.phash(image).hash.reshape(-1)).tobytes()
        assert ours.code == theirs
        # The mirrored hash, computed from the same coefficients, is the mirror image's hash
        # (up to resampling round-off).
        assert hamming(ours.mirrored, phash(ImageOps.mirror(image)).code) <= 2
        assert hamming(ours.code, ours.mirrored) > 10


def test_perceptual_groups_resized_brightened_and_mirrored_copies(
    collection: Collection,
) -> None:
    report = find_duplicates(collection, method="perceptual")
    assert_pure(report)
    found = {name for group in group_names(report) for name in group}
    for name in NAMES:
        assert {name, f"{name}-half", f"{name}-bright", f"{name}-mirror"} <= found


def test_perceptual_distances_are_within_the_threshold(collection: Collection) -> None:
    """imagededup-style bound check: every reported duplicate is within the threshold of its
    keeper by an independent computation (imagehash), and the hash of the mirror counts."""
    imagehash = pytest.importorskip("imagehash")
    threshold = 8
    report = find_duplicates(collection, method="perceptual", threshold=threshold)

    def hashes(path: str):
        with Image.open(path) as image:
            image = image.convert("RGB")
            return imagehash.phash(image), imagehash.phash(ImageOps.mirror(image))

    for group in report.groups:
        keeper, mirrored = hashes(group.keeper.path)
        for duplicate in group.duplicates:
            plain, _ = hashes(duplicate.path)
            bits = min(keeper - plain, mirrored - plain)
            # Ours decodes JPEGs at a reduced scale: a bit or two may differ from a full decode.
            assert bits <= threshold + 2
            assert duplicate.score <= threshold


# -- embedding and verified -------------------------------------------------------------------


def test_embedding_groups_copies_with_their_original(collection: Collection) -> None:
    report = find_duplicates(collection, method="embedding")
    assert_pure(report)
    assert len(report.groups) == len(NAMES)
    for group in report.groups:
        names = {Path(m.path).stem for m in group.members}
        name = source_of(group.keeper.path)
        assert {name, *(f"{name}-{e}" for e in ("half", "bright", "mirror", "tilt"))} <= names
        assert all(d.score >= DEFAULT_THRESHOLDS[Method.EMBEDDING] for d in group.duplicates)
    # A crop of a sixth of each side moves the embedding most (cosine 0.89-0.95 here): a
    # looser threshold takes every copy in.
    loose = find_duplicates(collection, method="embedding", threshold=0.85)
    assert_pure(loose)
    assert sorted(len(g.members) for g in loose.groups) == [6, 6, 6, 7]


def test_embedding_scores_are_cosines_to_the_keeper(collection: Collection) -> None:
    report = find_duplicates(collection, method="embedding", threshold=0.8)
    paths = collection.catalog.paths()
    for group in report.groups:
        keeper = collection.catalog.vector(paths[group.keeper.path], collection.model_id)
        for duplicate in group.duplicates:
            vector = collection.catalog.vector(paths[duplicate.path], collection.model_id)
            cosine = keeper @ vector / np.linalg.norm(keeper) / np.linalg.norm(vector)
            assert duplicate.score == pytest.approx(cosine, abs=1e-4)
            assert cosine >= 0.8


def test_keeper_is_the_largest_then_the_oldest(collection: Collection) -> None:
    report = find_duplicates(collection, method="embedding")
    keepers = {source_of(g.keeper.path): Path(g.keeper.path) for g in report.groups}
    # Full-size files: the originals (2000), the bright, mirror and tilt edits (2010) and the
    # astronaut's backup (1990); the oldest of them wins.
    assert keepers["astronaut"].name == "IMG_0001.jpg"
    for name in ("chelsea", "coffee", "rocket"):
        assert keepers[name].name == f"{name}.jpg"
    for group in report.groups:
        assert all(group.keeper.pixels >= d.pixels for d in group.duplicates)


def test_verified_confirms_copies_by_local_features(collection: Collection) -> None:
    pytest.importorskip("cv2")
    report = find_duplicates(collection, method="verified")
    assert_pure(report)
    found = {name for group in group_names(report) for name in group}
    for name in NAMES:
        for edit in ("half", "crop", "mirror", "tilt"):
            assert f"{name}-{edit}" in found
    assert all(d.inliers >= report.min_inliers for g in report.groups for d in g.duplicates)


def test_a_folder_scope_leaves_other_files_out(collection: Collection, library: Path) -> None:
    report = find_duplicates(collection, method="embedding", under=library / "edits")
    assert report.images == len(NAMES) * 5
    for group in report.groups:
        assert all("/edits/" in m.path for m in group.members)
    assert_pure(report)


def test_bad_requests_raise_typed_errors(collection: Collection, tmp_path: Path) -> None:
    with pytest.raises(DedupError, match="unknown dedup method"):
        find_duplicates(collection, method="fuzzy")
    with pytest.raises(DedupError, match="no threshold"):
        find_duplicates(collection, method="exact", threshold=3)
    with pytest.raises(DedupError, match=r"0\.\.64"):
        find_duplicates(collection, method="perceptual", threshold=80)
    with pytest.raises(DedupError, match="cosine"):
        find_duplicates(collection, method="embedding", threshold=2.0)
    with pytest.raises(DedupError, match="verified method only"):
        find_duplicates(collection, method="embedding", min_inliers=10)
    with pytest.raises(DedupError, match="not a folder"):
        find_duplicates(collection, under=tmp_path / "missing")


# -- grouping ---------------------------------------------------------------------------------


def test_star_groups_do_not_chain() -> None:
    """A~B and B~C but not A~C: C is not put with A, and B's group is judged afresh."""
    alike = {(0, 1), (1, 2)}

    def match(keeper: int, others: np.ndarray):
        mask = np.array([(min(keeper, o), max(keeper, o)) in alike for o in others.tolist()])
        return mask, mask.astype(float)

    assert union_find_groups(3, alike) == [[0, 1, 2]]
    assert star_groups([0, 1, 2], match) == [(0, [1], [1.0])]
    assert star_groups([1, 0, 2], match) == [(1, [0, 2], [1.0, 1.0])]


def test_neighbour_pairs_is_a_range_search_beyond_k() -> None:
    """k-NN searches widened for saturated queries give the same pairs as a brute-force range
    search, even for a group far larger than k."""
    rng = np.random.default_rng(0)
    points = rng.normal(size=(300, 8)).astype(np.float32)
    points[:40] = points[0] + 0.01 * rng.normal(size=(40, 8))  # a big group of near-copies
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    ids = np.arange(1000, 1300, dtype=np.int64)

    def search(queries: np.ndarray, width: int):
        scores = queries @ points.T
        order = np.argsort(-scores, axis=1)[:, :width]
        return ids[order], np.take_along_axis(scores, order, axis=1)

    found = neighbour_pairs(search, points, ids, lambda s: s >= 0.9, k=4, total=len(points))
    similarity = points @ points.T
    expected = {
        (int(ids[a]), int(ids[b]))
        for a, b in zip(*np.nonzero(np.triu(similarity >= 0.9, k=1)), strict=True)
    }
    assert set(found) == expected
    assert len(expected) >= 40 * 39 // 2


# -- moving duplicates aside ------------------------------------------------------------------


@pytest.fixture
def small_library(tmp_path: Path) -> Path:
    """Two photos, each with a mirrored and a half-size copy in a nested folder."""
    root = tmp_path / "lib"
    (root / "a" / "b").mkdir(parents=True)
    for name in ("chelsea", "coffee"):
        photo(name).save(root / f"{name}.jpg", quality=92)
        for edit in ("half", "mirror"):
            edits(photo(name))[edit].save(root / "a" / "b" / f"{name}-{edit}.jpg", quality=90)
    return root


def snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_move_to_is_a_dry_run_unless_applied(small_library: Path, tmp_path: Path) -> None:
    target = tmp_path / "dups"
    (target / "a" / "b").mkdir(parents=True)
    (target / "a" / "b" / "coffee-half.jpg").write_bytes(b"already here")
    before = snapshot(small_library)
    with Collection(tmp_path / "c") as collection:
        collection.index(small_library, workers=1)
        report = find_duplicates(collection, method="embedding", under=small_library)
        moves = plan_moves(report.groups, target, root=small_library)
        assert {Path(m.source).name for m in moves} == {
            "chelsea-half.jpg", "chelsea-mirror.jpg", "coffee-half.jpg", "coffee-mirror.jpg"
        }  # fmt: skip
        statuses = {Path(m.source).name: m.status for m in moves}
        assert statuses["coffee-half.jpg"] == EXISTS
        assert {s for n, s in statuses.items() if n != "coffee-half.jpg"} == {PLANNED}
        assert snapshot(small_library) == before  # planning touches nothing

        with pytest.raises(DedupError, match="inside"):
            plan_moves(report.groups, small_library / "dups", root=small_library)

        done = apply_moves(collection, moves)
        assert sum(m.status == MOVED for m in done) == 3
        after_source, after_target = snapshot(small_library), snapshot(target)
        # Nothing deleted: every file is in one place or the other, byte for byte.
        for relative, data in before.items():
            assert after_source.get(relative, after_target.get(relative)) == data
        assert after_target["a/b/coffee-half.jpg"] == b"already here"  # never overwritten
        assert set(after_source) == {"chelsea.jpg", "coffee.jpg", "a/b/coffee-half.jpg"}
        assert set(after_target) == {
            "a/b/chelsea-half.jpg", "a/b/chelsea-mirror.jpg", "a/b/coffee-mirror.jpg",
            "a/b/coffee-half.jpg",
        }  # fmt: skip
        # Moved files left the collection; the one that could not move stays.
        remaining = {Path(p).name for p in collection.catalog.paths()}
        assert remaining == {"chelsea.jpg", "coffee.jpg", "coffee-half.jpg"}


# -- the command ------------------------------------------------------------------------------


def test_cli_json_indexes_the_folder_and_reports_groups(
    library: Path, tmp_path: Path, capsys
) -> None:
    args = ["-c", str(tmp_path / "c"), "dedup", str(library), "--format", "json", "-q"]
    assert main([*args, "--workers", "1"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["method"] == "verified"
    assert payload["images"] == len(NAMES) * 6 + 1
    assert [Path(f["path"]).name for f in payload["failed"]] == ["broken.jpg"]
    assert len(payload["groups"]) == len(NAMES)
    for group in payload["groups"]:
        sources = {source_of(group["keeper"]["path"])}
        sources |= {source_of(d["path"]) for d in group["duplicates"]}
        assert len(sources) == 1
        assert {"width", "height", "mtime", "score"} <= set(group["keeper"])

    # The collection now holds the folder: the whole collection, exact method, as CSV.
    assert main(["-c", str(tmp_path / "c"), "dedup", "--method", "exact", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["group"], r["role"], Path(r["path"]).name) for r in rows] == [
        ("1", "keeper", "IMG_0001.jpg"),
        ("1", "duplicate", "astronaut.jpg"),
    ]


def test_cli_dry_run_then_apply(small_library: Path, tmp_path: Path, capsys) -> None:
    base = ["-c", str(tmp_path / "c"), "dedup", str(small_library), "-q", "--workers", "1"]
    target = tmp_path / "dups"
    before = snapshot(small_library)
    assert main([*base, "--move-to", str(target)]) == 0
    out = capsys.readouterr().out
    assert "dry run: 4 duplicate(s) would move" in out
    assert snapshot(small_library) == before and not target.exists()

    assert main([*base, "--move-to", str(target), "--apply", "--format", "json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["moves"]["applied"] is True
    assert {m["status"] for m in payload["moves"]["items"]} == {MOVED}
    assert set(snapshot(target)) == {
        "a/b/chelsea-half.jpg", "a/b/chelsea-mirror.jpg", "a/b/coffee-half.jpg",
        "a/b/coffee-mirror.jpg",
    }  # fmt: skip
    # Run again: the moved files are gone from the folder and the collection, no groups left.
    assert main([*base, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["groups"] == []


def test_cli_errors(tmp_path: Path, capsys) -> None:
    assert main(["-c", str(tmp_path / "c"), "dedup", "--apply"]) == 1
    assert "--move-to" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["dedup", "--method", "fuzzy"])


@pytest.mark.parametrize("local_features", [True, False])
def test_a_library_of_two_photos_finds_its_copy(tmp_path: Path, local_features: bool) -> None:
    """Two images hold too few keypoints to learn visual words from; the default method
    still checks their embedding neighbours, stored features or not."""
    library = tmp_path / "library"
    library.mkdir()
    photo("coffee").save(library / "coffee.jpg", quality=92)
    photo("coffee").resize((300, 200)).save(library / "coffee-small.jpg", quality=40)
    with Collection(tmp_path / "c") as collection:
        collection.index(library, workers=1, local_features=local_features)
        report = find_duplicates(collection, workers=1)
    assert [sorted(Path(m.path).name for m in g.members) for g in report.groups] == [
        ["coffee-small.jpg", "coffee.jpg"]
    ]
