"""Start, stop and inspect TorchServe the way `make serve`, `make stop` and `make status` promise.

TorchServe 0.12's launcher returns 0 even when start-up fails and `/ping` says Healthy while workers crash-loop,
so this module trusts neither: it checks ports and archive checksums first, starts java detached with its output
in `logs/`, and then waits until every configured model version has a READY worker, or until java dies or a
model fails to load, in which case it stops what it started and says why: the model/version that failed, that
worker's own traceback, then short tails of the logs. Only the lines written since this start began are read
(the logs are append-only and may hold failures from an earlier day).

    python -m serving.server start [--profile prod]
    python -m serving.server stop
    python -m serving.server status
    python -m serving.server token inference      # print a key when token authorization is on

A container's main process and its health check (deploy/docker/), on a baked layout such as `make kserve`'s:

    python -m serving.server run --config /mnt/models/config/config.properties
                                 --model-store /mnt/models/model-store --run-dir DIR
    python -m serving.server health --config ... --model-store ... --run-dir DIR
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import psutil
import requests

from client.transport import UNIX, base_url, session, socket_path
from models.checksum import sha256_of
from serving.catalog import ROOT

LOG_CONFIG = ROOT / "serving" / "log4j2.xml"
PROFILES = {"default": ROOT / "config.properties", "prod": ROOT / "config.prod.properties"}
# Lines of TorchServe's own log that mean start-up cannot succeed, whoever wrote them.
SERVER_FAILURES = ("Address already in use", "BindException", "Invalid model archive", "ModelNotFoundException",
                   "Failed to load model")
# Lines a worker thread (`W-<port>-<model>_<version>`) writes when its Python process died or cannot load.
WORKER_FAILURES = ("Load model failed", "Backend worker process died", "Retry worker")
WORKER_THREAD = re.compile(r"\bW-(?P<port>\d+)-(?P<model>\S+)_(?P<version>[^\s_]+?)(?:-(?:stdout|stderr))?\s")
LOG_LINE = re.compile(r"^\S+ \[\s*\w+\s*\] (?P<thread>\S+) (?P<logger>\S+) - (?P<message>.*)$")
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning)\b.*")
BIND_FAILURES = ("Address already in use", "BindException")
PORT_ATTEMPTS = 4  # a server on free ports picks new ones when another process takes one before java binds it
TRACEBACK_WAIT_S = 10.0  # how long to wait for a failed worker's traceback to be written in full


class StartupError(RuntimeError):
    """TorchServe did not come up; the message says which model/version failed and why, with short log tails."""


def read_properties(path: Path) -> dict[str, str]:
    properties = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            properties[key.strip()] = value.strip()
    return properties


PORT_KEYS = ("inference_address", "management_address", "metrics_address", "grpc_inference_port",
             "grpc_management_port", "grpc_front_port")


def free_ports(count: int) -> list[int]:
    """Ports the kernel says are free now. Another process may take one before java binds it, so a server
    configured from these retries with new ones when it sees a bind failure (`TorchServe.start`)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


TLS_FILES = ("certificate_file", "private_key_file")
JAVA_MAIN = "org.pytorch.serve.ModelServer"  # the class on TorchServe's java command line
SOCKET_PATH_MAX = 107  # sun_path holds 108 bytes with its terminating NUL


def unix_socket(path: str, run_dir: Path) -> Path:
    """Where a `unix:` address's socket goes: a relative path is in the server's run folder (logs/ for `make
    serve`, so each server has its own). TorchServe needs it absolute, and the kernel limits its length."""
    socket_file = (run_dir / path).absolute() if not Path(path).is_absolute() else Path(path)
    if len(str(socket_file).encode()) > SOCKET_PATH_MAX:
        raise ValueError(f"the socket path {socket_file} is {len(str(socket_file).encode())} bytes; Unix sockets "
                         f"allow {SOCKET_PATH_MAX}: run from a shorter folder")
    return socket_file


