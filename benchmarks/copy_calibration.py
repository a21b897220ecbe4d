"""Calibration of the "is a copy" probability of ``search --copies``, and its reliability.

Every attacked copy of the suite (``lookalike.evaluation.copydetect``) is searched in a
collection of the database split the way a copy search does it (copy views, then local-feature
verification of the candidates, widened while none verifies strongly:
``LocalFeatureStore.verify_widening``). Each verified candidate is one example: its RANSAC
inliers, its global score, and whether it is the copy's source. Held-out images that are not
in the database (``--negatives SPLIT``, searched as they are) add candidates of queries that
have no copy at all.

``fit`` fits the two logistic regressions of ``lookalike/local/rerank.py`` (Newton's method):
``P(copy) = sigmoid(b0 + b1 ln(1 + inliers) + b2 sqrt(inliers) + b3 score)`` for the candidate
alone, then the same plus ``b4 ln(1 + background)`` (the most inliers among the query's other
candidates that alone are unlikely copies), and prints ``COPY_CALIBRATION`` and
``COPY_CONTEXT_CALIBRATION``. ``report`` scores the examples of
another set with the shipped constants and prints the reliability curve (predicted
probability in bins against the observed frequency of copies), the expected calibration error,
the Brier score, and what a copy search returns (probability >= ``COPY_PROBABILITY``) per
attack; ``--png`` draws the curve.

    python benchmarks/copy_calibration.py fit --dataset DIR --split train --copies 100 \\
        --collection DIR [--negatives validation]
    python benchmarks/copy_calibration.py report --dataset DIR --split test --copies 200 \\
        --collection DIR [--negatives validation] [--png FILE] > copy_calibration.md

The collection is made (with local features) or brought up to date from the split's folder.
Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lookalike.core.collection import Collection
from lookalike.core.local_store import COPY_CANDIDATES, RERANK_WIDEN
from lookalike.evaluation.copydetect import CollectionSearch, generate_copies, parse_attacks
from lookalike.evaluation.datasets import load_dataset
from lookalike.images import ImageSource, load_image
from lookalike.local.rerank import (
    COPY_CALIBRATION,
    COPY_CONTEXT_CALIBRATION,
    COPY_PROBABILITY,
    copy_probabilities,
)

BINS = 10


@dataclass
class Examples:
    """Verified candidates: inliers, global score, is-the-source, the query's attack ("none"
    for a held-out query without a copy in the database) and the query's number."""

    inliers: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    attacks: np.ndarray
    queries: np.ndarray

    def save(self, path: Path) -> None:
        np.savez(path, **{name: getattr(self, name) for name in self.__dataclass_fields__})

    @classmethod
    def load(cls, path: Path) -> Examples:
        with np.load(path) as data:
            return cls(**{name: data[name] for name in cls.__dataclass_fields__})


def _progress(stage: str, done: int, total: int, last: list[float]) -> None:
    now = time.perf_counter()
    if now - last[0] > 15 or done == total:
        last[0] = now
        print(f"  {stage}: {done}/{total}", file=sys.stderr, flush=True)


def collect(args: argparse.Namespace) -> Examples:
    """Search every attacked copy (and held-out negative) and gather the verified
    candidates."""
    dataset = load_dataset(args.dataset)
    database = [dataset.paths[i] for i in dataset.indices(args.split)]
    negatives = (
        [dataset.paths[i] for i in dataset.indices(args.negatives)][: args.max_negatives]
        if args.negatives
        else []
    )
    last = [0.0]
    rows: list[tuple[int, float, bool, str, int]] = []
    with Collection(args.collection) as collection:
        search = CollectionSearch(
            collection,
            database,
            local_features=True,
            progress=lambda s, d, t: _progress(s, d, t, last),
        )
        store = collection.local_store
        depth = COPY_CANDIDATES * RERANK_WIDEN

        def queries() -> Iterator[tuple[str, int, ImageSource]]:
            for copy in generate_copies(
                database, attacks=parse_attacks(args.attacks), copies=args.copies, seed=args.seed
            ):
                yield copy.attack, copy.source_id, copy.image
            for path in negatives:
                yield "none", -1, path

        total = args.copies * len(parse_attacks(args.attacks)) + len(negatives)
        for number, (attack, source, image) in enumerate(queries()):
            picture = load_image(image)
            ranked = collection.search(picture, k=depth)
            local = store.query_local(collection.encoder, picture)
            _, checks = store.verify_widening(
                local, [(r.id, r.score) for r in ranked], COPY_CANDIDATES
            )
            assert checks is not None, "SIFT features"
            for result, check in zip(ranked, checks, strict=False):
                is_source = search.position.get(result.id, -2) == source
                rows.append((check.inliers, result.score, is_source, attack, number))
            _progress("queries", number + 1, total, last)
    return Examples(
        np.array([r[0] for r in rows], dtype=np.int64),
        np.array([r[1] for r in rows], dtype=np.float64),
        np.array([r[2] for r in rows], dtype=bool),
        np.array([r[3] for r in rows]),
        np.array([r[4] for r in rows], dtype=np.int64),
    )


