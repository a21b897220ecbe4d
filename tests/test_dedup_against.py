"""New images checked against a reference (``lookalike dedup NEW --against REFERENCE``): real
photos with transformed copies in NEW, a reference holding the originals, unrelated photos and
a duplicate pair of its own; through the library and the CLI, with a folder, a collection
folder and a collection name as reference and a single image as query, in every format."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import photo
from PIL import Image, ImageDraw, ImageOps

from lookalike.cli.main import main
from lookalike.core.collection import Collection
from lookalike.dedup import (
    DEFAULT_MIN_INLIERS,
    AgainstReport,
    Method,
    find_duplicates,
    find_in_reference,
)
from lookalike.errors import DedupError

ORIGINALS = ("astronaut", "chelsea", "coffee")
UNRELATED = ("rocket", "immunohistochemistry", "hubble_deep_field")
EDITS = ("half", "jpeg", "crop", "flip", "tilt", "text")
NEW_NAMES = ("retina", "camera")  # real photos the reference does not hold


def edited(image: Image.Image, edit: str) -> Image.Image:
    """A copy of ``image`` as a library collects them: resized, recompressed (saved at a low
    JPEG quality by the caller), cropped, mirrored, slightly rotated, captioned."""
    width, height = image.size
    if edit == "half":
        return image.resize((width // 2, height // 2), Image.Resampling.LANCZOS)
    if edit == "crop":
        return image.crop((width // 10, height // 10, width - width // 8, height - height // 8))
    if edit == "flip":
        return ImageOps.mirror(image)
    if edit == "tilt":
        return image.rotate(6, Image.Resampling.BICUBIC, fillcolor=(0, 0, 0))
    if edit == "text":
        captioned = image.copy()
        draw = ImageDraw.Draw(captioned)
        draw.rectangle((0, height - height // 6, width, height), fill=(20, 20, 20))
        draw.text((10, height - height // 8), "Summer 2019 - do not share", fill=(255, 255, 0))
        draw.text((10, 10), "(c) lookalike", fill=(255, 255, 255))
        return captioned
    return image  # "jpeg": recompressed when saved


def small(name: str) -> Image.Image:
    image = photo(name)
    image.thumbnail((640, 640))
    return image


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(reference folder, new folder)."""
    root = tmp_path_factory.mktemp("against")
    reference, new = root / "reference", root / "new"
    (reference / "nested").mkdir(parents=True)
    new.mkdir()
    for name in ORIGINALS:
        small(name).save(reference / f"{name}.jpg", quality=92)
        for edit in EDITS:
            quality = 25 if edit == "jpeg" else 88
            edited(small(name), edit).save(new / f"{name}-{edit}.jpg", quality=quality)
    for name in UNRELATED:
        small(name).save(reference / "nested" / f"{name}.jpg", quality=90)
    # The reference's own duplicate pair: a dedup of the reference groups them; a check
    # against it must not.
    from skimage import data

    motorcycle = Image.fromarray(data.stereo_motorcycle()[0])
    motorcycle.save(reference / "motorcycle.jpg", quality=92)
    motorcycle.resize((370, 250)).save(reference / "nested" / "motorcycle-small.jpg", quality=85)
    for name in NEW_NAMES:
        small(name).save(new / f"{name}.jpg", quality=90)
    return reference, new


@pytest.fixture(scope="module")
def collection(folders: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory):
    """A collection holding the reference folder only."""
    reference, _ = folders
    with Collection(tmp_path_factory.mktemp("collection") / "c") as collection:
        collection.index(reference, workers=1)
        yield collection


@pytest.fixture(scope="module")
def verified(folders: tuple[Path, Path], collection: Collection) -> AgainstReport:
    return find_in_reference(folders[1], collection, workers=1)


def original_of(path: str) -> str:
    return Path(path).stem.split("-")[0]


def test_every_transformed_copy_is_found_and_matched_to_its_original(
    verified: AgainstReport, folders: tuple[Path, Path]
) -> None:
    reference, _ = folders
    assert verified.method is Method.VERIFIED
    assert verified.reference_images == len(ORIGINALS) + len(UNRELATED) + 2
    assert verified.failed == []
    found = {Path(r.path).stem: r for r in verified.found}
    assert sorted(found) == sorted(f"{n}-{e}" for n in ORIGINALS for e in EDITS)
    for stem, result in found.items():
        best = result.matches[0]
        assert best.path == str(reference / f"{original_of(stem)}.jpg"), stem
        assert best.score is not None and best.score >= 0.85
        assert best.inliers is not None and best.inliers >= DEFAULT_MIN_INLIERS
        # Only the original matches: unrelated photos are never taken for copies.
        assert [m.path for m in result.matches] == [best.path]


