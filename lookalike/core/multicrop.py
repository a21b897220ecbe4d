"""Query views: search with several versions of the query and merge their results.

Multi-crop (``multi_crop``): a query photo often holds more than the object the user means (a
border, a caption, other things beside it). Searching with the whole image plus a centre crop
and four corner crops, and keeping each database image's best score over the views, lets a
database image match whichever part of the query it shares.

Copy views (``copy_views``, on by default for an image query): an edited copy is often
rotated, framed or padded, which moves its global vector far from its source's. Views that
undo those edits (:func:`copy_views`) are searched too, each scored ``VIEW_PENALTY`` below
its cosine so that a view wins only when it matches clearly better than the query as it is:
the photo inside a rotated copy turned upright (its angle read from the tilted borders of
the fill around it, :func:`rotation_angle`), and the image without solid borders or a
screenshot's bars. Most queries need neither, and get no views. Measured in
``benchmarks/results/copy_detection_attacks.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from lookalike.errors import LookalikeError
from lookalike.images import in_mode

# Each crop keeps this fraction of the query's width and height.
CROP_FRACTION = 0.75

# Copy views are embedded and searched only when the query's own best cosine is under this:
# an unedited copy or a close match needs none (tuned on the grocery-store train split with
# the earlier +-20 degree views: 0.75 left 41% of the queries without views for 0.2 point of
# mean recall@1; 0.7 lost 0.7, 0.6 2.6).
COPY_VIEWS_BELOW = 0.75
# A view's cosine counts this much less than the query's own: 0 lets views of unedited
# queries match lookalike distractors (crop, blur and grayscale copies lost 3-6 points);
# 0.03-0.07 were within 0.8 point of mean recall@1, 0.05 in the middle.
VIEW_PENALTY = 0.05
# Views are cut from the query shrunk to this many pixels on its longer side: the encoder
# squashes to far fewer, and turning a small image is cheap.
_VIEW_SIDE = 448
# Border trimming, on a 128x128 grey thumbnail: a line (row or column) is "alike" where its
# pixels are within ``_TRIM_TOLERANCE`` grey levels of the edge line's colour. A solid
# border is lines at least ``_TRIM_SOLID`` alike that end at a line at most
# ``_TRIM_SOLID_END`` alike (the photo); a bar with text or icons on it (a screenshot's) is
# lines at least ``_TRIM_BAR`` alike that end sharply, at a line at most ``_TRIM_BAR_END``
# alike. A plain backdrop beside a product (white around a garment, a sky) fades into the
# product instead and is not trimmed; a trim keeping under 30% of a side is not one. On 80
# train photos of each set: borders trimmed 100%, screenshots 100% (grocery-store) and
# 93% (clothing-small), photos without a copy 0% and 5% (33% for clothing-small with
# the earlier rule, lines of one colour only, whatever followed).
_TRIM_TOLERANCE = 10.0
_TRIM_GRID = 128
_TRIM_MIN_KEPT = 0.3
_TRIM_SOLID = 0.98
_TRIM_SOLID_END = 0.6
_TRIM_BAR = 0.6
_TRIM_BAR_END = 0.2
# Bare corners (``padded_corners``): at least ``_CORNERS_NEEDED`` of the corners (squares of
# ``_CORNER_FRACTION`` of each side, on a 128-pixel grey thumbnail) have a mean gradient
# under ``_CORNER_BARE`` of the whole image's. A copy on a grown canvas has its corners
# filled, a framed or screenshot one its border or bars; most photos have detail in two
# corners at least. On the train splits (60 sources x 16 attacks): rotated copies 87-100%,
# held-out photos without a copy 13% (grocery-store) and 56% (clothing-small, plain
# backgrounds). Only a query with bare corners is trimmed, and only it is searched for
# inside the candidates' frames by the pixel check.
_CORNER_FRACTION = 0.08
_CORNER_BARE = 0.4
_CORNERS_NEEDED = 2
# Rotation angles (``rotation_angle``), on a grey image of ``_ANGLE_GRID`` pixels on its
# longer side. A pixel is smooth where its fine detail (the mean difference from a 1.5-pixel
# blur, over 5x5) is under ``_SMOOTH_SHARE`` of the image's mean (and ``_SMOOTH_FLOOR``);
# only smooth areas touching the image's edge and covering ``_FILL_AREA`` of it can be fill.
# A segment of their outline (Hough: ``_HOUGH_STEPS`` angles over 180 degrees, votes
# ``_HOUGH_VOTES`` of the shorter side, ``_SEGMENT_MIN`` of it long) is a border of the
# photo when it tilts ``_MIN_TILT`` degrees or more, ``_FILL_SMOOTH`` of its far side is
# smooth up to the image's edge and at most ``_PHOTO_SMOOTH`` of a strip 3-9 pixels inside,
# and its line (pieces within ``_SAME_LINE_DEGREES`` and ``_SAME_LINE_PIXELS``) reaches
# within ``_EDGE_NEAR`` of the image's edge or another border has its tilt on another side.
# Borders agreeing within 1.5 degrees must add up to ``_SUPPORT_MIN`` of the shorter side.
# On 80 train photos of each set rotated 10-45 degrees (corners filled) and 5-30 degrees
# then cropped and recoloured: an angle for 100%/95% and 88%/84% (grocery-store /
# clothing-small), median error 0.3 and 0.5-0.6 degrees; 5-15 degrees with black corners
# 100%; 200 held-out photos without a copy given one 11% and 30% (tiled floors, straight
# edges of garments on a backdrop). Segments of 15% of the side and 20% in all found 10-30
# points fewer rotations; asking each line to end at the edge or at a square border both
# ways passed 10% of clothing-small's photos but found half the filled rotations; a 192- or
# 160-pixel grid was 1-2 ms faster and found 5-25 points fewer.
_ANGLE_GRID = 256
_HOUGH_STEPS = 360
_HOUGH_VOTES = 30 / 256
_FILL_AREA = 0.01
_SMOOTH_SHARE = 0.3
_SMOOTH_FLOOR = 0.4
_SEGMENT_MIN = 0.12
_EDGE_NEAR = 10
_MIN_TILT = 2.5
_FILL_SMOOTH = 0.95
_PHOTO_SMOOTH = 0.5
_SUPPORT_MIN = 0.15
_SAME_LINE_DEGREES = 2.5
_SAME_LINE_PIXELS = 6.0
# Steps (pixels) sampled beyond a border, to the image's edge, and inside it.
_OUTWARD = np.arange(3.0, 400.0, 2.0)[None, :]
_INWARD = np.arange(3.0, 10.0, 2.0)[None, :]
# The upright photo (``unrotated_photo``), on a 128-pixel grid: a pixel is photo where
# ``_CUT_DETAIL`` of its 9x9 neighbourhood has fine detail. When ``_CANVAS_FILL`` of what
# lies outside the photo's rectangle on a grown canvas is smooth, the copy is that whole
# canvas and the rectangle is exact (rotation-large copies 0.74-0.91 smooth there, cropped
# ones at most 0.66); otherwise the box is shrunk from the photo's bounds until each of its
# edges is ``_CUT_KEEP`` photo. The cut instead of the canvas's inner rectangle: mean
# recall@1 of rotation-crop-color 0.74 -> 0.79 on the grocery-store train split.
_CUT_GRID = 128
_CANVAS_FILL = 0.7
_CUT_WINDOW = 9
_CUT_DETAIL = 0.3
_CUT_KEEP = 0.9


@dataclass(frozen=True)
class CopyViews:
    """A query's copy views (:func:`copy_views`), and which of them is the query turned
    upright (None when it did not look rotated)."""

    views: list[Image.Image]
    upright: Image.Image | None


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


@dataclass(frozen=True)
class CopyClues:
    """What the copy views of a query are decided on, looked at once a query: the query in
    grey, ``_ANGLE_GRID`` pixels on its longer side, and whether its corners are bare
    (:func:`padded_corners`: a frame, a border, a grown canvas)."""

    grey: Image.Image
    padded: bool

    @classmethod
    def of(cls, image: Image.Image) -> CopyClues:
        """The clues of a decoded query image."""
        grey = _shrunk(in_mode(image, "L"), _ANGLE_GRID)
        return cls(grey, padded_corners(grey))


def copy_views(image: Image.Image, side: int = 224, clues: CopyClues | None = None) -> CopyViews:
    """Views of a query that undo common edits of copies: the photo inside a rotated copy,
    upright (when :func:`rotation_angle` finds a rotation), and the image without solid
    borders (when it has some and its corners are bare), each ``side`` pixels on its
    shorter side (the encoder's input size). The query itself is not among them; often none
    are. ``clues`` are the query's :class:`CopyClues` when they were looked at already."""
    clues = clues if clues is not None else CopyClues.of(image)
    angle = rotation_angle(clues.grey)
    border = _border_box(clues.grey) if clues.padded else None
    if angle is None and border is None:
        return CopyViews([], None)
    small = _shrunk(in_mode(image, "RGB"), _VIEW_SIDE)
    upright = None if angle is None else unrotated_photo(small, angle, side)
    views = [] if upright is None else [upright]
    if border is not None:
        views.append(_cropped(small, border))
    return CopyViews(views, upright)


def padded_corners(image: Image.Image) -> bool:
    """Whether ``image`` looks like a copy on a grown canvas or in a frame: enough of its
    corners nearly bare of detail (see ``_CORNERS_NEEDED``), so copy views may find it."""
    gray = in_mode(image, "L")
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


def rotation_angle(image: Image.Image) -> float | None:
    """The angle (degrees, counter-clockwise, as :func:`unrotated` takes it) by which
    ``image`` looks rotated on a grown canvas, or None when it does not look rotated.

    The canvas's fill (black, or a blurred stretch of the photo) is smooth where the photo
    has fine detail, so the photo's edges are straight borders of the smooth area, tilted,
    with smooth pixels on their far side all the way to the image's edge and detail on the
    near side. Those borders are found as line segments (OpenCV's probabilistic Hough
    transform) on the outline of the smooth area; the longest tilt they agree on wins."""
    import cv2

    pixels = np.asarray(_shrunk(in_mode(image, "L"), _ANGLE_GRID), dtype=np.float32)
    height, width = pixels.shape
    side = min(height, width)
    if side < 16:
        return None
    smooth = _smooth(pixels).astype(np.uint8)
    outline = _fill_outline(smooth)
    if outline is None:
        return None
    found = cv2.HoughLinesP(
        outline,
        1,
        math.pi / _HOUGH_STEPS,
        threshold=round(_HOUGH_VOTES * side),
        minLineLength=int(_SEGMENT_MIN * side),
        maxLineGap=4,
    )
    if found is None:
        return None
    pieces = [
        piece
        for piece in (_piece(segment, smooth) for segment in found.reshape(-1, 4).tolist())
        if piece is not None
    ]
    return _agreed_tilt(pieces, width, height)


def _smooth(pixels: np.ndarray) -> np.ndarray:
    """Where the grey ``pixels`` have next to no fine detail (the mean difference from a
    1.5-pixel blur, over 5x5, under ``_SMOOTH_SHARE`` of the image's mean): boolean."""
    import cv2

    fine = cv2.boxFilter(np.abs(pixels - cv2.GaussianBlur(pixels, (0, 0), 1.5)), -1, (5, 5))
    return np.asarray(fine < max(_SMOOTH_FLOOR, _SMOOTH_SHARE * float(fine.mean())))


def _fill_outline(smooth: np.ndarray) -> np.ndarray | None:
    """The outline (255 on 0) of the smooth areas of ``smooth`` (uint8 0/1) that could be a
    canvas's fill: touching the image's edge and covering ``_FILL_AREA`` of it; None when
    there are none."""
    import cv2

    height, width = smooth.shape
    _, labels, stats, _ = cv2.connectedComponentsWithStats(smooth, connectivity=4)
    left, top = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_TOP]
    right = left + stats[:, cv2.CC_STAT_WIDTH]
    bottom = top + stats[:, cv2.CC_STAT_HEIGHT]
    fills = ((left == 0) | (top == 0) | (right == width) | (bottom == height)) & (
        stats[:, cv2.CC_STAT_AREA] >= _FILL_AREA * height * width
    )
    fills[0] = False  # the label of everything not smooth
    if not fills.any():
        return None
    fill = fills[labels].astype(np.uint8)
    outline = (fill - cv2.erode(fill, np.ones((3, 3), np.uint8))) * 255
    outline[:2], outline[-2:], outline[:, :2], outline[:, -2:] = 0, 0, 0, 0
    return np.asarray(outline)


