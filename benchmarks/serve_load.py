"""Serving under load: sustained searches/s, p50/p99 latency and errors, REST and gRPC.

Builds (once, cached in --workdir) a collection of clothing-small plus derived variants
(mirrored, cropped and brightened copies: 4 x 3,781 = 15,124 images), starts the server as its
own process (``lookalike serve``: REST with --workers processes, gRPC in one process), and
drives it from this process over loopback with a closed-loop async client: ``concurrency``
requests in flight, each sent as soon as the previous one answered, for ``--seconds``.

    python benchmarks/serve_load.py [--workers 2] [--seconds 20] [--concurrency 1 2 4 8]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

DEFAULT_DATASET = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "clothing-small"
VARIANTS = {
    "mirror": ImageOps.mirror,
    "crop": lambda im: im.crop(
        (im.width // 8, im.height // 8, im.width * 7 // 8, im.height * 7 // 8)
    ),
    "bright": lambda im: ImageEnhance.Brightness(im).enhance(1.3),
}


def build_images(dataset: Path, folder: Path) -> int:
    """Originals plus their variants under ``folder``; returns how many images there are."""
    marker = folder / ".complete"
    if not marker.exists():
        for source in sorted(dataset.rglob("*.jpg")):
            relative = source.relative_to(dataset)
            target = folder / "original" / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                target.write_bytes(source.read_bytes())
            image = Image.open(source).convert("RGB")
            for name, edit in VARIANTS.items():
                copy = folder / name / relative
                copy.parent.mkdir(parents=True, exist_ok=True)
                if not copy.exists():
                    edit(image).save(copy, quality=90)
        marker.write_text("ok")
    return sum(1 for _ in folder.rglob("*.jpg"))


def queries(dataset: Path, count: int = 64) -> list[bytes]:
    """Encoded test-split photos, as clients would upload them."""
    with open(dataset / "labels.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["split"] == "test"]
    return [(dataset / r["path"]).read_bytes() for r in rows[:: max(1, len(rows) // count)]]


def raw_queries(dataset: Path, size: int, count: int = 64) -> list[bytes]:
    """Raw square RGB pixels, as the classic gRPC FindSimilar clients send them."""
    encoded = queries(dataset, count)
    return [
        Image.open(io.BytesIO(data)).convert("RGB").resize((size, size)).tobytes()
        for data in encoded
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lookalike.cli", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def stop_server(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def wait_http(url: str, process: subprocess.Popen, timeout: float = 180) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited: {process.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("server did not come up")


async def closed_loop(send, payloads: list, concurrency: int, seconds: float) -> dict:
    """Run ``concurrency`` request loops for ``seconds``; latencies in ms and error count."""
    latencies: list[float] = []
    errors: list[str] = []
    stop_at = time.perf_counter() + seconds

    async def loop(offset: int) -> None:
        i = offset
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            try:
                await send(payloads[i % len(payloads)])
                latencies.append((time.perf_counter() - started) * 1000)
            except Exception as error:  # counted and reported, the load goes on
                errors.append(f"{type(error).__name__}: {error}"[:200])
            i += concurrency

    started = time.perf_counter()
    await asyncio.gather(*(loop(n) for n in range(concurrency)))
    elapsed = time.perf_counter() - started
    values = np.array(latencies) if latencies else np.array([np.nan])
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "rps": len(latencies) / elapsed,
        "p50": float(np.percentile(values, 50)),
        "p99": float(np.percentile(values, 99)),
        "errors": len(errors),
        "first_error": errors[0] if errors else "",
    }


async def rest_load(url: str, payloads: list[bytes], concurrency: int, seconds: float) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def send(data: bytes) -> None:
            reply = await client.post(
                "/search", files={"image": ("q.jpg", data, "image/jpeg")}, data={"k": "10"}
            )
            reply.raise_for_status()
            if len(reply.json()["results"]) != 10:
                raise RuntimeError("short result list")

        return await closed_loop(send, payloads, concurrency, seconds)


async def grpc_load(
    target: str, payloads: list[bytes], size: int, concurrency: int, seconds: float
) -> dict:
    import grpc

    from lookalike.server.protos import similar_image_pb2, similar_image_pb2_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        stub = similar_image_pb2_grpc.SimilarImageStub(channel)

        async def send(raw: bytes) -> None:
            request = similar_image_pb2.ImageFileIn(
                value=raw, image_size=float(size), similarity="CosineDistance"
            )
            reply = await stub.FindSimilar(request, timeout=60)
            if len(reply.imageOut5) != size * size * 3:
                raise RuntimeError("short reply")

        return await closed_loop(send, payloads, concurrency, seconds)


def report(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print("| concurrency | searches/s | p50 ms | p99 ms | requests | errors |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['concurrency']} | {r['rps']:.1f} | {r['p50']:.1f} | {r['p99']:.1f} "
            f"| {r['requests']} | {r['errors']} |"
        )
        if r["first_error"]:
            print(f"  first error: {r['first_error']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lookalike-serve-load"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--grpc-size", type=int, default=224, help="FindSimilar image side")
    parser.add_argument("--skip-grpc", action="store_true")
    args = parser.parse_args()

    images = build_images(args.dataset, args.workdir / "images")
    collection = args.workdir / "collection"
    env = {**os.environ, "LOOKALIKE_COLLECTION": str(collection)}
    index = subprocess.run(
        [sys.executable, "-m", "lookalike.cli", "index", str(args.workdir / "images"), "-q"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    print(f"collection: {images} images ({index.stdout.strip()})")
    print(f"machine: {os.cpu_count()} CPU cores; load from a separate process over loopback")

    port = free_port()
    server = start_server(["serve", "--port", str(port), "--workers", str(args.workers)], env)
    try:
        wait_http(f"http://127.0.0.1:{port}", server)
        payloads = queries(args.dataset)
        rows = [
            asyncio.run(rest_load(f"http://127.0.0.1:{port}", payloads, c, args.seconds))
            for c in args.concurrency
        ]
    finally:
        stop_server(server)
    report(
        f"REST POST /search (k=10), {args.workers} worker processes, {args.seconds:.0f} s each",
        rows,
    )

    if args.skip_grpc:
        return
    http_port, grpc_port = free_port(), free_port()
    server = start_server(
        ["serve", "--port", str(http_port), "--grpc-port", str(grpc_port), "--workers", "1"], env
    )
    try:
        wait_http(f"http://127.0.0.1:{http_port}", server)
        payloads = raw_queries(args.dataset, args.grpc_size)
        target = f"127.0.0.1:{grpc_port}"
        rows = [
            asyncio.run(grpc_load(target, payloads, args.grpc_size, c, args.seconds))
            for c in args.concurrency
        ]
    finally:
        stop_server(server)
    report(
        f"gRPC SimilarImage.FindSimilar ({args.grpc_size}x{args.grpc_size} RGB in, 5 images out),"
        f" 1 process, {args.seconds:.0f} s each",
        rows,
    )


if __name__ == "__main__":
    main()
