"""The REST API over real HTTP: a uvicorn server on loopback and an httpx client."""

from __future__ import annotations

import io
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from conftest import free_port, photo, variants
from PIL import Image

from lookalike.core.collection import Collection
from lookalike.server.rest import create_app
from lookalike.server.service import SearchService, ServiceLimits

TOKEN = "s3cret-token"


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


class LiveServer:
    """A uvicorn server running an app in a background thread."""

    def __init__(self, app) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def served(photo_dir: Path, tmp_path_factory: pytest.TempPathFactory, encoder) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("served") / "photos"
    shutil.copytree(photo_dir, folder)
    collection = Collection(folder.parent / "collection")
    collection.use_encoder(encoder)
    csv_path = folder.parent / "meta.csv"
    csv_path.write_text("file,title\nastronaut.jpg,Astronaut\n")
    collection.index(folder, workers=0, metadata_csv=csv_path, local_features=True)
    limits = ServiceLimits(max_upload_bytes=2_000_000, max_pixels=5_000_000, max_k=50)
    with LiveServer(create_app(SearchService(collection, token=TOKEN, limits=limits))) as server:
        yield server.url
    collection.close()


@pytest.fixture
def client(served: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served, timeout=60) as http:
        yield http


def search(client: httpx.Client, data: bytes, **fields) -> httpx.Response:
    return client.post("/search", files={"image": ("q.jpg", data, "image/jpeg")}, data=fields)


