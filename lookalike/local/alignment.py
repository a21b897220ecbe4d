"""How exactly one image's pixels land on another's once aligned: the copy test in pixels.

A copy is the same pixels moved by one transform. Once the first image is warped onto the
second by the similarity its SIFT inliers found, a copy's blocks line up with the second's
to a small fraction of a pixel everywhere they are alike, whatever recompression, resizing or
captions did to the rest; a second photograph of the same scene, however close, does not:
the camera moved, so parallax and perspective shift its blocks by amounts that vary across
the frame. That is what :func:`align_pixels` measures: which share of the textured blocks are
alike, and how far their shifts stray from the one affine motion that fits them best
(``drift``). Keypoint positions cannot tell the two apart on photos of little texture, where
heavy JPEG moves the few keypoints as far as parallax does; whole blocks can.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lookalike.local.features import opencv

# Blocks compared, in pixels of the ~512-pixel feature frame, every half block.
BLOCK = 32
STEP = BLOCK // 2  # a block is 2 x 2 cells of STEP (see _Blocks)
# A block with less contrast than this (grey levels, standard deviation) says nothing.
FLAT_STD = 3.0
# Two blocks whose normalised cross-correlation reaches this are alike.
ALIKE_NCC = 0.9
# Blur (Gaussian sigma, pixels) before comparing: recompression and resampling noise out.
BLUR_SIGMA = 1.0
# A block's texture runs two ways when the weaker direction of its gradients has at least
# this share of the stronger's energy.
TWO_WAY = 0.1
# Blocks with less contrast than this measure their shift too poorly to count.
SHIFT_STD = 8.0
# Below this share of alike blocks a pair is no copy whatever a refined alignment would find:
# the second pass is skipped (most pairs aligned are second photos, far below).
REFINE_FROM = 0.3
# Fewer alike blocks than this give no drift (too few to fit a motion to).
MIN_ALIKE_BLOCKS = 12


@dataclass(frozen=True)
class PixelAlignment:
    """``blocks``: textured blocks the two images share once aligned; ``alike``: the share of
    them that are alike; ``drift``: the median distance of the alike blocks' shifts from the
    affine motion that fits them best, in pixels of the coarser of the two frames, ``inf``
    without enough alike blocks."""

    blocks: int
    alike: float
    drift: float


NO_ALIGNMENT = PixelAlignment(0, 0.0, float("inf"))


def align_pixels(
    source: np.ndarray, target: np.ndarray, matrix: np.ndarray, *, refine: bool = True
) -> PixelAlignment:
    """Warp grey ``source`` [h, w] onto grey ``target`` by the 2x3 affine ``matrix`` (source
    pixels to target pixels) and compare them block by block (see :class:`PixelAlignment`).
    With ``refine``, the blocks' shifts first correct the matrix (keypoints place it to a
    fraction of a pixel, and a block's shift is measured best when small), then are measured
    again, unless fewer than ``REFINE_FROM`` of the blocks are alike; without, one pass (the
    share of alike blocks hardly changes, the drift may)."""
    affine = np.vstack([np.asarray(matrix, dtype=np.float64), [0.0, 0.0, 1.0]])
    found = _compare(source, target, affine)
    if found is None:
        return NO_ALIGNMENT
    count, alike, shifts = found
    if refine and alike >= REFINE_FROM and len(shifts) >= MIN_ALIKE_BLOCKS:
        motion, _ = _motion(shifts)
        correction = np.eye(3)
        correction[:2] += motion.T
        again = _compare(source, target, correction @ affine)
        if again is not None:
            count, alike, shifts = again
    # In pixels of the coarser frame: a small copy warped up spreads its errors as much.
    enlarge = max(1.0, float(np.sqrt(abs(np.linalg.det(affine[:2, :2])))))
    return PixelAlignment(count, alike, _drift(shifts) / enlarge)


def _compare(
    source: np.ndarray, target: np.ndarray, affine: np.ndarray
) -> tuple[int, float, np.ndarray] | None:
    """(textured blocks, the share of them alike, [n, (x, y, dx, dy)] the shifts of the
    alike blocks that measure one) of ``source`` warped by the 3x3 ``affine`` onto
    ``target``; None without a textured block."""
    cv2 = opencv()
    height, width = target.shape
    warp = affine[:2].astype(np.float32)
    warped = cv2.warpAffine(np.asarray(source, dtype=np.float32), warp, (width, height))
    covered = cv2.warpAffine(np.ones(source.shape, np.float32), warp, (width, height))
    # Pixels near the moved frame's edge mix in the border: only those well inside count.
    inside = cv2.erode((covered > 0.999).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    moved = cv2.GaussianBlur(warped, (0, 0), BLUR_SIGMA)
    still = cv2.GaussianBlur(np.asarray(target, dtype=np.float32), (0, 0), BLUR_SIGMA)
    blocks = _Blocks(moved, still, inside)
    textured = blocks.whole & (blocks.spread_a >= FLAT_STD) & (blocks.spread_b >= FLAT_STD)
    count = int(np.count_nonzero(textured))
    if count == 0:
        return None
    alike = textured & (blocks.covariance >= ALIKE_NCC * blocks.spread_a * blocks.spread_b)
    steady = alike & blocks.two_way & (blocks.spread_a >= SHIFT_STD)
    rows, columns = np.nonzero(steady)
    places = np.c_[columns * STEP + STEP, rows * STEP + STEP].astype(np.float64)
    return count, int(np.count_nonzero(alike)) / count, np.c_[places, blocks.shifts[steady]]


class _Blocks:
    """Per block of ``BLOCK`` pixels every ``STEP`` (arrays [rows, columns]): whether it
    lies wholly ``inside``, each image's standard deviation in it, their covariance, whether
    its texture runs two ways (a shift along a lone edge is not measurable) and the shift
    [rows, columns, 2] that best moves the first image's block onto the second's (one
    Lucas-Kanade step, after matching their brightness and contrast). Means over cells of
    ``STEP`` pixels (a block is 2 x 2 cells), so no loop over blocks: about a millisecond."""

    def __init__(self, first: np.ndarray, second: np.ndarray, inside: np.ndarray) -> None:
        cv2 = opencv()
        a, b = first.astype(np.float32), second.astype(np.float32)
        rows, columns = (n // STEP for n in a.shape)

        def mean(values: np.ndarray) -> np.ndarray:
            # Means over STEP x STEP cells (an area resize), then each block is 2 x 2 cells:
            # the mean over the block whose top left corner is each grid point.
            part = np.ascontiguousarray(values[: rows * STEP, : columns * STEP])
            cells = cv2.resize(part, (columns, rows), interpolation=cv2.INTER_AREA)
            cells = np.asarray(cells, dtype=np.float64)
            blocks: np.ndarray = cells[:-1, :-1] + cells[1:, :-1] + cells[:-1, 1:] + cells[1:, 1:]
            return 0.25 * blocks

        mean_a, mean_b = mean(a), mean(b)
        self.spread_a = np.sqrt(np.maximum(mean(a * a) - mean_a**2, 0.0))
        self.spread_b = np.sqrt(np.maximum(mean(b * b) - mean_b**2, 0.0))
        self.covariance = mean(a * b) - mean_a * mean_b
        self.whole = mean(inside.astype(np.float32)) > 0.9999
        # Gradients of the two images' average: the step is the same both ways.
        middle = 0.5 * (a + b)
        dx = cv2.Sobel(middle, cv2.CV_32F, 1, 0, ksize=3, scale=0.125)
        dy = cv2.Sobel(middle, cv2.CV_32F, 0, 1, ksize=3, scale=0.125)
        xx, xy, yy = mean(dx * dx), mean(dx * dy), mean(dy * dy)
        gain = self.spread_b / np.maximum(self.spread_a, 1e-6)
        offset = mean_b - gain * mean_a
        # The second block less the first brought to its brightness, against the gradients.
        bx = mean(dx * b) - gain * mean(dx * a) - offset * mean(dx)
        by = mean(dy * b) - gain * mean(dy * a) - offset * mean(dy)
        determinant = xx * yy - xy * xy
        trace = xx + yy
        # The smaller eigenvalue of the gradients' covariance against the larger.
        smaller = 0.5 * (trace - np.sqrt(np.maximum(trace**2 - 4 * determinant, 0.0)))
        self.two_way = smaller >= TWO_WAY * np.maximum(trace - smaller, 1e-9)
        safe = np.where(self.two_way, determinant, 1.0)
        self.shifts = np.stack([-(yy * bx - xy * by) / safe, -(xx * by - xy * bx) / safe], axis=-1)


def _motion(shifts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(coefficients [3, 2] of the affine field of shifts that fits block shifts
    [n, (x, y, dx, dy)] best, each block's distance from it): fitted twice, the second time
    without the worst quarter, so a few poorly measured blocks do not bend it."""
    places = np.c_[shifts[:, :2], np.ones(len(shifts))]
    moves = shifts[:, 2:]
    kept = np.ones(len(shifts), dtype=bool)
    for _ in range(2):
        fitted, *_ = np.linalg.lstsq(places[kept], moves[kept], rcond=None)
        left = np.linalg.norm(moves - places @ fitted, axis=1)
        kept = left <= np.quantile(left, 0.75)
    return fitted, left


def _drift(shifts: np.ndarray) -> float:
    """The median distance of block shifts [n, (x, y, dx, dy)] from the affine field that
    fits them best: what one motion cannot explain. The median, because a few blocks of weak
    texture measure their shift poorly whatever the pair."""
    if len(shifts) < MIN_ALIKE_BLOCKS:
        return float("inf")
    _, left = _motion(shifts)
    return float(np.median(left))
