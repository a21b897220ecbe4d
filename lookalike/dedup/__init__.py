"""Near-duplicate detection across a collection: groups of duplicates, each with a suggested
keeper, found through indexes rather than an N x N comparison; and moving the others aside.
New images are checked against a reference with :func:`find_in_reference`."""

from lookalike.dedup.against import (
    AgainstReport,
    QueryResult,
    ReferenceMatch,
    find_in_reference,
)
from lookalike.dedup.finder import (
    DEFAULT_METHOD,
    DEFAULT_MIN_INLIERS,
    DEFAULT_THRESHOLDS,
    DedupReport,
    DuplicateGroup,
    DuplicateImage,
    Method,
    find_duplicates,
    keeper_order,
)
from lookalike.dedup.grouping import hamming_pairs, neighbour_pairs, star_groups, union_find_groups
from lookalike.dedup.perceptual import PerceptualHash, hamming, phash

__all__ = [
    "DEFAULT_METHOD",
    "DEFAULT_MIN_INLIERS",
    "DEFAULT_THRESHOLDS",
    "AgainstReport",
    "DedupReport",
    "DuplicateGroup",
    "DuplicateImage",
    "Method",
    "PerceptualHash",
    "QueryResult",
    "ReferenceMatch",
    "find_duplicates",
    "find_in_reference",
    "hamming",
    "hamming_pairs",
    "keeper_order",
    "neighbour_pairs",
    "phash",
    "star_groups",
    "union_find_groups",
]
