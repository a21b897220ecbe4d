"""An index that learns its search knob on its own vectors: the cheapest value that reaches a
recall target (the ``auto`` spec, ``auto:recall=0.95`` by default).

How :func:`build_tuned` measures recall, held out as ``benchmarks/ann.py`` does:
- A seeded random sample of the vectors (``TUNING_SAMPLE``, at most a tenth of them) is held
  out: the index is built from the others first, so no query is its own neighbour and no
  graph node routes a walk straight to it. The sample is added afterwards.
- Each query's exact top-10 among the indexed vectors comes from a chunked scan. A hit
  counts when its exact score is at least the tenth best one (ties with duplicates count as
  found, as they would for the user).
- Knob values come from the index (:class:`~lookalike.knn.base.Tunable`). The search starts
  at the value the spec chose, binary-searches down while the target holds, else tries the
  largest value and binary-searches up. A value is accepted when its recall less
  ``CONFIDENCE`` standard errors reaches the target: a value whose true recall is just
  below the target passes about one time in forty.

When a structure misses the target even at its largest value (an HNSW graph on data whose
neighbours are nearly equidistant), the next structure that fits the memory budget is built
and tuned: after the chosen graph a better-built one (``STRONG_HNSW``), then an inverted file
with float16 vectors (whose ``nprobe`` reaches an exhaustive scan), then exact search; an
inverted file that needs every list is replaced by exact search too. If none fits, the last
one is kept at its best value and its recall, below the target, is recorded and logged: the
number is never hidden.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import numpy as np

from lookalike.errors import CorruptIndexError, IndexSpecError
from lookalike.knn import (
    DEFAULT_RECALL,
    choose_spec,
    create_index,
    hnsw_bytes,
    ivf_bytes,
    ivf_spec,
    parse_spec,
)
from lookalike.knn.base import Index, Metric, Tunable
from lookalike.knn.exact import score_matrix, top_k
from lookalike.knn.ivfpq import IVFPQIndex

RECALL_AT = 10
TUNING_SAMPLE = 500
# Accept a knob value when recall - CONFIDENCE * standard error >= target (one-sided ~97.7%).
CONFIDENCE = 2.0
# An index tuned on n vectors is tuned afresh (rebuilt) once it holds this many times more.
RETUNE_GROWTH = 2
_CHUNK = 4_096  # database rows scored per step of the exact scan (bounds its temporaries)
# The graph tried when the chosen (cheap) one misses the target: on the hard Gaussian mixture
# at 200k x 1280 it reached 0.965 at ef=512 (242 queries/s) where the cheap graph stopped at
# 0.60, 8x faster than the inverted file at the same recall, but it takes about 6x as long to
# build (benchmarks/results/ann_200k.md).
STRONG_HNSW = {"M": 32, "efConstruction": 200}
_TIE = 1e-5  # relative slack when comparing a hit's exact score with the tenth best
# Why a structure was tried and dropped (a fallback's "why").
MISSED = "missed the target at its largest value"
EXHAUSTIVE = "needed every list: exact search scans the same vectors faster"

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tuning:
    """What tuning measured, saved in the index file's metadata and shown by ``info`` and
    ``/stats``: the knob and its value, the recall@10 on ``sample`` held-out vectors and its
    standard error, the target, the structure kept and the ones that missed the target."""

    target: float
    recall: float
    knob: str | None = None  # None: exact search, nothing to tune
    value: int | None = None
    sample: int = 0
    stderr: float = 0.0
    reached: bool = True
    tuned_on: int = 0  # vectors in the index when it was tuned
    chosen: str = ""  # what choose_spec picked before any fallback
    spec: str = ""  # the structure kept, with its tuned value
    # the structures tried before this one: {"spec", "recall" (at its best value), "why"}
    fallbacks: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0  # spent measuring (exact neighbours and trial searches), not adding

    def needs_retuning(self, count: int) -> bool:
        """Whether an index tuned on ``tuned_on`` vectors that now holds ``count`` should be
        tuned again (exact search never needs it)."""
        return self.knob is not None and count >= RETUNE_GROWTH * max(self.tuned_on, 1)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the ``index_tuning`` of ``/stats``)."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> Tuning | None:
        """The tuning an index file recorded, None when it recorded none; CorruptIndexError
        when the record does not make sense."""
        if data is None:
            return None
        try:
            tuning = cls(**data)
            float(tuning.recall), float(tuning.target)
        except (TypeError, ValueError) as error:
            raise CorruptIndexError(f"bad tuning record in an index file: {error}") from error
        return tuning


def exact_bytes(n: int, dim: int) -> int:
    """Resident size of an n-vector exact index: float32 vectors and ids, plus 10%."""
    return int(n * (4 * dim + 8) * 1.1)


def build_tuned(
    ids: np.ndarray,
    vectors: np.ndarray,
    *,
    metric: str | Metric = Metric.COSINE,
    target: float = DEFAULT_RECALL,
    memory_budget_bytes: int,
    sample: int = TUNING_SAMPLE,
    seed: int = 0,
) -> tuple[Index, Tuning]:
    """An index of ``vectors`` under ``ids`` chosen by :func:`~lookalike.knn.choose_spec`,
    its knob tuned to reach recall@10 ``target`` on a held-out sample (see the module
    docstring), falling back to other structures when it cannot.

    A C-contiguous float32 ``vectors`` is reordered in place while building (the sample moves
    to the end) and put back before returning; anything else is converted to a copy first."""
    metric = Metric.parse(metric)
    if not 0 < target <= 1:
        raise IndexSpecError(f"auto: recall must be above 0 and at most 1, got {target}")
    ids = np.array(ids, dtype=np.int64).reshape(-1)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = len(vectors), vectors.shape[1]
    chosen = choose_spec(n, dim, memory_budget_bytes=memory_budget_bytes)
    held = min(sample, n // 10)
    if target >= 1 or chosen == "exact" or held < 1:
        exact = _filled("exact", ids, vectors, metric)
        return exact, Tuning(target, 1.0, tuned_on=n, chosen=chosen, spec=exact.spec)
    candidates = _candidates(chosen, n, dim, memory_budget_bytes)
    fallbacks: list[dict[str, Any]] = []
    with _held_out(ids, vectors, held, seed) as kept:
        probe = _Probe(vectors[kept:], vectors[:kept], ids[:kept], metric)
        for number, spec in enumerate(candidates):
            last = number == len(candidates) - 1
            if spec == "exact":
                exact = _filled("exact", ids, vectors, metric)
                tuning = Tuning(target, 1.0, tuned_on=n, chosen=chosen, spec=exact.spec)
                return exact, _with(tuning, fallbacks=fallbacks, seconds=probe.seconds)
            index = create_index(spec, dim=dim, metric=metric)
            reserve = getattr(index, "reserve", None)
            if callable(reserve):
                reserve(n)  # the held-out rows come in a second add: no regrowth then
            index.add(ids[:kept], vectors[:kept])
            if isinstance(index, Tunable):
                value, recall, stderr, reached = tune(index, probe, target)
                knob: str | None = index.tuning_knob
            else:  # nothing to turn: its recall is what it is
                recall, stderr = probe.recall(index)
                knob, value, reached = None, None, recall - CONFIDENCE * stderr >= target
            if reached and "exact" in candidates and _exhaustive(index):
                # Visiting every list is an exact scan with extra steps: scan exactly.
                fallbacks.append({"spec": index.spec, "recall": recall, "why": EXHAUSTIVE})
                del index
                continue
            if reached or last:
                index.add(ids[kept:], vectors[kept:])
                tuning = Tuning(
                    target, recall, knob, value, held, stderr, reached, n, chosen, index.spec,
                    fallbacks, probe.seconds,
                )  # fmt: skip
                if not reached:
                    _log.warning(
                        "the index %s reaches recall@10 %.3f, below the target %.3f, and no "
                        "structure that could reach it fits the memory budget",
                        index.spec, recall, target,
                    )  # fmt: skip
                return index, tuning
            fallbacks.append({"spec": index.spec, "recall": recall, "why": MISSED})
            _log.info("%s reaches recall@10 %.3f at most; trying the next structure", spec, recall)
            del index
    raise AssertionError("unreachable: the last candidate always returns")  # pragma: no cover


def tune(index: Tunable, probe: _Probe, target: float) -> tuple[int, float, float, bool]:
    """Set the cheapest knob value whose recall reaches ``target`` and return it with its
    recall, standard error and whether the target was reached (if not, the largest value is
    set). From the index's current value, a doubling search upwards (or a binary search
    downwards) over ``tuning_values``; recall is assumed not to fall as the value rises."""
    values = index.tuning_values()
    measured: dict[int, tuple[float, float]] = {}

    def passes(position: int) -> bool:
        value = values[position]
        if value not in measured:
            index.set_tuning(value)
            measured[value] = probe.recall(cast(Index, index))
        recall, stderr = measured[value]
        return recall - CONFIDENCE * stderr >= target

    last = len(values) - 1
    low = next((i for i, v in enumerate(values) if v >= index.tuning_value), last)
    if passes(low):
        low, high = -1, low  # the answer lies in (low, high]
    else:
        step = 1
        while True:
            high = min(low + step, last)
            if passes(high):
                break
            if high == last:
                index.set_tuning(values[last])
                return values[last], *measured[values[last]], False
            low, step = high, step * 2
    while high - low > 1:
        middle = (low + high) // 2
        if passes(middle):
            high = middle
        else:
            low = middle
    index.set_tuning(values[high])
    return values[high], *measured[values[high]], True


class _Probe:
    """Held-out queries, their exact neighbours among the indexed vectors, and recall@10 of
    an index's answers to them."""

    def __init__(
        self, queries: np.ndarray, database: np.ndarray, ids: np.ndarray, metric: Metric
    ) -> None:
        started = time.perf_counter()
        self.queries = np.array(queries, dtype=np.float32)  # a copy: the rows move back later
        self.database, self.metric = database, metric
        self.k = min(RECALL_AT, len(database))
        self.order = np.argsort(ids, kind="stable")
        self.sorted_ids = ids[self.order]
        self.threshold = self._kth_scores()
        self.seconds = time.perf_counter() - started

    def _kth_scores(self) -> np.ndarray:
        """The k-th best exact score of each query among the database rows."""
        higher = self.metric.higher_is_better
        best = np.empty((len(self.queries), 0), dtype=np.float32)
        for start in range(0, len(self.database), _CHUNK):
            scores = score_matrix(self.queries, self.database[start : start + _CHUNK], self.metric)
            _, values = top_k(scores, self.k, higher_is_better=higher)
            _, best = top_k(np.concatenate([best, values], axis=1), self.k, higher_is_better=higher)
        kth: np.ndarray = best[:, -1]
        return kth

    def recall(self, index: Index) -> tuple[float, float]:
        """Mean recall@10 of ``index`` over the queries and its standard error."""
        started = time.perf_counter()
        found = index.search(self.queries, self.k).ids
        slots = np.minimum(np.searchsorted(self.sorted_ids, found), len(self.sorted_ids) - 1)
        rows = np.where(self.sorted_ids[slots] == found, self.order[slots], -1)
        gathered = self.database[np.maximum(rows, 0)]  # [queries, k, dim]
        scores = _pair_scores(self.queries, gathered, self.metric)
        slack = _TIE * np.maximum(1.0, np.abs(self.threshold))[:, None]
        if self.metric.higher_is_better:
            good = scores >= self.threshold[:, None] - slack
        else:
            good = scores <= self.threshold[:, None] + slack
        per_query = np.count_nonzero(good & (rows >= 0), axis=1) / self.k
        self.seconds += time.perf_counter() - started
        spread = float(per_query.std(ddof=1)) if len(per_query) > 1 else 0.0
        return float(per_query.mean()), spread / math.sqrt(len(per_query))


