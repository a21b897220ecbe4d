"""Filtering and sorting by metadata, EXIF's above all: comparisons and ranges, GPS circles and
boxes, sort keys; through the library, the command line, REST (a real HTTP server) and gRPC
(a real client). Filters never cut the result count: candidates widen until k pass or the
collection is exhausted, approximate indexes included.

The photos carry EXIF, GPS and XMP that the tests write (helpers in test_exif.py).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import toy_encoder
from conftest import photo
from PIL import ImageEnhance
from test_exif import exif_block, photo_file, xmp_packet
from test_grpc import Served
from test_rest import LiveServer

from lookalike.catalog import ImageRecord
from lookalike.cli.main import main
from lookalike.core.collection import Collection
from lookalike.core.filters import (
    Condition,
    distance_km,
    make_filter,
    matches,
    parse_condition,
    parse_sort,
    sort_items,
)
from lookalike.core.search import SearchOptions
from lookalike.errors import RequestError
from lookalike.server.protos import lookalike_v1_pb2 as v1
from lookalike.server.rest import create_app
from lookalike.server.service import SearchService

PARIS = (48.8584, 2.2945)  # the Eiffel Tower
MONTMARTRE = (48.8867, 2.3431)  # 4.75 km from it
NEW_YORK = (40.7128, -74.0060)
SYDNEY = (-33.8568, 151.2153)
FIJI = (-17.7134, 178.0650)  # just west of the antimeridian

# name: (how it is written, the photo it shows). Dates are the camera's wall-clock time.
PHOTOS: dict[str, dict[str, Any]] = {
    "eiffel.jpg": {
        "source": "astronaut",
        "exif": {"make": "Google", "model": "Pixel 7", "taken": "2024:03:10 09:00:00",
                 "offset": "+01:00", "position": PARIS},
    },
    "montmartre.jpg": {
        "source": "chelsea",
        "exif": {"make": "Google", "model": "Pixel 8 Pro", "taken": "2024:06:30 22:30:00",
                 "position": MONTMARTRE},
    },
    "newyear.jpg": {
        "source": "coffee",
        "exif": {"make": "Canon", "model": "Canon EOS R5", "taken": "2023:12:31 23:59:59",
                 "offset": "-05:00", "position": NEW_YORK},
    },
    "sydney.jpg": {
        "source": "rocket",
        "exif": {"make": "NIKON CORPORATION", "model": "NIKON D750",
                 "taken": "2024:07:01 00:00:00", "offset": "+10:00", "position": SYDNEY},
    },
    "tokyo.jpg": {  # XMP only, as some editors write it
        "source": "retina",
        "xmp": {"xmp:CreateDate": "2024-05-05T12:00:00+09:00", "tiff:Make": "Apple",
                "tiff:Model": "iPhone 13", "exif:GPSLatitude": "35,39.5N",
                "exif:GPSLongitude": "139,41.9E"},
    },
    "fiji.heic": {
        "source": "hubble_deep_field",
        "format": "HEIF",
        "exif": {"make": "samsung", "model": "SM-S918B", "taken": "2022:08:15 18:45:00",
                 "offset": "+12:00", "position": FIJI},
    },
    "slide.jpg": {"source": "immunohistochemistry"},  # no metadata at all
}  # fmt: skip

BY_DATE = [
    "fiji.heic",
    "newyear.jpg",
    "eiffel.jpg",
    "tokyo.jpg",
    "montmartre.jpg",
    "sydney.jpg",
]


def write_photos(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, spec in PHOTOS.items():
        exif = exif_block(**spec["exif"]) if "exif" in spec else None
        xmp = xmp_packet(attributes=spec["xmp"]) if "xmp" in spec else None
        data = photo_file(spec["source"], exif=exif, xmp=xmp, format=spec.get("format", "JPEG"))
        (folder / name).write_bytes(data)


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Collection]:
    """The photos above indexed with the toy encoder, exactly (every image is a candidate)."""
    pytest.importorskip("pillow_heif")
    root = tmp_path_factory.mktemp("filters")
    write_photos(root / "photos")
    collection = Collection(root / "collection", model=toy_encoder.NAME, index_spec="exact")
    report = collection.index(root / "photos", workers=0)
    assert (report.added, report.failed) == (len(PHOTOS), [])
    yield collection
    collection.close()


def names(results: Any) -> list[str]:
    return [Path(result.path).name for result in results]


def query_of(collection: Collection) -> str:
    return next(p for p in collection.catalog.paths() if p.endswith("slide.jpg"))


# -- the semantics, on records ------------------------------------------------------------------


def record(**metadata: Any) -> ImageRecord:
    return ImageRecord("p.jpg", "h", 1, 0.0, 640, 480, metadata)


@pytest.mark.parametrize(
    ("expression", "metadata", "expected"),
    [
        # Dates: a partial date is its whole span.
        ("taken>=2024-01-01", {"taken": "2024-01-01T00:00:00"}, True),
        ("taken>=2024-01-01", {"taken": "2023-12-31T23:59:59.999"}, False),
        ("taken<2024-07-01", {"taken": "2024-06-30T23:59:59"}, True),
        ("taken<2024-07-01", {"taken": "2024-07-01T00:00:00+02:00"}, False),
        ("taken<=2024-06-30", {"taken": "2024-06-30T22:30:00"}, True),
        ("taken<=2024-06-30", {"taken": "2024-07-01T00:00:00"}, False),
        ("taken>2024-06-30", {"taken": "2024-06-30T23:00:00"}, False),
        ("taken>2024-06-30", {"taken": "2024-07-01T00:00:00"}, True),
        ("taken=2024-05", {"taken": "2024-05-31T23:59:59-07:00"}, True),
        ("taken=2024", {"taken": "2025-01-01T00:00:00"}, False),
        ("taken!=2024", {"taken": "2025-01-01T00:00:00"}, True),
        ("taken=2024-05-01T10:20", {"taken": "2024-05-01T10:20:59"}, True),
        # Wall-clock time unless the bound has an offset: then instants.
        ("taken<2024-07-01T00:00Z", {"taken": "2024-07-01T01:00:00+02:00"}, True),
        ("taken<2024-07-01T00:00Z", {"taken": "2024-07-01T00:30:00"}, False),
        ("taken>=2024-05-01T08:00+00:00", {"taken": "2024-05-01T10:00:00+02:00"}, True),
        # A date stored the EXIF way (a CSV may hold it) is still a date.
        ("taken>=2024-01-01", {"taken": "2024:03:10 09:00:00"}, True),
        # Numbers numerically, text as text.
        ("iso>=400", {"iso": 1600}, True),
        ("iso>=400", {"iso": "80"}, False),
        ("iso=100", {"iso": 100.0}, True),
        ("lat<0", {"lat": -33.85}, True),
        ("label=cat", {"label": "cat"}, True),
        ("label=Cat", {"label": "cat"}, False),
        ("label>=m", {"label": "cat"}, False),
        ("label!=cat", {"label": "dog"}, True),
        ("label=None", {"label": "None"}, True),
        ("label=", {"label": ""}, True),
        # ~= is a case-insensitive substring, of anything.
        ("camera~=pixel", {"camera": "Google Pixel 7"}, True),
        ("camera~=PIXEL 7", {"camera": "Google Pixel 7"}, True),
        ("camera~=canon", {"camera": "Google Pixel 7"}, False),
        ("lat~=48.8", {"lat": 48.8584}, True),
        # A missing key never matches, != included.
        ("label!=cat", {}, False),
        ("taken<2030", {}, False),
        # Width and height fall back to the stored pixel size.
        ("width>=640", {}, True),
        ("height>480", {}, False),
        ("width<100", {"width": 64}, True),
        # Spaces around the operator; "=" inside a value.
        ("  label = a=b ", {"label": "a=b"}, True),
    ],
)
def test_a_condition(expression: str, metadata: dict[str, Any], expected: bool) -> None:
    assert matches(record(**metadata), [expression]) is expected


def test_the_mapping_form_is_each_key_equal_to_its_value() -> None:
    assert matches(record(label="cat", year="2024"), {"label": "cat", "year": 2024})
    assert not matches(record(label="cat"), {"label": "cat", "year": 2024})
    assert not matches(record(label="None"), {"label": "cat"})


def test_all_conditions_and_areas_must_hold() -> None:
    paris = record(lat=PARIS[0], lon=PARIS[1], camera="Google Pixel 7")
    near = f"{PARIS[0]},{PARIS[1]},1"
    assert make_filter(["camera~=pixel"], near=near).matches(paris)
    assert not make_filter(["camera~=canon"], near=near).matches(paris)
    assert not make_filter(["camera~=pixel"], near="0,0,1").matches(paris)
    assert make_filter(within="48,2,49,3", near=near).matches(paris)
    assert not make_filter(within="48,2,48.5,3").matches(paris)
    assert not make_filter(near=near).matches(record(camera="x"))  # no position: no match
    # Positions a CSV gave as text count too.
    assert make_filter(near=near).matches(record(lat="48.8584", lon="2.2945"))


def test_distances_and_the_antimeridian() -> None:
    assert distance_km(*PARIS, *MONTMARTRE) == pytest.approx(4.75, abs=0.01)
    assert distance_km(*PARIS, *NEW_YORK) == pytest.approx(5837, rel=0.01)
    assert distance_km(0, 179.9, 0, -179.9) == pytest.approx(22.2, abs=0.1)
    across = make_filter(within="-20,170,-10,-170")
    assert across.matches(record(lat=FIJI[0], lon=FIJI[1]))
    assert across.matches(record(lat=-15, lon=-175))
    assert not across.matches(record(lat=-15, lon=160))
    assert make_filter(near="0,179.9,30").matches(record(lat=0, lon=-179.9))


@pytest.mark.parametrize(
    ("where", "near", "within", "message"),
    [
        (["oops"], None, None, "KEY=VALUE"),
        (["=cat"], None, None, "no key"),
        (["taken>"], None, None, "needs a value"),
        ([">=5"], None, None, "no key"),
        ([42], None, None, "KEY OP VALUE"),
        ([], "48.8,2.3", None, "LAT,LON,KM"),
        ([], "north,2.3,5", None, "LAT,LON,KM"),
        ([], "91,2.3,5", None, "latitude must be between -90 and 90"),
        ([], "48,181,5", None, "longitude must be between -180 and 180"),
        ([], "48,2,0", None, "radius must be a positive"),
        ([], "48,2,nan", None, "radius must be a positive"),
        ([], None, "10,0,0,5", r"south \(10.0\) is north of north \(0.0\)"),
        ([], None, "1,2,3", "SOUTH,WEST,NORTH,EAST"),
    ],
)
def test_bad_filters_are_request_errors_that_say_why(
    where: list[Any], near: str | None, within: str | None, message: str
) -> None:
    with pytest.raises(RequestError, match=message):
        SearchOptions(where=where, near=near, within=within)


@pytest.mark.parametrize(
    ("text", "message"),
    [("-score", "best first by score"), ("a b", "metadata key"), ("-", "metadata key")],
)
def test_bad_sort_keys_are_request_errors(text: str, message: str) -> None:
    with pytest.raises(RequestError, match=message):
        SearchOptions(sort=text)


def test_parsing_keeps_what_was_typed() -> None:
    assert parse_condition("taken >= 2024-01-01") == Condition("taken", ">=", "2024-01-01")
    assert parse_condition("a!=b") == Condition("a", "!=", "b")
    assert parse_condition("a~=b<c") == Condition("a", "~=", "b<c")
    assert str(parse_sort("-taken")) == "-taken"
    assert parse_sort("score") is None and parse_sort("") is None


def test_sorting_puts_missing_values_last_and_keeps_ties_in_order() -> None:
    items = [
        record(n=1, taken="2024-05-01T10:00:00+09:00"),
        record(n=2),
        record(n=3, taken="2024-05-01T09:00:00"),
        record(n=4, taken="2023-01-01"),
        record(n=5, taken="2024-05-01T09:00:00-05:00"),
    ]
    order = [item.metadata["n"] for item in sort_items(items, parse_sort("taken"))]
    assert order == [4, 3, 5, 1, 2]  # by wall-clock time; 3 and 5 tie and keep their order
    order = [item.metadata["n"] for item in sort_items(items, parse_sort("-taken"))]
    assert order == [1, 3, 5, 4, 2]
    numbers = [record(iso=v) for v in (800, "100", 3200, None)]
    assert [r.metadata["iso"] for r in sort_items(numbers, parse_sort("iso"))] == [
        "100",
        800,
        3200,
        None,
    ]


# -- the library --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"where": ["taken>=2024-01-01", "taken<2024-07-01"]},
         {"eiffel.jpg", "montmartre.jpg", "tokyo.jpg"}),
        ({"where": ["camera~=pixel"]}, {"eiffel.jpg", "montmartre.jpg"}),
        ({"where": "camera~=iphone"}, {"tokyo.jpg"}),
        ({"where": ["make!=Canon"]},
         {"eiffel.jpg", "montmartre.jpg", "sydney.jpg", "tokyo.jpg", "fiji.heic"}),
        ({"where": {"make": "Canon"}}, {"newyear.jpg"}),  # the old mapping form
        ({"where": ["taken=2024"]},
         {"eiffel.jpg", "montmartre.jpg", "tokyo.jpg", "sydney.jpg"}),
        ({"where": ["taken<2024-07-01T00:00Z"]},
         {"eiffel.jpg", "montmartre.jpg", "tokyo.jpg", "sydney.jpg", "newyear.jpg", "fiji.heic"}),
        ({"where": ["taken<2024-07-01"]},
         {"eiffel.jpg", "montmartre.jpg", "tokyo.jpg", "newyear.jpg", "fiji.heic"}),
        ({"near": f"{PARIS[0]},{PARIS[1]},10"}, {"eiffel.jpg", "montmartre.jpg"}),
        ({"near": (*PARIS, 1)}, {"eiffel.jpg"}),
        ({"within": "-40,150,-30,155"}, {"sydney.jpg"}),
        ({"within": "-20,170,-10,-170"}, {"fiji.heic"}),
        ({"where": ["lat<0"], "near": (*SYDNEY, 100)}, {"sydney.jpg"}),
        ({"where": ["width>=1000"]}, set()),
        ({"where": ["width<=160", "height=120"]}, set(PHOTOS)),
        ({"where": ["lens~=x"]}, set()),
    ],
)  # fmt: skip
def test_library_search_filters(
    library: Collection, options: dict[str, Any], expected: set[str]
) -> None:
    found = library.search(query_of(library), k=10, **options)
    assert set(names(found)) == expected
    scores = [result.score for result in found]
    assert scores == sorted(scores, reverse=True)


def test_library_search_sorts_the_k_best(library: Collection) -> None:
    query = query_of(library)
    assert names(library.search(query, k=10, sort="taken")) == [*BY_DATE, "slide.jpg"]
    assert names(library.search(query, k=10, sort="-taken")) == [*BY_DATE[::-1], "slide.jpg"]
    # The k best by score come first, then their order: never other images.
    best_three = set(names(library.search(query, k=3)))
    sorted_three = names(library.search(query, k=3, sort="taken"))
    assert set(sorted_three) == best_three
    assert sorted_three == [n for n in [*BY_DATE, "slide.jpg"] if n in best_three]
    pixels = library.search(query, k=1, where=["camera~=pixel"], sort="-taken")
    assert len(pixels) == 1
    both = library.search(query, k=2, where=["camera~=pixel"], sort="-taken")
    assert names(both) == ["montmartre.jpg", "eiffel.jpg"]


def test_results_carry_the_fields(library: Collection) -> None:
    (found,) = library.search(query_of(library), k=1, where=["camera~=nikon"])
    assert found.metadata["taken"] == "2024-07-01T00:00:00+10:00"
    assert found.metadata["camera"] == "NIKON D750"
    assert (found.metadata["lat"], found.metadata["lon"]) == pytest.approx(SYDNEY, abs=1e-5)


def test_text_and_vector_searches_filter_too(library: Collection) -> None:
    vector = library.embed(query_of(library))
    found = library.search_vector(vector, k=5, where=["taken>=2024-06"], sort="taken")
    assert names(found) == ["montmartre.jpg", "sydney.jpg"]


# -- widening with approximate indexes ----------------------------------------------------------

MANY = 240
PIXEL_EVERY = 20  # 12 of the 240 images were taken with a Pixel


@pytest.fixture(scope="module")
def crowd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """240 variants of the six photos (crops, brightness); every 20th has a Pixel's EXIF, the
    first three a Leica's, the rest a Canon's."""
    folder = tmp_path_factory.mktemp("crowd") / "photos"
    folder.mkdir()
    sources = ["astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "retina"]
    images = {name: photo(name).resize((96, 72)) for name in sources}
    rng = random.Random(7)
    for i in range(MANY):
        image = images[sources[i % len(sources)]]
        left, top = rng.randrange(0, 24), rng.randrange(0, 18)
        variant = image.crop((left, top, left + 72, top + 54))
        variant = ImageEnhance.Brightness(variant).enhance(rng.uniform(0.6, 1.4))
        if i % PIXEL_EVERY == 0:
            taken = f"2024:01:{1 + i // PIXEL_EVERY:02d} 10:00:00"
            exif = exif_block(make="Google", model="Pixel 7", taken=taken)
        elif i < 3:
            exif = exif_block(make="Leica Camera AG", model="LEICA Q2")
        else:
            exif = exif_block(make="Canon", model="Canon EOS R5", taken="2023:05:05 05:05:05")
        variant.save(folder / f"{i:03d}.jpg", "JPEG", quality=85, exif=exif.tobytes())
    return folder


@pytest.fixture(scope="module", params=["ivf:nlist=16,nprobe=1", "hnsw:M=4,efConstruction=8,ef=4"])
def approximate(
    request: pytest.FixtureRequest, crowd: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Collection, Collection]]:
    """The crowd indexed twice: with an approximate index, and exactly."""
    root = tmp_path_factory.mktemp("approximate")
    made = []
    for spec in (request.param, "exact"):
        collection = Collection(root / spec.split(":")[0], model=toy_encoder.NAME, index_spec=spec)
        assert collection.index(crowd, workers=0).added == MANY
        made.append(collection)
    yield made[0], made[1]
    for collection in made:
        collection.close()


def test_a_selective_filter_still_yields_k_results_with_an_approximate_index(
    approximate: tuple[Collection, Collection], crowd: Path
) -> None:
    fuzzy, exact = approximate
    query = str(crowd / "001.jpg")  # a Canon photo: the Pixel ones are not its neighbours
    # The first candidates hold fewer than k Pixel photos: only widening finds 10.
    first = fuzzy.search(query, k=100)
    assert sum(r.metadata.get("model") == "Pixel 7" for r in first) < 10
    found = fuzzy.search(query, k=10, where=["camera~=pixel"])
    assert len(found) == 10
    assert all(r.metadata["camera"] == "Google Pixel 7" for r in found)
    truth = exact.search(query, k=10, where=["camera~=pixel"])
    assert names(found) == names(truth)
    assert [r.score for r in found] == pytest.approx([r.score for r in truth], abs=1e-4)


def test_fewer_matches_than_k_gives_every_match(
    approximate: tuple[Collection, Collection], crowd: Path
) -> None:
    fuzzy, _ = approximate
    query = str(crowd / "100.jpg")
    found = fuzzy.search(query, k=10, where=["camera~=leica"])
    assert sorted(names(found)) == ["001.jpg", "002.jpg"]  # 000.jpg is a Pixel's
    dated = fuzzy.search(query, k=30, where=["taken>=2024-01-05", "taken<2024-01-08"])
    assert sorted(names(dated)) == ["080.jpg", "100.jpg", "120.jpg"]
    assert fuzzy.search(query, k=10, near="10,10,5").results == []


# -- the command line ---------------------------------------------------------------------------


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_search_filters_and_sorts(
    library: Collection, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ("-c", str(library.path), "search", query_of(library), "-k", "10", "--json")
    code, out, _ = cli(
        capsys, *base, "--where", "taken>=2024-01-01", "--where", "taken<2024-07-01",
        "--where", "camera~=pixel", "--sort", "taken",
    )  # fmt: skip
    assert code == 0
    results = json.loads(out)["results"]
    assert [Path(r["path"]).name for r in results] == ["eiffel.jpg", "montmartre.jpg"]
    assert results[0]["metadata"]["camera"] == "Google Pixel 7"
    # A southern latitude and a descending sort start with "-": they are values, not options.
    code, out, _ = cli(capsys, *base, "--near", f"{SYDNEY[0]},{SYDNEY[1]},50")
    assert [Path(r["path"]).name for r in json.loads(out)["results"]] == ["sydney.jpg"]
    code, out, _ = cli(capsys, *base, "--within", "-20,170,-10,-170", "--sort", "-taken")
    assert [Path(r["path"]).name for r in json.loads(out)["results"]] == ["fiji.heic"]
    code, out, _ = cli(capsys, *base, "--sort", "-taken", "--where", "make=Google")
    assert [Path(r["path"]).name for r in json.loads(out)["results"]] == [
        "montmartre.jpg",
        "eiffel.jpg",
    ]


def test_cli_shows_the_fields_and_refuses_bad_filters(
    library: Collection, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ("-c", str(library.path), "search", query_of(library), "-k", "1")
    code, out, _ = cli(capsys, *base, "--where", "camera~=iphone")
    assert code == 0 and "tokyo.jpg" in out and "camera=Apple iPhone 13" in out
    code, out, err = cli(capsys, *base, "--where", "taken>")
    assert code == 1 and out == "" and "taken> needs a value" in err
    code, _, err = cli(capsys, *base, "--near", "91,0,5")
    assert code == 1 and "latitude must be between -90 and 90" in err
    code, _, err = cli(capsys, *base, "--sort=-score")
    assert code == 1 and "best first by score" in err


# -- REST, over a real HTTP server --------------------------------------------------------------


@pytest.fixture(scope="module")
def http(library: Collection) -> Iterator[httpx.Client]:
    with (
        LiveServer(create_app(SearchService(library))) as server,
        httpx.Client(base_url=server.url, timeout=60) as client,
    ):
        yield client


def rest_search(client: httpx.Client, data: dict[str, Any]) -> httpx.Response:
    upload = photo_file("immunohistochemistry")  # the same photo as slide.jpg
    return client.post("/search", files={"image": ("q.jpg", upload, "image/jpeg")}, data=data)


def test_rest_search_filters_sorts_and_carries_the_fields(http: httpx.Client) -> None:
    reply = rest_search(
        http,
        {"k": "10", "where": ["taken>=2024-01-01", "taken<2024-07-01", "camera~=pixel"],
         "sort": "-taken"},
    )  # fmt: skip
    assert reply.status_code == 200, reply.text
    results = reply.json()["results"]
    assert [r["filename"] for r in results] == ["montmartre.jpg", "eiffel.jpg"]
    fields = results[1]["metadata"]
    assert fields["taken"] == "2024-03-10T09:00:00+01:00" and fields["camera"] == "Google Pixel 7"
    assert (fields["lat"], fields["lon"]) == pytest.approx(PARIS, abs=1e-5)
    assert (results[1]["width"], results[1]["height"]) == (160, 120)

    near = rest_search(http, {"k": "10", "near": f"{PARIS[0]},{PARIS[1]},10", "sort": "taken"})
    assert [r["filename"] for r in near.json()["results"]] == ["eiffel.jpg", "montmartre.jpg"]
    box = rest_search(http, {"k": "10", "within": "-40,150,-30,155", "near": "", "sort": ""})
    assert [r["filename"] for r in box.json()["results"]] == ["sydney.jpg"]


def test_rest_a_sorted_search_is_one_page(http: httpx.Client) -> None:
    # Pages of a sorted list would each re-sort a longer one: the server says to ask for more.
    reply = rest_search(http, {"k": "2", "offset": "2", "sort": "taken"})
    assert reply.status_code == 400 and "larger k" in reply.json()["detail"]


def test_rest_similar_filters_and_sorts(http: httpx.Client, library: Collection) -> None:
    slide = library.catalog.ids_for_paths([query_of(library)])[query_of(library)]
    reply = http.get(
        f"/images/{slide}/similar",
        params={"k": 10, "where": ["make=Google", "taken<2024-06"], "sort": "taken"},
    )
    assert reply.status_code == 200, reply.text
    assert [r["filename"] for r in reply.json()["results"]] == ["eiffel.jpg"]
    reply = http.get(f"/images/{slide}/similar", params={"k": 3, "within": "-20,170,-10,-170"})
    assert [r["filename"] for r in reply.json()["results"]] == ["fiji.heic"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"where": "=2024"}, "no key"),
        ({"where": "no-operator"}, "KEY=VALUE"),
        ({"near": "48,2"}, "LAT,LON,KM"),
        ({"within": "10,0,0,5"}, "south"),
        ({"sort": "-score"}, "best first"),
    ],
)
def test_rest_bad_filters_are_400_with_the_reason(
    http: httpx.Client, library: Collection, fields: dict[str, str], message: str
) -> None:
    reply = rest_search(http, {"k": "3", **fields})
    assert reply.status_code == 400, reply.text
    assert message in reply.json()["detail"]
    slide = library.catalog.ids_for_paths([query_of(library)])[query_of(library)]
    similar = http.get(f"/images/{slide}/similar", params=fields)
    assert similar.status_code == 400 and message in similar.json()["detail"]


def test_openapi_documents_the_filter_fields(http: httpx.Client) -> None:
    schema = http.get("/openapi.json").json()
    similar = schema["paths"]["/images/{image_id}/similar"]["get"]["parameters"]
    documented = {p["name"]: p.get("description", "") for p in similar}
    for name in ("where", "near", "within", "sort"):
        assert documented[name], name
    form = schema["paths"]["/search"]["post"]["requestBody"]["content"]["multipart/form-data"]
    ref = form["schema"]["$ref"].rsplit("/", 1)[-1]
    properties = schema["components"]["schemas"][ref]["properties"]
    assert "~=" in properties["where"]["description"]
    assert "LAT,LON,KM" in properties["near"]["description"]
    assert "S,W,N,E" in properties["within"]["description"]
    assert "-taken" in properties["sort"]["description"]


# -- gRPC, with a real client -------------------------------------------------------------------


@pytest.fixture(scope="module")
def rpc(library: Collection) -> Iterator[Served]:
    served = Served(SearchService(library))
    yield served
    served.close()


def rpc_names(reply: v1.SearchReply) -> list[str]:
    return [match.path for match in reply.matches]


def test_grpc_search_filters_and_sorts(rpc: Served) -> None:
    upload = photo_file("immunohistochemistry")
    reply = rpc.v1.Search(
        v1.SearchRequest(
            image=upload,
            k=10,
            filters=["taken>=2024-01-01", "taken<2024-07-01"],
            where={"make": "Google"},
            sort="-taken",
        ),
        timeout=60,
    )
    assert rpc_names(reply) == ["montmartre.jpg", "eiffel.jpg"]
    assert reply.matches[1].metadata["taken"] == "2024-03-10T09:00:00+01:00"
    assert reply.matches[1].metadata["camera"] == "Google Pixel 7"
    near = rpc.v1.Search(
        v1.SearchRequest(image=upload, k=10, near=v1.Near(lat=PARIS[0], lon=PARIS[1], km=1)),
        timeout=60,
    )
    assert rpc_names(near) == ["eiffel.jpg"]
    box = rpc.v1.Search(
        v1.SearchRequest(
            image=upload, k=10, within=v1.Within(south=-20, west=170, north=-10, east=-170)
        ),
        timeout=60,
    )
    assert rpc_names(box) == ["fiji.heic"]
    everything = rpc.v1.Search(v1.SearchRequest(image=upload, k=10, sort="taken"), timeout=60)
    assert rpc_names(everything) == [*BY_DATE, "slide.jpg"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"filters": ["taken>"]}, "needs a value"),
        ({"near": v1.Near(lat=95, lon=0, km=1)}, "latitude"),
        ({"near": v1.Near(lat=0, lon=0, km=0)}, "radius"),
        ({"within": v1.Within(south=10, west=0, north=0, east=5)}, "south"),
        ({"sort": "a b"}, "metadata key"),
    ],
)
def test_grpc_bad_filters_are_invalid_argument(
    rpc: Served, fields: dict[str, Any], message: str
) -> None:
    request = v1.SearchRequest(image=photo_file("coffee"), k=3, **fields)
    with pytest.raises(grpc.RpcError) as caught:
        rpc.v1.Search(request, timeout=60)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()


def test_odd_stored_numbers_never_raise() -> None:
    """Stored text that only looks like a number (odd whitespace, beyond float range) is not
    one: it fails numeric conditions and positions instead of raising."""
    assert not make_filter(["iso>=1"]).matches(record(iso="\x1c5x"))
    assert make_filter(["iso>=1"]).matches(record(iso="\x1c5"))  # stripped like any space
    assert not make_filter(["iso<=3"]).matches(record(iso="\x1c5"))  # compared as 5
    make_filter(["iso>=1"]).matches(record(iso="1e400"))  # compared as text, never raising
    assert not make_filter(near="1,2,10").matches(record(lat="1e400", lon="2"))
    assert not make_filter(within="0,0,5,5").matches(record(lat="1", lon="-1e999"))
