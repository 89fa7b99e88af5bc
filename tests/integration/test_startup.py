"""Start-up faults stop cleanly and say what went wrong: a taken port, a missing, tampered or broken archive; and
the server module never acts on another day's log lines or on a process that only reuses java's old pid."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from models.checksum import sha256_of
from serving import config as config_module
from serving import process as process_module
from serving.catalog import ROOT
from serving.preflight import StartupError
from serving.process import TorchServe


def server_for(tmp_path: Path, store: Path) -> TorchServe:
    return TorchServe.on_free_ports(ROOT / "config.properties", tmp_path / "run", store)


def copy_store(model_store: Path, dest: Path) -> Path:
    shutil.copytree(model_store, dest)
    return dest


def test_a_taken_port_is_named(tmp_path, model_store):
    """`make serve` on fixed ports (no source config to re-pick from) names the port another process holds."""
    source = server_for(tmp_path, model_store)
    server = TorchServe(config=source.config, model_store=model_store, run_dir=tmp_path / "run")
    host, port = server.ports()[1]
    with socket.socket() as blocker:
        blocker.bind((host, port))
        blocker.listen()
        with pytest.raises(StartupError, match=f"port {host}:{port} is already in use"):
            server.start()
    assert server.pid() is None


def test_a_server_on_free_ports_moves_when_a_port_is_taken_first(tmp_path, model_store, monkeypatch):
    """The race of free_ports (the port is free when picked, taken before java binds it) is won by moving, both
    when the check sees it and when java's own bind fails (BindException) after the check said free."""
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        real_free_ports = config_module.free_ports
        handed_out = []

        def racy_free_ports(count: int) -> list[int]:
            ports = real_free_ports(count)
            if not handed_out:
                ports[0] = taken  # the first pick loses the race for its inference port
            handed_out.append(ports)
            return ports

        monkeypatch.setattr(config_module, "free_ports", racy_free_ports)
        # The pre-check looks away, as it would if the port were taken just after it: java's bind must fail.
        monkeypatch.setattr(process_module, "port_is_free", lambda host, port: True)
        server = server_for(tmp_path, model_store)
        assert server.ports()[0][1] == taken
        try:
            server.start(timeout=240)
            assert server.ports()[0][1] != taken and len(handed_out) >= 2
            assert server.not_ready() == []
        finally:
            server.stop()


def test_a_missing_archive_is_named(tmp_path, model_store):
    store = copy_store(model_store, tmp_path / "store")
    (store / "mnist.mar").unlink()
    with pytest.raises(StartupError, match=r"mnist.mar is missing: run `make archive`"):
        server_for(tmp_path, store).start()


def test_a_tampered_archive_is_refused(tmp_path, model_store):
    store = copy_store(model_store, tmp_path / "store")
    with open(store / "cifar10.mar", "ab") as f:
        f.write(b"\0")
    with pytest.raises(StartupError, match="does not match the sha256 recorded"):
        server_for(tmp_path, store).start()


def test_a_handler_that_fails_to_import_is_named_with_its_own_traceback(tmp_path, model_store):
    """The error names mnist/1.0 and quotes the traceback of mnist's worker, not whichever lines came last in the
    log that every worker shares; the generous timeout is never what ends the wait."""
    store = copy_store(model_store, tmp_path / "store")
    handler = tmp_path / "broken_handler.py"
    handler.write_text("import no_such_module_anywhere\n\n\nclass Broken:\n    pass\n")
    subprocess.run([str(Path(sys.executable).with_name("torch-model-archiver")), "--model-name", "mnist",
                    "--version", "1.0", "--model-file", str(ROOT / "models" / "mnist_convnet.py"),
                    "--serialized-file", str(ROOT / "models" / "weights" / "mnist_convnet.pt"),
                    "--handler", str(handler), "--export-path", str(store), "--force"], check=True,
                   env=dict(os.environ, TMPDIR=str(tmp_path)))  # the archiver stages in $TMPDIR/<model-name>
    (store / "mnist.mar.sha256").write_text(f"{sha256_of(store / 'mnist.mar')}  mnist.mar\n")
    server = server_for(tmp_path, store)
    with pytest.raises(StartupError) as failure:
        server.start(timeout=240)
    message = str(failure.value)
    headline, _, rest = message.partition("The worker's traceback:")
    assert "mnist/1.0 failed to load" in headline and "no READY worker" not in message
    quoted = rest.split("\n---", 1)[0]
    assert "Traceback (most recent call last)" in quoted
    assert "import no_such_module_anywhere" in quoted
    assert "ModuleNotFoundError: No module named 'no_such_module_anywhere'" in quoted
    assert "cifar10" not in quoted  # only mnist's worker's own lines
    assert server.pid() is None