def _pair_scores(queries: np.ndarray, gathered: np.ndarray, metric: Metric) -> np.ndarray:
    """The exact score of each query against each of its gathered rows (score_matrix's
    conventions)."""
    scores: np.ndarray
    if metric is Metric.EUCLIDEAN:
        scores = np.linalg.norm(gathered - queries[:, None, :], axis=2)
        return scores
    scores = np.einsum("qkd,qd->qk", gathered, queries)
    if metric is Metric.COSINE:
        norms = np.linalg.norm(gathered, axis=2) * np.linalg.norm(queries, axis=1)[:, None]
        scores = scores / np.maximum(norms, 1e-12)
    return scores


def _candidates(chosen: str, n: int, dim: int, budget: int) -> list[str]:
    """The structures to try in order: the chosen one; for a graph, a better-built graph
    (``STRONG_HNSW``, the same storage); an inverted file with float16 vectors; exact search.
    Each only if it fits the budget and is not the chosen one."""
    candidates = [chosen]
    name, options = parse_spec(chosen)
    if name == "hnsw":
        strong = f"hnsw:M={STRONG_HNSW['M']},efConstruction={STRONG_HNSW['efConstruction']}"
        strong += f",sq={options.get('sq', 0)}"
        if hnsw_bytes(n, dim, STRONG_HNSW["M"], options.get("sq", 0)) <= budget:
            candidates.append(strong)
    fallback = ivf_spec(n, 16)
    if chosen != fallback and ivf_bytes(n, dim, parse_spec(fallback)[1]["nlist"], 16) <= budget:
        candidates.append(fallback)
    if exact_bytes(n, dim) <= budget:
        candidates.append("exact")
    return candidates


