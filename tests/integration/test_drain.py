"""Retiring a version under load strands nobody: `python -m client unregister` and `scale --workers 0` wait until
nobody sends to the version and it has answered what it took (TorchServe 0.12 drops a retired version's queued
requests without an answer), and refuse, leaving it serving, while clients keep sending to it or it keeps holding
a request."""
from __future__ import annotations

import base64
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from client.api import TorchServeClient
from serving.catalog import ROOT

DIGIT = (ROOT / "examples" / "digit7.png").read_bytes()
# An explanation of 4 images (the documented maximum) on cifar10 2.0: 0.25 s in a one-worker, batch-1 version on a
# 2-core AMD EPYC (AVX-512); Integrated Gradients runs in float32 whatever numerics the worker chose. QUEUED of them
# sent at once keep that worker busy for 4 s there, far longer than the CLI's 1 s quiet window.
EXPLAIN_4 = {"data": [base64.b64encode((ROOT / "examples" / "cat.png").read_bytes()).decode()] * 4}
QUEUED = 16


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


@pytest.fixture
def slow_version(served):
    """cifar10-2.0.mar as `drainslow`: one worker, batches of one, so explanations queue one behind another."""
    management = served.url("management")
    response = served.http.post(f"{management}/models", params={
        "url": "cifar10-2.0.mar", "model_name": "drainslow", "initial_workers": 1, "batch_size": 1,
        "synchronous": "true"}, timeout=120)
    assert response.status_code == 200, response.text
    # The YAML's minWorkers (2) wins over initial_workers; with two workers the second would answer explanations
    # 503 while the first explains (one explanation slot per version), instead of queueing them.
    response = served.http.put(f"{management}/models/drainslow/2.0", params={
        "min_worker": 1, "max_worker": 1, "synchronous": "true"}, timeout=120)
    assert response.status_code == 200, response.text
    assert [len(d["workers"]) for d in served.http.get(f"{management}/models/drainslow", timeout=30).json()] == [1]
    yield served.url("inference")
    served.http.delete(f"{management}/models/drainslow", timeout=120)


def arrivals(served, model: str) -> float:
    """The arrivals the CLI's drain counts for `model` 2.0 (its one version, so also its default)."""
    client = TorchServeClient(served.url("inference"), served.url("management"), metrics_url=served.url("metrics"))
    return client.arrivals(model, "2.0")


def test_retiring_waits_for_requests_slower_than_the_quiet_window(served, slow_version, cli):
    """QUEUED explanations sent at once to a one-worker version queue behind each other while the CLI retires it
    with a 1 s quiet window: nothing new arrives after they are accepted, so a drain on arrivals alone (the old
    one) deleted the version with one explanation in the worker and the rest queued, and their clients got no
    answer; waiting for what the version holds, every one is answered 200 before it goes."""
    with ThreadPoolExecutor(QUEUED) as pool:
        sent = [pool.submit(requests.post, f"{slow_version}/explanations/drainslow", json=EXPLAIN_4, timeout=60)
                for _ in range(QUEUED)]
        deadline = time.monotonic() + 30
        while arrivals(served, "drainslow") < QUEUED:  # all accepted, so the window starts after the last
            assert time.monotonic() < deadline, "the explanations never arrived"
            time.sleep(0.05)
        retired = cli("unregister", "drainslow", "2.0", "--quiet", "1", "--drain-timeout", "120", check=False)
        answers = [future.result() for future in sent]
    assert [a.status_code for a in answers] == [200] * QUEUED, [a.text[:200] for a in answers]
    assert all(len(a.json()) == 4 and a.json()[0]["label"] == "cat" for a in answers)
    assert retired.returncode == 0, retired.stderr
    assert requests.post(f"{slow_version}/predictions/drainslow", data=DIGIT, timeout=30).status_code == 404


def test_retiring_a_version_that_holds_a_request_too_long_is_refused(served, slow_version, cli):
    """The same explanations, and a drain that may wait only 1 s: nothing new arrives, but the version still
    holds requests, so the CLI refuses to retire it, says so, and every explanation is answered."""
    with ThreadPoolExecutor(QUEUED) as pool:
        sent = [pool.submit(requests.post, f"{slow_version}/explanations/drainslow", json=EXPLAIN_4, timeout=60)
                for _ in range(QUEUED)]
        deadline = time.monotonic() + 30
        while arrivals(served, "drainslow") < QUEUED:
            assert time.monotonic() < deadline, "the explanations never arrived"
            time.sleep(0.05)
        refused = cli("unregister", "drainslow", "2.0", "--quiet", "0.25", "--drain-timeout", "1", check=False)
        answers = [future.result() for future in sent]
    assert refused.returncode == 1 and "still holds" in refused.stderr and "--force" in refused.stderr, refused.stderr
    assert [a.status_code for a in answers] == [200] * QUEUED


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
    assert refused.returncode == 1 and "still receives" in refused.stderr and "--force" in refused.stderr
    assert outcomes and set(outcomes) == {200}
    assert requests.put(drainme, data=DIGIT, timeout=30).status_code == 200
