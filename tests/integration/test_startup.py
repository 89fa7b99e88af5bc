"""Start-up faults stop cleanly and say what went wrong: a taken port, a missing, tampered or broken archive."""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serving.catalog import ROOT
from serving.server import StartupError, TorchServe
from training.data import sha256_of


def server_for(tmp_path: Path, store: Path) -> TorchServe:
    return TorchServe.on_free_ports(ROOT / "config.properties", tmp_path / "run", store)


def copy_store(model_store: Path, dest: Path) -> Path:
    shutil.copytree(model_store, dest)
    return dest


def test_a_taken_port_is_named(tmp_path, model_store):
    server = server_for(tmp_path, model_store)
    host, port = server.ports()[1]
    with socket.socket() as blocker:
        blocker.bind((host, port))
        blocker.listen()
        with pytest.raises(StartupError, match=f"port {host}:{port} is already in use"):
            server.start()
    assert server.pid() is None


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


def test_a_handler_that_fails_to_import_stops_the_server_with_the_log(tmp_path, model_store):
    store = copy_store(model_store, tmp_path / "store")
    handler = tmp_path / "broken_handler.py"
    handler.write_text("import no_such_module_anywhere\n\n\nclass Broken:\n    pass\n")
    subprocess.run([str(Path(sys.executable).with_name("torch-model-archiver")), "--model-name", "mnist",
                    "--version", "1.0", "--model-file", str(ROOT / "models" / "mnist_convnet.py"),
                    "--serialized-file", str(ROOT / "models" / "weights" / "mnist_convnet.pt"),
                    "--handler", str(handler), "--export-path", str(store), "--force"], check=True)
    (store / "mnist.mar.sha256").write_text(f"{sha256_of(store / 'mnist.mar')}  mnist.mar\n")
    server = server_for(tmp_path, store)
    started = time.monotonic()
    with pytest.raises(StartupError) as failure:
        server.start(timeout=120)
    assert time.monotonic() - started < 90
    assert "ModuleNotFoundError" in str(failure.value) and "no_such_module_anywhere" in str(failure.value)
    assert server.pid() is None
