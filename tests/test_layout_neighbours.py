"""The default search's layout neighbours: a weak query with no copy among its vector
candidates also has the images whose thumbnail's layout of light and dark is nearest its
own measured, so a copy edited all over (greyed, blurred, shrunk) is found even when its
vector drifted past the candidates. Real photos; real SQLite and PostgreSQL catalogs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from conftest import photo
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
from test_messy_folders import LIMIT, assert_failures, build_messy
from test_pixel_check import NAMES, assert_first, source, stems, window
from test_rest import LiveServer

from lookalike.cli.main import main
from lookalike.core import search as search_module
from lookalike.core.collection import Collection
from lookalike.core.multicrop import COPY_VIEWS_BELOW
from lookalike.core.search import PixelCheck, QueryViews, search_options
from lookalike.local.pixels import LAYOUT_SIDE, LayoutTable, Thumbnail, layout_vector
from lookalike.server.grpc_server import create_grpc_server
from lookalike.server.protos import lookalike_v1_pb2 as v1
from lookalike.server.protos import lookalike_v1_pb2_grpc as v1_grpc
from lookalike.server.rest import create_app
from lookalike.server.service import SearchService

# Grey, blurred photos of other things: the neighbours an edited-all-over copy's vector
# drifts to.
OTHERS = (
    *("coins", "page", "text", "clock", "grass", "gravel", "cell", "logo", "retina"),
    *("hubble_deep_field", "immunohistochemistry", "colorwheel", "microaneurysms"),
)


def edited_all_over(image: Image.Image) -> Image.Image:
    """Greyed, blurred and shrunk to a tenth: every pixel changed, the layout kept."""
    grey = ImageOps.grayscale(image).filter(ImageFilter.GaussianBlur(4))
    return grey.resize((max(16, image.width // 10), max(16, image.height // 10))).convert("RGB")


def test_a_layout_outlasts_edits_all_over_and_tells_photos_apart() -> None:
    layouts = {name: layout_vector(Thumbnail.of(source(name))) for name in NAMES}
    for name, layout in layouts.items():
        assert layout.shape == (LAYOUT_SIDE * LAYOUT_SIDE,)
        assert np.linalg.norm(layout) == pytest.approx(1.0, abs=1e-5)
        image = source(name)
        for edited in (
            edited_all_over(image),
            ImageEnhance.Color(image).enhance(0.3).filter(ImageFilter.GaussianBlur(3)),
            ImageEnhance.Brightness(image).enhance(1.4),
        ):
            same = float(layout @ layout_vector(Thumbnail.of(edited)))
            others = max(float(layout @ other) for o, other in layouts.items() if o != name)
            # (A fine texture, the brick wall, keeps least of it shrunk to a tenth: 0.8.)
            assert same > 0.75 and same > others + 0.25, (name, same, others)
    flat = Thumbnail(np.full((20, 32), 128.0, dtype=np.float32))
    assert not layout_vector(flat).any()


def test_the_table_finds_the_nearest_layouts_mirror_images_too() -> None:
    thumbnails = {i: Thumbnail.of(source(name)) for i, name in enumerate(NAMES, start=10)}
    table = LayoutTable.of(thumbnails)
    assert len(table) == len(NAMES)
    for i, name in enumerate(NAMES, start=10):
        query = Thumbnail.of(ImageOps.mirror(edited_all_over(source(name))))
        found = table.nearest([query], 3)
        assert found[0][0] == i and len({j for j, _ in found}) == 3
        correlations = [correlation for _, correlation in found]
        assert correlations == sorted(correlations, reverse=True) and correlations[0] > 0.75
    # One of several queries (the query and its upright view) is enough; n is a cap.
    both = [Thumbnail.of(source("moon")), Thumbnail.of(source("horse"))]
    two = {image_id for image_id, _ in table.nearest(both, 2)}
    assert two == {10 + NAMES.index("moon"), 10 + NAMES.index("horse")}
    assert len(table.nearest(both, 100)) == len(NAMES)
    flat = Thumbnail(np.zeros((32, 32), dtype=np.float32))
    assert table.nearest([flat], 3) == []
    assert table.nearest([both[0]], 0) == []
    assert LayoutTable.of({}).nearest(both, 3) == []


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def collection(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Collection, Path]]:
    """Each photo as two shots a step apart, and grey blurred photos of other things."""
    db = (
        None if request.param == "sqlite" else request.getfixturevalue("postgres").create_database()
    )
    root = tmp_path_factory.mktemp("layouts")
    photos = root / "photos"
    photos.mkdir()
    for name in NAMES:
        window(source(name), 0.0, 0.0, 0.8, 0.8).save(photos / f"{name}-a.jpg")
        window(source(name), 0.2, 0.2, 1.0, 1.0).save(photos / f"{name}-b.jpg")
    for name in OTHERS:
        edited_all_over(source(name)).save(photos / f"other-{name}.jpg")
    with Collection(root / "c", db=db) as opened:
        opened.index(photos, workers=0)
        yield opened, photos


@pytest.fixture
def few_candidates(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two vector candidates measured, as 16 are of a collection of thousands: the source
    of a copy edited all over ranks past them here as it does there."""
    monkeypatch.setattr(search_module, "PIXEL_CANDIDATES", 2)


