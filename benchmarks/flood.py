"""A flood of the largest bodies a config admits, sent to a TorchServe of its own: what the frontend's memory
bounds do when more arrives at once than they hold.

    python -m benchmarks.flood [--config config.properties] [--model-store model_store]
                               [--connections 16] [--requests 96] [--mib M | --megapixels 12]

Starts TorchServe from `--config` on free ports (the KServe layout's `build/kserve/config/config.properties` with
`--model-store build/kserve/model-store` is the pod's own TorchServe), then sends `--requests` PNGs of random
pixels (incompressible, so each is `--mib` large and must be decoded in full; by default just under the
config's max_request_size, the largest body it admits), or with `--megapixels` smooth
PNGs of that many pixels (small bodies, the most decoding the pixel budgets admit: 12 is the per-request budget,
two fill a batch's), from `--connections` threads, round-robin to every version it serves. Prints the answers
by status, java's and every worker's high-water mark (VmHWM) before and after, and whether java is alive and
any pid changed; then sends 50 ordinary requests per version. Exits 1 when java died, a pid changed or an
ordinary request afterwards failed: a flood may be refused (413, 507, a reset connection), but the server must
come out of it whole.
"""
from __future__ import annotations

import argparse
import io
import itertools
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import requests
from PIL import Image

from benchmarks import soak
from serving.config import read_properties
from serving.process import TorchServe

ROOT = Path(__file__).resolve().parent.parent


def noise_png(mib: float) -> bytes:
    """A PNG of random pixels `mib` MiB large (PNG cannot compress noise: 3 bytes a pixel)."""
    width = 1024
    height = max(8, int(mib * 2**20 / (3 * width)))
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG", compress_level=1)
    return out.getvalue()


def smooth_png(megapixels: float) -> bytes:
    """A 4:3 gradient PNG of `megapixels` (it compresses to tens of kB, but decodes to 3 bytes a pixel)."""
    height = int((megapixels * 1e6 * 3 / 4) ** 0.5)
    y, x = np.mgrid[0:height, 0:height * 4 // 3]
    pixels = np.stack([x * 255 // x.max(), y * 255 // y.max(), (x + y) % 256], -1).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def flood(url: str, paths: list[str], body: bytes, connections: int, total: int) -> Counter:
    """`total` PUTs of `body` from `connections` threads, round-robin over `paths`: status (or error) → count."""
    answers: Counter = Counter()
    numbers = itertools.count()
    lock = threading.Lock()

    def send() -> None:
        session = requests.Session()
        while (i := next(numbers)) < total:
            try:
                answer = str(session.put(f"{url}/predictions/{paths[i % len(paths)]}", data=body,
                                         timeout=120).status_code)
            except requests.RequestException as exc:
                answer = type(exc).__name__
            with lock:
                answers[answer] += 1

    threads = [threading.Thread(target=send) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=ROOT / "config.properties")
    p.add_argument("--model-store", type=Path, default=ROOT / "model_store")
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--requests", type=int, default=96)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (e.g. vmargs=...) to see what another bound does")
    p.add_argument("--run-dir", type=Path, default=None, help="keep the server's logs here (default: a temporary "
                   "folder, removed afterwards)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--mib", type=float, default=None,
                      help="noise PNGs this large (default: 95%% of the config's max_request_size)")
    size.add_argument("--megapixels", type=float, default=None, help="smooth PNGs of this many pixels instead")
    args = p.parse_args(argv)
    overrides = dict(item.split("=", 1) for item in args.set)
    limit = int({**read_properties(args.config), **overrides}.get("max_request_size", 6553500))  # TorchServe's default
    body = smooth_png(args.megapixels) if args.megapixels else noise_png(args.mib or 0.95 * limit / 2**20)
    print(f"{len(body):,}-byte PNG bodies; the config's max_request_size is {limit:,} bytes")
    with tempfile.TemporaryDirectory(prefix="flood-") as scratch:
        server = TorchServe.on_free_ports(args.config, args.run_dir or Path(scratch), args.model_store, overrides)
        server.start(timeout=300)
        try:
            url, management = server.url("inference"), server.url("management")
            processes = soak.server_processes(url, management)
            paths = sorted({name.split(":")[0] for name in processes if name != "java"})
            before = soak.high_water_mib(processes)
            started = time.monotonic()
            answers = flood(url, paths, body, args.connections, args.requests)
            print(f"{args.requests} bodies from {args.connections} connections to {', '.join(paths)} in "
                  f"{time.monotonic() - started:.1f} s: {dict(sorted(answers.items()))}")
            after = soak.high_water_mib(processes)
            for name in processes:
                print(f"  {name}: high-water {before.get(name, 0):.0f} -> {after.get(name, 0):.0f} MiB")
            java_alive = psutil.pid_exists(processes["java"]) and server.pid() == processes["java"]
            changed = java_alive and soak.server_processes(url, management) != processes
            print(f"  java alive: {java_alive}; pids changed: {changed}")
            ordinary = Counter()
            if java_alive:
                probe = (ROOT / "examples" / "cat.png").read_bytes()
                for path in paths:
                    for _ in range(50):
                        try:
                            ordinary[str(requests.put(f"{url}/predictions/{path}", data=probe,
                                                      timeout=30).status_code)] += 1
                        except requests.RequestException as exc:
                            ordinary[type(exc).__name__] += 1
                print(f"  then 50 ordinary requests per version: {dict(ordinary)}")
        finally:
            server.stop()
    return 0 if java_alive and not changed and set(ordinary) == {"200"} else 1


if __name__ == "__main__":
    sys.exit(main())
