"""Ranking metrics computed from full score matrices (every query against every database item)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lookalike.errors import LookalikeError


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


# ---------------------------------------------------------------------------------------------
# Vectorised metrics at k, mAP@k, precision-recall curves and leave-one-out exclusion.
#
# Conventions shared by everything below:
# - ``scores`` is [queries x database]; ``higher_is_better`` says whether they are similarities
#   (cosine, dot) or distances (euclidean). Ties keep database order (stable sort); NaN scores
#   rank last among the valid candidates.
# - ``exclude`` is an optional boolean [queries x database] mask of pairs that are not
#   candidates at all (leave-one-out: a query never retrieves itself). Excluded pairs are
#   neither ranked nor counted as relevant.
# - "Relevant" means same label. A query with no relevant candidate has undefined recall and
#   AP, so every mean is over the queries with at least one relevant candidate; how many were
#   left out is reported (``RetrievalMetrics.queries_without_relevant``).
# ---------------------------------------------------------------------------------------------

DEFAULT_KS: tuple[int, ...] = (1, 5, 10, 20, 100)
SCORE_METRICS: tuple[str, ...] = ("cosine", "euclidean", "dot")

# Rows per chunk are chosen so one chunk holds about this many [row x database] cells, which
# keeps the temporaries (order, cumulative hits, precision) to a few tens of MB.
_CHUNK_CELLS = 2_000_000


@dataclass(frozen=True)
class QueryMetrics:
    """Per-query values (one row per query) from which every summary metric is a mean.

    ``hits_at_k``, ``precision_at_k``, ``recall_at_k``, ``f1_at_k`` and ``ap_at_k`` have one
    column per entry of ``ks``; ``interpolated_precision`` one per entry of ``recall_levels``.
    Rows of queries without a relevant candidate hold NaN where a value is undefined.
    """

    ks: tuple[int, ...]
    recall_levels: np.ndarray
    num_relevant: np.ndarray
    num_candidates: np.ndarray
    hits_at_k: np.ndarray
    precision_at_k: np.ndarray
    recall_at_k: np.ndarray
    f1_at_k: np.ndarray
    average_precision: np.ndarray
    ap_at_k: np.ndarray
    interpolated_precision: np.ndarray

    @property
    def evaluated(self) -> np.ndarray:
        """Mask of the queries that count: those with at least one relevant candidate."""
        return self.num_relevant > 0


@dataclass(frozen=True)
class RetrievalMetrics:
    """Means over the evaluated queries (see the module conventions)."""

    ks: tuple[int, ...]
    precision_at_k: dict[int, float]
    recall_at_k: dict[int, float]
    f1_at_k: dict[int, float]
    mean_ap: float
    map_at_k: dict[int, float]
    recall_levels: np.ndarray
    interpolated_precision: np.ndarray
    num_queries: int
    num_database: int
    queries_without_relevant: int

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (dictionary keys at k become strings, as JSON requires)."""
        return {
            "map": self.mean_ap,
            "map_at_k": {str(k): v for k, v in self.map_at_k.items()},
            "precision_at_k": {str(k): v for k, v in self.precision_at_k.items()},
            "recall_at_k": {str(k): v for k, v in self.recall_at_k.items()},
            "f1_at_k": {str(k): v for k, v in self.f1_at_k.items()},
            "pr_curve": {
                "recall": [float(r) for r in self.recall_levels],
                "interpolated_precision": [float(p) for p in self.interpolated_precision],
            },
            "num_queries": self.num_queries,
            "num_database": self.num_database,
            "queries_without_relevant": self.queries_without_relevant,
        }


