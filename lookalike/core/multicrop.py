"""Multi-crop queries: search with several crops of the query and merge their results.

A query photo often holds more than the object the user means (a border, a caption, other
things beside it). Searching with the whole image plus a centre crop and four corner crops,
and keeping each database image's best score over the views, lets a database image match
whichever part of the query it shares.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from lookalike.errors import LookalikeError

# Each crop keeps this fraction of the query's width and height.
CROP_FRACTION = 0.75


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
