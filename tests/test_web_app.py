"""The web app, driven in headless Chromium (Debian's /usr/bin/chromium through Playwright)
against real servers over loopback, and the REST endpoints it uses, over real HTTP.

Every view (search, browse, duplicates, add images) is checked by what a user does with it,
with the keyboard alone, and at desktop (1280x900) and phone (375x812) width, where a
screenshot test fails on an empty or broken layout: too few visible cards, thumbnails that
did not load, anything wider than the screen, page errors, or a screenshot without image
content where the grid is.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import toy_encoder
from conftest import PHOTO_NAMES, photo
from PIL import Image
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from test_rest import TOKEN, LiveServer, jpeg

from lookalike.core.collection import Collection
from lookalike.encoders import register_encoder
from lookalike.encoders.base import EncoderCapabilities, EncoderIdentity
from lookalike.server.rest import create_app
from lookalike.server.service import SearchService

DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 375, "height": 812}
CAMERAS = ("Pixel 7", "Canon EOS R5", "iPhone 15")
# Crop windows (left, top) of 60% of each photo: distinct images that still look alike.
CROPS = ((0, 0), (0.4, 0), (0, 0.4), (0.4, 0.4), (0.2, 0.2))
TEXT_MODEL = "toy-colour-text"
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220)}


class ToyTextEncoder(toy_encoder.ToyColourEncoder):
    """The toy colour encoder with a text tower of colour words: a text embeds as a plain
    image of the colours it names, so "blue" finds blue images."""

    def __init__(self, *, normalize: bool = True) -> None:
        super().__init__(normalize=normalize)
        self.identity = EncoderIdentity(
            model=TEXT_MODEL,
            layer="thumb4+hist4",
            dim=toy_encoder.DIM,
            weights_sha256=toy_encoder.WEIGHTS_SHA256,
            preprocess=toy_encoder.PREPROCESS,
        )

    @property
    def capabilities(self) -> EncoderCapabilities:
        return EncoderCapabilities(text=True)

    def encode_text(self, texts: Any) -> np.ndarray:
        pixels = np.zeros((len(texts), toy_encoder.RESOLUTION, toy_encoder.RESOLUTION, 3), np.uint8)
        for row, text in enumerate(texts):
            named = [rgb for word, rgb in COLOURS.items() if word in text.lower()] or [(128,) * 3]
            pixels[row] = np.mean(named, axis=0).astype(np.uint8)
        return self.embed_pixels(pixels)


@register_encoder(TEXT_MODEL)
def _create_text_encoder(
    *,
    normalize: bool = True,
    runtime: str = "auto",
    device: str = "auto",
    threads: int | None = None,
) -> ToyTextEncoder:
    del runtime, device, threads
    return ToyTextEncoder(normalize=normalize)


# -- collections and servers -------------------------------------------------------------------


def build_photos(folder: Path) -> list[dict[str, str]]:
    """Real photos and crops of them (36 files), with a metadata CSV row for each: a date
    taken, a camera and a title, as EXIF fields and CSV columns arrive in ``metadata``."""
    folder.mkdir(parents=True)
    rows = []
    number = 0
    for name in PHOTO_NAMES:
        image = photo(name)
        if max(image.size) > 800:
            image = image.resize((640, 640))
        width, height = image.size
        versions = [(f"{name}.jpg", image)]
        for i, (x, y) in enumerate(CROPS):
            box = (int(x * width), int(y * height), int((x + 0.6) * width), int((y + 0.6) * height))
            versions.append((f"{name}-{i}.jpg", image.crop(box)))
        for file_name, version in versions:
            version.save(folder / file_name, quality=88)
            month, day, hour = 1 + number % 12, 1 + (number * 7) % 28, number % 10
            rows.append(
                {
                    "file": file_name,
                    "taken": f"{2021 + number % 4}-{month:02d}-{day:02d}T{8 + hour:02d}:15:00",
                    "camera": CAMERAS[number % 3],
                    "title": f"{name} {number}",
                }
            )
            number += 1
    return rows


def write_csv(path: Path, rows: list[dict[str, str]]) -> None:
    lines = ["file,taken,camera,title", *(",".join(r.values()) for r in rows)]
    path.write_text("\n".join(lines) + "\n")


@dataclass
class Served:
    url: str
    rows: list[dict[str, str]]
    photos: Path
    moved_to: Path | None
    collection: Collection


@pytest.fixture(scope="module")
def app_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A toy-encoder collection of 36 photos behind a server with a token (no moving)."""
    root = tmp_path_factory.mktemp("webapp")
    rows = build_photos(root / "photos")
    write_csv(root / "meta.csv", rows)
    collection = Collection(root / "collection", model=toy_encoder.NAME)
    collection.index(root / "photos", workers=0, metadata_csv=root / "meta.csv")
    with LiveServer(create_app(SearchService(collection, token=TOKEN))) as server:
        yield Served(server.url, rows, root / "photos", None, collection)
    collection.close()


