"""The worst day: a corpus of bad input, load mixed with it, a killed worker, a stop under load, a soak,
and the network and URL promises of SECURITY.md."""
from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import psutil
import pytest
import requests

from benchmarks import soak
from serving.catalog import ROOT
from serving.process import TorchServe
from tests.bad_inputs import CASES
from tests.conftest import require
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
        if "error" in body:  # a request in one of KServe's protocols gets their error form
            assert list(body) == ["error"] and case.message in body["error"], body
        else:
            assert body["code"] == case.status and body["type"], body
            assert case.message in body["message"], body
    if case.labels is not None:
        assert len(response.json()) == case.labels, response.text[:300]
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
    """No unexpected answer, and no throughput claim (a busy host answers fewer): each connection starts at a
    different one of the probes (every version's among them), so every probe was sent and judged at least once."""
    connections = len(soak.probes())
    report = soak.soak(served.url("inference"), served.url("management"), duration=8, connections=connections,
                       window=4)
    assert report["requests"] >= connections and report["unexpected"] == 0, report["examples"]
    # Every TorchServe process was sampled, java included (it is what grew in an hour of load), none replaced.
    memory = report["memory"]["processes"]
    assert memory["java"]["first_mib"] > 0 and report["pids_changed"] == []
    assert {name.split(":")[0] for name in memory if name != "java"} == {
        f"{model}/{version}" for model, versions in served.expected_models().items() for version in versions}
    assert report["memory"]["server_peak_mib"] >= sum(m["first_mib"] for m in memory.values())
    # The kernel's high-water mark is every process's peak, between samples too (within 2 MiB: the kernel syncs
    # each thread's RSS count into the process's lazily, up to 64 pages a thread, so two reads may disagree).
    assert all(m["high_water_mib"] >= m["peak_mib"] - 2 for m in memory.values()), memory
    assert report["memory"]["high_water_sum_mib"] >= report["memory"]["server_peak_mib"]


def non_loopback_addresses() -> list[str]:
    return [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family == socket.AF_INET and not a.address.startswith("127.")]


def listening(server: TorchServe) -> set[tuple[str, int]]:
    """(address, port) of every socket java and the gRPC front listen on, from the kernel: what the server binds,
    whatever its config was meant to say (java listens on IPv6 sockets: 127.0.0.1 shows as ::ffff:127.0.0.1,
    0.0.0.0 as ::)."""
    def ip(text: str) -> str:
        address = ipaddress.ip_address(text)
        return str(getattr(address, "ipv4_mapped", None) or address)

    processes = [psutil.Process(pid) for pid in (server.pid(), server.front_pid()) if pid is not None]
    return {(ip(c.laddr.ip), c.laddr.port) for process in processes for c in process.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN}


def reachable_from_elsewhere(server: TorchServe) -> list[str]:
    """The sockets of `server` another machine could reach: bound to anything but loopback, or accepting a
    connection on one of this machine's other addresses."""
    bound = listening(server)
    exposed = [f"{ip}:{port} (bound)" for ip, port in sorted(bound) if not ipaddress.ip_address(ip).is_loopback]
    for address in non_loopback_addresses():
        for _, port in sorted(bound):
            with socket.socket() as sock:
                sock.settimeout(2)
                if sock.connect_ex((address, port)) == 0:
                    exposed.append(f"{address}:{port} (accepted)")
    return exposed


def test_default_profile_is_reachable_on_loopback_only(served):
    """Every TCP socket java and the gRPC front listen on (read from the kernel, not from the config) is
    loopback: REST 8080 and 8082, the gRPC front's 7070 and TorchServe's gRPC 7071-7072 moved to free ports,
    their hosts as config.properties says them (serving/server.py keeps them), and no other address of this
    machine accepts a connection on any of them. The management API has no TCP socket at all (test_security.py)."""
    require(bool(non_loopback_addresses()), "this machine has no non-loopback IPv4 address to try")
    # inference, metrics, the gRPC front, TorchServe's gRPC inference and management
    assert len(listening(served)) == 5, listening(served)
    assert reachable_from_elsewhere(served) == []
    assert requests.get(f"{served.url('inference')}/ping", timeout=10).status_code == 200


def test_the_loopback_check_sees_an_exposed_address(tmp_path, model_store):
    """The check above can fail: the same profile with its metrics and gRPC inference addresses on 0.0.0.0 (one
    version, for speed) is reported on both."""
    require(bool(non_loopback_addresses()), "this machine has no non-loopback IPv4 address to try")
    models = {"mnist": {"1.0": {"defaultVersion": True, "marName": "mnist.mar", "minWorkers": 1, "maxWorkers": 1}}}
    overrides = {"metrics_address": "http://0.0.0.0:8082", "grpc_inference_address": "0.0.0.0",
                 "load_models": "mnist.mar", "models": json.dumps(models)}
    server = TorchServe.on_free_ports(ROOT / "config.properties", tmp_path / "run", model_store, overrides)
    server.start(timeout=240)
    try:
        exposed = reachable_from_elsewhere(server)
        for port in (urlparse(server.url("metrics")).port, int(server.properties["grpc_inference_port"]),
                     server.grpc_port()):
            assert any(entry.endswith(f":{port} (bound)") for entry in exposed), exposed
        assert len(exposed) == 3 * (1 + len(non_loopback_addresses())), exposed
    finally:
        server.stop()


