"""Local features: RootSIFT serialisation, geometric verification, re-ranking, catalog storage."""

from __future__ import annotations

import importlib.util
import sqlite3
import sys
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
from conftest import photo
from PIL import Image, ImageDraw, ImageFont

from lookalike.catalog import ImageRecord, SqliteCatalog
from lookalike.catalog.schema import SCHEMA_VERSION
from lookalike.encoders import EncoderIdentity, PreprocessConfig
from lookalike.errors import CatalogError, LookalikeError
from lookalike.local.errors import CorruptLocalFeaturesError, LocalFeaturesError
from lookalike.local.features import (
    DATABASE_CONFIG,
    QUERY_CONFIG,
    LocalFeatures,
    SiftConfig,
    extract,
)
from lookalike.local.matching import RerankRule, mutual_matches, rerank, verify
from lookalike.local.rerank import LocalReranker

# Storage and the rules need no OpenCV; extraction and matching do.
needs_opencv = pytest.mark.skipif(
    importlib.util.find_spec("cv2") is None, reason="opencv-python-headless is not installed"
)
if importlib.util.find_spec("cv2") is not None:
    import cv2

    cv2.setNumThreads(1)  # a shared machine: one core per test process

CONFIG = PreprocessConfig(resolution=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
NAMES = ("astronaut", "chelsea", "coffee", "rocket")


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    return {name: photo(name) for name in NAMES}


@pytest.fixture(scope="module")
def stored(photos: dict[str, Image.Image]) -> dict[str, LocalFeatures]:
    """Database-side features, through their serialised form as a catalog holds them."""
    return {n: LocalFeatures.from_bytes(extract(p).to_bytes()) for n, p in photos.items()}


def _text(image: Image.Image) -> Image.Image:
    out = image.copy()
    draw = ImageDraw.Draw(out)
    size = out.height // 6
    draw.text(
        (10, out.height // 3),
        "COPY SALE",
        font=ImageFont.load_default(size=size),
        fill=(255, 40, 40),
        stroke_width=3,
        stroke_fill=(0, 0, 0),
    )
    return out


def _edits(image: Image.Image) -> dict[str, Image.Image]:
    width, height = image.size
    return {
        "crop": image.crop((width // 5, height // 6, width * 4 // 5, height * 5 // 6)),
        "rotation": image.rotate(15, Image.Resampling.BICUBIC, expand=True),
        "scale": image.resize((width * 2 // 5, height * 2 // 5), Image.Resampling.BILINEAR),
        "text": _text(image),
    }


# -- features and their serialisation ---------------------------------------------------------


@needs_opencv
def test_round_trip_is_exact_and_small(stored: dict[str, LocalFeatures]) -> None:
    features = extract(photo("astronaut"))
    data = features.to_bytes()
    back = LocalFeatures.from_bytes(data)
    assert len(data) == features.nbytes
    assert 100 <= len(features) <= DATABASE_CONFIG.max_keypoints
    np.testing.assert_array_equal(back.points, features.points)
    np.testing.assert_array_equal(back.descriptors, features.descriptors)
    assert (back.width, back.height, back.scale) == (features.width, features.height, 1.0)
    assert back.to_bytes() == data
    # 256 keypoints of 132 bytes and a 20-byte header: a few tens of KB at most.
    assert all(f.nbytes <= 40_000 for f in stored.values())


@needs_opencv
def test_points_are_in_the_shrunk_frame_with_the_scale() -> None:
    big = photo("coffee").resize((1200, 800))
    features = extract(big)
    assert (features.width, features.height) == (512, 341)
    assert features.scale == pytest.approx(1200 / 512, rel=1e-6)
    assert features.points[:, 0].max() <= 512 and features.points[:, 1].max() <= 341
    # RootSIFT: sqrt of an L1-normalised vector is L2-unit, here scaled by 255.
    norms = np.linalg.norm(features.descriptors.astype(np.float32), axis=1)
    np.testing.assert_allclose(norms, 255.0, rtol=0.02)


@needs_opencv
def test_a_flat_image_has_no_keypoints_and_still_round_trips() -> None:
    features = extract(Image.new("RGB", (300, 200), (90, 90, 90)))
    assert len(features) == 0
    assert len(LocalFeatures.from_bytes(features.to_bytes())) == 0
    # Also read without the checksum, as the visual words read stored features.
    unchecked = LocalFeatures.from_bytes(features.to_bytes(), check=False)
    assert len(unchecked) == 0 and unchecked.descriptors.shape == (0, 128)
    assert rerank(features, [(1, 0.5, features)]).tolist() == [0.5]


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda d: b"",
        lambda d: d[:10],
        lambda d: d[:-1],
        lambda d: d + b"\0",
        lambda d: b"XXXX" + d[4:],
        lambda d: d[:4] + bytes([99]) + d[5:],
        lambda d: d[:-5] + bytes([d[-5] ^ 0xFF]) + d[-4:],
    ],
    ids=["empty", "header", "short", "long", "magic", "version", "flipped-bit"],
)
def test_corrupt_bytes_raise_a_typed_error(corrupt) -> None:
    data = _synthetic(3).to_bytes()
    with pytest.raises(CorruptLocalFeaturesError) as raised:
        LocalFeatures.from_bytes(corrupt(data))
    assert isinstance(raised.value, LookalikeError)


def test_bad_configurations_and_arrays_are_refused() -> None:
    with pytest.raises(LocalFeaturesError):
        SiftConfig(max_keypoints=0)
    with pytest.raises(LocalFeaturesError):
        LocalFeatures(np.zeros((2, 2)), np.zeros((3, 128), np.uint8), 10, 10)
    assert SiftConfig().kind != SiftConfig(max_keypoints=128).kind
    outside = LocalFeatures(np.array([[500.0, 5.0]]), np.zeros((1, 128), np.uint8), 10, 10)
    with pytest.raises(CorruptLocalFeaturesError, match="outside"):
        LocalFeatures.from_bytes(outside.to_bytes())


# -- verification -----------------------------------------------------------------------------


@needs_opencv
@pytest.mark.parametrize("name", NAMES)
def test_edited_copies_verify_and_other_photos_do_not(
    name: str, photos: dict[str, Image.Image], stored: dict[str, LocalFeatures]
) -> None:
    for edit, copy in _edits(photos[name]).items():
        query = extract(copy, QUERY_CONFIG)
        for other, features in stored.items():
            inliers = verify(query, features).inliers
            if other == name:
                assert inliers >= 20, (name, edit, inliers)
            else:
                assert inliers < 8, (name, edit, other, inliers)


@needs_opencv
def test_the_transform_maps_a_crop_back_to_its_place(photos: dict[str, Image.Image]) -> None:
    image = photos["astronaut"]  # 512 x 512: no shrinking, so frames are pixels
    crop = image.crop((100, 60, 400, 360))
    found = verify(extract(crop, QUERY_CONFIG), extract(image))
    assert found.transform is not None
    np.testing.assert_allclose(found.transform[:, :2], np.eye(2), atol=0.02)
    np.testing.assert_allclose(found.transform[:, 2], [100, 60], atol=1.5)


def test_mutual_matches_need_a_clear_nearest_neighbour() -> None:
    rng = np.random.default_rng(0)
    base = rng.random((5, 128)).astype(np.float32)
    pairs = mutual_matches(base + 0.01, base)
    assert sorted(map(tuple, pairs.tolist())) == [(i, i) for i in range(5)]
    # Two identical candidates: no nearest neighbour is clearly better than the second.
    assert len(mutual_matches(base[:1], np.repeat(base[:1], 2, axis=0))) == 0


# -- re-ranking -------------------------------------------------------------------------------


@needs_opencv
def test_rerank_moves_a_verified_copy_above_a_higher_scored_stranger(
    photos: dict[str, Image.Image], stored: dict[str, LocalFeatures]
) -> None:
    query = extract(_edits(photos["coffee"])["rotation"], QUERY_CONFIG)
    candidates = [
        (1, 0.93, stored["rocket"]),
        (2, 0.90, stored["chelsea"]),
        (3, 0.61, stored["coffee"]),
        (4, 0.55, None),  # no stored features: keeps its score
    ]
    scores = rerank(query, candidates)
    assert scores[2] == pytest.approx(0.61 + 0.39 * 0.9)  # verified: >= 40 inliers
    assert scores[:2].tolist() == [0.93, 0.90]  # unverified keep their global order
    assert scores[3] == 0.55
    assert int(np.argmax(scores)) == 2


def test_rerank_rule_grades_inliers_and_stays_below_one() -> None:
    rule = RerankRule(min_inliers=10, cap=40, weight=0.9)
    assert rule.score(0.5, 9) == 0.5
    assert rule.score(0.5, 10) == pytest.approx(0.5 + 0.5 * 0.9 / 4)
    assert rule.score(0.5, 40) == rule.score(0.5, 400) == pytest.approx(0.95)
    assert rule.score(-0.2, 400) < 1.0
    assert rule.score(1.3, 400) == 1.3  # not a cosine: never raised
    with pytest.raises(LocalFeaturesError):
        RerankRule(min_inliers=1)
    with pytest.raises(LocalFeaturesError):
        RerankRule(weight=1.5)


@needs_opencv
def test_local_reranker_hook_for_copy_detection(
    photos: dict[str, Image.Image], stored: dict[str, LocalFeatures]
) -> None:
    database = [stored[n] for n in NAMES]
    hook = LocalReranker(lambda ids: [database[i] for i in ids], mirror=True)
    mirrored = photos["chelsea"].transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    scores = hook(mirrored, np.array([0, 1]), np.array([0.9, 0.8]))
    assert scores[1] > 0.95 and scores[0] == 0.9


# -- catalog storage --------------------------------------------------------------------------


def _catalog_with_images(path: Path, *hashes: str) -> tuple[SqliteCatalog, list[int]]:
    catalog = SqliteCatalog(path)
    model = catalog.register_model(EncoderIdentity("m", "head", 3, "ab" * 32, CONFIG))
    records = [ImageRecord(f"/{i}.jpg", h, 1, 1.0, 4, 3) for i, h in enumerate(hashes)]
    return catalog, catalog.store(records, np.ones((len(records), 3)), model)


def _synthetic(seed: int, n: int = 50) -> LocalFeatures:
    rng = np.random.default_rng(seed)
    points = rng.uniform(0, 1, size=(n, 2)) * [300, 200]
    return LocalFeatures(points, rng.integers(0, 256, (n, 128)), 300, 200, scale=1.5)


def test_round_trip_of_synthetic_features_needs_no_opencv() -> None:
    features = _synthetic(1)
    back = LocalFeatures.from_bytes(features.to_bytes())
    np.testing.assert_array_equal(back.points, features.points)
    np.testing.assert_array_equal(back.descriptors, features.descriptors)
    assert (back.width, back.height, back.scale) == (300, 200, 1.5)
    assert len(features.to_bytes()) == 20 + 50 * 132


def test_without_opencv_extraction_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cv2", None)  # makes ``import cv2`` fail
    with pytest.raises(LocalFeaturesError, match="opencv-python-headless"):
        extract(Image.new("RGB", (64, 64)))


def test_catalog_round_trip_replace_and_missing(tmp_path: Path) -> None:
    catalog, ids = _catalog_with_images(tmp_path / "c.sqlite", "h0", "h1", "h2")
    kind = DATABASE_CONFIG.kind
    blobs = {i: _synthetic(i).to_bytes() for i in ids}
    assert catalog.store_local_features([(i, kind, b) for i, b in blobs.items()]) == 3
    assert catalog.local_features([*ids, 999], kind) == blobs
    assert LocalFeatures.from_bytes(catalog.local_features([ids[2]], kind)[ids[2]]).width == 300
    assert catalog.local_features(ids, "other-kind") == {}
    assert catalog.ids_missing_local_features(kind) == []
    assert catalog.local_features_summary() == {kind: (3, sum(map(len, blobs.values())))}
    catalog.store_local_features([(ids[0], kind, b"new")])
    assert catalog.local_features([ids[0]], kind) == {ids[0]: b"new"}
    with pytest.raises(CatalogError):
        catalog.store_local_features([(999, kind, b"x")])
    # Features computed from content that has since changed are not stored.
    written = catalog.store_local_features([(ids[1], kind, b"old")], content_hashes={ids[1]: "x"})
    assert written == 0
    assert catalog.local_features([ids[1]], kind) == {ids[1]: blobs[ids[1]]}
    catalog.close()


def test_features_go_with_their_image_and_with_its_old_content(tmp_path: Path) -> None:
    catalog, ids = _catalog_with_images(tmp_path / "c.sqlite", "h0", "h1")
    catalog.store_local_features([(i, "k", b"data") for i in ids])
    catalog.remove([ids[0]])  # ON DELETE CASCADE
    assert catalog.local_features(ids, "k") == {ids[1]: b"data"}
    model = catalog.register_model(EncoderIdentity("m", "head", 3, "ab" * 32, CONFIG))
    catalog.store([ImageRecord("/1.jpg", "h1", 1, 2.0, 4, 3)], np.ones((1, 3)), model)
    assert catalog.local_features(ids, "k") == {ids[1]: b"data"}  # same content: kept
    catalog.store([ImageRecord("/1.jpg", "changed", 1, 3.0, 4, 3)], np.ones((1, 3)), model)
    assert catalog.local_features(ids, "k") == {}
    assert catalog.ids_missing_local_features("k") == [(ids[1], "/1.jpg")]
    catalog.close()


def test_a_version_1_catalog_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    catalog, ids = _catalog_with_images(path, "h0")
    catalog.close()
    with closing(sqlite3.connect(path)) as db:
        db.executescript(
            "DROP TRIGGER local_features_stale; DROP TABLE local_features; "
            "DROP INDEX vectors_image; DROP TRIGGER vectors_stale; "
            "ALTER TABLE vectors DROP COLUMN checksum; PRAGMA user_version = 1;"
        )
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    with SqliteCatalog(path) as upgraded:
        assert upgraded.schema_version == SCHEMA_VERSION >= 2
        assert upgraded.count() == 1
        upgraded.store_local_features([(ids[0], "k", b"data")])
        assert upgraded.local_features(ids, "k") == {ids[0]: b"data"}