def query_of(photos: Path, name: str) -> Image.Image:
    return edited_all_over(Image.open(photos / f"{name}-a.jpg").convert("RGB"))


@pytest.mark.usefixtures("few_candidates")
def test_a_copy_edited_all_over_is_found_by_its_layout_past_the_vector_candidates(
    collection: tuple[Collection, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    opened, photos = collection
    missed_without = []
    for name in NAMES:
        query = query_of(photos, name)
        plain = opened.search(query, k=3, copy_views=False)
        assert plain.results[0].score < COPY_VIEWS_BELOW  # a weak query
        assert_first(opened, query, f"{name}-a", name)
        with monkeypatch.context() as layouts_off:
            layouts_off.setattr(search_module, "PIXEL_LAYOUTS", 0)
            if stems(opened.search(query, k=3).results)[0] != f"{name}-a":
                missed_without.append(name)
        if f"{name}-a" not in stems(plain.results)[:2]:
            assert name in missed_without
    # Without the layouts, the copies whose source ranked past the candidates are missed.
    assert missed_without


@pytest.mark.usefixtures("few_candidates")
def test_layout_neighbours_keep_the_filters_and_serve_every_interface(
    collection: tuple[Collection, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    opened, photos = collection
    name = _missed_without_layouts(opened, photos)
    query = query_of(photos, name)
    query.save(tmp_path / "copy.png")
    # A filter that leaves the source out never lets it in by its layout.
    source_id = opened.catalog.ids_for_paths([str((photos / f"{name}-a.jpg").resolve())])
    opened.import_metadata(_labels(tmp_path, photos, f"{name}-a.jpg"))
    kept = opened.search(query, k=5, where={"shelf": "kept"})
    assert all(r.id not in source_id.values() for r in kept.results)
    assert kept.results and all(r.metadata.get("shelf") == "kept" for r in kept.results)
    assert stems(opened.search(query, k=1).results) == [f"{name}-a"]

    cli = ["-c", str(opened.path), "search", str(tmp_path / "copy.png"), "--no-server"]
    assert main([*cli, "-k", "3", "--json"]) == 0
    assert Path(json.loads(capsys.readouterr().out)["results"][0]["path"]).stem == f"{name}-a"
    service = SearchService(opened)
    with LiveServer(create_app(service)) as server, httpx.Client(base_url=server.url) as client:
        files = {"image": ("copy.png", (tmp_path / "copy.png").read_bytes(), "image/png")}
        reply = client.post("/search", files=files, data={"k": 3}, timeout=120)
        assert reply.status_code == 200, reply.text
        assert Path(reply.json()["results"][0]["filename"]).stem == f"{name}-a"
    grpc_server, port = create_grpc_server(service, port=0, max_workers=2)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = v1_grpc.LookalikeStub(channel)
            upload = (tmp_path / "copy.png").read_bytes()
            reply = stub.Search(v1.SearchRequest(image=upload, k=3), timeout=120)
            assert Path(reply.matches[0].path).stem == f"{name}-a"
            kept_only = v1.SearchRequest(image=upload, k=5, where={"shelf": "kept"})
            for match in stub.Search(kept_only, timeout=120).matches:
                assert match.id not in source_id.values()
    finally:
        grpc_server.stop(None).wait()


@pytest.mark.usefixtures("few_candidates")
def test_a_messy_folder_gets_layouts_for_its_good_photos_and_finds_their_copies(
    tmp_path: Path,
) -> None:
    # Odd names (not UTF-8 too), AVIF, PNG, a symlinked file and folder, and every kind of
    # bad entry beside them: each good photo gets a layout, and a copy of it edited all over
    # is found first; the bad entries cost nothing.
    messy = build_messy(tmp_path)
    with Collection(tmp_path / "c") as opened:
        report = opened.index(messy.folder, workers=0, max_file_bytes=LIMIT)
        assert_failures(report.failed, messy.bad)
        table = opened.searcher.local_store.layout_table()
        assert table is not None and len(table) == len(messy.good) == len(opened)
        for path, name in messy.good.items():
            found = opened.search(edited_all_over(photo(name)), k=3)
            assert found.results[0].path == path, (name, [r.path for r in found.results])


def _missed_without_layouts(opened: Collection, photos: Path) -> str:
    """A photo whose copy edited all over ranks its source past the candidates."""
    for name in NAMES:
        plain = opened.search(query_of(photos, name), k=3, copy_views=False)
        if f"{name}-a" not in stems(plain.results)[:2]:
            return name
    raise AssertionError("every source ranked among the candidates")


def _labels(folder: Path, photos: Path, left_out: str) -> Path:
    """A metadata CSV: every image on the 'kept' shelf but ``left_out``."""
    rows = ["filename,shelf"]
    rows += [
        f"{p.name},{'gone' if p.name == left_out else 'kept'}" for p in sorted(photos.iterdir())
    ]
    path = folder / "shelves.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_the_layout_table_follows_every_change_to_the_catalog(
    catalog_db: object, tmp_path: Path
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in NAMES[:3]:
        source(name).save(photos / f"{name}.jpg")
    make_db = catalog_db  # a callable: a fresh catalog location per call
    with Collection(tmp_path / "c", db=make_db()) as opened:  # type: ignore[operator]
        opened.index(photos, workers=0)
        store = opened.searcher.local_store
        table = store.layout_table()
        assert table is not None and len(table) == 3
        assert store.layout_table() is table  # one build per catalog state
        source("moon").save(photos / "moon.jpg")
        opened.index(photos, workers=0)
        grown = store.layout_table()
        assert grown is not None and len(grown) == 4
        moon = opened.catalog.ids_for_paths([str((photos / "moon.jpg").resolve())])
        nearest = grown.nearest([Thumbnail.of(source("moon"))], 1)
        assert [image_id for image_id, _ in nearest] == list(moon.values())
        # A thumbnail stored later (as `fill_thumbnails` does) counts at once, though it
        # leaves the catalog's state as it was.
        (moon_id,) = moon.values()
        replaced = Thumbnail.of(source("rocket"))
        store.save_thumbnails([moon_id], [replaced.to_bytes()], {})
        relaid = store.layout_table()
        assert relaid is not None and relaid.nearest([replaced], 1)[0][0] == moon_id
        opened.remove([photos / "moon.jpg"])
        shrunk = store.layout_table()
        assert shrunk is not None and len(shrunk) == 3
        assert not set(moon.values()) & set(shrunk.ids.tolist())
        # A weak query finds no removed image by its layout.
        query = edited_all_over(source("moon"))
        assert all(r.id not in moon.values() for r in opened.search(query, k=3).results)


def test_an_image_measured_for_its_layout_alone_counts_only_when_it_shows_the_query(
    collection: tuple[Collection, Path],
) -> None:
    opened, photos = collection
    ids = opened.catalog.ids_for_paths([str(p.resolve()) for p in sorted(photos.iterdir())])
    by_stem = {Path(path).stem: image_id for path, image_id in ids.items()}
    query = Thumbnail.of(query_of(photos, "chelsea"))
    check = PixelCheck(query, opened.searcher.local_store)
    check.measure([by_stem["horse-a"]])  # a vector candidate, measured however alike
    alike = check.measure(list(by_stem.values()), at_least=search_module.PIXEL_LAYOUT_COPY_AT)
    # The copy's own shot shows the query; the rest are forgotten, as if never measured,
    # except the candidate measured before.
    assert alike == {by_stem["chelsea-a"], by_stem["horse-a"]}
    assert set(check.likeness) == alike
    assert check.likeness[by_stem["horse-a"]] < search_module.PIXEL_LAYOUT_COPY_AT
    assert not check.turned_upright
    # A query turned upright measures its layout neighbours as any candidates.
    check.add_view(Thumbnail.of(source("chelsea").rotate(90, expand=True)))
    assert check.turned_upright
    assert check.measure(list(by_stem.values()), at_least=-1.0) == set(by_stem.values())


def test_images_added_by_their_layout_are_scored_as_the_plain_search_scores_them(
    collection: tuple[Collection, Path],
) -> None:
    opened, photos = collection
    query = query_of(photos, "rocket")
    plain = opened.search(query, k=30, copy_views=False)
    ids = [r.id for r in plain.results]
    searcher = opened.searcher
    scored = searcher._scored_by_views(ids, opened.embed(query)[None, :], search_options())
    assert [r.id for r in scored] == ids
    for result, expected in zip(scored, plain.results, strict=True):
        assert result.score == pytest.approx(expected.score, abs=1e-4)
    # A view's penalty lowers its scores; the best view counts.
    views = QueryViews(np.stack([opened.embed(query)] * 2), np.array([0.1, 0.3]))
    lowered = searcher._scored_by_views(ids, views, search_options())
    for result, expected in zip(lowered, plain.results, strict=True):
        assert result.score == pytest.approx(expected.score - 0.1, abs=1e-4)
    # A filter keeps out what it keeps out of any search.
    assert searcher._scored_by_views(ids, views, search_options(where={"shelf": "none"})) == []