def write_config(source: Path, dest: Path, store: Path, ports: dict[str, int] | None = None,
                 overrides: dict[str, str] | None = None) -> Path:
    """The config TorchServe is started with: `source` with some keys overridden, the model store replaced, TLS
    file paths made absolute (they are relative to the source's folder; java runs in the run folder), and
    optionally every port moved. A moved address keeps its scheme and host, so a server on free ports binds
    where its profile binds (a test of what the profile exposes sees what the profile exposes)."""
    lines, overrides = [], dict(overrides or {})
    for line in source.read_text().splitlines():
        key, _, value = (part.strip() for part in line.partition("="))
        if key in overrides:
            value = overrides.pop(key)
            line = f"{key}={value}"
        if value.startswith(UNIX):
            line = f"{key}={UNIX}{unix_socket(value[len(UNIX):], dest.parent)}"
        elif ports and key in ports:
            address = urlparse(value)
            line = (f"{key}={address.scheme or 'http'}://{address.hostname or '127.0.0.1'}:{ports[key]}"
                    if key.endswith("_address") else f"{key}={ports[key]}")
        elif key == "model_store":
            line = f"model_store={store}"
        elif key in TLS_FILES and not Path(value).is_absolute():
            line = f"{key}={(source.parent / value).resolve()}"
        lines.append(line)
    lines += [f"{key}={value}" for key, value in overrides.items()]
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("\n".join(lines) + "\n")
    return dest


def config_on_free_ports(source: Path, dest: Path, store: Path, overrides: dict[str, str] | None = None) -> Path:
    """A copy of a config file with every port moved to a free one and the model store replaced, so a test or a
    benchmark server runs beside `make serve` without touching it."""
    return write_config(source, dest, store, dict(zip(PORT_KEYS, free_ports(len(PORT_KEYS)))),
                        overrides)


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def terminate(pid: int, timeout: float) -> None:
    """SIGTERM a process we proved ours and wait for it, SIGKILL after `timeout`; one already gone is fine."""
    try:
        process = psutil.Process(pid)
        process.terminate()
        try:
            process.wait(timeout)
        except psutil.TimeoutExpired:
            process.kill()
            process.wait(30)
    except psutil.NoSuchProcess:
        pass  # it exited on its own between the check and the signal


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class LogReader:
    """Reads only what TorchServe's append-only logs gained since `mark()`, a few new bytes per poll.

    `make serve` must judge this start-up alone: a failure written on an earlier day must not count, and a
    large `ts_log.log` must not be re-read every half second.
    """

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self.offsets: dict[Path, int] = {}
        self.partial: dict[Path, bytes] = {}
        self.lines: dict[Path, list[str]] = {path: [] for path in paths}

    def mark(self) -> None:
        """From now on: remember where each file ends and forget what was read."""
        for path in self.paths:
            self.offsets[path] = path.stat().st_size if path.exists() else 0
            self.partial[path] = b""
            self.lines[path] = []

    def poll(self) -> list[str]:
        """The complete lines written since the last poll (all files; a rotated file is read from its start)."""
        new: list[str] = []
        for path in self.paths:
            if not path.exists():
                continue
            offset = self.offsets.get(path, 0)
            if path.stat().st_size < offset:  # rotated or truncated: the new file is all new
                offset, self.partial[path] = 0, b""
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
            self.offsets[path] = offset + len(chunk)
            *complete, rest = (self.partial.get(path, b"") + chunk).split(b"\n")
            self.partial[path] = rest
            decoded = [line.decode(errors="replace") for line in complete]
            self.lines[path].extend(decoded)
            new.extend(decoded)
        return new

    def tail(self, count: int) -> str:
        parts = [f"--- {path} (last {min(count, len(lines))} lines of this start) ---\n" + "\n".join(lines[-count:])
                 for path, lines in self.lines.items() if lines]
        return "\n".join(parts) or "(nothing written to the logs during this start)"