def _exhaustive(index: Index) -> bool:
    """Whether an inverted file's tuned ``nprobe`` visits every list."""
    return isinstance(index, IVFPQIndex) and index.nprobe >= index.nlist


def _filled(spec: str, ids: np.ndarray, vectors: np.ndarray, metric: Metric) -> Index:
    index = create_index(spec, dim=vectors.shape[1], metric=metric)
    index.add(ids, vectors)
    return index


def _with(tuning: Tuning, **changes: Any) -> Tuning:
    return Tuning(**{**asdict(tuning), **changes})


@contextmanager
def _held_out(ids: np.ndarray, vectors: np.ndarray, held: int, seed: int) -> Iterator[int]:
    """Move a seeded random sample of ``held`` rows to the end of ``ids`` and ``vectors`` (in
    place: no copy of the vectors) and yield how many rows precede it; swap back on exit."""
    n = len(vectors)
    picked = np.random.default_rng(seed).choice(n, held, replace=False)
    kept = n - held
    source = np.sort(picked[picked < kept])
    target = np.setdiff1d(np.arange(kept, n), picked)
    swap(ids, vectors, source, target)
    try:
        yield kept
    finally:
        swap(ids, vectors, source, target)


def swap(ids: np.ndarray, vectors: np.ndarray, first: np.ndarray, second: np.ndarray) -> None:
    """Exchange rows ``first[i]`` and ``second[i]`` of both arrays in place."""
    ids[first], ids[second] = ids[second], ids[first].copy()
    vectors[first], vectors[second] = vectors[second], vectors[first].copy()
