"""Retrieval quality of the fast CPU path (OpenVINO bf16, the default of new collections)
against fp32, side by side, with the suites ``lookalike eval`` runs.

Class-level: mAP of clothing-small's test split against its train split
(``lookalike eval DATASET``). Copy detection: 200 train images, each attacked by every
attack and searched among the train split; recall@1 per attack and its mean
(``lookalike eval DATASET --copy-detection``, same seed). Both for GeM pooling (what
collections index with) and average pooling (``lookalike eval``'s default). Each encoder
embeds every image once; the copy-detection database reuses those vectors.

    python benchmarks/fast_runtime_quality.py [--dataset DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_DATASET = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "clothing-small"
TOLERANCE = 0.005
HEADER = [
    "# Retrieval quality: bf16 (the default of new collections) against fp32",
    "",
    "`python benchmarks/fast_runtime_quality.py --out benchmarks/results/"
    "fast_runtime_quality.md`, on clothing-small. mAP: the test split's queries against the "
    "train split (`lookalike eval`). recall@1: copy detection, with 200 train images each "
    "attacked by every attack and searched among the train split, seed 0 "
    "(`lookalike eval --copy-detection`). fp32 runs on ONNX Runtime; bf16 on OpenVINO, with "
    "the stem and stage 1 in fp32. The bound is 0.005 either way.",
    "",
]
VARIANTS = {
    "fp32": {"precision": "fp32", "runtime": "onnx"},
    "bf16 (default)": {"precision": "bf16"},
}


def measure(dataset_dir: Path, pooling: str, options: dict[str, str]) -> dict[str, float]:
    """mAP (test vs train) and copy-detection recall@1 for one encoder."""
    from lookalike.encoders import create_encoder
    from lookalike.evaluation.copydetect import run_copy_detection
    from lookalike.evaluation.datasets import load_dataset, make_task
    from lookalike.evaluation.report import run_evaluation

    encoder = create_encoder("efficientnet-lite0", pooling=pooling, normalize=False, **options)
    dataset = load_dataset(dataset_dir)
    task = make_task(dataset, "split", query_split="test", database_split="train")
    started = time.perf_counter()
    vectors = encoder.embed(list(dataset.paths))
    figures = {"mAP": run_evaluation(task, vectors=vectors, plot=False).metrics.mean_ap}
    train = dataset.indices("train")
    copies = run_copy_detection(
        [dataset.paths[i] for i in train],
        encoder=encoder,
        database_vectors=vectors[train],
        copies=200,
        seed=0,
    )
    figures["recall@1 mean"] = copies.mean_recall_at_1
    for attack in copies.attacks:
        figures[f"recall@1 {attack.attack}"] = attack.recall_at_1
    figures["seconds"] = time.perf_counter() - started
    return figures


def table(pooling: str, results: dict[str, dict[str, float]]) -> list[str]:
    names = list(results)
    lines = [
        f"| {pooling} pooling | " + " | ".join(names) + " | difference | within 0.005 |",
        "|---|" + "---:|" * (len(names) + 1) + ":---:|",
    ]
    base, fast = results[names[0]], results[names[-1]]
    for key in base:
        if key == "seconds":
            continue
        delta = fast[key] - base[key]
        ok = "yes" if abs(round(delta, 6)) <= TOLERANCE else "**no**"
        values = " | ".join(f"{results[n][key]:.4f}" for n in names)
        lines.append(f"| {key} | {values} | {delta:+.4f} | {ok} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--poolings", default="gem,avg")
    parser.add_argument("--out", type=Path, help="also write the tables (markdown) here")
    args = parser.parse_args()
    os.environ.setdefault("LOOKALIKE_CACHE", str(Path(tempfile.gettempdir()) / "lookalike-bench"))

    lines: list[str] = []
    for pooling in args.poolings.split(","):
        results: dict[str, Any] = {}
        for name, options in VARIANTS.items():
            results[name] = measure(args.dataset, pooling, options)
            print(f"{pooling} {name}: {results[name]['seconds']:.0f}s", flush=True)
        rows = table(pooling, results)
        print("\n".join(rows), flush=True)
        lines += [*rows, ""]
    if args.out:
        args.out.write_text("\n".join([*HEADER, *lines]), encoding="utf-8")


if __name__ == "__main__":
    main()
