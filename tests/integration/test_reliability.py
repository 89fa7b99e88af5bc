"""The worst day: a corpus of bad input, load mixed with it, a killed worker, a stop under load, a soak,
and the network and URL promises of SECURITY.md."""
from __future__ import annotations

import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests

from benchmarks import soak
from serving.catalog import ROOT
from serving.server import TorchServe
from tests.bad_inputs import CASES
from tests.integration.conftest import describe

CAT = (ROOT / "examples" / "cat.png").read_bytes()


def worker_pids(server: TorchServe) -> dict[str, set[str]]:
    return {f"{d['modelName']}/{d['modelVersion']}": {w["pid"] for w in d["workers"]}
            for model in ("cifar10", "mnist") for d in describe(server, model)}


def send(url: str, case) -> requests.Response:
    return requests.post(url, timeout=60, **case.request_kwargs())


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_input_corpus(served, predict_url, case):
    pids = worker_pids(served)
    response = send(predict_url(), case)
    assert response.status_code == case.status, response.text[:300]
    if case.status >= 400 and case.message:
        body = response.json()
        assert body["code"] == case.status and body["type"], body
        assert case.message in body["message"], body
    assert worker_pids(served) == pids
    assert requests.put(predict_url(), data=CAT, timeout=30).status_code == 200


def test_bad_and_good_requests_mixed_under_concurrency(served, predict_url):
    expected_top1 = "cat"
    pids = worker_pids(served)
    jobs = [("bad", case) for case in CASES] + [("good", None)] * 96
    jobs = [jobs[(i * 31) % len(jobs)] for i in range(len(jobs))]

    def run(job):
        kind, case = job
        if kind == "good":
            return kind, None, requests.put(predict_url(), data=CAT, timeout=60)
        return kind, case, send(predict_url(), case)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(run, jobs))
    for kind, case, response in results:
        if kind == "good":
            assert response.status_code == 200 and next(iter(response.json())) == expected_top1
        else:
            assert response.status_code == case.status, (case.name, response.text[:200])
    assert worker_pids(served) == pids


def test_soak_smoke_has_no_unexpected_results(served):
    report = soak.soak(served.url("inference"), served.url("management"), duration=8, connections=8, window=4)
    assert report["requests"] > 50 and report["unexpected"] == 0, report["examples"]


def non_loopback_addresses() -> list[str]:
    return [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family == socket.AF_INET and not a.address.startswith("127.")]


def test_default_profile_is_reachable_on_loopback_only(served):
    addresses = non_loopback_addresses()
    if not addresses:
        pytest.skip("this machine has no non-loopback IPv4 address to try")
    ports = [port for _, port in served.ports()]
    for address in addresses:
        for port in ports:
            with socket.socket() as sock:
                sock.settimeout(2)
                assert sock.connect_ex((address, port)) != 0, f"{address}:{port} accepted a connection"
    assert requests.get(f"{served.url('inference')}/ping", timeout=10).status_code == 200


def test_allowed_urls_refuses_archives_from_the_network(served):
    response = requests.post(f"{served.url('management')}/models",
                             params={"url": "http://127.0.0.1:9/evil.mar"}, timeout=30)
    assert response.status_code == 404 and "does not match any allowed URL" in response.json()["message"]


def test_killed_worker_comes_back_and_only_in_flight_requests_fail(served, predict_url):
    """kill -9 one cifar10 worker under load: TorchServe restarts it; failures are few, fast and 5xx."""
    victim = int(sorted(worker_pids(served)["cifar10/1.0"])[0])
    results: list[tuple[int | str, float]] = []
    stop = threading.Event()

    def load():
        session = requests.Session()
        while not stop.is_set():
            sent = time.monotonic()
            try:
                status: int | str = session.put(predict_url("cifar10/1.0"), data=CAT, timeout=30).status_code
            except requests.RequestException as exc:
                status = type(exc).__name__
            results.append((status, time.monotonic() - sent))

    threads = [threading.Thread(target=load) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(2)
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    ready_after = None
    while time.monotonic() - killed_at < 90:
        workers = describe(served, "cifar10")
        current = next(d for d in workers if d["modelVersion"] == "1.0")["workers"]
        if len(current) == 2 and all(w["status"] == "READY" for w in current) and \
                str(victim) not in {w["pid"] for w in current}:
            ready_after = time.monotonic() - killed_at
            break
        time.sleep(0.2)
    time.sleep(1)
    stop.set()
    for t in threads:
        t.join()
    failures = [(status, latency) for status, latency in results if status != 200]
    print(f"\nkill -9 worker {victim}: {len(results)} requests, {len(failures)} failed "
          f"({sorted({s for s, _ in failures}, key=str)}), READY again after {ready_after} s")
    assert ready_after is not None and ready_after < 60
    assert len(failures) <= 16, failures  # at most the batches in flight on the killed worker
    assert all(isinstance(status, int) and 500 <= status < 600 and latency < 30 for status, latency in failures)
    assert requests.put(predict_url(), data=CAT, timeout=30).status_code == 200


def test_stop_under_load_then_restart_serves_the_same_versions(tmp_path, model_store):
    server = TorchServe.on_free_ports(ROOT / "config.properties", tmp_path / "run", model_store)
    server.start(timeout=240)
    try:
        url = f"{server.url('inference')}/predictions/cifar10"
        stop = threading.Event()
        errors: list[str] = []

        def load():
            while not stop.is_set():
                try:
                    requests.put(url, data=CAT, timeout=10)
                except requests.RequestException:
                    pass  # refused or reset while the server goes down: expected

        threads = [threading.Thread(target=load) for _ in range(8)]
        for t in threads:
            t.start()
        time.sleep(2)
        java = server.pid()
        started = time.monotonic()
        assert server.stop(timeout=60)
        stopped_in = time.monotonic() - started
        stop.set()
        for t in threads:
            t.join()
        assert not psutil.pid_exists(java) or psutil.Process(java).status() == psutil.STATUS_ZOMBIE
        leftovers = [p for p in psutil.process_iter(["cmdline"])
                     if any(str(server.tmp_dir) in part for part in p.info["cmdline"] or [])]
        assert leftovers == [] and not errors
        print(f"\nstop under load took {stopped_in:.1f} s")
        server.start(timeout=240)
        expected = {(d["modelName"], d["modelVersion"]) for model in ("cifar10", "mnist")
                    for d in describe(server, model)}
        assert expected == {("cifar10", "1.0"), ("cifar10", "2.0"), ("mnist", "1.0")}
        for path in ("cifar10", "cifar10/1.0", "cifar10/2.0"):
            response = requests.put(f"{server.url('inference')}/predictions/{path}", data=CAT, timeout=30)
            assert response.status_code == 200 and next(iter(response.json())) == "cat"
    finally:
        server.stop()