def _agreed_tilt(pieces: list[_Piece], width: int, height: int) -> float | None:
    """The rotation the border ``pieces`` agree on (see :func:`rotation_angle`), or None.

    Hough cuts a border into pieces where the fill's outline wavers: a border piece counts
    when a piece of its line (same direction and offset) reaches the image's edge, or
    another border has its tilt on another side of the photo."""
    tilts, lengths = [], []
    for piece in pieces:
        if not piece.border:
            continue
        reaches = any(
            other.same_line(piece) and other.reaches_edge(width, height) for other in pieces
        )
        other_side = any(
            other.border
            and abs((other.tilt - piece.tilt + 45.0) % 90.0 - 45.0) <= _SAME_LINE_DEGREES
            and _turn(other.direction, piece.direction) >= 45.0
            for other in pieces
        )
        if reaches or other_side:
            tilts.append(piece.tilt)
            lengths.append(piece.length)
    if not tilts:
        return None
    angles, weights = np.array(tilts), np.array(lengths)
    support = [float(weights[np.abs(angles - a) <= 1.5].sum()) for a in angles]
    best = int(np.argmax(support))
    if support[best] < _SUPPORT_MIN * min(width, height):
        return None
    agree = np.abs(angles - angles[best]) <= 1.5
    # A tilt down to the right in image rows is a counter-clockwise turn the other way.
    return -float((angles[agree] * weights[agree]).sum() / weights[agree].sum())


