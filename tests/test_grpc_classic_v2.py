"""Version 2 of the classic ``SimilarImage.FindSimilar`` contract over real gRPC, beside version 1.

Version 2 (lookalike/server/protos/similar_image_v2.proto, as its user guide publishes it) sends
an image file as base64 text in ``image`` (field 1) and ``similarity`` in field 4, and gets five
base64 image files back; version 1 sends raw pixels in ``value`` (field 1), ``image_size`` (2)
and ``similarity`` (3), and gets raw RGB back. Both call ``/SimilarImage/FindSimilar`` on one
server, which tells them apart by the request. The clients here are written the way the
guide's clients are: ``base64.b64encode(open(f, "rb").read()).decode()`` in, and
``base64.b64decode(reply.imageOut1)`` written to a file and opened with PIL out.
"""

from __future__ import annotations

import base64
import io
import shutil
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import photo
from google.protobuf.descriptor import FieldDescriptor
from PIL import Image

from lookalike.core.collection import Collection
from lookalike.server.grpc_server import (
    FIND_SIMILAR_V2_REPLY_BYTES,
    FIND_SIMILAR_V2_SIDE,
    create_grpc_server,
)
from lookalike.server.protos import lookalike_v1_pb2 as lookalike_v1
from lookalike.server.protos import lookalike_v1_pb2_grpc as lookalike_v1_grpc
from lookalike.server.protos import similar_image_pb2 as classic_v1
from lookalike.server.protos import similar_image_pb2_grpc as classic_v1_grpc
from lookalike.server.protos import similar_image_v2_pb2 as classic_v2
from lookalike.server.protos import similar_image_v2_pb2_grpc as classic_v2_grpc
from lookalike.server.service import SearchService, ServiceLimits

LIMITS = ServiceLimits(max_upload_bytes=2_000_000, max_pixels=5_000_000, max_k=50)
SIZE = 64  # version 1's image_size


class Served:
    """A started gRPC server over a collection, and clients of every version on one channel."""

    def __init__(self, service: SearchService) -> None:
        self.server, port = create_grpc_server(service, port=0, max_workers=4)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")  # default options: 4 MiB
        self.v1 = classic_v1_grpc.SimilarImageStub(self.channel)
        self.v2 = classic_v2_grpc.SimilarImageStub(self.channel)
        self.search = lookalike_v1_grpc.LookalikeStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.server.stop(None).wait()


def index(folder: Path, collection_dir: Path, encoder: Any) -> Collection:
    collection = Collection(collection_dir)
    collection.use_encoder(encoder)  # the session's encoder; building one takes seconds
    collection.index(folder, workers=0)
    return collection


