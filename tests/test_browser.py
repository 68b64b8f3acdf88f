"""End to end in a real headless browser: Debian's /usr/bin/chromium driven by Playwright.

(1) `python cli.py serve` as a real subprocess: upload an image on its page, read the predicted class
and its bar. (2) report.html from file://: every image loads, no console error, no request leaves for
another host, a confusion-matrix cell opens its thumbnails, the map shows a point's image.
Both skip, saying why, without /usr/bin/chromium (`apt-get install chromium`) or Playwright.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from conftest import ROOT, SHARED
from model_fixtures import pattern

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
FLOWERS = SHARED / "datasets" / "oxford_flowers12"
LITE0 = SHARED / "keras-models" / "efficientnet_lite0_imagenet.keras"
FLOWER_CLASSES = ("bluebell", "daisy", "sunflower")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing: apt-get install chromium"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed: pip install playwright")


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    """A fresh page that records console errors, uncaught exceptions and every request it makes."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.errors, page.requests = [], []
    page.on("console", lambda message: page.errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    page.on("request", lambda request: page.requests.append(request.url))
    yield page
    context.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def running_server(head: Path, log_path: Path, runtime: str) -> Iterator[str]:
    """`cli.py serve --head HEAD` in a subprocess on a free loopback port; its base URL once /health answers."""
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "cli.py", "serve", "--head", str(head), "--port", str(port), "--runtime", runtime],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, f"serve exited with {server.returncode}:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"serve did not answer in time:\n{log_path.read_text()}"
            try:
                if httpx.get(url + "health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture(scope="module")
def served_head(tmp_path_factory: pytest.TempPathFactory, request) -> tuple[Path, Path, str | None]:
    """(head folder, an image it did not see, the image's true class or None).

    With ../shared: Lite0 on 3 flower classes x 10 images, and a held-out flower of one of them (TFLite: the
    session's conversion beside the cache, where the server finds it too).
    Without: the tiny random-weights head of model_fixtures, and a generated image.
    """
    if FLOWERS.is_dir() and LITE0.is_file():
        from pipeline.backbones import BackboneConfig
        from pipeline.extract import extract
        from pipeline.heads import fit_head

        root = tmp_path_factory.mktemp("flowers_head")
        for cls in FLOWER_CLASSES:
            (root / "data" / cls).mkdir(parents=True)
            for image in sorted((FLOWERS / cls).glob("*.jpg"))[:10]:
                shutil.copy(image, root / "data" / cls / image.name)
        request.getfixturevalue("lite0_tflite").place(root)
        config = BackboneConfig(str(LITE0), "imagenet", "avg_pool")
        summary = extract(
            root / "data", config, cache=root / "flowers3.h5", runtime="tflite", progress=False, log=lambda m: None
        )
        head = fit_head(summary.cache_path, "logreg", cv=3, n_jobs=1, out=root / "head", log=lambda m: None).folder
        held_out = sorted((FLOWERS / "daisy").glob("*.jpg"))[-1]
        return head, held_out, "daisy"
    tiny = request.getfixturevalue("world")
    from PIL import Image

    image = tmp_path_factory.mktemp("upload") / "checks.png"
    Image.fromarray(pattern("checks", 99)).save(image)
    return tiny.heads["logreg"], image, None


@pytest.fixture(scope="module")
def server(served_head, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One `serve` process for the module's page tests (TFLite for the Lite0 head, Keras for the tiny one)."""
    head, _, true_class = served_head
    with running_server(
        head, tmp_path_factory.mktemp("serve") / "serve.log", "tflite" if true_class else "keras"
    ) as url:
        yield url


@contextmanager
def other_site(html: str) -> Iterator[str]:
    """A page of another origin (http://localhost:PORT/, served from a thread): what a hostile site would be."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the http.server name)
            body = html.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    with ThreadingHTTPServer(("127.0.0.1", 0), Page) as site:
        threading.Thread(target=site.serve_forever, daemon=True).start()
        yield f"http://localhost:{site.server_address[1]}/"
        site.shutdown()


def test_serve_page_classifies_an_uploaded_image(page, browser, served_head, server: str, tmp_path: Path) -> None:
    import httpx

    _, image, true_class = served_head
    url = server
    classes = httpx.get(url + "health").json()["classes"]
    page.goto(url)
    page.set_input_files("#files", str(image))
    card = page.locator(".result.prediction")
    card.wait_for(timeout=120_000)
    predicted = card.locator(".row.first .cls").inner_text()
    bar = card.locator(".row.first .fill")
    probability = float(bar.get_attribute("data-probability"))
    shown = bar.evaluate("e => e.getBoundingClientRect().width / e.parentNode.getBoundingClientRect().width")
    assert card.locator(".name").inner_text() == image.name
    assert predicted in classes and card.locator(".row").count() == min(5, len(classes))
    assert abs(shown - probability) < 0.02  # the bar is as long as the probability
    assert card.locator(".row.first .pct").inner_text() == f"{100 * probability:.1f}%"
    if true_class:  # Lite0 on flowers: the held-out daisy is a daisy
        assert predicted == true_class and probability > 1 / len(classes)
    with open(image, "rb") as handle:  # the page shows what the API answers
        api = httpx.post(url + "predict", files={"files": (image.name, handle)}).json()
    assert api["predictions"][0]["top"][0]["class"] == predicted
    assert abs(api["predictions"][0]["top"][0]["probability"] - probability) < 1e-6
    page.screenshot(path=str(tmp_path / "serve.png"), full_page=True)
    assert page.errors == []
    # a file that is not an image: the card says why, naming the file, and the server stays up
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    page.set_input_files("#files", str(bad))
    error = page.locator(".result.failed .error")
    error.wait_for(timeout=60_000)
    assert "notes.jpg" in error.inner_text() and "not an image" in error.inner_text()
    assert httpx.get(url + "health").status_code == 200
    calls = httpx.get(url + "health").json()["model_calls"]
    # another site's page posts a form with an image to the server (a CORS 'simple request'): refused, unrun
    form = (
        f'<form id="f" method="post" enctype="multipart/form-data" action="{url}predict">'
        '<input type="file" name="files" id="files"></form>'
    )
    with other_site(form) as site:
        context = browser.new_context()
        hostile = context.new_page()
        hostile.goto(site)
        hostile.set_input_files("#files", str(image))
        with hostile.expect_response(url + "predict") as answer:
            hostile.evaluate("document.getElementById('f').submit()")
        assert answer.value.status == 403 and "other origins" in answer.value.json()["error"]
        context.close()
    assert httpx.get(url + "health").json()["model_calls"] == calls
    assert all(u.startswith((url, "blob:", "data:")) for u in page.requests), page.requests


def test_report_opens_from_disk_and_its_cells_open_their_images(page, report_world, tmp_path: Path) -> None:
    from pipeline.web.report import build_report

    report = build_report(
        [report_world.heads["logreg"], report_world.heads["knn"]],
        report_world.audit,
        tmp_path / "report.html",
        projection="pca",
        log=lambda m: None,
    )
    # anything but the file itself and its inline data is refused (and recorded)
    refused: list[str] = []

    def local_only(route) -> None:
        if route.request.url.startswith(("file:", "data:")):
            route.continue_()
        else:
            refused.append(route.request.url)
            route.abort()

    page.route("**/*", local_only)
    page.goto(report.as_uri())
    page.wait_for_load_state("load")
    page.wait_for_function("Array.from(document.images).every(i => i.complete)")
    broken = page.evaluate("Array.from(document.images).filter(i => i.naturalWidth === 0).map(i => i.alt)")
    assert broken == [] and page.evaluate("document.images.length") > 50
    assert refused == [] and all(u.startswith(("file:", "data:")) for u in page.requests), page.requests
    # a confusion-matrix cell: its thumbnails appear, as many as its count
    cell = page.locator("table.cm").first.locator("td[data-target]").first
    target = cell.get_attribute("data-target")
    assert page.locator(f"#{target}").is_hidden()
    cell.click()
    gallery = page.locator(f"#{target}")
    assert gallery.is_visible()
    assert gallery.locator("img").count() == int(cell.inner_text())
    assert gallery.locator("img").first.evaluate("i => i.naturalWidth") > 0
    # the map: hovering a point shows its thumbnail, path and label
    point = page.locator("#map circle").first
    point.hover(force=True)  # another point may lie on top of it: the tooltip shows the one under the pointer
    tip = page.locator("#tip")
    assert tip.is_visible() and "/img_" in tip.inner_text() and "label " in tip.inner_text()
    assert page.locator("#tip-img").evaluate("i => i.naturalWidth") > 0
    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    assert page.errors == []


def test_serve_page_shows_a_bank_note_as_unknown(page, served_head, server: str, tmp_path: Path) -> None:
    """The flowers head's detector: a held-out daisy shows its class, a bank note shows in grey as unknown."""
    import httpx

    _, flower, true_class = served_head
    if true_class is None:
        pytest.skip(f"needs the Lite0 flowers head ({SHARED} is absent)")
    notes = SHARED / "datasets" / "usd_bills_kaggle" / "1_dollar"
    if not notes.is_dir():
        pytest.skip(f"{notes} is absent")
    note = min(
        (p for p in notes.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")), key=lambda p: p.stat().st_size
    )
    url = server
    health = httpx.get(url + "health").json()
    assert health["unknown_detector"] is True
    page.goto(url)
    assert "unknown detector on" in page.locator("#detector").inner_text()
    page.set_input_files("#files", str(flower))
    page.locator(".result.prediction").wait_for(timeout=120_000)
    page.set_input_files("#files", str(note))
    page.locator(".result.prediction.unknown").wait_for(timeout=120_000)
    cards = page.locator(".result.prediction")
    assert cards.count() == 2
    note_card, flower_card = cards.nth(0), cards.nth(1)  # the newest card comes first
    assert note_card.locator(".name").inner_text() == note.name
    assert "unknown" not in (flower_card.get_attribute("class") or "")
    assert flower_card.locator(".row.first .cls").inner_text() == true_class
    verdict = note_card.locator(".verdict").inner_text()
    closest = note_card.locator(".row.first .cls").inner_text()
    percent = round(100 * float(note_card.locator(".row.first .fill").get_attribute("data-probability")))
    assert verdict == f"Not one of my {len(health['classes'])} classes (closest: {closest}, {percent}%)"
    grey = note_card.evaluate("e => getComputedStyle(e).backgroundColor")
    assert grey == "rgb(243, 243, 243)"
    with open(note, "rb") as handle:
        api = httpx.post(url + "predict", files={"files": (note.name, handle)}).json()["predictions"][0]
    assert api["unknown"] is True and api["unknown_score"] > health["unknown_threshold"]
    page.screenshot(path=str(tmp_path / "serve-unknown.png"), full_page=True)
    assert page.errors == []
