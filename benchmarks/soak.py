"""A bounded soak: good and bad requests at a fixed concurrency, checked one by one, and every TorchServe process's
memory sampled while it runs.

    python -m benchmarks.soak [--duration 180] [--connections 32] [--sample-every 60] [--max-slope 10]
                              [--inference-url ...] [--management-url ...]

Each good request must answer 200 with the expected top-1 label, each bad one its 4xx; anything else
(another status, a wrong label, a timeout, a refused connection) is an unexpected result. Every `--sample-every`
seconds the RSS of java (the process listening on the inference port) and of every worker (the describe API's
pids) is read; each process's growth is the least-squares slope of its samples once warm (after the first
quarter of the run, at most 5 minutes), in MiB per hour, its peak the largest sample, and its high-water mark
the kernel's (VmHWM: the peak between samples too); the server's peak is the largest sum over one sample. The
probes reach every shipped version: cifar10 1.0 (the default), 2.0 and mnist. Prints requests/s, p50/p99 per
window, those figures and whether any worker pid changed, and exits 1 on any unexpected result, a changed pid,
or a slope over `--max-slope` when given.
"""
from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import psutil
import requests

from client.api import DEFAULT_MANAGEMENT_URL
from serving.transport import base_url, session

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


@dataclass(frozen=True)
class Probe:
    """One request the soak repeats: where it goes, what it sends, what must come back."""

    path: str
    kwargs: dict
    status: int
    top1: str | None = None


def probes() -> list[Probe]:
    cat, horse, digit = ((EXAMPLES / n).read_bytes() for n in ("cat.png", "horse.png", "digit7.png"))
    return [
        Probe("cifar10", {"data": cat}, 200, "cat"),
        Probe("cifar10", {"data": horse, "headers": {"Content-Type": "image/png"}}, 200, "horse"),
        Probe("cifar10/2.0", {"data": cat}, 200, "cat"),
        Probe("cifar10/2.0", {"data": horse, "headers": {"Content-Type": "image/png"}}, 200, "horse"),
        Probe("cifar10", {"data": json.dumps({"data": base64.b64encode(cat).decode()}),
                          "headers": {"Content-Type": "application/json"}}, 200, "cat"),
        Probe("mnist", {"data": digit}, 200, "7"),
        Probe("cifar10", {"data": b""}, 400),
        Probe("cifar10", {"data": b"\x89PNG\r\n\x1a\nbroken"}, 400),
        Probe("cifar10", {"data": cat, "headers": {"X-TopK": "0"}}, 400),
        Probe("mnist", {"data": json.dumps({"data": "!!"}), "headers": {"Content-Type": "application/json"}}, 400),
    ]


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (seconds since start, latency)
    unexpected: list[str] = field(default_factory=list)
    count: int = 0


def worker(url: str, plan: list[Probe], offset: int, stop_at: float, start: float, tally: Tally) -> None:
    session = requests.Session()
    i = offset
    while time.monotonic() < stop_at:
        probe = plan[i % len(plan)]
        i += 1
        sent = time.monotonic()
        try:
            response = session.put(f"{url}/predictions/{probe.path}", timeout=30, **probe.kwargs)
            problem = None
            if response.status_code != probe.status:
                problem = f"{probe.path}: expected {probe.status}, got {response.status_code}: {response.text[:200]}"
            elif probe.top1 is not None and next(iter(response.json())) != probe.top1:
                problem = f"{probe.path}: expected top-1 {probe.top1}, got {response.text[:200]}"
        except requests.RequestException as exc:
            problem = f"{probe.path}: {type(exc).__name__}: {exc}"
        done = time.monotonic()
        with tally.lock:
            tally.count += 1
            tally.latencies.append((done - start, done - sent))
            if problem:
                tally.unexpected.append(problem)


def java_pid(inference_url: str) -> int | None:
    """The frontend: the process listening on the inference port (None where this user may not see it)."""
    port = urlparse(inference_url).port
    for connection in psutil.net_connections(kind="tcp"):
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port and connection.pid:
            return connection.pid
    return None


def server_processes(inference_url: str, management_url: str) -> dict[str, int]:
    """name → pid for java and every worker (`model/version:pid`, from the describe API)."""
    found = {}
    java = java_pid(inference_url)
    if java is not None:
        found["java"] = java
    management, http = base_url(management_url), session()
    models = http.get(f"{management}/models", timeout=10).json()["models"]
    for model in models:
        for version in http.get(f"{management}/models/{model['modelName']}/all", timeout=10).json():
            for w in version["workers"]:
                if str(w.get("pid", "")).isdigit():
                    found[f"{model['modelName']}/{version['modelVersion']}:{w['pid']}"] = int(w["pid"])
    return found


def rss_of(processes: dict[str, int]) -> dict[str, float]:
    """MiB of resident memory per process that is still alive."""
    rss = {}
    for name, pid in processes.items():
        try:
            rss[name] = psutil.Process(pid).memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            pass
    return rss


def high_water_mib(processes: dict[str, int]) -> dict[str, float]:
    """MiB of each live process's peak resident memory since it started (the kernel's VmHWM): the peak between
    samples too, and what a container's memory limit must hold."""
    peaks = {}
    for name, pid in processes.items():
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        kib = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), None)
        if kib is not None:  # a zombie has no memory left to report
            peaks[name] = kib / 1024
    return peaks


