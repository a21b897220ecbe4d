"""Copy search on real photos: copy views in the default search, local-feature verification
widened when nothing verifies, and ``copies=True`` (verified copies only, with a calibrated
probability and the estimated transform) through the library, the CLI, REST and gRPC; and
``lookalike eval --copy-detection`` through a collection."""

from __future__ import annotations

import argparse
import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from conftest import PHOTO_NAMES, photo
from PIL import Image, ImageDraw, ImageOps
from test_rest import LiveServer

from lookalike.cli.evaluation import add_eval_arguments, run_eval
from lookalike.cli.main import main
from lookalike.core.collection import Collection
from lookalike.core.multicrop import (
    COPY_VIEWS_BELOW,
    copy_views,
    rotation_angle,
    trim_borders,
    unrotated,
    unrotated_photo,
)
from lookalike.core.search import PIXEL_COPY_AT
from lookalike.errors import LookalikeError, RequestError
from lookalike.evaluation.copydetect import apply_attack, filled_rotation
from lookalike.local.features import QUERY_CONFIG, extract
from lookalike.local.matching import mirror_features, verify
from lookalike.local.pixels import Thumbnail, copy_likeness
from lookalike.local.rerank import COPY_PROBABILITY, copy_probabilities, copy_probability
from lookalike.server.grpc_server import create_grpc_server
from lookalike.server.protos import lookalike_v1_pb2 as v1
from lookalike.server.protos import lookalike_v1_pb2_grpc as v1_grpc
from lookalike.server.rest import create_app
from lookalike.server.service import SearchService, ServiceLimits

# Photos never indexed: a query of one of them has no copy in the collection.
STRANGERS = ("camera", "moon", "brick", "page")


def stranger(name: str) -> Image.Image:
    from skimage import data

    return Image.fromarray(getattr(data, name)()).convert("RGB")


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def rotated(image: Image.Image, angle: float) -> Image.Image:
    """Rotated ``angle`` degrees counter-clockwise on a grown canvas, black corners."""
    return image.rotate(angle, Image.Resampling.BICUBIC, expand=True)


