"""One table (lookalike.server.status) answers every error alike over REST and gRPC, and no
answer names a server folder, a database URL or its password.

The outage test stops and restarts a PostgreSQL server of its own, so it never disturbs the
session server the other tests share.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import photo
from fastapi.testclient import TestClient
from PIL import Image

from lookalike.catalog import SqliteCatalog
from lookalike.core.collection import Collection
from lookalike.errors import (
    AuthError,
    CatalogError,
    CatalogUnavailableError,
    DecompressionBombError,
    DedupError,
    EmptyCollectionError,
    EncoderError,
    FileChangedError,
    FinetuneError,
    HashModelMismatchError,
    ImageError,
    LookalikeError,
    ModelMismatchError,
    NotAnImageError,
    NotFoundError,
    PayloadTooLargeError,
    RequestError,
    StorageError,
    VectorIndexError,
)
from lookalike.server.grpc_server import create_grpc_server
from lookalike.server.protos import lookalike_v1_pb2 as v1
from lookalike.server.protos import lookalike_v1_pb2_grpc as v1_grpc
from lookalike.server.rest import create_app
from lookalike.server.service import SearchService, ServiceLimits
from lookalike.server.status import ERROR_STATUSES, INTERNAL, scrub, status_for

Code = grpc.StatusCode

# The table as decided: (HTTP status, gRPC code) of each error kind.
EXPECTED: dict[type[BaseException], tuple[int, grpc.StatusCode]] = {
    RequestError: (400, Code.INVALID_ARGUMENT),
    PayloadTooLargeError: (413, Code.RESOURCE_EXHAUSTED),
    ImageError: (400, Code.INVALID_ARGUMENT),
    NotAnImageError: (400, Code.INVALID_ARGUMENT),
    DecompressionBombError: (413, Code.RESOURCE_EXHAUSTED),
    NotFoundError: (404, Code.NOT_FOUND),
    FileChangedError: (409, Code.FAILED_PRECONDITION),
    AuthError: (401, Code.UNAUTHENTICATED),
    EmptyCollectionError: (409, Code.FAILED_PRECONDITION),
    ModelMismatchError: (409, Code.FAILED_PRECONDITION),
    HashModelMismatchError: (409, Code.FAILED_PRECONDITION),
    CatalogError: (500, Code.INTERNAL),
    CatalogUnavailableError: (503, Code.UNAVAILABLE),
    StorageError: (507, Code.RESOURCE_EXHAUSTED),
    EncoderError: (500, Code.INTERNAL),
    FinetuneError: (500, Code.INTERNAL),
    VectorIndexError: (500, Code.INTERNAL),
    DedupError: (500, Code.INTERNAL),
    LookalikeError: (500, Code.INTERNAL),
    RuntimeError: (500, Code.INTERNAL),
}

SECRET_URL = "postgresql://reader:hunter2@db.internal:5432/prod"
SECRET_PATH = "/srv/private/catalogs/main.db"


def error_classes() -> list[type[LookalikeError]]:
    """LookalikeError and every subclass of it, however deep."""
    found: list[type[LookalikeError]] = []
    stack: list[type[LookalikeError]] = [LookalikeError]
    while stack:
        cls = stack.pop()
        if cls not in found:
            found.append(cls)
            stack.extend(cls.__subclasses__())
    return sorted(found, key=lambda cls: cls.__name__)


def make(cls: type[BaseException], text: str) -> BaseException:
    if issubclass(cls, ImageError):
        return cls(f"{SECRET_PATH}/upload.jpg", text)
    return cls(text)


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


# -- the table ---------------------------------------------------------------------------------


def test_every_error_class_resolves_to_an_entry() -> None:
    classes = error_classes()
    assert len(classes) > 20
    for cls in classes:
        entry = status_for(cls)
        assert entry in ERROR_STATUSES.values(), cls
        assert entry.http >= 400 and isinstance(entry.grpc, grpc.StatusCode), cls
        # The entry is that of the nearest class in the MRO that has one.
        owner = next(base for base in cls.__mro__ if base in ERROR_STATUSES)
        assert entry is ERROR_STATUSES[owner], cls
        if entry.http >= 500:
            assert entry.public, f"{cls.__name__}: a server fault needs a fixed public message"


@pytest.mark.parametrize("cls", list(EXPECTED), ids=lambda cls: cls.__name__)
def test_the_table_gives_the_decided_codes(cls: type[BaseException]) -> None:
    entry = status_for(cls)
    assert (entry.http, entry.grpc) == EXPECTED[cls]


def test_unexpected_exceptions_are_internal() -> None:
    assert status_for(KeyError) is INTERNAL and status_for(Exception) is INTERNAL
    assert (INTERNAL.http, INTERNAL.grpc) == (500, Code.INTERNAL)


def test_scrub_removes_folders_urls_and_absolute_paths() -> None:
    text = f"the collection at /tmp/x/coll has none; {SECRET_URL}: down; {SECRET_PATH}: bad"
    scrubbed = scrub(text, ["/tmp/x/coll"])
    assert scrubbed == "the collection at <collection> has none; <database>: down; main.db: bad"
    assert scrub("k must be between 1 and 50, got 51") == "k must be between 1 and 50, got 51"


# -- REST and gRPC answer alike ----------------------------------------------------------------


class Failing(SearchService):
    """A service whose stats raise whatever the test sets."""

    failure: BaseException = RuntimeError("unset")

    def stats(self) -> dict[str, Any]:
        raise self.failure


class Fronts:
    """The REST app (in-process client) and a gRPC server over one service."""

    def __init__(self, service: SearchService) -> None:
        self.service = service
        self.rest = TestClient(create_app(service), raise_server_exceptions=False)
        self.server, port = create_grpc_server(service, port=0, max_workers=2)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.grpc = v1_grpc.LookalikeStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.server.stop(None).wait()
        self.rest.close()

    def grpc_error(self, call: Any, request: Any) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as caught:
            call(request, timeout=60)
        return caught.value


@pytest.fixture(scope="module")
def failing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Fronts, Path]]:
    folder = tmp_path_factory.mktemp("failing") / "collection"
    collection = Collection(folder)
    fronts = Fronts(Failing(collection, limits=ServiceLimits(max_upload_bytes=200_000)))
    yield fronts, folder
    fronts.close()
    collection.close()


@pytest.mark.parametrize("cls", [*error_classes(), RuntimeError], ids=lambda cls: cls.__name__)
def test_rest_and_grpc_answer_each_error_with_the_table_codes(
    failing: tuple[Fronts, Path], cls: type[BaseException]
) -> None:
    fronts, folder = failing
    error = make(cls, f"broken at {folder / 'catalog.sqlite'} via {SECRET_URL} and {SECRET_PATH}")
    assert isinstance(fronts.service, Failing)
    fronts.service.failure = error
    entry = status_for(cls)

    reply = fronts.rest.get("/stats")
    assert reply.status_code == entry.http, reply.text
    detail = reply.json()["detail"]
    rpc = fronts.grpc_error(fronts.grpc.Stats, v1.StatsRequest())
    assert rpc.code() == entry.grpc
    assert rpc.details() == detail  # the same words on both
    for secret in (str(folder), "hunter2", "db.internal", "/srv/private", "Traceback"):
        assert secret not in detail
    if entry.public is not None:  # every server fault, and errors whose text says too much
        assert detail == entry.public
    else:
        assert "<collection>" in detail and "<database>" in detail


def test_a_request_error_is_400_whatever_its_words(failing: tuple[Fronts, Path]) -> None:
    """The old REST front end chose 413 by matching "exceeds the limit" in the message."""
    fronts, _ = failing
    assert isinstance(fronts.service, Failing)
    fronts.service.failure = RequestError("k 51 exceeds the limit of 50")
    assert fronts.rest.get("/stats").status_code == 400
    rpc = fronts.grpc_error(fronts.grpc.Stats, v1.StatsRequest())
    assert rpc.code() == Code.INVALID_ARGUMENT


def test_a_catalog_error_is_a_server_fault_on_both(failing: tuple[Fronts, Path]) -> None:
    """The old REST front end answered 400 (with the database URL), gRPC INTERNAL."""
    fronts, _ = failing
    assert isinstance(fronts.service, Failing)
    fronts.service.failure = CatalogError(f"{SECRET_URL}: relation images does not exist")
    reply = fronts.rest.get("/stats")
    assert reply.status_code == 500 and "hunter2" not in reply.text
    assert fronts.grpc_error(fronts.grpc.Stats, v1.StatsRequest()).code() == Code.INTERNAL


def test_uploads_over_the_limit_are_413_and_resource_exhausted(
    failing: tuple[Fronts, Path],
) -> None:
    fronts, _ = failing
    limit = fronts.service.limits.max_upload_bytes
    data = b"\xff" * (limit + 1)
    reply = fronts.rest.post("/search", files={"image": ("big.jpg", data, "image/jpeg")})
    assert reply.status_code == 413
    rpc = fronts.grpc_error(fronts.grpc.Search, v1.SearchRequest(image=data))
    assert rpc.code() == Code.RESOURCE_EXHAUSTED
    with pytest.raises(PayloadTooLargeError):
        fronts.service.decode(data)


def test_an_empty_collection_search_names_no_server_folder(tmp_path: Path, encoder) -> None:
    folder = tmp_path / "server-side" / "empty-collection"
    collection = Collection(folder)
    collection.use_encoder(encoder)
    fronts = Fronts(SearchService(collection))
    try:
        query = jpeg(photo("astronaut"))
        reply = fronts.rest.post("/search", files={"image": ("q.jpg", query, "image/jpeg")})
        assert reply.status_code == 409
        assert str(folder) not in reply.text and "server-side" not in reply.text
        assert reply.json()["detail"] == "the collection has no indexed images yet"
        rpc = fronts.grpc_error(fronts.grpc.Search, v1.SearchRequest(image=query))
        assert rpc.code() == Code.FAILED_PRECONDITION
        assert str(folder) not in rpc.details() and "server-side" not in rpc.details()
    finally:
        fronts.close()
        collection.close()


def test_an_unopenable_sqlite_catalog_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(CatalogUnavailableError, match="not a usable lookalike catalog"):
        SqliteCatalog(tmp_path)  # a folder: SQLite cannot open it


def test_health_reports_the_catalog(failing: tuple[Fronts, Path]) -> None:
    fronts, _ = failing
    reply = fronts.rest.get("/health")
    assert reply.status_code == 200
    assert reply.json() == {"status": "ok", "catalog": "ok", "images": 0}


# -- a PostgreSQL outage -----------------------------------------------------------------------


def _pg_ctl(server: Any, *args: str) -> None:
    server._run("pg_ctl", "-D", str(server._data), *args)


def _stop(server: Any) -> None:
    # Fast: open connections are cut at once, and the data is kept for the restart.
    _pg_ctl(server, "-m", "fast", "-w", "stop")


def _restart(server: Any) -> None:
    from lookalike.catalog.local_postgres import _SETTINGS

    options = " ".join(f"-c {key}={value}" for key, value in _SETTINGS.items())
    options += f" -p {server.port} -k {server._data}"
    log = str(server._data / "server.log")
    _pg_ctl(server, "-l", log, "-w", "-t", "60", "-o", options, "start")


@pytest.fixture
def own_postgres() -> Iterator[Any]:
    """A PostgreSQL server for one test, which it may stop and start."""
    pytest.importorskip("psycopg", reason="psycopg is not installed")
    from lookalike.catalog.local_postgres import LocalPostgres

    try:
        server = LocalPostgres().start()
    except CatalogError as error:
        pytest.skip(f"no PostgreSQL server can run here: {error}")
    yield server
    server.stop()


def test_a_postgres_outage_is_503_and_unavailable_then_recovers(
    own_postgres: Any, photo_dir: Path, tmp_path: Path, encoder
) -> None:
    from lookalike.catalog.postgres import PostgresCatalog

    url = own_postgres.create_database()
    # Trust authentication ignores the password, so the URL can carry one to look for.
    url = url.replace("postgresql://postgres@", "postgresql://postgres:hunter2@", 1)
    where = url.split("@", 1)[1]  # host, port and database name
    folder = tmp_path / "server-side" / "collection"
    collection = Collection(folder, db=url)
    collection.use_encoder(encoder)
    collection.index(photo_dir, workers=0)
    fronts = Fronts(SearchService(collection))
    query = jpeg(photo("coffee"))
    files = {"image": ("q.jpg", query, "image/jpeg")}

    def private(text: str) -> list[str]:
        secrets = ("hunter2", "postgresql://", where, str(folder), "server-side", "Traceback")
        return [secret for secret in secrets if secret in text]

    try:
        healthy = fronts.rest.get("/health")
        assert healthy.status_code == 200
        assert healthy.json() == {"status": "ok", "catalog": "ok", "images": 6}
        assert fronts.rest.post("/search", files=files).status_code == 200

        _stop(own_postgres)

        health = fronts.rest.get("/health")
        assert health.status_code == 503
        assert health.json() == {"status": "unavailable", "catalog": "unavailable"}
        search = fronts.rest.post("/search", files=files)
        assert search.status_code == 503, search.text
        assert search.json() == {"detail": "the catalog is unavailable"}
        assert private(search.text) == []
        stats = fronts.rest.get("/stats")
        assert stats.status_code == 503 and private(stats.text) == []
        rpc = fronts.grpc_error(fronts.grpc.Search, v1.SearchRequest(image=query))
        assert rpc.code() == Code.UNAVAILABLE and private(rpc.details()) == []
        rpc = fronts.grpc_error(fronts.grpc.Stats, v1.StatsRequest())
        assert rpc.code() == Code.UNAVAILABLE and private(rpc.details()) == []
        # The library's own errors say what failed, without the password.
        with pytest.raises(CatalogUnavailableError) as during:
            collection.catalog.count()
        with pytest.raises(CatalogUnavailableError, match="cannot connect") as connecting:
            PostgresCatalog(url)
        for caught in (during, connecting):
            assert "hunter2" not in str(caught.value)

        _restart(own_postgres)

        again = fronts.rest.get("/health")
        assert again.status_code == 200 and again.json()["images"] == 6
        assert fronts.rest.post("/search", files=files).status_code == 200
        reply = fronts.grpc.Search(v1.SearchRequest(image=query, k=1), timeout=60)
        assert reply.matches[0].path == "coffee.jpg"
    finally:
        fronts.close()
        collection.close()
