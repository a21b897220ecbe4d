"""Files served are the files catalogued: ``GET /images/{id}``, its thumbnail and gRPC
FindSimilar's output images read an indexed file only while it is the regular file that was
indexed (same size and modification time) and its real path is inside the indexed folders;
and FindSimilar's reply is bounded in size."""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import photo
from fastapi.testclient import TestClient
from PIL import Image

from lookalike.core.collection import Collection
from lookalike.server.grpc_server import create_grpc_server
from lookalike.server.protos import similar_image_pb2 as classic
from lookalike.server.protos import similar_image_pb2_grpc as classic_grpc
from lookalike.server.rest import create_app
from lookalike.server.service import SearchService, ServiceLimits

PASSWD = Path("/etc/passwd")


class Indexed:
    """The six test photos copied to a folder, indexed, and a REST client over them."""

    def __init__(self, root: Path, photo_dir: Path, encoder, limits: ServiceLimits) -> None:
        self.folder = root / "photos"
        shutil.copytree(photo_dir, self.folder)
        self.outside = root / "outside"  # a folder that was never indexed
        self.outside.mkdir()
        self.collection = Collection(root / "collection", encoder=encoder)
        self.collection.index(self.folder, workers=0)
        self.service = SearchService(self.collection, limits=limits)
        self.client = TestClient(create_app(self.service))

    def path(self, name: str) -> Path:
        (found,) = self.folder.rglob(f"{name}.jpg")
        return found

    def id(self, name: str) -> int:
        return self.collection.catalog.paths()[str(self.path(name).resolve())]

    def close(self) -> None:
        self.client.close()
        self.collection.close()


@pytest.fixture
def indexed(photo_dir: Path, tmp_path: Path, encoder) -> Iterator[Indexed]:
    served = Indexed(tmp_path, photo_dir, encoder, ServiceLimits())
    yield served
    served.close()


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def refused(indexed: Indexed, image_id: int, *words: str) -> None:
    """Both routes answer 409 naming ``words``, and never with a file's bytes."""
    for url in (f"/images/{image_id}", f"/images/{image_id}/thumbnail"):
        reply = indexed.client.get(url)
        assert reply.status_code == 409, (url, reply.status_code, reply.content[:200])
        detail = reply.json()["detail"]
        for word in words:
            assert word in detail, (url, detail)
        assert str(indexed.folder) not in detail  # no server path reaches the client


# -- REST -------------------------------------------------------------------------------------


def test_an_unchanged_file_is_served_whole(indexed: Indexed) -> None:
    image_id = indexed.id("astronaut")
    reply = indexed.client.get(f"/images/{image_id}")
    assert reply.status_code == 200
    assert reply.headers["content-type"] == "image/jpeg"
    assert reply.content == indexed.path("astronaut").read_bytes()
    thumbnail = indexed.client.get(f"/images/{image_id}/thumbnail")
    assert thumbnail.status_code == 200
    assert max(Image.open(io.BytesIO(thumbnail.content)).size) == 256


@pytest.mark.skipif(not PASSWD.is_file(), reason="no /etc/passwd here")
def test_a_photo_replaced_by_a_link_to_etc_passwd_is_not_served(indexed: Indexed) -> None:
    image_id = indexed.id("astronaut")
    target = indexed.path("astronaut")
    target.unlink()
    target.symlink_to(PASSWD)
    secret = PASSWD.read_bytes()
    for url in (f"/images/{image_id}", f"/images/{image_id}/thumbnail"):
        reply = indexed.client.get(url)
        assert reply.status_code in (404, 409), url
        assert secret not in reply.content and b"root:" not in reply.content
    refused(indexed, image_id, "link to a file outside the indexed folders")


def test_a_link_to_an_identical_copy_outside_the_indexed_folders_is_not_served(
    indexed: Indexed,
) -> None:
    """Size and modification time match (a copy keeps both): only the real path tells."""
    image_id = indexed.id("rocket")
    target = indexed.path("rocket")
    copy = indexed.outside / "rocket.jpg"
    shutil.copy2(target, copy)
    target.unlink()
    target.symlink_to(copy)
    refused(indexed, image_id, "link to a file outside the indexed folders")


def test_a_parent_folder_swapped_for_a_link_to_an_identical_copy_is_not_served(
    indexed: Indexed,
) -> None:
    image_id = indexed.id("chelsea")  # in photos/nested
    nested = indexed.folder / "nested"
    copy = indexed.outside / "nested"
    shutil.copytree(nested, copy)  # copy2 for each file: the same sizes and times
    shutil.rmtree(nested)
    nested.symlink_to(copy, target_is_directory=True)
    refused(indexed, image_id, "link to a file outside the indexed folders")