def mirrored_crop(image: Image.Image) -> Image.Image:
    """Mirrored left to right, then the right 80% of the width and the top 85% kept."""
    width, height = image.size
    return ImageOps.mirror(image).crop((width // 5, 0, width, height * 85 // 100))


def half(image: Image.Image) -> Image.Image:
    return image.resize((image.width // 2, image.height // 2), Image.Resampling.BILINEAR)


# (source photo, edited copy, rotation in degrees, scale, mirrored) of the copies below.
EDITS = {
    "rotated": ("coffee", lambda im: rotated(im, 25.0), 25.0, 1.0, False),
    "mirrored-crop": ("astronaut", mirrored_crop, 0.0, 1.0, True),
    "half": ("rocket", half, 0.0, 0.5, False),
    "overlay": ("chelsea", lambda im: apply_attack(im, "overlay", seed=3), 0.0, 1.0, False),
}


@pytest.fixture(scope="module")
def indexed(photo_dir: Path, tmp_path_factory: pytest.TempPathFactory, encoder) -> Iterator[Path]:
    """A collection of the six photos with SIFT features; yields its folder."""
    root = tmp_path_factory.mktemp("copies")
    shutil.copytree(photo_dir, root / "photos")
    with Collection(root / "collection") as collection:
        collection.use_encoder(encoder)
        collection.index(root / "photos", workers=0, local_features=True)
    return root / "collection"


@pytest.fixture(scope="module")
def collection(indexed: Path, encoder) -> Iterator[Collection]:
    with Collection(indexed) as opened:
        opened.use_encoder(encoder)
        yield opened


# -- copy views ---------------------------------------------------------------------------


def test_unrotated_recovers_the_photo_of_a_rotated_canvas() -> None:
    original = photo("coffee").resize((300, 200))
    for angle in (30.0, -30.0, 10.0):
        back = unrotated(rotated(original, angle), angle)
        assert abs(back.width - 300) <= 2 and abs(back.height - 200) <= 2
        difference = np.abs(
            np.asarray(back.resize((300, 200)), dtype=float) - np.asarray(original, dtype=float)
        )
        assert difference[4:-4, 4:-4].mean() < 8  # the photo, not black corners
        # Straight to a size: one resampling, the shorter side as asked.
        assert min(unrotated(rotated(original, angle), angle, 112).size) == 112


def test_trim_borders_removes_solid_padding_only() -> None:
    original = photo("coffee").resize((240, 160))
    padded = ImageOps.expand(original, border=(40, 25, 40, 25), fill=(200, 30, 30))
    trimmed = trim_borders(padded)
    assert trimmed is not None
    assert abs(trimmed.width - 240) <= 6 and abs(trimmed.height - 160) <= 6
    assert trim_borders(original) is None
    # A plain sky along an edge runs on beside the rocket: a backdrop, not a border.
    assert trim_borders(photo("rocket").resize((240, 160))) is None
    # Nor is the white around a product: the photo inside an oval on a white page.
    page = Image.new("RGB", (240, 200), "white")
    oval = Image.new("L", (200, 160), 0)
    ImageDraw.Draw(oval).ellipse((0, 0, 199, 159), fill=255)
    page.paste(original.resize((200, 160)), (20, 20), oval)
    assert trim_borders(page) is None
    # A screenshot's bars carry text and icons and still go, up to the photo.
    shot = apply_attack(original, "screenshot", seed=1)
    cut = trim_borders(shot)
    assert cut is not None and cut.height < shot.height * 0.9


def test_rotation_angle_reads_the_tilt_of_a_rotated_copy() -> None:
    for name in ("astronaut", "chelsea", "coffee", "camera", "brick"):
        image = photo(name).convert("RGB")
        for angle in (8.0, -15.0, 30.0, -40.0):
            # Black corners, and corners filled with a blurred stretch of the photo.
            for copy in (rotated(image, angle), filled_rotation(image, angle)):
                found = rotation_angle(copy)
                assert found is not None and abs(found - angle) < 1.5, (name, angle, found)
    # Rotated, then cropped so that only parts of the fill are left.
    copy = rotated(photo("chelsea").convert("RGB"), 20.0)
    width, height = copy.size
    found = rotation_angle(copy.crop((width // 8, height // 6, width, height * 7 // 8)))
    assert found is not None and abs(found - 20.0) < 1.0
    # Photos that were not turned have none (their edges are not a fill's borders).
    for name in ("astronaut", "chelsea", "camera", "brick", "moon"):
        assert rotation_angle(photo(name).convert("RGB")) is None, name
    padded = ImageOps.expand(photo("chelsea").convert("RGB"), border=40, fill=(0, 0, 0))
    assert rotation_angle(padded) is None


def test_unrotated_photo_cuts_out_the_fill_of_a_cropped_rotated_copy() -> None:
    original = photo("coffee").convert("RGB").resize((300, 200))
    canvas = rotated(original, 20.0)
    # The whole grown canvas: the photo's rectangle follows from the canvas's size.
    whole = unrotated_photo(canvas, 20.0, 100)
    assert min(whole.size) == 100 and abs(whole.width / whole.height - 1.5) < 0.05
    # Cropped after rotating: cut to the photo, no black wedges, and its thumbnail shows
    # the source's pixels where the rotated copy's does not.
    width, height = canvas.size
    cropped = canvas.crop((width // 10, height // 8, width * 19 // 20, height * 7 // 8))
    upright = unrotated_photo(cropped, 20.0, 100)
    pixels = np.asarray(upright.convert("L"), dtype=float)
    assert (pixels < 8).mean() < 0.02
    source = Thumbnail.of(original)
    assert copy_likeness(Thumbnail.of(upright), source) >= PIXEL_COPY_AT
    assert copy_likeness(Thumbnail.of(cropped), source) < PIXEL_COPY_AT


def test_copy_views_are_the_upright_photo_and_the_trimmed_frame() -> None:
    original = photo("coffee").convert("RGB").resize((240, 160))
    padded = ImageOps.expand(original, border=(40, 25, 40, 25), fill=(200, 30, 30))
    framed = copy_views(padded)
    assert framed.upright is None and len(framed.views) == 1
    assert abs(framed.views[0].width / framed.views[0].height - 1.5) < 0.1
    turned = copy_views(rotated(original, 25.0), side=112)
    assert turned.upright is not None and turned.views == [turned.upright]
    assert min(turned.upright.size) == 112
    # A photo as it was: nothing to undo, no views (and no embedding spent on them).
    for name in ("astronaut", "chelsea", "brick"):
        assert copy_views(photo(name).convert("RGB")).views == [], name


def test_copy_views_lift_a_rotated_copy_toward_its_source(collection: Collection) -> None:
    query = rotated(photo("rocket"), 20.0)
    plain = collection.search(query, k=1, copy_views=False)
    viewed = collection.search(query, k=1)
    assert plain[0].path.endswith("rocket.jpg") and viewed[0].path.endswith("rocket.jpg")
    # Weak on its own (under COPY_VIEWS_BELOW), so the views are searched: the un-rotated
    # one matches far better, even after its penalty.
    assert plain[0].score < COPY_VIEWS_BELOW
    assert viewed[0].score > plain[0].score + 0.15
    # A query that matches well on its own is searched as it is: the same results, and the
    # same scores but for a copy the pixel check scores by its likeness (1 for the photo).
    for query in (photo("coffee"), rotated(photo("retina"), 20.0)):
        strong = collection.search(query, k=3)
        assert strong[0].score >= COPY_VIEWS_BELOW
        alone = collection.search(query, k=3, copy_views=False)
        assert [r.id for r in strong] == [r.id for r in alone]
        assert [r.score for r in strong[1:]] == [r.score for r in alone[1:]]
        assert alone[0].score <= strong[0].score <= 1.0 + 1e-6


# -- verification ---------------------------------------------------------------------------


def test_mirrored_features_verify_a_mirrored_copy() -> None:
    source = extract(photo("astronaut"))
    query = extract(ImageOps.mirror(photo("astronaut")), QUERY_CONFIG)
    assert verify(query, source, min_matches=10).inliers < 10  # a similarity cannot mirror
    assert verify(mirror_features(query), source, min_matches=10).inliers >= 40


def test_copy_probability_grows_with_inliers_and_score() -> None:
    assert copy_probability(0, 0.5) < 0.05
    assert copy_probability(200, 0.8) > 0.95
    low, high = copy_probability(20, 0.4), copy_probability(60, 0.4)
    assert low < high and copy_probability(20, 0.4) < copy_probability(20, 0.8)
    assert 0.0 < low < 1.0
    # In context: a scene whose other photos verify too makes a candidate less likely...
    alone = copy_probabilities([45, 2, 1], [0.8, 0.5, 0.5])[0]
    crowded = copy_probabilities([45, 40, 38], [0.8, 0.8, 0.8])[0]
    assert crowded < alone and alone > COPY_PROBABILITY
    # ... but a second copy of the photo does not count against the first.
    pair = copy_probabilities([150, 140, 3], [0.9, 0.9, 0.5])
    assert pair[0] == pytest.approx(copy_probabilities([150, 3], [0.9, 0.5])[0])
    assert min(pair[:2]) > 0.9 and pair[2] < 0.1


def test_rerank_puts_a_mirrored_copy_first(collection: Collection) -> None:
    query = mirrored_crop(photo("astronaut"))
    plain = collection.search(query, k=3, copy_views=False)
    verified = collection.search(query, k=3, rerank=3)
    assert verified[0].path.endswith("astronaut.jpg")
    assert verified[0].score > plain[0].score + 0.1  # its mirror verified
    # The default search finds it by its pixels (the mirror image's thumbnail) too.
    assert collection.search(query, k=1)[0].path.endswith("astronaut.jpg")


# -- copies=True ----------------------------------------------------------------------------


@pytest.mark.parametrize("edit", list(EDITS))
def test_copies_finds_the_source_with_a_plausible_transform(
    collection: Collection, edit: str
) -> None:
    name, make, angle, scale, is_mirrored = EDITS[edit]
    results = collection.search(make(photo(name)), k=5, copies=True)
    assert results[0].path.endswith(f"{name}.jpg")
    best = results[0]
    # Calibrated on grocery-store, where photos of one shelf share up to ~100 inliers: a copy
    # with 60-120 inliers is likely, not certain; nothing else here comes close.
    assert best.copy_probability is not None and best.copy_probability > COPY_PROBABILITY
    assert best.transform is not None and best.transform.inliers >= 20
    assert best.transform.mirrored is is_mirrored
    assert abs(best.transform.rotation_degrees - angle) < 3
    assert best.transform.scale == pytest.approx(scale, rel=0.15)
    # Only likely copies come back, most probable first.
    probabilities = [r.copy_probability or 0.0 for r in results]
    assert all(p >= COPY_PROBABILITY for p in probabilities)
    assert probabilities == sorted(probabilities, reverse=True)
    # The other photos are no copies: a plain search still ranks them, far less probable.
    others = collection.search(make(photo(name)), k=6, copies=True)
    assert [Path(r.path).name for r in others] == [f"{name}.jpg"]


def test_copies_excludes_photos_that_are_not_copies(collection: Collection) -> None:
    for name in STRANGERS:
        results = collection.search(stranger(name), k=5, copies=True)
        assert list(results) == [], name
        # A plain search still ranks something: the photos are merely not copies.
        assert len(collection.search(stranger(name), k=5)) == 5
    # A copy of one photo is not a copy of the others.
    results = collection.search(rotated(photo("coffee"), 25.0), k=6, copies=True)
    assert [Path(r.path).name for r in results] == ["coffee.jpg"]


def test_copies_needs_local_features_and_one_image(
    collection: Collection, photo_dir: Path, tmp_path: Path, encoder
) -> None:
    with Collection(tmp_path / "plain") as plain:
        plain.use_encoder(encoder)
        plain.index(photo_dir, workers=0)
        with pytest.raises(RequestError, match="local features"):
            plain.search(photo("coffee"), copies=True)
    with pytest.raises(RequestError, match="single image"):
        collection.search_many([photo("coffee"), photo("rocket")], copies=True)
    with pytest.raises(RequestError, match="cosine"):
        collection.search(photo("coffee"), copies=True, metric="euclidean")


def test_cli_search_copies(indexed: Path, tmp_path: Path, capsys) -> None:
    query = tmp_path / "rotated.jpg"
    rotated(photo("coffee"), 25.0).save(query, quality=90)
    common = ["-c", str(indexed), "search", str(query), "--no-server", "--copies"]
    assert main([*common, "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    best = payload["results"][0]
    assert best["path"].endswith("coffee.jpg") and best["copy_probability"] > COPY_PROBABILITY
    assert abs(best["transform"]["rotation_degrees"] - 25) < 3
    assert best["transform"]["mirrored"] is False and best["transform"]["inliers"] >= 20
    assert main(common) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 1 and "coffee.jpg" in table[0]
    assert "p=0." in table[0] and "rotated 25°" in table[0] and "inliers" in table[0]
    stranger(STRANGERS[0]).save(tmp_path / "camera.jpg")
    common[3] = str(tmp_path / "camera.jpg")
    assert main([*common, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"] == []


@pytest.fixture(scope="module")
def service(indexed: Path, encoder) -> Iterator[SearchService]:
    with Collection(indexed) as opened:
        opened.use_encoder(encoder)
        limits = ServiceLimits(max_upload_bytes=5_000_000, max_pixels=5_000_000, max_k=50)
        yield SearchService(opened, limits=limits)


def test_rest_search_copies(service: SearchService) -> None:
    with LiveServer(create_app(service)) as server, httpx.Client(base_url=server.url) as client:

        def post(image: Image.Image, **fields: object) -> dict:
            files = {"image": ("q.jpg", jpeg(image), "image/jpeg")}
            reply = client.post("/search", files=files, data=fields, timeout=120)
            assert reply.status_code == 200, reply.text
            return reply.json()

        body = post(mirrored_crop(photo("astronaut")), k=5, copies="true")
        best = body["results"][0]
        assert best["filename"] == "astronaut.jpg"
        assert best["copy_probability"] > COPY_PROBABILITY
        assert best["transform"]["mirrored"] is True
        assert abs(best["transform"]["rotation_degrees"]) < 3
        assert post(stranger("moon"), k=5, copies="true")["results"] == []
        plain = post(photo("rocket"), k=2)["results"]
        assert plain[0]["copy_probability"] is None and plain[0]["transform"] is None
        schema = client.get("/openapi.json").json()["components"]["schemas"]
        assert {"copy_probability", "transform"} <= set(schema["Match"]["properties"])


def test_grpc_search_copies(service: SearchService) -> None:
    server, port = create_grpc_server(service, port=0, max_workers=2)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = v1_grpc.LookalikeStub(channel)
            query = jpeg(rotated(photo("coffee"), -25.0))
            reply = stub.Search(v1.SearchRequest(image=query, k=5, copies=True), timeout=120)
            best = reply.matches[0]
            assert best.path == "coffee.jpg" and best.copy_probability > COPY_PROBABILITY
            assert best.HasField("transform") and not best.transform.mirrored
            assert abs(best.transform.rotation_degrees + 25) < 3
            assert best.transform.scale == pytest.approx(1.0, rel=0.15)
            assert best.transform.inliers >= 20
            none = stub.Search(
                v1.SearchRequest(image=jpeg(stranger("brick")), k=5, copies=True), timeout=120
            )
            assert list(none.matches) == []
            plain = stub.Search(v1.SearchRequest(image=jpeg(photo("rocket")), k=1), timeout=120)
            assert not plain.matches[0].HasField("copy_probability")
            assert not plain.matches[0].HasField("transform")
            with pytest.raises(grpc.RpcError) as refused:
                stub.Search(
                    v1.SearchRequest(image=jpeg(photo("rocket")), copies=True, metric="euclidean"),
                    timeout=120,
                )
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        server.stop(None).wait()


# -- the suite ------------------------------------------------------------------------------


def _eval(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lookalike eval")
    add_eval_arguments(parser)
    return parser.parse_args(list(argv))


def test_eval_copy_detection_through_a_collection(photo_dir: Path, tmp_path: Path, capsys) -> None:
    kept = tmp_path / "kept"
    options = [
        str(photo_dir),
        "--copy-detection",
        "--attacks",
        "rotation-large,flip-crop,overlay",
        "--copies",
        "3",
        "--top-k",
        "3",
        "--collection",
        str(kept),
        "--local-features",
        "--rerank",
        "2",
        "-q",
    ]
    assert run_eval(_eval(*options, "--out", str(tmp_path / "first"))) == 0
    printed = capsys.readouterr().out
    assert "rerank 2" in printed and "ms/query" in printed
    report = json.loads((tmp_path / "first" / "report.json").read_text())
    copies = report["copy_detection"]
    assert copies["searched_by"] == "collection" and copies["mean_query_ms"] > 0
    assert [a["attack"] for a in copies["attacks"]] == ["rotation-large", "flip-crop", "overlay"]
    assert all(a["recall_at_1"] == 1.0 and a["query_ms"] > 0 for a in copies["attacks"])
    assert report["search"] == {
        "rerank": 2,
        "copy_views": True,
        "local_features": "rootsift-512-256-c0.02",
    }
    assert report["dataset"]["indexed_now"] == len(PHOTO_NAMES)
    # The kept collection is searched again without indexing anything.
    again = [*options, "--no-copy-views", "--out", str(tmp_path / "second")]
    assert run_eval(_eval(*again)) == 0
    second = json.loads((tmp_path / "second" / "report.json").read_text())
    assert second["dataset"]["indexed_now"] == 0 and second["search"]["copy_views"] is False
    with pytest.raises(LookalikeError, match="rerank"):
        run_eval(_eval(str(photo_dir), "--copy-detection", "--rerank", "-1"))
