"""LSH baseline: the signs of random Gaussian projections of the centred features."""

from __future__ import annotations

import numpy as np

from lookalike.hashing.head import HashHead, Preprocessing, linear_head


def train_lsh(raw: np.ndarray, bits: int, model_key: str, *, seed: int = 0) -> HashHead:
    """Random hyperplanes through the training mean (labels are not used)."""
    preprocessing = Preprocessing.fit(raw)
    rng = np.random.default_rng(seed)
    projection = rng.standard_normal((raw.shape[1], bits)).astype(np.float32)
    return linear_head("lsh", bits, model_key, preprocessing, projection, {"seed": seed})
