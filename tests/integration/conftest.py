"""A real TorchServe on free ports with a private TMPDIR, built from real archives, stopped whatever happens."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from serving import archive
from serving.catalog import ROOT, SHIPPED, ModelVersion
from serving.server import TorchServe

PORT_KEYS = ("inference_address", "management_address", "metrics_address", "grpc_inference_port",
             "grpc_management_port")


def pytest_collection_modifyitems(items):
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.integration)


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
    """The repository's config file with its ports moved to free ones and the model store replaced."""
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


def build_store(store: Path) -> Path:
    for version in SHIPPED:
        archive.build(version, store)
    # A second cifar10 version for the versioning story: registered at run time, not at start-up.
    archive.build(ModelVersion("cifar10", "2.0", "lenet", SHIPPED[0].weights), store)
    return store


def start(tmp: Path, profile_config: Path, store: Path) -> TorchServe:
    config = config_on_free_ports(profile_config, tmp / profile_config.name, store)
    server = TorchServe(config=config, model_store=store, run_dir=tmp / "run")
    server.start(timeout=240)
    return server


@pytest.fixture(scope="session")
def model_store(tmp_path_factory) -> Path:
    return build_store(tmp_path_factory.mktemp("model_store"))


@pytest.fixture(scope="session")
def served(tmp_path_factory, model_store):
    """TorchServe as config.properties configures it (local profile), on free ports."""
    server = start(tmp_path_factory.mktemp("ts-default"), ROOT / "config.properties", model_store)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def served_prod(tmp_path_factory, model_store):
    """TorchServe as config.prod.properties configures it: tokens on, model API off."""
    server = start(tmp_path_factory.mktemp("ts-prod"), ROOT / "config.prod.properties", model_store)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def cli(served):
    """Run `python -m client ...` against the test server; returns the completed process."""
    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "client", "--inference-url", served.url("inference"),
                               "--management-url", served.url("management"), *args],
                              cwd=ROOT, capture_output=True, text=True, timeout=120, check=check)
    return run


@pytest.fixture
def predict_url(served):
    return lambda path="cifar10": f"{served.url('inference')}/predictions/{path}"


def describe(server: TorchServe, model: str) -> list[dict]:
    return requests.get(f"{server.url('management')}/models/{model}/all", timeout=10).json()
