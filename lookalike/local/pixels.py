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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from lookalike.images import in_mode

# The longer side of a stored thumbnail, in pixels. 64 found 0.5 point more copies on the
# tuning split than 32, at 3.5 times the time a candidate.
THUMBNAIL_SIDE = 32
# The kind under which a catalog stores thumbnails beside local features.
THUMBNAIL_KIND = "gray32"
# How much smaller than the other image a crop's content may be: the template is tried at
# these fractions of the largest size that fits (a crop keeping half the area is ~0.7).
SCALES = (1.0, 0.85, 0.7)
# The same, finer, for a query turned upright (``lookalike.core.multicrop``): the photo cut
# out of a rotated copy is a crop of its source at any size, resampled twice, and a scale
# off by a step lowers its correlation more than a plain crop's. On the train splits' cropped,
# rotated and recoloured copies (400 sources each) the source came first for 0.8375 -> 0.8625
# of grocery-store's and 0.9325 -> 0.9375 of clothing-small's; eight scales down to 0.56
# found no more.
UPRIGHT_SCALES = (1.0, 0.92, 0.85, 0.78, 0.7)
# The same for a candidate inside the query (a frame, a border, a screenshot's canvas).
FRAMED_SCALES = (0.95, 0.8, 0.65)
# Templates smaller than this on a side match anything.
MIN_TEMPLATE_SIDE = 6
# A template with (nearly) no contrast correlates with nothing meaningfully.
FLAT_STD = 1.0
# A layout vector (:func:`layout_vector`) is a thumbnail area-averaged to this many pixels a
# side. Replayed on the train splits' weak queries (100 sources x 16 attacks each), the
# nearest layouts at 8, 12, 16 and 24 pixels found the same copies: 8 is the smallest.
LAYOUT_SIDE = 8


@dataclass(frozen=True)
class Thumbnail:
    """A grayscale image of at most ``THUMBNAIL_SIDE`` pixels a side, as float32 [h, w]."""

    pixels: np.ndarray

    @classmethod
    def of(cls, image: Image.Image) -> Thumbnail:
        """The thumbnail of a decoded image (area-averaged, so blur and JPEG noise vanish)."""
        gray = in_mode(image, "L")
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


def _inside_each(images: list[np.ndarray], template: np.ndarray) -> np.ndarray:
    """[n_images]: the best normalised cross-correlation of ``template`` anywhere in each of
    ``images`` (none smaller than it): one OpenCV call over the images stacked one above the
    other (padded to one shape), keeping only the positions that lie inside one image."""
    import cv2

    if float(template.std()) < FLAT_STD:
        return np.full(len(images), -1.0)
    heights = np.array([image.shape[0] for image in images])
    widths = np.array([image.shape[1] for image in images])
    height, width = int(heights.max()), int(widths.max())
    if (heights == height).all() and (widths == width).all():
        stacked = np.concatenate(images)
    else:
        stacked = np.zeros((len(images) * height, width), dtype=np.float32)
        for slot, image in enumerate(images):
            top = slot * height
            stacked[top : top + image.shape[0], : image.shape[1]] = image
    found = cv2.matchTemplate(stacked, template, cv2.TM_CCOEFF_NORMED)
    # Flat windows come out as NaN: they match nothing.
    padded = np.full((len(images) * height, found.shape[1]), -1.0, dtype=np.float32)
    np.fmax(found, -1.0, out=padded[: len(found)])
    scores = padded.reshape(len(images), height, -1)
    # A position counts when the template lies inside that image, not in its padding.
    rows = heights - template.shape[0] + 1
    cols = widths - template.shape[1] + 1
    if (rows == rows[0]).all() and (cols == scores.shape[2]).all():
        best = scores[:, : rows[0]].max(axis=(1, 2))
    else:
        inside = (np.arange(height)[None, :, None] < rows[:, None, None]) & (
            np.arange(scores.shape[2])[None, None, :] < cols[:, None, None]
        )
        best = np.where(inside, scores, -1.0).max(axis=(1, 2))
    return np.asarray(np.minimum(best, 1.0))