def _check_inputs(
    scores: np.ndarray,
    query_labels: np.ndarray,
    database_labels: np.ndarray,
    exclude: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    scores = np.asarray(scores)
    query_labels = np.asarray(query_labels)
    database_labels = np.asarray(database_labels)
    if scores.ndim != 2:
        raise LookalikeError(f"scores must be a [queries x database] matrix, got {scores.shape}")
    if scores.shape != (len(query_labels), len(database_labels)):
        raise LookalikeError(
            f"scores of shape {scores.shape} do not match {len(query_labels)} query labels "
            f"and {len(database_labels)} database labels"
        )
    if exclude is not None:
        exclude = np.asarray(exclude, dtype=bool)
        if exclude.shape != scores.shape:
            raise LookalikeError(
                f"exclude mask of shape {exclude.shape} does not match scores {scores.shape}"
            )
    return scores, query_labels, database_labels, exclude


def _check_ks(ks: Sequence[int] | int) -> tuple[int, ...]:
    values = (ks,) if isinstance(ks, (int, np.integer)) else tuple(ks)
    if not values or any(int(k) < 1 for k in values):
        raise LookalikeError(f"k must be a positive integer, got {ks!r}")
    return tuple(int(k) for k in values)


def _recall_levels(levels: int | Sequence[float] | np.ndarray) -> np.ndarray:
    if isinstance(levels, (int, np.integer)):
        if levels < 2:
            raise LookalikeError(f"need at least 2 recall levels, got {levels}")
        return np.linspace(0.0, 1.0, int(levels))
    values = np.asarray(levels, dtype=np.float64)
    if values.ndim != 1 or values.size == 0 or values.min() < 0 or values.max() > 1:
        raise LookalikeError("recall levels must be a non-empty list of values in [0, 1]")
    return values


def _ranked_relevance(
    scores: np.ndarray,
    query_labels: np.ndarray,
    database_labels: np.ndarray,
    exclude: np.ndarray | None,
    higher_is_better: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Relevance of each row's candidates in rank order (excluded pairs last and irrelevant),
    and each row's number of candidates."""
    keys = np.array(scores, dtype=np.float64)  # a copy: it is modified below
    if higher_is_better:
        keys = -keys
    keys[np.isnan(keys)] = np.inf  # NaN scores: worst among the valid candidates
    if exclude is not None:
        keys[exclude] = np.nan  # argsort puts NaN after +inf, so excluded pairs come last
    order = np.argsort(keys, axis=1, kind="stable")
    relevant = database_labels[order] == query_labels[:, None]
    num_candidates = np.full(len(keys), keys.shape[1], dtype=np.int64)
    if exclude is not None:
        valid = ~np.take_along_axis(exclude, order, axis=1)
        relevant &= valid
        num_candidates = valid.sum(axis=1)
    return relevant, num_candidates


def query_metrics(
    scores: np.ndarray,
    query_labels: np.ndarray,
    database_labels: np.ndarray,
    *,
    ks: Sequence[int] | int = DEFAULT_KS,
    higher_is_better: bool = True,
    exclude: np.ndarray | None = None,
    recall_levels: int | Sequence[float] | np.ndarray = 11,
) -> QueryMetrics:
    """Every per-query value from one sort of each row of ``scores``.

    Definitions, for a query with ``R`` relevant candidates among ``N`` candidates, ``rel_i``
    the relevance at rank ``i`` and ``P@i`` the precision over ranks ``1..i``:

    - precision@k = hits in the top k / min(k, N) (so a database smaller than k is not
      penalised for the ranks it cannot fill); recall@k = hits in the top k / R;
      F1@k = the harmonic mean of the two (0 when both are 0).
    - AP = sum_i P@i * rel_i / R over the whole ranking.
    - AP@k = sum_{i<=k} P@i * rel_i / min(k, R): normalised by the best number of hits
      possible in k ranks, so a perfect top k scores 1 even when R > k.
    - interpolated precision at recall level r = max(P@i for ranks i whose recall >= r),
      the classic (PASCAL VOC / TREC) interpolation; ``recall_levels`` is a count of evenly
      spaced levels from 0 to 1 or an explicit list.
    """
    scores, query_labels, database_labels, exclude = _check_inputs(
        scores, query_labels, database_labels, exclude
    )
    ks = _check_ks(ks)
    levels = _recall_levels(recall_levels)
    num_queries, num_database = scores.shape
    k_array = np.array(ks)
    parts: list[dict[str, np.ndarray]] = []
    rows_per_chunk = max(1, _CHUNK_CELLS // max(1, num_database))
    for start in range(0, num_queries, rows_per_chunk):
        stop = min(num_queries, start + rows_per_chunk)
        parts.append(
            _chunk_metrics(
                scores[start:stop],
                query_labels[start:stop],
                database_labels,
                None if exclude is None else exclude[start:stop],
                higher_is_better,
                k_array,
                levels,
            )
        )
    if parts:
        merged = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    else:
        merged = {
            "num_relevant": np.zeros(0, dtype=np.int64),
            "num_candidates": np.zeros(0, dtype=np.int64),
            "hits_at_k": np.zeros((0, len(ks)), dtype=np.int64),
            "precision_at_k": np.zeros((0, len(ks))),
            "recall_at_k": np.zeros((0, len(ks))),
            "f1_at_k": np.zeros((0, len(ks))),
            "average_precision": np.zeros(0),
            "ap_at_k": np.zeros((0, len(ks))),
            "interpolated_precision": np.zeros((0, len(levels))),
        }
    return QueryMetrics(ks=ks, recall_levels=levels, **merged)


def _chunk_metrics(
    scores: np.ndarray,
    query_labels: np.ndarray,
    database_labels: np.ndarray,
    exclude: np.ndarray | None,
    higher_is_better: bool,
    ks: np.ndarray,
    levels: np.ndarray,
) -> dict[str, np.ndarray]:
    rows, width = scores.shape
    if width == 0:
        nan_k = np.full((rows, len(ks)), np.nan)
        return {
            "num_relevant": np.zeros(rows, dtype=np.int64),
            "num_candidates": np.zeros(rows, dtype=np.int64),
            "hits_at_k": np.zeros((rows, len(ks)), dtype=np.int64),
            "precision_at_k": nan_k,
            "recall_at_k": nan_k.copy(),
            "f1_at_k": nan_k.copy(),
            "average_precision": np.full(rows, np.nan),
            "ap_at_k": nan_k.copy(),
            "interpolated_precision": np.full((rows, len(levels)), np.nan),
        }
    relevant, num_candidates = _ranked_relevance(
        scores, query_labels, database_labels, exclude, higher_is_better
    )
    hits = np.cumsum(relevant, axis=1)
    num_relevant = hits[:, -1].astype(np.int64)
    precision = hits / np.arange(1, width + 1)
    gained = np.cumsum(np.where(relevant, precision, 0.0), axis=1)
    last = np.minimum(ks, width) - 1
    hits_at_k = hits[:, last].astype(np.int64)

    with np.errstate(divide="ignore", invalid="ignore"):
        r = num_relevant[:, None].astype(np.float64)
        p_at_k = hits_at_k / np.minimum(ks[None, :], num_candidates[:, None])
        r_at_k = hits_at_k / r
        f1 = np.where(p_at_k + r_at_k > 0, 2 * p_at_k * r_at_k / (p_at_k + r_at_k), 0.0)
        ap = gained[:, -1] / num_relevant
        ap_at_k = gained[:, last] / np.minimum(ks[None, :], r)

    undefined = num_relevant == 0
    for values in (p_at_k, r_at_k, f1, ap_at_k):
        values[undefined] = np.nan
    ap[undefined] = np.nan
    return {
        "num_relevant": num_relevant,
        "num_candidates": num_candidates.astype(np.int64),
        "hits_at_k": hits_at_k,
        "precision_at_k": p_at_k,
        "recall_at_k": r_at_k,
        "f1_at_k": f1,
        "average_precision": ap,
        "ap_at_k": ap_at_k,
        "interpolated_precision": _interpolated_precision(relevant, precision, hits, levels),
    }


def _interpolated_precision(
    relevant: np.ndarray, precision: np.ndarray, hits: np.ndarray, levels: np.ndarray
) -> np.ndarray:
    """[rows x levels] max precision at any rank whose recall reaches each level."""
    rows = len(relevant)
    num_relevant = hits[:, -1]
    result = np.full((rows, len(levels)), np.nan)
    if rows == 0:
        return result
    # envelope[i] = max precision at rank >= i. Ranks past the last valid candidate only add
    # misses, so their precision never exceeds what came before and cannot distort the envelope.
    envelope = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
    # Recall >= r first holds at the rank of the ceil(r * R)-th relevant item (recall only
    # grows); the tolerance stops 0.3 * 10 = 3.0000000000000004 from asking for a 4th hit.
    needed = np.ceil(levels[None, :] * num_relevant[:, None] - 1e-9).astype(np.int64)
    needed = np.clip(needed, 0, num_relevant[:, None])
    hit_cols = np.nonzero(relevant)[1]  # row-major: each row's hits in rank order
    offsets = np.concatenate([[0], np.cumsum(num_relevant)[:-1]])
    index = offsets[:, None] + np.maximum(needed, 1) - 1
    has = num_relevant > 0
    rank = np.zeros_like(needed)
    if hit_cols.size:
        rank[has] = hit_cols[index[has]]
    rank[needed == 0] = 0  # recall >= 0 holds from the first rank
    result[has] = np.take_along_axis(envelope[has], rank[has], axis=1)
    return result


def _mean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else 0.0


def summarize(per_query: QueryMetrics, num_database: int) -> RetrievalMetrics:
    """Means over the evaluated queries of a :class:`QueryMetrics`."""
    evaluated = per_query.evaluated
    ks = per_query.ks

    def at_k(matrix: np.ndarray) -> dict[int, float]:
        return {k: _mean(matrix[evaluated, j]) for j, k in enumerate(ks)}

    curve = per_query.interpolated_precision[evaluated]
    mean_curve = curve.mean(axis=0) if len(curve) else np.zeros(len(per_query.recall_levels))
    return RetrievalMetrics(
        ks=ks,
        precision_at_k=at_k(per_query.precision_at_k),
        recall_at_k=at_k(per_query.recall_at_k),
        f1_at_k=at_k(per_query.f1_at_k),
        mean_ap=_mean(per_query.average_precision[evaluated]),
        map_at_k=at_k(per_query.ap_at_k),
        recall_levels=per_query.recall_levels,
        interpolated_precision=mean_curve,
        num_queries=len(evaluated),
        num_database=num_database,
        queries_without_relevant=int((~evaluated).sum()),
    )


def retrieval_metrics(
    scores: np.ndarray,
    query_labels: np.ndarray,
    database_labels: np.ndarray,
    *,
    ks: Sequence[int] | int = DEFAULT_KS,
    higher_is_better: bool = True,
    exclude: np.ndarray | None = None,
    recall_levels: int | Sequence[float] | np.ndarray = 11,
) -> RetrievalMetrics:
    """Precision/recall/F1@k, mAP, mAP@k and the mean interpolated PR curve in one pass.

    See :func:`query_metrics` for the definitions; means are over the queries that have at
    least one relevant candidate.
    """
    per_query = query_metrics(
        scores,
        query_labels,
        database_labels,
        ks=ks,
        higher_is_better=higher_is_better,
        exclude=exclude,
        recall_levels=recall_levels,
    )
    return summarize(per_query, np.asarray(scores).shape[1] if np.ndim(scores) == 2 else 0)


def _one_k(
    field: str,
    scores: np.ndarray,
    query_labels: np.ndarray,
    database_labels: np.ndarray,
    k: int,
    higher_is_better: bool,
    exclude: np.ndarray | None,
) -> float:
    metrics = retrieval_metrics(
        scores,
        query_labels,
        database_labels,
        ks=k,
        higher_is_better=higher_is_better,
        exclude=exclude,
    )
    values: dict[int, float] = getattr(metrics, field)
    return values[k]


def precision_at_k(
    scores: np.ndarray,
    query_labels: np.ndarray,
    database_labels: np.ndarray,
    k: int,
    *,
    higher_is_better: bool = True,
    exclude: np.ndarray | None = None,
) -> float:
    """Mean precision@k: hits in the top k over min(k, number of candidates)."""
    return _one_k(
        "precision_at_k", scores, query_labels, database_labels, k, higher_is_better, exclude
    )


def recall_at_k(
    scores: np.ndarray,
    query_labels: np.ndarray,
    database_labels: np.ndarray,
    k: int,
    *,
    higher_is_better: bool = True,
    exclude: np.ndarray | None = None,
) -> float:
    """Mean recall@k: hits in the top k over the query's number of relevant candidates."""
    return _one_k(
        "recall_at_k", scores, query_labels, database_labels, k, higher_is_better, exclude
    )


def f1_at_k(
    scores: np.ndarray,
    query_labels: np.ndarray,
    database_labels: np.ndarray,
    k: int,
    *,
    higher_is_better: bool = True,
    exclude: np.ndarray | None = None,
) -> float:
    """Mean over queries of each query's F1@k (not the F1 of the mean precision and recall)."""
    return _one_k("f1_at_k", scores, query_labels, database_labels, k, higher_is_better, exclude)


def map_at_k(
    scores: np.ndarray,
    query_labels: np.ndarray,
    database_labels: np.ndarray,
    k: int | None = None,
    *,
    higher_is_better: bool = True,
    exclude: np.ndarray | None = None,
) -> float:
    """mAP@k with AP@k normalised by min(k, R); ``k=None`` is the full mAP (with ``exclude``,
    unlike :func:`mean_average_precision`)."""
    metrics = retrieval_metrics(
        scores,
        query_labels,
        database_labels,
        ks=k or 1,
        higher_is_better=higher_is_better,
        exclude=exclude,
    )
    return metrics.mean_ap if k is None else metrics.map_at_k[k]


def precision_recall_curve(
    scores: np.ndarray,
    query_labels: np.ndarray,
    database_labels: np.ndarray,
    *,
    recall_levels: int | Sequence[float] | np.ndarray = 11,
    higher_is_better: bool = True,
    exclude: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(recall levels, mean interpolated precision at each level) over the evaluated queries."""
    metrics = retrieval_metrics(
        scores,
        query_labels,
        database_labels,
        ks=1,
        recall_levels=recall_levels,
        higher_is_better=higher_is_better,
        exclude=exclude,
    )
    return metrics.recall_levels, metrics.interpolated_precision


def same_item_mask(query_ids: np.ndarray, database_ids: np.ndarray) -> np.ndarray:
    """The ``exclude`` mask of leave-one-out: True where a query and a database item are the
    same item (equal ids, e.g. dataset indices or paths)."""
    mask: np.ndarray = np.asarray(query_ids)[:, None] == np.asarray(database_ids)[None, :]
    return mask


def score_matrix(
    query_vectors: np.ndarray, database_vectors: np.ndarray, metric: str = "cosine"
) -> tuple[np.ndarray, bool]:
    """[queries x database] float32 scores and whether higher is better.

    cosine: dot product of L2-normalised vectors (zero vectors stay zero); dot: raw dot
    product; euclidean: L2 distance (lower is better).
    """
    if metric not in SCORE_METRICS:
        raise LookalikeError(
            f"unknown metric {metric!r}; expected one of {', '.join(SCORE_METRICS)}"
        )
    queries = np.asarray(query_vectors, dtype=np.float32)
    database = np.asarray(database_vectors, dtype=np.float32)
    if queries.ndim != 2 or database.ndim != 2 or queries.shape[1] != database.shape[1]:
        raise LookalikeError(
            f"query vectors {queries.shape} and database vectors {database.shape} must be 2-D "
            "with the same dimension"
        )
    if metric == "cosine":
        queries = _unit(queries)
        database = _unit(database)
        return queries @ database.T, True
    if metric == "dot":
        return queries @ database.T, True
    squared = (
        np.einsum("ij,ij->i", queries, queries)[:, None]
        + np.einsum("ij,ij->i", database, database)[None, :]
        - 2.0 * (queries @ database.T)
    )
    return np.sqrt(np.maximum(squared, 0.0)).astype(np.float32), False


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit: np.ndarray = vectors / np.maximum(norms, 1e-12)
    return unit


# ---------------------------------------------------------------------------------------------
# Micro-averaged AP over pooled predictions (copy detection, as in DISC21 / ISC 2021).
# ---------------------------------------------------------------------------------------------


def micro_precision_recall(
    scores: np.ndarray, is_match: np.ndarray, num_positives: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and threshold after each prediction of the pooled ranking.

    All (query, database item) predictions of all queries are ranked together by score
    (higher is more similar). Ties put non-matches first, the worst case, so constant scores
    cannot buy a good AP. Recall is over ``num_positives`` (the ground-truth pairs, including
    those that no prediction found).
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    is_match = np.asarray(is_match, dtype=bool).ravel()
    if scores.shape != is_match.shape:
        raise LookalikeError(f"{scores.size} scores but {is_match.size} match flags")
    if num_positives < 1:
        raise LookalikeError(f"num_positives must be at least 1, got {num_positives}")
    order = np.lexsort((is_match, -scores))  # by score descending, then non-matches first
    true_positives = np.cumsum(is_match[order])
    precision = true_positives / np.arange(1, len(order) + 1)
    recall = true_positives / num_positives
    return precision, recall, scores[order]


def micro_average_precision(scores: np.ndarray, is_match: np.ndarray, num_positives: int) -> float:
    """Non-interpolated AP of the pooled ranking: sum of precision at each true match divided
    by ``num_positives`` (the DISC21 "micro AP")."""
    precision, recall, _ = micro_precision_recall(scores, is_match, num_positives)
    if precision.size == 0:
        return 0.0
    gains = np.diff(recall, prepend=0.0)
    return float((gains * precision).sum())


def recall_at_precision(precision: np.ndarray, recall: np.ndarray, target: float = 0.9) -> float:
    """The highest recall of any operating point whose precision is at least ``target``
    (0 when none is)."""
    reached = np.asarray(precision) >= target
    return float(np.asarray(recall)[reached].max()) if reached.any() else 0.0
