"""A cold ``lookalike search``: what it loads, the prepared model it reuses, and the running
server of the same collection it asks.

Speed itself is measured in ``benchmarks/cold_query.py``; these tests check the behaviour the
speed comes from: a search process imports no torch, transformers, web framework or other
subcommand; the prepared ONNX Runtime graph is reused, gives the full encoder's vectors, and
is rebuilt when damaged or stale; and a search answered by a running server prints exactly
what a local search prints, falling back to a local search whenever the server cannot answer.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port, photo
from PIL import Image

from lookalike.cli.main import main as lookalike_main
from lookalike.cli.remote import (
    KEY_HEADER,
    LOCAL_SEARCH_PATH,
    SERVER_FILE,
    read_announcement,
    search_request,
)
from lookalike.encoders import create_encoder
from lookalike.encoders.lite import LITE_NAMES, create_lite, prepared_fields
from lookalike.encoders.prepared import (
    PreparedEncoder,
    discard_prepared,
    prepared_folder,
    prepared_key,
)

# Runs the command line in a fresh process and reports, on stderr, the modules it loaded.
PROBE = """
import json, sys
from lookalike.cli.main import main
code = main(sys.argv[1:])
sys.stdout.flush()
print("MODULES " + json.dumps(sorted(sys.modules)), file=sys.stderr)
raise SystemExit(code)
"""
# Never needed by a search with the default model.
# OpenCV is not among them: the default search's pixel check matches thumbnails with it (a
# 61 ms import, measured with python -X importtime).
HEAVY = ("torch", "transformers", "fastapi", "starlette", "uvicorn", "grpc", "ray")
OTHER_COMMANDS = (
    "lookalike.cli.evaluation",
    "lookalike.cli.dedup",
    "lookalike.cli.hashing",
    "lookalike.cli.finetune",
    "lookalike.evaluation",
    "lookalike.encoders.efficientnet_lite",
    "lookalike.encoders.hf",
    "lookalike.server",
)


def run_search(collection: Path, *args: str) -> tuple[str, set[str]]:
    """``lookalike -c COLLECTION search ARGS`` in a new process: its output and modules."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, "-c", str(collection), "search", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    line = next(x for x in done.stderr.splitlines() if x.startswith("MODULES "))
    return done.stdout, set(json.loads(line[len("MODULES ") :]))


def ran_model(modules: set[str]) -> bool:
    """Whether a process loaded a runtime to embed the query itself."""
    return "onnxruntime" in modules or "openvino" in modules


