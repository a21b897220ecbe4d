"""The default search's pixel check: a copy that was blurred, shrunk, cropped or mirrored
shows its source's pixels in a 32-pixel thumbnail and goes first, while another shot of the
same scene (an overlapping window of one photo) and other photos do not count as copies.
Real photos; the catalogs are real SQLite and PostgreSQL."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from conftest import photo
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps
from test_rest import LiveServer

from lookalike.cli.main import main
from lookalike.core import search as search_module
from lookalike.core.collection import Collection
from lookalike.core.multicrop import COPY_VIEWS_BELOW
from lookalike.core.results import SearchResult
from lookalike.core.search import PIXEL_COPY_AT, PIXEL_LEAN_FROM, PIXEL_UPRIGHT_AT, PixelCheck
from lookalike.local.pixels import (
    THUMBNAIL_KIND,
    THUMBNAIL_SIDE,
    PixelQuery,
    Thumbnail,
    copy_likeness,
)
from lookalike.server.grpc_server import create_grpc_server
from lookalike.server.protos import lookalike_v1_pb2 as v1
from lookalike.server.protos import lookalike_v1_pb2_grpc as v1_grpc
from lookalike.server.rest import create_app
from lookalike.server.service import SearchService

NAMES = ("astronaut", "chelsea", "coffee", "rocket", "camera", "horse", "brick", "moon")


def source(name: str) -> Image.Image:
    image = photo(name).convert("RGB")
    image.thumbnail((512, 512))
    return image


def window(image: Image.Image, x0: float, y0: float, x1: float, y1: float) -> Image.Image:
    width, height = image.size
    return image.crop((int(width * x0), int(height * y0), int(width * x1), int(height * y1)))


def screenshot(image: Image.Image) -> Image.Image:
    width, height = image.size
    # The photo at 95% in a canvas 15% wider, between a title bar and a button bar.
    canvas = Image.new("RGB", (int(width * 1.15), int(height * 1.3)), (24, 24, 28))
    canvas.paste(image.resize((int(width * 0.95), int(height * 0.95))), (int(width * 0.1), 50))
    return canvas


def overlaid(image: Image.Image) -> Image.Image:
    copy = image.copy()
    draw = ImageDraw.Draw(copy)
    width, height = copy.size
    draw.rectangle((10, 10, width // 5, height // 6), fill=(250, 30, 30))
    for line in range(4):
        draw.text((20, height - 80 + 16 * line), "caption text over the photo", fill="white")
    return copy


EDITS = {
    "blur": lambda im: im.filter(ImageFilter.GaussianBlur(5)),
    "thumbnail": lambda im: im.resize((max(16, im.width // 8), max(16, im.height // 8))),
    "crop": lambda im: window(im, 0.1, 0.15, 0.9, 0.95),
    "mirrored crop": lambda im: ImageOps.mirror(window(im, 0.15, 0.05, 0.95, 0.85)),
    "grayscale": lambda im: ImageOps.autocontrast(ImageOps.grayscale(im)).convert("RGB"),
    "screenshot": screenshot,
    "overlay": overlaid,
}


def test_a_thumbnail_is_small_round_trips_and_refuses_other_bytes() -> None:
    thumbnail = Thumbnail.of(source("astronaut"))
    assert max(thumbnail.pixels.shape) == THUMBNAIL_SIDE
    data = thumbnail.to_bytes()
    assert len(data) <= 2 + THUMBNAIL_SIDE**2
    again = Thumbnail.from_bytes(data)
    assert again is not None
    np.testing.assert_array_equal(again.pixels, np.rint(thumbnail.pixels))
    for garbage in (b"", b"\x20\x20", data[:-1], data + b"x", b"\x00\x05" + bytes(5)):
        assert Thumbnail.from_bytes(garbage) is None
    tall = Thumbnail.of(Image.new("RGB", (3, 900), "white"))
    assert tall.pixels.shape == (THUMBNAIL_SIDE, 1)
    assert Thumbnail.from_bytes(tall.to_bytes()) is not None


# Edits that move the frame: a crop of a fine periodic texture ('brick') has no single
# place in a 32-pixel thumbnail, so it is left out of those.
REFRAMING = ("crop", "mirrored crop", "screenshot")
PLACEABLE = tuple(name for name in NAMES if name != "brick")


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_an_edited_copy_shows_its_source_pixels(edit: str) -> None:
    for name in NAMES:
        if edit in REFRAMING and name == "brick":
            continue
        original = source(name)
        copy = EDITS[edit](original)
        likeness = copy_likeness(Thumbnail.of(copy), Thumbnail.of(original))
        assert likeness >= PIXEL_COPY_AT, (name, edit, likeness)


def test_other_photos_and_other_shots_of_one_scene_are_not_copies() -> None:
    thumbnails = {name: Thumbnail.of(source(name)) for name in NAMES}
    for a, b in itertools.combinations(NAMES, 2):
        assert copy_likeness(thumbnails[a], thumbnails[b]) < PIXEL_COPY_AT, (a, b)
    for name in NAMES:
        # Two windows of one scene, a quarter of the frame apart: neither contains the other.
        left = window(source(name), 0.0, 0.0, 0.75, 0.75)
        right = window(source(name), 0.25, 0.25, 1.0, 1.0)
        assert copy_likeness(Thumbnail.of(left), Thumbnail.of(right)) < PIXEL_COPY_AT, name
    flat = Thumbnail.of(Image.new("RGB", (64, 48), (90, 90, 90)))
    assert copy_likeness(flat, thumbnails["astronaut"]) < PIXEL_COPY_AT
    assert copy_likeness(thumbnails["astronaut"], flat) < PIXEL_COPY_AT


def test_many_candidates_of_mixed_shapes_measure_as_each_alone() -> None:
    # Candidates are correlated together (padded to one shape, mirrored beside them): the
    # batch must give each the likeness it has alone, whatever its shape and neighbours.
    candidates = []
    for name in NAMES:
        image = source(name)
        candidates += [Thumbnail.of(image), Thumbnail.of(window(image, 0.0, 0.0, 0.6, 1.0))]
        candidates.append(Thumbnail.of(ImageOps.mirror(window(image, 0.1, 0.0, 1.0, 0.7))))
    for name in ("astronaut", "coffee", "horse"):
        for query in (source(name), window(source(name), 0.1, 0.1, 0.8, 0.9)):
            for framed in (True, False):
                batch = PixelQuery(Thumbnail.of(query), framed=framed).likenesses(candidates)
                alone = [
                    PixelQuery(Thumbnail.of(query), framed=framed).likenesses([c])[0]
                    for c in candidates
                ]
                np.testing.assert_allclose(batch, alone, atol=1e-4)


def test_without_frames_only_a_query_that_holds_a_candidate_scores_less() -> None:
    # The candidate-inside-the-query direction is for queries in a frame (bare corners).
    original = source("chelsea")
    shot = Thumbnail.of(screenshot(original))
    plain = Thumbnail.of(original)
    assert PixelQuery(shot).likenesses([plain])[0] >= PIXEL_COPY_AT
    assert PixelQuery(shot, framed=False).likenesses([plain])[0] < PIXEL_COPY_AT
    blurred = Thumbnail.of(EDITS["blur"](original))
    assert PixelQuery(blurred, framed=False).likenesses([plain])[0] >= PIXEL_COPY_AT
    from lookalike.core.multicrop import CopyClues

    assert CopyClues.of(screenshot(original)).padded
    assert not CopyClues.of(original).padded


def rotated_crop(image: Image.Image, angle: float) -> Image.Image:
    """Rotated ``angle`` degrees on a grown canvas (black corners), then the canvas cut to
    its middle 80% by 75%, and the colours washed out: the photo's own frame is gone."""
    turned = image.rotate(angle, Image.Resampling.BICUBIC, expand=True)
    width, height = turned.size
    cut = turned.crop((width // 10, height // 8, width * 9 // 10, height * 7 // 8))
    return ImageEnhance.Color(ImageOps.autocontrast(cut.convert("RGB"), cutoff=2)).enhance(0.2)


def result(image_id: int, score: float) -> SearchResult:
    return SearchResult(id=image_id, path=f"/p/{image_id}.jpg", score=score)


def test_copies_go_first_most_alike_first_and_scores_still_fall() -> None:
    check = PixelCheck(Thumbnail(np.zeros((4, 4), np.float32)), store=None)  # type: ignore[arg-type]
    ranked = [result(1, 0.92), result(2, 0.90), result(3, 0.71), result(4, 0.70), result(5, 0.5)]
    # Two copies standing out together (0.97, 0.95), then a drop to 0.6.
    check.likeness = {1: 0.4, 2: 0.6, 3: 0.97, 4: 0.95, 5: 0.2}
    out = check.copies_first(ranked)
    assert [r.id for r in out] == [3, 4, 1, 2, 5]
    scores = [r.score for r in out]
    assert scores == sorted(scores, reverse=True)
    assert out[0].score == pytest.approx(0.97)  # its likeness, above its cosine
    assert out[1].score == pytest.approx(0.95)
    # Alike, but none stands out from the others (items of one cut on a plain background).
    check.likeness = {1: 0.9, 2: 0.86, 3: 0.85, 4: 0.83, 5: 0.5}
    assert check.copies_first(ranked) == ranked
    check.likeness = {i: 0.1 for i in range(1, 6)}
    assert check.copies_first(ranked) == ranked
    check.likeness = {1: 0.5, 2: 0.6, 3: 0.92, 4: 0.2, 5: 0.2}
    out = check.copies_first(ranked)
    assert [r.id for r in out] == [3, 1, 2, 4, 5]
    assert out[0].score == pytest.approx(0.92)  # at least the best of the rest
    # Measured while among the best, then pushed down by the views' candidates: still a copy.
    long = [result(i, 0.9 - 0.01 * i) for i in range(1, 31)]
    check.likeness = {i: 0.3 for i in range(1, 31)}
    check.likeness[27] = 0.9
    out = check.copies_first(long)
    assert out[0].id == 27 and [r.id for r in out[1:]] == [i for i in range(1, 31) if i != 27]


def test_with_no_copy_standing_out_the_pixels_lean_to_the_likelier_source() -> None:
    check = PixelCheck(Thumbnail(np.zeros((4, 4), np.float32)), store=None)  # type: ignore[arg-type]
    ranked = [result(1, 0.72), result(2, 0.70), result(3, 0.66), result(4, 0.60)]
    # Another shot of the crate comes first by its vector; the copy's source shows more of
    # the query's pixels, though not enough to stand out as a copy: it goes first, at the
    # first's score, and the rest keep their order.
    check.likeness = {1: 0.45, 2: 0.75, 3: 0.7, 4: 0.3}
    assert check.copies(ranked) == set()
    assert check.leaning(ranked) == 2
    out = check.copies_first(ranked)
    assert [r.id for r in out] == [2, 1, 3, 4]
    assert [r.score for r in out] == [0.72, 0.72, 0.66, 0.60]
    # A clearly closer vector is not beaten by a garment of the same cut a little more
    # alike at 32 pixels.
    ranked = [result(1, 0.90), result(2, 0.75), result(3, 0.7)]
    check.likeness = {1: 0.70, 2: 0.78, 3: 0.2}
    assert check.leaning(ranked) == 1
    assert check.copies_first(ranked) == ranked
    # When no candidate shows PIXEL_LEAN_FROM of the query, the pixels have no say.
    ranked = [result(1, 0.72), result(2, 0.70)]
    check.likeness = {1: 0.1, 2: PIXEL_LEAN_FROM - 0.01}
    assert check.leaning(ranked) is None
    assert check.copies_first(ranked) == ranked
    # A candidate without a thumbnail (-1) is never leaned to, nor counted.
    check.likeness = {1: -1.0, 2: 0.65}
    assert check.copies_first(ranked)[0].id == 2
    check.likeness = {1: 0.3, 2: -1.0}
    assert check.leaning(ranked) is None


def test_a_query_turned_upright_puts_the_shot_most_alike_its_view_first() -> None:
    check = PixelCheck(Thumbnail(np.zeros((4, 4), np.float32)), store=None)  # type: ignore[arg-type]
    ranked = [result(1, 0.70), result(2, 0.66), result(3, 0.45), result(4, 0.40)]
    # The upright view shows the third candidate's pixels (not enough for a copy) and the
    # others clearly less: it goes first at the first's score, though the lean would not
    # move it (its vector is far behind).
    check.likeness = {1: 0.55, 2: 0.5, 3: 0.72, 4: 0.3}
    check.upright = {1: 0.55, 2: 0.5, 3: 0.72, 4: 0.3}
    assert check.copies(ranked) == set() and check.leaning(ranked) == 1
    assert check.upright_copy(ranked) == 3
    out = check.copies_first(ranked)
    assert [r.id for r in out] == [3, 1, 2, 4]
    assert [r.score for r in out] == [0.70, 0.70, 0.66, 0.40]
    # Not alike enough, or not standing out from the next: the lean decides as before.
    check.upright = {1: 0.55, 2: 0.5, 3: PIXEL_UPRIGHT_AT - 0.01, 4: 0.3}
    assert check.upright_copy(ranked) is None
    assert check.copies_first(ranked) == ranked
    check.upright = {1: 0.70, 2: 0.5, 3: 0.72, 4: 0.3}
    assert check.upright_copy(ranked) is None
    # A query never turned upright has no upright views' likenesses: nothing changes.
    check.upright = {}
    assert check.upright_copy(ranked) is None
    # A copy standing out by the query's own pixels still decides first.
    check.likeness = {1: 0.3, 2: 0.95, 3: 0.72, 4: 0.3}
    check.upright = {1: 0.3, 2: 0.4, 3: 0.72, 4: 0.3}
    assert check.copies_first(ranked)[0].id == 2


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def collection(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Collection, Path]]:
    """Each photo as two shots a step apart ('-a' the upper left 80%, '-b' the lower
    right 80%), on each catalog."""
    db = (
        None if request.param == "sqlite" else request.getfixturevalue("postgres").create_database()
    )
    root = tmp_path_factory.mktemp("pixels")
    (root / "photos").mkdir()
    for name in NAMES:
        window(source(name), 0.0, 0.0, 0.8, 0.8).save(root / "photos" / f"{name}-a.jpg")
        window(source(name), 0.2, 0.2, 1.0, 1.0).save(root / "photos" / f"{name}-b.jpg")
    with Collection(root / "c", db=db) as opened:
        opened.index(root / "photos", workers=0)
        yield opened, root / "photos"


def stems(results: list[SearchResult]) -> list[str]:
    return [Path(r.path).stem for r in results]


def assert_first(opened: Collection, query: Image.Image, expected: str, why: object) -> None:
    """The default search (k=3) puts ``expected`` first, its scores still falling."""
    found = opened.search(query, k=3)
    assert stems(found.results)[0] == expected, (why, stems(found.results))
    scores = [r.score for r in found]
    assert scores == sorted(scores, reverse=True)


def test_the_default_search_puts_the_shot_a_copy_was_made_from_first(
    collection: tuple[Collection, Path],
) -> None:
    opened, photos = collection
    fooled = 0
    for name, edit in itertools.product(NAMES, ("blur", "thumbnail", "grayscale")):
        query = EDITS[edit](Image.open(photos / f"{name}-a.jpg").convert("RGB"))
        found = opened.search(query, k=3)
        assert stems(found.results)[0] == f"{name}-a", (name, edit, stems(found.results))
        scores = [r.score for r in found]
        assert scores == sorted(scores, reverse=True)
        plain = opened.search(query, k=3, copy_views=False)
        fooled += stems(plain.results)[0] != f"{name}-a"
    # Without the check the other shot of the scene comes first for some of these.
    assert fooled >= 1


def test_a_rotated_and_cropped_copy_is_matched_upright_to_its_shot(
    collection: tuple[Collection, Path],
) -> None:
    # The fill's tilted borders give the angle; the photo turned upright and cut free of
    # the fill is embedded and compared by its pixels, so the shot it came from goes first,
    # lifted to a copy's score, not the other shot of the scene.
    opened, photos = collection
    for name in ("chelsea", "moon"):
        query = rotated_crop(Image.open(photos / f"{name}-a.jpg").convert("RGB"), -33.0)
        plain = opened.search(query, k=3, copy_views=False)
        assert plain.results[0].score < COPY_VIEWS_BELOW  # weak: the views are searched
        found = opened.search(query, k=3)
        assert stems(found.results)[0] == f"{name}-a", (name, stems(found.results))
        assert found.results[0].score >= PIXEL_COPY_AT
        assert found.results[0].score > plain.results[0].score + 0.1


def test_a_crop_of_one_shot_that_the_other_does_not_contain_finds_its_shot(
    collection: tuple[Collection, Path],
) -> None:
    opened, photos = collection
    for name in PLACEABLE:
        shot = Image.open(photos / f"{name}-a.jpg").convert("RGB")
        query = window(shot, 0.0, 0.0, 0.7, 0.7).filter(ImageFilter.GaussianBlur(2))
        found = opened.search(query, k=2)
        assert stems(found.results)[0] == f"{name}-a", (name, stems(found.results))


def rotated_cut_recoloured(image: Image.Image, angle: float, saturation: float) -> Image.Image:
    """Rotated on a grown canvas (black corners), cut to the canvas's upper-left 65%, its
    colours changed: a copy whose thumbnail shows its shot's pixels, but not beyond doubt."""
    turned = image.rotate(angle, Image.Resampling.BICUBIC, expand=True)
    cut = window(turned, 0.1, 0.1, 0.75, 0.75)
    return ImageEnhance.Contrast(ImageEnhance.Color(cut).enhance(saturation)).enhance(0.8)


@pytest.mark.parametrize(("name", "angle"), [("coffee", 25.0), ("brick", -15.0), ("brick", 25.0)])
def test_a_copy_no_shot_stands_out_for_goes_to_the_shot_its_pixels_lean_to(
    collection: tuple[Collection, Path], monkeypatch: pytest.MonkeyPatch, name: str, angle: float
) -> None:
    # The other shot of the scene wins by its vector; the copy's shot shows more of the
    # query's pixels (not enough to stand out as a copy), and that decides.
    opened, photos = collection
    shot = Image.open(photos / f"{name}-a.jpg").convert("RGB")
    for saturation in (0.4, 1.6):
        query = rotated_cut_recoloured(shot, angle, saturation)
        assert_first(opened, query, f"{name}-a", saturation)
        with monkeypatch.context() as lean_off:
            lean_off.setattr(search_module, "PIXEL_LEAN_FROM", 2.0)
            lean_off.setattr(search_module, "PIXEL_UPRIGHT_AT", 2.0)
            assert stems(opened.search(query, k=3).results)[0] == f"{name}-b"


@pytest.mark.parametrize("angle", [-15.0, 25.0])
def test_a_copy_turned_upright_goes_to_the_shot_most_alike_its_view(
    collection: tuple[Collection, Path], monkeypatch: pytest.MonkeyPatch, angle: float
) -> None:
    # The brick wall's two shots are alike everywhere; the copy turned upright shows its own
    # shot's pixels clearly more than the other's, which decides without the lean.
    opened, photos = collection
    shot = Image.open(photos / "brick-a.jpg").convert("RGB")
    monkeypatch.setattr(search_module, "PIXEL_LEAN_FROM", 2.0)
    for saturation in (0.4, 1.6):
        query = rotated_cut_recoloured(shot, angle, saturation)
        assert stems(opened.search(query, k=3).results)[0] == "brick-a", saturation
        with monkeypatch.context() as upright_off:
            upright_off.setattr(search_module, "PIXEL_UPRIGHT_AT", 2.0)
            assert stems(opened.search(query, k=3).results)[0] == "brick-b", saturation


def test_the_lean_holds_with_other_options_and_through_every_interface(
    collection: tuple[Collection, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # One search pipeline: the CLI, REST and gRPC put the copy's own shot first as the
    # library does, with one result, with a threshold at its score, and each turns the
    # pixel check (and so the lean) off with its copy-views switch.
    opened, photos = collection
    query = rotated_cut_recoloured(
        Image.open(photos / "coffee-a.jpg").convert("RGB"), 25.0, saturation=0.4
    )
    query.save(tmp_path / "copy.jpg", quality=95)
    query = Image.open(tmp_path / "copy.jpg").convert("RGB")  # what every interface reads
    found = opened.search(query, k=3)
    assert stems(found.results)[0] == "coffee-a"
    assert stems(opened.search(query, k=1).results) == ["coffee-a"]
    best = found.results[0].score
    assert stems(opened.search(query, k=3, threshold=best - 1e-6).results)[0] == "coffee-a"
    plain = stems(opened.search(query, k=3, copy_views=False).results)
    assert plain[0] == "coffee-b"

    cli = ["-c", str(opened.path), "search", str(tmp_path / "copy.jpg"), "--no-server"]
    assert main([*cli, "-k", "3", "--json"]) == 0
    assert Path(json.loads(capsys.readouterr().out)["results"][0]["path"]).stem == "coffee-a"
    assert main([*cli, "-k", "3", "--json", "--no-copy-views"]) == 0
    assert Path(json.loads(capsys.readouterr().out)["results"][0]["path"]).stem == "coffee-b"

    service = SearchService(opened)
    upload = (tmp_path / "copy.jpg").read_bytes()
    with LiveServer(create_app(service)) as server, httpx.Client(base_url=server.url) as client:
        for fields, expected in (
            ({"k": 3}, "coffee-a"),
            ({"k": 3, "copy_views": "false"}, "coffee-b"),
        ):
            files = {"image": ("copy.jpg", upload, "image/jpeg")}
            reply = client.post("/search", files=files, data=fields, timeout=120)
            assert reply.status_code == 200, reply.text
            assert Path(reply.json()["results"][0]["filename"]).stem == expected
    grpc_server, port = create_grpc_server(service, port=0, max_workers=2)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = v1_grpc.LookalikeStub(channel)
            reply = stub.Search(v1.SearchRequest(image=upload, k=3), timeout=120)
            assert Path(reply.matches[0].path).stem == "coffee-a"
            off = stub.Search(v1.SearchRequest(image=upload, k=3, no_copy_views=True), timeout=120)
            assert Path(off.matches[0].path).stem == "coffee-b"
    finally:
        grpc_server.stop(None).wait()


def test_images_indexed_without_thumbnails_are_searched_and_get_them_at_the_next_index(
    tmp_path: Path,
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in NAMES[:4]:
        source(name).save(photos / f"{name}.jpg")
    with Collection(tmp_path / "c") as opened:
        opened.index(photos, workers=0)
        ids = opened.catalog.ids_with_local_features(THUMBNAIL_KIND)
        assert len(ids) == 4
        # A collection indexed before lookalike kept thumbnails has none.
        with opened.catalog._transaction() as db:
            db.execute("DELETE FROM local_features WHERE kind = ?", (THUMBNAIL_KIND,))
        query = source("chelsea").filter(ImageFilter.GaussianBlur(3))
        assert stems(opened.search(query, k=1).results) == ["chelsea"]
        # The next index run reads the files for their thumbnails, embeds nothing again.
        report = opened.index(photos, workers=0)
        assert (report.embedded, report.unchanged, report.thumbnails) == (0, 4, 4)
        assert opened.catalog.ids_with_local_features(THUMBNAIL_KIND) == ids
        again = opened.index(photos, workers=0)
        assert (again.embedded, again.thumbnails) == (0, 0)
        # A file that cannot be read keeps none and does not stop the others.
        with opened.catalog._transaction() as db:
            db.execute("DELETE FROM local_features WHERE kind = ?", (THUMBNAIL_KIND,))
        (photos / "chelsea.jpg").write_bytes(b"not a jpeg any more")
        stored = opened.fill_thumbnails([str(p) for p in sorted(photos.iterdir())], workers=2)
        assert stored == 3
        assert len(opened.catalog.ids_with_local_features(THUMBNAIL_KIND)) == 3


def test_copy_views_are_made_for_padded_corners_only() -> None:
    from lookalike.core.multicrop import padded_corners
    from lookalike.evaluation.copydetect import ALL_ATTACKS, attack_rng

    for name in NAMES:
        image = photo(name).convert("RGB")
        black = image.rotate(25, Image.Resampling.BICUBIC, expand=True)
        filled = ALL_ATTACKS["rotation-large"](image, attack_rng(0, "rotation-large", 0))
        assert padded_corners(black) and padded_corners(filled), name
    # Photos with detail up to their corners get the pixel check alone.
    for name in ("astronaut", "chelsea", "coffee", "brick"):
        assert not padded_corners(photo(name).convert("RGB")), name
