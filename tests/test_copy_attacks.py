"""The harder copy-detection attacks (``HARD_ATTACKS``): each makes the change it describes to
a real photo, deterministically per seed; attack lists and the suite's summary figures."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import photo
from PIL import Image, ImageOps

from lookalike.errors import LookalikeError
from lookalike.evaluation import ALL_ATTACKS, ATTACKS, HARD_ATTACKS, apply_attack
from lookalike.evaluation.copydetect import (
    attack_rng,
    parse_attacks,
    run_copy_detection,
    screenshot_layout,
)

WIDTH, HEIGHT = 320, 240
SEEDS = (0, 1, 2, 3, 4)


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return photo("astronaut").resize((WIDTH, HEIGHT))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize("attack", sorted(HARD_ATTACKS))
def test_attacks_are_deterministic_per_seed_and_leave_the_input(
    attack: str, astronaut: Image.Image
) -> None:
    before = np.asarray(astronaut).copy()
    out = apply_attack(astronaut, attack, seed=3, source_id=5)
    np.testing.assert_array_equal(np.asarray(astronaut), before)
    assert out.mode == "RGB"
    again = apply_attack(astronaut, attack, seed=3, source_id=5)
    assert again.size == out.size and again.tobytes() == out.tobytes()
    others = [apply_attack(astronaut, attack, seed=s, source_id=5) for s in (4, 5)]
    assert any(o.tobytes() != out.tobytes() for o in others)
    assert apply_attack(astronaut, attack, seed=3, source_id=6).tobytes() != out.tobytes()


def test_overlay_changes_pixels_in_bounded_regions_only(astronaut: Image.Image) -> None:
    original = pixels(astronaut)
    for seed in SEEDS:
        out = pixels(apply_attack(astronaut, "overlay", seed=seed))
        assert out.shape == original.shape
        changed = np.any(out != original, axis=2)
        # Text lines, boxes and a watermark: visible, yet most of the photo is untouched
        # (bit for bit, not merely close).
        assert 0.03 <= changed.mean() <= 0.5, (seed, changed.mean())
        # Several separate regions: the changed rows are not one narrow band.
        rows = np.flatnonzero(changed.any(axis=1))
        assert rows.max() - rows.min() >= HEIGHT * 0.15
        # A solid box of one colour at least 8% of each side (a logo or sticker).
        assert _has_solid_box(out, changed, round(WIDTH * 0.08), round(HEIGHT * 0.08)), seed


def _has_solid_box(image: np.ndarray, changed: np.ndarray, box_w: int, box_h: int) -> bool:
    """Whether some changed box_w x box_h window is of one colour (sampled at its corners and
    centre, then checked in full)."""
    height, width = changed.shape
    for top in range(0, height - box_h + 1, 2):
        for left in range(0, width - box_w + 1, 2):
            if not changed[top, left]:
                continue
            window = image[top : top + box_h // 2, left : left + box_w // 2]
            if (window == window[0, 0]).all():
                return True
    return False


def _rotated_size(width: int, height: int, degrees: float) -> tuple[float, float]:
    angle = math.radians(abs(degrees))
    return (
        width * math.cos(angle) + height * math.sin(angle),
        width * math.sin(angle) + height * math.cos(angle),
    )


def _angle_from_size(out: Image.Image) -> float:
    """The rotation (degrees, 0-90) whose grown canvas has the size of ``out``."""
    angles = np.linspace(0, 90, 9001)
    sizes = np.array([_rotated_size(WIDTH, HEIGHT, a) for a in angles])
    error = np.abs(sizes - np.array(out.size)).sum(axis=1)
    return float(angles[int(np.argmin(error))])


def test_large_rotation_is_10_to_45_degrees_with_filled_corners(astronaut: Image.Image) -> None:
    signs = set()
    for seed in SEEDS:
        out = apply_attack(astronaut, "rotation-large", seed=seed)
        angle = _angle_from_size(out)
        assert 9.5 <= angle <= 45.5, (seed, angle, out.size)
        # The content is the photo turned by that angle, one way or the other.
        best_sign = min(
            (1.0, -1.0),
            key=lambda sign: _centre_error(out, astronaut.rotate(sign * angle, expand=True)),
        )
        assert _centre_error(out, astronaut.rotate(best_sign * angle, expand=True)) < 12
        signs.add(best_sign)
        # The corners are filled with the blurred photo, not left black.
        corners = pixels(out)[[2, 2, -3, -3], [2, -3, 2, -3]]
        assert (corners.sum(axis=1) > 60).all(), (seed, corners)
        assert not (pixels(astronaut.rotate(best_sign * angle, expand=True))[2, 2] > 0).any()
    assert signs == {1.0, -1.0}  # both directions occur


def _centre_error(out: Image.Image, expected: Image.Image) -> float:
    """Mean absolute difference of the central halves of two images of about the same size."""
    width, height = min(out.width, expected.width), min(out.height, expected.height)
    a, b = (
        pixels(i)[
            i.height // 2 - height // 4 : i.height // 2 + height // 4,
            i.width // 2 - width // 4 : i.width // 2 + width // 4,
        ]
        for i in (out, expected)
    )
    rows, cols = min(a.shape[0], b.shape[0]), min(a.shape[1], b.shape[1])
    return float(np.abs(a[:rows, :cols] - b[:rows, :cols]).mean())


def test_rotation_crop_color_crops_a_rotated_canvas_and_changes_colours(
    astronaut: Image.Image,
) -> None:
    for seed in SEEDS:
        out = apply_attack(astronaut, "rotation-crop-color", seed=seed)
        # A part of a canvas rotated by 5-30 degrees: smaller than that canvas at 30 degrees,
        # at least half of each side of the photo's.
        largest = _rotated_size(WIDTH, HEIGHT, 30)
        assert out.width <= largest[0] and out.height <= largest[1]
        assert out.width >= WIDTH * 0.5 and out.height >= HEIGHT * 0.5
        assert out.size != astronaut.size
        # The colours moved: some channel's mean, or the saturation, differs clearly.
        means = pixels(out).reshape(-1, 3).mean(axis=0)
        source = pixels(astronaut).reshape(-1, 3).mean(axis=0)
        spread = pixels(out).std(axis=2).mean() / pixels(astronaut).std(axis=2).mean()
        assert np.abs(means - source).max() > 8 or abs(spread - 1) > 0.15, seed


def test_screenshot_frames_the_scaled_photo_between_ui_bars(astronaut: Image.Image) -> None:
    for seed in SEEDS:
        out = apply_attack(astronaut, "screenshot", seed=seed)
        canvas, (left, top, right, bottom) = screenshot_layout(
            astronaut.size, attack_rng(seed, "screenshot", 0)
        )
        assert out.size == canvas
        shown = (right - left) / WIDTH
        assert 0.59 <= shown <= 0.96 and out.width > right - left and out.height > bottom - top
        expected = astronaut.resize((right - left, bottom - top), Image.Resampling.BILINEAR)
        framed = pixels(out)[top:bottom, left:right]
        np.testing.assert_array_equal(framed, pixels(expected))
        # UI bars above and below the photo: a uniform strip of rows with drawn things on it.
        above, below = pixels(out)[: top - 2], pixels(out)[bottom + 2 :]
        for strip in (above, below):
            colours, counts = np.unique(strip.reshape(-1, 3), axis=0, return_counts=True)
            assert counts.max() / counts.sum() > 0.6  # mostly the bar colour
            assert len(colours) > 1  # with text or icons on it


def test_flip_crop_is_a_crop_of_the_mirror_image(astronaut: Image.Image) -> None:
    mirrored = pixels(ImageOps.mirror(astronaut))
    plain = pixels(astronaut)
    for seed in SEEDS:
        out = pixels(apply_attack(astronaut, "flip-crop", seed=seed))
        height, width = out.shape[:2]
        assert 0.49 <= width * height / (WIDTH * HEIGHT) <= 0.81, seed
        found = [
            (top, left)
            for top in range(HEIGHT - height + 1)
            for left in range(WIDTH - width + 1)
            if (mirrored[top, left : left + width] == out[0]).all()
            and (mirrored[top : top + height, left : left + width] == out).all()
        ]
        assert len(found) == 1, seed
        top, left = found[0]
        assert not (plain[top : top + height, left : left + width] == out).all()


def test_small_scale_is_a_thumbnail(astronaut: Image.Image) -> None:
    for seed in SEEDS:
        out = apply_attack(astronaut, "scale-small", seed=seed)
        assert 0.09 <= out.width / WIDTH <= 0.26 and 0.09 <= out.height / HEIGHT <= 0.26
        assert abs(out.width / out.height - WIDTH / HEIGHT) < 0.1
    tiny = apply_attack(astronaut.resize((80, 60)), "scale-small", seed=1)
    assert min(tiny.size) == 16  # never below 16 pixels a side


def test_attack_lists_and_groups() -> None:
    assert parse_attacks(None) == list(ATTACKS)  # the default stays the classic list
    assert parse_attacks("all") == list(ALL_ATTACKS)
    assert parse_attacks("hard") == list(HARD_ATTACKS)
    assert parse_attacks("classic,flip-crop,flip") == [*ATTACKS, "flip-crop"]
    assert not set(HARD_ATTACKS) & set(ATTACKS)
    with pytest.raises(LookalikeError, match=r"unknown attack.*warp.*available: .*scale-small"):
        parse_attacks("overlay,warp")
    with pytest.raises(LookalikeError, match="apply one at a time"):
        apply_attack(photo("coffee"), "hard")


def test_the_suite_reports_mean_min_and_per_attack_figures(photo_dir, encoder) -> None:
    database = sorted(photo_dir.rglob("*.jpg"))
    result = run_copy_detection(
        database, encoder=encoder, attacks="flip-crop,scale-small,screenshot", copies=6, k=6
    )
    assert [a.attack for a in result.attacks] == ["flip-crop", "scale-small", "screenshot"]
    recalls = [a.recall_at_1 for a in result.attacks]
    aps = [a.micro_ap for a in result.attacks]
    assert result.min_recall_at_1 == min(recalls)
    assert result.mean_recall_at_1 == pytest.approx(np.mean(recalls))
    assert result.min_micro_ap == min(aps)
    report = result.to_dict()
    assert report["min_recall_at_1"] == min(recalls) and report["min_micro_ap"] == min(aps)
    assert [a["attack"] for a in report["attacks"]] == ["flip-crop", "scale-small", "screenshot"]
    # Six unrelated photos: each edited copy still finds its source first.
    assert result.min_recall_at_1 == 1.0
