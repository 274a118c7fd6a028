"""End to end in headless Chromium: `tbps serve` over a real tiny index, a query typed in the page,
ranked images with scores shown and loaded.

Needs Playwright (dev extra) and a Chromium executable: Debian's ``chromium`` package (installed by
``.ci/run``), or the path in ``TBPS_CHROMIUM``. Playwright drives that browser; nothing is downloaded.
Without one the tests are skipped with the reason, unless ``TBPS_REQUIRE_BROWSER=1`` (set by
``.ci/run``) turns the skip into a failure so that CI cannot pass without running them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager

import httpx
import pytest

from tiny_gallery import NUM_IMAGES, build_tiny_index, free_port

pytestmark = pytest.mark.browser

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _unavailable(reason: str) -> None:
    if os.environ.get("TBPS_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason}, and TBPS_REQUIRE_BROWSER=1 asks for the browser test to run")
    pytest.skip(reason)


def find_chromium() -> str | None:
    configured = os.environ.get("TBPS_CHROMIUM")
    if configured:
        return configured if os.access(configured, os.X_OK) else None
    return next((path for path in map(shutil.which, CHROMIUM_NAMES) if path), None)


@pytest.fixture(scope="module")
def chromium() -> str:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _unavailable("Playwright is not installed (pip install -e '.[dev]')")
    path = find_chromium()
    if path is None:
        _unavailable("no Chromium executable found (apt-get install chromium, or set TBPS_CHROMIUM=/path)")
    return path


@contextmanager
def served(index_dir):
    """`python -m tbps serve` over ``index_dir`` in a subprocess on a free loopback port; yields its base URL."""
    port = free_port()
    log = open(index_dir.parent / "serve.log", "w+")
    process = subprocess.Popen([sys.executable, "-m", "tbps", "serve", "--index", str(index_dir), "--host",
                                "127.0.0.1", "--port", str(port), "--device", "cpu", "--log-level", "warning"],
                               stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                log.seek(0)
                pytest.fail(f"tbps serve exited with {process.returncode}: {log.read()[-2000:]}")
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("tbps serve did not answer /healthz within 120 s")
            time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture(scope="module")
def server(chromium, tmp_path_factory):
    """The served tiny gallery index; yields its base URL."""
    with served(build_tiny_index(tmp_path_factory.mktemp("browser"))) as base:
        yield base


@pytest.fixture
def page(chromium):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True)
        try:
            context = browser.new_context()
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda msg: errors.append(f"{msg.text} ({msg.location.get('url')})")
                    if msg.type == "error" else None)
            page.console_errors = errors
            yield page
        finally:
            browser.close()


def wait_until(page, expression: str, timeout: float = 30.0) -> None:
    """Poll ``expression`` with one-shot evaluations: ``page.wait_for_function`` polls through
    ``eval`` inside the page, which the page's Content-Security-Policy (rightly) forbids."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"timed out waiting for {expression}"
        time.sleep(0.05)


def test_typed_query_shows_ranked_images_with_scores(server, page):
    page.goto(server + "/")
    wait_until(page, "document.getElementById('info').textContent.includes('images')")
    assert f"{NUM_IMAGES} images" in page.text_content("#info")
    page.fill("#q", "a woman in a red coat carrying a black bag")
    page.fill("#k", "5")
    page.click("#go")
    page.wait_for_selector("#results figure.result >> nth=4")
    figures = page.locator("#results figure.result")
    assert figures.count() == 5
    ranks = [figures.nth(i).locator(".rank").text_content().strip() for i in range(5)]
    assert ranks == ["#1", "#2", "#3", "#4", "#5"]
    scores = [float(figures.nth(i).locator(".score").text_content()) for i in range(5)]
    assert scores == sorted(scores, reverse=True) and all(-1.0 <= s <= 1.0 for s in scores)
    # every image really loaded (decoded, non-zero size), from the server's /images/<id>
    wait_until(page, "[...document.querySelectorAll('#results img')].every(i => i.complete)")
    loaded = page.eval_on_selector_all(
        "#results img", "imgs => imgs.map(i => [i.naturalWidth, i.naturalHeight, new URL(i.src).pathname])")
    assert all(w == 20 and h == 40 and path.startswith("/images/") for w, h, path in loaded), loaded
    # the page shows what the API returns, in its order
    api = httpx.get(server + "/api/search", params={"q": "a woman in a red coat carrying a black bag", "k": 5}).json()
    assert [p for _, _, p in loaded] == [r["url"] for r in api["results"]]
    assert "5 results" in page.text_content("#status")
    assert "q=a+woman" in page.url  # shareable address
    assert page.console_errors == []


def test_an_invalid_query_shows_the_servers_error(server, page):
    page.goto(server + "/?q=" + "x" * 600)  # longer than the server accepts
    page.wait_for_selector("#status.error")
    assert "at most 500" in page.text_content("#status")
    assert page.locator("#results figure").count() == 0