def _windows(image: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Every ``height`` x ``width`` window of ``image``, flattened [n_windows, size], and
    each window's spread (the root of its summed squared deviations from its mean)."""
    size = height * width
    flat = np.lib.stride_tricks.sliding_window_view(image, (height, width)).reshape(-1, size)
    spread = np.sqrt(np.maximum((flat * flat).sum(axis=1) - flat.sum(axis=1) ** 2 / size, 0.0))
    return flat, spread


def _each_inside(windows: tuple[np.ndarray, np.ndarray], templates: np.ndarray) -> np.ndarray:
    """[n_templates]: the best normalised cross-correlation of each of ``templates`` (all of
    one shape) anywhere in an image, given that image's ``windows`` of that shape: the
    windows against every template in one product."""
    flat, spread = windows
    count, height, width = templates.shape
    size = height * width
    centred = templates.reshape(count, size)
    centred = centred - centred.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(centred, axis=1)
    unit = centred / np.maximum(norms, 1e-6)[:, None]
    sums = flat @ unit.T  # the templates sum to zero: the windows' means drop out
    scores = np.where(spread[:, None] > FLAT_STD, sums / np.maximum(spread, 1e-6)[:, None], 0.0)
    best = np.minimum(scores.max(axis=0), 1.0)
    return np.where(norms / np.sqrt(size) >= FLAT_STD, best, -1.0)


class PixelQuery:
    """A query thumbnail compared with many candidates at once: its scaled templates are
    made once for each candidate shape, since most photos of a collection share a few, and
    each template is correlated in one call with every candidate that takes it and their
    mirror images (the mirror image of the query inside the candidate). ``framed=False``
    leaves out the candidates inside the query (for a query without a frame, a border or a
    screenshot's bars, where none can be: half the time); ``scales`` are the sizes the query
    is tried at inside a candidate (``UPRIGHT_SCALES`` for a query turned upright)."""

    def __init__(
        self, query: Thumbnail, *, framed: bool = True, scales: tuple[float, ...] = SCALES
    ) -> None:
        self.query = query
        self.framed = framed
        self.scales = scales
        self._templates: dict[tuple[int, ...], list[np.ndarray]] = {}
        self._windows: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def likenesses(self, candidates: list[Thumbnail]) -> np.ndarray:
        """How much of each candidate's pixels the query shows, from -1 to 1: the best
        correlation of the query (or its mirror image) inside the candidate, or of the
        candidate inside the query. A copy under most edits scores over 0.8
        (``lookalike.core.search.PIXEL_COPY_AT``); another photo of the same scene mostly
        under it."""
        best = np.full(len(candidates), -1.0)
        # Candidates of different shapes often take the same template (the query fitted to
        # the same height): each template is correlated once with all that take it, and
        # with their mirror images (the query's mirror image inside the candidate).
        takers: dict[tuple[int, int], list[int]] = {}
        made: dict[tuple[int, int], np.ndarray] = {}
        for position, candidate in enumerate(candidates):
            for template in self._templates_for(candidate.pixels.shape):
                takers.setdefault(template.shape, []).append(position)
                made[template.shape] = template
        for size, positions in takers.items():
            images = [candidates[i].pixels for i in positions]
            images += [np.ascontiguousarray(image[:, ::-1]) for image in images]
            found = _inside_each(images, made[size])
            best[positions] = np.maximum(best[positions], found[: len(positions)])
            best[positions] = np.maximum(best[positions], found[len(positions) :])
        if not self.framed:
            return best
        # Each candidate inside the query (a frame, a border, a screenshot's canvas).
        by_size: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = {}
        for position, candidate in enumerate(candidates):
            for frame in _templates(candidate.pixels, self.query.pixels.shape, FRAMED_SCALES):
                by_size.setdefault(frame.shape, []).append((position, frame))
        for (height, width), frames in by_size.items():
            windows = self._windows.get((height, width))
            if windows is None:
                windows = self._windows[height, width] = _windows(self.query.pixels, height, width)
            found = _each_inside(windows, np.stack([frame for _, frame in frames]))
            positions = [position for position, _ in frames]
            np.maximum.at(best, positions, found)
        return best

    def _templates_for(self, shape: tuple[int, ...]) -> list[np.ndarray]:
        """The query's templates for a candidate of ``shape``."""
        made = self._templates.get(shape)
        if made is None:
            made = self._templates[shape] = _templates(self.query.pixels, shape, self.scales)
        return made


def layout_vector(thumbnail: Thumbnail) -> np.ndarray:
    """float32 [LAYOUT_SIDE ** 2]: a thumbnail's layout of light and dark, squashed to a
    square, centred and of unit length (all zeros when flat), so the dot product of two is
    their correlation frame to frame. Blur, recolouring, greyscale and shrinking keep it."""
    square = _resized(thumbnail.pixels, LAYOUT_SIDE, LAYOUT_SIDE).reshape(-1)
    centred = square - square.mean()
    norm = float(np.linalg.norm(centred))
    if norm / LAYOUT_SIDE < FLAT_STD:
        return np.zeros(LAYOUT_SIDE * LAYOUT_SIDE, dtype=np.float32)
    return np.asarray(centred / norm, dtype=np.float32)


class LayoutTable:
    """The layout vectors (:func:`layout_vector`) of a collection's thumbnails, searched
    whole: the images whose frame correlates best with a query's, or with its mirror image.
    A copy edited all over (blurred, recoloured, greyed, shrunk to a thumbnail) can drift far
    from its source by its global vector while its layout stays; these are the candidates
    the vector misses."""

    def __init__(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self.ids = np.asarray(ids, dtype=np.int64)
        self.vectors = np.asarray(vectors, dtype=np.float32).reshape(len(self.ids), LAYOUT_SIDE**2)

    @classmethod
    def of(cls, thumbnails: Mapping[int, Thumbnail]) -> LayoutTable:
        """The table of these images' thumbnails (id -> thumbnail)."""
        ids = np.fromiter(thumbnails, dtype=np.int64, count=len(thumbnails))
        vectors = np.zeros((len(ids), LAYOUT_SIDE * LAYOUT_SIDE), dtype=np.float32)
        for row, thumbnail in enumerate(thumbnails.values()):
            vectors[row] = layout_vector(thumbnail)
        return cls(ids, vectors)

    @classmethod
    def joined(cls, parts: Sequence[LayoutTable]) -> LayoutTable:
        """One table of several (built a chunk of thumbnails at a time)."""
        if not parts:
            return cls.of({})
        return cls(
            np.concatenate([part.ids for part in parts]),
            np.concatenate([part.vectors for part in parts]),
        )

    def __len__(self) -> int:
        return len(self.ids)

    def nearest(self, queries: Sequence[Thumbnail], n: int) -> list[tuple[int, float]]:
        """(id, correlation) of the ``n`` images whose layout correlates best with any of
        ``queries`` or its mirror image, best first (none for flat queries)."""
        wanted = []
        for query in queries:
            wanted.append(layout_vector(query))
            wanted.append(layout_vector(Thumbnail(np.ascontiguousarray(query.pixels[:, ::-1]))))
        probes = np.stack(wanted)
        probes = probes[np.abs(probes).sum(axis=1) > 0]
        if not len(probes) or not len(self.ids) or n < 1:
            return []
        best = (probes @ self.vectors.T).max(axis=0)
        n = min(n, len(best))
        top = np.argpartition(-best, n - 1)[:n]
        top = top[np.argsort(-best[top], kind="stable")]
        return [(int(i), float(c)) for i, c in zip(self.ids[top], best[top], strict=True)]


def copy_likeness(query: Thumbnail, candidate: Thumbnail) -> float:
    """:meth:`PixelQuery.likenesses` of one pair."""
    return float(PixelQuery(query).likenesses([candidate])[0])
