"""Retiring a version under load strands nobody: `python -m client unregister` and `scale --workers 0` wait until
the version has gone quiet (TorchServe 0.12 drops a retired version's queued requests without an answer), and
refuse, leaving it serving, while clients keep sending to it."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from serving.catalog import ROOT

DIGIT = (ROOT / "examples" / "digit7.png").read_bytes()


@pytest.fixture
def drainme(served):
    """mnist.mar registered under its own name, so retiring it touches no other test's model."""
    management = served.url("management")
    response = served.http.post(f"{management}/models", params={"url": "mnist.mar", "model_name": "drainme",
                                                                "initial_workers": 1, "synchronous": "true"},
                                timeout=120)
    assert response.status_code == 200, response.text
    yield f"{served.url('inference')}/predictions/drainme"
    served.http.delete(f"{management}/models/drainme", timeout=120)


def burst(url: str, clients: int, seconds: float) -> list:
    """`clients` threads each sending requests back to back for `seconds`; every outcome, exceptions included."""
    def client(_):
        session, outcomes = requests.Session(), []
        ends = time.monotonic() + seconds
        while time.monotonic() < ends:
            try:
                outcomes.append(session.put(url, data=DIGIT, timeout=30).status_code)
            except requests.RequestException as exc:
                outcomes.append(type(exc).__name__)
        return outcomes

    with ThreadPoolExecutor(clients) as pool:
        return [o for outcomes in pool.map(client, range(clients)) for o in outcomes]


@pytest.mark.parametrize("command", [["unregister", "drainme", "1.0"], ["scale", "drainme", "--workers", "0"]],
                         ids=["unregister", "scale-to-0"])
def test_retiring_during_a_burst_waits_and_every_client_is_answered(drainme, cli, command):
    """16 clients send for 6 s while the CLI retires the version: it waits for the burst to end, so every
    request is answered 200 (retired at once, 11-16 of 16 such clients got no answer at all)."""
    results: list = []
    load = threading.Thread(target=lambda: results.extend(burst(drainme, clients=16, seconds=6)))
    load.start()
    retired = cli(*command, "--drain-timeout", "120")
    load.join()
    assert results and set(results) == {200}, sorted(set(map(str, results)))
    assert retired.returncode == 0, retired.stderr
    after = requests.put(drainme, data=DIGIT, timeout=30).status_code
    assert after == (404 if command[0] == "unregister" else 503)  # gone, or registered with no worker


def test_retiring_a_version_that_stays_busy_is_refused_and_it_keeps_serving(drainme, cli):
    stop = threading.Event()
    outcomes: list = []

    def client():
        session = requests.Session()
        while not stop.is_set():
            try:
                outcomes.append(session.put(drainme, data=DIGIT, timeout=30).status_code)
            except requests.RequestException as exc:
                outcomes.append(type(exc).__name__)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        refused = cli("unregister", "drainme", "1.0", "--drain-timeout", "3", check=False)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert refused.returncode == 1 and "still answers" in refused.stderr and "--force" in refused.stderr
    assert outcomes and set(outcomes) == {200}
    assert requests.put(drainme, data=DIGIT, timeout=30).status_code == 200
