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
from serving.config import free_ports
from tests import browser
from tests.conftest import require
from tests.integration.conftest import running

CAT = ROOT / "examples" / "cat.png"
ERROR = "const s = document.getElementById('status'); return s.className === 'error' ? s.textContent : null;"
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
        httpd, url = demo.serve(origin, server.url("inference"), server.url("management"))
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
    origin = url.rstrip("/")
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
        if os.environ.get("DEMO_SCREENSHOT"):  # how docs/explanations.md's picture is made
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
    httpd, url = demo.serve(f"http://127.0.0.1:{port}", server.url("inference"), server.url("management"))
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


def test_make_demo_answers_slash_with_the_page_and_versions_with_the_servers(page):
    """`/` is the page (it was a directory listing), `/versions` what the server has now; nothing else is
    listed, nothing but GET is answered, and a request addressed to another host (a DNS-rebound page) is not."""
    url, server = page
    home = requests.get(url, timeout=30)
    assert home.status_code == 200 and "<title>cifar10 classifier" in home.text
    info = requests.get(f"{url}versions", timeout=30).json()
    assert info["api"] == server.url("inference") and info["error"] is None
    assert [(v["version"], v["default"]) for v in info["versions"]] == [("1.0", True), ("2.0", False)]
    assert requests.post(url, data=b"x", timeout=30).status_code == 501
    assert requests.get(f"{url}versions", headers={"Host": "rebound.example:80"}, timeout=30).status_code == 421


def test_the_page_says_when_torchserve_does_not_answer(tmp_path):
    require(browser.available(), "chromium and chromedriver are not installed (make browser-deps installs "
                                 "Debian's packages)")
    port, dead = free_ports(2)
    httpd, url = demo.serve(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{dead}", f"http://127.0.0.1:{dead}")
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        with browser.Browser() as chromium:
            chromium.open(url)
            message = chromium.wait_for(ERROR)
            assert f"TorchServe does not answer at http://127.0.0.1:{dead}" in message
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_the_page_starts_on_the_default_and_says_when_a_version_was_retired(page):
    """The README's walkthrough as the page sees it: 2.0 promoted, then 1.0 retired while the page still offers
    it. The page starts on the default, and the request to 1.0 (whose preflight now answers 404, which a browser
    reports like a CORS refusal) says that 1.0 is gone and what the server has. On the old code the page offered
    1.0 and 2.0 whatever the server had and blamed CORS."""
    require(browser.available(), "chromium and chromedriver are not installed (make browser-deps installs "
                                 "Debian's packages)")
    from client.api import TorchServeClient

    url, server = page
    client = TorchServeClient(management_url=server.url("management"), inference_url=server.url("inference"),
                              timeout=120)
    checked = "return document.body.dataset.loaded && document.querySelector('input[name=version]:checked').value"
    try:
        with browser.Browser() as chromium:
            chromium.open(url)
            assert chromium.wait_for(checked) == "1.0"
            assert chromium.script("return document.body.dataset.versions") == "1.0,2.0"
            client.promote("cifar10", "2.0")
            chromium.open(url)
            assert chromium.wait_for(checked) == "2.0"
            chromium.script("document.querySelector('input[value=\"1.0\"]').click()")
            client.unregister("cifar10", "1.0", force=True)
            chromium.upload("#file", CAT)
            message = chromium.wait_for(ERROR)
            assert "cifar10 1.0 is not registered on the server any more" in message and "2.0" in message
            assert chromium.script("return document.body.dataset.versions") == "2.0"
    finally:
        if "1.0" not in [v["modelVersion"] for v in client.versions("cifar10")]:
            client.register("cifar10.mar", workers=2)
        client.promote("cifar10", "1.0")
