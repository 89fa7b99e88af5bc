"""`make bench`: the served path against its in-process ceiling and three peer servers, in one run.

    python -m benchmarks.run [--duration 10] [--connections 1 8 32 64] [--smoke] [--out benchmarks/results]

1. in-process ceiling: the real handler's full work per image (decode PNG, preprocess, forward, top-k, JSON)
   called in a loop at batch 1, 8 and 32 with the workers' thread settings;
2. TorchServe as `make serve` configures it (config.properties on free ports), loaded by wrk posting real
   32×32 PNGs; and the same archive registered with batchSize 1 (batching off); and cifar10 2.0;
3. peers with the same model, weights and preprocessing: Flask's threaded server, Flask under gunicorn with one
   sync worker per core, LitServe with batching;
4. cold start (start until the first 200), archive build time, worker RSS.
Writes `<out>/bench-<date>.{md,json,png}` and prints the table. `--smoke` runs every part for about a second.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import requests
import torch

from client.api import TorchServeClient, numerics_choice
from models import numerics
from models.inference import TTA_LEVELS
from serving import archive
from serving.catalog import ROOT, SHIPPED, ModelVersion
from serving.config import free_ports
from serving.inprocess import InProcessHandler, unpack
from serving.process import TorchServe

LUA = Path(__file__).with_name("post_png.lua")
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def bench_images(dest: Path, count: int = 64) -> list[Path]:
    """Real validation images when ../shared/data is present, generated noise otherwise, as 32×32 PNGs."""
    from PIL import Image

    npz = ROOT.parent / "shared" / "data" / "cifar10_train.npz"
    if npz.exists():
        from models import data

        images, labels = data.load("cifar10", "npz", npz)
        pixels = data.split(images, labels, 5000).val_images[:count].permute(0, 2, 3, 1).numpy()
    else:
        pixels = np.random.default_rng(0).integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, p in enumerate(pixels):
        Image.fromarray(p).save(dest / f"{i:03d}.png")
        paths.append(dest / f"{i:03d}.png")
    (dest / "list.txt").write_text("\n".join(map(str, paths)) + "\n")
    return paths


def images_per_second(handler: InProcessHandler, pngs: list[bytes], seconds: float, batch: int) -> float:
    """The handler's whole work (decode, forward, top-k, JSON) on server-side batches of `batch` PNGs, after one
    untimed batch."""
    rows = [{"body": pngs[i % len(pngs)]} for i in range(batch)]
    handler.handle(rows)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        handler.handle(rows)
        done += batch
    return done / (time.perf_counter() - start)


def ceiling(model_dir: Path, pngs: list[bytes], seconds: float) -> dict[str, float]:
    """Images/s of the handler's whole per-batch work in this process, one thread (as a worker runs)."""
    handler = InProcessHandler(model_dir)
    return {f"batch_{batch}": round(images_per_second(handler, pngs, seconds, batch), 1) for batch in (1, 8, 32)}


def parse_wrk(text: str) -> dict:
    def latency(label: str) -> float | None:
        match = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", text, re.MULTILINE)
        return round(float(match.group(1)) * UNITS[match.group(2)], 2) if match else None

    requests_done = int(re.search(r"(\d+) requests in", text).group(1))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    return {"requests": requests_done, "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1)),
            "p50_ms": latency("50"), "p99_ms": latency("99"),
            "errors": (int(non_2xx.group(1)) if non_2xx else 0) +
                      (sum(map(int, socket_errors.groups())) if socket_errors else 0)}


def tree_cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            for p in [proc, *proc.children(recursive=True)]:
                t = p.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
        except psutil.NoSuchProcess:
            pass
    return total


def host_busy() -> float:
    t = psutil.cpu_times()
    return t.user + t.system + t.nice + t.irq + t.softirq


def load(url: str, connections: int, seconds: float, pids: list[int], png_list: Path) -> dict:
    """wrk at `connections` for `seconds`; adds server and host CPU milliseconds per request."""
    server_before, host_before = tree_cpu(pids), host_busy()
    out = subprocess.run(["wrk", f"-t{min(connections, 2)}", f"-c{connections}", f"-d{seconds}s", "--latency",
                          "-s", str(LUA), url], capture_output=True, text=True, timeout=seconds + 60,
                         env=dict(os.environ, BENCH_PNG_LIST=str(png_list)), check=True).stdout
    result = parse_wrk(out)
    served = max(result["requests"], 1)
    result["server_cpu_ms_per_req"] = round((tree_cpu(pids) - server_before) * 1000 / served, 3)
    result["host_cpu_ms_per_req"] = round((host_busy() - host_before) * 1000 / served, 3)
    return result


