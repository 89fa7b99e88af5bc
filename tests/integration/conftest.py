"""A real TorchServe on free ports with a private TMPDIR, built from real archives, stopped whatever happens."""
from __future__ import annotations

import importlib
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
from grpc_tools import protoc

from serving import archive
from serving.catalog import ROOT, SHIPPED
from serving.process import TorchServe


def pytest_collection_modifyitems(items):
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.integration)


def build_store(store: Path) -> Path:
    for version in SHIPPED:
        archive.build(version, store)
    return store


@contextmanager
def running(run_dir: Path, profile_config: Path, store: Path,
            overrides: dict[str, str] | None = None) -> Iterator[TorchServe]:
    """A started server on free ports, stopped (with any worker it left) however the block ends."""
    server = TorchServe.on_free_ports(profile_config, run_dir, store, overrides)
    server.start(timeout=240)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def model_store(tmp_path_factory) -> Path:
    return build_store(tmp_path_factory.mktemp("model_store"))


@pytest.fixture(scope="session")
def served(tmp_path_factory, model_store):
    """TorchServe as config.properties configures it (local profile), on free ports."""
    with running(tmp_path_factory.mktemp("ts-default"), ROOT / "config.properties", model_store) as server:
        yield server


@pytest.fixture(scope="module")
def served_prod(tmp_path_factory, model_store):
    """TorchServe as config.prod.properties configures it: TLS with a pair `make certs` would write, tokens on,
    model API off."""
    from serving.certs import generate

    certificate, key = generate(tmp_path_factory.mktemp("certs"))
    tls = {"certificate_file": str(certificate), "private_key_file": str(key)}
    with running(tmp_path_factory.mktemp("ts-prod"), ROOT / "config.prod.properties", model_store, tls) as server:
        yield server


@pytest.fixture
def cli(served):
    """Run `python -m client ...` against the test server; returns the completed process."""
    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "client", "--inference-url", served.url("inference"),
                               "--management-url", served.url("management"), "--metrics-url",
                               served.url("metrics"), *args],
                              cwd=ROOT, capture_output=True, text=True, timeout=120, check=check)
    return run


@pytest.fixture
def predict_url(served):
    return lambda path="cifar10": f"{served.url('inference')}/predictions/{path}"


def describe(server: TorchServe, model: str) -> list[dict]:
    return server.http.get(f"{server.url('management')}/models/{model}/all", timeout=10).json()


def served_tolerance(server: TorchServe, model: str, version: str = "1.0") -> float:
    """How far two answers of this version may differ across server-side batches: the tolerance of the numeric
    mode its workers report (tests/answers.py)."""
    from client.api import TorchServeClient
    from tests.answers import tolerance

    client = TorchServeClient(management_url=server.url("management"), inference_url=server.url("inference"))
    return tolerance(client.handler_description(model, version)["numerics"]["mode"])


@pytest.fixture(scope="session")
def stubs(tmp_path_factory) -> SimpleNamespace:
    """Python stubs compiled now from proto/*.proto in ts/frontend/model-server.jar (never committed)."""
    import ts

    out = tmp_path_factory.mktemp("grpc_stubs")
    with zipfile.ZipFile(Path(ts.__file__).parent / "frontend" / "model-server.jar") as jar:
        for name in ("proto/inference.proto", "proto/management.proto", "google/rpc/status.proto"):
            jar.extract(name, out)
    include = Path(protoc.__file__).parent / "_proto"
    status = protoc.main(["protoc", f"-I{out}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}",
                          "proto/inference.proto", "proto/management.proto", "google/rpc/status.proto"])
    assert status == 0
    sys.path.insert(0, str(out))
    try:
        return SimpleNamespace(**{name: importlib.import_module(f"proto.{name}") for name in (
            "inference_pb2", "inference_pb2_grpc", "management_pb2", "management_pb2_grpc")})
    finally:
        sys.path.remove(str(out))
