"""GPU indexing throughput: ``lookalike index --device cuda`` against the yardstick on the same
machine's CPU.

Rows, each a separate process timed from spawn to exit (imports and model load included), on
the same files, one after the other:

* the yardstick: the field's reference script (``benchmarks/index_throughput.py``: eager
  ``efficientnet-lite-pytorch``, one image at a time, Annoy) on this machine's CPU (CUDA
  hidden from it);
* ``lookalike index --device cpu``: lookalike's CPU path on the same machine;
* ``lookalike index --device cuda``: batches on the GPU (PyTorch, or ONNX Runtime's CUDA
  provider where torch has no CUDA), decoding in worker processes.

    python benchmarks/gpu_index.py [--dataset DIR] [--limit N] [--batch-size 64]

Without a usable CUDA GPU it says so and exits with status 2; ``--cpu-only`` then runs the CPU
rows alone (to check the script itself).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATASET = HERE.parents[1] / "shared" / "datasets" / "clothing-small"


def lookalike_command() -> list[str]:
    script = Path(sys.executable).parent / "lookalike"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "lookalike.cli"]


def timed(label: str, command: list[str], images: int, env: dict[str, str]) -> str:
    """Run ``command``; one table row: img/s from spawn to exit, and CPU-ms per image."""
    one, five, _ = os.getloadavg()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{label} failed:\n{done.stdout}\n{done.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return (
        f"| {label} | {images} | {wall:.1f} | {images / wall:.1f} | "
        f"{1000 * cpu / images:.1f} | {one:.1f}/{five:.1f} |"
    )


def gpu_name() -> str | None:
    """The GPU lookalike would use, or None when there is none it can use."""
    from lookalike.encoders.devices import gpu_backend
    from lookalike.errors import EncoderError

    try:
        backend = gpu_backend("cuda")
    except EncoderError:
        return None
    if backend == "torch":
        import torch

        return f"{torch.cuda.get_device_name(0)} (PyTorch {torch.__version__})"
    import onnxruntime

    return f"CUDA through ONNX Runtime {onnxruntime.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", type=Path, default=DATASET)
    parser.add_argument("--limit", type=int, help="only the first N images")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cpu-only", action="store_true", help="the CPU rows alone")
    args = parser.parse_args()

    gpu = gpu_name()
    if gpu is None and not args.cpu_only:
        print("no usable CUDA GPU here: nothing to measure (--cpu-only runs the CPU rows)")
        raise SystemExit(2)
    from lookalike.core.ingest import scan_folder

    paths = [str(p) for p in scan_folder(args.dataset)][: args.limit]
    env = dict(os.environ)
    cpu_env = {**env, "CUDA_VISIBLE_DEVICES": ""}  # the yardstick and the CPU row see no GPU
    rows = []
    with tempfile.TemporaryDirectory(prefix="lookalike-gpu-") as work:
        listing = Path(work) / "files.txt"
        listing.write_text("\n".join(paths))
        folder = Path(work) / "photos"
        folder.mkdir()
        for number, path in enumerate(paths):
            (folder / f"{number:06d}{Path(path).suffix}").symlink_to(path)
        yardstick = [sys.executable, str(HERE / "index_throughput.py"), "--yardstick-child"]
        rows.append(timed("yardstick, CPU", [*yardstick, str(listing)], len(paths), cpu_env))
        for device in ("cpu", *(() if gpu is None else ("cuda",))):
            command = [*lookalike_command(), "-c", str(Path(work) / device), "index"]
            command += [str(folder), "-q", "--batch-size", str(args.batch_size)]
            command += ["--device", device]
            label = f"lookalike index --device {device}"
            rows.append(timed(label, command, len(paths), cpu_env if device == "cpu" else env))
    print(f"\n{args.dataset} ({len(paths)} images) on {platform.node()}: {os.cpu_count()} cores")
    print(f"GPU: {gpu or 'none'}")
    print("| row | images | seconds | img/s | CPU-ms/img | load |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