@pytest.fixture
def dup_server(tmp_path: Path) -> Iterator[Served]:
    """A small collection with an exact copy and a smaller copy, served with a token and a
    folder to move duplicates to (a fresh one per test: moving changes it)."""
    photos = tmp_path / "photos"
    (photos / "trip").mkdir(parents=True)
    for name in ("astronaut", "coffee", "rocket", "chelsea"):
        photo(name).save(photos / f"{name}.jpg", quality=90)
    shutil.copy(photos / "coffee.jpg", photos / "trip" / "coffee-copy.jpg")
    photo("rocket").resize((320, 213)).save(photos / "trip" / "rocket-small.jpg", quality=90)
    rows = [
        {"file": "coffee.jpg", "taken": "2023-05-01T09:00:00", "camera": "Pixel 7", "title": "c"}
    ]
    write_csv(tmp_path / "meta.csv", rows)
    collection = Collection(tmp_path / "collection", model=toy_encoder.NAME)
    collection.index(photos, workers=0, metadata_csv=tmp_path / "meta.csv")
    moved_to = tmp_path / "moved"
    service = SearchService(collection, token=TOKEN, duplicates_to=moved_to)
    with LiveServer(create_app(service)) as server:
        yield Served(server.url, rows, photos, moved_to, collection)
    collection.close()


@pytest.fixture(scope="module")
def text_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A collection whose encoder embeds text, with plain colour images among the photos;
    writes are open (no token)."""
    root = tmp_path_factory.mktemp("webtext")
    photos = root / "photos"
    photos.mkdir()
    for name in PHOTO_NAMES[:4]:
        photo(name).save(photos / f"{name}.jpg", quality=90)
    rng = np.random.default_rng(1)
    for word, rgb in COLOURS.items():
        noise = rng.integers(-20, 20, (96, 128, 3))
        pixels = np.clip(np.array(rgb)[None, None, :] + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(photos / f"{word}.jpg", quality=90)
    collection = Collection(root / "collection", model=TEXT_MODEL)
    collection.index(photos, workers=0)
    with LiveServer(create_app(SearchService(collection))) as server:
        yield Served(server.url, [], photos, None, collection)
    collection.close()


class Page:
    """A browser page that records page errors and console errors."""

    def __init__(self, browser, viewport: dict[str, int], *, console: bool = True) -> None:
        self.context = browser.new_context(viewport=viewport)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda error: self.errors.append(f"page error: {error}"))
        if console:
            self.page.on(
                "console",
                lambda message: (
                    message.type == "error" and self.errors.append(f"console: {message.text}")
                ),
            )

    def open(self, url: str, view: str = "search"):
        self.page.goto(f"{url}/#{view}")
        self.page.wait_for_function(
            "document.getElementById('stats').textContent.includes('images')"
        )
        return self.page

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def desktop(browser) -> Iterator[Page]:
    page = Page(browser, DESKTOP)
    yield page
    page.close()


@pytest.fixture
def phone(browser) -> Iterator[Page]:
    page = Page(browser, PHONE)
    yield page
    page.close()


# -- layout checks -----------------------------------------------------------------------------

LAYOUT = """
([selector, min]) => {
  const vw = window.innerWidth, vh = window.innerHeight;
  const cards = [...document.querySelectorAll(selector)].filter((c) => {
    const r = c.getBoundingClientRect();
    return r.width > 20 && r.height > 20 && r.bottom > 0 && r.top < vh
      && r.left >= 0 && r.right <= vw + 1;
  });
  const images = cards.map((c) => c.querySelector("img")).filter(Boolean);
  const wide = [...document.querySelectorAll("body *")].filter((e) => {
    const r = e.getBoundingClientRect();
    const style = getComputedStyle(e);
    return r.width > 0 && style.visibility !== "hidden" && r.right > vw + 1 && r.left > -1000;
  }).map((e) => e.tagName + (e.id ? "#" + e.id : "") + "." + e.className);
  const grid = cards.length ? cards.map((c) => c.getBoundingClientRect()) : [];
  const box = grid.length ? {
    left: Math.max(0, Math.min(...grid.map((r) => r.left))),
    top: Math.max(0, Math.min(...grid.map((r) => r.top))),
    right: Math.min(vw, Math.max(...grid.map((r) => r.right))),
    bottom: Math.min(vh, Math.max(...grid.map((r) => r.bottom))),
  } : null;
  return {
    visible: cards.length,
    loaded: images.filter((i) => i.complete && i.naturalWidth > 0).length,
    images: images.length,
    columns: new Set(cards.map((c) => Math.round(c.getBoundingClientRect().left))).size,
    scrollWidth: document.scrollingElement.scrollWidth,
    innerWidth: vw,
    wide,
    box,
  };
}
"""


def screenshot(page, name: str, tmp_path: Path) -> Path:
    """Save a screenshot under tmp_path, or $LOOKALIKE_SCREENSHOTS when set."""
    folder = Path(os.environ.get("LOOKALIKE_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    page.screenshot(path=str(path))
    return path


def check_layout(
    page: Page, selector: str, minimum: int, name: str, tmp_path: Path
) -> dict[str, Any]:
    """Screenshot the page and fail on an empty or broken layout."""
    p = page.page
    p.locator(selector).first.evaluate("e => e.scrollIntoView({block: 'start'})")
    # Settled: enough cards on screen and every thumbnail among them loaded (a later page
    # may still be arriving); else the last state is what the assertions below judge.
    settled = f"(arg) => {{ const l = ({LAYOUT})(arg); "
    settled += "return l.visible >= arg[1] && l.loaded === l.images ? l : false; }"
    try:
        layout = p.wait_for_function(settled, arg=[selector, minimum], timeout=20_000).json_value()
    except PlaywrightTimeout:
        layout = p.evaluate(LAYOUT, [selector, minimum])
    path = screenshot(p, name, tmp_path)
    assert layout["visible"] >= minimum, layout
    assert layout["loaded"] == layout["images"] >= minimum, layout
    assert layout["scrollWidth"] <= layout["innerWidth"], layout
    assert layout["wide"] == [], layout
    shot = Image.open(path).convert("RGB")
    assert shot.size == (layout["innerWidth"], p.viewport_size["height"])
    pixels = np.asarray(shot, dtype=np.float32)
    assert pixels.std() > 10, "the screenshot is one flat colour"
    box = layout["box"]
    region = pixels[int(box["top"]) : int(box["bottom"]), int(box["left"]) : int(box["right"])]
    assert region.size and region.std() > 20, "the grid region shows no images"
    assert page.errors == []
    return layout


# -- the API the page uses ---------------------------------------------------------------------


def test_browse_pages_filters_and_sorts(app_server: Served) -> None:
    with httpx.Client(base_url=app_server.url, timeout=60) as client:
        first = client.get("/images", params={"limit": 20}).json()
        assert first["total"] == len(app_server.rows) == 36
        assert len(first["items"]) == 20 and first["next_offset"] == 20
        second = client.get("/images", params={"limit": 20, "offset": 20}).json()
        assert len(second["items"]) == 16 and second["next_offset"] is None
        ids = [i["id"] for i in first["items"] + second["items"]]
        assert len(set(ids)) == 36
        item = first["items"][0]
        assert item["metadata"]["camera"] in CAMERAS and "path" not in item
        assert client.get(item["thumbnail_url"]).headers["content-type"] == "image/jpeg"

        pixel = client.get("/images", params={"where": "camera=Pixel 7", "limit": 50}).json()
        assert pixel["total"] == 12
        assert {i["metadata"]["camera"] for i in pixel["items"]} == {"Pixel 7"}

        newest = client.get("/images", params={"sort": "-taken", "limit": 50}).json()["items"]
        taken = [i["metadata"]["taken"] for i in newest]
        assert taken == sorted(taken, reverse=True)
        oldest = client.get("/images", params={"sort": "taken", "limit": 50}).json()["items"]
        assert [i["id"] for i in oldest] == [i["id"] for i in reversed(newest)]

        for params in ({"limit": 0}, {"limit": 201}, {"offset": -1}):
            reply = client.get("/images", params=params)
            assert 400 <= reply.status_code < 500, reply.text


def test_date_ranges_filter_browse_and_search(app_server: Served) -> None:
    """Contract C's comparisons (dates as dates) through browse and search alike."""
    within = [r for r in app_server.rows if "2022-01-01" <= r["taken"] < "2023-01-01"]
    assert 0 < len(within) < len(app_server.rows)
    where = ["taken>=2022-01-01", "taken<2023-01-01"]
    with httpx.Client(base_url=app_server.url, timeout=60) as client:
        browsed = client.get("/images", params={"where": where, "limit": 50}).json()
        assert browsed["total"] == len(within)
        assert {i["filename"] for i in browsed["items"]} == {r["file"] for r in within}
        query = jpeg(photo("coffee"))
        found = client.post(
            "/search",
            files={"image": ("q.jpg", query, "image/jpeg")},
            data={"where": where, "k": "50"},
        ).json()["results"]
        assert {r["filename"] for r in found} == {r["file"] for r in within}


