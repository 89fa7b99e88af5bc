"""No client can kill a worker or fail another client's request (SECURITY.md): expensive-but-valid requests
inside every limit, and per-request headers that TorchServe's base handler would apply to a whole batch."""
from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

from serving.catalog import ROOT
from tests.images import b64
from tests.integration.test_reliability import worker_pids

CAT = (ROOT / "examples" / "cat.png").read_bytes()


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def expensive() -> list[tuple[str, dict, tuple[int, ...]]]:
    """(name, requests.post kwargs, accepted statuses): each costs seconds of CPU without the budgets. 200 or
    503 (its batch's budget spent: retry) for requests inside the per-request budget, 413 for those over it."""
    side = 3464  # 3464² = 11,999,296 pixels: just inside max_request_pixels (12,000,000)
    grey = Image.new("RGB", (side, side), (128, 128, 128))
    gradient = Image.fromarray(np.tile((np.arange(side) % 256).astype(np.uint8)[None, :, None], (side, 1, 3)))
    big_grey = encode(Image.new("RGB", (4096, 4096), (128, 128, 128)), "PNG")
    tile = encode(Image.new("RGB", (433, 433), (90, 90, 90)), "PNG")  # 64 × 433² = 11,999,296
    big_tile = encode(Image.new("RGB", (1024, 1024), (90, 90, 90)), "PNG")
    inside, over = (200, 503), (413,)
    return [
        # The measured bomb had 64 (5 MB); 12 is what fits the 1 MiB max_request_size as base64: 201 M pixels.
        ("12 × 4096² PNG in one JSON body", {"json": {"data": [b64(big_grey)] * 12}}, over),
        ("one 4096² PNG: over the request budget", {"data": big_grey}, over),
        ("multipart 64 × 1024² PNG", {"files": {f"f{i}": big_tile for i in range(64)}}, over),
        ("RGBA PNG 3464²", {"data": encode(grey.convert("RGBA"), "PNG")}, inside),
        ("16-bit PNG 3464²", {"data": encode(Image.new("I;16", (side, side), 30000), "PNG")}, inside),
        ("WebP lossy 3464²", {"data": encode(gradient, "WEBP", quality=80)}, inside),
        ("GIF 3464²", {"data": encode(grey.convert("P"), "GIF")}, inside),
        ("TIFF float deflate 3464²", {"data": encode(Image.new("F", (side, side), 0.5), "TIFF",
                                                     compression="tiff_adobe_deflate")}, inside),
        ("progressive JPEG 4096²", {"data": encode(Image.fromarray(np.tile(
            (np.arange(4096) % 256).astype(np.uint8)[None, :, None], (4096, 1, 3))), "JPEG", quality=95,
            progressive=True)}, inside),
        ("multipart 64 × 433² PNG", {"files": {f"f{i}": tile for i in range(64)}}, inside),
        ("base64 list 64 × 433² PNG", {"json": {"data": [b64(tile)] * 64}}, inside),
    ]


def test_expensive_requests_at_once_with_good_ones_kill_nothing(served, predict_url, expensive):
    """16 threads: every expensive case twice among 64 good requests. No 5xx but a 503 with Retry-After, no
    worker restarted, and every good request answered 200. A batch that outran the frontend's response timeout
    would show as exactly those failures (a 5xx for its requests, a restarted worker), so they are what is checked:
    how long an answer takes on a loaded 2-core host is not this test's claim."""
    url = predict_url("cifar10")
    pids = worker_pids(served)
    jobs = [("bad", case) for case in expensive] * 2 + [("good", None)] * 64
    jobs = [jobs[(i * 29) % len(jobs)] for i in range(len(jobs))]

    def send(job):
        kind, case = job
        response = (requests.put(url, data=CAT, timeout=120) if kind == "good"
                    else requests.post(url, timeout=120, **case[1]))
        return kind, case, response

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(send, jobs))
    served_expensive = 0
    for kind, case, response in results:
        if kind == "good":
            assert response.status_code == 200 and next(iter(response.json())) == "cat", response.text[:200]
            continue
        name, _, accepted = case
        assert response.status_code in accepted, (name, response.status_code, response.text[:300])
        body = response.json()
        if response.status_code == 503:
            assert body["type"] == "Busy" and response.headers.get("Retry-After") == "1", (name, body)
        elif response.status_code == 413:
            assert body["type"] in ("RequestTooExpensive", "ImageTooLarge"), (name, body)
        else:
            served_expensive += 1
    assert served_expensive > 0  # the budgets refuse what is over them, not everything expensive
    assert worker_pids(served) == pids  # no worker died or was restarted
    assert requests.put(url, data=CAT, timeout=30).status_code == 200


def test_explanation_and_describe_requests_never_fail_other_clients(served):
    """2 clients on /explanations and 1 sending `describe: True` beside 13 predicting: each gets its own kind of
    answer (explanations, the description, predictions), all 200, in shared batches. The version explains one
    request at a time (`explain_workers: 1`): an explanation sent meanwhile answers 503 Busy with Retry-After, and
    its client sends it again after that wait."""
    inference = served.url("inference")

    def explain(session: requests.Session) -> requests.Response:
        while True:
            response = session.post(f"{inference}/explanations/cifar10", data=CAT, timeout=60)
            if response.status_code != 503:
                return response
            assert response.json()["type"] == "Busy", response.text
            time.sleep(float(response.headers["Retry-After"]))

    def client(kind: str) -> list[requests.Response]:
        session = requests.Session()
        if kind == "explain":
            return [explain(session) for _ in range(20)]
        headers = {"describe": "True"} if kind == "describe" else {}
        return [session.put(f"{inference}/predictions/cifar10", data=CAT, headers=headers, timeout=60)
                for _ in range(20)]

    kinds = ["explain"] * 2 + ["describe"] + ["predict"] * 13
    with ThreadPoolExecutor(len(kinds)) as pool:
        answers = dict(enumerate(pool.map(client, kinds)))
    batched = 0
    for i, kind in enumerate(kinds):
        for response in answers[i]:
            batched = max(batched, int(response.headers.get("X-Batch-Size", 1)))
            if kind == "explain":
                assert response.status_code == 200 and response.json()["label"] == "cat", response.text[:200]
                assert len(response.json()["attributions"]) == 32
            elif kind == "describe":
                assert response.status_code == 200 and response.json()["labels"][3] == "cat"
            else:
                assert response.status_code == 200 and next(iter(response.json())) == "cat", response.text[:200]
    assert batched > 1  # the requests did share batches


def test_the_management_api_describes_the_handler(served):
    response = served.http.get(f"{served.url('management')}/models/cifar10/2.0", params={"customized": "true"},
                               timeout=30)
    assert response.status_code == 200, response.text
    metadata = response.json()[0]["customizedMetadata"]
    assert metadata["version"] == "2.0" and metadata["limits"]["max_request_pixels"] == 12_000_000
