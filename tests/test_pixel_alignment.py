"""The copy test in pixels: a copy's blocks land where one motion says, a second view of the
scene strays, a different photo shares none, and two photos that share only a printed logo
are not copies however exactly the logo's keypoints match. Real photos (scikit-image), real
SIFT, real files through ``find_duplicates`` and ``find_in_reference``."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import photo
from PIL import Image, ImageEnhance, ImageOps
from test_dedup_rotations import overlaid, rotated

from lookalike.cli.main import main
from lookalike.core.collection import Collection
from lookalike.dedup import find_duplicates, find_in_reference
from lookalike.dedup.finder import copy_rule
from lookalike.dedup.verification import CopyRule, PairCheck, Verifier, aligned, check_pair
from lookalike.local.alignment import align_pixels
from lookalike.local.features import extract, frame_grey
from lookalike.local.matching import mirror_features

pytest.importorskip("cv2")

RULE = copy_rule(10)
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    """The image as a JPEG of this quality would decode."""
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def noisy(image: Image.Image, sigma: float) -> Image.Image:
    """Grey sensor-like noise: moves SIFT keypoints, hardly whole blocks."""
    rng = np.random.default_rng(0)
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels + rng.normal(0.0, sigma, pixels.shape[:2])[..., None]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def second_view(image: Image.Image) -> Image.Image:
    """The scene from a step to the side: a perspective change, which no similarity (nor
    any affine motion) explains."""
    import cv2

    width, height = image.size
    corners = np.float32([[0, 0], [width, 0], [width, height], [0, height]])
    moved = corners + np.float32(
        [[0, 0], [-0.04 * width, 0.03 * height], [-0.04 * width, -0.03 * height], [0, 0]]
    )
    warp = cv2.getPerspectiveTransform(corners, moved)
    pixels = cv2.warpPerspective(
        np.asarray(image), warp, (width, height), borderMode=cv2.BORDER_REFLECT
    )
    return Image.fromarray(pixels)


def with_logo(image: Image.Image, at: tuple[int, int]) -> Image.Image:
    """The photo at 512 x 384 with the same printed label (a piece of another photo)."""
    label = photo("chelsea").crop((120, 60, 300, 200)).resize((150, 110))
    out = image.resize((512, 384))
    out.paste(label, at)
    return out


def checked(first: Image.Image, second: Image.Image) -> tuple[PairCheck, np.ndarray, np.ndarray]:
    """The SIFT check of ``first`` against ``second`` and both grey feature frames."""
    features_a, features_b = extract(first), extract(second)
    check = check_pair(features_a, features_b, mirrored=mirror_features(features_a))
    grey_a = frame_grey(first, features_a.width, features_a.height)
    grey_b = frame_grey(second, features_b.width, features_b.height)
    return check, grey_a, grey_b


def edits(image: Image.Image) -> dict[str, Image.Image]:
    width, height = image.size
    return {
        "jpeg": jpeg(image, 30),
        "shrunk-noisy": jpeg(noisy(image.resize((width // 2, height // 2)), 8), 85),
        "rotated": jpeg(rotated(image, 30, filled=False), 80),
        "captions": jpeg(overlaid(image), 80),
        "mirrored": jpeg(ImageOps.mirror(image), 90),
        "brighter": jpeg(ImageEnhance.Brightness(image).enhance(1.3), 90),
    }


@pytest.mark.parametrize("name", PHOTOS)
def test_a_copy_lines_up_block_by_block(name: str) -> None:
    original = photo(name)
    for edit, copy in edits(original).items():
        check, grey_copy, grey_original = checked(copy, original)
        alignment = aligned(check, grey_copy, grey_original)
        assert RULE.pixels.proves(alignment), (edit, alignment)
        assert not RULE.pixels.refutes(alignment), (edit, alignment)
        # Seen from the original, by the reversed check: the same verdict.
        back = aligned(check.reversed(), grey_original, grey_copy)
        assert RULE.pixels.proves(back), (edit, back)


@pytest.mark.parametrize("name", PHOTOS)
def test_a_second_view_of_the_scene_strays(name: str) -> None:
    original = photo(name)
    check, grey_view, grey_original = checked(second_view(original), original)
    assert check.matrix is not None, "the keypoints align most of the view"
    alignment = aligned(check, grey_view, grey_original)
    assert alignment.drift > RULE.pixels.max_drift, alignment
    assert not RULE.pixels.proves(alignment)


def test_different_photos_share_no_blocks() -> None:
    first = np.asarray(photo("coffee").convert("L").resize((512, 384)))
    second = np.asarray(photo("chelsea").convert("L").resize((512, 384)))
    alignment = align_pixels(first, second, np.eye(3)[:2])
    assert alignment.blocks > 100
    assert alignment.alike < 0.1
    assert RULE.pixels.refutes(alignment)
    assert not RULE.pixels.proves(alignment)


def test_a_frame_without_texture_is_never_refuted() -> None:
    """Blank pixels cannot say a pair differs: the keypoints' verdict stands."""
    blank = np.full((300, 400), 128, dtype=np.uint8)
    alignment = align_pixels(blank, blank, np.eye(3)[:2])
    assert alignment.blocks == 0
    assert not RULE.pixels.refutes(alignment)