def worker_of(line: str) -> tuple[str, str] | None:
    """`(model/version, worker port)` for a line a worker thread wrote, else None."""
    match = WORKER_THREAD.search(line)
    return (f"{match['model']}/{match['version']}", match["port"]) if match else None


def worker_traceback(lines: list[str], port: str) -> list[str]:
    """The Python traceback one worker printed, from the lines that belong to it alone (other workers' lines
    interleave in model_log.log). Frames inside importlib and caret markers are dropped: they say nothing."""
    own = []
    for line in lines:
        parsed = LOG_LINE.match(line)
        if parsed and parsed["thread"].startswith(f"W-{port}-") and parsed["thread"].endswith(("-stdout", "-stderr")):
            own.append(parsed["message"])
    start = next((i for i, message in enumerate(own) if message.startswith("Traceback (most recent call last)")),
                 None)
    if start is None:
        return []
    block = own[start:]
    last = max((i for i, message in enumerate(block) if EXCEPTION_LINE.match(message)), default=None)
    block = block[:last + 1] if last is not None else block
    return [m for m in block if "<frozen importlib" not in m and not re.fullmatch(r"\s*[\^~]+\s*", m)]


@dataclass
class TorchServe:
    """One TorchServe instance: its config file, model store and a private run folder (TMPDIR, pid, logs).

    `source_config` is set for a server on free ports: it is what the config is regenerated from, with new
    ports, when another process took one of them before java could bind it.
    """

    config: Path
    model_store: Path
    run_dir: Path
    source_config: Path | None = None
    overrides: dict[str, str] | None = None
    env: dict[str, str | None] | None = None  # for java and its workers; None removes a variable

    def __post_init__(self) -> None:
        self.properties = read_properties(self.config)
        self.log_dir = self.run_dir
        self.tmp_dir = self.run_dir / "tmp"
        self.logs = LogReader([self.log_dir / "ts.out", self.log_dir / "ts_log.log", self.log_dir / "model_log.log"])
        self.orphans_killed = 0
        self.drift_at_start: Drift | None = None  # what `start` found on a server already running (`drift`)
        self.http = session()  # http(s) and http+unix (the default profile's management API is a Unix socket)
        # TorchServe's worker socket for this TMPDIR, the one form `owns` accepts for a worker
        self.worker_socket = re.compile(re.escape(str(self.tmp_dir)) + r"/\.ts\.sock\.\d+")

    @classmethod
    def on_free_ports(cls, profile_config: Path, run_dir: Path, model_store: Path,
                      overrides: dict[str, str] | None = None, env: dict[str, str | None] | None = None
                      ) -> TorchServe:
        """A server configured like `profile_config` but on free ports and with its own run folder, so that it
        runs beside `make serve` (tests and benchmarks use this); `overrides` replace config keys."""
        run_dir.mkdir(parents=True, exist_ok=True)
        config = config_on_free_ports(profile_config, run_dir / profile_config.name, model_store, overrides)
        return cls(config=config, model_store=model_store, run_dir=run_dir, source_config=profile_config,
                   overrides=overrides, env=env)

    def _move_to_new_ports(self) -> None:
        config_on_free_ports(self.source_config, self.config, self.model_store, self.overrides)
        self.properties = read_properties(self.config)

    # --- addresses and auth -------------------------------------------------------------------------------
    def url(self, api: str) -> str:
        """The API's base URL: http(s)://host:port, or http+unix://<socket> for one on a Unix socket (spoken by
        `client.transport.session()`, `self.http`)."""
        address = self.properties.get(f"{api}_address", {"inference": "http://127.0.0.1:8080",
                                                         "management": "http://127.0.0.1:8081",
                                                         "metrics": "http://127.0.0.1:8082"}[api])
        return base_url(address)

    def ports(self) -> list[tuple[str, int]]:
        """(host, port) of every TCP socket the config asks for (an API on a Unix socket has none)."""
        ports = [(urlparse(self.url(api)).hostname, urlparse(self.url(api)).port)
                 for api in ("inference", "management", "metrics") if socket_path(self.url(api)) is None]
        for api, default in (("inference", 7070), ("management", 7071)):
            host = self.properties.get(f"grpc_{api}_address", "0.0.0.0")
            ports.append((host, int(self.properties.get(f"grpc_{api}_port", default))))
        if self.has_front:
            ports.append((self.properties.get("grpc_inference_address", "0.0.0.0"),
                          int(self.properties["grpc_front_port"])))
        return ports

    @property
    def has_front(self) -> bool:
        """Whether the config puts the gRPC front (serving/grpc_front.py) before TorchServe's gRPC port."""
        return "grpc_front_port" in self.properties

    def grpc_port(self) -> int:
        """The gRPC inference port clients call: the front's (serving/grpc_front.py) when the config names one."""
        return int(self.properties.get("grpc_front_port") or self.properties.get("grpc_inference_port", 7070))

    @property
    def verify(self) -> str | bool:
        """What `requests` should trust: the server's own certificate when the APIs speak TLS (self-signed
        for local use), else the default."""
        if urlparse(self.url("management")).scheme == "https":
            return self.properties.get("certificate_file", True)
        return True

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
        """java's pid, only if the pid file names a live TorchServe of *this* run folder.

        After a crash the pid file stays behind and the kernel may give its pid to any other process; signalling
        that one would be a serious bug. So the process must be TorchServe's java with our TMPDIR on its command
        line, and must have started before the launcher wrote the pid file.
        """
        try:
            pid = int(self.pid_file.read_text().strip())
            written = self.pid_file.stat().st_mtime
            process = psutil.Process(pid)
            cmdline = process.cmdline()
            created = process.create_time()
            alive = process.status() != psutil.STATUS_ZOMBIE
        except (OSError, ValueError, psutil.Error):
            return None
        ours = self.is_our_java(cmdline)
        return pid if alive and ours and created <= written + 1.0 else None

    def declared_models(self) -> dict[str, dict[str, dict]]:
        """model → version → settings, from `models=` or, in a KServe layout, `model_snapshot`."""
        if self.properties.get("model_snapshot"):
            return json.loads(self.properties["model_snapshot"])["models"]
        return json.loads(self.properties.get("models", "{}") or "{}")

    def expected_models(self) -> dict[str, list[str]]:
        """model → versions the config declares (what must be READY)."""
        return {name: sorted(versions) for name, versions in self.declared_models().items()}

    def check_store(self) -> None:
        """The model store is ours alone: TorchServe registers any archive found in it by name, following links,
        so a store every user can write to, or a link in it pointing elsewhere, would let them run code as us.
        (Group write is left to the owner's umask: Debian and Ubuntu give each user a private group.)"""
        store = self.model_store.resolve()
        if not store.is_dir():
            raise StartupError(f"the model store {self.model_store} is not a folder: run `make archive` first")
        if store.stat().st_mode & 0o002:
            raise StartupError(f"the model store {store} is writable by every user (mode "
                               f"{store.stat().st_mode & 0o777:o}); `chmod o-w {store}` before serving from it")
        for entry in self.model_store.iterdir():
            if entry.is_symlink() and not entry.resolve().is_relative_to(store):
                raise StartupError(f"{entry} links to {entry.resolve()}, outside the model store; archives must "
                                   "live in the store itself")

    def check_tls(self) -> None:
        """A profile that speaks TLS needs its certificate and key before java starts (it would die later)."""
        if not any(urlparse(self.url(api)).scheme == "https" for api in ("inference", "management", "metrics")):
            return
        for key in TLS_FILES:
            path = self.properties.get(key)
            if not path or not Path(path).is_file():
                raise StartupError(f"{key} {path} is missing: this profile serves TLS; `make certs` writes a "
                                   "self-signed pair for local use (real ones go at the same paths)")

    def check_archives(self) -> None:
        """Every archive `load_models` names exists and matches the sha256 `make archive` recorded."""
        names = [n.strip() for n in self.properties.get("load_models", "").split(",") if n.strip()]
        names += [settings["marName"] for versions in self.declared_models().values()
                  for settings in versions.values() if settings.get("marName") not in names]
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

    def start(self, timeout: float = 180.0) -> float:
        """Start java and block until every configured version has a READY worker; returns seconds taken.

        On a server that is already running this only waits for READY workers, judging only log lines written
        from now on, and never stops it; a configured version that server does not have (retired since, or a
        config edited after the start) would never get one, so that is said at once instead.
        """
        if self.pid() is not None:
            self.drift_at_start = self.drift()
            if self.drift_at_start and self.drift_at_start.missing:
                raise StartupError(self.drift_at_start.report())
            self.logs.mark()
            self.wait_ready(timeout, launched=False)
            self.launch_front()
            return 0.0
        if shutil.which("java") is None:
            raise StartupError("java is not on PATH: TorchServe's frontend needs a JDK 17 (apt install openjdk-17-jdk)")
        self.check_store()
        self.check_archives()
        self.check_tls()
        # What a java that died left running (its workers, its gRPC front, which holds the front's port) goes
        # first, as `make stop` would have ended it.
        self.stop()
        self.clear_stale_sockets()
        started = time.monotonic()
        for attempt in range(1, PORT_ATTEMPTS + 1):
            retry = self.source_config is not None and attempt < PORT_ATTEMPTS
            taken = [(host, port) for host, port in self.ports() if not port_is_free(host, port)]
            if taken:
                if retry:
                    self._move_to_new_ports()
                    continue
                host, port = taken[0]
                raise StartupError(f"port {host}:{port} is already in use by another process; stop it or change "
                                   f"the port in {self.config}")
            self._launch()
            try:
                self.wait_ready(timeout, launched=True)
            except PortTaken:
                if not retry:
                    raise
                self._move_to_new_ports()
                continue
            self.launch_front()
            return time.monotonic() - started
        raise AssertionError("unreachable: the last attempt returns or raises")

    def clear_stale_sockets(self) -> None:
        """Remove the Unix socket of an API whose java died without removing it (TorchServe binds none over an
        existing file); refuse to start if a live server answers on it."""
        for api in ("inference", "management", "metrics"):
            path = socket_path(self.url(api))
            if path is None or not path.exists():
                continue
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                if probe.connect_ex(str(path)) == 0:
                    raise StartupError(f"another server already listens on {path}; stop it (make stop) or give "
                                       f"{api}_address another socket in {self.config}")
            path.unlink()

    def launch_env(self) -> dict[str, str]:
        """The environment java starts in: this server's private TMPDIR (pid file, sockets) and log folder, and
        `env`; creates both folders and marks the logs, so what follows is judged from this start on (a KServe
        pod rebuilt here, serving/kserve_pod.py, starts java its own way in the same environment)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.logs.mark()
        env = dict(os.environ, TMPDIR=str(self.tmp_dir), TEMP=str(self.tmp_dir), LOG_LOCATION=str(self.log_dir),
                   METRICS_LOCATION=str(self.log_dir))
        for key, value in (self.env or {}).items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env

    def _launch(self) -> None:
        env = self.launch_env()
        launcher = Path(sys.executable).with_name("torchserve")
        with open(self.log_dir / "ts.out", "ab") as out:
            # java inherits these descriptors: never a pipe, or whoever reads it blocks until java exits.
            subprocess.run([str(launcher), "--start", "--ts-config", str(self.config), "--model-store",
                            str(self.model_store), "--log-config", str(LOG_CONFIG), "--ncs"], cwd=self.run_dir,
                           env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, check=False,
                           start_new_session=True)

    # --- the gRPC front (serving/grpc_front.py: StreamPredictions2 refused, the rest passed to TorchServe) ------
    @property
    def front_pid_file(self) -> Path:
        return self.tmp_dir / "grpc_front.pid"

    def front_pid(self) -> int | None:
        """The front's pid, only if its pid file names a live serving.grpc_front started with that very file
        (so of this run folder, and never a process that inherited a stale pid)."""
        try:
            pid = int(self.front_pid_file.read_text().strip())
            process = psutil.Process(pid)
            argv = process.cmdline()
            alive = process.status() != psutil.STATUS_ZOMBIE
        except (OSError, ValueError, psutil.Error):
            return None
        ours = "serving.grpc_front" in argv and str(self.front_pid_file) in argv
        return pid if alive and ours else None

    def launch_front(self, timeout: float = 30.0) -> None:
        """Start the front when the config names `grpc_front_port` and it is not running; wait until it listens."""
        if not self.has_front or self.front_pid() is not None:
            return
        host = self.properties.get("grpc_inference_address", "0.0.0.0")
        argv = [sys.executable, "-m", "serving.grpc_front", "--listen", f"{host}:{self.properties['grpc_front_port']}",
                "--upstream", f"{'127.0.0.1' if host == '0.0.0.0' else host}:"
                              f"{self.properties.get('grpc_inference_port', 7070)}",
                "--max-message-bytes", self.properties.get("max_request_size", "6553500"),
                "--pid-file", str(self.front_pid_file)]
        if self.properties.get("enable_grpc_ssl") == "true":
            argv += ["--certificate", self.properties["certificate_file"],
                     "--private-key", self.properties["private_key_file"]]
        log = self.log_dir / "grpc_front.log"
        with open(log, "ab") as out:
            front = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while self.front_pid() is None:
            if front.poll() is not None or time.monotonic() > deadline:
                front.kill()
                raise StartupError(f"the gRPC front did not start; {log}: {log.read_text()[-400:].strip()}")
            time.sleep(0.1)

    def stop_front(self) -> bool:
        """SIGTERM the front and wait for it (SIGKILL after 10 s); False when it was not running."""
        pid = self.front_pid()
        if pid is not None:
            terminate(pid, 10)
        self.front_pid_file.unlink(missing_ok=True)
        return pid is not None

    def wait_ready(self, timeout: float, launched: bool = True) -> None:
        """Poll until every expected version has a READY worker; fail on the first sign it never will."""
        started = time.monotonic()
        expected = self.expected_models()
        while True:
            time.sleep(0.5)
            pid = self.pid()
            for line in self.logs.poll():
                self._judge(line, launched)
            if launched and pid is None and time.monotonic() - started > 5:  # the pid file appears within ~1 s
                self._fail("TorchServe's java process exited during start-up", launched)
            if pid is not None and self.not_ready(expected) == []:
                return
            if time.monotonic() - started > timeout:
                self._fail(f"no READY worker for {', '.join(self.not_ready(expected))} after {timeout:.0f} s",
                           launched)

    def _judge(self, line: str, launched: bool) -> None:
        """Raise for a log line that means this start cannot succeed."""
        if launched and any(mark in line for mark in BIND_FAILURES):
            tail = self.logs.tail(10)
            self.stop(quiet=True)
            raise PortTaken(f"a port was taken before TorchServe could bind it:\n{line}\n{tail}")
        worker = worker_of(line)
        if worker and any(mark in line for mark in WORKER_FAILURES):
            model_version, port = worker
            traceback = self._wait_for_traceback(port)
            quoted = "\n".join(f"    {t}" for t in traceback) if traceback else \
                "    (the worker printed no Python traceback; see the log tails below)"
            self._fail(f"{model_version} failed to load: its worker (W-{port}) died.\n"
                       f"  The worker's traceback:\n{quoted}", launched)
        mark = next((m for m in SERVER_FAILURES if m in line), None)
        if mark:
            self._fail(f"TorchServe reported {mark!r} while starting:\n    {line.strip()}", launched)

    def _wait_for_traceback(self, port: str) -> list[str]:
        """A dying worker's traceback may still be on its way through java's log: wait, within a bound, until it
        ends with an exception line and the worker has written nothing more for a moment."""
        deadline = time.monotonic() + TRACEBACK_WAIT_S
        traceback: list[str] = []
        while time.monotonic() < deadline:
            model_log = self.logs.lines[self.log_dir / "model_log.log"]
            traceback = worker_traceback(model_log, port)
            before = len(model_log)
            time.sleep(0.5)
            self.logs.poll()
            quiet = len(self.logs.lines[self.log_dir / "model_log.log"]) == before
            if traceback and EXCEPTION_LINE.match(traceback[-1]) and quiet:
                break
        return traceback

    def _fail(self, reason: str, launched: bool) -> None:
        tail = self.logs.tail(10)
        if launched:  # never stop a server this call did not start
            self.stop(quiet=True)
        raise StartupError(f"{reason}\n{tail}")

    def describe(self, model: str) -> list[dict]:
        response = self.http.get(f"{self.url('management')}/models/{model}/all", headers=self.headers("management"),
                                 timeout=5, verify=self.verify)
        response.raise_for_status()
        return response.json()

    def registered(self) -> dict[str, tuple[list[str], str]] | None:
        """model → (its registered versions, its default version), as the running server has them; None while
        its management API does not answer. TorchServe registers every `load_models` archive before that API
        listens, so an answer is complete."""
        try:
            listed = self.http.get(f"{self.url('management')}/models", params={"limit": 1000}, timeout=5,
                                   headers=self.headers("management"), verify=self.verify)
            listed.raise_for_status()
            found = {}
            for entry in listed.json()["models"]:
                model = entry["modelName"]
                default = self.http.get(f"{self.url('management')}/models/{model}", timeout=5,
                                        headers=self.headers("management"), verify=self.verify).json()
                found[model] = (sorted(d["modelVersion"] for d in self.describe(model)), default[0]["modelVersion"])
            return found
        except (requests.RequestException, ValueError, KeyError, IndexError):
            return None

    def drift(self, wait_s: float = 10.0) -> Drift | None:
        """How the running server's versions differ from this config's (None when they agree, or when its API
        gave no answer within `wait_s`)."""
        deadline = time.monotonic() + wait_s
        while (registered := self.registered()) is None:
            if time.monotonic() > deadline or self.pid() is None:
                return None
            time.sleep(0.5)
        declared = self.declared_models()
        configured = {(m, v) for m, versions in declared.items() for v in versions}
        running = {(m, v) for m, (versions, _) in registered.items() for v in versions}
        defaults = {m: (default, next((v for v, s in declared[m].items() if s.get("defaultVersion")), None))
                    for m, (_, default) in registered.items() if m in declared}
        drift = Drift(missing=sorted(configured - running), extra=sorted(running - configured),
                      defaults={m: pair for m, pair in defaults.items() if pair[1] and pair[0] != pair[1]},
                      config=self.source_config or self.config)
        return drift if drift.missing or drift.extra or drift.defaults else None

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
        """SIGTERM java and wait for it (SIGKILL after `timeout`), then end any worker of this server that
        outlived it (also when java had already died: its workers keep running); False when nothing of ours
        was running."""
        front = self.stop_front()
        pid = self.pid()
        if pid is not None:
            terminate(pid, timeout)
        self.orphans_killed = self.kill_orphans()
        self.pid_file.unlink(missing_ok=True)  # stale when java was gone: its pid may be anyone's now
        self.key_file.unlink(missing_ok=True)  # the keys die with the server; a new start writes new ones
        return pid is not None or front or self.orphans_killed > 0

    def owns(self, process: psutil.Process) -> bool:
        """Whether `process` is provably this server's: TorchServe's java with exactly our TMPDIR as its
        `java.io.tmpdir`, or a worker in TorchServe's exact form for it (`ts/model_service_worker.py --sock-name
        <our TMPDIR>/.ts.sock.<port>`) whose parent is such a java or, once java died, nobody's TorchServe (it
        was handed to init). A command line that merely contains the path (an editor, `tail`, `logs/tmp2`) is
        not ours."""
        argv = process.cmdline()
        if JAVA_MAIN in argv:
            return self.is_our_java(argv)
        worker = (any(a.endswith("ts/model_service_worker.py") for a in argv) and "--sock-name" in argv[:-1]
                  and self.worker_socket.fullmatch(argv[argv.index("--sock-name") + 1]) is not None)
        if not worker:
            return False
        parent = process.parent()
        return parent is None or JAVA_MAIN not in parent.cmdline() or self.owns(parent)

    def is_our_java(self, argv: list[str]) -> bool:
        """TorchServe's java with exactly this server's TMPDIR (a java of `logs/tmp2` is not ours)."""
        return JAVA_MAIN in argv and f"-Djava.io.tmpdir={self.tmp_dir}" in argv

    def kill_orphans(self) -> int:
        """SIGKILL what outlived java and is provably ours (`owns`): its workers, and a java whose pid file went
        missing. Processes we may not inspect are left alone."""
        killed = 0
        for process in psutil.process_iter():
            try:
                if process.pid != os.getpid() and self.owns(process):
                    process.kill()
                    killed += 1
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue  # gone between the listing and the kill, or not ours to inspect
        return killed


@dataclass(frozen=True)
class Drift:
    """A running server whose versions are no longer what its config declares (README, "Versions")."""

    missing: list[tuple[str, str]]  # configured, not registered: never READY
    extra: list[tuple[str, str]]  # registered since the start, not in the config
    defaults: dict[str, tuple[str, str]]  # model → (default on the server, default in the config)
    config: Path

    def report(self) -> str:
        lines = [f"the running TorchServe differs from {self.config.name}:"]
        lines += [f"  {m}/{v}: in {self.config.name}, not registered on the server" for m, v in self.missing]
        lines += [f"  {m}/{v}: registered on the server, not in {self.config.name}" for m, v in self.extra]
        lines += [f"  {m}: default version {running} on the server, {configured} in {self.config.name}"
                  for m, (running, configured) in self.defaults.items()]
        lines.append(f"`make stop && make serve` starts over from {self.config.name}; or leave the server as it "
                     "is (make status shows it)")
        return "\n".join(lines)


class PortTaken(StartupError):
    """java could not bind a port that was free a moment before (another process took it)."""


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
    for model, versions in server.expected_models().items():
        try:
            described = {d["modelVersion"]: d for d in server.describe(model)}
        except (requests.RequestException, ValueError) as exc:
            return [f"the management API does not answer ({type(exc).__name__})"]
        for version in versions:
            ready = [w for w in described.get(version, {}).get("workers", []) if w.get("status") == "READY"]
            if not ready:
                problems.append(f"{model}/{version}: no READY worker")
            problems += [f"{model}/{version}: READY worker {w['pid']} is gone" for w in ready
                         if not pid_alive(int(w["pid"]))]
    return problems


def local(profile: str = "default") -> TorchServe:
    """The server `make serve` runs: the profile's config (as logs/<profile file>, with absolute TLS paths),
    ./model_store, and logs/ as its run folder."""
    run_dir, store = ROOT / "logs", ROOT / "model_store"
    config = write_config(PROFILES[profile], run_dir / PROFILES[profile].name, store)
    return TorchServe(config=config, model_store=store, run_dir=run_dir)


def running_profile() -> str:
    marker = ROOT / "logs" / "profile"
    return marker.read_text().strip() if marker.exists() else "default"


def print_status(server: TorchServe) -> None:
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
                 "(inference; StreamPredictions2 refused, README \"gRPC\")")
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
    p.add_argument("--config", type=Path, help="run/health: the config TorchServe runs with")
    p.add_argument("--model-store", type=Path, help="run/health: the model store")
    p.add_argument("--run-dir", type=Path, help="run/health: a writable folder for logs, pid and sockets")
    args = p.parse_args(argv)

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
    print(banner(server, seconds, already, server.drift_at_start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
