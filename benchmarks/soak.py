"""A bounded soak: good and bad requests at a fixed concurrency, checked one by one.

    python -m benchmarks.soak [--duration 180] [--connections 32] [--inference-url ...] [--management-url ...]

Each good request must answer 200 with the expected top-1 label, each bad one its 4xx; anything else
(another status, a wrong label, a timeout, a refused connection) is an unexpected result. Prints requests/s,
p50/p99 per window, worker RSS at the start and the end, and exits 1 on any unexpected result.
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

import psutil
import requests

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


def worker_rss(management_url: str) -> dict[str, float]:
    """MiB of resident memory per worker pid, from the describe API's pids."""
    rss = {}
    models = requests.get(f"{management_url}/models", timeout=10).json()["models"]
    for model in models:
        for version in requests.get(f"{management_url}/models/{model['modelName']}/all", timeout=10).json():
            for w in version["workers"]:
                try:
                    rss[f"{model['modelName']}/{version['modelVersion']}:{w['pid']}"] = \
                        psutil.Process(int(w["pid"])).memory_info().rss / 2**20
                except (psutil.NoSuchProcess, ValueError):
                    pass
    return rss


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def soak(inference_url: str, management_url: str, duration: float, connections: int,
         window: float = 60.0) -> dict:
    plan = probes()
    rss_before = worker_rss(management_url)
    tally = Tally()
    start = time.monotonic()
    threads = [threading.Thread(target=worker, args=(inference_url, plan, i, start + duration, start, tally))
               for i in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    rss_after = worker_rss(management_url)
    windows = []
    for w in range(int(-(-elapsed // window))):
        lat = [latency for at, latency in tally.latencies if w * window <= at < (w + 1) * window]
        if lat:
            windows.append({"window": w + 1, "requests": len(lat), "p50_ms": round(percentile(lat, 0.5) * 1000, 1),
                            "p99_ms": round(percentile(lat, 0.99) * 1000, 1)})
    growth = {k: round(rss_after[k] - rss_before[k], 1) for k in rss_before if k in rss_after}
    return {"requests": tally.count, "seconds": round(elapsed, 1),
            "requests_per_second": round(tally.count / elapsed, 1),
            "unexpected": len(tally.unexpected), "examples": tally.unexpected[:5], "windows": windows,
            "rss_mib_before": {k: round(v, 1) for k, v in rss_before.items()}, "rss_growth_mib": growth,
            "median_latency_ms": round(statistics.median(latency for _, latency in tally.latencies) * 1000, 1)
            if tally.latencies else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inference-url", default="http://127.0.0.1:8080")
    p.add_argument("--management-url", default="http://127.0.0.1:8081")
    p.add_argument("--duration", type=float, default=180.0)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--window", type=float, default=60.0, help="seconds per p50/p99 line")
    args = p.parse_args(argv)
    report = soak(args.inference_url, args.management_url, args.duration, args.connections, args.window)
    print(f"{report['requests']} requests in {report['seconds']} s ({report['requests_per_second']} req/s) "
          f"at {args.connections} connections; unexpected results: {report['unexpected']}")
    for w in report["windows"]:
        print(f"  window {w['window']}: {w['requests']} requests, p50 {w['p50_ms']} ms, p99 {w['p99_ms']} ms")
    for name, growth in report["rss_growth_mib"].items():
        print(f"  worker {name}: RSS {report['rss_mib_before'][name]} MiB, growth {growth:+} MiB")
    for example in report["examples"]:
        print(f"  unexpected: {example}")
    return 1 if report["unexpected"] else 0


if __name__ == "__main__":
    sys.exit(main())