@pytest.mark.parametrize(
    ("first", "second", "at"), [("coffee", "rocket", (140, 90)), ("rocket", "coffee", (200, 150))]
)
def test_a_shared_logo_is_not_a_copy(first: str, second: str, at: tuple[int, int]) -> None:
    a = with_logo(photo(first), (40, 40))
    b = with_logo(photo(second), at)
    check, grey_a, grey_b = checked(a, b)
    assert RULE.accepts(check), "the label's keypoints alone look like a copy"
    assert check.inliers < RULE.pixels.clear_inliers
    assert not RULE.confirms(check, lambda refine: aligned(check, grey_a, grey_b, refine=refine))


def test_pixels_decide_a_pair_the_keypoints_leave_open() -> None:
    """With a keypoint rule too strict for a noisy copy, its pixels still prove it; those of
    a second view of the scene do not."""
    strict = CopyRule(10, 0.9, 0.05, RULE.pixels)
    original = photo("chelsea")
    copy = noisy(original.resize((original.width // 2, original.height // 2)), 8)
    check, grey_copy, grey_original = checked(copy, original)
    assert not strict.accepts(check) and strict.needs_pixels(check)
    assert strict.confirms(
        check, lambda refine: aligned(check, grey_copy, grey_original, refine=refine)
    )
    view_check, grey_view, _ = checked(second_view(original), original)
    assert not strict.confirms(
        view_check, lambda refine: aligned(view_check, grey_view, grey_original, refine=refine)
    )


@pytest.fixture(scope="module")
def logo_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two different photos printed with one label, and a copy of each."""
    root = tmp_path_factory.mktemp("logos")
    first = with_logo(photo("coffee"), (40, 40))
    second = with_logo(photo("rocket"), (140, 90))
    # Lossless, as a designer's exports are: the label's keypoints then match exactly.
    first.save(root / "coffee-label.png")
    second.save(root / "rocket-label.png")
    jpeg(first, 35).save(root / "coffee-label-copy.jpg", quality=35)
    overlaid(second).save(root / "rocket-label-captions.jpg", quality=85)
    return root


def copied(source: Path, folder: Path, *names: str) -> Path:
    """A new ``folder`` holding copies of these files of ``source``."""
    folder.mkdir()
    for name in names:
        shutil.copy(source / name, folder / name)
    return folder


LABEL_GROUPS = [
    ["coffee-label-copy.jpg", "coffee-label.png"],
    ["rocket-label-captions.jpg", "rocket-label.png"],
]


def test_find_duplicates_keeps_photos_that_share_a_label_apart(
    logo_library: Path, tmp_path: Path, catalog_db
) -> None:
    """On SQLite and PostgreSQL alike (the pixel test reads each file by its catalog path)."""
    with Collection(tmp_path / "c", db=catalog_db()) as collection:
        assert not collection.index(logo_library, workers=1, local_features=True).failed
        report = find_duplicates(collection, method="verified", workers=1)
    groups = sorted(sorted(Path(m.path).name for m in g.members) for g in report.groups)
    assert groups == LABEL_GROUPS


def cli_groups(folder: Path, target: Path, capsys: pytest.CaptureFixture[str]) -> list[list[str]]:
    """The groups ``lookalike dedup FOLDER --format json`` prints, as sorted file names."""
    assert main(["-c", str(target), "dedup", str(folder), "--format", "json", "-q"]) == 0
    payload = json.loads(capsys.readouterr().out)
    return sorted(
        sorted([Path(g["keeper"]["path"]).name] + [Path(d["path"]).name for d in g["duplicates"]])
        for g in payload["groups"]
    )


def test_the_cli_keeps_photos_that_share_a_label_apart(
    logo_library: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``lookalike dedup FOLDER`` indexes without local features: the same groups."""
    assert cli_groups(logo_library, tmp_path / "c", capsys) == LABEL_GROUPS


def test_against_a_reference_the_label_alone_matches_nothing(
    logo_library: Path, tmp_path: Path
) -> None:
    """The reference holds the coffee with the label and the rocket's captioned copy: the
    rocket with the label finds its copy and not the coffee, whose label its words share."""
    reference = copied(
        logo_library, tmp_path / "reference", "coffee-label.png", "rocket-label-captions.jpg"
    )
    with Collection(tmp_path / "c") as collection:
        assert not collection.index(reference, workers=1, local_features=True).failed
        found = find_in_reference(logo_library / "rocket-label.png", collection, workers=1)
        copy = find_in_reference(logo_library / "coffee-label-copy.jpg", collection, workers=1)
    assert [Path(m.path).name for r in found.results for m in r.matches] == [
        "rocket-label-captions.jpg"
    ]
    assert [Path(m.path).name for r in copy.results for m in r.matches] == ["coffee-label.png"]


def test_a_file_gone_since_indexing_leaves_the_keypoints_verdict(
    logo_library: Path, tmp_path: Path
) -> None:
    """The pixel test reads files; one that no longer reads has no say, and the run goes on.
    (Two images alone are too few to learn visual words from: their embedding neighbours are
    checked all the same.)"""
    library = copied(
        logo_library, tmp_path / "library", "coffee-label.png", "coffee-label-copy.jpg"
    )
    with Collection(tmp_path / "c") as collection:
        assert not collection.index(library, workers=1, local_features=True).failed
        os.remove(library / "coffee-label.png")
        report = find_duplicates(collection, method="verified", workers=1)
    names = [sorted(Path(m.path).name for m in g.members) for g in report.groups]
    assert names == [["coffee-label-copy.jpg", "coffee-label.png"]]


def test_which_pairs_the_pixels_have_a_say_in() -> None:
    """Keypoint-proven pairs with few inliers (a refutation can undo them), and unproven
    pairs with a few inliers landing near their transform; a stricter ``min_inliers`` asks
    more of the latter too. Without a transform, nothing to align."""
    identity = np.eye(3)[:2]

    def pair(
        inliers: int, agreement: float, residual: float, matrix: np.ndarray | None
    ) -> PairCheck:
        return PairCheck(inliers, inliers * 2, agreement, residual, matrix=matrix)

    assert RULE.needs_pixels(pair(20, 0.95, 0.2, identity))  # proven, under 40 inliers
    assert not RULE.needs_pixels(pair(60, 0.95, 0.2, identity))  # proven beyond doubt
    assert RULE.needs_pixels(pair(3, 0.5, 0.9, identity))
    assert not RULE.needs_pixels(pair(2, 0.5, 0.2, identity))
    assert not RULE.needs_pixels(pair(30, 0.8, 1.5, identity))  # a second photo's spread
    assert not RULE.needs_pixels(pair(30, 0.8, 0.5, None))
    strict = copy_rule(50)
    assert not strict.needs_pixels(pair(5, 0.5, 0.5, identity))
    assert strict.needs_pixels(pair(15, 0.5, 0.5, identity))


def test_a_copy_only_its_pixels_prove_is_grouped(tmp_path: Path) -> None:
    """A shrunk copy with heavy sensor-like noise: its keypoints land 0.4 px from where the
    similarity says, too far for the keypoints alone; its blocks follow one motion, so
    ``dedup`` groups it with its original all the same."""
    library = tmp_path / "library"
    library.mkdir()
    original = photo("coffee")
    original.save(library / "coffee.jpg", quality=92)
    half = original.resize((original.width // 2, original.height // 2), Image.Resampling.LANCZOS)
    jpeg(noisy(half, 14), 90).save(library / "coffee-noisy.jpg", quality=90)
    photo("rocket").save(library / "rocket.jpg", quality=92)
    with Collection(tmp_path / "c") as collection:
        assert not collection.index(library, workers=1, local_features=True).failed
        ids = {Path(path).name: i for path, i in collection.catalog.paths().items()}
        report = find_duplicates(collection, method="verified", workers=1)
        check = Verifier(collection, []).check(ids["coffee-noisy.jpg"], ids["coffee.jpg"])
    assert not RULE.accepts(check), check
    names = [sorted(Path(m.path).name for m in g.members) for g in report.groups]
    assert names == [["coffee-noisy.jpg", "coffee.jpg"]]


@pytest.fixture
def messy_library(logo_library: Path, tmp_path: Path) -> Path:
    """The labelled photos the way a user's folder holds them: odd names, other formats (PNG,
    TIFF, WebP, HEIC), a copy that is a symlink to a file kept elsewhere, a corrupt file and
    an empty one beside them."""
    from pillow_heif import register_heif_opener

    register_heif_opener()
    root = tmp_path / "Mes photos (2024)"
    (root / "étiquettes").mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    first = Image.open(logo_library / "coffee-label.png").convert("RGB")
    second = Image.open(logo_library / "rocket-label.png").convert("RGB")
    first.save(root / "café à l'étiquette #1.png")
    second.save(root / "étiquettes" / "fusée 🚀.tiff")
    jpeg(first, 35).save(root / "café copie.webp", quality=60)
    overlaid(second).save(outside / "fusée légendée.heic", quality=90)
    (root / "étiquettes" / "fusée légendée.heic").symlink_to(outside / "fusée légendée.heic")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "empty.png").write_bytes(b"")
    return root


MESSY_GROUPS = [
    ["café copie.webp", "café à l'étiquette #1.png"],
    ["fusée légendée.heic", "fusée 🚀.tiff"],
]


def test_a_messy_folder_keeps_the_labels_apart_in_the_library_cli_and_rest(
    messy_library: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The pixel test reads every format and path the index does; the bad files are reported
    and the rest goes on, the same groups through each interface."""
    import httpx
    from test_rest import LiveServer

    from lookalike.server.rest import create_app
    from lookalike.server.service import SearchService

    with Collection(tmp_path / "c") as collection:
        report = collection.index(messy_library, workers=1, local_features=True)
        assert sorted(Path(path).name for path, _ in report.failed) == ["broken.jpg", "empty.png"]
        groups = find_duplicates(collection, method="verified", workers=1).groups
        assert sorted(sorted(Path(m.path).name for m in g.members) for g in groups) == MESSY_GROUPS
        with (
            LiveServer(create_app(SearchService(collection))) as server,
            httpx.Client(base_url=server.url, timeout=120) as client,
        ):
            reply = client.get("/duplicates", params={"method": "verified"})
        assert reply.status_code == 200, reply.text
        served = [
            sorted([g["keeper"]["filename"]] + [d["filename"] for d in g["duplicates"]])
            for g in reply.json()["groups"]
        ]
        assert sorted(served) == MESSY_GROUPS
    assert cli_groups(messy_library, tmp_path / "cli", capsys) == MESSY_GROUPS