def measure(url: str, connections: list[int], seconds: float, pids: list[int], png_list: Path) -> dict:
    """A discarded 3-second warm-up (the JVM's JIT and Python's caches), then one wrk run per connection count."""
    load(url, 8, min(seconds, 3), pids, png_list)
    return {c: load(url, c, seconds, pids, png_list) for c in connections}


def wait_http(url: str, timeout: float = 120.0, png: bytes | None = None) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            response = requests.post(url, data=png, timeout=5) if png else requests.get(url, timeout=5)
            if response.status_code == 200:
                return time.monotonic() - start
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer 200 within {timeout} s")


def rss_mib(pids: list[int]) -> list[float]:
    return [round(psutil.Process(p).memory_info().rss / 2**20, 1) for p in pids if psutil.pid_exists(p)]


ROUND2 = "cifar10-2.0-round2"


def build_variant(version: ModelVersion, store: Path, tmp: Path, name: str, onnx: bool = True,
                  **settings: Any) -> str:
    """`version` with some model-config settings changed (top-level ones, or `handler` ones given as a dict),
    built as `<store>/<name>.mar`; `onnx=False` leaves the ONNX Runtime files out, so workers choose among torch's
    modes only (the previous round's configuration)."""
    config = version.config
    handler = {**config["handler"], **settings.pop("handler", {})}
    config.update(settings, handler=handler)
    built = archive.build(version, tmp / name, config, onnx=onnx)
    shutil.move(built, store / f"{name}.mar")
    return f"{name}.mar"


def build_variants(store: Path, tmp: Path) -> None:
    """The archives of the comparison rows: cifar10 2.0 as round 2 served it (1 worker, fp32), as the last round
    did (torch's modes only: ONNX Runtime is this round's), and at each TTA level; 1.0 and mnist torch-only."""
    v1, v2, mnist = (next(v for v in SHIPPED if (v.model, v.version) == key)
                     for key in (("cifar10", "1.0"), ("cifar10", "2.0"), ("mnist", "1.0")))
    build_variant(v2, store, tmp, ROUND2, minWorkers=1, maxWorkers=1, handler={"threads": 1, "numerics": "fp32"})
    build_variant(v2, store, tmp, "cifar10_v2_torch", onnx=False, handler={"tta": 0})
    build_variant(v1, store, tmp, "cifar10_torch", onnx=False)
    build_variant(mnist, store, tmp, "mnist_torch", onnx=False)
    for level in TTA_LEVELS:
        build_variant(v2, store, tmp, f"cifar10_v2_tta{level}", handler={"tta": level})


def tta_rule(runs: dict, connections: int) -> dict:
    """The written rule for 2.0's default TTA level: the highest level whose rate at `connections` in the chosen
    mode is at least the last round's configuration's (torch modes, tta 0), measured in the same run."""
    floor = runs["torchserve cifar10 2.0, last round's config (torch modes, tta 0)"][connections]["rps"]
    rates = {level: runs[f"torchserve cifar10 2.0, tta {level}"][connections]["rps"] for level in TTA_LEVELS}
    admitted = [level for level, rate in rates.items() if rate >= floor]
    return {"connections": connections, "floor_rps": floor, "rps": rates,
            "level": max(admitted) if admitted else 0}


def served_numerics(client: TorchServeClient, model: str, version: str) -> str:
    """The numeric mode a worker of that version chose and what it measured (its handler's describe), as the
    results record it and `python -m client versions` prints it: "fp32-cl (auto; fp32 152 img/s, fp32-cl 230
    img/s)"."""
    choice = (client.handler_description(model, version) or {}).get("numerics")
    return numerics_choice(choice) if choice else "unknown"


