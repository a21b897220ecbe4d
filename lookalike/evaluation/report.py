"""Evaluation runs: embed a task's images (or take given vectors), score, measure, report.

``evaluate_vectors`` measures any features (pooling, whitening, query expansion variants)
without embedding anything; ``run_evaluation`` embeds a :class:`RetrievalTask` with an encoder
first. Reports are a JSON file and a precision-recall plot (matplotlib, imported only when a
plot is drawn, on the Agg canvas so no GUI backend or global pyplot state is touched).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lookalike.errors import LookalikeError
from lookalike.evaluation.datasets import RetrievalTask
from lookalike.evaluation.metrics import (
    DEFAULT_KS,
    RetrievalMetrics,
    retrieval_metrics,
    score_matrix,
)

if TYPE_CHECKING:
    from lookalike.encoders import Encoder
    from lookalike.evaluation.copydetect import CopyDetectionResult

ProgressFn = Callable[[str, int, int], None]

REPORT_FILE = "report.json"
PLOT_FILE = "pr_curve.png"
REPORT_VERSION = 1
# Recall levels of the stored and plotted PR curve: fine enough to draw, small enough for JSON.
CURVE_LEVELS = 101


@dataclass(frozen=True)
class EvaluationResult:
    """Retrieval metrics and how they were obtained (``info``: task, encoder, timings)."""

    metrics: RetrievalMetrics
    metric: str
    info: dict[str, Any] = field(default_factory=dict)
    report_path: Path | None = None
    plot_path: Path | None = None

    @property
    def mean_ap(self) -> float:
        return self.metrics.mean_ap

    @property
    def precision_at_k(self) -> dict[int, float]:
        return self.metrics.precision_at_k

    @property
    def recall_at_k(self) -> dict[int, float]:
        return self.metrics.recall_at_k

    @property
    def f1_at_k(self) -> dict[int, float]:
        return self.metrics.f1_at_k

    @property
    def map_at_k(self) -> dict[int, float]:
        return self.metrics.map_at_k

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, **self.info, "metrics": self.metrics.to_dict()}


def evaluate_scores(
    scores: np.ndarray,
    query_labels: np.ndarray,
    database_labels: np.ndarray,
    *,
    higher_is_better: bool = True,
    ks: Sequence[int] = DEFAULT_KS,
    exclude: np.ndarray | None = None,
    metric: str = "custom",
) -> EvaluationResult:
    """Metrics of a ready [queries x database] score matrix (e.g. after re-ranking)."""
    metrics = retrieval_metrics(
        scores,
        query_labels,
        database_labels,
        ks=ks,
        higher_is_better=higher_is_better,
        exclude=exclude,
        recall_levels=CURVE_LEVELS,
    )
    return EvaluationResult(metrics=metrics, metric=metric)


def evaluate_vectors(
    query_vectors: np.ndarray,
    query_labels: np.ndarray,
    database_vectors: np.ndarray,
    database_labels: np.ndarray,
    *,
    metric: str = "cosine",
    ks: Sequence[int] = DEFAULT_KS,
    exclude: np.ndarray | None = None,
) -> EvaluationResult:
    """Metrics of precomputed features: score by ``metric`` (cosine, euclidean, dot), then rank.

    ``exclude`` is the [queries x database] mask of pairs that are not candidates (for
    leave-one-out, :meth:`RetrievalTask.exclude_mask`).
    """
    query_labels = np.asarray(query_labels)
    database_labels = np.asarray(database_labels)
    if len(query_vectors) != len(query_labels) or len(database_vectors) != len(database_labels):
        raise LookalikeError(
            f"{len(query_vectors)} query vectors for {len(query_labels)} labels and "
            f"{len(database_vectors)} database vectors for {len(database_labels)} labels"
        )
    scores, higher_is_better = score_matrix(query_vectors, database_vectors, metric)
    return evaluate_scores(
        scores,
        query_labels,
        database_labels,
        higher_is_better=higher_is_better,
        ks=ks,
        exclude=exclude,
        metric=metric,
    )


def embed_paths(
    paths: Sequence[str | Path],
    encoder: Encoder,
    *,
    batch_size: int = 32,
    progress: ProgressFn | None = None,
    stage: str = "embedding",
) -> np.ndarray:
    """[n, dim] vectors of image files, embedded in chunks so progress can be reported."""
    parts = [np.empty((0, encoder.dim), dtype=np.float32)]
    chunk = max(1, batch_size) * 4
    for start in range(0, len(paths), chunk):
        batch = list(paths[start : start + chunk])
        parts.append(np.asarray(encoder.embed(batch, batch_size=batch_size), dtype=np.float32))
        if progress is not None:
            progress(stage, start + len(batch), len(paths))
    return np.concatenate(parts)


def run_evaluation(
    task: RetrievalTask,
    encoder: Encoder | None = None,
    *,
    vectors: np.ndarray | None = None,
    metric: str = "cosine",
    ks: Sequence[int] = DEFAULT_KS,
    out_dir: str | Path | None = None,
    batch_size: int = 32,
    plot: bool = True,
    progress: ProgressFn | None = None,
) -> EvaluationResult:
    """Evaluate ``task``: embed its images with ``encoder`` (each image once, even when it is
    both a query and in the database) or take ``vectors`` (one row per image of
    ``task.dataset``, in its order), then measure. With ``out_dir``, write ``report.json``
    and (with ``plot``) ``pr_curve.png`` there.
    """
    started = time.perf_counter()
    needed = np.union1d(task.query_indices, task.database_indices)
    if vectors is not None:
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != len(task.dataset):
            raise LookalikeError(
                f"vectors of shape {vectors.shape} do not give one row per image of the "
                f"dataset ({len(task.dataset)} images)"
            )
        rows = vectors
        position = np.arange(len(task.dataset))
    elif encoder is not None:
        rows = embed_paths(
            [task.dataset.paths[i] for i in needed],
            encoder,
            batch_size=batch_size,
            progress=progress,
        )
        position = np.full(len(task.dataset), -1, dtype=np.int64)
        position[needed] = np.arange(len(needed))
    else:
        raise LookalikeError("run_evaluation needs an encoder or precomputed vectors")
    embedded = time.perf_counter()

    result = evaluate_vectors(
        rows[position[task.query_indices]],
        task.query_labels,
        rows[position[task.database_indices]],
        task.database_labels,
        metric=metric,
        ks=ks,
        exclude=task.exclude_mask(),
    )
    info: dict[str, Any] = {"task": task.describe()}
    if encoder is not None and vectors is None:
        info["encoder"] = encoder_info(encoder)
        info["images_embedded"] = len(needed)
    info["seconds"] = {
        "embedding": round(embedded - started, 3),
        "metrics": round(time.perf_counter() - embedded, 3),
    }
    result = EvaluationResult(metrics=result.metrics, metric=metric, info=info)
    if out_dir is None:
        return result
    report_path, plot_path = write_report(out_dir, retrieval=result, plot=plot)
    return EvaluationResult(
        metrics=result.metrics,
        metric=metric,
        info=info,
        report_path=report_path,
        plot_path=plot_path,
    )


def encoder_info(encoder: Encoder) -> dict[str, Any]:
    """Plain-JSON identity of an encoder, so a report says which features it measured."""
    identity = encoder.identity
    return {
        "model": identity.model,
        "layer": identity.layer,
        "dim": identity.dim,
        "key": identity.key,
        "normalize": bool(encoder.normalize),
        "preprocess": identity.preprocess.to_dict(),
    }


def write_report(
    out_dir: str | Path,
    *,
    retrieval: EvaluationResult | None = None,
    copy_detection: CopyDetectionResult | None = None,
    extra: Mapping[str, Any] | None = None,
    plot: bool = True,
) -> tuple[Path, Path | None]:
    """Write ``report.json`` (and ``pr_curve.png`` with ``plot``) into ``out_dir``.

    The plot holds the mean interpolated PR curve of ``retrieval`` and, for copy detection,
    the pooled (micro) PR curve of each attack.
    """
    if retrieval is None and copy_detection is None:
        raise LookalikeError("nothing to report: give retrieval or copy_detection results")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise LookalikeError(f"cannot create report folder {out}: {error}") from error
    payload: dict[str, Any] = {
        "version": REPORT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **(extra or {}),
    }
    if retrieval is not None:
        payload["retrieval"] = retrieval.to_dict()
    if copy_detection is not None:
        payload["copy_detection"] = copy_detection.to_dict()
    report_path = out / REPORT_FILE
    plot_path = out / PLOT_FILE if plot else None
    try:
        report_path.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
        if plot_path is not None:
            curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
            if retrieval is not None:
                m = retrieval.metrics
                curves[f"retrieval (mAP {m.mean_ap:.3f})"] = (
                    m.recall_levels,
                    m.interpolated_precision,
                )
            if copy_detection is not None:
                for attack in copy_detection.attacks:
                    precision, recall = attack.precision_recall()
                    curves[f"{attack.attack} (µAP {attack.micro_ap:.3f})"] = (recall, precision)
            title = "Copy detection" if retrieval is None else "Precision-recall"
            plot_pr_curves(curves, plot_path, title=title)
    except OSError as error:
        raise LookalikeError(f"cannot write the report in {out}: {error}") from error
    return report_path, plot_path


def plot_pr_curves(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    path: str | Path,
    *,
    title: str = "Precision-recall",
) -> Path:
    """Draw named (recall, precision) curves into a PNG file."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise LookalikeError(
            "the precision-recall plot needs matplotlib (pip install matplotlib)"
        ) from error
    figure = Figure(figsize=(7, 5.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for label, (recall, precision) in curves.items():
        # Step plot: precision holds between the recall values where it was measured.
        axes.step(
            np.concatenate([[0.0], np.asarray(recall)]),
            np.concatenate([[np.asarray(precision)[0] if len(precision) else 0.0], precision]),
            where="pre",
            label=label,
            linewidth=1.5,
        )
    axes.set_xlim(0.0, 1.0)
    axes.set_ylim(0.0, 1.02)
    axes.set_xlabel("recall")
    axes.set_ylabel("precision")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    if curves:
        axes.legend(loc="lower left", fontsize="small")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, format="png")
    return path