def unrotated_photo(image: Image.Image, angle: float, side: int) -> Image.Image:
    """The photo inside a copy rotated by ``angle`` (see :func:`rotation_angle`), turned
    upright and cut to the largest box that is photo, not fill or the corners turning it
    adds (a rotated copy may have been cropped too, so the photo's rectangle cannot be
    solved for from the canvas's size alone); ``side`` pixels on the shorter side."""
    import cv2

    small = _shrunk(in_mode(image, "RGB"), _VIEW_SIDE)
    grid = _shrunk(small.convert("L"), _CUT_GRID)
    smooth = _smooth(np.asarray(grid, dtype=np.float32))
    if _whole_canvas(smooth, angle):
        return unrotated(small, angle, side)
    detail = (~smooth).astype(np.float32)
    # Photo: where most of the neighbourhood has detail (a plain patch inside the photo
    # stays photo; the fill, smooth over a wide area, does not).
    photo = cv2.boxFilter(detail, -1, (_CUT_WINDOW, _CUT_WINDOW)) >= _CUT_DETAIL
    turned = Image.fromarray(photo.astype(np.uint8) * 255).rotate(
        -angle, Image.Resampling.NEAREST, expand=True
    )
    box = _photo_box(np.asarray(turned) > 0)
    if box is None:
        return unrotated(small, angle, side)
    left, top, right, bottom = box
    scale = small.width / grid.width
    centre = (
        ((left + right) / 2 - turned.width / 2) * scale,
        ((top + bottom) / 2 - turned.height / 2) * scale,
        (right - left) * scale,
        (bottom - top) * scale,
    )
    return _upright_box(small, angle, centre, side)


