"""What a search returns, and the one place where a threshold turns weak results away."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lookalike.catalog import ImageRecord
from lookalike.knn.base import Metric

if TYPE_CHECKING:
    from lookalike.local.matching import EstimatedTransform


@dataclass(frozen=True)
class SearchResult:
    """One hit: the catalog id, where the file is, its score and metadata. A copy search
    (``copies=True``) also gives ``copy_probability``, how likely this image is the source
    of the query (calibrated), and ``transform``, how the query was made from it."""

    id: int
    path: str
    score: float
    metadata: dict[str, Any] = field(default_factory=dict)
    width: int = 0
    height: int = 0
    copy_probability: float | None = None
    transform: EstimatedTransform | None = None

    @classmethod
    def from_record(cls, record: ImageRecord, score: float) -> SearchResult:
        """The result for a catalog record scored ``score``."""
        return cls(
            id=int(record.id or 0),
            path=record.path,
            score=float(score),
            metadata=dict(record.metadata),
            width=record.width,
            height=record.height,
        )


@dataclass(frozen=True)
class SearchResponse:
    """Results of one query, best first. ``no_close_match`` is set when a threshold removed
    every candidate; ``best_score`` then says how close the nearest one was. ``partial`` is
    set when part of a sharded index did not answer (``missing_shards`` names those shards):
    the results are the best of what did."""

    results: list[SearchResult]
    metric: Metric
    threshold: float | None = None
    best_score: float | None = None
    partial: bool = False
    missing_shards: tuple[int, ...] = ()

    @property
    def no_close_match(self) -> bool:
        return not self.results

    def __iter__(self) -> Iterator[SearchResult]:
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, position: int) -> SearchResult:
        return self.results[position]


def passes(score: float, threshold: float | None, metric: Metric) -> bool:
    """Whether ``score`` is close enough: at least ``threshold`` for similarities (cosine,
    dot), at most ``threshold`` for distances (euclidean)."""
    if threshold is None:
        return True
    return score >= threshold if metric.higher_is_better else score <= threshold


def best_first(results: list[SearchResult], metric: Metric) -> list[SearchResult]:
    """``results`` sorted best first for ``metric`` (stable, so ties keep their order)."""
    return sorted(results, key=lambda r: r.score, reverse=metric.higher_is_better)


def cut(
    results: list[SearchResult], metric: Metric, k: int, threshold: float | None
) -> SearchResponse:
    """The response of ranked ``results``: the first ``k`` that pass ``threshold``, with the
    best score before the threshold applied (so "no close match" can say how close)."""
    head = results[:k]
    best = head[0].score if head else None
    kept = [r for r in head if passes(r.score, threshold, metric)]
    return SearchResponse(kept, metric, threshold, best)
