"""Ranking metrics computed from full score matrices (every query against every database item)."""

from __future__ import annotations

import numpy as np


def average_precision(relevant_in_rank_order: np.ndarray) -> float:
    """AP of one ranked list: the mean of precision@i over the ranks i holding a relevant item.

    Returns 0.0 when nothing in the list is relevant.
    """
    relevant = np.asarray(relevant_in_rank_order, dtype=bool)
    total = int(relevant.sum())
    if total == 0:
        return 0.0
    hits = np.cumsum(relevant)
    precision = hits / np.arange(1, len(relevant) + 1)
    return float(precision[relevant].sum() / total)


def mean_average_precision(
    scores: np.ndarray,
    query_labels: np.ndarray,
    database_labels: np.ndarray,
    *,
    higher_is_better: bool = True,
) -> float:
    """mAP over queries, relevant meaning "same label", ranking the whole database per query."""
    scores = np.asarray(scores)
    database_labels = np.asarray(database_labels)
    order = np.argsort(-scores if higher_is_better else scores, axis=1, kind="stable")
    aps = [
        average_precision(database_labels[order[i]] == label)
        for i, label in enumerate(np.asarray(query_labels))
    ]
    return float(np.mean(aps)) if aps else 0.0
