"""The command line of `make serve`, `make stop` and `make status`, and of a container (serving/container.py).

    python -m serving.server start [--profile prod]
    python -m serving.server stop
    python -m serving.server status
    python -m serving.server token inference      # print a key when token authorization is on
    python -m serving.server run --config ... --model-store ... --run-dir DIR      # a container's main process
    python -m serving.server health --config ... --model-store ... --run-dir DIR   # and its health check

The work is done elsewhere, one job per module: serving/config.py writes the config java starts with,
serving/preflight.py checks what must hold before it starts, serving/process.py starts, watches and stops it,
serving/logs.py reads what it wrote, serving/container.py is a container's life. Only `start` writes anything
(logs/<profile file>, logs/profile); `stop`, `status` and `token` read what the running server was started with.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from serving.catalog import ROOT
from serving.config import PROFILES, parse_properties, render_config, write_config
from serving.container import healthy, run_foreground
from serving.preflight import StartupError
from serving.process import Drift, TorchServe
from serving.transport import socket_path

RUN_DIR = ROOT / "logs"  # `make serve`'s run folder: its config, logs, pid, sockets and keys
PROFILE_MARKER = RUN_DIR / "profile"  # which profile the running server was started with


def local(profile: str = "default", *, prepare: bool = False) -> TorchServe:
    """The server `make serve` runs: ./model_store, logs/ as its run folder, and the profile's config as
    logs/<profile file> (with absolute TLS and socket paths). `prepare` writes that file from the profile, as
    `start` must; otherwise it is read as the running server was started with it, and before any start it is
    what `start` would write, unwritten."""
    store, config = ROOT / "model_store", RUN_DIR / PROFILES[profile].name
    if prepare:
        write_config(PROFILES[profile], config, store)
    properties = None if config.exists() else parse_properties(render_config(PROFILES[profile], config, store))
    return TorchServe(config=config, model_store=store, run_dir=RUN_DIR, properties=properties)


def running_profile() -> str:
    """The profile `make serve` last started (logs/profile), so `stop`, `status` and `token` read its config."""
    return PROFILE_MARKER.read_text().strip() if PROFILE_MARKER.exists() else "default"


def print_status(server: TorchServe) -> None:
    """`make status`: java's pid, the gRPC front's, and every registered version with its batching and workers."""
    if server.pid() is None:
        print("TorchServe is not running (make serve starts it)")
        return
    print(f"TorchServe running (java pid {server.pid()}, config {server.config.name})")
    if server.has_front:
        front = server.front_pid()
        print(f"  gRPC front on port {server.grpc_port()}: " + (f"pid {front}" if front else "NOT RUNNING (make serve "
                                                                "starts it again)"))
    models = server.http.get(f"{server.url('management')}/models", headers=server.headers("management"), timeout=5,
                             verify=server.verify)
    for entry in models.json().get("models", []):
        for version in server.describe(entry["modelName"]):
            workers = ", ".join(f"{w['pid']}:{w['status']}" for w in version.get("workers", [])) or "none"
            default = " (default)" if version["modelUrl"] == entry["modelUrl"] else ""
            print(f"  {entry['modelName']} {version['modelVersion']}{default}: batch {version['batchSize']}, "
                  f"delay {version['maxBatchDelay']} ms, workers {workers}")


def banner(server: TorchServe, seconds: float, already: bool, drift: Drift | None = None) -> str:
    """What `make serve` prints once every version is READY: where each API is, and the first request to try (the
    README shows it, kept equal by tests/readme_samples.py)."""
    inference = server.url("inference")
    lines = ["TorchServe was already running; every configured version is READY" if already
             else f"TorchServe is up in {seconds:.1f} s; every model has a READY worker"]
    if drift:  # versions registered or promoted since the start: it serves on as it is, and says so
        lines.append(f"note: {drift.report()}")
    lines.append(f"  inference   {inference}/predictions/<model>[/<version>]")
    management = socket_path(server.url("management"))
    if management is None:
        lines.append(f"  management  {server.url('management')}/models")
    else:
        shown = management.relative_to(ROOT) if management.is_relative_to(ROOT) else management
        lines.append(f"  management  Unix socket {shown} (curl --unix-socket {shown} http://localhost/models)")
    lines.append(f"  metrics     {server.url('metrics')}/metrics")
    lines.append(f"  gRPC        {server.properties.get('grpc_inference_address', '0.0.0.0')}:{server.grpc_port()} "
                 "(inference; StreamPredictions2 refused, docs/serving.md \"gRPC\")")
    lines.append(f"  logs        {server.log_dir}/")
    auth = ""
    if server.token("inference"):
        auth = ' -H "Authorization: Bearer $(.venv/bin/python -m serving.server token inference)"'
        lines.append(f"  token auth  on: keys in {server.key_file}")
    if server.verify is not True:
        certificate = Path(server.verify)
        auth += f" --cacert {certificate.relative_to(ROOT) if certificate.is_relative_to(ROOT) else certificate}"
    lines.append(f"try:  curl{auth} -T examples/cat.png {inference}/predictions/cifar10")
    return "\n".join(lines)



def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["start", "stop", "status", "token", "run", "health"])
    p.add_argument("api", nargs="?", choices=["inference", "management", "API"], default="inference",
                   help="which key `token` prints")
    p.add_argument("--profile", choices=sorted(PROFILES), default="default")
    p.add_argument("--timeout", type=float, default=180.0)
    p.add_argument("--config", type=Path, help="run/health/token: the config TorchServe runs with")
    p.add_argument("--model-store", type=Path, help="run/health: the model store")
    p.add_argument("--run-dir", type=Path, help="run/health/token: a writable folder for logs, pid and sockets")
    args = p.parse_intermixed_args(argv)  # `token --config C --run-dir R inference` as well as `token inference`

    if args.command in ("run", "health"):
        if not (args.config and args.model_store and args.run_dir):
            p.error(f"{args.command} needs --config, --model-store and --run-dir")
        args.run_dir.mkdir(parents=True, exist_ok=True)
        server = TorchServe(config=args.config, model_store=args.model_store, run_dir=args.run_dir)
        if args.command == "run":
            return run_foreground(server, args.timeout)
        problems = healthy(server)
        print("\n".join(problems) or "healthy: every version has a READY worker", file=sys.stderr if problems
              else sys.stdout)
        return 1 if problems else 0

    if args.command == "stop":
        server = local(running_profile())
        print("TorchServe stopped" if server.stop() else "TorchServe was not running")
        return 0
    if args.command == "status":
        print_status(local(running_profile()))
        return 0
    if args.command == "token":  # a server elsewhere than `make serve`'s (a test's) is named by --config and --run-dir
        server = (TorchServe(config=args.config, model_store=args.config.parent, run_dir=args.run_dir)
                  if args.config and args.run_dir else local(running_profile()))
        if server.token(args.api) is None:
            print("token authorization is off, or TorchServe is not running with the prod profile", file=sys.stderr)
            return 1
        print(server.token(args.api))
        return 0
    running = local(running_profile())
    already = running.pid() is not None
    if already and running_profile() != args.profile:
        print(f"TorchServe is already running with the {running_profile()} profile: `make stop` first",
              file=sys.stderr)
        return 1
    server = local(args.profile, prepare=True)
    try:
        seconds = server.start(args.timeout)
    except StartupError as exc:
        print(f"make serve failed: {exc}", file=sys.stderr)
        return 1
    PROFILE_MARKER.write_text(args.profile + "\n")
    print(banner(server, seconds, already, server.drift_at_start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
