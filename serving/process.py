"""One TorchServe process tree, started, watched and stopped the way `make serve`, `make stop` and a container promise.

TorchServe 0.12's launcher returns 0 even when start-up fails and `/ping` says Healthy while workers crash-loop,
so this module trusts neither: after the checks of serving/preflight.py it starts java detached with its output
in the run folder, and then waits until every configured model version has a READY worker (`not_ready`, the one
check `make serve`'s wait and a container's health check share), or until java dies or a model fails to load, in
which case it stops what it started and says why: the model/version that failed, that worker's own traceback
(serving/logs.py), then short tails of the logs. A process is signalled only when it is provably this server's.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import psutil
import requests

from serving import preflight
from serving.catalog import ROOT
from serving.config import config_on_free_ports, port_is_free, read_properties
from serving.logs import (
    BIND_FAILURES,
    EXCEPTION_LINE,
    SERVER_FAILURES,
    WORKER_FAILURES,
    LogReader,
    worker_of,
    worker_traceback,
)
from serving.preflight import StartupError
from serving.transport import base_url, session, socket_path

LOG_CONFIG = ROOT / "serving" / "log4j2.xml"
APIS = ("inference", "management", "metrics")
JAVA_MAIN = "org.pytorch.serve.ModelServer"  # the class on TorchServe's java command line
PORT_ATTEMPTS = 4  # a server on free ports picks new ones when another process takes one before java binds it
TRACEBACK_WAIT_S = 10.0  # how long to wait for a failed worker's traceback to be written in full


class PortTaken(StartupError):
    """java could not bind a port that was free a moment before (another process took it)."""


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
    properties: dict[str, str] | None = None  # the config's, when it is not (yet) written to `config`

    def __post_init__(self) -> None:
        if self.properties is None:
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
        `serving.transport.session()`, `self.http`)."""
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
        preflight.check(self.model_store, self.properties, [self.url(api) for api in APIS], self.declared_models())
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
        while True:
            time.sleep(0.5)
            pid = self.pid()
            for line in self.logs.poll():
                self._judge(line, launched)
            if launched and pid is None and time.monotonic() - started > 5:  # the pid file appears within ~1 s
                self._fail("TorchServe's java process exited during start-up", launched)
            if pid is not None and not self.not_ready():
                return
            if time.monotonic() - started > timeout:
                self._fail(f"not ready after {timeout:.0f} s: {'; '.join(self.not_ready())}", launched)

    def _judge(self, line: str, launched: bool) -> None:
        """Raise for a log line that means this start cannot succeed."""
        if launched and any(mark in line for mark in BIND_FAILURES):
            tail = self.logs.tail(10)
            self.stop()
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
            self.stop()
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

    def not_ready(self) -> list[str]:
        """What keeps this server from answering every configured version, [] when nothing does: a version with
        no READY worker, a READY worker whose process is gone (TorchServe lists it READY for a moment after it
        dies), or a management API that does not answer. `make serve` waits for [], a container's health check
        reports the rest."""
        problems = []
        for model, versions in self.expected_models().items():
            try:
                described = {d["modelVersion"]: d for d in self.describe(model)}
            except (requests.RequestException, ValueError) as exc:
                return [f"the management API does not answer ({type(exc).__name__})"]
            for version in versions:
                ready = [w for w in described.get(version, {}).get("workers", []) if w.get("status") == "READY"]
                if not ready:
                    problems.append(f"{model}/{version}: no READY worker")
                problems += [f"{model}/{version}: READY worker {w['pid']} is gone" for w in ready
                             if not pid_alive(int(w["pid"]))]
        return problems

    def stop(self, timeout: float = 60.0) -> bool:
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
    """A running server whose versions are no longer what its config declares (docs/serving.md, "Versions")."""

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