@pytest.fixture(scope="module")
def photos(photo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("classic-v2") / "photos"
    shutil.copytree(photo_dir, folder)
    return folder


@pytest.fixture(scope="module")
def served(photos: Path, encoder: Any) -> Iterator[Served]:
    collection = index(photos, photos.parent / "collection", encoder)
    running = Served(SearchService(collection, limits=LIMITS))
    yield running
    running.close()
    collection.close()


def path_of(photos: Path, name: str) -> Path:
    return next(photos.rglob(f"{name}.jpg"))


def outputs(reply: Any) -> list[Any]:
    return [reply.imageOut1, reply.imageOut2, reply.imageOut3, reply.imageOut4, reply.imageOut5]


def published_client(served: Served, path: Path, similarity: str, out: Path) -> list[Path]:
    """What the guide's clients do: send the file as base64 text, write each answer to a file."""
    with open(path, "rb") as file:
        image = base64.b64encode(file.read()).decode()
    request = classic_v2.ImageFileIn(image=image, similarity=similarity)
    reply = served.v2.FindSimilar(request, timeout=60)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for number, text in enumerate(outputs(reply), 1):
        target = out / f"imageOut{number}.jpg"
        with open(target, "wb") as file:
            file.write(base64.b64decode(text))
        written.append(target)
    return written


def difference(image: Image.Image, name: str) -> float:
    """Mean absolute pixel difference from a photo, both squashed to 64 x 64."""
    mine = np.asarray(image.convert("RGB").resize((64, 64)), dtype=np.int16)
    theirs = np.asarray(photo(name).resize((64, 64)), dtype=np.int16)
    return float(np.abs(mine - theirs).mean())


def ranked(served: Served, data: bytes, metric: str) -> list[str]:
    """The five best photo names by lookalike.v1 Search (the path REST searches through)."""
    reply = served.search.Search(lookalike_v1.SearchRequest(image=data, k=5, metric=metric))
    return [Path(match.path).stem for match in reply.matches]


def bounded(size: tuple[int, int]) -> tuple[int, int]:
    """A photo's size as version 2 answers it: at most FIND_SIMILAR_V2_SIDE a side."""
    scale = min(1.0, FIND_SIMILAR_V2_SIDE / max(size))
    return round(size[0] * scale), round(size[1] * scale)


def rpc_error(call: Any, request: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=60)
    return caught.value


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def wire(*fields: tuple[int, int, bytes]) -> bytes:
    """A protobuf message by hand: (field number, wire type, payload) in order."""
    message = b""
    for number, wire_type, payload in fields:
        message += _varint(number << 3 | wire_type)
        message += _varint(len(payload)) + payload if wire_type == 2 else payload
    return message


def _varint(number: int) -> bytes:
    out = bytearray()
    while True:
        byte, number = number & 0x7F, number >> 7
        out.append(byte | (0x80 if number else 0))
        if not number:
            return bytes(out)


# -- (a) the published client --------------------------------------------------------------


@pytest.mark.parametrize("name", ["astronaut", "retina"])
def test_published_client_gets_five_image_files_the_query_first(
    served: Served, photos: Path, tmp_path: Path, name: str
) -> None:
    query = path_of(photos, name)
    files = published_client(served, query, "CosineDistance", tmp_path)
    assert len(files) == 5
    order = ranked(served, query.read_bytes(), "cosine")
    assert order[0] == name
    for file, expected in zip(files, order, strict=True):
        with Image.open(file) as image:  # a real image file, as the guide's clients open it
            assert image.format == "JPEG"
            image.load()
            # The indexed image itself, in the same order as the REST search path ranks it,
            # at most FIND_SIMILAR_V2_SIDE pixels a side (retina is 1411 x 1411).
            assert image.size == bounded(photo(expected).size), expected
            assert difference(image, expected) < 10, expected
    with Image.open(files[0]) as first:
        assert difference(first, name) < 10
        assert min(difference(first, other) for other in order[1:]) > 20


# -- (b) "Test" is EuclideanDistance -------------------------------------------------------


@pytest.mark.parametrize("name", ["coffee", "chelsea"])
def test_similarity_test_searches_as_euclidean_distance(
    served: Served, photos: Path, name: str
) -> None:
    image = base64.b64encode(path_of(photos, name).read_bytes()).decode()
    replies = {
        similarity: served.v2.FindSimilar(
            classic_v2.ImageFileIn(image=image, similarity=similarity), timeout=60
        )
        for similarity in ("Test", "EuclideanDistance", "CosineDistance")
    }
    assert outputs(replies["Test"]) == outputs(replies["EuclideanDistance"])
    order = ranked(served, path_of(photos, name).read_bytes(), "euclidean")
    for text, expected in zip(outputs(replies["Test"]), order, strict=True):
        assert difference(Image.open(io.BytesIO(base64.b64decode(text))), expected) < 10
    assert outputs(replies["CosineDistance"])[0] == outputs(replies["Test"])[0]  # itself first


# -- (c) version 1 on the same server ------------------------------------------------------


def test_version_1_and_version_2_clients_share_one_server(served: Served, photos: Path) -> None:
    def version_1(name: str) -> None:
        query = photo(name).resize((SIZE, SIZE))
        request = classic_v1.ImageFileIn(
            value=query.tobytes(), image_size=SIZE, similarity="CosineDistance"
        )
        images = outputs(served.v1.FindSimilar(request, timeout=60))
        assert all(len(data) == SIZE * SIZE * 3 for data in images)  # raw RGB, as ever
        first = np.asarray(Image.frombytes("RGB", (SIZE, SIZE), images[0]), dtype=np.int16)
        assert np.abs(first - np.asarray(query, dtype=np.int16)).mean() < 10

    def version_2(name: str) -> None:
        image = base64.b64encode(path_of(photos, name).read_bytes()).decode()
        reply = served.v2.FindSimilar(
            classic_v2.ImageFileIn(image=image, similarity="CosineDistance"), timeout=60
        )
        files = [base64.b64decode(text, validate=True) for text in outputs(reply)]
        assert all(data.startswith(b"\xff\xd8\xff") for data in files)  # JPEG files
        assert difference(Image.open(io.BytesIO(files[0])), name) < 10

    calls = [(version, name) for name in ("astronaut", "rocket") for version in (1, 2)] * 2
    with ThreadPoolExecutor(4) as pool:
        done = [
            pool.submit(version_1 if version == 1 else version_2, name) for version, name in calls
        ]
        for future in done:
            future.result()


# -- (d) bad input ----------------------------------------------------------------------------


def _truncated_jpeg() -> str:
    data = jpeg(photo("astronaut"))
    return base64.b64encode(data[: len(data) // 3]).decode()


@pytest.mark.parametrize(
    ("image", "similarity", "code", "message"),
    [
        ("this is not base64!", "CosineDistance", "INVALID_ARGUMENT", "not valid base64: '!'"),
        ("QUJDREVGR", "CosineDistance", "INVALID_ARGUMENT", "not valid base64: 9 characters"),
        ("QU=JD", "EuclideanDistance", "INVALID_ARGUMENT", "not valid base64"),
        ("aW1hZ2U=\u00e9", "Test", "INVALID_ARGUMENT", "not valid base64: '\u00e9'"),
        (
            base64.b64encode(b"definitely not an image").decode(),
            "CosineDistance",
            "INVALID_ARGUMENT",
            "image: ",
        ),
        (_truncated_jpeg(), "Test", "INVALID_ARGUMENT", "image: "),
        ("", "CosineDistance", "INVALID_ARGUMENT", "image is empty"),
        ("A" * 2_000_100, "CosineDistance", "RESOURCE_EXHAUSTED", "characters of base64"),
        (
            base64.b64encode(b"\xff\xd8" * 10).decode(),
            "Manhattan",
            "INVALID_ARGUMENT",
            "'Manhattan'; expected one of: CosineDistance, EuclideanDistance, Test",
        ),
    ],
    ids=[
        "not-base64",
        "bad-length",
        "padding-inside",
        "not-ascii",
        "not-an-image",
        "truncated-jpeg",
        "empty-image",
        "over-the-limit",
        "unknown-similarity",
    ],
)
def test_bad_version_2_requests_are_refused_clearly(
    served: Served, image: str, similarity: str, code: str, message: str
) -> None:
    error = rpc_error(
        served.v2.FindSimilar, classic_v2.ImageFileIn(image=image, similarity=similarity)
    )
    assert error.code() == getattr(grpc.StatusCode, code), error.details()
    assert message in error.details(), error.details()
    if message == "image: ":
        assert error.details().startswith("image: "), error.details()


def test_bad_pixels_are_judged_by_the_version_they_came_in(served: Served) -> None:
    """The same wrong-length raw pixels: version 1 says as ever that they fit no square;
    version 2, given them as base64 text, says they are no image file."""
    pixels = bytes(SIZE * SIZE * 3 + 1)
    request = classic_v1.ImageFileIn(value=pixels, image_size=SIZE, similarity="CosineDistance")
    error = rpc_error(served.v1.FindSimilar, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"{len(pixels)} bytes" in error.details() and "(RGB)" in error.details()
    text = base64.b64encode(pixels).decode()
    error = rpc_error(
        served.v2.FindSimilar, classic_v2.ImageFileIn(image=text, similarity="CosineDistance")
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("image: ") and "(RGB)" not in error.details()


# -- (e) edge cases of telling the versions apart -------------------------------------------


def square_base64_jpeg(side: int) -> str:
    """Base64 text of a real JPEG (the astronaut) whose length is 3 * side * side: what version
    1 would take for raw RGB pixels of a side x side square."""
    data = jpeg(photo("astronaut").resize((96, 96)), quality=90)
    size = 3 * side * side // 4 * 3  # base64 of this many bytes has 3 * side^2 characters
    assert len(data) <= size
    text = base64.b64encode(data + bytes(size - len(data))).decode()  # trailing bytes: ignored
    assert len(text) == 3 * side * side
    return text


def test_base64_whose_length_fits_raw_pixels_is_still_version_2(served: Served) -> None:
    text = square_base64_jpeg(SIZE)
    reply = served.v2.FindSimilar(
        classic_v2.ImageFileIn(image=text, similarity="CosineDistance"), timeout=60
    )
    first = Image.open(io.BytesIO(base64.b64decode(reply.imageOut1)))
    assert first.format == "JPEG" and difference(first, "astronaut") < 10
    # The same text as version 1's raw pixels (with image_size): read as pixels, as ever.
    request = classic_v1.ImageFileIn(
        value=text.encode(), image_size=SIZE, similarity="CosineDistance"
    )
    images = outputs(served.v1.FindSimilar(request, timeout=60))
    assert all(len(data) == SIZE * SIZE * 3 for data in images)
    assert images[0] != base64.b64decode(reply.imageOut1)


def test_a_request_without_similarity_is_told_by_its_image(served: Served, photos: Path) -> None:
    """Field 1 alone fits both versions (both need a similarity, so it is an error either way):
    base64 of an image file is answered in version 2's words, raw pixels in version 1's."""
    image = base64.b64encode(path_of(photos, "rocket").read_bytes()).decode()
    error = rpc_error(served.v2.FindSimilar, classic_v2.ImageFileIn(image=image))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown similarity ''" in error.details() and "Test" in error.details()
    pixels = photo("rocket").resize((SIZE, SIZE)).tobytes()
    error = rpc_error(served.v1.FindSimilar, classic_v1.ImageFileIn(value=pixels))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == (
        "unknown similarity ''; expected one of: CosineDistance, EuclideanDistance"
    )


def test_lenient_base64_forms_are_read(served: Served, photos: Path) -> None:
    data = path_of(photos, "chelsea").read_bytes()
    plain = served.v2.FindSimilar(
        classic_v2.ImageFileIn(image=base64.b64encode(data).decode(), similarity="Test"),
        timeout=60,
    )
    for text in (
        base64.encodebytes(data).decode(),  # MIME: a line break every 76 characters
        base64.urlsafe_b64encode(data).decode().rstrip("="),  # URL-safe, unpadded
    ):
        reply = served.v2.FindSimilar(
            classic_v2.ImageFileIn(image=text, similarity="Test"), timeout=60
        )
        assert outputs(reply) == outputs(plain)


STRING = 2  # length-delimited
FLOAT = 5  # 32-bit


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        # Version 1's image_size and similarity with version 2's similarity: refused.
        (
            wire(
                (1, STRING, bytes(SIZE * SIZE * 3)),
                (2, FLOAT, struct.pack("<f", SIZE)),
                (4, STRING, b"CosineDistance"),
            ),
            "mixes the two versions",
        ),
        (
            wire((1, STRING, b"aW1hZ2U="), (3, STRING, b"Test"), (4, STRING, b"Test")),
            "mixes the two versions",
        ),
        # Version 2 whose image is not text at all.
        (wire((1, STRING, b"\xff\xfe\xfd"), (4, STRING, b"CosineDistance")), "UTF-8"),
        # Not a protobuf message (a length past the end).
        (b"\x0a\x05ab", "not a valid protobuf message"),
        # Nothing at all: both versions' fields are named.
        (b"", "empty request"),
    ],
    ids=["v1-size-and-v2-similarity", "both-similarities", "v2-not-text", "malformed", "empty"],
)
def test_requests_that_are_neither_version_are_invalid(
    served: Served, message: bytes, expected: str
) -> None:
    call = served.channel.unary_unary("/SimilarImage/FindSimilar")
    error = rpc_error(call, message)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert expected in error.details(), error.details()
    if expected == "empty request":
        assert "image_size" in error.details() and "base64" in error.details()


def test_version_2_on_the_wire_as_published(served: Served, photos: Path) -> None:
    """The published proto (version 1's service path, its own fields), and a client of it in
    any language: field 1 and field 4 in, fields 4-8 out, each base64 text of a JPEG file."""
    service = classic_v2.DESCRIPTOR.services_by_name["SimilarImage"]
    assert service.methods_by_name["FindSimilar"].full_name == "SimilarImage.FindSimilar"
    string = FieldDescriptor.TYPE_STRING
    request = classic_v2.ImageFileIn.DESCRIPTOR.fields_by_name
    assert {name: (field.number, field.type) for name, field in request.items()} == {
        "image": (1, string),
        "similarity": (4, string),
    }
    reply = classic_v2.ImageFileOut.DESCRIPTOR.fields_by_name
    assert {name: (field.number, field.type) for name, field in reply.items()} == {
        f"imageOut{n}": (n + 3, string) for n in range(1, 6)
    }
    # Both versions' modules load together (the v2 one keeps its own descriptor pool).
    assert classic_v1.ImageFileIn.DESCRIPTOR.fields_by_name["value"].number == 1
    assert classic_v2.ImageFileIn.__module__ == "lookalike.server.protos.similar_image_v2_pb2"

    image = base64.b64encode(path_of(photos, "coffee").read_bytes())
    call = served.channel.unary_unary("/SimilarImage/FindSimilar")
    answer = call(wire((1, STRING, image), (4, STRING, b"CosineDistance")), timeout=60)
    fields = classic_v2.ImageFileOut.FromString(answer)
    assert [field.number for field, _ in fields.ListFields()] == [4, 5, 6, 7, 8]
    stub = served.v2.FindSimilar(
        classic_v2.ImageFileIn(image=image.decode(), similarity="CosineDistance"), timeout=60
    )
    assert answer == stub.SerializeToString()
    first = base64.b64decode(fields.imageOut1, validate=True)
    assert difference(Image.open(io.BytesIO(first)), "coffee") < 10


# -- the reply's size, and too few images ------------------------------------------------------


def test_version_2_replies_fit_what_a_client_accepts(
    tmp_path: Path, photos: Path, encoder: Any
) -> None:
    """Five large images that compress badly (noise) still come back, each at most
    FIND_SIMILAR_V2_SIDE a side, the reply within a client's default 4 MiB."""
    folder = tmp_path / "noise"
    folder.mkdir()
    rng = np.random.default_rng(7)
    for number in range(5):
        # Noise in 2 x 2 blocks: halved to FIND_SIMILAR_V2_SIDE, it is still noise.
        pixels = rng.integers(0, 256, (768, FIND_SIMILAR_V2_SIDE, 3), dtype=np.uint8)
        blocks = pixels.repeat(2, axis=0).repeat(2, axis=1)
        Image.fromarray(blocks).save(folder / f"noise{number}.png", compress_level=1)
    collection = index(folder, tmp_path / "collection", encoder)
    empty = Collection(tmp_path / "empty")
    empty.use_encoder(encoder)
    servers = [Served(SearchService(collection, limits=LIMITS)), Served(SearchService(empty))]
    image = base64.b64encode(path_of(photos, "astronaut").read_bytes()).decode()
    request = classic_v2.ImageFileIn(image=image, similarity="CosineDistance")
    try:
        reply = servers[0].v2.FindSimilar(request, timeout=120)
        assert reply.ByteSize() <= FIND_SIMILAR_V2_REPLY_BYTES
        for text in outputs(reply):
            with Image.open(io.BytesIO(base64.b64decode(text))) as file:
                assert file.format == "JPEG" and max(file.size) <= FIND_SIMILAR_V2_SIDE
        error = rpc_error(servers[1].v2.FindSimilar, request)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error.details() == "the collection has no indexed images yet"
    finally:
        for server in servers:
            server.close()
        collection.close()
        empty.close()