def torchserve_runs(store: Path, tmp: Path, connections: list[int], seconds: float, png_list: Path,
                    png: bytes, smoke: bool) -> tuple[dict, dict]:
    server = TorchServe.on_free_ports(ROOT / "config.properties", tmp / "ts", store)
    started = time.monotonic()
    server.start(timeout=300)
    base = f"{server.url('inference')}/predictions"
    wait_http(f"{base}/cifar10", png=png)
    facts = {"cold_start_s": round(time.monotonic() - started, 1)}
    try:
        pids = [server.pid()]
        runs = {"torchserve": measure(f"{base}/cifar10", connections, seconds, pids, png_list)}
        workers = [int(w["pid"]) for d in server.describe("cifar10") for w in d["workers"]]
        facts["worker_rss_mib"] = rss_mib(workers)
        client = TorchServeClient(management_url=server.url("management"), timeout=300)
        facts["numerics"] = {"cifar10 1.0": served_numerics(client, "cifar10", "1.0")}
        if not smoke:
            runs["torchserve cifar10 2.0"] = measure(f"{base}/cifar10/2.0", connections, seconds, pids, png_list)
            facts["numerics"]["cifar10 2.0"] = served_numerics(client, "cifar10", "2.0")
            # The same network as round 2 served it (1 worker, 1 thread, fp32), and as the last round did (the
            # torch modes only): the baselines this round's 2.0 targets are multiples of, same host, same run.
            client.register(f"{ROUND2}.mar", 1, model_name="cifar10_v2_round2")
            runs["torchserve cifar10 2.0, round-2 config"] = measure(f"{base}/cifar10_v2_round2", connections,
                                                                     seconds, pids, png_list)
            client.register("cifar10_v2_torch.mar", 2, model_name="cifar10_v2_torch")
            last = "torchserve cifar10 2.0, last round's config (torch modes, tta 0)"
            runs[last] = measure(f"{base}/cifar10_v2_torch", connections, seconds, pids, png_list)
            facts["numerics"][last] = served_numerics(client, "cifar10_v2_torch", "2.0")
            facts["worker_rss_mib"] = {f"{model} {version}": rss_mib([int(w["pid"]) for d in server.describe(model)
                                                                     if d["modelVersion"] == version
                                                                     for w in d["workers"]])
                                       for model, version in (("cifar10", "1.0"), ("cifar10", "2.0"),
                                                              ("cifar10_v2_torch", "2.0"))}
            # 2.0 at each TTA level in the mode its workers choose, at the rule's connection count only.
            rule_point = [32] if 32 in connections else connections[-1:]
            for level in TTA_LEVELS:
                client.register(f"cifar10_v2_tta{level}.mar", 2, model_name=f"cifar10_v2_tta{level}")
                runs[f"torchserve cifar10 2.0, tta {level}"] = measure(f"{base}/cifar10_v2_tta{level}", rule_point,
                                                                      seconds, pids, png_list)
                client.unregister(f"cifar10_v2_tta{level}", "2.0", force=True)
            facts["tta_rule"] = tta_rule(runs, rule_point[0])
            # 1.0 and mnist in the modes their workers choose against torch's modes only.
            client.register("cifar10_torch.mar", 2, model_name="cifar10_torch")
            runs["torchserve cifar10 1.0, torch modes"] = measure(f"{base}/cifar10_torch", rule_point, seconds,
                                                                  pids, png_list)
            runs["torchserve mnist 1.0"] = measure(f"{base}/mnist", rule_point, seconds, pids, png_list)
            facts["numerics"]["mnist 1.0"] = served_numerics(client, "mnist", "1.0")
            client.register("mnist_torch.mar", 1, model_name="mnist_torch")
            runs["torchserve mnist 1.0, torch modes"] = measure(f"{base}/mnist_torch", rule_point, seconds, pids,
                                                                png_list)
            for name in ("cifar10_torch", "mnist_torch"):
                client.unregister(name, "1.0", force=True)
    finally:
        server.stop()
    return runs, facts


PEERS = {
    "flask threaded": lambda port: [sys.executable, "-m", "benchmarks.peers.flask_app", "--port", str(port)],
    "gunicorn 2 sync workers": lambda port: [str(Path(sys.executable).with_name("gunicorn")), "-w",
                                             str(os.cpu_count()), "-b", f"127.0.0.1:{port}", "--log-level",
                                             "warning", "benchmarks.peers.flask_app:app"],
    "litserve batched": lambda port: [sys.executable, "-m", "benchmarks.peers.litserve_app", "--port", str(port)],
}


def peer_runs(names: list[str], connections: list[int], seconds: float, png_list: Path, png: bytes,
              failures: dict[str, str]) -> dict:
    """Each peer's points; a peer that does not come up is reported in `failures` instead of ending the run."""
    runs = {}
    for name in names:
        [port] = free_ports(1)
        proc = subprocess.Popen(PEERS[name](port), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            wait_http(f"http://127.0.0.1:{port}/predictions/cifar10", png=png, timeout=60)
            runs[name] = measure(f"http://127.0.0.1:{port}/predictions/cifar10", connections, seconds, [proc.pid],
                                 png_list)
        except (RuntimeError, subprocess.SubprocessError) as exc:
            failures[name] = str(exc)
        finally:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=30)
    return runs