def test_search_finds_the_photo_first_with_metadata_and_urls(client: httpx.Client) -> None:
    reply = search(client, jpeg(photo("astronaut")), k=3)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["results"][0]["filename"] == "astronaut.jpg"
    best = body["results"][0]
    assert best["score"] > 0.97
    assert best["metadata"] == {"title": "Astronaut"}
    assert len(body["results"]) == 3 and not body["no_close_match"]
    assert "path" not in best  # server paths stay on the server
    thumb = client.get(best["thumbnail_url"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) == 256
    original = client.get(best["url"])
    assert original.status_code == 200
    assert Image.open(io.BytesIO(original.content)).size == photo("astronaut").size


def test_a_variant_finds_its_original_and_threshold_says_no_close_match(
    client: httpx.Client,
) -> None:
    body = search(client, jpeg(variants(photo("coffee"))["crop"]), k=2, metric="euclidean").json()
    assert body["results"][0]["filename"] == "coffee.jpg"
    assert body["metric"] == "euclidean"
    from skimage import data

    checker = jpeg(Image.fromarray(data.checkerboard()).convert("RGB"))
    none = search(client, checker, threshold=0.95).json()
    assert none["no_close_match"] and none["results"] == [] and none["best_score"] < 0.95


def rotated_crop(image: Image.Image) -> Image.Image:
    """A copy that global features score well below 1: cropped, then turned 20 degrees."""
    width, height = image.size
    return image.crop((0, 0, width * 3 // 4, height * 3 // 4)).rotate(20, expand=True)


def test_rerank_verifies_an_edited_copy_by_local_features(client: httpx.Client) -> None:
    query = jpeg(rotated_crop(photo("coffee")))
    plain = search(client, query, k=3).json()["results"]
    verified = search(client, query, k=3, rerank=3).json()["results"]
    assert plain[0]["filename"] == verified[0]["filename"] == "coffee.jpg"
    assert verified[0]["score"] > plain[0]["score"] + 0.02  # the inliers lift the copy
    assert [r["score"] for r in verified[1:]] == pytest.approx([r["score"] for r in plain[1:]])
    expanded = search(client, query, k=3, query_expansion=2, rerank=3).json()["results"]
    assert expanded[0]["filename"] == "coffee.jpg" and len(expanded) == 3


def test_similar_by_id(client: httpx.Client) -> None:
    first = search(client, jpeg(photo("rocket")), k=1).json()["results"][0]
    body = client.get(f"/images/{first['id']}/similar", params={"k": 4}).json()
    assert body["results"][0]["id"] == first["id"]
    assert body["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert client.get("/images/999999/similar").status_code == 404


@pytest.mark.parametrize(
    ("fields", "status"),
    [
        ({"k": "0"}, 422),
        ({"k": "51"}, 400),
        ({"k": "ten"}, 422),
        ({"metric": "manhattan"}, 422),
        ({"threshold": "nan"}, 422),
        ({"where": "no-equals-sign"}, 400),
        ({"rerank": "51"}, 400),
        ({"rerank": "-1"}, 422),
        ({"query_expansion": "101"}, 422),
    ],
)
def test_bad_fields_are_clear_client_errors(
    client: httpx.Client, fields: dict[str, str], status: int
) -> None:
    reply = search(client, jpeg(photo("coffee")), **fields)
    assert reply.status_code == status, reply.text
    assert reply.json()["detail"]


@pytest.mark.parametrize(
    ("payload", "status", "words"),
    [
        (b"", 400, "empty"),
        (b"not an image at all", 400, "not a recognized image"),
        (jpeg(photo("coffee"))[:2000], 400, "truncated"),
    ],
)
def test_bad_images_are_refused(
    client: httpx.Client, payload: bytes, status: int, words: str
) -> None:
    reply = search(client, payload)
    assert reply.status_code == status
    assert words in reply.json()["detail"]


def test_missing_file_field(client: httpx.Client) -> None:
    """A query without images or text is a bad request like any other: 400, saying why."""
    reply = client.post("/search", data={"k": "3"})
    assert reply.status_code == 400 and "empty" in reply.json()["detail"]


def test_size_and_pixel_limits(client: httpx.Client) -> None:
    huge = client.post("/search", files={"image": ("big.bin", b"\xff" * 3_000_000, "image/jpeg")})
    assert huge.status_code == 413
    bomb = io.BytesIO()
    Image.new("L", (4000, 4000)).save(bomb, "PNG")  # 16M pixels in a tiny file
    reply = search(client, bomb.getvalue())
    assert reply.status_code == 413 and "max_pixels" in reply.json()["detail"]


def test_paths_never_come_from_the_request(client: httpx.Client) -> None:
    for attempt in ("/images/..%2F..%2Fetc%2Fpasswd", "/images/%2Fetc%2Fpasswd/thumbnail"):
        assert client.get(attempt).status_code in (404, 422)
    assert client.get("/images/424242").status_code == 404


def test_writes_need_the_token(client: httpx.Client) -> None:
    image = jpeg(photo("camera").convert("RGB"))
    files = {"image": ("camera.jpg", image, "image/jpeg")}
    assert client.post("/images", files=files).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert client.post("/images", files=files, headers=wrong).status_code == 401
    auth = {"Authorization": f"Bearer {TOKEN}"}
    added = client.post("/images", files=files, data={"metadata": '{"kind": "gray"}'}, headers=auth)
    assert added.status_code == 201, added.text
    image_id = added.json()["id"]
    found = search(client, image, k=1).json()["results"][0]
    assert found["id"] == image_id and found["metadata"]["kind"] == "gray"
    assert client.delete(f"/images/{image_id}").status_code == 401
    assert client.delete(f"/images/{image_id}", headers=auth).status_code == 204
    assert client.delete(f"/images/{image_id}", headers=auth).status_code == 404
    after = search(client, image, k=10).json()["results"]
    assert image_id not in [r["id"] for r in after]
    bad_meta = client.post("/images", files=files, data={"metadata": "[1]"}, headers=auth)
    assert bad_meta.status_code == 400


def test_health_stats_and_openapi(client: httpx.Client) -> None:
    health = client.get("/health")
    assert health.status_code == 200
    assert health.json()["status"] == "ok" and health.json()["catalog"] == "ok"
    assert health.json()["images"] >= 6
    stats = client.get("/stats").json()
    assert stats["images"] >= 6 and stats["model"] == "efficientnet-lite0"
    assert stats["index_kind"] == "exact"
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/search", "/images", "/images/{image_id}", "/stats", "/health"} <= set(paths)
    assert "lookalike" in client.get("/").text


def test_searches_keep_answering_while_images_change(served: str) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    queries = [jpeg(photo(n)) for n in ("astronaut", "coffee", "rocket")]
    errors: list[str] = []
    stop = threading.Event()

    def searcher() -> None:
        with httpx.Client(base_url=served, timeout=60) as http:
            while not stop.is_set():
                for query in queries:
                    reply = search(http, query, k=3)
                    if reply.status_code != 200 or len(reply.json()["results"]) != 3:
                        errors.append(reply.text)

    threads = [threading.Thread(target=searcher) for _ in range(3)]
    for thread in threads:
        thread.start()
    rng = np.random.default_rng(0)
    with httpx.Client(base_url=served, timeout=60) as http:
        for i in range(6):
            noise = Image.fromarray(rng.integers(0, 255, (64 + i, 80, 3), dtype=np.uint8))
            files = {"image": (f"n{i}.jpg", jpeg(noise), "image/jpeg")}
            image_id = http.post("/images", files=files, headers=auth).json()["id"]
            assert http.delete(f"/images/{image_id}", headers=auth).status_code == 204
    stop.set()
    for thread in threads:
        thread.join()
    assert errors == []
