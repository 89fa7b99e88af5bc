"""The demo page in a real headless Chromium against a real TorchServe, and the CORS rule that admits it."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import requests

from client import demo
from handlers.explaining import Slots
from serving.catalog import ROOT
from serving.server import free_ports
from tests import browser
from tests.conftest import require
from tests.integration.conftest import running

CAT = ROOT / "examples" / "cat.png"
TOP_BAR = "const bar = document.querySelector('#bars .bar'); return bar ? bar.dataset.label : null;"
# The attribution map is its own layer over the image: per 8×8-pixel cell of the 32×32 map, its colour. Drawn
# means most cells are tinted (an attribution of exactly 0 leaves a cell clear), some red (raised the answer) and
# some blue (lowered it), as Integrated Gradients gives for a photo.
MAP_CELLS = """
const canvas = document.getElementById('map');
if (canvas.dataset.drawn !== 'true') return null;
const context = canvas.getContext('2d');
let tinted = 0, red = 0, blue = 0;
for (let y = 4; y < 256; y += 8) for (let x = 4; x < 256; x += 8) {
  const [r, g, b, a] = context.getImageData(x, y, 1, 1).data;
  if (a > 0) { tinted++; if (r > b) red++; else blue++; }
}
return {tinted, red, blue};"""


@pytest.fixture(scope="module")
def page(tmp_path_factory, model_store):
    """The demo page served on a free loopback port, and a TorchServe whose CORS admits exactly that origin."""
    [port] = free_ports(1)
    origin = f"http://127.0.0.1:{port}"
    with running(tmp_path_factory.mktemp("ts-demo"), ROOT / "config.properties", model_store,
                 {"cors_allowed_origin": origin}) as server:
        httpd, url = demo.serve(origin, server.url("inference"))
        thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        thread.start()
        try:
            yield url, server
        finally:
            httpd.shutdown()
            httpd.server_close()


def test_torchserve_admits_the_demo_origin_only(page):
    """CORS: the admitted origin, never `*`, in the answer to a browser's preflight."""
    url, server = page
    origin = url.split("/demo.html")[0]
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    admitted = requests.options(f"{server.url('inference')}/explanations/cifar10/1.0",
                                headers={"Origin": origin, **preflight}, timeout=30)
    assert admitted.headers.get("Access-Control-Allow-Origin") == origin
    other = requests.options(f"{server.url('inference')}/explanations/cifar10/1.0",
                             headers={"Origin": "http://127.0.0.1:1", **preflight}, timeout=30)
    # TorchServe names its one admitted origin to everyone; a browser on any other origin sees a name that is not
    # its own and withholds the answer from the page (the next tests watch Chromium do both).
    assert other.headers.get("Access-Control-Allow-Origin") == origin != "http://127.0.0.1:1"
    assert "POST" in admitted.headers.get("Access-Control-Allow-Methods", "")


def test_the_page_shows_cat_on_top_and_draws_the_map(page, tmp_path):
    require(browser.available(), "chromium and chromedriver are not installed (make browser-deps installs "
                                 "Debian's packages)")
    url, _ = page
    with browser.Browser() as chromium:
        chromium.open(url)
        chromium.upload("#file", CAT)
        assert chromium.wait_for(TOP_BAR) == "cat"
        assert chromium.wait_for("return document.body.dataset.answeredBy") == "1.0"
        cells = chromium.wait_for(MAP_CELLS)
        assert cells["tinted"] > 0.9 * 32 * 32 and cells["red"] > 50 and cells["blue"] > 50, cells
        bars = chromium.script("return [...document.querySelectorAll('#bars .bar')].map(b => "
                               "[b.dataset.label, b.querySelector('.value').textContent])")
        assert len(bars) == 5 and bars[0][0] == "cat" and bars[0][1].endswith("%")
        # Switching the version explains the same image again, with 2.0.
        chromium.script("document.querySelector('input[value=\"2.0\"]').click()")
        assert chromium.wait_for("return document.body.dataset.answeredBy === '2.0'")
        assert chromium.wait_for(TOP_BAR) == "cat"
        assert "answered by cifar10 2.0: cat" in chromium.script("return document.getElementById('status')"
                                                                  ".textContent")
        chromium.screenshot(tmp_path / "demo.png")
        assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if os.environ.get("DEMO_SCREENSHOT"):  # how the README's picture is made
            Path(os.environ["DEMO_SCREENSHOT"]).write_bytes((tmp_path / "demo.png").read_bytes())


def test_a_photo_larger_than_the_servers_limit_is_shrunk_by_the_page(page, tmp_path):
    """A 1200×1200 photo of the cat (upscaled, with noise so PNG cannot compress it: about 4 MB) is over the
    server's 1 MiB max_request_size; the page shrinks it before sending, and the answer is still cat."""
    require(browser.available(), "chromium and chromedriver are not installed (make browser-deps installs "
                                 "Debian's packages)")
    import numpy as np
    from PIL import Image

    big = np.asarray(Image.open(CAT).convert("RGB").resize((1200, 1200), Image.NEAREST), dtype=np.int16)
    noise = np.random.default_rng(0).integers(-6, 7, big.shape)
    photo = tmp_path / "photo.png"
    Image.fromarray(np.clip(big + noise, 0, 255).astype(np.uint8)).save(photo)
    assert photo.stat().st_size > 2**20
    url, _ = page
    with browser.Browser() as chromium:
        chromium.open(url)
        chromium.upload("#file", photo)
        assert chromium.wait_for("return document.body.dataset.answeredBy") == "1.0", \
            chromium.script("return document.getElementById('status').textContent")
        assert chromium.wait_for(TOP_BAR) == "cat"


def test_the_page_from_another_origin_is_refused_by_the_browser(page):
    """The same page served from an origin TorchServe does not admit gets no answer: CORS is what stops it."""
    require(browser.available(), "chromium and chromedriver are not installed (make browser-deps installs "
                                 "Debian's packages)")
    _, server = page
    [port] = free_ports(1)
    httpd, url = demo.serve(f"http://127.0.0.1:{port}", server.url("inference"))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        with browser.Browser() as chromium:
            chromium.open(url)
            chromium.upload("#file", CAT)
            message = chromium.wait_for("const s = document.getElementById('status'); "
                                        "return s.className === 'error' ? s.textContent : null;")
            assert "no answer from" in message and "cors_allowed_origin" in message
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_the_page_asks_again_while_the_version_explains_another_image(page):
    """Every explanation slot of the server's versions is held (as a worker explaining another request holds
    it) for 3 s: the page gets 503 Busy, says it is asking again, and shows the answer once a slot is free."""
    require(browser.available(), "chromium and chromedriver are not installed (make browser-deps installs "
                                 "Debian's packages)")
    url, server = page
    model_dirs = [manifest.parent.parent for manifest in server.run_dir.rglob("MAR-INF/MANIFEST.json")]
    assert model_dirs, f"no unpacked archive under {server.run_dir}"
    held = [Slots(directory, 1) for directory in model_dirs]  # each version's one slot, as its workers see it
    assert all(slots.take() for slots in held)
    release = threading.Timer(3, lambda: [slots.release() for slots in held])
    try:
        with browser.Browser() as chromium:
            chromium.open(url)
            release.start()
            chromium.upload("#file", CAT)
            assert "is explaining another image; asking again" in chromium.wait_for(
                "const t = document.getElementById('status').textContent; return t.includes('again') ? t : null")
            assert chromium.wait_for("return document.body.dataset.answeredBy") == "1.0"
            assert chromium.wait_for(TOP_BAR) == "cat"
    finally:
        release.cancel()
        for slots in held:
            slots.release()