def markdown(report: dict) -> str:
    lines = [f"# Benchmark, {report['date']}", "",
             f"{report['machine']['cores']} cores, {report['machine']['cpu']} "
             f"(ISA: {' '.join(report['machine']['isa']) or 'unknown'}), torch {report['versions']['torch']}, "
             f"torchserve {report['versions']['torchserve']}; wrk, {report['seconds']} s per point, "
             "real 32×32 PNGs as raw POST bodies, cifar10 1.0 unless named.",
             "Numerics the workers chose: " + ", ".join(f"{k} {v}" for k, v in report["facts"]["numerics"].items())
             + ".", "",
             "| server | connections | req/s | p50 ms | p99 ms | errors | server CPU ms/req | host CPU ms/req |",
             "|---|---|---|---|---|---|---|---|"]
    for name, points in report["runs"].items():
        for c, r in points.items():
            lines.append(f"| {name} | {c} | {r['rps']:.0f} | {r['p50_ms']} | {r['p99_ms']} | {r['errors']} | "
                         f"{r['server_cpu_ms_per_req']} | {r['host_cpu_ms_per_req']} |")
    ceiling_line = ", ".join(f"{k.replace('_', ' ')}: {v:.0f} img/s" for k, v in report["ceiling"].items())
    lines += ["", f"In-process ceiling (one thread, the handler's whole work per image): {ceiling_line}."]
    cores = report['machine']['cores']
    lines += [f"Served/ceiling at {c} connections: {v:.2f} (ceiling = batch-8 img/s × {cores} cores)"
              for c, v in report["served_over_ceiling"].items()]
    facts = report["facts"]
    lines += [f"Cold start (start → first 200): {facts['cold_start_s']} s; "
              f"archive build: {facts['archive_build_s']} s; "
              f"worker RSS (MiB): {facts.get('worker_rss_mib')}."]
    if "tta_rule" in facts:
        rule = facts["tta_rule"]
        lines += [f"TTA rule (2.0, {rule['connections']} connections): the highest level serving at least the last "
                  f"round's configuration's {rule['floor_rps']:.0f} req/s; measured "
                  + ", ".join(f"tta {level} {rate:.0f}" for level, rate in rule["rps"].items())
                  + f" req/s → tta {rule['level']}."]
    lines += [f"**{name} did not run**: {reason}" for name, reason in report["failed"].items()] + [""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, points in report["runs"].items():
        xs = [int(c) for c in points]
        ax.plot(xs, [points[c]["rps"] for c in points], marker="o", label=name)
    ax.set(xscale="log", xlabel="connections", ylabel="requests/s", title=f"cifar10 throughput, {report['date']}")
    ax.set_xticks(sorted({int(c) for p in report["runs"].values() for c in p}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per load point")
    p.add_argument("--connections", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--peers", nargs="*", default=list(PEERS), choices=list(PEERS))
    p.add_argument("--smoke", action="store_true", help="about a second per part: proves the script still runs")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: `make bench` installs it (apt-get install wrk)")
    if args.smoke:
        args.duration, args.connections, args.peers = 1.0, [1, 4], ["flask threaded"]
    seconds = int(max(1, args.duration))

    with tempfile.TemporaryDirectory(prefix="bench-") as tmp_name:
        tmp = Path(tmp_name)
        paths = bench_images(tmp / "png")
        pngs = [path.read_bytes() for path in paths]
        store = tmp / "store"
        started = time.perf_counter()
        archive.build(SHIPPED[0], store)
        archive_seconds = time.perf_counter() - started
        for version in SHIPPED[1:]:
            archive.build(version, store)
        if not args.smoke:
            build_variants(store, tmp)
        ceiling_rates = ceiling(unpack(store / SHIPPED[0].archive_name, tmp / "unpacked"), pngs,
                                0.5 if args.smoke else 3.0)
        runs, facts = torchserve_runs(store, tmp, args.connections, seconds, tmp / "png" / "list.txt", pngs[0],
                                      args.smoke)
        failures: dict[str, str] = {}
        runs.update(peer_runs(args.peers, args.connections, seconds, tmp / "png" / "list.txt", pngs[0], failures))
    facts["archive_build_s"] = round(archive_seconds, 2)
    cores = os.cpu_count() or 1
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cores": cores, "cpu": numerics.cpu_model(), "isa": numerics.isa(),
                    "arch": platform.machine(),
                    "memory_gib": round(psutil.virtual_memory().total / 2**30, 1)},
        "versions": {"torch": torch.__version__, "torchserve": _version("torchserve"),
                     "python": platform.python_version()},
        "seconds": seconds, "smoke": args.smoke, "ceiling": ceiling_rates, "facts": facts, "failed": failures,
        "runs": {name: {str(c): r for c, r in points.items()} for name, points in runs.items()},
        "served_over_ceiling": {str(c): round(r["rps"] / (ceiling_rates["batch_8"] * cores), 3)
                                for c, r in runs["torchserve"].items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"bench-{report['date'][:10]}"
    Path(f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    Path(f"{stem}.md").write_text(markdown(report))
    plot(report, Path(f"{stem}.png"))
    print(markdown(report))
    print(f"wrote {stem}.md, {stem}.json and {stem}.png")
    return report


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    main()
