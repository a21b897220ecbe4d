"""The seams of the redesign, each exercised end to end on real photos.

- An encoder registered from outside the package, whose factory takes no ``pooling``: a
  collection builds it, indexes, searches, deduplicates, re-ranks by SIFT and serves it over
  REST and gRPC (the toy encoder is in ``toy_encoder.py``).
- PCA-whitening to fewer dimensions than the encoder's: queries are raw vectors, compared with
  the index's input dimension, not its whitened one.
- ``lookalike index --help`` names the pooling default a new collection really gets.
- ``--db`` and ``$LOOKALIKE_DB`` name the catalog for ``dedup``, ``hash`` and ``finetune`` too.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import toy_encoder
import uvicorn
from conftest import PHOTO_NAMES, photo, variants
from PIL import Image, ImageOps

from lookalike.catalog import SqliteCatalog
from lookalike.core.collection import Collection
from lookalike.dedup.finder import find_duplicates
from lookalike.encoders import Encoder, EncoderCapabilities, accepted_options
from lookalike.errors import EncoderError
from lookalike.server.grpc_server import create_grpc_server
from lookalike.server.protos import lookalike_v1_pb2 as v1
from lookalike.server.protos import lookalike_v1_pb2_grpc as v1_grpc
from lookalike.server.rest import create_app
from lookalike.server.service import SearchService

COPY = "astronaut-copy.jpg"


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def names(hits) -> list[str]:
    return [Path(hit.path).name for hit in hits]


class LiveServer:
    """A uvicorn server running an app in a background thread, on a free loopback port."""

    def __init__(self, app) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


# -- an encoder registered from outside the package, without a pooling option ---------------


@pytest.fixture(scope="module")
def toy(photo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Collection]:
    """The six photos plus an exact copy of one, indexed with the toy encoder and SIFT."""
    root = tmp_path_factory.mktemp("toy")
    folder = root / "photos"
    shutil.copytree(photo_dir, folder)
    shutil.copyfile(next(folder.rglob("astronaut.jpg")), folder / COPY)
    collection = Collection(root / "collection", model=toy_encoder.NAME)
    report = collection.index(folder, workers=0, local_features=True)
    assert (report.added, report.failed) == (len(PHOTO_NAMES) + 1, [])
    yield collection
    collection.close()


def _path_of(collection: Collection, name: str) -> str:
    return next(p for p in collection.catalog.paths() if Path(p).name == name)


def test_a_collection_builds_a_registered_encoder_that_takes_no_pooling(toy: Collection) -> None:
    assert accepted_options(toy_encoder.NAME) == {"normalize", "runtime", "device", "threads"}
    encoder = toy.encoder
    assert isinstance(encoder, toy_encoder.ToyColourEncoder) and isinstance(encoder, Encoder)
    assert encoder.capabilities == EncoderCapabilities(text=False, patch_tokens=False)
    assert encoder.normalize is False  # the collection stores raw vectors
    assert toy.catalog.get_setting("model") == toy_encoder.NAME
    assert toy.catalog.get_setting("pooling") is None  # nothing to remember
    # Reopened without naming the model, the collection builds the same encoder again.
    with Collection(toy.path) as again:
        assert again.encoder.identity == encoder.identity
        assert names(again.search(_path_of(toy, "rocket.jpg"), k=1)) == ["rocket.jpg"]


def test_info_and_stats_report_the_dim_of_an_encoder_without_layers(toy: Collection) -> None:
    # The active model is found by the encoder's own layer name, not the default "head".
    info = toy.info()
    assert (info.model, info.layer, info.dim) == (toy_encoder.NAME, "thumb4+hist4", 64)
    stats = SearchService(toy).stats()
    assert (stats["layer"], stats["dim"]) == ("thumb4+hist4", 64)


def test_each_photo_finds_itself_first(toy: Collection) -> None:
    for name in PHOTO_NAMES:
        hits = toy.search(_path_of(toy, f"{name}.jpg"), k=3)
        # The exact copy has the same vector, so the two tie at the top.
        expected = {f"{name}.jpg", COPY} if name == "astronaut" else {f"{name}.jpg"}
        assert set(names(hits)[: len(expected)]) == expected, (name, names(hits))
        # Not exactly 1: with SIFT on, indexing decodes JPEGs at a larger draft than a query.
        assert hits[0].score == pytest.approx(1.0, abs=1e-3)
        assert hits[len(expected)].score < 0.9


def test_dedup_by_embedding_finds_the_exact_copy(toy: Collection) -> None:
    report = find_duplicates(toy, method="embedding")
    assert report.images == len(PHOTO_NAMES) + 1 and report.failed == []
    (group,) = report.groups
    assert sorted(Path(m.path).name for m in group.members) == sorted(["astronaut.jpg", COPY])
    assert group.duplicates[0].score == pytest.approx(1.0, abs=1e-4)


def test_text_search_without_a_text_tower_is_a_clear_encoder_error(toy: Collection) -> None:
    with pytest.raises(EncoderError, match="toy-colour cannot embed text"):
        toy.search_text("a cat on a blanket")


def test_rerank_verifies_by_sift_when_the_encoder_has_no_patch_tokens(toy: Collection) -> None:
    kind = toy.local_store.kind()
    assert kind is not None and kind.sift is not None and not kind.patch_tokens
    ids = sorted(toy.catalog.paths().values())
    assert sorted(toy.catalog.local_features(ids, kind.name)) == ids
    query = variants(photo("coffee"))["crop"]
    plain = toy.search(query, k=3)
    reranked = toy.search(query, k=3, rerank=3)
    assert names(reranked)[0] == "coffee.jpg"
    assert reranked[0].score > next(h.score for h in plain if h.path == reranked[0].path)


def test_rest_search_over_http(toy: Collection) -> None:
    with (
        LiveServer(create_app(SearchService(toy))) as url,
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        data = Path(_path_of(toy, "chelsea.jpg")).read_bytes()
        reply = client.post(
            "/search", files={"image": ("q.jpg", data, "image/jpeg")}, data={"k": 2}
        )
        assert reply.status_code == 200, reply.text
        results = reply.json()["results"]
        assert results[0]["filename"] == "chelsea.jpg"
        assert results[0]["score"] == pytest.approx(1.0, abs=1e-3)
        assert len(results) == 2


def test_grpc_v1_search(toy: Collection) -> None:
    server, port = create_grpc_server(SearchService(toy), port=0, max_workers=2)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = v1_grpc.LookalikeStub(channel)
            data = Path(_path_of(toy, "rocket.jpg")).read_bytes()
            reply = stub.Search(v1.SearchRequest(image=data, k=3), timeout=60)
    finally:
        server.stop(None).wait()
    assert reply.matches[0].path == "rocket.jpg"
    assert reply.matches[0].score == pytest.approx(1.0, abs=1e-3) and len(reply.matches) == 3


# -- whitening to fewer dimensions than the encoder's ----------------------------------------

VARIANTS_PER_PHOTO = 50  # 300 images: enough for centring (256) and whitening (2 x 16)
WHITENING = 16


def _write_variants(folder: Path) -> None:
    """Small, varied edits of each photo: random crops, flips, colour casts and sizes."""
    folder.mkdir()
    rng = np.random.default_rng(7)
    for name in PHOTO_NAMES:
        base = photo(name)
        base.thumbnail((160, 160))
        width, height = base.size
        for i in range(VARIANTS_PER_PHOTO):
            fraction = rng.uniform(0.45, 0.95)
            w, h = int(width * fraction), int(height * fraction)
            x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            image = base.crop((x, y, x + w, y + h))
            if rng.random() < 0.5:
                image = ImageOps.mirror(image)
            if rng.random() < 0.3:
                image = ImageOps.flip(image)
            cast = np.asarray(image, dtype=np.float32) * rng.uniform(0.7, 1.3, 3)
            image = Image.fromarray(np.clip(cast, 0, 255).astype(np.uint8))
            side = int(rng.integers(40, 81))
            image = image.resize((side, max(1, side * image.height // image.width)))
            image.save(folder / f"{name}-{i:02d}.jpg", quality=90)


def test_whitening_to_fewer_dims_than_the_encoder_searches(tmp_path: Path) -> None:
    folder = tmp_path / "variants"
    _write_variants(folder)
    with Collection(tmp_path / "collection", model=toy_encoder.NAME, whitening=WHITENING) as c:
        report = c.index(folder, workers=0)
        assert report.added == VARIANTS_PER_PHOTO * len(PHOTO_NAMES)
        index = c.vector_index()
        assert index.whitening is not None  # the collection is large enough to be whitened
        assert index.whitening.shape == (toy_encoder.DIM, WHITENING)
        assert index.input_dim == toy_encoder.DIM and index.index.dim == WHITENING
        paths = sorted(c.catalog.paths())
        for path in paths:
            hits = c.search(path, k=2)
            assert hits[0].path == path, (path, names(hits))
            assert hits[0].score == pytest.approx(1.0, abs=1e-4)
            assert hits[1].score < hits[0].score
        # Sensible neighbours: an original photo, never indexed itself, finds its edits.
        for name in PHOTO_NAMES:
            query = photo(name)
            query.thumbnail((200, 200))
            sources = [n.split("-")[0] for n in names(c.search(query, k=5))]
            assert sources.count(name) >= 4, (name, sources)
    # Reopened, the whitened index is read back from its file and searched the same way.
    with Collection(tmp_path / "collection") as again:
        assert again.vector_index().whitening is not None
        assert again.search(paths[7], k=1)[0].path == paths[7]


# -- the command line -----------------------------------------------------------------------


def lookalike(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "lookalike.cli", *args]
    done = subprocess.run(
        command, capture_output=True, text=True, env=env or dict(os.environ), timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done


def test_index_help_says_gem_is_the_default_pooling_of_a_new_collection() -> None:
    text = " ".join(lookalike("index", "--help").stdout.split())
    assert "default gem for a new collection" in text
    assert "default avg)" not in text


def _labelled(folder: Path) -> list[str]:
    """A tiny labelled dataset, two classes of three small real photos each."""
    paths = []
    for label, sources in (("cat", ("chelsea", "coffee")), ("space", ("astronaut", "rocket"))):
        (folder / label).mkdir(parents=True)
        for i in range(3):
            path = folder / label / f"{i}.jpg"
            photo(sources[i % 2]).resize((96 + 8 * i, 96)).save(path, quality=90)
            paths.append(str(path.resolve()))
    return paths


def _catalog_paths(db: Path) -> set[str]:
    catalog = SqliteCatalog(db)
    try:
        return set(catalog.paths())
    finally:
        catalog.close()


@pytest.mark.slow
def test_db_and_its_variable_name_the_catalog_of_dedup_hash_and_finetune(
    photo_dir: Path, tmp_path: Path, collection_encoder
) -> None:
    photos = tmp_path / "photos"
    shutil.copytree(photo_dir, photos)
    shutil.copyfile(next(photos.rglob("chelsea.jpg")), photos / "chelsea-copy.jpg")
    db = tmp_path / "A.sqlite"
    with Collection(tmp_path / "F1", db=db, encoder=collection_encoder) as collection:
        assert collection.index(photos, workers=0).added == len(PHOTO_NAMES) + 1

    # dedup: F2 is a new folder with no catalog of its own; --db names A's.
    f2 = tmp_path / "F2"
    found = lookalike(
        "-c", str(f2), "--db", str(db), "dedup", "--method", "embedding", "--format", "json"
    )
    payload = json.loads(found.stdout)
    assert payload["images"] == len(PHOTO_NAMES) + 1
    (group,) = payload["groups"]
    members = [group["keeper"], *group["duplicates"]]
    assert sorted(Path(m["path"]).name for m in members) == ["chelsea-copy.jpg", "chelsea.jpg"]
    assert not (f2 / "catalog.sqlite").exists()

    env = {**os.environ, "LOOKALIKE_DB": str(db)}
    # hash train indexes its dataset into the collection's catalog: A's, named by the variable.
    hashed = _labelled(tmp_path / "hash-data")
    f3 = tmp_path / "F3"
    hash_options = ["--method", "lsh", "--bits", "16", "--json", "--quiet"]
    data = str(tmp_path / "hash-data")
    trained = lookalike("-c", str(f3), "hash", "train", data, *hash_options, env=env)
    assert json.loads(trained.stdout)["train_images"] == len(hashed)
    assert set(hashed) <= _catalog_paths(db)
    assert not (f3 / "catalog.sqlite").exists()
    assert (f3 / "hashing").is_dir()

    # finetune likewise indexes its dataset into A's catalog before training.
    tuned = _labelled(tmp_path / "tune-data")
    f4 = tmp_path / "F4"
    tune_options = ["--name", "tiny", "--epochs", "1", "--dim", "8", "--hidden", "0", "--quiet"]
    tune_options += ["--classes-per-batch", "2", "--per-class", "2"]
    data = str(tmp_path / "tune-data")
    lookalike("-c", str(f4), "finetune", data, *tune_options, env=env)
    assert set(tuned) <= _catalog_paths(db)
    assert not (f4 / "catalog.sqlite").exists()
    assert (f4 / "encoders" / "efficientnet-lite0+tiny" / "encoder.json").is_file()
