"""ITQ baseline (Gong and Lazebnik, CVPR 2011): PCA to ``bits`` dimensions, then the rotation
that brings the projected data closest to the corners of the hypercube."""

from __future__ import annotations

import numpy as np

from lookalike.errors import HashingError
from lookalike.hashing.head import HashHead, Preprocessing, linear_head
from lookalike.hashing.training import torch_threads


def itq_rotation(projected: np.ndarray, *, iterations: int = 50, seed: int = 0) -> np.ndarray:
    """The orthogonal R minimising ``||sign(V R) - V R||``, alternating between the codes and
    the orthogonal Procrustes solution for R."""
    import torch

    bits = projected.shape[1]
    rng = np.random.default_rng(seed)
    data = torch.from_numpy(np.asarray(projected, dtype=np.float64))
    rotation: torch.Tensor
    rotation, _ = torch.linalg.qr(torch.from_numpy(rng.standard_normal((bits, bits))))
    for _ in range(iterations):
        codes = torch.where(data @ rotation >= 0, 1.0, -1.0).to(torch.float64)
        left, _, right = torch.linalg.svd(data.T @ codes)
        rotation = left @ right
    return rotation.numpy()


def principal_directions(centred: np.ndarray, count: int) -> np.ndarray:
    """[dim, count]: the leading eigenvectors of the covariance, largest first."""
    import torch

    values: torch.Tensor
    vectors: torch.Tensor
    values, vectors = torch.linalg.eigh(torch.from_numpy(centred.T @ centred))
    return vectors[:, torch.argsort(values, descending=True)[:count]].numpy()


def train_itq(
    raw: np.ndarray, bits: int, model_key: str, *, iterations: int = 50, seed: int = 0
) -> HashHead:
    """Unsupervised ITQ on the preprocessed training vectors (labels are not used)."""
    preprocessing = Preprocessing.fit(raw)
    centred = preprocessing(raw).astype(np.float64)
    if bits > min(centred.shape):
        raise HashingError(
            f"ITQ needs at least as many training vectors and dimensions as bits: "
            f"{bits} bits from {centred.shape[0]} vectors of dimension {centred.shape[1]}"
        )
    # LAPACK on one thread: its multi-threaded eigensolver was 30x slower on a busy machine.
    with torch_threads(1):
        pca = principal_directions(centred, bits)
        rotation = itq_rotation(centred @ pca, iterations=iterations, seed=seed)
    info = {"iterations": iterations, "seed": seed}
    return linear_head("itq", bits, model_key, preprocessing, pca @ rotation, info)