class Load:
    """Client threads sending the cat in a loop; every outcome recorded, each thread's loop bounded in time."""

    def __init__(self, url: str, threads: int, timeout: float, limit_s: float = 300.0) -> None:
        self.url, self.timeout, self.limit_s = url, timeout, limit_s
        self.results: list[tuple[int | str, float]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def _run(self) -> None:
        session = requests.Session()
        ends = time.monotonic() + self.limit_s
        while not self.stop.is_set() and time.monotonic() < ends:
            sent = time.monotonic()
            try:
                status: int | str = session.put(self.url, data=CAT, timeout=self.timeout).status_code
            except requests.RequestException as exc:
                status = type(exc).__name__
            self.results.append((status, time.monotonic() - sent))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()

    def successes(self) -> int:
        return sum(status == 200 for status, _ in self.results)

    def wait_for_successes(self, count: int, bound_s: float = 120.0) -> None:
        """Block until `count` more requests have answered 200 (a condition, with a generous bound)."""
        target = self.successes() + count
        deadline = time.monotonic() + bound_s
        while self.successes() < target:
            assert time.monotonic() < deadline, f"fewer than {count} answers in {bound_s} s: {self.results[-5:]}"
            time.sleep(0.05)


def test_killed_worker_comes_back_and_only_in_flight_requests_fail(served, predict_url):
    """kill -9 one cifar10 worker under load: TorchServe restarts it; the few failures are answered 5xx."""
    victim = int(sorted(worker_pids(served)["cifar10/1.0"])[0])
    with Load(predict_url("cifar10/1.0"), threads=8, timeout=60) as load:
        load.wait_for_successes(50)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        replaced = False
        while time.monotonic() - killed_at < 120:  # a generous bound on a condition
            current = next(d for d in describe(served, "cifar10") if d["modelVersion"] == "1.0")["workers"]
            pids = {int(w["pid"]) for w in current if w.get("pid")}
            if len(current) == 2 and all(w["status"] == "READY" for w in current) and victim not in pids:
                replaced = True
                break
            time.sleep(0.2)
        ready_after = time.monotonic() - killed_at
        assert replaced, f"the killed worker {victim} was not replaced by a READY one: {current}"
        load.wait_for_successes(50)  # the model serves again after the replacement
    failures = [(status, latency) for status, latency in load.results if status != 200]
    print(f"\nkill -9 worker {victim}: {len(load.results)} requests, {len(failures)} failed "
          f"({sorted({s for s, _ in failures}, key=str)}), READY again after {ready_after:.1f} s")
    # Only requests in flight on the killed worker fail: 8 client threads hold at most 8; 16 leaves room for a
    # batch the frontend had already handed to the dying worker's socket.
    assert len(failures) <= 16, failures
    assert all(isinstance(status, int) and 500 <= status < 600 for status, _ in failures), failures
    assert victim not in {int(p) for p in worker_pids(served)["cifar10/1.0"]}


def test_stop_under_load_then_restart_serves_the_same_versions(tmp_path, model_store):
    """SIGTERM under load: java takes its workers down itself (nothing left for stop() to kill), every client
    gets an answer or a refused/reset connection, and a restart serves the same versions."""
    server = TorchServe.on_free_ports(ROOT / "config.properties", tmp_path / "run", model_store)
    server.start(timeout=240)
    try:
        url = f"{server.url('inference')}/predictions/cifar10"
        with Load(url, threads=8, timeout=60) as load:
            load.wait_for_successes(50)
            java = server.pid()
            workers = [int(w["pid"]) for d in server.describe("cifar10") for w in d["workers"]]
            assert server.stop(timeout=60)
        assert not psutil.pid_exists(java) or psutil.Process(java).status() == psutil.STATUS_ZOMBIE
        assert server.orphans_killed == 0, "workers outlived java: stop() had to kill them"
        assert not [pid for pid in workers if psutil.pid_exists(pid) and
                    psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        # While it goes down a client sees an answer (200, or a 5xx for work cut short), or a refused or dropped
        # connection; never a 4xx or a hang (a ReadTimeout).
        unexpected = [(status, latency) for status, latency in load.results
                      if not (status == 200 or (isinstance(status, int) and 500 <= status < 600)
                              or status in ("ConnectionError", "ChunkedEncodingError"))]
        assert unexpected == [], unexpected
        server.start(timeout=240)
        expected = {(d["modelName"], d["modelVersion"]) for model in ("cifar10", "mnist")
                    for d in describe(server, model)}
        assert expected == {("cifar10", "1.0"), ("cifar10", "2.0"), ("mnist", "1.0")}
        for path in ("cifar10", "cifar10/1.0", "cifar10/2.0"):
            response = requests.put(f"{server.url('inference')}/predictions/{path}", data=CAT, timeout=30)
            assert response.status_code == 200 and next(iter(response.json())) == "cat"
    finally:
        server.stop()
