"""Query views: search with several versions of the query and merge their results.

Multi-crop (``multi_crop``): a query photo often holds more than the object the user means (a
border, a caption, other things beside it). Searching with the whole image plus a centre crop
and four corner crops, and keeping each database image's best score over the views, lets a
database image match whichever part of the query it shares.

Copy views (``copy_views``, on by default for an image query): an edited copy is often
rotated, framed or padded, which moves its global vector far from its source's. A few views
that undo those edits (:func:`copy_views`) are searched too, each scored ``VIEW_PENALTY``
below its cosine so that a view wins only when it matches clearly better than the query as
it is. Measured in ``benchmarks/results/copy_detection_attacks.md``.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from lookalike.errors import LookalikeError

# Each crop keeps this fraction of the query's width and height.
CROP_FRACTION = 0.75

# Copy views, tuned on the grocery-store train split (200 sources x 16 attacks; clothing-small
# and the held-out splits only report). Mean recall@1 there (min over attacks in brackets):
# the query alone 0.818 (0.47, rotation-large); + un-rotated +-20 degrees + trimmed 0.888
# (0.695), the default; +-30 instead 0.881; +-30 and the centre 85% 0.897 (0.685) and
# +-10, +-30 and the centre 0.901 (0.71), rejected: 3 and 5 more embeddings cost 2.5-2.8x
# and more the query time, over the 2x budget (benchmarks/results/copy_detection_attacks.md).
VIEW_ANGLES = (20.0, -20.0)
# Copy views are embedded and searched only when the query's own best cosine is under this:
# an unedited copy or a close match needs none. On that split 0.75 left 41% of the queries
# without views for 0.2 point of mean recall@1 (0.886 against 0.888); 0.7 lost 0.7, 0.6 2.6.
COPY_VIEWS_BELOW = 0.75
# A view's cosine counts this much less than the query's own: 0 lets views of unedited
# queries match lookalike distractors (crop, blur and grayscale copies lost 3-6 points);
# 0.03-0.07 were within 0.8 point of mean recall@1, 0.05 in the middle.
VIEW_PENALTY = 0.05
# Views are made from the query shrunk to this many pixels on its longer side: the encoder
# squashes to far fewer, and rotating a small image is cheap.
_VIEW_SIDE = 448
# Border trimming: a row or column belongs to a border while its mean absolute difference
# from the border's colour and its own spread stay under this (0-255 grey levels), on a
# 128x128 grey thumbnail; a trim that would keep under 30% of a side is not one.
_TRIM_TOLERANCE = 10.0
_TRIM_GRID = 128
_TRIM_MIN_KEPT = 0.3
# A query gets copy views only when at least ``_CORNERS_NEEDED`` of its corners (squares of
# ``_CORNER_FRACTION`` of each side, on a 128-pixel grey thumbnail) are nearly bare of
# detail: their mean gradient under ``_CORNER_BARE`` of the whole image's. A copy rotated on
# a grown canvas has its four corners filled (black, or a blurred stretch of the photo), a
# framed one its border; most photos have detail in two corners at least. On the train
# splits (60 sources x 16 attacks): the rotated copies had them 100% (rotation), 97-100%
# (rotation-large) and 87-90% (rotation-crop-color) of the time, held-out photos without a
# copy 13% (grocery-store) and 56% (clothing-small, plain backgrounds); one corner at
# 0.35 passed 60-76% of the photos, 0.3 on 6% corners missed 10% of rotation-large.
_CORNER_FRACTION = 0.08
_CORNER_BARE = 0.4
_CORNERS_NEEDED = 2


def query_crops(image: Image.Image, fraction: float = CROP_FRACTION) -> list[Image.Image]:
    """The whole image, its centre crop and its four corner crops (each ``fraction`` of the
    width and height), in that order."""
    if not 0.0 < fraction < 1.0:
        raise LookalikeError(f"the crop fraction must be between 0 and 1, got {fraction}")
    width, height = image.size
    w, h = max(1, round(width * fraction)), max(1, round(height * fraction))
    lefts = (0, (width - w) // 2, width - w)
    tops = (0, (height - h) // 2, height - h)
    boxes = [
        (lefts[1], tops[1]),
        (lefts[0], tops[0]),
        (lefts[2], tops[0]),
        (lefts[0], tops[2]),
        (lefts[2], tops[2]),
    ]
    return [image] + [image.crop((x, y, x + w, y + h)) for x, y in boxes]


def merge_views(
    ids: np.ndarray, scores: np.ndarray, k: int, *, higher_is_better: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Merge the hits of several views of one query: [views, n] ids (-1 for none) and scores
    -> the ``k`` best distinct ids, each with its best score over the views."""
    best: dict[int, float] = {}
    sign = 1.0 if higher_is_better else -1.0
    for image_id, score in zip(np.ravel(ids).tolist(), np.ravel(scores).tolist(), strict=True):
        if image_id < 0:
            continue
        if image_id not in best or sign * score > sign * best[image_id]:
            best[image_id] = score
    ranked = sorted(best.items(), key=lambda item: -sign * item[1])[:k]
    return (
        np.array([i for i, _ in ranked], dtype=np.int64),
        np.array([s for _, s in ranked], dtype=np.float32),
    )


