"""Combined queries (several positives, negatives, text, weights) through the library, the
command line, REST over real HTTP and gRPC v1; and ``--format`` output for pipes."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from conftest import PHOTO_NAMES, photo, variants
from test_rest import LiveServer

from lookalike.cli.main import main
from lookalike.core.collection import Collection
from lookalike.core.search import Query
from lookalike.errors import EncoderError, RequestError
from lookalike.server.grpc_server import create_grpc_server
from lookalike.server.protos import lookalike_v1_pb2 as v1
from lookalike.server.protos import lookalike_v1_pb2_grpc as v1_grpc
from lookalike.server.rest import create_app
from lookalike.server.service import SearchService, ServiceLimits

VARIED = ("astronaut", "coffee", "rocket")
K = 12


@dataclass
class Setup:
    folder: Path
    location: Path
    collection: Collection
    http: httpx.Client
    grpc: v1_grpc.LookalikeStub

    def file(self, name: str) -> Path:
        return next(self.folder.rglob(f"{name}.jpg"))

    def data(self, name: str) -> bytes:
        return self.file(name).read_bytes()


@pytest.fixture(scope="module")
def setup(
    photo_dir: Path, tmp_path_factory: pytest.TempPathFactory, collection_encoder
) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("combined")
    folder = root / "photos"
    shutil.copytree(photo_dir, folder)
    for name in VARIED:
        for kind, image in variants(photo(name)).items():
            image.save(folder / f"{name}-{kind}.jpg", quality=92)
    # The encoder a new collection builds for itself, as each command-line run does.
    collection = Collection(
        root / "collection", index_spec="exact", whitening=0, encoder=collection_encoder
    )
    collection.index(folder, workers=0)
    limits = ServiceLimits(max_upload_bytes=2_000_000, max_pixels=5_000_000, max_k=50)
    service = SearchService(collection, limits=limits)
    server, port = create_grpc_server(service, port=0, max_workers=2)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    with (
        LiveServer(create_app(service)) as live,
        httpx.Client(base_url=live.url, timeout=120) as http,
    ):
        yield Setup(folder, root / "collection", collection, http, v1_grpc.LookalikeStub(channel))
    channel.close()
    server.stop(None).wait()
    collection.close()


def lookalike(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lookalike.cli", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=300,
    )


def rest_search(setup: Setup, images=(), negatives=(), **fields: Any) -> httpx.Response:
    files = [("image", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]
    files += [("negative", (f"n{i}.jpg", data, "image/jpeg")) for i, data in enumerate(negatives)]
    return setup.http.post("/search", files=files, data=fields)


def ranked(response) -> list[tuple[int, float]]:
    return [(r.id, r.score) for r in response.results]


def names_of(setup: Setup, response) -> list[str]:
    return [Path(r.path).stem for r in response.results]


def same(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> None:
    assert [i for i, _ in a] == [i for i, _ in b]
    for (_, x), (_, y) in zip(a, b, strict=True):
        assert abs(x - y) < 1e-4


def test_two_positives_agree_across_library_cli_rest_and_grpc(setup: Setup) -> None:
    first, second = setup.file("astronaut"), setup.file("coffee")
    library = ranked(setup.collection.search_many([first, second], k=K))
    assert len(library) == K
    # Both positives rank near the top, ahead of unrelated photos.
    top = [Path(setup.collection.catalog.images([i])[i].path).stem for i, _ in library[:4]]
    assert "astronaut" in top and "coffee" in top

    out = lookalike("-c", str(setup.location), "search", str(first), str(second), "-k", str(K),
                    "--format", "json")  # fmt: skip
    assert out.returncode == 0, out.stderr
    cli = [(r["id"], r["score"]) for r in json.loads(out.stdout)["results"]]
    same(library, cli)

    reply = rest_search(setup, [first.read_bytes(), second.read_bytes()], k=str(K))
    assert reply.status_code == 200, reply.text
    same(library, [(m["id"], m["score"]) for m in reply.json()["results"]])

    request = v1.SearchRequest(image=first.read_bytes(), images=[second.read_bytes()], k=K)
    matches = setup.grpc.Search(request, timeout=120).matches
    same(library, [(m.id, m.score) for m in matches])
    only_images = setup.grpc.Search(
        v1.SearchRequest(images=[first.read_bytes(), second.read_bytes()], k=K), timeout=120
    ).matches
    same(library, [(m.id, m.score) for m in only_images])


def test_a_single_image_is_the_plain_search(setup: Setup) -> None:
    query = setup.file("chelsea")
    same(
        ranked(setup.collection.search(query, k=5)),
        ranked(setup.collection.search_many([query], k=5)),
    )


def test_a_negative_moves_its_image_and_variants_down(setup: Setup) -> None:
    positives = [setup.file("astronaut"), setup.file("chelsea")]
    total = len(setup.collection)
    without = names_of(setup, setup.collection.search_many(positives, k=total))
    negative = setup.file("rocket")
    with_negative = names_of(
        setup, setup.collection.search_many(positives, negatives=[negative], k=total)
    )
    rockets = [n for n in without if n.startswith("rocket")]
    assert len(rockets) == 5
    for name in rockets:
        assert with_negative.index(name) > without.index(name), name
    # The rockets end up at the bottom.
    assert set(with_negative[-5:]) == set(rockets)


def test_weights_move_the_ranking(setup: Setup) -> None:
    positives = [setup.file("rocket"), setup.file("coffee")]
    rocket_heavy = setup.collection.search_many(positives, weights=[5, 1], k=3)
    coffee_heavy = setup.collection.search_many(positives, weights=[1, 5], k=3)
    assert names_of(setup, rocket_heavy)[0] == "rocket"
    assert names_of(setup, coffee_heavy)[0] == "coffee"
    # Weights scale together: only their ratios matter.
    same(
        ranked(setup.collection.search_many(positives, weights=[10, 2], k=5)),
        ranked(setup.collection.search_many(positives, weights=[5, 1], k=5)),
    )


ERRORS = [
    ("zero weight", {"images": 2, "weights": "0,1"}, "positive"),
    ("negative weight", {"images": 2, "weights": "-1,1"}, "positive"),
    ("nan weight", {"images": 2, "weights": "nan,1"}, "positive"),
    ("weights count", {"images": 2, "weights": "1,1,1"}, "for 2 query part"),
    ("multi-crop", {"images": 2, "multi_crop": True}, "multi-crop"),
]


def _library_call(setup: Setup, spec: dict[str, Any]) -> None:
    images = [setup.file(n) for n in ("astronaut", "coffee")[: spec.get("images", 0)]]
    negatives = [setup.file("rocket")] * spec.get("negatives", 0)
    weights = spec.get("weights")
    setup.collection.search_many(
        images,
        negatives=negatives,
        text=spec.get("text"),
        weights=None if weights is None else [float(w) for w in weights.split(",")],
        multi_crop=spec.get("multi_crop", False),
    )


def _cli_args(setup: Setup, spec: dict[str, Any]) -> list[str]:
    args = ["-c", str(setup.location), "search"]
    args += [str(setup.file(n)) for n in ("astronaut", "coffee")[: spec.get("images", 0)]]
    for _ in range(spec.get("negatives", 0)):
        args += ["--not", str(setup.file("rocket"))]
    if "text" in spec:
        args += ["--text", spec["text"]]
    if "weights" in spec:
        args.append(f"--weights={spec['weights']}")
    if spec.get("multi_crop"):
        args.append("--multi-crop")
    return args


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        *[(spec, words) for _, spec, words in ERRORS],
        ({}, "the query is empty"),
        ({"negatives": 1}, "negative images only"),
    ],
    ids=[name for name, _, _ in ERRORS] + ["empty", "negatives only"],
)
def test_bad_queries_are_refused_by_the_library_and_the_cli(
    setup: Setup, spec: dict[str, Any], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(RequestError, match=words):
        _library_call(setup, spec)
    assert main(_cli_args(setup, spec)) == 1
    err = capsys.readouterr().err
    assert err.startswith("lookalike: error:") and words in err
    assert len(err.strip().splitlines()) == 1


def test_text_needs_a_text_encoder_in_the_library_the_cli_and_rest(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = {"images": 1, "text": "a red rocket"}
    with pytest.raises(EncoderError, match="cannot embed text"):
        _library_call(setup, spec)
    assert main(_cli_args(setup, spec)) == 1
    err = capsys.readouterr().err
    assert "cannot embed text" in err and len(err.strip().splitlines()) == 1
    reply = rest_search(setup, [setup.data("astronaut")], text="a red rocket")
    assert reply.status_code == 400 and "cannot embed text" in reply.json()["detail"]


@pytest.mark.parametrize(("name", "spec", "words"), ERRORS, ids=[e[0] for e in ERRORS])
def test_bad_queries_are_a_400_over_rest(
    setup: Setup, name: str, spec: dict[str, Any], words: str
) -> None:
    images = [setup.data(n) for n in ("astronaut", "coffee")[: spec["images"]]]
    fields = {"weights": spec["weights"]} if "weights" in spec else {}
    if spec.get("multi_crop"):
        fields["multi_crop"] = "true"
    reply = rest_search(setup, images, **fields)
    assert reply.status_code == 400, reply.text
    assert words in reply.json()["detail"]


def test_rest_needs_an_image_part(setup: Setup) -> None:
    # A query of negatives only is a bad request like any other: 400, saying why.
    reply = rest_search(setup, [], [setup.data("rocket")])
    assert reply.status_code == 400 and "negative images only" in reply.json()["detail"]


def test_rest_negatives_and_weights_match_the_library(setup: Setup) -> None:
    positives = [setup.file("astronaut"), setup.file("chelsea")]
    library = setup.collection.search_many(
        positives, negatives=[setup.file("rocket")], weights=[2, 1, 0.5], k=K
    )
    reply = rest_search(
        setup,
        [p.read_bytes() for p in positives],
        [setup.data("rocket")],
        weights="2,1,0.5",
        k=str(K),
    )
    assert reply.status_code == 200, reply.text
    same(ranked(library), [(m["id"], m["score"]) for m in reply.json()["results"]])
    request = v1.SearchRequest(
        images=[p.read_bytes() for p in positives],
        negatives=[setup.data("rocket")],
        weights=[2, 1, 0.5],
        k=K,
    )
    same(
        ranked(library), [(m.id, m.score) for m in setup.grpc.Search(request, timeout=120).matches]
    )


def test_bad_weights_over_grpc_are_invalid_argument(setup: Setup) -> None:
    request = v1.SearchRequest(images=[setup.data("astronaut")], weights=[0.0])
    with pytest.raises(grpc.RpcError) as caught:
        setup.grpc.Search(request, timeout=60)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "positive" in (caught.value.details() or "")


def test_format_paths_and_csv_for_pipes(setup: Setup) -> None:
    base = ["-c", str(setup.location), "search", str(setup.file("coffee")), "-k", "5"]
    out = lookalike(*base, "--format", "paths")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    assert lines[-1] == "" and len(lines) == 6
    for line in lines[:-1]:
        assert Path(line).is_file(), line
    assert Path(lines[0]).stem == "coffee"

    out = lookalike(*base, "--format", "csv")
    assert out.returncode == 0, out.stderr
    rows = list(csv.reader(io.StringIO(out.stdout)))
    assert rows[0][:4] == ["rank", "score", "id", "path"]
    assert len(rows) == 6
    assert [row[3] for row in rows[1:]] == lines[:-1]
    assert all(math.isfinite(float(row[1])) for row in rows[1:])

    as_json = lookalike(*base, "--json")
    assert as_json.stdout == lookalike(*base, "--format", "json").stdout
    assert [r["path"] for r in json.loads(as_json.stdout)["results"]] == lines[:-1]


def test_dedup_format_paths_prints_the_duplicates_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "library"
    folder.mkdir()
    original = photo("chelsea")
    original.save(folder / "a.png")
    original.save(folder / "b.png")
    photo("rocket").save(folder / "c.png")
    args = ["-c", str(tmp_path / "c"), "dedup", str(folder), "--method", "exact", "-q"]
    assert main([*args, "--format", "paths"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 1 and printed[0] in (str(folder / "a.png"), str(folder / "b.png"))
    assert main([*args, "--format", "json"]) == 0
    group = json.loads(capsys.readouterr().out)["groups"][0]
    assert [d["path"] for d in group["duplicates"]] == printed
    assert group["keeper"]["path"] not in printed


def test_query_checks_its_parts() -> None:
    query = Query.of(["a.jpg", "b.jpg"], negatives=["c.jpg"], text="red", weights=[2, 1, 1, 0.5])
    assert [(p.kind, p.weight) for p in query.parts] == [
        ("image", 2.0),
        ("image", 1.0),
        ("negative", 1.0),
        ("text", 0.5),
    ]
    assert Query.of("a.jpg").single_image
    with pytest.raises(RequestError, match="at most"):
        Query.of(["a.jpg"] * 17)
    with pytest.raises(RequestError, match="positive"):
        Query.of(["a.jpg"], weights=[math.inf])


def test_text_and_image_combine_with_a_clip_model(photo_dir: Path, tmp_path: Path) -> None:
    """A tiny random CLIP checkpoint (offline): the combined vector is the renormalised sum
    of the image's and the text's normalised vectors, so scores match numpy."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from test_hf_encoders import TINY, _byte_vocab, _save

    from lookalike.encoders import create_encoder

    vocab = _byte_vocab()
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config={
            "vocab_size": len(vocab),
            "max_position_embeddings": 16,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "pad_token_id": eos,
            **TINY,
        },
        vision_config={"image_size": 32, "patch_size": 8, **TINY},
        projection_dim=24,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    folder = tmp_path / "clip-tiny"
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}
    )
    _save(folder, transformers.CLIPModel(config), processor)
    transformers.CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(folder)
    encoder = create_encoder(f"hf:{folder}", normalize=False)
    assert encoder.capabilities.text
    collection = Collection(tmp_path / "c", index_spec="exact", whitening=0, encoder=encoder)
    collection.index(photo_dir, workers=0)
    query = next(photo_dir.rglob("astronaut.jpg"))
    response = collection.search_many([query], text="a rocket", weights=[1, 2], k=len(PHOTO_NAMES))

    def unit(v: np.ndarray) -> np.ndarray:
        return v / np.linalg.norm(v)

    combined = unit(
        unit(encoder.embed([query])[0]) + 2 * unit(encoder.encode_text(["a rocket"])[0])
    )
    ids, stored = collection.catalog.vectors(collection.model_id)
    expected = {int(i): float(unit(v) @ combined) for i, v in zip(ids, stored, strict=True)}
    for result in response.results:
        assert abs(result.score - expected[result.id]) < 1e-4
    assert [r.id for r in response.results] == sorted(expected, key=lambda i: -expected[i])
    collection.close()