def _whole_canvas(smooth: np.ndarray, angle: float) -> bool:
    """Whether ``smooth`` (a boolean mask of a copy rotated by ``angle``) looks like the
    whole grown canvas, not a crop of it: smooth (fill) nearly everywhere outside the
    rectangle the photo would have there (:func:`_grown_canvas_photo`). Then that
    rectangle is the photo, exactly."""
    import cv2

    height, width = smooth.shape
    solved = _grown_canvas_photo(width, height, angle)
    if solved is None:
        return False
    w, h = solved
    turn = math.radians(angle)
    cos, sin = math.cos(turn), math.sin(turn)
    corners = [
        (cos * x + sin * y + width / 2, -sin * x + cos * y + height / 2)
        for x, y in ((-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2))
    ]
    photo = np.zeros((height, width), dtype=np.uint8)
    cv2.fillConvexPoly(photo, np.round(np.array(corners)).astype(np.int32), 1)
    outside = cv2.dilate(photo, np.ones((5, 5), np.uint8)) == 0
    return bool(outside.sum() >= 20 and smooth[outside].mean() >= _CANVAS_FILL)


def _photo_box(photo: np.ndarray) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) of a box in the boolean mask ``photo`` whose every edge
    is at least ``_CUT_KEEP`` photo: from the mask's bounding box, the edge with the least
    photo is moved in, one pixel at a time. None when that leaves too little."""
    rows, cols = np.flatnonzero(photo.any(axis=1)), np.flatnonzero(photo.any(axis=0))
    if len(rows) < 8 or len(cols) < 8:
        return None
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    # Running sums along rows and columns: any stretch of a row or column in two lookups.
    along_rows = np.pad(np.cumsum(photo, axis=1, dtype=np.int32), ((0, 0), (1, 0)))
    along_cols = np.pad(np.cumsum(photo, axis=0, dtype=np.int32), ((1, 0), (0, 0)))
    while bottom - top >= 8 and right - left >= 8:
        across, down = right - left, bottom - top
        shares = (
            (along_rows[top, right] - along_rows[top, left]) / across,
            (along_rows[bottom - 1, right] - along_rows[bottom - 1, left]) / across,
            (along_cols[bottom, left] - along_cols[top, left]) / down,
            (along_cols[bottom, right - 1] - along_cols[top, right - 1]) / down,
        )
        worst = int(np.argmin(shares))
        if shares[worst] >= _CUT_KEEP:
            return left, top, right, bottom
        if worst == 0:
            top += 1
        elif worst == 1:
            bottom -= 1
        elif worst == 2:
            left += 1
        else:
            right -= 1
    return None


@dataclass(frozen=True)
class _Piece:
    """A tilted segment of the fill's outline: its ends, its tilt (degrees, -45 to 45), the
    direction (degrees) and distance from the image's centre of its normal pointing away
    from the centre, and whether it has fill beyond it and photo inside (``border``)."""

    ends: tuple[float, float, float, float]
    tilt: float
    direction: float
    offset: float
    length: float
    border: bool

    def same_line(self, other: _Piece) -> bool:
        """Whether ``other`` lies on this piece's line."""
        return (
            _turn(self.direction, other.direction) <= _SAME_LINE_DEGREES
            and abs(self.offset - other.offset) <= _SAME_LINE_PIXELS
        )

    def reaches_edge(self, width: int, height: int) -> bool:
        """Whether either end lies within ``_EDGE_NEAR`` of the edge of a width x height
        image."""
        x1, y1, x2, y2 = self.ends
        return _near_edge(x1, y1, width, height) or _near_edge(x2, y2, width, height)