def test_images_the_reference_lacks_are_new(verified: AgainstReport) -> None:
    assert sorted(Path(r.path).stem for r in verified.new) == sorted(NEW_NAMES)
    assert all(r.matches == [] for r in verified.new)
    assert len(verified.results) == len(ORIGINALS) * len(EDITS) + len(NEW_NAMES)


def test_the_reference_is_never_grouped_against_itself(
    verified: AgainstReport, folders: tuple[Path, Path], collection: Collection
) -> None:
    reference, new = folders
    # The reference does hold a duplicate pair: dedup of the same collection groups it...
    groups = find_duplicates(collection, workers=1).groups
    assert [{Path(m.path).name for m in g.members} for g in groups] == [
        {"motorcycle.jpg", "motorcycle-small.jpg"}
    ]
    # ... and the check against it reports query images only, each matched to the reference.
    assert all(Path(r.path).parent == new for r in verified.results)
    matched = {m.path for r in verified.results for m in r.matches}
    assert not any("motorcycle" in p for p in matched)
    assert all(p.startswith(str(reference)) for p in matched)


def test_embedding_and_exact_and_perceptual_methods(
    folders: tuple[Path, Path], collection: Collection, tmp_path: Path
) -> None:
    reference, new = folders
    embedding = find_in_reference(new, collection, method="embedding", threshold=0.8)
    assert {original_of(r.path) for r in embedding.found} <= set(ORIGINALS)
    assert len(embedding.found) >= len(ORIGINALS) * 4
    assert all(m.inliers is None for r in embedding.found for m in r.matches)
    # An exact copy under another name is found by its bytes; an edited copy is not.
    query = tmp_path / "q"
    query.mkdir()
    shutil.copyfile(reference / "coffee.jpg", query / "IMG_0042.jpg")
    shutil.copyfile(new / "coffee-half.jpg", query / "coffee-half.jpg")
    exact = find_in_reference(query, collection, method="exact")
    assert [(Path(r.path).name, [Path(m.path).name for m in r.matches]) for r in exact.results] == [
        ("IMG_0042.jpg", ["coffee.jpg"]),
        ("coffee-half.jpg", []),
    ]
    assert exact.results[0].matches[0].score is None
    perceptual = find_in_reference(query, collection, method="perceptual")
    assert all(r.found for r in perceptual.results)
    assert all(r.matches[0].path == str(reference / "coffee.jpg") for r in perceptual.results)
    assert all(r.matches[0].score is not None for r in perceptual.results)


def test_a_single_image_is_checked_the_same_way(
    folders: tuple[Path, Path], collection: Collection
) -> None:
    reference, new = folders
    one = find_in_reference(new / "chelsea-flip.jpg", collection)
    assert [r.path for r in one.found] == [str(new / "chelsea-flip.jpg")]
    assert one.found[0].matches[0].path == str(reference / "chelsea.jpg")
    other = find_in_reference(new / "camera.jpg", collection)
    assert [Path(r.path).name for r in other.new] == ["camera.jpg"] and other.found == []


def test_a_reference_folder_inside_a_larger_collection(
    folders: tuple[Path, Path], tmp_path: Path
) -> None:
    """Only the images under ``under`` are the reference, even where the collection holds the
    new images too: a query never finds itself or another new image."""
    reference, new = folders
    with Collection(tmp_path / "both") as both:
        both.index(reference.parent, workers=1)
        report = find_in_reference(new, both, under=reference, method="embedding")
        assert report.reference_images == len(ORIGINALS) + len(UNRELATED) + 2
        matched = {m.path for r in report.results for m in r.matches}
        assert matched and all(p.startswith(str(reference) + "/") for p in matched)
        # Without ``under`` the new folder is in the reference, but a file never matches itself.
        whole = find_in_reference(new / "coffee-half.jpg", both, method="embedding")
        assert str(new / "coffee-half.jpg") not in {m.path for m in whole.results[0].matches}


