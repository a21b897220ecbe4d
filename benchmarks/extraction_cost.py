"""CPU cost of extraction per image, split into decoding and embedding, on one thread.

CPU seconds (``time.process_time``) rather than wall time, so that other load on a shared
machine barely changes the figures: they give images per second per core, the unit for
sizing a cluster. Decoding is lookalike's ``decode_file`` (read, SHA-256, JPEG draft decode,
resize); embedding is EfficientNet-Lite0 on ONNX Runtime with one intra-op thread, batch 32.

    python benchmarks/extraction_cost.py [--dataset DIR] [--n 320]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from lookalike.core.ingest import decode_file, scan_folder
from lookalike.encoders import create_encoder

DEFAULT_DATASET = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "clothing-small"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--n", type=int, default=320)
    args = parser.parse_args()
    os.environ.setdefault("LOOKALIKE_CACHE", str(Path(tempfile.gettempdir()) / "lookalike-bench"))
    paths = [str(p) for p in scan_folder(args.dataset)]
    paths = paths[:: max(1, len(paths) // args.n)][: args.n]
    for path in paths:
        Path(path).read_bytes()  # warm page cache: measure decoding, not the disk
    encoder = create_encoder("efficientnet-lite0", normalize=False, threads=1)
    encoder.embed_pixels(np.zeros((1, 224, 224, 3), dtype=np.uint8))  # warm-up

    started = time.process_time()
    decoded = [decode_file(p, encoder.preprocess) for p in paths]
    decode_s = (time.process_time() - started) / len(paths)
    pixels = np.stack([d.pixels for d in decoded])
    started = time.process_time()
    for start in range(0, len(pixels), 32):
        encoder.embed_pixels(pixels[start : start + 32])
    embed_s = (time.process_time() - started) / len(paths)
    print(f"{len(paths)} images of {args.dataset.name}, one thread, CPU time per image")
    print("| stage | CPU ms per image | images/s per core |")
    print("|---|---:|---:|")
    for name, seconds in (("decode + hash + resize", decode_s), ("Lite0 embed", embed_s),
                          ("both", decode_s + embed_s)):  # fmt: skip
        print(f"| {name} | {seconds * 1000:.1f} | {1 / seconds:.0f} |")


if __name__ == "__main__":
    main()
