"""Retrieval quality of binary codes: mAP and precision-recall by Hamming ranking."""

from __future__ import annotations

import numpy as np

from lookalike.evaluation.metrics import mean_average_precision, precision_recall_curve
from lookalike.knn.binary import hamming_matrix


def tie_breaking_order(n: int, seed: int = 0) -> np.ndarray:
    """A fixed random order of the database. Hamming distances tie a lot (64 bits give 65
    values), and the metrics break ties by database order: a database sorted by label would
    otherwise rank same-label items first among equals and inflate the scores."""
    return np.random.default_rng(seed).permutation(n)


def hamming_map(
    query_codes: np.ndarray,
    query_labels: np.ndarray,
    database_codes: np.ndarray,
    database_labels: np.ndarray,
    *,
    seed: int = 0,
) -> float:
    """mAP over the whole database ranked by Hamming distance, relevant = same label, ties
    broken in a seeded random order."""
    order = tie_breaking_order(len(database_codes), seed)
    distances = hamming_matrix(query_codes, database_codes[order])
    return mean_average_precision(
        distances, np.asarray(query_labels), np.asarray(database_labels)[order],
        higher_is_better=False,
    )  # fmt: skip


def hamming_pr_curve(
    query_codes: np.ndarray,
    query_labels: np.ndarray,
    database_codes: np.ndarray,
    database_labels: np.ndarray,
    *,
    recall_levels: int = 21,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(recall levels, mean interpolated precision) of the Hamming ranking."""
    order = tie_breaking_order(len(database_codes), seed)
    distances = hamming_matrix(query_codes, database_codes[order])
    return precision_recall_curve(
        distances,
        np.asarray(query_labels),
        np.asarray(database_labels)[order],
        recall_levels=recall_levels,
        higher_is_better=False,
    )