def test_search_and_similar_page_by_offset(app_server: Served) -> None:
    query = jpeg(photo("rocket"))
    with httpx.Client(base_url=app_server.url, timeout=60) as client:

        def page(offset: int) -> dict[str, Any]:
            return client.post(
                "/search",
                files={"image": ("q.jpg", query, "image/jpeg")},
                data={"k": "10", "offset": str(offset)},
            ).json()

        whole = client.post(
            "/search", files={"image": ("q.jpg", query, "image/jpeg")}, data={"k": "36"}
        ).json()["results"]
        pages = [page(offset) for offset in (0, 10, 20, 30)]
        assert [p["next_offset"] for p in pages] == [10, 20, 30, None]
        assert [r["id"] for p in pages for r in p["results"]] == [r["id"] for r in whole]
        beyond = page(40)
        assert beyond["results"] == [] and not beyond["no_close_match"]

        first = whole[0]["id"]
        similar = [
            client.get(f"/images/{first}/similar", params={"k": 12, "offset": o}).json()
            for o in (0, 12, 24)
        ]
        ids = [r["id"] for p in similar for r in p["results"]]
        assert ids[0] == first and len(ids) == len(set(ids)) == 36
        # A full page cannot know whether more follow: the next one, empty, says so.
        assert similar[2]["next_offset"] == 36
        end = client.get(f"/images/{first}/similar", params={"k": 12, "offset": 36}).json()
        assert end["results"] == [] and end["next_offset"] is None
        deep = client.get(f"/images/{first}/similar", params={"k": 10, "offset": 995})
        assert deep.status_code == 400 and "offset" in deep.json()["detail"]


