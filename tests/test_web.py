"""The web page in a real browser: Debian Chromium driven by Playwright against a live uvicorn server.

The server runs in a thread on a free port over the fixture folder, indexed with the session's tiny
embedder. Screenshots of the main states go to ``artifacts/screenshots/`` (gitignored). The module
skips when Playwright or Chromium is missing (``MM_CHROMIUM`` points at another Chromium binary).
"""

from __future__ import annotations

import copy
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import IMAGES, SOUNDS, TEXTS, wait_job

from mm.calibration import Calibration, PairFit
from service.app import create_app
from service.settings import Settings

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")

CHROMIUM = os.environ.get("MM_CHROMIUM", "/usr/bin/chromium")
if not Path(CHROMIUM).is_file():
    pytest.skip(
        f"no Chromium at {CHROMIUM} (apt-get install chromium, or set MM_CHROMIUM)", allow_module_level=True
    )

ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    # a synthetic microphone (a beep) that needs no permission prompt: the spoken-query test records it
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--autoplay-policy=no-user-gesture-required",
]
N_GOOD = len(IMAGES) + len(SOUNDS) + len(TEXTS)
SHOTS = Path(__file__).resolve().parent.parent / "artifacts" / "screenshots"
TIMEOUT_MS = 15_000


class LiveServer:
    """uvicorn serving ``app`` on 127.0.0.1 in a daemon thread; ``url`` once it answers."""

    def __init__(self, app) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)
        self.sock.close()


def _ingest(url: str, root: Path) -> None:
    with httpx.Client(base_url=url, timeout=30) as client:
        job = wait_job(client, client.post("/ingest", json={"path": str(root)}).json()["id"])
        assert job["status"] == "done" and job["added"] == N_GOOD, job


@pytest.fixture(scope="module")
def server(tmp_path_factory, media_root, embedder) -> Iterator[LiveServer]:
    settings = Settings(collection=tmp_path_factory.mktemp("web") / "coll", allowed_roots=[media_root])
    # The tiny model is untrained: give its copy a calibration (as a trained checkpoint brings one), so
    # that hybrid scores are probabilities and the extractive answer can tell a matching caption.
    calibrated = copy.copy(embedder)
    calibrated.calibration = Calibration(
        {f"text->{m}": PairFit(1.0, -6.0) for m in ("text", "image", "audio")}, lexical=PairFit(3.0, -2.0)
    )
    with LiveServer(create_app(settings, embedder=calibrated)) as live:
        _ingest(live.url, media_root)
        yield live


@pytest.fixture(scope="module")
def browser():
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1200, "height": 860})
    context.set_default_timeout(TIMEOUT_MS)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.goto(server.url + "/")
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def search_text(page, text: str) -> None:
    page.fill("#q", text)
    page.press("#q", "Enter")
    page.wait_for_selector("#results .card")


