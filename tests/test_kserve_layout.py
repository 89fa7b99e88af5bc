"""`make kserve`'s layout: what KServe's TorchServe runtime needs, generated from config.properties alone."""
from __future__ import annotations

import json

import pytest

from models.checksum import sha256_of
from serving import kserve
from serving.config import PROFILES, read_properties


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    return kserve.build(tmp_path_factory.mktemp("kserve") / "layout")


def test_the_snapshot_is_config_properties_models(layout):
    """One source of truth: every model and version with the same workers and batching as `make serve`."""
    config = read_properties(layout / "config" / "config.properties")
    snapshot = json.loads(config["model_snapshot"])
    models = json.loads(read_properties(PROFILES["default"])["models"])
    assert snapshot["models"] == {name: {version: {"defaultVersion": False, **settings}
                                         for version, settings in versions.items()}
                                  for name, versions in models.items()}
    assert [v for versions in snapshot["models"].values() for v in versions.values() if v["defaultVersion"]] == [
        models["cifar10"]["1.0"], models["mnist"]["1.0"]]
    assert snapshot["modelCount"] == sum(len(versions) for versions in models.values()) == 3


def test_kserve_runtime_settings(layout):
    config = read_properties(layout / "config" / "config.properties")
    assert config["inference_address"] == config["management_address"] == "http://127.0.0.1:8085"  # pod-only
    assert config["metrics_address"] == "http://0.0.0.0:8082" and config["metrics_mode"] == "prometheus"
    assert config["enable_envvars_config"] == "true" and config["install_py_dep_per_model"] == "false"
    assert config["model_store"] == "/mnt/models/model-store"
    assert config["disable_token_authorization"] == "true" and config["enable_model_api"] == "false"
    assert config["grpc_inference_address"] == config["grpc_management_address"] == "127.0.0.1"
    prod = read_properties(PROFILES["prod"])
    for key in kserve.KEPT:  # a pod is production: its limits and memory settings are the prod profile's
        assert config[key] == prod[key], key
    assert int(config["max_request_size"]) <= 2**20 and "-Xmx" in config["vmargs"]


def test_every_archive_is_there_and_matches_its_sha256(layout):
    snapshot = json.loads(read_properties(layout / "config" / "config.properties")["model_snapshot"])
    names = {s["marName"] for versions in snapshot["models"].values() for s in versions.values()}
    store = layout / "model-store"
    assert {p.name for p in store.glob("*.mar")} == names
    for name in names:
        assert (store / f"{name}.sha256").read_text().split()[0] == sha256_of(store / name)


def test_token_auth_only_when_asked(tmp_path):
    layout = kserve.build(tmp_path / "layout", token_auth=True)
    assert read_properties(layout / "config" / "config.properties")["disable_token_authorization"] == "false"


def test_a_canary_layout_moves_only_the_default(tmp_path):
    """KServe's paths reach default versions only, so a canary revision serves a layout with another default."""
    canary = kserve.build(tmp_path / "canary", defaults={"cifar10": "2.0"})
    models = json.loads(read_properties(canary / "config" / "config.properties")["model_snapshot"])["models"]
    assert [v for v, s in models["cifar10"].items() if s["defaultVersion"]] == ["2.0"]
    assert models["mnist"]["1.0"]["defaultVersion"] is True
    with pytest.raises(ValueError, match="cifar10 9.0 is not in"):
        kserve.build(tmp_path / "bad", defaults={"cifar10": "9.0"})


def test_only_the_plain_images_layout_listens_beyond_loopback(tmp_path):
    """In a KServe pod only the wrapper fronts TorchServe; the plain image (deploy/docker/Dockerfile) has no
    front, so `make kserve`'s build/docker binds 0.0.0.0, and nothing else does."""
    config = read_properties(kserve.build(tmp_path / "docker", host="0.0.0.0") / "config" / "config.properties")
    assert config["inference_address"] == config["management_address"] == "http://0.0.0.0:8085"


def test_a_version_of_your_own_is_copied_from_the_model_store_and_checked(tmp_path):
    """A model config.prod.properties names that the catalog does not ship (docs/models.md, "Serve your own classifier")
    comes from model_store/, where `make archive MODEL=...` wrote it, and must still match its sha256."""
    store = tmp_path / "model_store"
    store.mkdir()
    (store / "shapes.mar").write_bytes(b"an archive")
    (store / "shapes.mar.sha256").write_text(f"{sha256_of(store / 'shapes.mar')}  shapes.mar\n")
    properties = PROFILES["prod"].read_text().splitlines()
    models = {"shapes": {"1.0": {"defaultVersion": True, "marName": "shapes.mar", "minWorkers": 1,
                                 "maxWorkers": 1, "batchSize": 8, "maxBatchDelay": 1, "responseTimeout": 30}}}
    source = tmp_path / "config.prod.properties"
    source.write_text("\n".join(f"models={json.dumps(models)}" if line.startswith("models=") else
                                "load_models=shapes.mar" if line.startswith("load_models=") else line
                                for line in properties) + "\n")
    out = kserve.build(tmp_path / "layout", source=source, model_store=store)
    assert (out / "model-store" / "shapes.mar").read_bytes() == b"an archive"
    (store / "shapes.mar").write_bytes(b"tampered")
    with pytest.raises(RuntimeError, match="does not match its sha256"):
        kserve.build(tmp_path / "layout", source=source, model_store=store)
    with pytest.raises(FileNotFoundError, match="make archive MODEL="):
        kserve.build(tmp_path / "layout", source=source, model_store=tmp_path / "empty")
