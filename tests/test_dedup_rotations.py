"""The default dedup method on the copies a photo library collects: real photos rotated by
10, 30 and 45 degrees (corners black, or filled with a blurred copy as apps do), cropped,
mirrored, overlaid with captions, boxes and a watermark, resized and recompressed. Every copy
is grouped with its original, different photos never are, and each duplicate says what turned
the keeper into it (rotation, scale, mirror). Through the library, on stored and on extracted
local features, and through the CLI."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import pytest
from conftest import photo
from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps

from lookalike.cli.main import main
from lookalike.core.collection import Collection
from lookalike.dedup import DEFAULT_METHOD, Method, find_duplicates
from lookalike.dedup.verification import check_pair
from lookalike.local.features import extract
from lookalike.local.matching import estimate_transform, mirror_features

pytest.importorskip("cv2")

SOURCES = ("astronaut", "coffee", "chelsea")
OLD, NEW = 946_684_800, 1_262_304_000  # originals from 2000, copies from 2010
ANGLES = (10, 30, 45)


def rotated(image: Image.Image, angle: float, *, filled: bool) -> Image.Image:
    """Turned ``angle`` degrees counter-clockwise on a grown canvas: black corners, or
    corners filled with a blurred, stretched copy of the photo."""
    turned = image.rotate(angle, Image.Resampling.BICUBIC, expand=True, fillcolor=(0, 0, 0))
    if not filled:
        return turned
    mask = Image.new("L", image.size, 255).rotate(angle, Image.Resampling.BICUBIC, expand=True)
    blurred = image.resize(turned.size).filter(ImageFilter.GaussianBlur(max(turned.size) / 40))
    return Image.composite(turned, blurred, mask)


def overlaid(image: Image.Image) -> Image.Image:
    """Three caption lines, two solid boxes with a letter, a faint watermark word."""
    out = image.copy()
    width, height = out.size
    draw = ImageDraw.Draw(out)
    for left, top, colour in ((0.05, 0.7, (200, 30, 30)), (0.72, 0.08, (20, 90, 200))):
        box = (int(width * left), int(height * top), int(width * (left + 0.18)))
        draw.rectangle((*box[:2], box[2], int(height * (top + 0.14))), fill=colour)
        draw.text((box[0] + 6, box[1] + 4), "N", font=ImageFont.load_default(28), fill="white")
    caption = "limited offer today\nshare this photo\nbest deal ever"
    draw.multiline_text(
        (width * 0.08, height * 0.08),
        caption,
        font=ImageFont.load_default(int(height * 0.06)),
        fill=(255, 255, 0),
        stroke_width=1,
        stroke_fill=(0, 0, 0),
    )
    mark = Image.new("L", out.size, 0)
    ImageDraw.Draw(mark).text(
        (width * 0.25, height * 0.42), "SAMPLE", font=ImageFont.load_default(height // 6), fill=90
    )
    return Image.composite(Image.new("RGB", out.size, "white"), out, mark)


def copies(image: Image.Image) -> dict[str, tuple[Image.Image, int]]:
    """Name -> (edited copy, JPEG quality it is saved at)."""
    width, height = image.size
    made = {
        "crop": (
            image.crop((width // 8, height // 10, width - width // 6, height - height // 8)),
            90,
        ),
        "flip": (ImageOps.mirror(image), 90),
        "overlay": (overlaid(image), 90),
        "resize": (
            image.resize((width * 11 // 20, height * 11 // 20), Image.Resampling.LANCZOS),
            90,
        ),
        "recompress": (image, 30),
    }
    for angle in ANGLES:
        made[f"rot{angle}-black"] = (rotated(image, angle, filled=False), 90)
        made[f"rot{angle}-filled"] = (rotated(image, angle, filled=True), 90)
    return made


COPY_NAMES = tuple(copies(Image.new("RGB", (64, 48))))


def build_library(root: Path) -> Path:
    """Originals in ``photos/`` (2000), their copies in ``copies/`` (2010)."""
    for folder in ("photos", "copies"):
        (root / folder).mkdir(parents=True)
    for name in SOURCES:
        original = root / "photos" / f"{name}.jpg"
        photo(name).save(original, quality=92)
        os.utime(original, (OLD, OLD))
        for edit, (image, quality) in copies(photo(name)).items():
            target = root / "copies" / f"{name}-{edit}.jpg"
            image.save(target, quality=quality)
            os.utime(target, (NEW, NEW))
    return root


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_library(tmp_path_factory.mktemp("rotations"))


@pytest.fixture(scope="module")
def collection(library: Path, tmp_path_factory: pytest.TempPathFactory):
    """The library indexed with stored local features (``index --local-features``)."""
    with Collection(tmp_path_factory.mktemp("collection") / "c") as collection:
        report = collection.index(library, workers=1, local_features=True)
        assert not report.failed
        yield collection


def source_of(path: str) -> str:
    return Path(path).stem.split("-")[0]


def assert_every_copy_with_its_original(groups: list[list[str]]) -> None:
    """One group per photo, holding the original and every copy; no group mixes photos."""
    for group in groups:
        assert len({source_of(p) for p in group}) == 1, group
    by_source = {source_of(g[0]): {Path(p).stem for p in g} for g in groups}
    assert sorted(by_source) == sorted(SOURCES)
    for name in SOURCES:
        expected = {name} | {f"{name}-{edit}" for edit in COPY_NAMES}
        assert by_source[name] == expected


def test_verified_is_the_default_method() -> None:
    assert DEFAULT_METHOD is Method.VERIFIED


def test_every_copy_is_grouped_with_its_original(collection: Collection) -> None:
    report = find_duplicates(collection)
    assert_every_copy_with_its_original([[m.path for m in g.members] for g in report.groups])
    for group in report.groups:
        # The original keeps: as many picture pixels as the rotated copies (whose grown
        # canvas is padding) and the recompressed or mirrored ones, and the oldest file.
        assert Path(group.keeper.path).parent.name == "photos"
        for duplicate in group.duplicates:
            assert duplicate.inliers is not None and duplicate.inliers >= report.min_inliers
            assert duplicate.transform is not None


def test_the_transform_says_how_each_copy_was_made(collection: Collection) -> None:
    report = find_duplicates(collection)
    for group in report.groups:
        edits = {Path(d.path).stem.split("-", 1)[1]: d.transform for d in group.duplicates}
        for angle in ANGLES:
            for corners in ("black", "filled"):
                turn = edits[f"rot{angle}-{corners}"]
                assert turn is not None and not turn.mirrored
                assert turn.rotation_degrees == pytest.approx(angle, abs=3)
                assert turn.scale == pytest.approx(1.0, rel=0.1)
        flip, half = edits["flip"], edits["resize"]
        assert flip is not None and flip.mirrored and abs(flip.rotation_degrees) < 3
        assert half is not None and not half.mirrored and half.scale == pytest.approx(0.55, rel=0.1)


def test_different_photos_are_never_grouped(collection: Collection) -> None:
    """Even with every threshold at its loosest, two different photos share no copy."""
    report = find_duplicates(collection, threshold=0.0, min_inliers=3)
    for group in report.groups:
        assert len({source_of(m.path) for m in group.members}) == 1, group


def mirrored_turned_small(image: Image.Image) -> tuple[Image.Image, float]:
    """Mirrored, turned 20 degrees on a grown canvas, shrunk to 400 x 400; and its scale."""
    turned = rotated(ImageOps.mirror(image), 20, filled=False)
    return turned.resize((400, 400)), 400 / turned.width


# Name -> (make the copy and its scale, rotation in degrees, mirrored).
ESTIMATES = {
    "turned 10, filled": (lambda im: (rotated(im, 10, filled=True), 1.0), 10, False),
    "turned -30, black": (lambda im: (rotated(im, -30, filled=False), 1.0), -30, False),
    "turned 45, filled": (lambda im: (rotated(im, 45, filled=True), 1.0), 45, False),
    "half": (lambda im: (im.resize((im.width // 2, im.height // 2)), 0.5), 0, False),
    "one and a half": (
        lambda im: (im.resize((im.width * 3 // 2, im.height * 3 // 2)), 1.5),
        0,
        False,
    ),
    "mirrored": (lambda im: (ImageOps.mirror(im), 1.0), 0, True),
    "mirrored, turned 20, small": (mirrored_turned_small, 20, True),
    # Upside down is mirrored and turned half round.
    "upside down": (lambda im: (ImageOps.flip(im), 1.0), 180, True),
}


@pytest.mark.parametrize("case", list(ESTIMATES))
def test_estimated_transform_of_real_photos(case: str) -> None:
    make, angle, mirrored = ESTIMATES[case]
    original = photo("astronaut")
    copy, scale = make(original)
    source, target = extract(original), extract(copy)
    check = check_pair(source, target, mirrored=mirror_features(source))
    estimate = check.transform
    assert estimate is not None and estimate.inliers == check.inliers >= 25
    assert estimate.mirrored is mirrored
    assert abs((estimate.rotation_degrees - angle + 180) % 360 - 180) <= 3
    assert estimate.scale == pytest.approx(scale, rel=0.1)
    back = check.reversed().transform
    assert back is not None and back.mirrored is mirrored
    assert back.scale == pytest.approx(1 / estimate.scale)


def test_estimate_transform_from_points() -> None:
    """Points turned 30 degrees counter-clockwise as seen (y down), scaled 2, then mirrored
    or not, give those numbers back exactly."""
    import numpy as np

    rng = np.random.default_rng(0)
    points = rng.uniform(0, 100, size=(20, 2))
    theta = np.radians(30)
    # Counter-clockwise as seen on screen, with y pointing down.
    turn = np.array([[np.cos(theta), np.sin(theta)], [-np.sin(theta), np.cos(theta)]])
    moved = points @ turn.T * 2 + 5
    plain = estimate_transform(points, moved)
    assert plain.rotation_degrees == pytest.approx(30) and plain.scale == pytest.approx(2)
    assert not plain.mirrored and plain.inliers == 20
    flipped = points * [-1, 1] @ turn.T * 2 + 5
    mirror = estimate_transform(points, flipped, source_scale=2.0, target_scale=1.0, inliers=7)
    assert mirror.mirrored and mirror.rotation_degrees == pytest.approx(30)
    assert mirror.scale == pytest.approx(1.0) and mirror.inliers == 7
    assert "rotated 30°" in plain.describe() and "mirrored" in mirror.describe()


def test_without_stored_features_the_cli_finds_the_same_groups(
    library: Path, tmp_path: Path, capsys
) -> None:
    """``lookalike dedup FOLDER`` indexes without local features, so verification extracts
    them from the files: the same groups, with the transform in the JSON and the table."""
    target = tmp_path / "c"
    assert main(["-c", str(target), "dedup", str(library), "--format", "json", "-q"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["method"] == "verified"
    groups = [
        [g["keeper"]["path"]] + [d["path"] for d in g["duplicates"]] for g in payload["groups"]
    ]
    assert_every_copy_with_its_original(groups)
    turned = [
        d["transform"]
        for g in payload["groups"]
        for d in g["duplicates"]
        if d["path"].endswith("-rot30-black.jpg")
    ]
    assert len(turned) == len(SOURCES)
    assert all(abs(t["rotation_degrees"] - 30) <= 3 and t["mirrored"] is False for t in turned)
    assert main(["-c", str(target), "dedup", "-q"]) == 0
    table = capsys.readouterr().out
    assert "rotated 30°" in table and "mirrored" in table and "scaled 0.55x" in table
    assert main(["-c", str(target), "dedup", "--format", "csv", "-q"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    flips = [r for r in rows if r["path"].endswith("-flip.jpg")]
    assert len(flips) == len(SOURCES) and all(r["mirrored"] == "True" for r in flips)


def test_words_are_mirror_invariant_and_pairs_come_from_shared_words() -> None:
    """A descriptor and its mirror image get one word; the inverted file counts exactly the
    distinct words each pair of images shares (checked against sets), skipping stop words."""
    import numpy as np

    from lookalike.local.matching import mirror_descriptors
    from lookalike.local.words import best_pairs, shared_words, train_quantizer

    rng = np.random.default_rng(0)
    descriptors = rng.integers(0, 60, size=(4000, 128)).astype(np.uint8)
    quantizer = train_quantizer(descriptors)
    assert np.array_equal(
        quantizer.words(descriptors), quantizer.words(mirror_descriptors(descriptors))
    )

    images = rng.integers(0, 40, size=3000)
    words = rng.integers(0, 200, size=3000)
    a, b, shared = shared_words(images, words, max_posting=12)
    sets = [set(words[images == i].tolist()) for i in range(40)]
    holders = {w: sum(w in s for s in sets) for w in set(words.tolist())}
    expected = {}
    for i in range(40):
        for j in range(i + 1, 40):
            common = [w for w in sets[i] & sets[j] if holders[w] <= 12]
            if common:
                expected[(i, j)] = len(common)
    assert (
        dict(zip(zip(a.tolist(), b.tolist(), strict=True), shared.tolist(), strict=True))
        == expected
    )
    # Each image keeps its best pair: every image with a pair is in one that is kept.
    kept = best_pairs(a, b, shared, per_image=1, min_shared=1)
    ends = set(a[kept].tolist()) | set(b[kept].tolist())
    assert ends == set(a.tolist()) | set(b.tolist())