def test_serve_on_a_running_server_ignores_old_failures_in_the_logs(served):
    """A failure line from an earlier start must not make `make serve` stop a healthy server."""
    old = ("2026-01-01T00:00:00,000 [WARN ] W-9003-mnist_1.0 org.pytorch.serve.wlm.BatchAggregator - "
           "Load model failed: mnist, error: Worker died.\n")
    with open(served.log_dir / "ts_log.log", "a") as log:
        log.write(old)
    again = TorchServe(config=served.config, model_store=served.model_store, run_dir=served.run_dir)
    assert again.start(timeout=60) == 0.0
    assert served.pid() is not None and served.not_ready() == []


def test_a_stale_pid_file_never_signals_another_process(tmp_path, model_store):
    """After a crash the pid in the file may belong to any process: stop() must leave it alone."""
    server = server_for(tmp_path, model_store)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        server.tmp_dir.mkdir(parents=True, exist_ok=True)
        server.pid_file.write_text(f"{bystander.pid}\n")
        assert server.pid() is None
        assert server.stop() is False
        assert bystander.poll() is None and psutil.Process(bystander.pid).status() != psutil.STATUS_ZOMBIE
        assert not server.pid_file.exists()
    finally:
        bystander.kill()
        bystander.wait()


def fake_worker(tmp_path: Path, server: TorchServe, port: int = 9000) -> subprocess.Popen:
    """A process in TorchServe's exact worker form for `server`'s TMPDIR (a script named like the worker's),
    parented by this test, not by a TorchServe java: what a crashed java's worker looks like."""
    script = tmp_path / "ts" / "model_service_worker.py"
    script.parent.mkdir(exist_ok=True)
    script.write_text("import sys\nsys.stdin.read()\n")
    server.tmp_dir.mkdir(parents=True, exist_ok=True)
    worker = subprocess.Popen([sys.executable, str(script), "--sock-type", "unix", "--sock-name",
                               f"{server.tmp_dir}/.ts.sock.{port}"], stdin=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while str(script) not in psutil.Process(worker.pid).cmdline():  # until the child has exec'd the script
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return worker


def test_stop_signals_only_processes_it_can_prove_are_this_servers(tmp_path, model_store):
    """Bystanders whose command lines hold the server's TMPDIR (an editor, `tail`, a sibling `tmp2` folder, a
    worker form for another folder) survive `stop`; a worker in TorchServe's exact form for this TMPDIR whose
    java is gone does not."""
    server = server_for(tmp_path, model_store)
    server.tmp_dir.mkdir(parents=True, exist_ok=True)
    sleeper = "import sys; sys.stdin.read()"
    tmp = str(server.tmp_dir)
    bystanders = [subprocess.Popen([sys.executable, "-c", sleeper, *argv], stdin=subprocess.PIPE) for argv in (
        [f"{tmp}/.ts.sock.9000"],                                   # `tail`-like: the path as an argument
        [f"{tmp}2/.ts.sock.9000", "--sock-name", f"{tmp}2/.ts.sock.9000"],  # logs/tmp2
        ["ts/model_service_worker.py", "--sock-name", f"{tmp}/other/.ts.sock.9000"],
        ["org.pytorch.serve.ModelServer", f"-Djava.io.tmpdir={tmp}2"])]
    orphan = fake_worker(tmp_path, server)
    try:
        assert server.stop() is True  # java was not running, but a worker of it was
        assert orphan.wait(10) == -9 and server.orphans_killed == 1
        assert all(b.poll() is None for b in bystanders)
    finally:
        for process in [*bystanders, orphan]:
            process.kill()
            process.wait()


def test_stop_survives_a_worker_that_exits_between_listing_and_kill(tmp_path, model_store, monkeypatch):
    """A process listed as an orphan may be gone by the time it is killed; that is success, not an error."""
    server = server_for(tmp_path, model_store)
    gone = fake_worker(tmp_path, server)
    listed = psutil.Process(gone.pid)
    assert server.owns(listed)

    def proven_then_gone(process: psutil.Process) -> bool:
        gone.communicate(b"")  # it exits, and is reaped, after being proven ours and before the kill
        return True

    monkeypatch.setattr(server, "owns", proven_then_gone)
    monkeypatch.setattr(psutil, "process_iter", lambda attrs=None: iter([listed]))
    assert server.kill_orphans() == 0


def test_a_crashed_javas_workers_are_cleaned_up_by_stop(tmp_path, model_store):
    """java killed hard leaves its workers running (their sockets stay open); `stop` proves them ours by
    TorchServe's worker form for this TMPDIR and ends them, though java's pid is gone."""
    server = server_for(tmp_path, model_store)
    server.start(timeout=240)
    java = psutil.Process(server.pid())
    workers = [w for w in java.children(recursive=True) if any("model_service_worker" in a for a in w.cmdline())]
    assert workers
    java.kill()
    java.wait(30)
    alive = [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
    assert server.stop() == bool(alive) or alive == []
    gone, left = psutil.wait_procs(workers, timeout=30)
    assert left == [], f"workers outlived stop: {left}"


def test_start_after_a_java_crash_replaces_what_it_left(tmp_path, model_store):
    """java killed hard leaves its workers and its gRPC front running, the front on its port: `start` again (what
    `make serve` does after a crash, without `make stop`) ends them and comes up with a new java and front."""
    models = {"mnist": {"1.0": {"defaultVersion": True, "marName": "mnist.mar", "minWorkers": 1, "maxWorkers": 1}}}
    server = TorchServe.on_free_ports(ROOT / "config.properties", tmp_path / "run", model_store,
                                      {"load_models": "mnist.mar", "models": json.dumps(models)})
    server.start(timeout=240)
    try:
        java, front = psutil.Process(server.pid()), psutil.Process(server.front_pid())
        java.kill()
        java.wait(30)
        assert front.is_running()
        server.start(timeout=240)
        assert server.pid() not in (None, java.pid) and server.front_pid() not in (None, front.pid)
        assert not front.is_running() or front.status() == psutil.STATUS_ZOMBIE
    finally:
        server.stop()


def test_serve_on_a_server_that_no_longer_matches_its_config_says_what_differs_at_once(served):
    """`make serve` after the README's version walkthrough (a configured version retired, another registered,
    the default moved): the versions the config declares and the server lacks could never get a READY worker,
    so the start says which, and what to run, within seconds instead of waiting out its timeout. On the old code
    this waited the full timeout and said only `no READY worker for ... after N s`."""
    properties = served.config.read_text()
    models = json.loads(config_module.read_properties(served.config)["models"])
    drifted = {"cifar10": {**models["cifar10"], "3.0": {**models["cifar10"]["2.0"], "marName": "cifar10-3.0.mar"}}}
    drifted["cifar10"]["2.0"] = {**drifted["cifar10"]["2.0"], "defaultVersion": True}
    drifted["cifar10"]["1.0"] = {k: v for k, v in drifted["cifar10"]["1.0"].items() if k != "defaultVersion"}
    config = served.run_dir / "drifted.properties"
    config.write_text("\n".join(f"models={json.dumps(drifted)}" if line.startswith("models=") else line
                                for line in properties.splitlines()) + "\n")
    again = TorchServe(config=config, model_store=served.model_store, run_dir=served.run_dir)
    started = time.monotonic()
    with pytest.raises(StartupError) as raised:
        again.start(timeout=120)
    assert time.monotonic() - started < 15
    report = str(raised.value)
    assert "cifar10/3.0: in drifted.properties, not registered on the server" in report
    assert "mnist/1.0: registered on the server, not in drifted.properties" in report
    assert "cifar10: default version 1.0 on the server, 2.0 in drifted.properties" in report
    assert "make stop && make serve" in report
    assert served.pid() is not None and served.not_ready() == []  # nothing was stopped
