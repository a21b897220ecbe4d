"""Local features (SIFT keypoints, RootSIFT descriptors) and re-ranking by geometric
verification. Needs OpenCV (``opencv-python-headless``), imported only when features are
extracted or matched."""

from lookalike.local.errors import CorruptLocalFeaturesError, LocalFeaturesError
from lookalike.local.features import (
    DATABASE_CONFIG,
    QUERY_CONFIG,
    LocalFeatures,
    SiftConfig,
    extract,
)
from lookalike.local.matching import DEFAULT_RULE, RerankRule, Verification, rerank, verify
from lookalike.local.rerank import LocalReranker

__all__ = [
    "DATABASE_CONFIG",
    "DEFAULT_RULE",
    "QUERY_CONFIG",
    "CorruptLocalFeaturesError",
    "LocalFeatures",
    "LocalFeaturesError",
    "LocalReranker",
    "RerankRule",
    "SiftConfig",
    "Verification",
    "extract",
    "rerank",
    "verify",
]
