"""A container's main process and its health check, on a baked layout such as `make kserve`'s (deploy/docker/).

    python -m serving.server run --config /mnt/models/config/config.properties
                                 --model-store /mnt/models/model-store --run-dir DIR
    python -m serving.server health --config ... --model-store ... --run-dir DIR
"""
from __future__ import annotations

import signal
import sys
import threading

from serving.preflight import StartupError
from serving.process import TorchServe


def run_foreground(server: TorchServe, timeout: float) -> int:
    """A container's main process: start TorchServe, wait for READY workers, then wait for SIGTERM (or SIGINT)
    and stop it cleanly, or report java's own death. The exit code says which: 0 after a clean stop."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        seconds = server.start(timeout)
    except StartupError as exc:
        print(f"start-up failed: {exc}", file=sys.stderr, flush=True)
        return 1
    versions = ", ".join(f"{m}/{v}" for m, vs in server.expected_models().items() for v in vs)
    print(f"READY in {seconds:.1f} s: {versions}", flush=True)
    while not stop.wait(1.0):
        if server.pid() is None:
            print("TorchServe's java process exited on its own", file=sys.stderr, flush=True)
            server.stop()
            return 1
        if server.has_front and server.front_pid() is None:
            print("the gRPC front exited on its own", file=sys.stderr, flush=True)
            server.stop()
            return 1
    server.stop()
    print("stopped cleanly", flush=True)
    return 0


def healthy(server: TorchServe) -> list[str]:
    """What is wrong, or [] when java runs and every expected version has a READY worker whose process is alive
    (TorchServe's /ping says Healthy while workers crash-loop, so a health check must not rely on it)."""
    if server.pid() is None:
        return ["TorchServe is not running"]
    problems = []
    if server.has_front and server.front_pid() is None:
        problems.append(f"the gRPC front (port {server.properties['grpc_front_port']}) is not running")
    return problems + server.not_ready()
