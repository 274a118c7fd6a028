"""The footage page in headless Chromium: a search of an index of footage shows each hit's camera
and time, the camera filter narrows it, and a click on a crop opens its frame with the box drawn.

Runs like tests/test_browser.py (same Chromium lookup, skip and TBPS_REQUIRE_BROWSER rules)."""

from __future__ import annotations

import httpx
import pytest

from test_browser import chromium, page, served, wait_until  # noqa: F401  (fixtures)
from tiny_footage import build_tiny_footage_index

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def footage_server(chromium, tmp_path_factory):  # noqa: F811
    index_dir, _ = build_tiny_footage_index(tmp_path_factory.mktemp("browser-footage"), source="videos")
    with served(index_dir) as base:
        yield base


def test_click_on_a_hit_shows_its_frame_with_the_box(footage_server, page):  # noqa: F811
    page.goto(footage_server + "/")
    wait_until(page, "!document.getElementById('footage-filters').hidden")
    assert page.locator("#camera option").all_text_contents() == ["all", "cam01", "cam02"]
    page.select_option("#camera", "cam02")
    page.fill("#q", "a woman in a red coat")
    page.fill("#k", "4")
    page.click("#go")
    page.wait_for_selector("#results figure.footage >> nth=0")
    wheres = page.locator("#results .where").all_text_contents()
    assert wheres and all(w.startswith("cam02 2026-01-05 08:10:") for w in wheres)
    assert "camera=cam02" in page.url
    assert page.is_hidden("#frame-view")
    page.click("#results figure.footage img >> nth=0")
    page.wait_for_selector("#frame-view", state="visible")
    wait_until(page, "document.getElementById('frame-img').complete && "
                     "document.getElementById('frame-img').naturalWidth > 0")
    size = page.evaluate("[document.getElementById('frame-img').naturalWidth, "
                         "document.getElementById('frame-img').naturalHeight]")
    assert size == [256, 192]  # the whole frame, not the crop
    api = httpx.get(footage_server + "/api/search",
                    params={"q": "a woman in a red coat", "k": 4, "camera": "cam02"}).json()["results"][0]
    assert page.evaluate("new URL(document.getElementById('frame-img').src).pathname") == api["frame_url"]
    caption = page.text_content("#frame-caption")
    assert "camera cam02" in caption and "box " + ", ".join(map(str, api["box"])) in caption
    # the box is drawn: the frame's pixels on the box's left edge are red
    red = page.evaluate(f"""(() => {{
        const img = document.getElementById('frame-img');
        const canvas = document.createElement('canvas');
        canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
        const ctx = canvas.getContext('2d'); ctx.drawImage(img, 0, 0);
        const [x0, y0, x1, y1] = {api["box"]};
        let red = 0, n = 0;
        for (let y = y0 + 2; y < y1 - 2; y += 2) {{
            const [r, g, b] = ctx.getImageData(x0, y, 1, 1).data;
            n += 1; if (r > 180 && g < 90 && b < 90) red += 1;
        }}
        return red / n;
    }})()""")
    assert red > 0.9
    page.click("#frame-close")
    page.wait_for_selector("#frame-view", state="hidden")
    assert page.console_errors == []
