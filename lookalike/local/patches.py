"""Transformer patch-token matching: the local method for ViT-family encoders.

A ViT (ViT, DINOv2, BEiT, CLIP's vision tower) already computes one token per image patch on a
regular grid. Stored compactly (unit vectors as float16, at most ``max_tokens`` of them, each
with its grid cell), they let re-ranking match a query's patches to a candidate's by mutual
nearest neighbours and verify the matches geometrically with RANSAC on the patch centres
(an affine map in grid units, which also covers mirrored copies), without decoding database
images or running SIFT.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lookalike.local.errors import CorruptLocalFeaturesError, LocalFeaturesError
from lookalike.local.matching import RerankRule

_MAGIC = b"LKPT"
_VERSION = 1
_HEADER = struct.Struct("<4sBHHHH")  # magic, version, tokens, dim, grid rows, grid columns
DEFAULT_MAX_TOKENS = 256
PATCH_KIND_PREFIX = "patches"
# Patch grids are coarse (14-16 cells a side), so a few cells of agreement already mean a lot.
PATCH_RULE = RerankRule(min_inliers=16, cap=64, weight=0.9, ratio=1.0, threshold=1.0)


def patch_kind(max_tokens: int = DEFAULT_MAX_TOKENS) -> str:
    """The catalog name of patch tokens stored with this bound."""
    return f"{PATCH_KIND_PREFIX}-f16-{max_tokens}"


@dataclass(frozen=True)
class PatchTokens:
    """Unit patch tokens [n, dim] and their grid cells [n, 2] (row, column) on a grid of
    ``grid`` (rows, columns)."""

    tokens: np.ndarray
    cells: np.ndarray
    grid: tuple[int, int]

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def from_encoder_output(
        cls, tokens: np.ndarray, max_tokens: int = DEFAULT_MAX_TOKENS
    ) -> PatchTokens:
        """One image's [patches, dim] tokens on a square grid, keeping the ``max_tokens``
        with the largest norm (the most distinctive), unit-normalised."""
        tokens = np.asarray(tokens, dtype=np.float32)
        side = math.isqrt(len(tokens))
        if tokens.ndim != 2 or side * side != len(tokens):
            raise LocalFeaturesError(
                f"expected [patches, dim] on a square grid, got {tokens.shape}"
            )
        norms = np.linalg.norm(tokens, axis=1)
        keep = np.sort(np.argsort(-norms, kind="stable")[:max_tokens])
        cells = np.stack([keep // side, keep % side], axis=1).astype(np.int64)
        unit = tokens[keep] / np.maximum(norms[keep, None], 1e-12)
        return cls(unit.astype(np.float16).astype(np.float32), cells, (side, side))

    def to_bytes(self) -> bytes:
        """Header, uint8 cells, float16 tokens."""
        header = _HEADER.pack(_MAGIC, _VERSION, len(self), self.tokens.shape[1], *self.grid)
        cells = self.cells.astype(np.uint8).tobytes()
        return header + cells + self.tokens.astype("<f2").tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> PatchTokens:
        """Inverse of ``to_bytes``; raises ``CorruptLocalFeaturesError`` on bad data."""
        try:
            magic, version, count, dim, rows, columns = _HEADER.unpack_from(data)
        except struct.error as error:
            raise CorruptLocalFeaturesError(f"patch tokens: {error}") from error
        expected = _HEADER.size + 2 * count + 2 * count * dim
        if magic != _MAGIC or version != _VERSION or len(data) != expected:
            raise CorruptLocalFeaturesError("stored patch tokens are not in the expected format")
        offset = _HEADER.size
        cells = np.frombuffer(data, np.uint8, 2 * count, offset).reshape(count, 2)
        tokens = np.frombuffer(data, "<f2", count * dim, offset + 2 * count).reshape(count, dim)
        return cls(tokens.astype(np.float32), cells.astype(np.int64), (rows, columns))


def mutual_patch_matches(query: PatchTokens, candidate: PatchTokens) -> np.ndarray:
    """int [m, 2] (query, candidate) rows that are each other's most similar token."""
    if len(query) == 0 or len(candidate) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    similarity = query.tokens @ candidate.tokens.T
    forward = similarity.argmax(axis=1)
    backward = similarity.argmax(axis=0)
    rows = np.flatnonzero(backward[forward] == np.arange(len(query)))
    return np.stack([rows, forward[rows]], axis=1)


def verify_patches(
    query: PatchTokens, candidate: PatchTokens, rule: RerankRule = PATCH_RULE
) -> int:
    """Inliers of an affine map between the patch centres of the mutual matches (both grids
    scaled to the unit square), by RANSAC; 0 when fewer than 3 matches."""
    from lookalike.local.features import opencv

    pairs = mutual_patch_matches(query, candidate)
    if len(pairs) < 3:
        return 0
    cv2 = opencv()
    source = (query.cells[pairs[:, 0], ::-1] + 0.5) * (candidate.grid[0] / query.grid[0])
    target = candidate.cells[pairs[:, 1], ::-1] + 0.5
    _, mask = cv2.estimateAffine2D(
        source.astype(np.float32).reshape(-1, 1, 2),
        target.astype(np.float32).reshape(-1, 1, 2),
        method=cv2.RANSAC,
        ransacReprojThreshold=rule.threshold,
        maxIters=500,
        confidence=0.99,
        refineIters=0,
    )
    return 0 if mask is None else int(mask.sum())


def rerank_patches(
    query: PatchTokens,
    candidates: Sequence[tuple[int, float, PatchTokens | None]],
    rule: RerankRule = PATCH_RULE,
) -> np.ndarray:
    """New scores of (id, cosine, stored tokens) candidates: the cosine raised by the verified
    patch matches (``rule.score``); candidates without tokens keep their cosine."""
    return np.array(
        [
            cosine if tokens is None else rule.score(cosine, verify_patches(query, tokens, rule))
            for _, cosine, tokens in candidates
        ],
        dtype=np.float64,
    )


def max_tokens_of(kind: str) -> int:
    """The token bound a stored kind's name records (``patches-f16-256`` -> 256)."""
    try:
        return int(kind.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return DEFAULT_MAX_TOKENS
