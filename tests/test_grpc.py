"""The gRPC services over real gRPC: a grpcio server on loopback and clients with the stubs."""

from __future__ import annotations

import io
import logging
import os
import pickle
import shutil
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import photo
from PIL import Image

from lookalike.core.collection import Collection
from lookalike.errors import LookalikeError
from lookalike.server.grpc_server import MESSAGE_OVERHEAD, create_grpc_server
from lookalike.server.protos import lookalike_v1_pb2 as v1
from lookalike.server.protos import lookalike_v1_pb2_grpc as v1_grpc
from lookalike.server.protos import similar_image_pb2 as classic
from lookalike.server.protos import similar_image_pb2_grpc as classic_grpc
from lookalike.server.service import SearchService, ServiceLimits

TOKEN = "s3cret-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
LIMITS = ServiceLimits(max_upload_bytes=2_000_000, max_pixels=5_000_000, max_k=50)
SIZE = 64
ROOT = Path(__file__).resolve().parents[1]
PROTOS = ROOT / "lookalike" / "server" / "protos"


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def small(name: str, mode: str = "RGB") -> Image.Image:
    """A photo squashed to SIZE x SIZE, in ``mode``."""
    return photo(name).resize((SIZE, SIZE)).convert(mode)


def with_alpha(image: Image.Image, alpha: np.ndarray) -> Image.Image:
    """``image`` (L or RGB) with an alpha channel (LA or RGBA)."""
    pixels = np.asarray(image)
    if pixels.ndim == 2:
        pixels = pixels[..., np.newaxis]
    return Image.fromarray(np.concatenate([pixels, alpha[..., np.newaxis]], axis=-1))


def pixels_of(data: bytes) -> np.ndarray:
    return np.asarray(Image.frombytes("RGB", (SIZE, SIZE), data), dtype=np.int16)


def outputs(reply: classic.ImageFileOut) -> list[bytes]:
    return [reply.imageOut1, reply.imageOut2, reply.imageOut3, reply.imageOut4, reply.imageOut5]


class Served:
    """A started gRPC server over a collection, and a channel to it."""

    def __init__(self, service: SearchService) -> None:
        self.service = service
        self.server, self.port = create_grpc_server(service, port=0, max_workers=4)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")  # default options
        self.classic = classic_grpc.SimilarImageStub(self.channel)
        self.v1 = v1_grpc.LookalikeStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.server.stop(None).wait()


def indexed(folder: Path, collection_dir: Path, encoder) -> Collection:
    collection = Collection(collection_dir)
    collection.use_encoder(encoder)  # share the session's encoder; building one takes seconds
    csv_path = collection_dir.parent / "meta.csv"
    csv_path.write_text("file,title,year\nastronaut.jpg,Astronaut,1984\n")
    collection.index(folder, workers=0, metadata_csv=csv_path, local_features=True)
    return collection


@pytest.fixture(scope="module")
def served(photo_dir: Path, tmp_path_factory: pytest.TempPathFactory, encoder) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("grpc") / "photos"
    shutil.copytree(photo_dir, folder)
    collection = indexed(folder, folder.parent / "collection", encoder)
    running = Served(SearchService(collection, token=TOKEN, limits=LIMITS))
    yield running
    running.close()
    collection.close()


def rpc_error(call, request, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=60, **kwargs)
    return caught.value


def find_similar(served: Served, image: Image.Image, similarity: str) -> classic.ImageFileOut:
    request = classic.ImageFileIn(
        value=image.tobytes(), image_size=float(image.width), similarity=similarity
    )
    return served.classic.FindSimilar(request, timeout=60)


# -- the classic SimilarImage contract --------------------------------------------------------


