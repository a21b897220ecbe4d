"""Is one image a copy of another? SIFT matching, a RANSAC similarity and the copy test.

Two photos of the same product on the same shelf share many SIFT matches too (on
grocery-store, up to ~170 inliers between different shots), so inliers alone cannot tell a
copy from a second photo. A copy is the same pixels moved by one transform: nearly every
confident match is explained by it (``agreement``, the share of tentative matches that are
inliers), and they land where it says to a fraction of a pixel (``residual``, the median
reprojection error of the inliers). A second shot moves the product against its background,
leaving confident matches the transform cannot explain, and the parallax of the scene spreads
the residuals. On photos of little texture heavy JPEG or shrinking moves the few keypoints as
far as parallax does, and captions hide most of them: a pair that fails by keypoints alone
but still has a few inliers is judged by its pixels, aligned by the same transform
(:mod:`lookalike.local.alignment`): a copy's blocks land where the one motion says, a second
photo's stray. See :class:`CopyRule`; its thresholds are tuned in
``benchmarks/dedup_accuracy.py``.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING

import numpy as np

from lookalike.errors import ImageError
from lookalike.local.matching import mirror_features

if TYPE_CHECKING:
    from lookalike.core.collection import Collection
    from lookalike.local.alignment import PixelAlignment
    from lookalike.local.features import LocalFeatures
    from lookalike.local.matching import EstimatedTransform, Verification


@dataclass(frozen=True)
class PairCheck:
    """SIFT verification of a pair: ``inliers`` (places that agree with the best similarity,
    the first image mirrored or not), ``matches`` (tentative matches), ``agreement``
    (inlier matches / tentative matches), ``residual`` (median inlier reprojection error,
    pixels of the ~512-pixel frames features live in), ``transform`` (what turned the first
    image into the second; None without inliers; agreement counts only matches inside the
    overlap of the two frames) and the contents: the share of each
    image's frame that is picture rather than padding, 1 unless the other image, moved by
    the transform, leaves part of it uncovered and that part is nearly bare of keypoints
    (the black or blurred corners of a copy rotated on a grown canvas). ``matrix``: the 2x3
    affine that takes the first image's feature frame onto the second's (a mirror folded
    in), for aligning their pixels."""

    inliers: int
    matches: int
    agreement: float
    residual: float
    transform: EstimatedTransform | None = None
    source_content: float = 1.0
    target_content: float = 1.0
    matrix: np.ndarray | None = field(default=None, compare=False, repr=False)

    def reversed(self) -> PairCheck:
        """The same check seen from the second image."""
        if self.transform is None:
            return self
        return replace(
            self,
            transform=self.transform.inverse(),
            source_content=self.target_content,
            target_content=self.source_content,
            matrix=None if self.matrix is None else _invert(self.matrix),
        )


NO_MATCH = PairCheck(0, 0, 0.0, float("inf"))
# Inliers beyond which an alignment is clear (see _clear).
CLEAR_INLIERS = 20
# Keypoint density, relative to the picture's, below which uncovered corners are padding.
PADDING_DENSITY = 0.25
# How far past the covered part a keypoint must lie to count as padding's (frame share).
PADDING_MARGIN = 0.03
# Pairs the keypoints do not prove are aligned by pixels when at least this many inliers
# agree (a wrong similarity aligns nothing, so few will do: captions can leave a copy 3) and
# their median residual is at most this many pixels (a caption's stray inliers push a copy's
# to 0.9; second photos of a moving scene spread further and would only cost the time of
# reading them). On grocery-store's train split 0.6 px aligned 941 pairs, 1.0 px 1,858, and
# no second photo passed either way.
PIXEL_CHECK_INLIERS = 3
PIXEL_CHECK_RESIDUAL = 1.0
# Grey frames a Verifier keeps for pixel alignment (about 256 KB each).
GREY_CACHE = 256


@dataclass(frozen=True)
class PixelRule:
    """How aligned pixels (:mod:`lookalike.local.alignment`) judge a pair. They prove a copy
    the keypoints do not when at least ``min_alike`` of the textured blocks are alike and
    their shifts stray at most ``max_drift`` pixels from one motion. They refute one the
    keypoints prove with fewer than ``clear_inliers`` inliers when under ``min_support`` of
    the blocks are alike: two products printed with the same logo share a few dozen exact
    keypoints, and little else."""

    min_alike: float
    max_drift: float
    clear_inliers: int
    min_support: float

    def proves(self, alignment: PixelAlignment) -> bool:
        """Whether the aligned pixels show a copy."""
        return alignment.alike >= self.min_alike and alignment.drift <= self.max_drift

    def refutes(self, alignment: PixelAlignment) -> bool:
        """Whether the aligned pixels show that most of the shared picture differs (never
        without enough textured blocks to say)."""
        from lookalike.local.alignment import MIN_ALIKE_BLOCKS

        return alignment.blocks >= MIN_ALIKE_BLOCKS and alignment.alike < self.min_support


@dataclass(frozen=True)
class CopyRule:
    """When a :class:`PairCheck` means a copy: at least ``min_inliers`` inliers, at least
    ``min_agreement`` of the tentative matches explained, and a median residual of at most
    ``max_residual`` pixels, unless the aligned ``pixels`` refute it; or, failing that, when
    the aligned pixels prove it (see :meth:`needs_pixels`)."""

    min_inliers: int
    min_agreement: float
    max_residual: float
    pixels: PixelRule

    def accepts(self, check: PairCheck) -> bool:
        """Whether the keypoints alone show a copy."""
        return (
            check.inliers >= self.min_inliers
            and check.agreement >= self.min_agreement
            and check.residual <= self.max_residual
        )

    def needs_pixels(self, check: PairCheck) -> bool:
        """Whether the aligned pixels have a say: for a pair the keypoints show with few
        inliers, or one they do not show that has a transform with a few inliers landing
        near where it says (``PIXEL_CHECK_INLIERS``, ``PIXEL_CHECK_RESIDUAL``)."""
        if check.matrix is None:
            return False
        if self.accepts(check):
            return check.inliers < self.pixels.clear_inliers
        # A stricter min_inliers asks more of the pixel test's pairs too (3 of the default 10).
        fewest = max(PIXEL_CHECK_INLIERS, math.ceil(0.3 * self.min_inliers))
        return check.inliers >= fewest and check.residual <= PIXEL_CHECK_RESIDUAL

    def confirms(
        self,
        check: PairCheck,
        alignment: Callable[[bool], PixelAlignment],
        *,
        refute: bool = True,
    ) -> bool:
        """Whether a checked pair is a copy; ``alignment(refine)`` gives its aligned pixels,
        asked only when they have a say (it reads both files), refined only when their drift
        counts (see ``align_pixels``). Without ``refute``, a pair the keypoints prove is not
        put to the pixels (a cheaper, looser test, for pairs that only link candidates)."""
        if not self.needs_pixels(check):
            return self.accepts(check)
        if self.accepts(check):
            return not refute or not self.pixels.refutes(alignment(False))
        return self.pixels.proves(alignment(True))


def check_pair(
    source: LocalFeatures, target: LocalFeatures, *, mirrored: LocalFeatures | None = None
) -> PairCheck:
    """Verify ``source`` (and its ``mirrored`` features, when given) against ``target``; the
    view with more inliers wins. The mirror is not tried when the image as it is already
    aligns clearly (a copy that is not mirrored): that halves the work of most checks."""
    from lookalike.local.matching import DEFAULT_RULE, verify

    best: tuple[Verification, LocalFeatures] | None = None
    for view in (source, mirrored):
        if view is None:
            continue
        if best is not None and _clear(best[0]):
            break
        found = verify(view, target, ratio=DEFAULT_RULE.ratio, threshold=DEFAULT_RULE.threshold)
        if found.transform is not None and (best is None or found.inliers > best[0].inliers):
            best = (found, view)
    if best is None:
        return NO_MATCH
    return _measure(*best, source, target)


def _clear(found: Verification) -> bool:
    """Whether an alignment is too strong for the other orientation to beat: most tentative
    matches agree, and many (a mirror rarely aligns more than a few by chance)."""
    return found.inliers >= CLEAR_INLIERS and found.inliers >= 0.5 * found.matches


def _measure(
    found: Verification, view: LocalFeatures, source: LocalFeatures, target: LocalFeatures
) -> PairCheck:
    from lookalike.local.matching import estimate_transform

    matrix, pairs, others = found.transform, found.inlier_pairs, found.outlier_pairs
    assert matrix is not None and pairs is not None and others is not None  # with a transform
    moved = _apply(matrix, view.points[pairs[:, 0]])
    # The mirrored view's frame is the image's flipped left to right: fold that in.
    flip = np.array([[-1.0, 0.0, source.width - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    own = matrix @ flip if view is not source else matrix
    landed = target.points[pairs[:, 1]].astype(np.float64)
    errors = np.linalg.norm(moved - landed, axis=1)
    # In the coarser of the two frames: an enlarging transform spreads errors too.
    enlarge = max(1.0, float(np.sqrt(abs(np.linalg.det(matrix[:, :2])))))
    # Agreement counts the matches both of whose ends lie in the overlap: a match reaching
    # a part the other image does not show (cropped away, a black corner) is a wrong match
    # whatever the pair, not a sign of a second motion.
    explained = int(np.count_nonzero(_in_overlap(matrix, view, target, pairs)))
    unexplained = int(np.count_nonzero(_in_overlap(matrix, view, target, others)))
    return PairCheck(
        inliers=found.inliers,
        matches=found.matches,
        agreement=explained / max(1, explained + unexplained),
        residual=float(np.median(errors)) / enlarge,
        # The estimate takes the points in the image's own frame (the mirror's rows are the
        # image's rows), and finds the mirror by itself.
        transform=estimate_transform(
            source.points[pairs[:, 0]],
            landed,
            source_scale=source.scale,
            target_scale=target.scale,
            inliers=found.inliers,
        ),
        source_content=_content(_invert(matrix), target, view),
        target_content=_content(matrix, view, target),
        matrix=own,
    )


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    moved: np.ndarray = np.asarray(points, dtype=np.float64) @ matrix[:, :2].T + matrix[:, 2]
    return moved


def _invert(matrix: np.ndarray) -> np.ndarray:
    square = np.vstack([matrix, [0.0, 0.0, 1.0]])
    inverse: np.ndarray = np.linalg.inv(square)[:2]
    return inverse


def _fill(matrix: np.ndarray, moved: LocalFeatures, frame: LocalFeatures) -> tuple[float, float]:
    """(the share of ``frame`` covered by ``moved``'s frame once moved by ``matrix``, the
    share of that moved frame that lands inside ``frame``)."""
    from lookalike.local.features import opencv

    def corners(features: LocalFeatures) -> np.ndarray:
        w, h = features.width, features.height
        return np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float64)

    polygon = _apply(matrix, corners(moved))
    first, second = polygon[1] - polygon[0], polygon[2] - polygon[1]
    if first[0] * second[1] - first[1] * second[0] < 0:
        polygon = polygon[::-1]  # a mirrored similarity reverses the winding
    area, _ = opencv().intersectConvexConvex(
        polygon.astype(np.float32), corners(frame).astype(np.float32)
    )
    moved_area = moved.width * moved.height * abs(np.linalg.det(matrix[:, :2]))
    covered = min(1.0, max(0.0, area / (frame.width * frame.height)))
    return float(covered), float(min(1.0, area / max(moved_area, 1e-9)))


def _content(matrix: np.ndarray, moved: LocalFeatures, frame: LocalFeatures) -> float:
    """The share of ``frame`` that is picture: what ``moved``'s frame covers once moved by
    ``matrix``, when all of that frame lands inside ``frame`` (a canvas grown around it) and
    the rest holds keypoints at less than ``PADDING_DENSITY`` times the density of the
    covered part; else all of it. Only a turn that is not a multiple of 90 degrees pads (a
    crop leaves plain backgrounds uncovered as bare as padding), and keypoints near the
    covered part's edge do not count against it: the edge of a rotated photo against black
    is a strong feature."""
    turn = abs(np.degrees(np.arctan2(matrix[1, 0], matrix[0, 0]))) % 90.0
    if min(turn, 90.0 - turn) < 2.0:
        return 1.0
    fill, inside = _fill(matrix, moved, frame)
    if fill >= 0.98 or fill <= 0.0 or inside < 0.98:
        return 1.0
    back = _apply(_invert(matrix), frame.points)
    margin = PADDING_MARGIN * max(moved.width, moved.height)
    beyond = np.maximum(
        np.maximum(-back[:, 0], back[:, 0] - moved.width),
        np.maximum(-back[:, 1], back[:, 1] - moved.height),
    )
    area = float(frame.width * frame.height)
    density = np.count_nonzero(beyond <= 0) / (fill * area)
    outside = np.count_nonzero(beyond > margin) / ((1.0 - fill) * area)
    return fill if outside < PADDING_DENSITY * density else 1.0


def _in_overlap(
    matrix: np.ndarray, view: LocalFeatures, target: LocalFeatures, pairs: np.ndarray
) -> np.ndarray:
    """Which (view row, target row) matches have both ends inside the other frame once
    moved there, ``PADDING_MARGIN`` from its edges."""
    margin = PADDING_MARGIN * max(target.width, target.height)
    there = _inside(_apply(matrix, view.points[pairs[:, 0]]), target, margin)
    back = _apply(_invert(matrix), target.points[pairs[:, 1]])
    both: np.ndarray = there & _inside(back, view, PADDING_MARGIN * max(view.width, view.height))
    return both


def _inside(points: np.ndarray, frame: LocalFeatures, margin: float = 0.0) -> np.ndarray:
    """Which points lie in the frame, at least ``margin`` from its edges."""
    inside: np.ndarray = (
        (points[:, 0] >= margin)
        & (points[:, 1] >= margin)
        & (points[:, 0] < frame.width - margin)
        & (points[:, 1] < frame.height - margin)
    )
    return inside


class Verifier:
    """Pair checks of catalog images, cached; features from the catalog when stored (SIFT),
    else extracted from the files once."""

    def __init__(self, collection: Collection, failed: list[tuple[str, str]]) -> None:
        self.collection = collection
        self.failed = failed
        stored = collection.local_store.kind()
        # Stored SIFT features are reused; patch tokens are no use to SIFT matching.
        self.kind = stored.name if stored is not None and stored.sift is not None else None
        self._features: dict[int, LocalFeatures | None] = {}
        self._mirrored: dict[int, LocalFeatures | None] = {}
        self._checks: dict[tuple[int, int], PairCheck] = {}
        self._alignments: dict[tuple[int, int], PixelAlignment] = {}
        self._greys: dict[int, np.ndarray | None] = {}

    def is_copy(self, a: int, b: int, rule: CopyRule, *, refute: bool = True) -> bool:
        """Whether images ``a`` and ``b`` are copies of each other by ``rule``: by their
        keypoints, else (when they come close) by their aligned pixels (see
        ``CopyRule.confirms``)."""
        alignment = partial(self.alignment, a, b)
        return rule.confirms(self.check(a, b), alignment, refute=refute)

    def alignment(self, a: int, b: int, refine: bool = True) -> PixelAlignment:
        """How the pixels of ``a`` and ``b`` line up by their SIFT transform (see
        ``align_pixels``); cached (a pair is always asked the same way: its check decides)."""
        key = (min(a, b), max(a, b))
        if key not in self._alignments:
            first, second = self.grey(key[0]), self.grey(key[1])
            self._alignments[key] = aligned(self.check(*key), first, second, refine=refine)
        return self._alignments[key]

    def grey(self, image_id: int) -> np.ndarray | None:
        """The image's grey pixels in its feature frame, read from its file (None when it
        no longer reads); the last ``GREY_CACHE`` are kept."""
        if image_id not in self._greys:
            features = self.features(image_id)
            record = self.collection.catalog.images([image_id]).get(image_id)
            grey = None
            if features is not None and record is not None:
                grey = read_grey(record.path, features)
            if len(self._greys) >= GREY_CACHE:
                del self._greys[next(iter(self._greys))]
            self._greys[image_id] = grey
        return self._greys[image_id]

    def check(self, a: int, b: int) -> PairCheck:
        """The check of image ``a`` against ``b`` (its transform turns a into b); cached."""
        if (b, a) in self._checks:
            return self._checks[(b, a)].reversed()
        if (a, b) not in self._checks:
            source, target = self.features(a), self.features(b)
            self._checks[(a, b)] = (
                NO_MATCH
                if source is None or target is None
                else check_pair(source, target, mirrored=self.mirrored(a))
            )
        return self._checks[(a, b)]

    def features(self, image_id: int) -> LocalFeatures | None:
        if image_id not in self._features:
            self.prefetch([image_id], 0)
        return self._features[image_id]

    def mirrored(self, image_id: int) -> LocalFeatures | None:
        if image_id not in self._mirrored:
            features = self.features(image_id)
            self._mirrored[image_id] = None if features is None else mirror_features(features)
        return self._mirrored[image_id]

    def forget(self, keep: Iterable[int]) -> None:
        """Drop the features of every image but ``keep`` (bounds memory between stages)."""
        wanted = set(keep)
        for cache in (self._features, self._mirrored, self._greys):
            for image_id in [i for i in cache if i not in wanted]:
                del cache[image_id]

    def stored(self, ids: Sequence[int], *, check: bool = True) -> dict[int, LocalFeatures]:
        """The stored features of these images that decode (none without stored SIFT);
        ``check=False`` reads them without their checksum (see ``LocalFeatures.from_bytes``)."""
        from lookalike.local.errors import CorruptLocalFeaturesError
        from lookalike.local.features import LocalFeatures

        found: dict[int, LocalFeatures] = {}
        if self.kind is None or not ids:
            return found
        for image_id, data in self.collection.catalog.local_features(ids, self.kind).items():
            # Corrupt stored features are extracted again from the file.
            with contextlib.suppress(CorruptLocalFeaturesError):
                found[image_id] = LocalFeatures.from_bytes(data, check=check)
        return found

    def prefetch(self, ids: Sequence[int], workers: int | None) -> None:
        """Load or extract the features of these images, extracting in ``workers`` threads
        (OpenCV and decoding release the GIL)."""
        todo = [i for i in ids if i not in self._features]
        if not todo:
            return
        self._features.update(self.stored(todo))
        self._extract([i for i in todo if i not in self._features], workers)

    def _extract(self, todo: Sequence[int], workers: int | None) -> None:
        from concurrent.futures import ThreadPoolExecutor

        records = self.collection.catalog.images(list(todo))
        paths = [(i, records[i].path) for i in todo if i in records]
        self._features.update((i, None) for i in todo if i not in records)
        workers = min(os.cpu_count() or 1, 4) if workers is None else workers
        if workers <= 1:
            self._store(map(_extract_file, paths))
            return
        with ThreadPoolExecutor(workers, thread_name_prefix="lookalike-sift") as pool:
            self._store(pool.map(_extract_file, paths))

    def _store(
        self, extracted: Iterable[tuple[int, str, LocalFeatures | None, str | None]]
    ) -> None:
        for image_id, path, features, error in extracted:
            self._features[image_id] = features
            if error is not None:
                self.failed.append((path, error))


def aligned(
    check: PairCheck,
    first: np.ndarray | None,
    second: np.ndarray | None,
    *,
    refine: bool = True,
) -> PixelAlignment:
    """The pixel alignment of a checked pair's grey frames (see ``read_grey``). The smaller
    picture is warped onto the larger: shrinking by warping would alias fine detail."""
    from lookalike.local.alignment import NO_ALIGNMENT, align_pixels

    if check.matrix is None or first is None or second is None:
        return NO_ALIGNMENT
    if abs(np.linalg.det(check.matrix[:, :2])) >= 1.0:
        return align_pixels(first, second, check.matrix, refine=refine)
    return align_pixels(second, first, _invert(check.matrix), refine=refine)


def read_grey(path: str, features: LocalFeatures) -> np.ndarray | None:
    """The file's grey pixels in the frame its ``features`` were found in; None when it no
    longer reads."""
    from lookalike.images import load_image
    from lookalike.local.features import DATABASE_CONFIG, frame_grey

    try:
        image = load_image(path, draft_size=DATABASE_CONFIG.max_side)
    except ImageError:
        return None
    return frame_grey(image, features.width, features.height)


def _extract_file(item: tuple[int, str]) -> tuple[int, str, LocalFeatures | None, str | None]:
    from lookalike.images import load_image
    from lookalike.local.features import DATABASE_CONFIG, extract

    image_id, path = item
    try:
        image = load_image(path, draft_size=DATABASE_CONFIG.max_side)
        return image_id, path, extract(image, DATABASE_CONFIG), None
    except ImageError as error:
        return image_id, path, None, error.reason
