"""Learned binary hashing on clothing-small: HashNet and DCH against ITQ and LSH, plus the speed
of Hamming search over a million 64-bit codes on one core.

Standard protocol: the train split is both the training set and the database, the test split
gives the queries, relevant means same class, and mAP ranks the whole database by Hamming
distance (ties broken in a fixed random order). Defaults were chosen on the validation split,
whose mAP is reported beside the test mAP. Features are Lite0's stored vectors of a cached
collection (indexed on the first run, under $LOOKALIKE_CACHE, default a temporary folder).

    python benchmarks/hashing.py [--dataset DIR] [--bits 16,32,48,64]
        [--methods hashnet,dch,itq,lsh] [--codes 1000000] [--queries 200]
        [--out benchmarks/results]

Prints a Markdown report and writes it to OUT/hashing.md, with the precision-recall plot at
64 bits in OUT/hashing_pr.png.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT_DATASET = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "clothing-small"
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--bits", default="16,32,48,64")
    parser.add_argument("--methods", default="hashnet,dch,itq,lsh")
    parser.add_argument("--codes", type=int, default=1_000_000, help="random codes to search")
    parser.add_argument("--queries", type=int, default=200, help="timed Hamming queries")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser.parse_args()


def load_features(dataset: Path):
    """Labelled Lite0 features of the dataset from a cached collection."""
    from lookalike.core.collection import Collection
    from lookalike.evaluation.datasets import load_dataset
    from lookalike.labelled import labelled_features

    cache = Path(os.environ["LOOKALIKE_CACHE"]) / "hashing-clothing"
    with Collection(cache) as collection:
        return labelled_features(collection, load_dataset(dataset))


def evaluate_methods(features, methods: list[str], widths: list[int]) -> dict:
    """Train every method at every width; mAP on test and validation, training seconds."""
    from lookalike.hashing import train_head
    from lookalike.hashing.evaluate import hamming_map, hamming_pr_curve

    classes = features.classes
    train, test = features.split("train"), features.split("test")
    validation = features.split("validation")
    key = features.model_key
    results: dict[tuple[str, int], dict] = {}
    for method in methods:
        for bits in widths:
            started = time.perf_counter()
            head, _ = train_head(method, train.vectors, train.label_indices(classes), bits, key)
            seconds = time.perf_counter() - started
            database = head.encode(train.vectors, model_key=key)
            scores = {
                split.splits[0]: hamming_map(
                    head.encode(split.vectors, model_key=key), split.labels, database,
                    train.labels,
                )
                for split in (test, validation)
            }  # fmt: skip
            curve = None
            if bits == max(widths):
                curve = hamming_pr_curve(
                    head.encode(test.vectors, model_key=key), test.labels, database, train.labels
                )
            results[method, bits] = {**scores, "seconds": seconds, "curve": curve}
            print(
                f"  {method:8s} {bits:3d} bits: test mAP {scores['test']:.4f}, validation "
                f"{scores['validation']:.4f}, trained in {seconds:.1f}s",
                file=sys.stderr,
            )
    return results


def float_baseline(features) -> tuple[float, tuple[np.ndarray, np.ndarray]]:
    """Cosine on the float features, centred like the heads' inputs: the unhashed reference."""
    from lookalike.evaluation.metrics import (
        mean_average_precision,
        precision_recall_curve,
        score_matrix,
    )
    from lookalike.hashing.head import Preprocessing

    train, test = features.split("train"), features.split("test")
    prepare = Preprocessing.fit(train.vectors)
    scores, _ = score_matrix(prepare(test.vectors), prepare(train.vectors), "cosine")
    curve = precision_recall_curve(scores, test.labels, train.labels, recall_levels=21)
    return mean_average_precision(scores, test.labels, train.labels), curve


def time_hamming(n_codes: int, n_queries: int) -> list[tuple[str, float, str]]:
    """ms per single query over n random 64-bit codes, one thread, per exact engine."""
    import faiss

    from lookalike.knn import create_index

    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, size=(n_codes, 8), dtype=np.uint8)
    queries = rng.integers(0, 256, size=(n_queries, 8), dtype=np.uint8)
    ids = np.arange(n_codes, dtype=np.int64)
    rows = []
    reference = None
    for engine in ("numpy", "faiss"):
        index = create_index(f"binary:packed=true,engine={engine}", dim=64, metric="hamming")
        index.add(ids, codes)
        index.search(queries[:1], 10)  # builds faiss's structure outside the timing
        started = time.perf_counter()
        distances = np.stack([index.search(q[None, :], 10).scores[0] for q in queries])
        per_query = (time.perf_counter() - started) / n_queries * 1000
        if reference is None:
            reference = distances
        same = "yes" if np.array_equal(distances, reference) else "NO"
        rows.append((engine, per_query, same))
        print(f"  Hamming scan, {engine}: {per_query:.2f} ms/query", file=sys.stderr)
    return rows


