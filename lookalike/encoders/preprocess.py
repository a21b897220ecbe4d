"""Pixel preprocessing: the config stored with each set of weights, and the resize applying it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image

ResizeMode = Literal["squash", "center_crop"]


@dataclass(frozen=True)
class PreprocessConfig:
    """How raw RGB pixels become network input.

    ``squash`` resizes the whole image to ``resolution`` x ``resolution`` (the aspect ratio is
    lost, but nothing is cut off, which suits retrieval); ``center_crop`` resizes the shorter side
    to ``resolution / crop_fraction`` and cuts the centre square (the classic classifier eval).
    Mean and std are in [0, 1] units and are applied inside the model, so callers feed uint8.
    """

    resolution: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: ResizeMode = "squash"
    crop_fraction: float = 0.875
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, stored in the catalog next to the vectors it produced."""
        return asdict(self)


_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def resize_for_model(image: Image.Image, config: PreprocessConfig) -> np.ndarray:
    """An RGB image as the uint8 [resolution, resolution, 3] array the encoder expects."""
    size = config.resolution
    resample = _RESAMPLE[config.interpolation]
    if config.resize == "squash":
        # reducing_gap lets PIL shrink big images in cheap integer steps first.
        resized = image.resize((size, size), resample, reducing_gap=3.0)
    else:
        short = round(size / config.crop_fraction)
        width, height = image.size
        scale = short / min(width, height)
        scaled = (max(size, round(width * scale)), max(size, round(height * scale)))
        resized = image.resize(scaled, resample, reducing_gap=3.0)
        left = (scaled[0] - size) // 2
        top = (scaled[1] - size) // 2
        resized = resized.crop((left, top, left + size, top + size))
    return np.asarray(resized, dtype=np.uint8)