@pytest.mark.parametrize("similarity", ["CosineDistance", "EuclideanDistance"])
@pytest.mark.parametrize("name", ["astronaut", "coffee"])
def test_find_similar_answers_five_rgb_images_the_query_first(
    served: Served, similarity: str, name: str
) -> None:
    query = small(name)
    reply = find_similar(served, query, similarity)
    images = outputs(reply)
    assert all(len(data) == SIZE * SIZE * 3 for data in images)
    decoded = [pixels_of(data) for data in images]
    want = np.asarray(query, dtype=np.int16)
    differences = [float(np.abs(pixels - want).mean()) for pixels in decoded]
    assert differences[0] < 10, differences
    assert min(differences[1:]) > 20, differences  # the other four are other photos
    assert len({data for data in images}) == 5


def test_find_similar_reads_grayscale_and_flattens_transparency_on_white(served: Served) -> None:
    rgb = small("chelsea")
    gray = small("chelsea", "L")
    opaque = np.full((SIZE, SIZE), 255, np.uint8)
    want = np.asarray(rgb, dtype=np.int16)
    for query in (gray, with_alpha(gray, opaque)):
        first = pixels_of(find_similar(served, query, "CosineDistance").imageOut1)
        assert np.abs(first - want).mean() < 10, query.mode
    # RGBA is flattened onto white: transparent pixels search like white ones.
    alpha = opaque.copy()
    alpha[: SIZE // 2] = 0
    white_top = np.asarray(rgb).copy()
    white_top[: SIZE // 2] = 255
    transparent = find_similar(served, with_alpha(rgb, alpha), "EuclideanDistance")
    white = find_similar(served, Image.fromarray(white_top), "EuclideanDistance")
    assert outputs(transparent) == outputs(white)
    opaque_reply = find_similar(served, with_alpha(rgb, opaque), "CosineDistance")
    assert outputs(opaque_reply) == outputs(find_similar(served, rgb, "CosineDistance"))


def test_find_similar_contract_on_the_wire(served: Served) -> None:
    """An existing client's bytes: method /SimilarImage/FindSimilar, fields 1-3 in, 4-8 out."""
    query = small("rocket")
    value = query.tobytes()
    wire = (
        b"\x0a" + _varint(len(value)) + value  # field 1, bytes
        + b"\x15" + struct.pack("<f", SIZE)  # field 2, float
        + b"\x1a" + _varint(len(b"CosineDistance")) + b"CosineDistance"  # field 3, string
    )  # fmt: skip
    call = served.channel.unary_unary("/SimilarImage/FindSimilar")
    answer = call(wire, timeout=60)
    fields = {number: data for number, data in _fields(answer)}
    assert sorted(fields) == [4, 5, 6, 7, 8]
    first = pixels_of(fields[4])
    assert np.abs(first - np.asarray(query, dtype=np.int16)).mean() < 10


def _varint(number: int) -> bytes:
    out = bytearray()
    while True:
        byte, number = number & 0x7F, number >> 7
        out.append(byte | (0x80 if number else 0))
        if not number:
            return bytes(out)


def _fields(message: bytes) -> Iterator[tuple[int, bytes]]:
    """Length-delimited fields of a protobuf message, parsed by hand."""
    position = 0
    while position < len(message):
        key, position = _read_varint(message, position)
        assert key & 7 == 2, "every ImageFileOut field is bytes"
        length, position = _read_varint(message, position)
        yield key >> 3, message[position : position + length]
        position += length


def _read_varint(data: bytes, position: int) -> tuple[int, int]:
    number, shift = 0, 0
    while True:
        byte = data[position]
        position += 1
        number |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return number, position


def test_find_similar_unknown_similarity_names_the_valid_ones(served: Served) -> None:
    query = small("astronaut")
    request = classic.ImageFileIn(value=query.tobytes(), image_size=SIZE, similarity="Manhattan")
    error = rpc_error(served.classic.FindSimilar, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Manhattan" in error.details()
    assert "CosineDistance" in error.details() and "EuclideanDistance" in error.details()


@pytest.mark.parametrize(
    ("length", "image_size"),
    [
        (SIZE * SIZE * 3 + 1, SIZE),  # one byte too many for RGB
        (SIZE * SIZE * 5, SIZE),  # five channels
        (SIZE * SIZE // 2, SIZE),  # half a channel
        (SIZE * SIZE * 3, SIZE + 1),  # the wrong side
    ],
)
def test_find_similar_byte_length_that_fits_no_channel_count(
    served: Served, length: int, image_size: int
) -> None:
    request = classic.ImageFileIn(
        value=bytes(length), image_size=image_size, similarity="CosineDistance"
    )
    error = rpc_error(served.classic.FindSimilar, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"{length} bytes" in error.details() and "(RGB)" in error.details()


@pytest.mark.parametrize("image_size", [0.0, -64.0, 63.5, float("nan"), float("inf"), 3000.0])
def test_find_similar_refuses_a_bad_image_size(served: Served, image_size: float) -> None:
    request = classic.ImageFileIn(
        value=bytes(SIZE * SIZE * 3), image_size=image_size, similarity="CosineDistance"
    )
    error = rpc_error(served.classic.FindSimilar, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "image_size" in error.details()


def test_find_similar_refuses_sizes_whose_replies_are_over_the_limit(served: Served) -> None:
    side = 900  # as L: 810 kB in, but each RGB reply image would be 2.43 MB, over the 2 MB limit
    request = classic.ImageFileIn(
        value=bytes(side * side), image_size=side, similarity="CosineDistance"
    )
    error = rpc_error(served.classic.FindSimilar, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "per RGB reply image" in error.details()


def test_find_similar_refuses_empty_requests(served: Served) -> None:
    error = rpc_error(served.classic.FindSimilar, classic.ImageFileIn())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "empty request" in error.details()
    request = classic.ImageFileIn(image_size=SIZE, similarity="CosineDistance")
    error = rpc_error(served.classic.FindSimilar, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "value is empty" in error.details()


def test_find_similar_raw_pixels_over_the_upload_limit(served: Served) -> None:
    side = 900  # 900 x 900 x 3 = 2.43 MB: over the 2 MB limit plus framing
    request = classic.ImageFileIn(
        value=bytes(side * side * 3), image_size=side, similarity="CosineDistance"
    )
    error = rpc_error(served.classic.FindSimilar, request)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_find_similar_needs_five_images_and_says_so(
    photo_dir: Path, tmp_path: Path, encoder
) -> None:
    folder = tmp_path / "three"
    folder.mkdir()
    for path in sorted(photo_dir.rglob("*.jpg"))[:3]:
        shutil.copy(path, folder / path.name)
    empty = Collection(tmp_path / "empty")
    empty.use_encoder(encoder)
    three = indexed(folder, tmp_path / "collection", encoder)
    servers = [Served(SearchService(three)), Served(SearchService(empty))]
    try:
        request = classic.ImageFileIn(
            value=small("astronaut").tobytes(), image_size=SIZE, similarity="CosineDistance"
        )
        error = rpc_error(servers[0].classic.FindSimilar, request)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "only 3" in error.details() and "at least 5" in error.details()
        error = rpc_error(servers[1].classic.FindSimilar, request)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error.details() == "the collection has no indexed images yet"
        search = v1.SearchRequest(image=jpeg(photo("astronaut")))
        assert rpc_error(servers[1].v1.Search, search).code() == (
            grpc.StatusCode.FAILED_PRECONDITION
        )
        stats = servers[1].v1.Stats(v1.StatsRequest(), timeout=60)
        assert stats.images == 0 and not stats.HasField("index_kind")
    finally:
        for server in servers:
            server.close()
        three.close()
        empty.close()


# -- lookalike.v1 ------------------------------------------------------------------------------


def test_search_finds_the_file_itself_first_with_ids_scores_and_metadata(
    served: Served, photo_dir: Path
) -> None:
    request = v1.SearchRequest(image=(photo_dir / "astronaut.jpg").read_bytes(), k=4)
    reply = served.v1.Search(request, timeout=60)
    assert len(reply.matches) == 4 and not reply.no_close_match and reply.metric == "cosine"
    best = reply.matches[0]
    assert best.path == "astronaut.jpg"  # the file's name; server folders stay on the server
    assert best.score == pytest.approx(1.0, abs=5e-3)
    assert dict(best.metadata) == {"title": "Astronaut", "year": "1984"}
    assert (best.width, best.height) == (512, 512)
    assert reply.HasField("best_score") and reply.best_score == pytest.approx(best.score)
    scores = [match.score for match in reply.matches]
    assert scores == sorted(scores, reverse=True) and scores[1] < 0.9
    ids = [match.id for match in reply.matches]
    assert len(set(ids)) == 4 and all(i > 0 for i in ids)
    assert all(dict(match.metadata) == {} for match in reply.matches[1:])


def test_search_euclidean_threshold_and_where(served: Served, photo_dir: Path) -> None:
    coffee = next(photo_dir.rglob("coffee.jpg")).read_bytes()
    reply = served.v1.Search(v1.SearchRequest(image=coffee, k=3, metric="euclidean"), timeout=60)
    assert reply.metric == "euclidean" and reply.matches[0].path == "coffee.jpg"
    distances = [match.score for match in reply.matches]
    assert distances == sorted(distances) and distances[0] < 1e-2
    filtered = served.v1.Search(
        v1.SearchRequest(image=coffee, k=5, where={"title": "Astronaut"}), timeout=60
    )
    assert [match.path for match in filtered.matches] == ["astronaut.jpg"]
    from skimage import data

    checker = jpeg(Image.fromarray(data.checkerboard()).convert("RGB"))
    none = served.v1.Search(v1.SearchRequest(image=checker, threshold=0.95), timeout=60)
    assert none.no_close_match and not none.matches and none.best_score < 0.95
    default_k = served.v1.Search(v1.SearchRequest(image=checker), timeout=60)
    assert len(default_k.matches) == 6  # k = 0 means 10, and the collection holds 6


def test_search_reranks_an_edited_copy_and_expands_the_query(served: Served) -> None:
    width, height = photo("coffee").size
    edited = photo("coffee").crop((0, 0, width * 3 // 4, height * 3 // 4)).rotate(20, expand=True)
    plain = served.v1.Search(v1.SearchRequest(image=jpeg(edited), k=3), timeout=60)
    verified = served.v1.Search(v1.SearchRequest(image=jpeg(edited), k=3, rerank=3), timeout=60)
    assert plain.matches[0].path == verified.matches[0].path == "coffee.jpg"
    assert verified.matches[0].score > plain.matches[0].score + 0.02  # verified by inliers
    expanded = served.v1.Search(
        v1.SearchRequest(image=jpeg(edited), k=3, query_expansion=2), timeout=60
    )
    assert expanded.matches[0].path == "coffee.jpg" and len(expanded.matches) == 3


def test_stats(served: Served) -> None:
    stats = served.v1.Stats(v1.StatsRequest(), timeout=60)
    assert stats.images >= 6 and stats.model == "efficientnet-lite0" and stats.dim > 0
    assert stats.HasField("index_kind") and stats.index_kind and stats.schema_version > 0


def added_image() -> bytes:
    from skimage import data

    return jpeg(Image.fromarray(data.camera()).convert("RGB"))


def test_add_needs_the_token_then_search_finds_it_and_remove_drops_it(served: Served) -> None:
    image = added_image()
    request = v1.AddRequest(image=image, filename="dir/camera.jpg", metadata={"kind": "camera"})
    before = served.v1.Stats(v1.StatsRequest(), timeout=60).images
    for metadata in [(), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)]:
        error = rpc_error(served.v1.Add, request, metadata=metadata)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "token" in error.details()
    assert served.v1.Stats(v1.StatsRequest(), timeout=60).images == before

    added = served.v1.Add(request, timeout=60, metadata=AUTH)
    assert added.id > 0
    reply = served.v1.Search(v1.SearchRequest(image=image, k=2), timeout=60)
    best = reply.matches[0]
    assert best.id == added.id and best.score == pytest.approx(1.0, abs=5e-3)
    assert dict(best.metadata) == {"kind": "camera", "filename": "camera.jpg"}
    assert served.v1.Stats(v1.StatsRequest(), timeout=60).images == before + 1

    removal = v1.RemoveRequest(id=added.id)
    assert rpc_error(served.v1.Remove, removal).code() == grpc.StatusCode.UNAUTHENTICATED
    served.v1.Remove(removal, timeout=60, metadata=(("authorization", f"bearer {TOKEN}"),))
    reply = served.v1.Search(v1.SearchRequest(image=image, k=10), timeout=60)
    assert added.id not in [match.id for match in reply.matches]
    assert served.v1.Stats(v1.StatsRequest(), timeout=60).images == before
    error = rpc_error(served.v1.Remove, removal, metadata=AUTH)
    assert error.code() == grpc.StatusCode.NOT_FOUND and str(added.id) in error.details()


@pytest.mark.parametrize("image_id", [987_654_321, 0, -5])
def test_remove_unknown_id_is_not_found(served: Served, image_id: int) -> None:
    error = rpc_error(served.v1.Remove, v1.RemoveRequest(id=image_id), metadata=AUTH)
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_corrupt_and_empty_images_are_invalid(served: Served, photo_dir: Path) -> None:
    data = (photo_dir / "astronaut.jpg").read_bytes()
    for bad in (data[: len(data) // 3], b"definitely not an image", b""):
        error = rpc_error(served.v1.Search, v1.SearchRequest(image=bad))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, bad[:20]
        assert error.details().startswith("image: "), error.details()
        error = rpc_error(served.v1.Add, v1.AddRequest(image=bad), metadata=AUTH)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.details().startswith("image: "), error.details()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"k": 51}, "between 1 and 50"),
        ({"k": -1}, "between 1 and 50"),
        ({"metric": "manhattan"}, "'manhattan'; expected one of: cosine, euclidean, dot"),
        ({"metric": "hamming"}, "cosine, euclidean, dot"),
        ({"threshold": float("nan")}, "threshold"),
        ({"rerank": 51}, "rerank must be between 0 and 50"),
        ({"rerank": -2}, "rerank must be between 0 and 50"),
        ({"query_expansion": 101}, "query_expansion must be between 0 and 100"),
    ],
)
def test_bad_search_parameters_are_invalid(
    served: Served, photo_dir: Path, fields: dict, message: str
) -> None:
    request = v1.SearchRequest(image=next(photo_dir.rglob("coffee.jpg")).read_bytes(), **fields)
    error = rpc_error(served.v1.Search, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.details()


def test_oversized_messages_are_resource_exhausted(served: Served) -> None:
    limit = LIMITS.max_upload_bytes
    # Beyond the message limit, gRPC itself refuses the request.
    huge = v1.SearchRequest(image=bytes(limit + MESSAGE_OVERHEAD + 1))
    assert rpc_error(served.v1.Search, huge).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Within the framing allowance but over the image limit, the service refuses it alike.
    over = v1.AddRequest(image=bytes(limit + 1))
    error = rpc_error(served.v1.Add, over, metadata=AUTH)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"limit of {limit} bytes" in error.details()


def test_unexpected_errors_are_internal_without_details(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(SearchService):
        def stats(self):
            raise RuntimeError("secret detail at /srv/private/catalog.db")

    broken = Served(Broken(served.service.collection, limits=LIMITS))
    try:
        with caplog.at_level(logging.ERROR, logger="lookalike.server.grpc_server"):
            error = rpc_error(broken.v1.Stats, v1.StatsRequest())
    finally:
        broken.close()
    assert error.code() == grpc.StatusCode.INTERNAL
    assert error.details() == "internal server error"
    assert "secret detail" in caplog.text  # logged for the operator, not sent to the client


def test_concurrent_searches_while_images_are_added_and_removed(
    served: Served, photo_dir: Path
) -> None:
    queries = {
        name: next(photo_dir.rglob(f"{name}.jpg")).read_bytes()
        for name in ("astronaut", "chelsea", "rocket")
    }
    errors: list[BaseException] = []
    cycles: list[int] = []
    stop = threading.Event()

    def search(name: str) -> None:
        try:
            for _ in range(5):
                reply = served.v1.Search(v1.SearchRequest(image=queries[name], k=3), timeout=60)
                assert reply.matches[0].path == f"{name}.jpg"
                out = find_similar(served, small(name), "CosineDistance")
                assert len(out.imageOut5) == SIZE * SIZE * 3
        except BaseException as error:
            errors.append(error)

    def write() -> None:
        image = added_image()
        try:
            while not stop.is_set():
                added = served.v1.Add(v1.AddRequest(image=image), timeout=60, metadata=AUTH)
                served.v1.Remove(v1.RemoveRequest(id=added.id), timeout=60, metadata=AUTH)
                cycles.append(added.id)
        except BaseException as error:
            errors.append(error)

    before = served.v1.Stats(v1.StatsRequest(), timeout=60).images
    writer = threading.Thread(target=write)
    searchers = [threading.Thread(target=search, args=(name,)) for name in queries]
    writer.start()
    for thread in searchers:
        thread.start()
    for thread in searchers:
        thread.join(timeout=120)
    stop.set()
    writer.join(timeout=120)
    assert not errors, errors
    assert cycles  # the writer added and removed while the searches ran
    assert served.v1.Stats(v1.StatsRequest(), timeout=60).images == before


# -- the server and the generated code ------------------------------------------------------


def test_a_port_in_use_is_an_error_not_shared(served: Served) -> None:
    with pytest.raises(LookalikeError, match="cannot listen"):
        create_grpc_server(served.service, port=served.port)
    with socket.socket() as sock:  # a port held by another program
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        with pytest.raises(LookalikeError, match="cannot listen"):
            create_grpc_server(served.service, port=sock.getsockname()[1])


def test_generated_modules_live_in_the_package_and_messages_pickle() -> None:
    assert v1.SearchRequest.__module__ == "lookalike.server.protos.lookalike_v1_pb2"
    service = classic.DESCRIPTOR.services_by_name["SimilarImage"]
    assert service.full_name == "SimilarImage"  # no package: the path existing clients call
    assert service.methods_by_name["FindSimilar"].full_name == "SimilarImage.FindSimilar"
    assert v1.DESCRIPTOR.services_by_name["Lookalike"].full_name == "lookalike.v1.Lookalike"
    message = v1.SearchRequest(image=b"x", k=3, where={"a": "b"}, threshold=0.5)
    assert pickle.loads(pickle.dumps(message)) == message


def test_generated_code_matches_the_protos(tmp_path: Path) -> None:
    tools = pytest.importorskip("grpc_tools")
    del tools
    from importlib.metadata import version

    generated = (PROTOS / "similar_image_pb2_grpc.py").read_text()
    if f"GRPC_GENERATED_VERSION = '{version('grpcio-tools')}'" not in generated:
        pytest.skip("the installed grpcio-tools is not the one that generated the code")
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen_protos.sh"), str(tmp_path)],
        check=True,
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
    )
    names = sorted(path.name for path in tmp_path.iterdir())
    assert names == sorted(path.name for path in PROTOS.glob("*_pb2*.py*"))
    for name in names:
        assert (tmp_path / name).read_text() == (PROTOS / name).read_text(), name