def slope_mib_per_hour(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MiB) samples, in MiB per hour (0 with fewer than two)."""
    if len(samples) < 2:
        return 0.0
    mean_t = statistics.fmean(t for t, _ in samples)
    mean_m = statistics.fmean(m for _, m in samples)
    spread = sum((t - mean_t) ** 2 for t, _ in samples)
    return 3600 * sum((t - mean_t) * (m - mean_m) for t, m in samples) / spread if spread else 0.0


def memory_report(samples: list[tuple[float, dict[str, float]]], warm_after: float,
                  high_water: dict[str, float] | None = None) -> dict:
    """Per process: RSS at the first and last sample, peak, slope once warm and the kernel's high-water mark;
    the server's peak total over one sample, and the sum of the high-water marks (an upper bound of it)."""
    high_water = high_water or {}
    names = sorted({name for _, rss in samples for name in rss})
    report = {}
    for name in names:
        series = [(t, rss[name]) for t, rss in samples if name in rss]
        warm = [(t, m) for t, m in series if t >= warm_after]
        report[name] = {"first_mib": round(series[0][1], 1), "last_mib": round(series[-1][1], 1),
                        "peak_mib": round(max(m for _, m in series), 1),
                        "slope_mib_per_h": round(slope_mib_per_hour(warm), 1), "warm_samples": len(warm),
                        "high_water_mib": round(high_water[name], 1) if name in high_water else None}
    total = max((sum(rss.values()) for _, rss in samples), default=0.0)
    return {"processes": report, "server_peak_mib": round(total, 1),
            "high_water_sum_mib": round(sum(high_water.values()), 1)}


def sample_memory(processes: dict[str, int], every: float, stop: threading.Event, start: float,
                  samples: list[tuple[float, dict[str, float]]]) -> None:
    while True:
        samples.append((time.monotonic() - start, rss_of(processes)))
        if stop.wait(every):
            samples.append((time.monotonic() - start, rss_of(processes)))
            return


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def soak(inference_url: str, management_url: str, duration: float, connections: int,
         window: float = 60.0, sample_every: float | None = None) -> dict:
    plan = probes()
    processes = server_processes(inference_url, management_url)
    every = sample_every or max(1.0, min(60.0, duration / 10))
    tally = Tally()
    samples: list[tuple[float, dict[str, float]]] = []
    stop = threading.Event()
    start = time.monotonic()
    sampler = threading.Thread(target=sample_memory, args=(processes, every, stop, start, samples), daemon=True)
    sampler.start()
    threads = [threading.Thread(target=worker, args=(inference_url, plan, i, start + duration, start, tally))
               for i in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    stop.set()
    sampler.join()
    high_water = high_water_mib(processes)
    after = server_processes(inference_url, management_url)
    windows = []
    for w in range(int(-(-elapsed // window))):
        lat = [latency for at, latency in tally.latencies if w * window <= at < (w + 1) * window]
        if lat:
            windows.append({"window": w + 1, "requests": len(lat), "p50_ms": round(percentile(lat, 0.5) * 1000, 1),
                            "p99_ms": round(percentile(lat, 0.99) * 1000, 1)})
    return {"requests": tally.count, "seconds": round(elapsed, 1),
            "requests_per_second": round(tally.count / elapsed, 1),
            "unexpected": len(tally.unexpected), "examples": tally.unexpected[:5], "windows": windows,
            "memory": memory_report(samples, warm_after=min(300.0, elapsed / 4), high_water=high_water),
            "sample_every_s": every,
            "pids_changed": sorted(set(processes.items()) ^ set(after.items())),
            "median_latency_ms": round(statistics.median(latency for _, latency in tally.latencies) * 1000, 1)
            if tally.latencies else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inference-url", default="http://127.0.0.1:8080")
    p.add_argument("--management-url", default=DEFAULT_MANAGEMENT_URL,
                   help="http(s)://host:port, or unix:PATH (default: make serve's socket, logs/management.sock)")
    p.add_argument("--duration", type=float, default=180.0)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--window", type=float, default=60.0, help="seconds per p50/p99 line")
    p.add_argument("--sample-every", type=float, default=None,
                   help="seconds between memory samples (default: a tenth of the run, at most 60)")
    p.add_argument("--max-slope", type=float, default=None, metavar="MIB_PER_H",
                   help="fail when any process grows faster than this once warm")
    p.add_argument("--json", type=Path, default=None, help="also write the whole report here")
    args = p.parse_args(argv)
    report = soak(args.inference_url, args.management_url, args.duration, args.connections, args.window,
                  args.sample_every)
    print(f"{report['requests']} requests in {report['seconds']} s ({report['requests_per_second']} req/s) "
          f"at {args.connections} connections; unexpected results: {report['unexpected']}")
    for w in report["windows"]:
        print(f"  window {w['window']}: {w['requests']} requests, p50 {w['p50_ms']} ms, p99 {w['p99_ms']} ms")
    memory = report["memory"]
    for name, m in memory["processes"].items():
        print(f"  {name}: RSS {m['first_mib']} -> {m['last_mib']} MiB, peak {m['peak_mib']} MiB "
              f"(high-water {m['high_water_mib']} MiB), {m['slope_mib_per_h']:+} MiB/h once warm "
              f"({m['warm_samples']} samples)")
    print(f"  server peak: {memory['server_peak_mib']} MiB (sum of every process at one sample; "
          f"sum of high-water marks {memory['high_water_sum_mib']} MiB); "
          f"pids changed: {report['pids_changed'] or 'none'}")
    for example in report["examples"]:
        print(f"  unexpected: {example}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    too_fast = [name for name, m in memory["processes"].items()
                if args.max_slope is not None and m["slope_mib_per_h"] > args.max_slope]
    for name in too_fast:
        print(f"  {name} grows faster than {args.max_slope} MiB/h")
    return 1 if report["unexpected"] or report["pids_changed"] or too_fast else 0


if __name__ == "__main__":
    sys.exit(main())
