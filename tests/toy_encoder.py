"""A toy encoder defined outside the package and registered by name, as a user's plugin would
be: a 4x4 colour thumbnail plus colour histograms (64 dims), cheap and deterministic, with no
text tower, no patch tokens and no ``pooling`` option.

Importing this module registers it as ``toy-colour`` (the registry is process-global).
"""

from __future__ import annotations

import hashlib

import numpy as np

from lookalike.encoders import register_encoder
from lookalike.encoders.base import EncoderBase, EncoderIdentity
from lookalike.encoders.preprocess import PreprocessConfig

NAME = "toy-colour"
RESOLUTION = 32
GRID = 4  # thumbnail cells a side
BINS = 4  # histogram bins per channel, and of brightness
DIM = GRID * GRID * 3 + 4 * BINS  # 48 thumbnail values + 16 histogram fractions = 64
WEIGHTS_SHA256 = hashlib.sha256(b"toy-colour v1: no weights at all").hexdigest()
PREPROCESS = PreprocessConfig(
    resolution=RESOLUTION, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize="squash"
)


class ToyColourEncoder(EncoderBase):
    """Thumbnail and histograms, each centred so that unrelated images are not all alike."""

    def __init__(self, *, normalize: bool = True) -> None:
        self.normalize = normalize
        self.identity = EncoderIdentity(
            model=NAME,
            layer="thumb4+hist4",
            dim=DIM,
            weights_sha256=WEIGHTS_SHA256,
            preprocess=PREPROCESS,
        )

    def _forward(self, pixels: np.ndarray) -> np.ndarray:
        values = pixels.astype(np.float32) / 255.0  # [n, 32, 32, 3]
        n = len(values)
        cell = RESOLUTION // GRID
        thumbnail = values.reshape(n, GRID, cell, GRID, cell, 3).mean(axis=(2, 4)) - 0.5
        channels = np.concatenate([values, values.mean(axis=3, keepdims=True)], axis=3)
        bins = np.minimum((channels * BINS).astype(np.int64), BINS - 1)  # [n, 32, 32, 4]
        histogram = np.stack(
            [(bins == b).mean(axis=(1, 2)) for b in range(BINS)], axis=2
        )  # [n, 4 channels, BINS]
        features = [thumbnail.reshape(n, -1), histogram.reshape(n, -1) - 1.0 / BINS]
        return np.concatenate(features, axis=1).astype(np.float32)


@register_encoder(NAME)
def create_toy_encoder(
    *,
    normalize: bool = True,
    runtime: str = "auto",
    device: str = "auto",
    threads: int | None = None,
) -> ToyColourEncoder:
    """The toy encoder; ``runtime``, ``device`` and ``threads`` are accepted (a collection
    passes them to every encoder that takes them) and mean nothing here. It takes no
    ``layer``, ``pooling`` or ``scales``."""
    del runtime, device, threads
    return ToyColourEncoder(normalize=normalize)