@pytest.mark.parametrize(
    ("files", "fields", "words"),
    [
        ({}, {}, "empty"),
        ({}, {"k": "3", "text": ""}, "empty"),
        ({"negative": ("n.jpg", b"", "image/jpeg")}, {}, "negative images only"),
    ],
)
def test_empty_and_negatives_only_queries_are_400(
    app_server: Served, files: dict[str, Any], fields: dict[str, str], words: str
) -> None:
    """Bad requests like any other: 400 with a clear message, never FastAPI's 422."""
    negative = jpeg(photo("coffee"))
    files = {key: (name, negative, kind) for key, (name, _, kind) in files.items()}
    with httpx.Client(base_url=app_server.url, timeout=60) as client:
        reply = client.post("/search", files=files or None, data=fields)
    assert reply.status_code == 400, reply.text
    assert words in reply.json()["detail"]


def test_stats_tell_the_page_what_the_collection_offers(app_server: Served, text_server) -> None:
    stats = httpx.get(f"{app_server.url}/stats", timeout=60).json()
    assert stats["text"] is False and stats["writes_need_token"] is True
    assert stats["can_move_duplicates"] is False
    keys = {k["key"]: k for k in stats["metadata_keys"]}
    assert keys["taken"]["kind"] == "date" and keys["taken"]["count"] == 36
    assert keys["taken"]["min"] == min(r["taken"] for r in app_server.rows)
    assert keys["camera"]["kind"] == "text" and keys["camera"]["values"] == sorted(CAMERAS)
    text = httpx.get(f"{text_server.url}/stats", timeout=60).json()
    assert text["text"] is True and text["writes_need_token"] is False
    reply = httpx.post(f"{text_server.url}/search", data={"text": "blue", "k": "2"}, timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["results"][0]["filename"] == "blue.jpg"


def test_duplicates_are_found_once_per_catalog_state_and_paged(app_server: Served) -> None:
    one_by_one = []
    with httpx.Client(base_url=app_server.url, timeout=120) as client:
        whole = client.get("/duplicates", params={"method": "embedding", "limit": 200}).json()
        assert whole["total"] >= 2 and whole["can_move"] is False
        for offset in range(whole["total"]):
            one = client.get(
                "/duplicates", params={"method": "embedding", "limit": 1, "offset": offset}
            ).json()
            one_by_one.append(one["groups"][0])
        assert one_by_one == whole["groups"]
        group = whole["groups"][0]
        assert group["keeper"]["score"] is None and group["duplicates"][0]["score"] >= 0.9
        assert "camera" in group["keeper"]["metadata"]
        bad = client.get("/duplicates", params={"method": "exact", "threshold": 3})
        assert bad.status_code == 400 and "threshold" in bad.json()["detail"]
        assert client.get("/duplicates", params={"method": "cosine"}).status_code == 422
        refused = client.post(
            "/duplicates/move",
            json={"confirm": True, "method": "embedding", "groups": [{"keeper": 1, "move": [2]}]},
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        assert refused.status_code == 400 and "--duplicates-to" in refused.json()["detail"]


def test_moving_duplicates_needs_token_confirmation_and_a_group(dup_server: Served) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=dup_server.url, timeout=60) as client:
        groups = client.get("/duplicates", params={"method": "embedding"}).json()["groups"]
        by_keeper = {g["keeper"]["filename"]: g for g in groups}
        assert set(by_keeper) == {"coffee.jpg", "rocket.jpg"}, groups
        coffee = by_keeper["coffee.jpg"]
        copy_id = coffee["duplicates"][0]["id"]
        keeper_id = coffee["keeper"]["id"]
        body = {
            "confirm": True,
            "method": "embedding",
            "groups": [{"keeper": copy_id, "move": [keeper_id]}],  # the other keeper
        }
        assert client.post("/duplicates/move", json=body).status_code == 401
        unconfirmed = client.post("/duplicates/move", json={**body, "confirm": False}, headers=auth)
        assert unconfirmed.status_code == 400 and "confirm" in unconfirmed.json()["detail"]
        rocket = by_keeper["rocket.jpg"]["keeper"]["id"]
        strangers = {**body, "groups": [{"keeper": copy_id, "move": [rocket]}]}
        outside = client.post("/duplicates/move", json=strangers, headers=auth)
        assert outside.status_code == 400 and "not in the group" in outside.json()["detail"]
        itself = {**body, "groups": [{"keeper": copy_id, "move": [copy_id]}]}
        assert client.post("/duplicates/move", json=itself, headers=auth).status_code == 400
        files_before = sorted(p.name for p in dup_server.photos.rglob("*.jpg"))

        moved = client.post("/duplicates/move", json=body, headers=auth)
        assert moved.status_code == 200, moved.text
        assert moved.json() == {
            "moved": 1,
            "skipped": 0,
            "results": [{"id": keeper_id, "filename": "coffee.jpg", "status": "moved"}],
        }
        assert (dup_server.moved_to / "coffee.jpg").exists()
        assert not (dup_server.photos / "coffee.jpg").exists()
        assert (dup_server.photos / "trip" / "coffee-copy.jpg").exists()
        every = sorted(
            p.name for p in [*dup_server.photos.rglob("*.jpg"), *dup_server.moved_to.rglob("*")]
        )
        assert every == files_before  # moved, never deleted
        assert client.get(f"/images/{keeper_id}").status_code == 404
        left = client.get("/duplicates", params={"method": "embedding"}).json()
        assert [g["keeper"]["filename"] for g in left["groups"]] == ["rocket.jpg"]
        assert client.get("/stats").json()["images"] == 5

        # A target that exists is never overwritten: that move is skipped and reported.
        small = by_keeper["rocket.jpg"]["duplicates"][0]
        (dup_server.moved_to / "trip").mkdir()
        (dup_server.moved_to / "trip" / small["filename"]).write_bytes(b"someone else's")
        body = {
            "confirm": True,
            "method": "embedding",
            "groups": [{"keeper": rocket, "move": [small["id"]]}],
        }
        skipped = client.post("/duplicates/move", json=body, headers=auth).json()
        assert skipped["moved"] == 0 and skipped["results"][0]["status"] == "target exists"
        assert (dup_server.moved_to / "trip" / small["filename"]).read_bytes() == b"someone else's"
        assert (dup_server.photos / "trip" / small["filename"]).exists()


# -- the page, view by view --------------------------------------------------------------------


def visible_names(page) -> list[str]:
    return page.locator("#results .card .name").all_text_contents()


def test_search_view_scrolls_page_by_page_at_both_widths(
    app_server: Served, desktop: Page, phone: Page, tmp_path: Path
) -> None:
    for device, name in ((desktop, "desktop"), (phone, "phone")):
        page = device.open(app_server.url)
        assert page.locator("#text-row").is_hidden()  # the toy model embeds no text
        page.fill("#k", "8")
        page.set_input_files("#file", str(app_server.photos / "chelsea.jpg"))
        page.wait_for_selector("#results .card")
        assert visible_names(page)[0] == "chelsea.jpg"
        assert page.locator("#results .card").count() == 8
        assert page.locator("#preview").is_visible()
        layout = check_layout(device, "#results .card", 2, f"search-{name}", tmp_path)
        if name == "phone":
            assert layout["columns"] == 1
        else:
            assert layout["columns"] >= 4
        # Scrolling down loads the next pages until every image is listed, none twice.
        for _ in range(10):
            if page.locator("#results .card").count() >= 36:
                break
            page.locator("#sentinel").scroll_into_view_if_needed()
            page.wait_for_timeout(200)
        ids = [c.get_attribute("data-id") for c in page.locator("#results .card").all()]
        assert len(ids) == 36 and len(set(ids)) == 36
        assert page.locator("#sentinel").is_hidden()
        meta = page.locator("#results .card .meta").first.text_content()
        assert any(camera in meta for camera in CAMERAS)


def test_more_like_this_on_every_result_and_details_dialog(
    app_server: Served, desktop: Page, phone: Page, tmp_path: Path
) -> None:
    page = desktop.open(app_server.url)
    page.set_input_files("#file", str(app_server.photos / "coffee.jpg"))
    page.wait_for_selector("#results .card")
    cards = page.locator("#results .card")
    assert cards.count() == page.locator("#results .card button.more").count() > 0
    target = cards.nth(4)
    name = target.locator(".name").text_content()
    with page.expect_response(lambda r: "/similar" in r.url):
        target.locator("button.more").click()
    page.wait_for_function(
        "n => document.querySelector('#results .card .name')?.textContent === n", arg=name
    )
    assert float(page.locator("#results .card .score").first.text_content()) > 0.999
    page.locator("#results .card").first.locator("button.details").click()
    dialog = page.locator("#details")
    assert dialog.is_visible()
    assert dialog.locator("#details-title").text_content() == name
    assert "camera" in dialog.locator("#details-meta").text_content()
    page.keyboard.press("Escape")
    assert dialog.is_hidden()
    assert desktop.errors == []

    # At phone width the dialog fits the screen.
    page = phone.open(app_server.url)
    page.set_input_files("#file", str(app_server.photos / "coffee.jpg"))
    page.locator("#results .card button.details").first.click()
    page.wait_for_function("document.getElementById('details-image').naturalWidth > 0")
    box = page.locator("#details").bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"]
    assert page.evaluate("document.scrollingElement.scrollWidth") <= PHONE["width"]
    screenshot(page, "details-phone", tmp_path)
    assert phone.errors == []


def test_combined_query_with_a_negative_from_the_page(app_server: Served, desktop: Page) -> None:
    page = desktop.open(app_server.url)
    page.set_input_files("#file", str(app_server.photos / "rocket.jpg"))
    page.wait_for_selector("#results .card")
    rocket, coffee = (
        (app_server.photos / name).read_bytes() for name in ("rocket.jpg", "coffee.jpg")
    )

    def expected(**parts: bytes) -> list[str]:
        """The ids the API answers for the same query, best first."""
        files = [
            (kind.rstrip("0123456789"), ("q.jpg", data, "image/jpeg"))
            for kind, data in parts.items()
        ]
        reply = httpx.post(f"{app_server.url}/search", files=files, data={"k": "24"}, timeout=60)
        return [str(r["id"]) for r in reply.json()["results"]]

    def shown() -> list[str | None]:
        return [c.get_attribute("data-id") for c in page.locator("#results .card").all()][:24]

    assert shown() == expected(image=rocket)
    # A second positive: the page sends both images as one query.
    with page.expect_response(lambda r: r.url.endswith("/search")) as reply:
        page.set_input_files("#part-file", str(app_server.photos / "coffee.jpg"))
    assert reply.value.status == 200
    page.wait_for_function("document.getElementById('status').textContent.includes('result')")
    assert page.locator("#parts .part").count() == 2
    both = expected(image1=rocket, image2=coffee)
    assert shown() == both != expected(image=rocket)
    # Made a negative: the query moves away from the coffee photo.
    with page.expect_response(lambda r: r.url.endswith("/search")):
        page.locator("#parts .part").nth(1).locator("select").select_option("negative")
    page.wait_for_function("document.getElementById('status').textContent.includes('result')")
    assert page.locator("#parts .part.negative").count() == 1
    assert shown() == expected(image=rocket, negative=coffee)
    names = visible_names(page)
    assert not any(name.startswith("coffee") for name in names[:10])
    assert desktop.errors == []


def test_sort_by_date_orders_the_best_matches(app_server: Served, desktop: Page) -> None:
    """Sorted by date, a search lists the k best matches newest first, as one page."""
    page = desktop.open(app_server.url)
    page.fill("#k", "10")
    page.select_option("#search-sort", "-taken")
    page.set_input_files("#file", str(app_server.photos / "astronaut.jpg"))
    page.wait_for_function("document.getElementById('status').textContent.includes('newest')")
    shown = page.locator("#results .card .name").all_text_contents()
    taken = {r["file"]: r["taken"] for r in app_server.rows}
    assert len(shown) == 10 and [taken[n] for n in shown] == sorted(
        (taken[n] for n in shown), reverse=True
    )
    with httpx.Client(base_url=app_server.url, timeout=60) as client:
        query = {"image": ("q.jpg", (app_server.photos / "astronaut.jpg").read_bytes())}
        best = client.post("/search", files=query, data={"k": "10"}).json()
        assert {r["filename"] for r in best["results"]} == set(shown)
        assert best["next_offset"] == 10
        ordered = client.post("/search", files=query, data={"k": "10", "sort": "-taken"}).json()
        assert [r["filename"] for r in ordered["results"]] == shown
        assert ordered["next_offset"] is None  # the k best in that order are the whole list
        paged = client.post(
            "/search", files=query, data={"k": "10", "sort": "-taken", "offset": "10"}
        )
        assert paged.status_code == 400 and "larger k" in paged.json()["detail"]
        nowhere = client.get("/images", params={"within": "-90,-180,90,180"}).json()
        assert nowhere["total"] == 0  # no photo here has a GPS position
    assert page.locator("#sentinel").is_hidden()
    assert desktop.errors == []


def test_browse_view_with_filters_date_range_and_sort(
    app_server: Served, desktop: Page, phone: Page, tmp_path: Path
) -> None:
    for device, name in ((desktop, "desktop"), (phone, "phone")):
        page = device.open(app_server.url, "browse")
        page.wait_for_selector("#browse-grid .card")
        assert "of 36 image(s)" in page.text_content("#status")
        layout = check_layout(device, "#browse-grid .card", 2, f"browse-{name}", tmp_path)
        assert layout["columns"] == (1 if name == "phone" else layout["columns"])
        for _ in range(10):
            if page.locator("#browse-grid .card").count() >= 36:
                break
            page.locator("#sentinel").scroll_into_view_if_needed()
            page.wait_for_timeout(200)
        assert page.locator("#browse-grid .card").count() == 36

    page = desktop.page
    page.evaluate("window.scrollTo(0, 0)")
    page.select_option("#browse-sort", "-taken")
    newest = sorted(app_server.rows, key=lambda r: r["taken"], reverse=True)
    page.wait_for_function(
        "n => document.querySelector('#browse-grid .card .name')?.textContent === n",
        arg=newest[0]["file"],
    )
    page.wait_for_function("/^24 of 36/.test(document.getElementById('status').textContent)")
    names = page.locator("#browse-grid .card .name").all_text_contents()
    assert names == [r["file"] for r in newest[:24]]

    # A filter from the key picker: camera = Pixel 7.
    page.select_option("#filter-key", "camera")
    page.select_option("#filter-op", "=")
    page.fill("#filter-value", "Pixel 7")
    page.click("#filter-add")
    page.wait_for_function("document.getElementById('status').textContent.includes('of 12 image')")
    assert page.locator("#filter-list .chip").count() == 1
    metas = page.locator("#browse-grid .card .meta").all_text_contents()
    assert all("Pixel 7" in m for m in metas if "·" in m)

    # A date range on top of it.
    page.fill("#date-from", "2022-01-01")
    page.dispatch_event("#date-from", "change")
    page.fill("#date-to", "2022-12-31")
    page.dispatch_event("#date-to", "change")
    expected = [
        r
        for r in app_server.rows
        if r["camera"] == "Pixel 7" and "2022-01-01" <= r["taken"] < "2023-01-01"
    ]
    page.wait_for_function(
        "n => document.getElementById('status').textContent.includes(`of ${n} image`)",
        arg=len(expected),
    )
    names = set(page.locator("#browse-grid .card .name").all_text_contents())
    assert names == {r["file"] for r in expected}
    page.click("#filter-list .chip button")
    page.click("#date-clear")
    page.wait_for_function("document.getElementById('status').textContent.includes('of 36')")
    assert desktop.errors == []


def test_duplicates_view_choose_keeper_and_move_with_token_and_confirmation(
    dup_server: Served, desktop: Page, phone: Page, tmp_path: Path
) -> None:
    page = phone.open(dup_server.url, "duplicates")
    page.select_option("#dup-method", "embedding")
    page.click("#dup-find")
    page.wait_for_selector(".group .member")
    check_layout(phone, ".group .member", 1, "duplicates-phone", tmp_path)

    page = desktop.open(dup_server.url, "duplicates")
    assert "Moving needs a confirmation" in page.text_content("#dup-note")
    page.click("#dup-find")  # the default method: verified by local features
    page.wait_for_selector(".group .member")
    check_layout(desktop, ".group .member", 4, "duplicates-desktop", tmp_path)
    groups = page.locator(".group")
    assert groups.count() == 2
    # Each group found by a member only it holds (locators are evaluated anew each time).
    coffee = page.locator(".group", has=page.locator(".name", has_text="coffee-copy.jpg"))
    rocket = page.locator(".group", has=page.locator(".name", has_text="rocket-small.jpg"))
    assert coffee.locator(".member.keeper .name").text_content() == "coffee.jpg"
    assert rocket.locator(".member.keeper .name").text_content() == "rocket.jpg"
    assert coffee.locator(".member.keeper .role").text_content() == "keeper"
    # Another keeper: the copy in trip/; the original becomes the duplicate that moves.
    coffee.locator(".member", has_text="coffee-copy.jpg").locator("input[type=radio]").check()
    assert coffee.locator(".member.keeper .name").text_content() == "coffee-copy.jpg"
    # The rocket group stays as it is.
    rocket.locator("input[type=checkbox]").uncheck()
    assert page.text_content("#dup-move") == "Move 1 duplicate(s)…"

    page.click("#dup-move")
    dialog = page.locator("#confirm-move")
    assert dialog.is_visible() and "nothing is deleted" in dialog.text_content()
    page.keyboard.press("Escape")  # cancelled: nothing moves
    assert dialog.is_hidden() and (dup_server.photos / "coffee.jpg").exists()

    page.click("#dup-move")
    page.fill("#move-token", TOKEN)
    with page.expect_response(lambda r: r.url.endswith("/duplicates/move")) as reply:
        page.click("#confirm-yes")
    assert reply.value.status == 200
    page.wait_for_function("document.getElementById('dup-status').textContent.includes('group')")
    assert page.text_content("#dup-status").startswith("Moved 1 file(s) out of the collection.")
    assert (dup_server.moved_to / "coffee.jpg").exists()
    assert not (dup_server.photos / "coffee.jpg").exists()
    assert (dup_server.photos / "trip" / "coffee-copy.jpg").exists()
    page.wait_for_function("document.querySelectorAll('.group').length === 1")
    assert "5 images" in page.text_content("#stats")
    assert desktop.errors == []


def test_verified_duplicates_show_the_estimated_transform(
    dup_server: Served, desktop: Page
) -> None:
    """The default method says what turned the keeper into each copy: the half-size rocket
    is scaled 0.5x, the byte copy of the coffee has the keeper's geometry."""
    with httpx.Client(base_url=dup_server.url, timeout=120) as client:
        groups = client.get("/duplicates").json()["groups"]
    by_name = {d["filename"]: d for g in groups for d in g["duplicates"]}
    small = by_name["rocket-small.jpg"]["transform"]
    assert small["mirrored"] is False and abs(small["rotation_degrees"]) < 2
    assert small["scale"] == pytest.approx(0.5, rel=0.05) and small["inliers"] >= 25
    page = desktop.open(dup_server.url, "duplicates")
    page.click("#dup-find")
    page.wait_for_selector(".group .member")
    rocket = page.locator(".member", has=page.locator(".name", has_text="rocket-small.jpg"))
    assert "scaled 0.5x" in rocket.text_content()
    coffee = page.locator(".member", has=page.locator(".name", has_text="coffee-copy.jpg"))
    assert "same geometry" in coffee.text_content()
    assert desktop.errors == []


def test_duplicates_view_explains_when_the_server_moves_nothing(
    app_server: Served, desktop: Page
) -> None:
    page = desktop.open(app_server.url, "duplicates")
    assert "--duplicates-to" in page.text_content("#dup-note")
    page.select_option("#dup-method", "embedding")
    page.click("#dup-find")
    page.wait_for_selector(".group .member")
    assert page.locator("#dup-move").is_disabled()
    assert desktop.errors == []


def test_add_images_with_the_token(
    app_server: Served, browser, tmp_path: Path, desktop: Page, phone: Page
) -> None:
    check = Page(browser, DESKTOP, console=False)  # a refused upload logs its 401
    try:
        page = check.open(app_server.url, "add")
        assert page.locator("#add-token").is_visible()
        upload = tmp_path / "new-photo.jpg"
        photo("immunohistochemistry").rotate(90).save(upload, quality=90)
        page.set_input_files("#add-file", str(upload))
        assert "token" in page.text_content("#add-status")  # asked for first, nothing sent
        page.fill("#add-token", "wrong")
        page.set_input_files("#add-file", str(upload))
        page.wait_for_selector("#add-results li.error")
        assert "token" in page.text_content("#add-results")
        before = httpx.get(f"{app_server.url}/stats").json()["images"]
        page.fill("#add-token", TOKEN)
        page.set_input_files("#add-file", str(upload))
        page.wait_for_selector("#add-results li.ok")
        added = int(page.text_content("#add-results li.ok").rsplit(" ", 1)[1])
        page.wait_for_function(
            "n => document.getElementById('stats').textContent.startsWith(n + ' images')",
            arg=before + 1,
        )
        assert check.errors == []
    finally:
        check.close()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert httpx.delete(f"{app_server.url}/images/{added}", headers=auth).status_code == 204
    for device, name in ((desktop, "desktop"), (phone, "phone")):
        page = device.open(app_server.url, "add")
        page.wait_for_selector("#add-drop")
        layout = page.evaluate(LAYOUT, ["#add-drop", 1])
        shot = np.asarray(Image.open(screenshot(page, f"add-{name}", tmp_path)).convert("L"))
        assert layout["scrollWidth"] <= layout["innerWidth"] and layout["wide"] == [], layout
        drop = page.locator("#add-drop").bounding_box()
        assert drop["width"] > 0.8 * (layout["innerWidth"] - 48) and drop["height"] > 40
        # Not blank: the header, the heading, the token field and the drop zone are drawn.
        assert shot.std() > 5 and (shot < 128).mean() > 0.002
        assert page.locator("#add-token").is_visible()
        assert device.errors == []


def test_text_box_only_when_the_model_embeds_text(text_server: Served, desktop: Page) -> None:
    page = desktop.open(text_server.url)
    assert page.locator("#text-query").is_visible()
    page.fill("#text-query", "something red")
    page.keyboard.press("Enter")
    page.wait_for_selector("#results .card")
    assert visible_names(page)[0] == "red.jpg"
    # Text and an image combine into one query: both lead its results.
    page.fill("#text-query", "blue")
    with page.expect_response(lambda r: r.url.endswith("/search")) as reply:
        page.set_input_files("#part-file", str(text_server.photos / "rocket.jpg"))
    assert reply.value.status == 200
    page.wait_for_function("document.getElementById('status').textContent.includes('result')")
    assert set(visible_names(page)[:2]) == {"blue.jpg", "rocket.jpg"}
    assert desktop.errors == []


def test_keyboard_alone(app_server: Served, desktop: Page, tmp_path: Path) -> None:
    page = desktop.open(app_server.url)
    page.set_input_files("#file", str(app_server.photos / "astronaut.jpg"))
    page.wait_for_selector("#results .card")

    def focused() -> dict[str, Any]:
        return page.evaluate(
            """() => {
                const e = document.activeElement;
                const s = getComputedStyle(e);
                return {tag: e.tagName, cls: e.className, id: e.id,
                        label: e.getAttribute('aria-label'), outline: s.outlineStyle,
                        width: parseFloat(s.outlineWidth)};
            }"""
        )

    # Tab from the top reaches the nav, the drop zone and then the result cards.
    page.locator("body").focus()
    seen = []
    for _ in range(60):
        page.keyboard.press("Tab")
        now = focused()
        seen.append(now)
        if "card" in now["cls"].split():
            break
    assert any(s["id"] == "drop" for s in seen)
    assert any(s["tag"] == "A" for s in seen)
    card = seen[-1]
    assert "card" in card["cls"].split(), seen
    assert card["outline"] != "none" and card["width"] >= 2  # a visible focus ring
    # Enter on a card: more like this, with that image first.
    target = card["label"].split(",")[0]
    page.keyboard.press("Enter")
    page.wait_for_function(
        "n => document.querySelector('#results .card .name')?.textContent === n", arg=target
    )
    # Tab to its Details button, Space opens the dialog, Escape closes it and focus returns.
    page.locator("#results .card").first.focus()
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    assert focused()["cls"] == "details"
    page.keyboard.press(" ")
    assert page.locator("#details").is_visible()
    page.keyboard.press("Escape")
    assert page.locator("#details").is_hidden()
    assert focused()["cls"] == "details"
    # The nav links switch views from the keyboard; the dialog's late close event does not
    # pull focus back from the link (it did, on a busy machine, and Enter reopened Details).
    page.locator("nav a[data-view=browse]").focus()
    page.evaluate("() => document.getElementById('details').dispatchEvent(new Event('close'))")
    assert focused()["tag"] == "A"
    page.keyboard.press("Enter")
    page.wait_for_selector("#browse-grid .card")
    assert page.locator("#view-browse").is_visible()
    page.locator("#drop").evaluate("e => e.blur()")
    assert desktop.errors == []


def test_old_behaviour_kept_for_a_single_upload(app_server: Served, desktop: Page) -> None:
    """Picking a file searches at once, the threshold reruns the search, and a threshold
    nobody reaches says so instead of listing weak results."""
    page = desktop.open(app_server.url)
    page.set_input_files("#file", str(app_server.photos / "retina.jpg"))
    page.wait_for_selector("#results .card")
    page.fill("#threshold", "1.5")
    page.dispatch_event("#threshold", "change")
    page.wait_for_function("document.getElementById('status').textContent.includes('No close')")
    assert page.locator("#results .card").count() == 0
    assert desktop.errors == []
