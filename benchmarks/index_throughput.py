"""End-to-end indexing throughput: lookalike's pipeline against a naive loop, in one run.

lookalike: scan, decode in worker processes (JPEG draft decoding, one read per file for hash and
pixels), ONNX Runtime inference in batches, SQLite writes per batch.
naive: for each file, PIL decode, resize, normalise, eager PyTorch forward with batch size 1,
the way a quick script would do it.

    python benchmarks/index_throughput.py [--dataset DIR] [--naive-limit 300]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lookalike.core.collection import Collection
from lookalike.core.ingest import scan_folder
from lookalike.encoders import create_encoder
from lookalike.encoders.efficientnet_lite import VARIANTS, load_pretrained

DEFAULT_DATASET = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "clothing-small"


def run_lookalike(dataset: Path, *, batch_size: int, workers: int | None) -> tuple[int, float]:
    """Index the whole folder into a fresh collection; returns (images, seconds)."""
    create_encoder("efficientnet-lite0")  # export to ONNX once, outside the timing
    with tempfile.TemporaryDirectory() as folder, Collection(folder) as collection:
        collection.encoder  # noqa: B018 - load the model before the clock starts
        started = time.perf_counter()
        report = collection.index(dataset, batch_size=batch_size, workers=workers)
        seconds = time.perf_counter() - started
        assert not report.failed, report.failed
        return report.added, seconds


def run_naive(paths: list[Path]) -> tuple[int, float]:
    """One image at a time: PIL decode + eager PyTorch."""
    model = load_pretrained(VARIANTS["efficientnet-lite0"])
    mean = np.array([127.0, 127.0, 127.0], dtype=np.float32)
    vectors = []
    started = time.perf_counter()
    with torch.no_grad():
        for path in paths:
            image = Image.open(path).convert("RGB").resize((224, 224), Image.Resampling.BILINEAR)
            x = (np.asarray(image, dtype=np.float32) - mean) / 128.0
            tensor = torch.from_numpy(x.transpose(2, 0, 1)).unsqueeze(0)
            vectors.append(model.features(tensor)[-1].mean(dim=(2, 3)).numpy())
    return len(vectors), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--naive-limit", type=int, default=300, help="images for the naive loop")
    args = parser.parse_args()

    os.environ.setdefault("LOOKALIKE_CACHE", str(Path(tempfile.gettempdir()) / "lookalike-bench"))
    torch.set_num_threads(os.cpu_count() or 1)
    paths = list(scan_folder(args.dataset))
    print(f"dataset: {args.dataset} ({len(paths)} images), {os.cpu_count()} CPU cores")

    count, seconds = run_lookalike(args.dataset, batch_size=args.batch_size, workers=args.workers)
    fast = count / seconds
    print(f"lookalike index : {count:5d} images in {seconds:7.1f}s = {fast:7.1f} images/s")

    naive_paths = paths[:: max(1, len(paths) // args.naive_limit)][: args.naive_limit]
    count, seconds = run_naive(naive_paths)
    slow = count / seconds
    print(f"naive loop      : {count:5d} images in {seconds:7.1f}s = {slow:7.1f} images/s")
    print(f"speed-up        : {fast / slow:.1f}x")


if __name__ == "__main__":
    main()
