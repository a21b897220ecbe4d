"""Copy-detection baseline: plain global features against attacked copies, on clothing-small.

The database is one split of the dataset (train: 3,068 images). A seeded sample of it
(``--copies``, 200) is attacked by every attack; each attacked copy is a query whose only
correct answer is its source, among all the database images. Reported per attack: recall@1,
recall@k and micro-AP (DISC21: the top-k predictions of all queries pooled, ranked by score,
AP over that single ranking with the number of queries as positives), then the mean.

    python benchmarks/copy_detection.py [--dataset DIR] [--split train] [--copies 200]
        [--attacks crop,rotation,...] [--model efficientnet-lite0] [--layer head]

Prints a Markdown report (copy it to benchmarks/results/); progress goes to stderr.

``--compare LABEL=REPORT`` (repeated) instead prints one table of recall@1 and micro-AP per
attack, side by side, from the ``report.json`` files of ``lookalike eval --copy-detection``
runs (or the ``{"attacks": [...]}`` files of the same shape), with the mean, the min, the
micro-AP pooled over attacks and the milliseconds per query:

    python benchmarks/copy_detection.py --compare before=runs/before/report.json \
        --compare after=runs/after/report.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from lookalike.encoders import create_encoder
from lookalike.evaluation.copydetect import ATTACKS, parse_attacks, run_copy_detection
from lookalike.evaluation.datasets import load_dataset

DEFAULT_DATASET = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "clothing-small"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--split", default="train", help="database split (default: train)")
    parser.add_argument("--copies", type=int, default=200, help="images attacked per attack")
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-k", type=int, default=10, help="candidates kept per query")
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--layer", default="head")
    parser.add_argument("--metric", default="cosine", choices=("cosine", "euclidean", "dot"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--compare", action="append", metavar="LABEL=REPORT", default=[])
    args = parser.parse_args()
    if args.compare:
        compare(args.compare)
        return

    os.environ.setdefault("LOOKALIKE_CACHE", str(Path(tempfile.gettempdir()) / "lookalike-bench"))
    dataset = load_dataset(args.dataset)
    database = [dataset.paths[i] for i in dataset.indices(args.split)]
    if not database:
        sys.exit(f"no images in split {args.split!r} of {args.dataset}")
    encoder = create_encoder(args.model, layer=args.layer, normalize=False)

    last = [0.0]

    def progress(stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if now - last[0] > 10 or done == total:
            last[0] = now
            print(f"  {stage}: {done}/{total}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    result = run_copy_detection(
        database,
        encoder=encoder,
        attacks=parse_attacks(args.attacks),
        copies=args.copies,
        seed=args.seed,
        k=args.k,
        metric=args.metric,
        batch_size=args.batch_size,
        progress=progress,
    )
    seconds = time.perf_counter() - started

    k = result.k
    print("# Copy detection baseline\n")
    print(
        f"- database: `{args.dataset.name}` split `{args.split}`, {len(database)} images "
        f"(the sources plus {len(database) - len(result.sources)} distractors)"
    )
    print(
        f"- queries: {len(result.sources)} sampled images (seed {args.seed}) x "
        f"{len(result.attacks)} attacks = {len(result.sources) * len(result.attacks)}"
    )
    print(
        f"- features: {args.model}, layer {args.layer}, global average pooling, "
        f"{args.metric} similarity, exact search, top {k} kept per query"
    )
    print(
        f"- machine: {os.cpu_count()} CPU cores, Python {platform.python_version()}; "
        f"{seconds:.0f} s in all (embedding the database and the queries dominates)\n"
    )
    print(f"| attack | queries | recall@1 | recall@{k} | micro-AP | recall@P90 |")
    print("|---|---:|---:|---:|---:|---:|")
    for attack in result.attacks:
        print(
            f"| {attack.attack} | {attack.queries} | {attack.recall_at_1:.3f} | "
            f"{attack.recall_at_k:.3f} | {attack.micro_ap:.3f} | {attack.recall_at_p90:.3f} |"
        )
    mean_recall_k = sum(a.recall_at_k for a in result.attacks) / len(result.attacks)
    mean_p90 = sum(a.recall_at_p90 for a in result.attacks) / len(result.attacks)
    print(
        f"| **mean** | | **{result.mean_recall_at_1:.3f}** | {mean_recall_k:.3f} | "
        f"**{result.mean_micro_ap:.3f}** | {mean_p90:.3f} |"
    )
    print(
        f"\nmicro-AP pooled over all attacks at once (one threshold for every kind of edit): "
        f"{result.pooled_micro_ap:.3f}"
    )


def _report(path: str) -> dict[str, Any]:
    data = json.loads(Path(path).read_text())
    found: dict[str, Any] = data.get("copy_detection", data)
    return found


def compare(columns: list[str]) -> None:
    """One Markdown table of several runs' per-attack recall@1 and micro-AP."""
    runs = []
    for column in columns:
        label, _, path = column.partition("=")
        runs.append((label, _report(path)))
    attacks = [a["attack"] for a in runs[0][1]["attacks"]]
    header = " | ".join(f"{label} R@1 | {label} µAP" for label, _ in runs)
    print(f"| attack | {header} |")
    print("|---|" + "---:|" * (2 * len(runs)))
    table = {label: {a["attack"]: a for a in run["attacks"]} for label, run in runs}
    for attack in attacks:
        cells = " | ".join(
            f"{table[label][attack]['recall_at_1']:.3f} | {table[label][attack]['micro_ap']:.3f}"
            for label, _ in runs
        )
        print(f"| {attack} | {cells} |")
    for name, pick in (("mean", np.mean), ("min", np.min)):
        cells = " | ".join(
            f"**{pick([a['recall_at_1'] for a in table[label].values()]):.3f}** | "
            f"**{pick([a['micro_ap'] for a in table[label].values()]):.3f}**"
            for label, _ in runs
        )
        print(f"| **{name}** | {cells} |")
    pooled = " | ".join(f"| {run.get('pooled_micro_ap', float('nan')):.3f}" for _, run in runs)
    print(f"| micro-AP pooled over attacks | {pooled} |")
    speed = " | ".join(
        f"{np.mean([a.get('query_ms', 0.0) for a in table[label].values()]):.1f} ms |"
        for label, _ in runs
    )
    print(f"| mean time per query | {speed} |")


if __name__ == "__main__":
    main()