def report(
    results: dict,
    methods: list[str],
    widths: list[int],
    baseline: float,
    timing: list[tuple[str, float, str]],
    n_codes: int,
    n_queries: int,
    sizes: dict[str, int],
    load: tuple[float, float],
    plot: Path,
) -> str:
    top = max(widths)
    lines = [
        "# Learned binary hashing on clothing-small",
        "",
        f"Lite0 head features (1280-d) of clothing-small: train split {sizes['train']} images "
        f"(training set and database), test split {sizes['test']} queries, validation split "
        f"{sizes['validation']} (used to choose the defaults). Relevant = same class (10 "
        "classes); mAP ranks the whole database by Hamming distance, ties in a fixed random "
        "order. Every method with its defaults (`lookalike hash train --method M --bits B`).",
        "",
        "Command: `python benchmarks/hashing.py`",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}; load average {load[0]:.1f} at the start, "
        f"{load[1]:.1f} at the end (the machine is shared: timings are upper bounds).",
        "",
        "## mAP (test queries)",
        "",
        *_method_table(results, methods, widths, "test", ".4f"),
    ]
    lines.append(f"| float cosine (1280 floats, reference) | {baseline:.4f} " + "| " * (
        len(widths) - 1) + "|")  # fmt: skip
    best = max(("hashnet", "dch"), key=lambda m: results.get((m, top), {}).get("test", -1))
    if (best, top) in results and ("itq", top) in results and ("lsh", top) in results:
        learned = results[best, top]["test"]
        margin = learned - max(results["itq", top]["test"], results["lsh", top]["test"])
        lines += [
            "",
            f"Goal at {top} bits: HashNet or DCH >= 0.80 and >= 0.20 above ITQ and LSH. "
            f"Best learned: {best} {learned:.4f} ({'met' if learned >= 0.8 else 'NOT met'}); "
            f"margin over the better baseline {margin:+.4f} "
            f"({'met' if margin >= 0.2 else 'NOT met'}).",
        ]
    lines += [
        "",
        "## mAP (validation queries, for the choice of defaults)",
        "",
        *_method_table(results, methods, widths, "validation", ".4f"),
        "",
        "## Training time (seconds, on the train split, torch on 1 thread)",
        "",
        *_method_table(results, methods, widths, "seconds", ".1f"),
    ]
    slowest = max(r["seconds"] for r in results.values())
    lines += [
        "",
        f"Goal: training under 5 minutes on 2 cores; slowest run {slowest:.1f}s "
        f"({'met' if slowest < 300 else 'NOT met'}).",
        "",
        f"Precision-recall at {top} bits: `{plot.name}`.",
        "",
        f"## Hamming search: {n_codes:,} random 64-bit codes, top 10, one thread",
        "",
        "Both engines are exact; queries one at a time "
        f"({n_queries} queries), `faiss.omp_set_num_threads(1)`.",
        "",
        "| engine | ms/query | speed vs numpy | same distances as numpy |",
        "| --- | ---: | ---: | --- |",
    ]
    numpy_ms = timing[0][1]
    for engine, ms, same in timing:
        lines.append(
            f"| binary:packed=true,engine={engine} | {ms:.2f} | {numpy_ms / ms:.1f}x | {same} |"
        )
    fastest = min(ms for _, ms, _ in timing)
    lines += [
        "",
        f"Goal: under 10 ms per query; fastest {fastest:.2f} ms "
        f"({'met' if fastest < 10 else 'NOT met'}).",
        "",
    ]
    return "\n".join(lines)


def _method_table(
    results: dict, methods: list[str], widths: list[int], key: str, spec: str
) -> list[str]:
    """Markdown table rows: a row a method, a column a code width, cells ``result[key]``."""
    lines = [
        "| method | " + " | ".join(f"{b} bits" for b in widths) + " |",
        "| --- | " + " | ".join("---:" for _ in widths) + " |",
    ]
    for method in methods:
        cells = " | ".join(f"{results[method, b][key]:{spec}}" for b in widths)
        lines.append(f"| {method} | {cells} |")
    return lines


def main() -> int:
    args = parse_args()
    os.environ.setdefault("LOOKALIKE_CACHE", str(Path(tempfile.gettempdir()) / "lookalike-bench"))
    from lookalike.evaluation.report import plot_pr_curves

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    widths = [int(b) for b in args.bits.split(",")]
    load_start = os.getloadavg()[0]
    print("loading features...", file=sys.stderr)
    features = load_features(args.dataset)
    sizes = {s: len(features.split(s)) for s in ("train", "test", "validation")}
    results = evaluate_methods(features, methods, widths)
    baseline, baseline_curve = float_baseline(features)
    timing = time_hamming(args.codes, args.queries)
    args.out.mkdir(parents=True, exist_ok=True)
    plot = args.out / "hashing_pr.png"
    top = max(widths)
    curves = {
        f"{m} {top} bits (mAP {results[m, top]['test']:.3f})": results[m, top]["curve"]
        for m in methods
    }
    curves[f"float cosine (mAP {baseline:.3f})"] = baseline_curve
    plot_pr_curves(curves, plot, title=f"clothing-small, test queries, {top}-bit codes")
    text = report(
        results, methods, widths, baseline, timing, args.codes, args.queries, sizes,
        (load_start, os.getloadavg()[0]), plot,
    )  # fmt: skip
    (args.out / "hashing.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