def shot(page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_page_and_assets_are_served(server):
    with httpx.Client(base_url=server.url) as client:
        html = client.get("/")
        assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
        for src in re.findall(r'(?:src|href)="(/static/[^"]+)"', html.text):
            asset = client.get(src)
            assert asset.status_code == 200 and asset.content, src
        assert "javascript" in client.get("/static/app.js").headers["content-type"]
        missing = client.get("/static/..%2Fapp.py")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        assert "http://" not in html.text and "https://" not in html.text  # nothing from the network


def test_text_search_shows_cards_and_status(page):
    page.wait_for_function("document.querySelector('#counts').dataset.count !== undefined")
    assert page.inner_text("#counts").startswith(f"{N_GOOD} items")
    search_text(page, "a red circle")
    cards = page.locator("#results .card")
    assert cards.count() == min(12, N_GOOD)
    assert page.locator("#results .card .badge").count() == cards.count()
    scores = [float(s.split()[1]) for s in page.locator("#results .score").all_inner_texts()]
    assert scores == sorted(scores, reverse=True)
    page.wait_for_function(
        "[...document.querySelectorAll('#results .card img')].every(i => i.complete && i.naturalWidth > 0)"
    )
    assert page.locator("#results .card.image img").count() == len(IMAGES)
    assert page.locator("#results .card.text .snippet").count() == len(TEXTS)
    shot(page, "01_text_search")


def test_upload_image_and_audio_queries(page, media_root):
    page.set_input_files("#file", str(media_root / "images" / "blue_square.jpg"))
    page.wait_for_selector("#results-heading:has-text('blue_square.jpg')")
    page.wait_for_selector("#results .card")
    top = page.locator("#results .card").first
    assert top.get_attribute("data-modality") == "image"  # the same picture ranks first
    assert float(top.locator(".score").inner_text().split()[1]) == pytest.approx(1.0, abs=1e-3)
    shot(page, "02_image_query")

    page.uncheck("input[value=image]")
    page.uncheck("input[value=text]")
    page.set_input_files("#file", str(media_root / "sounds" / "tone_mid.wav"))
    page.wait_for_selector("#results-heading:has-text('tone_mid.wav')")
    page.wait_for_selector("#results .card")
    modalities = {c.get_attribute("data-modality") for c in page.locator("#results .card").all()}
    assert modalities == {"audio"}


def test_audio_player_streams_with_range_requests(page):
    ranged: list[int] = []
    page.on("response", lambda r: "/media" in r.url and ranged.append(r.status))
    page.uncheck("input[value=image]")
    page.uncheck("input[value=text]")
    search_text(page, "a tone")
    assert page.locator("#results .card audio").count() == len(SOUNDS)
    page.wait_for_function(
        "[...document.querySelectorAll('#results audio')].every(a => a.readyState >= 1 && a.duration > 0)"
    )
    durations = page.eval_on_selector_all("#results audio", "els => els.map(a => a.duration)")
    assert all(d == pytest.approx(0.5, abs=0.05) for d in durations)  # the fixture tones last 0.5 s
    assert 206 in ranged, ranged  # the media route answered a byte range
    shot(page, "03_audio_results")


def test_more_like_this_from_the_keyboard(page):
    search_text(page, "stripes")
    first = page.locator("#results .card").first
    first_id = first.get_attribute("data-id")
    first.focus()
    page.keyboard.press("Enter")
    page.wait_for_selector("#results-heading:has-text('More like')")
    page.wait_for_selector("#results .card")
    ids = page.eval_on_selector_all("#results .card", "els => els.map(e => e.dataset.id)")
    assert first_id not in ids and len(ids) == N_GOOD - 1


def test_results_page_with_offset(page):
    offsets: list[int] = []
    page.on(
        "request",
        lambda r: r.url.endswith("/search") and offsets.append(r.post_data_json.get("offset")),
    )
    page.fill("#k", "2")
    search_text(page, "anything")
    page.wait_for_function(f"document.querySelectorAll('#results .card').length === {N_GOOD}")
    page.mouse.wheel(0, 3000)
    time.sleep(0.3)
    assert page.locator("#results .card").count() == N_GOOD  # no duplicates, nothing after the end
    assert offsets == list(range(0, N_GOOD + 1, 2))


def test_ask_streams_an_answer_with_citations(page):
    frames: list[str] = []
    page.on("websocket", lambda ws: ws.on("framereceived", lambda f: frames.append(str(f))))
    search_text(page, "ocean")
    page.fill("#ask-q", "what is the ocean like?")
    page.press("#ask-q", "Enter")
    page.wait_for_selector("#citations li")
    page.wait_for_function("document.querySelector('#answer').getAttribute('aria-busy') === 'false'")
    assert len(page.inner_text("#answer").strip()) > 10
    assert sum('"token"' in f for f in frames) >= 2  # streamed in pieces, not one message
    assert page.locator("#error").is_hidden()
    cite = page.locator("#citations .cite").first
    cited = cite.get_attribute("data-id")
    cite.click()
    page.wait_for_selector(f"#results .card.highlight[data-id='{cited}']")
    shot(page, "04_ask")


def test_api_errors_show_a_readable_message(page, tmp_path):
    bad = tmp_path / "notes.xyz"
    bad.write_text("not media")
    page.set_input_files("#file", str(bad))
    page.wait_for_selector("#error:not([hidden])")
    text = page.inner_text("#error-text")
    assert text.startswith("Search failed: unsupported file type '.xyz'"), text
    assert "{" not in text  # the message, not the raw JSON body
    shot(page, "05_error")
    page.click("#error-close")
    assert page.locator("#error").is_hidden()


def test_spoken_query_from_the_microphone(page):
    page.click("#mic")
    page.wait_for_selector("#mic[aria-pressed=true]")
    time.sleep(1.0)
    page.click("#mic")
    page.wait_for_selector("#results-heading:has-text('your recording')")
    page.wait_for_selector("#results .card")
    assert "recorded" in page.inner_text("#mic-state")


def test_phone_viewport_has_no_horizontal_overflow(browser, server):
    context = browser.new_context(viewport={"width": 360, "height": 740}, is_mobile=True, has_touch=True)
    pg = context.new_page()
    try:
        pg.goto(server.url + "/?q=a+green+triangle")
        pg.wait_for_selector("#results .card")
        overflow = pg.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 0, f"the page is {overflow}px wider than the phone screen"
        box = pg.locator("#results .card").first.bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 360
        shot(pg, "06_phone")
    finally:
        context.close()


def test_api_key_field_is_offered_and_used(browser, tmp_path, embedder):
    settings = Settings(collection=tmp_path / "keyed", api_keys=["s3cret"])
    with LiveServer(create_app(settings, embedder=embedder)) as live:
        context = browser.new_context()
        pg = context.new_page()
        try:
            pg.goto(live.url + "/")
            pg.wait_for_selector("#key-box.needed[open]")
            assert "API key" in pg.inner_text("#counts")
            pg.fill("#api-key", "s3cret")
            pg.press("#api-key", "Enter")
            pg.wait_for_selector("#counts:has-text('0 items')")
            assert pg.evaluate("localStorage.getItem('mm.apiKey')") == "s3cret"
        finally:
            context.close()
