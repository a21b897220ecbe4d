"""A full disk loses nothing and explains itself: on a real, small tmpfs filled to the brim,
``lookalike index`` stops with one clear line and keeps every batch it stored, searches answer
from the index in memory when its file cannot be saved, the REST API answers 507 with a useful
body, and no temporary file is left behind.

Mounting a tmpfs needs root (or CAP_SYS_ADMIN); where that is refused the tests skip, saying so.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import photo, variants
from fastapi.testclient import TestClient
from PIL import Image

from lookalike.catalog import SqliteCatalog
from lookalike.core.collection import Collection
from lookalike.errors import CatalogError, CatalogStorageError, StorageError
from lookalike.knn import ExactIndex, load_index
from lookalike.knn.base import Metric
from lookalike.server.status import ERROR_STATUSES, public_message, status_for, status_of


def lookalike(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lookalike.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """Mounts small tmpfs disks (size in KiB) under tmp_path; every one is unmounted after."""
    mounted: list[Path] = []

    def mount(kib: int) -> Path:
        target = tmp_path / f"disk{len(mounted)}"
        target.mkdir()
        command = ["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(target)]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=30)
        except OSError as error:
            pytest.skip(f"cannot run mount here ({error}): a full disk needs a small tmpfs")
        if result.returncode != 0:
            pytest.skip(
                "mounting a tmpfs is not permitted here (it needs root or CAP_SYS_ADMIN): "
                + (result.stderr.strip() or f"mount exited {result.returncode}")
            )
        mounted.append(target)
        return target

    yield mount
    for target in reversed(mounted):
        if subprocess.run(["umount", str(target)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(target)], capture_output=True)


def fill(disk: Path, leave: int = 0) -> Path:
    """Fill ``disk`` with a file until only about ``leave`` bytes are free; returns the file."""
    filler = disk / "filler"
    stat = os.statvfs(disk)
    wanted = max(0, stat.f_bavail * stat.f_frsize - leave)
    with open(filler, "ab") as handle:
        try:
            while wanted > 0:
                chunk = min(wanted, 1 << 16)
                handle.write(b"\0" * chunk)
                handle.flush()
                wanted -= chunk
        except OSError as error:
            assert error.errno == errno.ENOSPC
    return filler


def leftovers(root: Path) -> list[Path]:
    """Temporary files a writer could have left: ``*.tmp``, ``*.part``, ``*.partial``."""
    suffixes = (".tmp", ".part", ".partial")
    return [p for p in root.rglob("*") if p.name.endswith(suffixes) or ".part." in p.name]


def assert_one_error_line(result: subprocess.CompletedProcess[str], *words: str) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lookalike: error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def copied_onto_small_disk(tmpfs: Callable[[int], Path], collection: Path) -> tuple[Path, Path]:
    """(disk, copy): a tmpfs with 512 KiB to spare beyond a copy of ``collection`` on it."""
    disk = tmpfs(folder_size(collection) // 1024 + 512)
    path = disk / "c"
    shutil.copytree(collection, path)
    return disk, path


@pytest.fixture
def indexed_elsewhere(tmp_path: Path, photo_dir: Path, collection_encoder) -> Path:
    """A collection of the six photos on the ordinary disk, never searched (so it has no
    index file yet, and its catalog has not been stamped by one)."""
    path = tmp_path / "elsewhere"
    with Collection(path) as collection:
        collection.use_encoder(collection_encoder)
        collection.index(photo_dir, workers=0)
    return path


# -- the error and its answer -------------------------------------------------------------


def test_storage_errors_answer_507_and_resource_exhausted() -> None:
    entry = status_for(StorageError)
    assert (entry.http, entry.grpc) == (507, grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert entry is ERROR_STATUSES[StorageError]
    assert status_for(CatalogStorageError) is entry
    assert issubclass(CatalogStorageError, CatalogError)  # still a catalog error to callers
    # An OSError that is the disk's fault answers the same, wherever it was raised.
    full = OSError(errno.ENOSPC, "No space left on device", "/srv/c/uploads/x.part")
    assert status_of(full) is entry
    assert status_of(OSError(errno.EROFS, "Read-only file system")) is entry
    assert status_of(OSError(errno.ENOENT, "No such file")).http == 500
    message = public_message(full, ["/srv/c"])
    assert "disk" in message and "/" not in message
    error = StorageError.from_os_error(full, "/srv/c/indexes/m.cosine.lkx")
    assert str(error).startswith("no space left on device writing /srv/c/indexes/m.cosine.lkx")
    assert "free some space" in str(error) and error.path == "/srv/c/indexes/m.cosine.lkx"


def test_an_index_file_that_cannot_be_written_leaves_no_temporary_file_and_the_old_one(
    tmpfs: Callable[[int], Path],
) -> None:
    disk = tmpfs(256)
    path = disk / "m.cosine.lkx"
    small = ExactIndex(dim=8, metric=Metric.COSINE)
    small.add(np.arange(3), np.eye(3, 8, dtype=np.float32))
    small.save(path)
    big = ExactIndex(dim=8, metric=Metric.COSINE)
    big.add(np.arange(20_000), np.random.default_rng(0).normal(size=(20_000, 8)))
    with pytest.raises(StorageError) as caught:
        big.save(path)  # ~700 KB on a 256 KB disk
    assert str(path) in str(caught.value) and "no space left on device" in str(caught.value)
    assert leftovers(disk) == []
    assert len(load_index(path)) == 3  # the previous file is whole


# -- index -----------------------------------------------------------------------------------


def test_index_on_a_nearly_full_disk_stops_with_one_clear_error_and_keeps_every_batch(
    tmpfs: Callable[[int], Path], photo_dir: Path, collection_encoder
) -> None:
    disk = tmpfs(1024)
    path = disk / "c"
    with Collection(path) as collection:  # the catalog exists, and an index file to update
        collection.use_encoder(collection_encoder)
        collection.vector_index(Metric.COSINE)
    filler = fill(disk, leave=192 * 1024)  # room for a few one-image batches, not six
    command = ["-c", path, "index", photo_dir, "-q", "--batch-size", "1", "--workers", "0"]
    result = lookalike(*command)
    catalog_file = path / "catalog.sqlite"
    line = assert_one_error_line(result, "no space left on device", str(catalog_file))
    assert "free some space" in line and "kept" in line
    assert leftovers(disk) == []

    with Collection(path) as collection:  # the disk is still full: the catalog still reads
        collection.use_encoder(collection_encoder)
        stored = collection.catalog.paths()
        assert 1 <= len(stored) < 6, stored
        assert collection.catalog.integrity() == []
        for file in stored:  # every batch stored before the disk filled is searchable
            assert collection.search(file, k=1)[0].path == file
    assert leftovers(disk) == []

    filler.unlink()
    resumed = lookalike(*command)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{6 - len(stored)} added" in resumed.stdout and "6 images" in resumed.stdout


# -- search ----------------------------------------------------------------------------------


def test_search_on_a_full_disk_answers_from_the_index_in_memory(
    tmpfs: Callable[[int], Path],
    indexed_elsewhere: Path,
    photo_dir: Path,
    collection_encoder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    disk, path = copied_onto_small_disk(tmpfs, indexed_elsewhere)
    # Opened before the disk fills, so SQLite has its shared-memory file; the command-line
    # search below shares it.
    with Collection(path) as collection:
        collection.use_encoder(collection_encoder)
        fill(disk)
        with caplog.at_level(logging.WARNING, logger="lookalike"):
            found = collection.search(variants(photo("rocket"))["half"], k=3)
        assert Path(found[0].path).name == "rocket.jpg"
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("no space left on device" in w and "indexes" in w for w in warnings), warnings
        assert Path(collection.search(photo("coffee"), k=1)[0].path).name == "coffee.jpg"
        assert not list((path / "indexes").glob("*.lkx")) and leftovers(disk) == []

        result = lookalike("-c", path, "search", photo_dir / "rocket.jpg", "--json", "-k", "2")
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
        assert Path(json.loads(result.stdout)["results"][0]["path"]).name == "rocket.jpg"
        assert leftovers(disk) == []


def test_hash_search_on_a_full_disk_answers_from_the_codes_in_memory(
    tmpfs: Callable[[int], Path], indexed_elsewhere: Path, collection_encoder
) -> None:
    from lookalike.hashing import train_head
    from lookalike.hashing.serving import CollectionHashing

    disk, path = copied_onto_small_disk(tmpfs, indexed_elsewhere)
    with Collection(path) as collection:
        collection.use_encoder(collection_encoder)
        _, vectors = collection.catalog.vectors(collection.model_id)
        head, _ = train_head("lsh", vectors, np.zeros(len(vectors)), 16, hashing_key(collection))
        hashing = CollectionHashing(collection)
        hashing.save(head, "lsh-16")
        fill(disk)
        found = hashing.search(photo("rocket"), name="lsh-16", k=6, rerank=6)
        assert Path(found[0].path).name == "rocket.jpg"
        assert not hashing.codes_path("lsh-16").exists() and leftovers(disk) == []


def hashing_key(collection: Collection) -> str:
    return collection.encoder.identity.key


def test_remove_on_a_full_disk_raises_storage_error_and_keeps_the_image(
    tmpfs: Callable[[int], Path], indexed_elsewhere: Path, photo_dir: Path, collection_encoder
) -> None:
    disk, path = copied_onto_small_disk(tmpfs, indexed_elsewhere)
    rocket = str(photo_dir / "rocket.jpg")
    with Collection(path) as collection:
        collection.use_encoder(collection_encoder)
        filler = fill(disk)
        with pytest.raises(StorageError) as caught:
            collection.remove([rocket])
        assert str(path / "catalog.sqlite") in str(caught.value)
        assert len(collection) == 6 and leftovers(disk) == []
        filler.unlink()
        assert collection.remove([rocket]) == 1 and len(collection) == 5


# -- the REST API ----------------------------------------------------------------------------


@pytest.mark.parametrize("room", ["none", "for-the-upload-only"])
def test_rest_and_grpc_add_on_a_full_disk_answer_507_with_a_useful_body(
    tmpfs: Callable[[int], Path], indexed_elsewhere: Path, collection_encoder, room: str
) -> None:
    from lookalike.server.grpc_server import create_grpc_server
    from lookalike.server.protos import lookalike_v1_pb2 as v1
    from lookalike.server.protos import lookalike_v1_pb2_grpc as v1_grpc
    from lookalike.server.rest import create_app
    from lookalike.server.service import SearchService

    data = jpeg(photo("camera"))
    disk, path = copied_onto_small_disk(tmpfs, indexed_elsewhere)
    with Collection(path) as collection:
        collection.use_encoder(collection_encoder)
        service = SearchService(collection)
        client = TestClient(create_app(service), raise_server_exceptions=False)
        first = jpeg(variants(photo("astronaut"))["half"])
        files = {"image": ("astronaut.jpg", first, "image/jpeg")}
        assert client.post("/images", files=files).status_code == 201  # while there is room
        # No room at all: the upload's file cannot be written; room for it only: the
        # catalog cannot store it.
        fill(disk, leave=0 if room == "none" else -(-len(data) // 4096) * 4096 + 4096)
        reply = client.post("/images", files={"image": ("camera.jpg", data, "image/jpeg")})
        assert reply.status_code == 507, reply.text
        detail = reply.json()["detail"]
        assert "disk" in detail and "/" not in detail and "Traceback" not in detail
        assert len(collection) == 7

        server, port = create_grpc_server(service, port=0, max_workers=2)
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = v1_grpc.LookalikeStub(channel)
                with pytest.raises(grpc.RpcError) as caught:
                    stub.Add(v1.AddRequest(image=data, filename="camera.jpg"), timeout=60)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert caught.value.details() == detail
        finally:
            server.stop(None).wait()
        client.close()
        assert len(collection) == 7
        assert leftovers(disk) == []


def test_a_failed_upload_leaves_no_part_file(
    tmpfs: Callable[[int], Path], indexed_elsewhere: Path, collection_encoder
) -> None:
    from lookalike.server.rest import create_app
    from lookalike.server.service import SearchService

    disk, path = copied_onto_small_disk(tmpfs, indexed_elsewhere)
    with Collection(path) as collection:
        collection.use_encoder(collection_encoder)
        client = TestClient(create_app(SearchService(collection)), raise_server_exceptions=False)
        first = jpeg(variants(photo("astronaut"))["half"])
        files = {"image": ("astronaut.jpg", first, "image/jpeg")}
        assert client.post("/images", files=files).status_code == 201  # while there is room
        fill(disk)
        data = jpeg(photo("camera"))
        reply = client.post("/images", files={"image": ("camera.jpg", data, "image/jpeg")})
        client.close()
    assert reply.status_code == 507
    assert leftovers(disk) == []


# -- the catalog itself -----------------------------------------------------------------------


def test_a_full_disk_under_the_sqlite_catalog_raises_catalog_storage_error(
    tmpfs: Callable[[int], Path],
) -> None:
    from lookalike.catalog import ImageRecord
    from lookalike.encoders import EncoderIdentity, PreprocessConfig

    disk = tmpfs(512)
    config = PreprocessConfig(resolution=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    with SqliteCatalog(disk / "c.sqlite") as catalog:
        model = catalog.register_model(EncoderIdentity("m", "head", 256, "ab" * 32, config))
        rng = np.random.default_rng(0)
        first = catalog.store(
            [ImageRecord("/a.jpg", "a", 1, 1.0, 4, 4)], rng.normal(size=(1, 256)), model
        )
        fill(disk)
        with pytest.raises(StorageError) as caught:
            for n in range(200):
                records = [
                    ImageRecord(f"/{n}-{i}.jpg", f"{n}-{i}", 1, 1.0, 4, 4) for i in range(20)
                ]
                catalog.store(records, rng.normal(size=(20, 256)), model)
        error = caught.value
        assert isinstance(error, CatalogStorageError) and isinstance(error, CatalogError)
        assert str(disk / "c.sqlite") in str(error) and error.path == str(disk / "c.sqlite")
        assert "no space left on device" in str(error) and "kept" in str(error)
        assert catalog.ids_for_paths(["/a.jpg"]) == {"/a.jpg": first[0]}
        assert catalog.verify_vectors() == []
