"""Start, stop and inspect TorchServe the way `make serve`, `make stop` and `make status` promise.

TorchServe 0.12's launcher returns 0 even when start-up fails and `/ping` says Healthy while workers crash-loop,
so this module trusts neither: it checks ports and archive checksums first, starts java detached with its output
in `logs/`, and then waits until every configured model version has a READY worker, or until java dies or a
model fails to load, in which case it stops everything and says why, with the log's tail.

    python -m serving.server start [--profile prod]
    python -m serving.server stop
    python -m serving.server status
    python -m serving.server token inference      # print a key when token authorization is on
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import psutil
import requests

from serving.catalog import ROOT
from training.data import sha256_of

LOG_CONFIG = ROOT / "serving" / "log4j2.xml"
PROFILES = {"default": ROOT / "config.properties", "prod": ROOT / "config.prod.properties"}
FAILURE_MARKS = ("Load model failed", "Failed to load model", "ModelNotFoundException", "Address already in use",
                 "BindException", "Invalid model archive", "ModuleNotFoundError", "ImportError")


class StartupError(RuntimeError):
    """TorchServe did not come up; the message says why and includes the log's tail."""


def read_properties(path: Path) -> dict[str, str]:
    properties = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            properties[key.strip()] = value.strip()
    return properties


PORT_KEYS = ("inference_address", "management_address", "metrics_address", "grpc_inference_port",
             "grpc_management_port")


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def config_on_free_ports(source: Path, dest: Path, store: Path) -> Path:
    """A copy of a config file with every port moved to a free one and the model store replaced, so a test or a
    benchmark server runs beside `make serve` without touching it."""
    ports = dict(zip(PORT_KEYS, free_ports(len(PORT_KEYS))))
    lines = []
    for line in source.read_text().splitlines():
        key = line.split("=", 1)[0].strip()
        if key in ports:
            port = ports[key]
            line = f"{key}=http://127.0.0.1:{port}" if key.endswith("_address") else f"{key}={port}"
        elif key == "model_store":
            line = f"model_store={store}"
        lines.append(line)
    dest.write_text("\n".join(lines) + "\n")
    return dest


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@dataclass
class TorchServe:
    """One TorchServe instance: its config file, model store and a private run folder (TMPDIR, pid, logs)."""

    config: Path
    model_store: Path
    run_dir: Path

    def __post_init__(self) -> None:
        self.properties = read_properties(self.config)
        self.log_dir = self.run_dir
        self.tmp_dir = self.run_dir / "tmp"
        self._log_offsets: dict[Path, int] = {}

    @classmethod
    def on_free_ports(cls, profile_config: Path, run_dir: Path, model_store: Path) -> TorchServe:
        """A server configured like `profile_config` but on free ports and with its own run folder, so that it
        runs beside `make serve` (tests and benchmarks use this)."""
        run_dir.mkdir(parents=True, exist_ok=True)
        config = config_on_free_ports(profile_config, run_dir / profile_config.name, model_store)
        return cls(config=config, model_store=model_store, run_dir=run_dir)

    # --- addresses and auth -------------------------------------------------------------------------------
    def url(self, api: str) -> str:
        return self.properties.get(f"{api}_address", {"inference": "http://127.0.0.1:8080",
                                                     "management": "http://127.0.0.1:8081",
                                                     "metrics": "http://127.0.0.1:8082"}[api])

    def ports(self) -> list[tuple[str, int]]:
        ports = [(urlparse(self.url(api)).hostname, urlparse(self.url(api)).port)
                 for api in ("inference", "management", "metrics")]
        for api, default in (("inference", 7070), ("management", 7071)):
            host = self.properties.get(f"grpc_{api}_address", "0.0.0.0")
            ports.append((host, int(self.properties.get(f"grpc_{api}_port", default))))
        return ports

    @property
    def key_file(self) -> Path:
        return self.run_dir / "key_file.json"

    def token(self, api: str) -> str | None:
        """The bearer key for `inference` or `management` when token authorization is on."""
        if self.properties.get("disable_token_authorization", "false") == "true" or not self.key_file.exists():
            return None
        keys = json.loads(self.key_file.read_text())
        return keys[api]["key"]

    def headers(self, api: str) -> dict[str, str]:
        token = self.token(api)
        return {"Authorization": f"Bearer {token}"} if token else {}

    # --- process ------------------------------------------------------------------------------------------
    @property
    def pid_file(self) -> Path:
        return self.tmp_dir / ".model_server.pid"

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def expected_models(self) -> dict[str, list[str]]:
        """model → versions that `models=` in the config file declares (what must be READY)."""
        models = json.loads(self.properties.get("models", "{}") or "{}")
        return {name: sorted(versions) for name, versions in models.items()}

    def check_archives(self) -> None:
        """Every archive `load_models` names exists and matches the sha256 `make archive` recorded."""
        names = [n.strip() for n in self.properties.get("load_models", "").split(",") if n.strip()]
        for name in names:
            archive = self.model_store / name
            if not archive.is_file():
                raise StartupError(f"archive {archive} is missing: run `make archive` first")
            recorded = archive.with_name(archive.name + ".sha256")
            if not recorded.is_file():
                raise StartupError(f"{recorded} is missing: rebuild the archive with `make archive`")
            if recorded.read_text().split()[0] != sha256_of(archive):
                raise StartupError(f"{archive} does not match the sha256 recorded in {recorded} when it was built; "
                                   "refusing to serve it (rebuild it with `make archive`)")

    def log_tail(self, lines: int = 40) -> str:
        tails = []
        for name in ("ts.out", "model_log.log", "ts_log.log"):
            path = self.log_dir / name
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                tails.append(f"--- {path} (last {len(text)} lines) ---\n" + "\n".join(text))
        return "\n".join(tails) or "(no log written)"

    def _fail(self, reason: str) -> None:
        tail = self.log_tail()
        self.stop(quiet=True)
        raise StartupError(f"{reason}\n{tail}")

    def start(self, timeout: float = 180.0) -> float:
        """Start java and block until every configured version has a READY worker; returns seconds taken."""
        if self.pid() is not None:
            self.wait_ready(timeout)
            return 0.0
        if shutil.which("java") is None:
            raise StartupError("java is not on PATH: TorchServe's frontend needs a JDK 17 (apt install openjdk-17-jdk)")
        self.check_archives()
        for host, port in self.ports():
            if not port_is_free(host, port):
                raise StartupError(f"port {host}:{port} is already in use by another process; stop it or change "
                                   f"the port in {self.config}")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._log_offsets = {path: path.stat().st_size if path.exists() else 0 for path in self._startup_logs()}
        env = dict(os.environ, TMPDIR=str(self.tmp_dir), TEMP=str(self.tmp_dir), LOG_LOCATION=str(self.log_dir),
                   METRICS_LOCATION=str(self.log_dir))
        launcher = Path(sys.executable).with_name("torchserve")
        started = time.monotonic()
        with open(self.log_dir / "ts.out", "ab") as out:
            # java inherits these descriptors: never a pipe, or whoever reads it blocks until java exits.
            subprocess.run([str(launcher), "--start", "--ts-config", str(self.config), "--model-store",
                            str(self.model_store), "--log-config", str(LOG_CONFIG), "--ncs"], cwd=self.run_dir, env=env, stdin=subprocess.DEVNULL,
                           stdout=out, stderr=subprocess.STDOUT, check=False, start_new_session=True)
        self.wait_ready(timeout)
        return time.monotonic() - started

    def _startup_logs(self) -> list[Path]:
        return [self.log_dir / "ts.out", self.log_dir / "ts_log.log", self.log_dir / "model_log.log"]

    def _startup_log(self) -> str:
        """What this start-up wrote (TorchServe appends to model_log.log across runs)."""
        text = []
        for path in self._startup_logs():
            if path.exists():
                with open(path, "rb") as f:
                    f.seek(self._log_offsets.get(path, 0))
                    text.append(f.read().decode(errors="replace"))
        return "".join(text)

    def wait_ready(self, timeout: float) -> None:
        started = time.monotonic()
        expected = self.expected_models()
        while True:
            time.sleep(0.5)
            pid = self.pid()
            if pid is None and time.monotonic() - started > 5:  # the launcher writes the pid file within ~1 s
                self._fail("TorchServe's java process exited during start-up")
            mark = next((m for m in FAILURE_MARKS if m in self._startup_log()), None)
            if mark:
                self._fail(f"TorchServe reported {mark!r} while starting")
            if pid is not None and self.not_ready(expected) == []:
                return
            if time.monotonic() - started > timeout:
                self._fail(f"no READY worker for {', '.join(self.not_ready(expected))} after {timeout:.0f} s "
                           "(a worker that keeps crashing shows why in model_log.log)")

    def describe(self, model: str) -> list[dict]:
        response = requests.get(f"{self.url('management')}/models/{model}/all", headers=self.headers("management"),
                                timeout=5)
        response.raise_for_status()
        return response.json()

    def not_ready(self, expected: dict[str, list[str]]) -> list[str]:
        """`model/version` entries without a READY worker (all of them while the API does not answer)."""
        missing = []
        for model, versions in expected.items():
            try:
                described = {d["modelVersion"]: d for d in self.describe(model)}
            except (requests.RequestException, ValueError):
                described = {}
            for version in versions:
                workers = described.get(version, {}).get("workers", [])
                if not any(w.get("status") == "READY" for w in workers):
                    missing.append(f"{model}/{version}")
        return missing

    def stop(self, timeout: float = 60.0, quiet: bool = False) -> bool:
        """SIGTERM java and wait for it (SIGKILL after `timeout`); False when nothing was running."""
        pid = self.pid()
        if pid is None:
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
            while pid_alive(pid):
                time.sleep(0.1)
        self.pid_file.unlink(missing_ok=True)
        self._kill_orphaned_workers()
        return True

    def _kill_orphaned_workers(self) -> None:
        """Workers of a java that died hard keep running; their socket path names our private TMPDIR."""
        for proc in psutil.process_iter(["cmdline"]):
            if any(str(self.tmp_dir) in part for part in proc.info["cmdline"] or []):
                proc.kill()