@pytest.fixture(scope="module")
def collection(photo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A collection of the six photos, indexed with the default model (which also prepares
    its graph in the session's cache) and local features (for copy searches)."""
    folder = tmp_path_factory.mktemp("cold") / "c"
    command = ["-c", str(folder), "index", str(photo_dir), "-q", "--local-features"]
    assert lookalike_main(command) == 0
    return folder


@pytest.fixture(scope="module")
def unserved(photo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another collection of the six photos, for the tests that start and stop servers."""
    folder = tmp_path_factory.mktemp("cold") / "c"
    assert lookalike_main(["-c", str(folder), "index", str(photo_dir), "-q"]) == 0
    return folder


def get_status(url: str, *, body: bytes = b"{}", headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def start_serving(collection: Path, port: int) -> subprocess.Popen[bytes]:
    """``lookalike serve`` of ``collection``, once it answers and has announced itself."""
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lookalike.cli",
            "-c",
            str(collection),
            "serve",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while True:
        assert server.poll() is None, server.stderr.read().decode() if server.stderr else ""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                if reply.status == 200 and (collection / SERVER_FILE).is_file():
                    return server
        except OSError:
            pass
        assert time.monotonic() < deadline, "the server did not come up"
        time.sleep(0.3)


def stop_serving(server: subprocess.Popen[bytes]) -> None:
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=60)
    if server.stderr:
        server.stderr.close()


@pytest.fixture(scope="module")
def served(collection: Path) -> Iterator[tuple[Path, int]]:
    """The collection with ``lookalike serve`` running on it."""
    port = free_port()
    server = start_serving(collection, port)
    try:
        yield collection, port
    finally:
        stop_serving(server)


# -- what a search process loads ---------------------------------------------------------


def test_a_local_search_loads_no_torch_web_framework_or_other_subcommand(
    collection: Path, photo_dir: Path
) -> None:
    output, modules = run_search(
        collection, str(next(photo_dir.rglob("rocket.jpg"))), "--no-server"
    )
    assert output.splitlines()[0].split()[2].endswith("rocket.jpg")
    assert ran_model(modules)  # the model ran here, from a prepared model
    assert not [m for m in modules if m.split(".")[0] in HEAVY]
    assert not [m for m in modules if m.startswith(OTHER_COMMANDS)]


def test_other_subcommands_still_parse_and_show_their_help(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from importlib import import_module

    cli = import_module("lookalike.cli.main")
    args = cli.build_parser().parse_args(["dedup", "--method", "exact"])
    assert args.method == "exact"
    assert args.run is import_module("lookalike.cli.dedup").run_dedup
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["eval", "--help"])
    assert "--protocol" in capsys.readouterr().out


# -- the prepared model ----------------------------------------------------------------------


def test_the_torch_free_factory_matches_the_full_one() -> None:
    from lookalike.encoders.efficientnet_lite import VARIANTS, create_lite_encoder

    assert sorted(LITE_NAMES) == sorted(VARIANTS)
    light = list(inspect.signature(create_lite).parameters.values())
    full = list(inspect.signature(create_lite_encoder).parameters.values())
    assert [(p.name, p.kind, p.default) for p in light] == [
        (p.name, p.kind, p.default) for p in full
    ]


def prepared_paths() -> tuple[str, Path, Path]:
    import onnxruntime

    fields = prepared_fields(
        "efficientnet-lite0", layer="head", pooling=None, scales=None, precision="fp32"
    )
    key = prepared_key(fields, onnxruntime.__version__)
    return key, prepared_folder() / f"{key}.json", prepared_folder() / f"{key}.onnx"


def test_a_prepared_model_is_reused_and_gives_the_full_encoders_vectors() -> None:
    key, manifest, _ = prepared_paths()
    discard_prepared(key)
    full = create_encoder("efficientnet-lite0", normalize=False, runtime="onnx")
    assert not isinstance(full, PreparedEncoder)
    assert manifest.is_file()  # the full build prepared it
    prepared = create_encoder("efficientnet-lite0", normalize=False, runtime="onnx")
    assert isinstance(prepared, PreparedEncoder)
    assert prepared.identity == full.identity
    assert prepared.capabilities == full.capabilities
    images = [photo("astronaut"), photo("coffee"), photo("retina")]
    np.testing.assert_allclose(prepared.embed(images), full.embed(images), rtol=0, atol=1e-5)
    unit = create_encoder("efficientnet-lite0", normalize=True, runtime="onnx")
    assert isinstance(unit, PreparedEncoder)  # normalising is not part of the graph
    np.testing.assert_allclose(np.linalg.norm(unit.embed(images), axis=1), 1.0, rtol=1e-5)


def test_a_damaged_prepared_model_is_rebuilt() -> None:
    key, manifest, model = prepared_paths()
    create_encoder(
        "efficientnet-lite0", normalize=False, runtime="onnx"
    )  # prepared, if it was not yet
    data = bytearray(model.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # same size, other bytes
    model.write_bytes(bytes(data))
    rebuilt = create_encoder("efficientnet-lite0", normalize=False, runtime="onnx")
    assert not isinstance(rebuilt, PreparedEncoder)  # not trusted: built the full way
    assert isinstance(
        create_encoder("efficientnet-lite0", normalize=False, runtime="onnx"), PreparedEncoder
    )

    manifest.write_text("{not json", encoding="utf-8")
    assert not isinstance(
        create_encoder("efficientnet-lite0", normalize=False, runtime="onnx"), PreparedEncoder
    )
    assert json.loads(manifest.read_text(encoding="utf-8"))["key"] == key  # written again


def test_a_prepared_model_of_changed_sources_is_not_used() -> None:
    _, manifest, _ = prepared_paths()
    create_encoder("efficientnet-lite0", normalize=False, runtime="onnx")
    recorded = json.loads(manifest.read_text(encoding="utf-8"))
    assert any(Path(p).name == "efficientnet_lite.py" for p, _, _ in recorded["sources"])
    recorded["sources"][0][2] += 1  # the weights file looks modified since
    manifest.write_text(json.dumps(recorded), encoding="utf-8")
    assert not isinstance(
        create_encoder("efficientnet-lite0", normalize=False, runtime="onnx"), PreparedEncoder
    )
    assert isinstance(
        create_encoder("efficientnet-lite0", normalize=False, runtime="onnx"), PreparedEncoder
    )


# -- the running server -------------------------------------------------------------------


@pytest.mark.parametrize("output", ["json", "csv", "table"])
def test_a_search_through_the_server_prints_the_local_results(
    served: tuple[Path, int], photo_dir: Path, output: str
) -> None:
    collection, _ = served
    query = [str(next(photo_dir.rglob("chelsea.jpg"))), "-k", "4", "--format", output]
    remote, remote_modules = run_search(collection, *query)
    local, local_modules = run_search(collection, *query, "--no-server")
    assert remote == local
    assert "chelsea.jpg" in remote
    # The server answered: this process loaded neither numpy nor the model.
    assert not ran_model(remote_modules) and "numpy" not in remote_modules
    assert ran_model(local_modules)


def test_a_combined_query_through_the_server_prints_the_local_results(
    served: tuple[Path, int], photo_dir: Path
) -> None:
    collection, _ = served
    query = [
        str(next(photo_dir.rglob("rocket.jpg"))),
        str(next(photo_dir.rglob("coffee.jpg"))),
        "--not",
        str(next(photo_dir.rglob("astronaut.jpg"))),
        "--weights",
        "2,1,0.5",
        "--threshold",
        "0.1",
        "--json",
    ]
    remote, remote_modules = run_search(collection, *query)
    local, _ = run_search(collection, *query, "--no-server")
    assert remote == local
    assert not ran_model(remote_modules)


@pytest.mark.parametrize("flags", [["--copies"], ["--no-copy-views"], ["--rerank", "3"]])
def test_copy_search_options_through_the_server_print_the_local_results(
    served: tuple[Path, int], photo_dir: Path, tmp_path: Path, flags: list[str]
) -> None:
    collection, _ = served
    query = tmp_path / "turned.jpg"
    with Image.open(next(photo_dir.rglob("coffee.jpg"))) as source:
        source.convert("RGB").rotate(25, Image.Resampling.BICUBIC, expand=True).save(query)
    remote, remote_modules = run_search(collection, str(query), "-k", "3", "--json", *flags)
    local, _ = run_search(collection, str(query), "-k", "3", "--json", *flags, "--no-server")
    assert remote == local
    assert not ran_model(remote_modules)  # the server answered, with these options
    best = json.loads(remote)["results"][0]
    assert best["path"].endswith("coffee.jpg")
    if "--copies" in flags:
        assert best["copy_probability"] > 0.5 and abs(best["transform"]["rotation_degrees"]) > 20


def test_the_local_route_answers_only_with_the_announced_key(served: tuple[Path, int]) -> None:
    collection, port = served
    url = f"http://127.0.0.1:{port}{LOCAL_SEARCH_PATH}"
    announced = read_announcement(collection)
    assert announced is not None and announced.url == f"http://127.0.0.1:{port}"
    assert (collection / SERVER_FILE).stat().st_mode & 0o077 == 0  # the key is private
    assert get_status(url) == 404
    assert get_status(url, headers={KEY_HEADER: "0" * 32}) == 404
    assert get_status(url, headers={KEY_HEADER: announced.key}) == 400  # no image: a bad query
    public = urllib.request.urlopen(f"http://127.0.0.1:{port}/openapi.json", timeout=30)
    assert LOCAL_SEARCH_PATH not in json.loads(public.read())["paths"]


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_stale_or_foreign_announcement_falls_back_to_a_local_search(
    unserved: Path, photo_dir: Path
) -> None:
    collection = unserved
    file = collection / SERVER_FILE
    query = [str(next(photo_dir.rglob("coffee.jpg"))), "-k", "3", "--json"]
    server = start_serving(collection, free_port())
    try:
        expected, _ = run_search(collection, *query, "--no-server")
        real = json.loads(file.read_text(encoding="utf-8"))
        output, modules = run_search(collection, *query)
        assert output == expected and not ran_model(modules)  # the server answered
        # The running server, announced with one thing that does not hold: a local search.
        cases = [
            {"key": "0" * 32},  # not its key: its local route answers 404
            {"pid": dead_pid()},  # a process that is gone
            {"host": "another-machine"},  # announced on a machine sharing the folder
            {"db": "postgresql://elsewhere/db"},  # a server of another catalog
            {"folder": "/elsewhere/c"},  # this folder is a copy of the one it serves
            {"url": f"http://127.0.0.1:{free_port()}"},  # nothing listens there
        ]
        for changed in cases:
            file.write_text(json.dumps({**real, **changed}), encoding="utf-8")
            output, modules = run_search(collection, *query)
            assert output == expected and ran_model(modules), changed
        file.write_text(json.dumps(real), encoding="utf-8")
    finally:
        stop_serving(server)
    assert not file.exists()
    # A server killed without a chance to clean up leaves its file behind: stale.
    file.write_text(json.dumps(real), encoding="utf-8")
    output, modules = run_search(collection, *query)
    assert output == expected and ran_model(modules)
    file.write_text("{damaged", encoding="utf-8")
    assert run_search(collection, *query)[0] == expected
    file.unlink()


def test_a_stopped_server_takes_its_announcement_away(unserved: Path) -> None:
    collection = unserved
    server = start_serving(collection, free_port())
    assert (collection / SERVER_FILE).is_file()
    stop_serving(server)  # SIGTERM, as a service manager stops it
    assert not (collection / SERVER_FILE).exists()


def test_searches_the_server_cannot_answer_as_a_local_one_stay_local(tmp_path: Path) -> None:
    image = tmp_path / "q.jpg"
    photo("coffee").save(image)
    fields = {"images": [str(image)], "negatives": [], "text": None, "k": 5, "metric": "cosine"}
    fields |= {"threshold": None, "where": [], "near": None, "within": None, "sort": None}
    fields |= {"qe": 0, "rerank": 0, "multi_crop": False, "runtime": "auto", "server": True}
    body = search_request(argparse.Namespace(**fields), None)
    assert body is not None and body["k"] == 5 and body["names"] == [str(image)]
    assert search_request(argparse.Namespace(**{**fields, "runtime": "torch"}), None) is None
    # An option added later, that this client does not know how to forward.
    later = argparse.Namespace(**{**fields, "text_model": "hf:some/model"})
    assert search_request(later, None) is None
    assert search_request(argparse.Namespace(**{**fields, "text_model": None}), None) is not None
    missing = argparse.Namespace(**{**fields, "images": [str(tmp_path / "gone.jpg")]})
    assert search_request(missing, None) is None  # the local search reports it