def copy_views(image: Image.Image, side: int = 224) -> list[Image.Image]:
    """Views of a query that undo common edits of copies: un-rotated by each of
    ``VIEW_ANGLES`` (the rotated photo's inner rectangle, resampled once straight to ``side``
    pixels on its shorter side: the encoder's input size), and the image without solid
    borders (only when it has some). The query itself is not among them."""
    small = _shrunk(image.convert("RGB"), _VIEW_SIDE)
    views = [unrotated(small, angle, side) for angle in VIEW_ANGLES]
    trimmed = trim_borders(small)
    if trimmed is not None:
        views.append(trimmed)
    return views


def padded_corners(image: Image.Image) -> bool:
    """Whether ``image`` looks like a copy on a grown canvas or in a frame: enough of its
    corners nearly bare of detail (see ``_CORNERS_NEEDED``), so copy views may find it."""
    gray = image.convert("L")
    scale = _TRIM_GRID / max(gray.size)
    size = (max(8, round(gray.width * scale)), max(8, round(gray.height * scale)))
    pixels = np.asarray(gray.resize(size, Image.Resampling.BOX), dtype=np.float32)
    rows, cols = np.gradient(pixels)
    detail = np.abs(rows) + np.abs(cols)
    whole = float(detail.mean()) + 1e-3
    height, width = detail.shape
    h, w = max(2, int(height * _CORNER_FRACTION)), max(2, int(width * _CORNER_FRACTION))
    corners = (detail[:h, :w], detail[:h, -w:], detail[-h:, :w], detail[-h:, -w:])
    bare = sum(float(corner.mean()) < _CORNER_BARE * whole for corner in corners)
    return bare >= _CORNERS_NEEDED


def _shrunk(image: Image.Image, side: int) -> Image.Image:
    width, height = image.size
    factor = side / max(width, height)
    if factor >= 1.0:
        return image
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)


def unrotated(image: Image.Image, angle: float, side: int | None = None) -> Image.Image:
    """``image`` rotated back by ``angle`` degrees (a copy rotated by ``angle``
    counter-clockwise on a grown canvas), cut to the rectangle the photo had: the canvas of
    a w x h photo rotated by a is (w cos a + h sin a) x (w sin a + h cos a), solved for w and
    h. Where that has no sensible solution (the copy was cropped after rotating), the largest
    rectangle of the image's own shape that holds no corner. Resampled straight to ``side``
    pixels on the shorter side (default: the rectangle's own size): nearest-neighbour at
    twice that, then 2x2 means, a quarter of the time of PIL's bilinear transform (1.6 vs
    6.4 ms for 224 pixels) for the same smoothing."""
    width, height = image.size
    radians = math.radians(abs(angle))
    cos, sin = math.cos(radians), math.sin(radians)
    det = cos * cos - sin * sin
    w = h = 0.0
    if abs(det) > 0.2:
        w = (width * cos - height * sin) / det
        h = (height * cos - width * sin) / det
    if not (w > 0.25 * width and h > 0.25 * height):
        aspect = width / height
        h = min(width / (aspect * cos + sin), height / (aspect * sin + cos))
        w = aspect * h
    scale = 2.0 * (1.0 if side is None else side / min(w, h))
    out_w, out_h = max(2, 2 * round(w * scale / 2)), max(2, 2 * round(h * scale / 2))
    # Output pixel (x, y) is the point (x sx - w/2, y sy - h/2) of the rectangle (from its
    # centre), turned by ``angle`` into the image around the image's centre; PIL's rotate
    # builds the same matrix.
    turn = math.radians(angle)
    a, b = math.cos(turn), math.sin(turn)
    d, e = -math.sin(turn), math.cos(turn)
    sx, sy = w / out_w, h / out_h
    data = (
        a * sx,
        b * sy,
        -a * w / 2 - b * h / 2 + width / 2,
        d * sx,
        e * sy,
        -d * w / 2 - e * h / 2 + height / 2,
    )
    sampled = image.transform(
        (out_w, out_h), Image.Transform.AFFINE, data, resample=Image.Resampling.NEAREST
    )
    return sampled.reduce(2)


def trim_borders(image: Image.Image) -> Image.Image | None:
    """``image`` without the solid-colour bands along its edges (a padded or framed copy),
    or None when it has none."""
    grey = np.asarray(
        image.convert("L").resize((_TRIM_GRID, _TRIM_GRID), Image.Resampling.NEAREST),
        dtype=np.float32,
    )

    def band(lines: np.ndarray) -> int:
        reference = float(np.median(lines[0]))
        count = 0
        for line in lines:
            if np.abs(line - reference).mean() >= _TRIM_TOLERANCE or line.std() >= _TRIM_TOLERANCE:
                break
            count += 1
        return count

    top, bottom = band(grey), band(grey[::-1])
    left, right = band(grey.T), band(grey.T[::-1])
    if not (top or bottom or left or right):
        return None
    width, height = image.size
    box = (
        round(left * width / _TRIM_GRID),
        round(top * height / _TRIM_GRID),
        round(width - right * width / _TRIM_GRID),
        round(height - bottom * height / _TRIM_GRID),
    )
    if box[2] - box[0] < _TRIM_MIN_KEPT * width or box[3] - box[1] < _TRIM_MIN_KEPT * height:
        return None
    return image.crop(box)