def _piece(segment: list[float], smooth: np.ndarray) -> _Piece | None:
    """The Hough ``segment`` (x1, y1, x2, y2) as a :class:`_Piece`, or None when it is not
    tilted."""
    height, width = smooth.shape
    x1, y1, x2, y2 = segment
    tilt = (math.degrees(math.atan2(y2 - y1, x2 - x1)) + 45.0) % 90.0 - 45.0
    if abs(tilt) < _MIN_TILT:
        return None
    length = math.hypot(x2 - x1, y2 - y1)
    along_x, along_y = (x2 - x1) / length, (y2 - y1) / length
    out_x, out_y = -along_y, along_x  # the normal, pointing away from the image's centre
    offset = (x1 - (width - 1) / 2) * out_x + (y1 - (height - 1) / 2) * out_y
    if offset < 0:
        out_x, out_y, offset = -out_x, -out_y, -offset
    # Sampled, not every pixel: points along the piece's middle, stepping out to the
    # image's edge (fill) and 3-9 pixels in (photo).
    spots = np.linspace(0.1, 0.9, 12)[:, None] * length
    starts_x, starts_y = x1 + spots * along_x, y1 + spots * along_y
    beyond = _sampled(smooth, starts_x + _OUTWARD * out_x, starts_y + _OUTWARD * out_y)
    inside = _sampled(smooth, starts_x - _INWARD * out_x, starts_y - _INWARD * out_y)
    border = (
        len(beyond) >= 20
        and len(inside) >= 20
        and float(beyond.mean()) >= _FILL_SMOOTH
        and float(inside.mean()) <= _PHOTO_SMOOTH
    )
    direction = math.degrees(math.atan2(out_y, out_x))
    return _Piece((x1, y1, x2, y2), tilt, direction, offset, length, border)


