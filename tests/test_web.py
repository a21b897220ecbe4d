"""The web page, driven in headless Chromium: pick a real photo, see its match first."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_rest import LiveServer

from lookalike.core.collection import Collection
from lookalike.server.rest import create_app
from lookalike.server.service import SearchService


@pytest.fixture(scope="module")
def page_url(photo_dir: Path, tmp_path_factory: pytest.TempPathFactory, encoder) -> Iterator[str]:
    collection = Collection(tmp_path_factory.mktemp("web") / "collection")
    collection.use_encoder(encoder)
    collection.index(photo_dir, workers=0)
    with LiveServer(create_app(SearchService(collection))) as server:
        yield server.url
    collection.close()


def test_pick_a_photo_and_see_its_match_first(
    browser, page_url: str, photo_dir: Path, tmp_path: Path
) -> None:
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(page_url)
    page.wait_for_function("document.getElementById('stats')?.textContent.includes('images')")
    assert "6 images" in page.text_content("#stats")

    page.set_input_files("#file", str(photo_dir / "nested" / "chelsea.jpg"))
    page.wait_for_selector(".card")
    names = page.locator(".card .name").all_text_contents()
    assert names[0] == "chelsea.jpg"
    assert len(names) == 6
    first_score = float(page.locator(".card .score").first.text_content())
    assert first_score > 0.99
    assert page.locator("#preview").is_visible()
    page.screenshot(path=os.environ.get("LOOKALIKE_SCREENSHOT", str(tmp_path / "results.png")))

    # Clicking a result searches by it: that image then comes first.
    target = page.locator(".card").nth(3)
    target_name = target.locator(".name").text_content()
    target.click()
    page.wait_for_function(
        "name => document.querySelector('.card .name')?.textContent === name", arg=target_name
    )
    assert page.locator(".card .name").first.text_content() == target_name

    # A threshold nobody reaches shows "no close match" instead of weak results.
    page.fill("#threshold", "1.5")
    page.dispatch_event("#threshold", "change")
    page.wait_for_function("document.getElementById('status')?.textContent.includes('No close')")
    assert page.locator(".card").count() == 0
    assert errors == []