def returned(examples: Examples, predicted: np.ndarray) -> list[tuple[str, int, float, int, float]]:
    """Per kind of query: (kind, queries, share whose source a copy search returns, results
    returned, share of those that are the source)."""
    kept = predicted >= COPY_PROBABILITY
    rows = []
    for attack in dict.fromkeys(examples.attacks.tolist()):
        mine = examples.attacks == attack
        numbers = np.unique(examples.queries[mine])
        found = np.unique(examples.queries[mine & kept & examples.labels])
        count = int((mine & kept).sum())
        true = int((mine & kept & examples.labels).sum())
        rows.append(
            (attack, len(numbers), len(found) / len(numbers), count, true / count if count else 1.0)
        )
    return rows


def features(inliers: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """[n, 4]: 1, ln(1 + inliers), sqrt(inliers), global score (``copy_probability``'s)."""
    count = np.maximum(inliers, 0).astype(np.float64)
    return np.stack([np.ones(len(count)), np.log1p(count), np.sqrt(count), scores], axis=1)


def fit_logistic(x: np.ndarray, y: np.ndarray, ridge: float = 1e-2) -> np.ndarray:
    """Logistic regression weights by Newton's method (a tiny ridge keeps it finite when
    the classes separate)."""
    weights = np.zeros(x.shape[1])
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-(x @ weights)))
        gradient = x.T @ (p - y) + ridge * weights
        hessian = (x * (p * (1 - p))[:, None]).T @ x + ridge * np.eye(x.shape[1])
        step = np.linalg.solve(hessian, gradient)
        weights -= step
        if np.abs(step).max() < 1e-10:
            break
    return weights


def backgrounds(examples: Examples, alone: np.ndarray) -> np.ndarray:
    """Each candidate's background: the most inliers among its query's other candidates
    whose probability alone is under ``COPY_PROBABILITY`` (as ``copy_probabilities``)."""
    found = np.zeros(len(alone))
    for number in np.unique(examples.queries):
        rows = np.flatnonzero(examples.queries == number)
        unlikely = rows[alone[rows] < COPY_PROBABILITY]
        ranked = unlikely[np.argsort(-examples.inliers[unlikely], kind="stable")][:2]
        for row in rows:
            others = [examples.inliers[r] for r in ranked if r != row]
            found[row] = others[0] if others else 0
    return found


def shipped(examples: Examples) -> np.ndarray:
    """The probabilities the library gives each query's candidates (in context)."""
    predicted = np.zeros(len(examples.labels))
    for number in np.unique(examples.queries):
        rows = np.flatnonzero(examples.queries == number)
        predicted[rows] = copy_probabilities(
            examples.inliers[rows].tolist(), examples.scores[rows].tolist()
        )
    return predicted


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))


def reliability(
    predicted: np.ndarray, labels: np.ndarray
) -> list[tuple[float, float, int, float, float]]:
    """Per probability bin: (low, high, count, mean predicted, observed frequency)."""
    rows = []
    edges = np.linspace(0.0, 1.0, BINS + 1)
    for low, high in itertools.pairwise(edges):
        inside = (predicted >= low) & ((predicted < high) | (high == 1.0))
        count = int(inside.sum())
        mean = float(predicted[inside].mean()) if count else math.nan
        observed = float(labels[inside].mean()) if count else math.nan
        rows.append((float(low), float(high), count, mean, observed))
    return rows


