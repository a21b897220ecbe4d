"""Tiny grayscale thumbnails, and how much of one photo's pixels another shows.

A copy that was blurred, shrunk to a thumbnail, recoloured, cropped, mirrored, framed in a
screenshot or written over keeps its source's layout of light and dark; another photo of the
same shelf taken a step away does not: its products and edges sit elsewhere. A global vector
cannot tell those two apart (both land near the source), but a 32-pixel grayscale
thumbnail can, by normalised cross-correlation: the query searched inside the candidate at a
few scales (crops), its mirror image too (mirrored crops), and the candidate inside the query
(frames, borders, screenshots). That costs about 1 KB an image and a fraction of a
millisecond a candidate, so the default search can afford it (:mod:`lookalike.core.search`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

# The longer side of a stored thumbnail, in pixels. 64 found 0.5 point more copies on the
# tuning split than 32, at 3.5 times the time a candidate.
THUMBNAIL_SIDE = 32
# The kind under which a catalog stores thumbnails beside local features.
THUMBNAIL_KIND = "gray32"
# How much smaller than the other image a crop's content may be: the template is tried at
# these fractions of the largest size that fits (a crop keeping half the area is ~0.7).
SCALES = (1.0, 0.85, 0.7)
# The same for a candidate inside the query (a frame, a border, a screenshot's canvas).
FRAMED_SCALES = (0.95, 0.8, 0.65)
# Templates smaller than this on a side match anything.
MIN_TEMPLATE_SIDE = 6
# A template with (nearly) no contrast correlates with nothing meaningfully.
FLAT_STD = 1.0


@dataclass(frozen=True)
class Thumbnail:
    """A grayscale image of at most ``THUMBNAIL_SIDE`` pixels a side, as float32 [h, w]."""

    pixels: np.ndarray

    @classmethod
    def of(cls, image: Image.Image) -> Thumbnail:
        """The thumbnail of a decoded image (area-averaged, so blur and JPEG noise vanish)."""
        gray = image.convert("L")
        width, height = gray.size
        scale = THUMBNAIL_SIDE / max(width, height, 1)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        if size != gray.size:
            gray = gray.resize(size, Image.Resampling.BOX)
        return cls(np.asarray(gray, dtype=np.float32))

    def to_bytes(self) -> bytes:
        """Width and height (one byte each), then the pixels as bytes, row by row."""
        height, width = self.pixels.shape
        body = np.clip(np.rint(self.pixels), 0, 255).astype(np.uint8).tobytes()
        return bytes((width, height)) + bytes(body)

    @classmethod
    def from_bytes(cls, data: bytes) -> Thumbnail | None:
        """The thumbnail ``to_bytes`` wrote, or None when ``data`` is not one."""
        if len(data) < 3:
            return None
        width, height = data[0], data[1]
        if width < 1 or height < 1 or len(data) != 2 + width * height:
            return None
        pixels = np.frombuffer(data, dtype=np.uint8, offset=2).reshape(height, width)
        return cls(pixels.astype(np.float32))

    @property
    def mirrored(self) -> Thumbnail:
        """The thumbnail flipped left to right."""
        return Thumbnail(np.ascontiguousarray(self.pixels[:, ::-1]))


def _resized(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """``pixels`` (float32 [h, w]) area-averaged to ``width`` x ``height``."""
    import cv2

    if pixels.shape == (height, width):
        return pixels
    return cv2.resize(pixels, (width, height), interpolation=cv2.INTER_AREA)


def _templates(
    small: np.ndarray, large_shape: tuple[int, ...], scales: tuple[float, ...]
) -> list[np.ndarray]:
    """``small`` resized to each of ``scales`` of the largest size that fits ``large_shape``
    (too small ones left out)."""
    large_h, large_w = large_shape
    small_h, small_w = small.shape
    fit = min(large_w / small_w, large_h / small_h)
    templates = []
    for fraction in scales:
        width, height = int(small_w * fit * fraction), int(small_h * fit * fraction)
        if min(width, height) >= MIN_TEMPLATE_SIDE:
            templates.append(_resized(small, width, height))
    return templates


def _inside_each(images: np.ndarray, template: np.ndarray) -> np.ndarray:
    """[n_images]: the best normalised cross-correlation of ``template`` anywhere in each of
    ``images`` (all of one shape, no smaller): one OpenCV call over the images stacked one
    above the other, keeping only the positions that lie inside one image."""
    import cv2

    count, height, width = images.shape
    rows = height - template.shape[0] + 1
    if float(template.std()) < FLAT_STD:
        return np.full(count, -1.0)
    stacked = images.reshape(count * height, width)
    found = cv2.matchTemplate(stacked, template, cv2.TM_CCOEFF_NORMED)
    padded = np.full((count * height, found.shape[1]), -1.0, dtype=np.float32)
    padded[: len(found)] = np.nan_to_num(found, nan=-1.0)
    best = padded.reshape(count, height, -1)[:, :rows].max(axis=(1, 2))
    return np.asarray(np.minimum(best, 1.0))


def _each_inside(image: np.ndarray, templates: np.ndarray) -> np.ndarray:
    """[n_templates]: the best normalised cross-correlation of each of ``templates`` (all of
    one shape) anywhere in ``image``: the image's windows against every template in one
    product."""
    count, height, width = templates.shape
    size = height * width
    windows = np.lib.stride_tricks.sliding_window_view(image, (height, width))
    flat = windows.reshape(-1, size)
    centred = templates.reshape(count, size)
    centred = centred - centred.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(centred, axis=1)
    unit = centred / np.maximum(norms, 1e-6)[:, None]
    sums = flat @ unit.T  # the templates sum to zero: the windows' means drop out
    spread = np.sqrt(np.maximum((flat * flat).sum(axis=1) - flat.sum(axis=1) ** 2 / size, 0.0))
    scores = np.where(spread[:, None] > FLAT_STD, sums / np.maximum(spread, 1e-6)[:, None], 0.0)
    best = np.minimum(scores.max(axis=0), 1.0)
    return np.where(norms / np.sqrt(size) >= FLAT_STD, best, -1.0)


class PixelQuery:
    """A query thumbnail compared with many candidates at once: its scaled templates (and
    its mirror image's) are made once for each candidate shape, since most photos of a
    collection share a few shapes, and all candidates of a shape are correlated together."""

    def __init__(self, query: Thumbnail) -> None:
        self.query = query
        self._mirrored = query.mirrored.pixels
        self._templates: dict[tuple[int, ...], list[np.ndarray]] = {}

    def templates_for(self, shape: tuple[int, ...]) -> list[np.ndarray]:
        """The query's and its mirror image's templates for a candidate of ``shape``."""
        made = self._templates.get(shape)
        if made is None:
            made = _templates(self.query.pixels, shape, SCALES)
            made += _templates(self._mirrored, shape, SCALES)
            self._templates[shape] = made
        return made

    def likenesses(self, candidates: list[Thumbnail]) -> np.ndarray:
        """How much of each candidate's pixels the query shows, from -1 to 1: the best
        correlation of the query (or its mirror image) inside the candidate, or of the
        candidate inside the query. A copy under most edits scores over 0.8
        (``lookalike.core.search.PIXEL_COPY_AT``); another photo of the same scene mostly
        under it."""
        best = np.full(len(candidates), -1.0)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for position, candidate in enumerate(candidates):
            by_shape.setdefault(candidate.pixels.shape, []).append(position)
        for shape, positions in by_shape.items():
            stacked = np.stack([candidates[i].pixels for i in positions])
            for template in self.templates_for(shape):
                best[positions] = np.maximum(best[positions], _inside_each(stacked, template))
            # Each candidate inside the query (a frame, a border, a screenshot's canvas).
            frames = _templates(stacked[0], self.query.pixels.shape, FRAMED_SCALES)
            for height, width in {frame.shape for frame in frames}:
                framed = np.stack([_resized(c, width, height) for c in stacked])
                found = _each_inside(self.query.pixels, framed)
                best[positions] = np.maximum(best[positions], found)
        return best


def copy_likeness(query: Thumbnail, candidate: Thumbnail) -> float:
    """:meth:`PixelQuery.likenesses` of one pair."""
    return float(PixelQuery(query).likenesses([candidate])[0])