def test_a_link_inside_the_indexed_folder_to_an_indexed_file_is_served(
    photo_dir: Path, tmp_path: Path, encoder
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy2(photo_dir / "astronaut.jpg", folder / "astronaut.jpg")
    (folder / "link.jpg").symlink_to(folder / "astronaut.jpg")
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy2(photo_dir / "rocket.jpg", outside / "rocket.jpg")
    (folder / "away.jpg").symlink_to(outside / "rocket.jpg")
    with Collection(tmp_path / "collection", encoder=encoder) as collection:
        collection.index(folder, workers=0)
        ids = collection.catalog.paths()
        client = TestClient(create_app(SearchService(collection)))
        served = client.get(f"/images/{ids[str(folder / 'link.jpg')]}")
        assert served.status_code == 200
        assert served.content == (folder / "astronaut.jpg").read_bytes()
        # Indexed through a link, but its real path was never inside an indexed folder.
        away = client.get(f"/images/{ids[str(folder / 'away.jpg')]}")
        assert away.status_code == 409
        assert "outside the indexed folders" in away.json()["detail"]
        client.close()


def test_a_file_modified_after_indexing_is_409_until_indexed_again(indexed: Indexed) -> None:
    image_id = indexed.id("coffee")
    target = indexed.path("coffee")
    assert indexed.client.get(f"/images/{image_id}/thumbnail").status_code == 200  # cached
    replacement = jpeg(photo("chelsea").resize((300, 200)))
    target.write_bytes(replacement)
    refused(indexed, image_id, "changed since it was indexed; index again")
    # The same bytes with only the modification time moved: changed too.
    indexed.collection.index(indexed.folder, workers=0)
    assert indexed.client.get(f"/images/{image_id}").content == replacement
    stat = target.stat()
    os.utime(target, (stat.st_atime, stat.st_mtime + 5))
    refused(indexed, image_id, "changed since it was indexed; index again")
    indexed.collection.index(indexed.folder, workers=0)
    reply = indexed.client.get(f"/images/{image_id}")
    assert reply.status_code == 200 and reply.content == replacement


def test_a_folder_swapped_in_for_a_photo_is_409(indexed: Indexed) -> None:
    image_id = indexed.id("retina")
    target = indexed.path("retina")
    target.unlink()
    target.mkdir()
    refused(indexed, image_id, "is a folder now", "index again")


def test_a_deleted_file_is_still_404(indexed: Indexed) -> None:
    image_id = indexed.id("astronaut")
    indexed.path("astronaut").unlink()
    for url in (f"/images/{image_id}", f"/images/{image_id}/thumbnail"):
        reply = indexed.client.get(url)
        assert reply.status_code == 404
        assert "no longer on disk" in reply.json()["detail"]


# -- gRPC FindSimilar -------------------------------------------------------------------------


class Grpc:
    def __init__(self, service: SearchService) -> None:
        self.server, port = create_grpc_server(service, port=0, max_workers=2)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")  # a client's default options
        self.stub = classic_grpc.SimilarImageStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.server.stop(None).wait()


@pytest.fixture
def rpc(indexed: Indexed) -> Iterator[Grpc]:
    client = Grpc(indexed.service)
    yield client
    client.close()


def find_similar(rpc: Grpc, image: Image.Image, side: int) -> list[bytes]:
    request = classic.ImageFileIn(
        value=image.resize((side, side)).convert("RGB").tobytes(),
        image_size=side,
        similarity="CosineDistance",
    )
    reply = rpc.stub.FindSimilar(request, timeout=120)
    return [reply.imageOut1, reply.imageOut2, reply.imageOut3, reply.imageOut4, reply.imageOut5]


def red_share(data: bytes, side: int) -> float:
    """How much of an RGB image is pure red."""
    pixels = np.asarray(Image.frombytes("RGB", (side, side), data), dtype=np.int16)
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 60) & (pixels[..., 2] < 60)
    return float(red.mean())


@pytest.mark.parametrize("change", ["link outside", "overwritten"])
def test_find_similar_never_reads_a_file_changed_or_linked_outside(
    indexed: Indexed, rpc: Grpc, change: str
) -> None:
    red = Image.new("RGB", (640, 480), (255, 0, 0))
    red.save(indexed.outside / "red.jpg", quality=95)
    astronaut = indexed.path("astronaut")
    query = Image.open(astronaut).convert("RGB")
    # The best match's file now is (or leads to) a red square.
    if change == "link outside":
        astronaut.unlink()
        astronaut.symlink_to(indexed.outside / "red.jpg")
    else:
        astronaut.write_bytes(jpeg(red))
    side = 64
    images = find_similar(rpc, query, side)  # the five other photos
    assert len(images) == 5 and all(len(data) == side * side * 3 for data in images)
    assert max(red_share(data, side) for data in images) < 0.5  # no red square served
    want = np.asarray(query.resize((side, side)), dtype=np.int16)
    differences = [
        float(np.abs(np.asarray(Image.frombytes("RGB", (side, side), d), np.int16) - want).mean())
        for d in images
    ]
    assert min(differences) > 20, differences  # the astronaut itself is not among them


def test_find_similar_bounds_image_size_so_a_default_client_can_receive_the_reply(
    indexed: Indexed, rpc: Grpc
) -> None:
    """image_size 2600 used to answer 101 MB (five 2600 x 2600 RGB images)."""
    limit = 512  # five RGB images of 512 x 512: 3.9 MB, under a client's default 4 MiB
    for side in (2600, 1024, limit + 1):
        request = classic.ImageFileIn(
            value=bytes(side * side), image_size=side, similarity="CosineDistance"
        )
        with pytest.raises(grpc.RpcError) as caught:
            rpc.stub.FindSimilar(request, timeout=120)
        error = caught.value
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (side, error.details())
        assert f"image_size {side} is over the limit of {limit}" in error.details()
        assert f"at most {limit}" in error.details()
    images = find_similar(rpc, photo("astronaut"), limit)
    assert all(len(data) == limit * limit * 3 for data in images)
    assert indexed.service.limits.max_find_similar_size == limit