def local(profile: str = "default") -> TorchServe:
    """The server `make serve` runs: the profile's config, ./model_store, and logs/ as its run folder."""
    return TorchServe(config=PROFILES[profile], model_store=ROOT / "model_store", run_dir=ROOT / "logs")


def running_profile() -> str:
    marker = ROOT / "logs" / "profile"
    return marker.read_text().strip() if marker.exists() else "default"


def print_status(server: TorchServe) -> None:
    if server.pid() is None:
        print("TorchServe is not running (make serve starts it)")
        return
    print(f"TorchServe running (java pid {server.pid()}, config {server.config.name})")
    models = requests.get(f"{server.url('management')}/models", headers=server.headers("management"), timeout=5)
    for entry in models.json().get("models", []):
        for version in server.describe(entry["modelName"]):
            workers = ", ".join(f"{w['pid']}:{w['status']}" for w in version.get("workers", [])) or "none"
            default = " (default)" if version["modelUrl"] == entry["modelUrl"] else ""
            print(f"  {entry['modelName']} {version['modelVersion']}{default}: batch {version['batchSize']}, "
                  f"delay {version['maxBatchDelay']} ms, workers {workers}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["start", "stop", "status", "token"])
    p.add_argument("api", nargs="?", choices=["inference", "management", "API"], default="inference",
                   help="which key `token` prints")
    p.add_argument("--profile", choices=sorted(PROFILES), default="default")
    p.add_argument("--timeout", type=float, default=180.0)
    args = p.parse_args(argv)

    if args.command == "stop":
        server = local(running_profile())
        print("TorchServe stopped" if server.stop() else "TorchServe was not running")
        return 0
    if args.command == "status":
        print_status(local(running_profile()))
        return 0
    if args.command == "token":
        server = local(running_profile())
        if server.token(args.api) is None:
            print("token authorization is off, or TorchServe is not running with the prod profile", file=sys.stderr)
            return 1
        print(json.loads(server.key_file.read_text())[args.api]["key"])
        return 0
    server = local(args.profile)
    already = server.pid() is not None
    if already and running_profile() != args.profile:
        print(f"TorchServe is already running with the {running_profile()} profile: `make stop` first",
              file=sys.stderr)
        return 1
    try:
        seconds = server.start(args.timeout)
    except StartupError as exc:
        print(f"make serve failed: {exc}", file=sys.stderr)
        return 1
    (ROOT / "logs" / "profile").write_text(args.profile + "\n")
    inference = server.url("inference")
    print("TorchServe was already running; every model is READY" if already
          else f"TorchServe is up in {seconds:.1f} s; every model has a READY worker")
    print(f"  inference   {inference}/predictions/<model>[/<version>]")
    print(f"  management  {server.url('management')}/models")
    print(f"  metrics     {server.url('metrics')}/metrics")
    print(f"  logs        {server.log_dir}/")
    auth = ""
    if server.token("inference"):
        auth = ' -H "Authorization: Bearer $(.venv/bin/python -m serving.server token inference)"'
        print(f"  token auth  on: keys in {server.key_file}")
    print(f"try:  curl{auth} -T examples/cat.png {inference}/predictions/cifar10")
    return 0


if __name__ == "__main__":
    sys.exit(main())