def _turn(first: float, second: float) -> float:
    """The angle between two directions (degrees), 0 to 180."""
    return abs((first - second + 180.0) % 360.0 - 180.0)


def _sampled(mask: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """``mask`` at the points (``xs``, ``ys``) that lie inside it (nearest pixel)."""
    cols, rows = np.rint(xs).astype(np.int64).ravel(), np.rint(ys).astype(np.int64).ravel()
    keep = (cols >= 0) & (cols < mask.shape[1]) & (rows >= 0) & (rows < mask.shape[0])
    return np.asarray(mask[rows[keep], cols[keep]])


def _near_edge(x: float, y: float, width: int, height: int) -> bool:
    return min(x, y, width - 1 - x, height - 1 - y) <= _EDGE_NEAR


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
    solved = _grown_canvas_photo(width, height, angle)
    if solved is not None:
        w, h = solved
    else:
        aspect = width / height
        h = min(width / (aspect * cos + sin), height / (aspect * sin + cos))
        w = aspect * h
    return _upright_box(image, angle, (0.0, 0.0, w, h), side)


def _upright_box(
    image: Image.Image, angle: float, box: tuple[float, float, float, float], side: int | None
) -> Image.Image:
    """The box (centre x, centre y from the image's centre, width, height; in pixels of
    ``image`` turned upright by ``angle``) of ``image`` turned upright, resampled straight
    to ``side`` pixels on its shorter side (default: its own size): nearest-neighbour at
    twice that, then 2x2 means, a quarter of the time of PIL's bilinear transform (1.6 vs
    6.4 ms for 224 pixels) for the same smoothing."""
    width, height = image.size
    centre_x, centre_y, w, h = box
    scale = 2.0 * (1.0 if side is None else side / min(w, h))
    out_w, out_h = max(2, 2 * round(w * scale / 2)), max(2, 2 * round(h * scale / 2))
    # Output pixel (x, y) is the point (x sx - w/2 + cx, y sy - h/2 + cy) of the upright
    # image (from its centre), turned by ``angle`` into the image around the image's
    # centre; PIL's rotate builds the same matrix.
    turn = math.radians(angle)
    a, b = math.cos(turn), math.sin(turn)
    d, e = -math.sin(turn), math.cos(turn)
    sx, sy = w / out_w, h / out_h
    left, top = centre_x - w / 2, centre_y - h / 2
    data = (
        a * sx,
        b * sy,
        a * left + b * top + width / 2,
        d * sx,
        e * sy,
        d * left + e * top + height / 2,
    )
    sampled = image.transform(
        (out_w, out_h), Image.Transform.AFFINE, data, resample=Image.Resampling.NEAREST
    )
    return sampled.reduce(2)


def _grown_canvas_photo(width: int, height: int, angle: float) -> tuple[float, float] | None:
    """The size of the photo that, rotated by ``angle`` on a grown canvas, makes a canvas of
    ``width`` x ``height``: (w cos a + h sin a) x (w sin a + h cos a) solved for w and h;
    None where that has no sensible solution (the copy was cropped after rotating)."""
    radians = math.radians(abs(angle))
    cos, sin = math.cos(radians), math.sin(radians)
    det = cos * cos - sin * sin
    if abs(det) <= 0.2:
        return None
    w = (width * cos - height * sin) / det
    h = (height * cos - width * sin) / det
    if not (w > 0.25 * width and h > 0.25 * height):
        return None
    return w, h


def trim_borders(image: Image.Image) -> Image.Image | None:
    """``image`` without the solid-colour bands along its edges (a padded or framed copy),
    or None when it has none."""
    box = _border_box(image)
    return None if box is None else _cropped(image, box)


def _cropped(image: Image.Image, box: tuple[float, float, float, float]) -> Image.Image:
    """``image`` cut to ``box`` (left, top, right, bottom, as fractions of its sides)."""
    width, height = image.size
    left, top, right, bottom = box
    return image.crop(
        (round(left * width), round(top * height), round(right * width), round(bottom * height))
    )


def _border_box(image: Image.Image) -> tuple[float, float, float, float] | None:
    """The box (left, top, right, bottom, as fractions of the sides) inside the solid-colour
    bands along ``image``'s edges, or None when it has none."""
    grey = np.asarray(
        in_mode(image, "L").resize((_TRIM_GRID, _TRIM_GRID), Image.Resampling.NEAREST),
        dtype=np.float32,
    )

    def band(lines: np.ndarray) -> int:
        reference = float(np.median(lines[0]))
        alike = (np.abs(lines - reference) < _TRIM_TOLERANCE).mean(axis=1)
        # A border ends where the photo starts, at a line clearly unlike its colour; a plain
        # backdrop (a product on white) runs on beside the product instead. A solid border
        # may meet a photo with some of its colour; a bar with text or icons on it (a
        # screenshot's) has only most of its lines in its colour, so it must end sharply.
        for solid, end in ((_TRIM_SOLID, _TRIM_SOLID_END), (_TRIM_BAR, _TRIM_BAR_END)):
            inside = alike >= solid
            count = len(inside) if inside.all() else int(np.argmin(inside))
            if count == len(lines):
                return count
            # One line may blend the border and the photo (a resized copy).
            for blended in (0, 1):
                if count and count + blended < len(lines) and alike[count + blended] <= end:
                    return count + blended
        return 0

    top, bottom = band(grey), band(grey[::-1])
    left, right = band(grey.T), band(grey.T[::-1])
    if not (top or bottom or left or right):
        return None
    if _TRIM_GRID - left - right < _TRIM_MIN_KEPT * _TRIM_GRID:
        return None
    if _TRIM_GRID - top - bottom < _TRIM_MIN_KEPT * _TRIM_GRID:
        return None
    return (
        left / _TRIM_GRID,
        top / _TRIM_GRID,
        1.0 - right / _TRIM_GRID,
        1.0 - bottom / _TRIM_GRID,
    )