def draw(rows: list[tuple[float, float, int, float, float]], path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
    kept = [r for r in rows if r[2]]
    axes.plot([r[3] for r in kept], [r[4] for r in kept], marker="o", label="copy search")
    for row in kept:
        axes.annotate(str(row[2]), (row[3], row[4]), textcoords="offset points", xytext=(4, -10))
    axes.set_xlabel("predicted probability of a copy")
    axes.set_ylabel("observed frequency of copies")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.set_title(title)
    axes.legend(loc="lower right")
    figure.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("fit", "report"))
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--split", default="train", help="database split")
    parser.add_argument("--collection", type=Path, required=True)
    parser.add_argument("--copies", type=int, default=100, help="sources attacked")
    parser.add_argument("--attacks", default="all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--negatives", help="split of held-out queries without a copy")
    parser.add_argument("--max-negatives", type=int, default=300)
    parser.add_argument("--png", type=Path, help="report: draw the reliability curve here")
    parser.add_argument("--save", type=Path, help="also write the examples to this .npz")
    parser.add_argument("--load", type=Path, help="the examples of an earlier --save run")
    args = parser.parse_args()
    os.environ.setdefault("LOOKALIKE_CACHE", str(Path(tempfile.gettempdir()) / "lookalike-bench"))

    started = time.perf_counter()
    examples = Examples.load(args.load) if args.load else collect(args)
    seconds = time.perf_counter() - started
    if args.save is not None:
        examples.save(args.save)
    labels = examples.labels.astype(float)
    x = features(examples.inliers, examples.scores)
    name = f"`{args.dataset.name}` split `{args.split}`"
    queries = len(np.unique(examples.queries))
    print(
        f"- examples: {len(labels)} verified candidates of {queries} queries on {name} "
        f"({int(labels.sum())} are the query's source); {seconds:.0f} s"
    )
    if args.mode == "fit":
        # First the candidate alone, then with its query's background (see rerank.py).
        alone = fit_logistic(x, labels)
        background = np.log1p(backgrounds(examples, sigmoid(x @ alone)))
        context = np.concatenate([x, background[:, None]], axis=1)
        weights = fit_logistic(context, labels)
        for name, fitted in (("COPY_CALIBRATION", alone), ("COPY_CONTEXT_CALIBRATION", weights)):
            print(f"- fitted {name} = ({', '.join(f'{w:.3f}' for w in fitted)})")
        predicted = sigmoid(context @ weights)
    else:
        print(f"- shipped COPY_CALIBRATION = {COPY_CALIBRATION}")
        print(f"- shipped COPY_CONTEXT_CALIBRATION = {COPY_CONTEXT_CALIBRATION}")
        predicted = shipped(examples)
    rows = reliability(predicted, labels)
    ece = sum(r[2] * abs(r[3] - r[4]) for r in rows if r[2]) / max(1, len(labels))
    brier = float(np.mean((predicted - labels) ** 2))
    print(f"- expected calibration error {ece:.4f}, Brier score {brier:.4f}\n")
    print("| predicted | candidates | mean predicted | observed frequency |")
    print("|---|---:|---:|---:|")
    for low, high, count, mean, observed in rows:
        shown = f"{mean:.3f} | {observed:.3f}" if count else "- | -"
        print(f"| {low:.1f}-{high:.1f} | {count} | {shown} |")
    print(f"\nWhat `search --copies` returns (probability >= {COPY_PROBABILITY}):\n")
    print("| queries of | queries | source returned | returned | of which the source |")
    print("|---|---:|---:|---:|---:|")
    for attack, count, found, kept, true in returned(examples, predicted):
        print(f"| {attack} | {count} | {found:.3f} | {kept} | {true:.3f} |")
    if args.png is not None and args.mode == "report":
        draw(rows, args.png, f"copy probability on {args.dataset.name} ({args.split})")
        print(f"\n![reliability curve]({args.png.name})")


if __name__ == "__main__":
    main()