def test_unreadable_queries_are_reported_not_fatal(
    folders: tuple[Path, Path], collection: Collection, tmp_path: Path
) -> None:
    _, new = folders
    query = tmp_path / "q"
    query.mkdir()
    shutil.copyfile(new / "astronaut-crop.jpg", query / "a.jpg")
    (query / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    report = find_in_reference(query, collection)
    assert [Path(r.path).name for r in report.found] == ["a.jpg"]
    assert [Path(p).name for p, _ in report.failed] == ["broken.jpg"]
    assert all(Path(r.path).name != "broken.jpg" for r in report.results)


def test_bad_arguments_raise_dedup_error(
    folders: tuple[Path, Path], collection: Collection
) -> None:
    reference, new = folders
    with pytest.raises(DedupError, match="no such image file or folder"):
        find_in_reference(new / "missing", collection)
    with pytest.raises(DedupError, match="not a folder"):
        find_in_reference(new, collection, under=reference / "missing")
    with pytest.raises(DedupError, match="min_inliers applies"):
        find_in_reference(new, collection, method="embedding", min_inliers=10)
    with pytest.raises(DedupError, match="unknown dedup method"):
        find_in_reference(new, collection, method="fuzzy")


# -- the CLI ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_new(folders: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two copies and one new photo: enough for each output format."""
    _, new = folders
    folder = tmp_path_factory.mktemp("small-new")
    for name in ("astronaut-tilt.jpg", "coffee-text.jpg", "camera.jpg"):
        shutil.copyfile(new / name, folder / name)
    return folder


def test_cli_folder_reference_json(
    folders: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reference, new = folders
    cache = tmp_path / "cache-collection"
    args = ["-c", str(cache), "dedup", str(new), "--against", str(reference)]
    assert main([*args, "--format", "json", "--quiet", "--workers", "1"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["method"] == "verified"
    assert payload["min_inliers"] == DEFAULT_MIN_INLIERS
    assert payload["reference_images"] == len(ORIGINALS) + len(UNRELATED) + 2
    assert payload["images"] == len(ORIGINALS) * len(EDITS) + len(NEW_NAMES)
    assert payload["found"] == len(ORIGINALS) * len(EDITS)
    status = {Path(r["path"]).stem: r["status"] for r in payload["results"]}
    assert {s for n, s in status.items() if n in NEW_NAMES} == {"new"}
    for result in payload["results"]:
        if result["status"] == "found":
            best = result["matches"][0]
            assert Path(best["path"]).stem == original_of(result["path"])
            assert best["inliers"] >= DEFAULT_MIN_INLIERS and best["score"] >= 0.85
    # The reference folder went into the collection; the new images did not.
    with Collection(cache) as indexed:
        paths = set(indexed.catalog.file_states())
    assert paths and all(p.startswith(str(reference)) for p in paths)


def test_cli_collection_reference_every_format(
    folders: tuple[Path, Path],
    collection: Collection,
    small_new: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    reference, _ = folders
    base = ["dedup", str(small_new), "--against", str(collection.path), "--workers", "1"]
    expected = {"astronaut-tilt.jpg": "astronaut.jpg", "coffee-text.jpg": "coffee.jpg"}

    assert main([*base, "--format", "paths"]) == 0
    assert capsys.readouterr().out.splitlines() == [str(small_new / n) for n in sorted(expected)]

    assert main([*base, "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(Path(r["path"]).name, r["status"], Path(r["match"]).name) for r in rows] == [
        ("astronaut-tilt.jpg", "found", "astronaut.jpg"),
        ("camera.jpg", "new", ""),
        ("coffee-text.jpg", "found", "coffee.jpg"),
    ]
    assert rows[1]["match"] == "" and int(rows[0]["inliers"]) >= DEFAULT_MIN_INLIERS

    assert main([*base, "--format", "table"]) == 0
    table = capsys.readouterr().out
    assert table.startswith("2 of 3 image(s) already in the reference (8 image(s); verified")
    assert f"  new    {small_new / 'camera.jpg'}" in table
    for query, original in expected.items():
        assert f"  found  {small_new / query}\n           = {reference / original}  (" in table

    assert main([*base, "--format", "json", "--method", "exact"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["method"] == "exact" and payload["found"] == 0


def test_cli_named_collection_and_single_image(
    folders: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """'Is this one already in my library?' against a collection given by name."""
    reference, new = folders
    assert main(["-c", "library", "index", str(reference), "--workers", "1", "--quiet"]) == 0
    capsys.readouterr()
    one = ["dedup", str(new / "chelsea-half.jpg"), "--against", "library", "--format", "paths"]
    assert main(one) == 0
    assert capsys.readouterr().out == f"{new / 'chelsea-half.jpg'}\n"
    other = ["dedup", str(new / "retina.jpg"), "--against", "library", "--format", "paths"]
    assert main(other) == 0
    assert capsys.readouterr().out == ""


def test_cli_errors_and_exit_codes(
    folders: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reference, new = folders
    assert main(["dedup", str(new), "--against", str(tmp_path / "nowhere")]) == 1
    assert "no such folder or collection" in capsys.readouterr().err
    assert main(["dedup", str(new), "--against", "no-such-library"]) == 1
    assert "no collection named 'no-such-library'" in capsys.readouterr().err
    assert main(["dedup", str(new), "--against", str(reference / "coffee.jpg")]) == 1
    assert "not a file" in capsys.readouterr().err
    assert main(["dedup", "--against", str(reference)]) == 1
    assert "needs the new images" in capsys.readouterr().err
    assert main(["dedup", str(tmp_path / "missing"), "--against", str(reference)]) == 1
    assert "no such image file or folder" in capsys.readouterr().err
    assert main(["dedup", str(new), "--against", str(reference), "--move-to", "x"]) == 1
    assert "--move-to does not apply" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["dedup", str(new), "--against", str(reference), "--format", "xml"])
    assert exited.value.code == 2


def test_cli_process_exit_codes(folders: tuple[Path, Path], collection: Collection) -> None:
    """The real command in its own process: 0 with the answer on stdout, 1 and a message
    on stderr for a reference that does not exist."""
    import subprocess
    import sys

    reference, new = folders
    command = [sys.executable, "-m", "lookalike.cli", "dedup", str(new / "coffee-crop.jpg")]
    done = subprocess.run(
        [*command, "--against", str(collection.path), "--format", "paths"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{new / 'coffee-crop.jpg'}\n"
    failed = subprocess.run(
        [*command, "--against", str(reference / "no" / "such")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert failed.returncode == 1 and failed.stdout == ""
    assert "no such folder or collection" in failed.stderr


def unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


ROTATED = (("astronaut", 40.0), ("chelsea", -45.0))


@pytest.fixture(scope="module")
def rotated(folders: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Copies rotated by 40-45 degrees on a grown canvas with black corners: their cosine
    with the original falls below the verified method's candidate threshold."""
    folder = tmp_path_factory.mktemp("rotated")
    for name, angle in ROTATED:
        turned = small(name).rotate(angle, Image.Resampling.BICUBIC, expand=True)
        turned.save(folder / f"{name}-turned.jpg")
    return folder


@pytest.mark.parametrize("stored", [False, True], ids=["features-extracted", "features-stored"])
def test_copies_rotated_below_the_cosine_threshold_are_found_by_their_visual_words(
    folders: tuple[Path, Path], rotated: Path, tmp_path: Path, stored: bool
) -> None:
    reference, _ = folders
    with Collection(tmp_path / "c") as collection:
        collection.index(reference, workers=1, local_features=stored)
        originals = {Path(p).stem: i for p, i in collection.catalog.paths().items()}
        for name, _ in ROTATED:
            copy, original = (
                unit(collection.embed(path))
                for path in (rotated / f"{name}-turned.jpg", reference / f"{name}.jpg")
            )
            cosine = float(copy @ original)
            assert cosine < 0.75, (name, cosine)  # the embedding alone would miss it
        report = find_in_reference(rotated, collection, workers=1)
    found = {Path(r.path).stem: r for r in report.found}
    assert sorted(found) == sorted(f"{name}-turned" for name, _ in ROTATED)
    for name, angle in ROTATED:
        best = found[f"{name}-turned"].matches[0]
        assert best.id == originals[name] and [m.id for m in found[f"{name}-turned"].matches] == [
            best.id
        ]
        assert best.transform is not None and not best.transform.mirrored
        # The transform turns the reference image into the query: rotated by the angle.
        assert abs(abs(best.transform.rotation_degrees) - abs(angle)) < 3.0, best.transform
