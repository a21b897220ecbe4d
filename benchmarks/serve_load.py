"""Serving under load: sustained requests/s, p50/p99 latency and errors, REST and gRPC.

Builds (once, cached in --workdir) a collection of clothing-small plus derived variants
(mirrored, cropped and brightened copies: 4 x 3,781 = 15,124 images; ``--originals-only``: the
3,781 photos alone), starts the server as its own process (``lookalike serve``: REST with
--workers processes, gRPC in one process), and drives it from this process over loopback
with a closed-loop async client: ``concurrency`` requests in flight, each sent as soon as the
previous one answered, for ``--seconds``.

Rows (``--rows``): ``search`` (POST /search, one image, k=10); ``combined`` (POST /search with
two positive images and one negative, plus a text when the model embeds text); ``browse``
(GET /images, 24 images a page at offsets spread over the collection, as the web page's
browse view asks); ``grpc`` (classic SimilarImage.FindSimilar).

    python benchmarks/serve_load.py [--workers 2] [--seconds 20] [--concurrency 1 2 4 8]
        [--originals-only] [--rows search combined browse grpc]
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
# Images per browse request: what the web page's browse view asks for.
BROWSE_PAGE = 24
ROWS = ("search", "combined", "browse", "grpc")
VARIANTS = {
    "mirror": ImageOps.mirror,
    "crop": lambda im: im.crop(
        (im.width // 8, im.height // 8, im.width * 7 // 8, im.height * 7 // 8)
    ),
    "bright": lambda im: ImageEnhance.Brightness(im).enhance(1.3),
}


def build_images(dataset: Path, folder: Path, *, variants: bool = True) -> int:
    """Originals plus their variants under ``folder`` (only the originals, under
    ``folder``/original, without ``variants``); returns how many images there are."""
    marker = folder / ".complete"
    if not variants:
        originals = folder / "original"
        if not (originals / ".complete").exists():
            for source in sorted(dataset.rglob("*.jpg")):
                target = originals / source.relative_to(dataset)
                target.parent.mkdir(parents=True, exist_ok=True)
                if not target.exists():
                    target.write_bytes(source.read_bytes())
            (originals / ".complete").write_text("ok")
        return sum(1 for _ in originals.rglob("*.jpg"))
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


async def combined_load(
    url: str, payloads: list[bytes], text: str | None, concurrency: int, seconds: float
) -> dict:
    """POST /search with two positives and one negative (and ``text``): three consecutive
    test photos per request."""
    import httpx

    limits = httpx.Limits(max_connections=concurrency)
    triples = [
        (payloads[i], payloads[(i + 1) % len(payloads)], payloads[(i + 2) % len(payloads)])
        for i in range(len(payloads))
    ]
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def send(triple: tuple[bytes, bytes, bytes]) -> None:
            first, second, negative = triple
            files = [
                ("image", ("a.jpg", first, "image/jpeg")),
                ("image", ("b.jpg", second, "image/jpeg")),
                ("negative", ("n.jpg", negative, "image/jpeg")),
            ]
            fields = {"k": "10", **({"text": text} if text else {})}
            reply = await client.post("/search", files=files, data=fields)
            reply.raise_for_status()
            if len(reply.json()["results"]) != 10:
                raise RuntimeError("short result list")

        return await closed_loop(send, triples, concurrency, seconds)


async def browse_load(url: str, total: int, concurrency: int, seconds: float) -> dict:
    """GET /images pages of 24 at offsets spread over the whole collection."""
    import httpx

    limits = httpx.Limits(max_connections=concurrency)
    pages = max(1, total // BROWSE_PAGE)
    # A fixed spread of pages (a prime stride visits them all), not only the first.
    offsets = [((i * 37) % pages) * BROWSE_PAGE for i in range(min(pages, 512))]
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def send(offset: int) -> None:
            reply = await client.get("/images", params={"offset": offset, "limit": BROWSE_PAGE})
            reply.raise_for_status()
            if len(reply.json()["items"]) != min(BROWSE_PAGE, total - offset):
                raise RuntimeError("short page")

        return await closed_loop(send, offsets, concurrency, seconds)


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


def report(title: str, rows: list[dict], unit: str = "searches/s") -> None:
    print(f"\n{title}")
    print(f"| concurrency | {unit} | p50 ms | p99 ms | requests | errors |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['concurrency']} | {r['rps']:.1f} | {r['p50']:.1f} | {r['p99']:.1f} "
            f"| {r['requests']} | {r['errors']} |"
        )
        if r["first_error"]:
            print(f"  first error: {r['first_error']}")


def sustained(rows: list[dict], budget_ms: float = 250.0) -> str:
    """The highest throughput whose p99 stays under ``budget_ms``."""
    fitting = [r for r in rows if r["p99"] < budget_ms and not r["errors"]]
    if not fitting:
        return f"no concurrency kept p99 under {budget_ms:.0f} ms"
    best = max(fitting, key=lambda r: r["rps"])
    return (
        f"p99 < {budget_ms:.0f} ms up to {best['rps']:.1f}/s "
        f"(concurrency {best['concurrency']}, p99 {best['p99']:.1f} ms)"
    )


def load() -> str:
    """The machine's load averages (other work on the same cores skews the figures)."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lookalike-serve-load"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--grpc-size", type=int, default=224, help="FindSimilar image side")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--skip-grpc", action="store_true", help="leave out the grpc row")
    parser.add_argument(
        "--originals-only",
        action="store_true",
        help="serve the 3,781 photos alone (no mirrored, cropped or brightened copies)",
    )
    parser.add_argument(
        "--text", default="a red dress", help="the combined row's text, when the model has text"
    )
    args = parser.parse_args()
    rows_asked = [r for r in args.rows if not (args.skip_grpc and r == "grpc")]

    variants = not args.originals_only
    images = build_images(args.dataset, args.workdir / "images", variants=variants)
    folder = args.workdir / "images" if variants else args.workdir / "images" / "original"
    collection = args.workdir / ("collection" if variants else "collection-originals")
    env = {**os.environ, "LOOKALIKE_COLLECTION": str(collection)}
    index = subprocess.run(
        [sys.executable, "-m", "lookalike.cli", "index", str(folder), "-q"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    print(f"collection: {images} images ({index.stdout.strip()})")
    print(f"machine: {os.cpu_count()} CPU cores; load from a separate process over loopback")
    print(f"before: {load()}")

    rest_rows = [r for r in rows_asked if r != "grpc"]
    if rest_rows:
        run_rest(args, env, rest_rows)
    if "grpc" in rows_asked:
        run_grpc(args, env)
    print(f"\nafter: {load()}")


def run_rest(args: argparse.Namespace, env: dict[str, str], rows_asked: list[str]) -> None:
    """The REST rows against one ``lookalike serve --workers N``."""
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(["serve", "--port", str(port), "--workers", str(args.workers)], env)
    results: dict[str, tuple[list[dict], str]] = {}
    try:
        wait_http(url, server)
        stats = httpx.get(f"{url}/stats", timeout=120).json()
        payloads = queries(args.dataset)
        text = args.text if stats.get("text") else None
        for row in rows_asked:
            loads = []
            for c in args.concurrency:
                if row == "search":
                    loads.append(asyncio.run(rest_load(url, payloads, c, args.seconds)))
                elif row == "combined":
                    loads.append(asyncio.run(combined_load(url, payloads, text, c, args.seconds)))
                else:
                    loads.append(asyncio.run(browse_load(url, stats["images"], c, args.seconds)))
            results[row] = (loads, load())
    finally:
        stop_server(server)
    each = f"{args.workers} worker processes, {args.seconds:.0f} s each"
    titles = {
        "search": (f"REST POST /search (one image, k=10), {each}", "searches/s"),
        "combined": (
            f"REST POST /search (2 images + 1 negative{' + text' if text else ''}, k=10), {each}",
            "searches/s",
        ),
        "browse": (f"REST GET /images (browse, {BROWSE_PAGE} a page), {each}", "pages/s"),
    }
    for row, (loads, after) in results.items():
        title, unit = titles[row]
        report(title, loads, unit)
        print(f"{sustained(loads)}; {after}")


def run_grpc(args: argparse.Namespace, env: dict[str, str]) -> None:
    """The classic gRPC row against one ``lookalike serve --grpc-port`` process."""
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
    print(f"{sustained(rows)}; {load()}")


if __name__ == "__main__":
    main()
