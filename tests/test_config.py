"""The configuration files agree with each other and keep their promises (loopback only, auth per profile)."""
from __future__ import annotations

import json
import re
from dataclasses import asdict
from urllib.parse import urlparse

import pytest
import yaml

from serving.catalog import ROOT, SHIPPED, model_config
from serving.config import PROFILES, read_properties

BATCHING = ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout")


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_models_batching_matches_the_archive_yaml(profile):
    """TorchServe lets the archive's YAML win over models=; keeping both equal means neither misleads."""
    models = json.loads(read_properties(PROFILES[profile])["models"])
    for model, versions in models.items():
        for version, settings in versions.items():
            config = model_config(model, version)
            assert {k: settings[k] for k in BATCHING} == {k: config[k] for k in BATCHING}, (model, version)


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_address_is_loopback_and_every_loaded_archive_is_built(profile):
    """Every TCP address is loopback; the default profile's management API is a Unix socket in the run folder
    (no browser can reach it: SECURITY.md), prod's is keyed https."""
    properties = read_properties(PROFILES[profile])
    tcp = ("inference_address", "metrics_address") if profile == "default" else \
        ("inference_address", "management_address", "metrics_address")
    for key in tcp:
        assert urlparse(properties[key]).hostname == "127.0.0.1", key
    if profile == "default":
        assert properties["management_address"] == "unix:management.sock"
    assert properties["grpc_inference_address"] == properties["grpc_management_address"] == "127.0.0.1"
    shipped = {v.archive_name for v in SHIPPED}
    loaded = set(properties["load_models"].split(","))
    assert loaded <= shipped
    declared = {s["marName"] for versions in json.loads(properties["models"]).values() for s in versions.values()}
    assert declared == loaded


def test_profiles_differ_only_where_production_needs_it():
    from handlers.imaging import Limits

    default, prod = read_properties(PROFILES["default"]), read_properties(PROFILES["prod"])
    assert default["disable_token_authorization"] == "true" and default["enable_model_api"] == "true"
    assert prod["disable_token_authorization"] == "false" and prod["enable_model_api"] == "false"
    for profile in (default, prod):
        # 1 MiB: 256 connections (a browser's most) of the largest bodies leave java whole (test_flood.py); an
        # image the handler's max_bytes admits fits a request as base64, so that limit is the one a client meets.
        assert int(profile["max_request_size"]) <= 1024 * 1024
        assert Limits().max_bytes * 4 / 3 <= int(profile["max_request_size"])
    for key in ("models", "load_models", "metrics_mode", "allowed_urls"):
        assert default[key] == prod[key], key
    for key in ("inference_address", "management_address", "metrics_address"):
        assert urlparse(prod[key]).scheme == "https", key
    for key in ("inference_address", "metrics_address"):
        assert urlparse(default[key]).scheme == "http", key
    assert prod["enable_grpc_ssl"] == "true" and prod["certificate_file"] and prod["private_key_file"]


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_no_url_can_register_an_archive(profile):
    """allowed_urls is a regex that matches no URL at all (TorchServe matches the whole URL against it)."""
    pattern = re.compile(read_properties(PROFILES[profile])["allowed_urls"], re.IGNORECASE)
    for url in ("file:///tmp/x/model_store/e.mar", "file:///work/main/model_store/cifar10.mar",
                "http://127.0.0.1:9/evil.mar", "https://example.org/model_store/a.mar", ""):
        assert not pattern.fullmatch(url), url


@pytest.mark.parametrize("version", SHIPPED, ids=lambda v: f"{v.model}-{v.version}")
def test_yaml_limits_are_the_handlers_defaults_and_fit_the_response_timeout(version):
    """The YAML documents the limits in force; a batch's deadline leaves most of responseTimeout spare, so a
    slow batch answers 503 for its last requests instead of the frontend declaring the worker dead."""
    from handlers.imaging import Limits

    config = version.config
    limits = {k: config["handler"][k] for k in Limits.__dataclass_fields__}
    assert limits == asdict(Limits())
    assert Limits().batch_deadline_ms <= config["responseTimeout"] * 1000 / 2
    assert Limits().max_request_pixels <= Limits().max_batch_pixels


@pytest.mark.parametrize("version", SHIPPED, ids=lambda v: f"{v.model}-{v.version}")
def test_a_version_with_several_workers_keeps_one_that_only_predicts(version):
    """Explanations never hold every worker of a version that has more than one (docs/explanations.md): its
    `explain_workers` is below its minWorkers. A one-worker version explains on its only worker."""
    config = version.config
    explain_workers = config["handler"]["explain_workers"]
    assert explain_workers >= 1
    assert explain_workers < config["minWorkers"] or config["maxWorkers"] == 1, config


def test_cors_admits_the_demo_origin_only_and_prod_admits_none(tmp_path):
    """One loopback origin, which `make demo` serves the page at; `*` or a remote origin is refused by the demo
    command; the production profile names no origin, so no web page may call it."""
    from client.demo import origin_and_api

    origin, api = origin_and_api(ROOT / "config.properties")
    assert origin == "http://127.0.0.1:8090" and api == "http://127.0.0.1:8080"
    assert "cors_allowed_origin" not in read_properties(ROOT / "config.prod.properties")
    for bad in ("*", "https://example.com", "http://127.0.0.1"):
        config = tmp_path / "c.properties"
        config.write_text(f"inference_address=http://127.0.0.1:8080\ncors_allowed_origin={bad}\n")
        with pytest.raises(SystemExit, match="must be one http://127.0.0.1:<port> origin"):
            origin_and_api(config)


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_the_frontends_memory_is_bounded_in_every_profile(profile):
    """java's heap is capped (and with it direct memory, which defaults to the heap's size), committed from the
    start, and a heap OutOfMemoryError ends java (docs/serving.md, "Memory"); the queue and netty threads the memory
    arithmetic assumes are set, not TorchServe's defaults (100 per version, one thread per CPU the JVM sees)."""
    from tests import jvm

    properties = read_properties(PROFILES[profile])
    bounds = jvm.asked(properties["vmargs"])
    assert bounds["ExitOnOutOfMemoryError"] and 0 < bounds["MaxHeapSize"] <= 384 * 2**20
    # committed and touched at start: java's resident size is flat from the first minute (docs/serving.md, "Memory")
    assert bounds["InitialHeapSize"] == bounds["MaxHeapSize"] and bounds["AlwaysPreTouch"]
    assert bounds["MaxDirectMemorySize"] in (0, bounds["MaxHeapSize"])  # a smaller cap timed workers out
    assert int(properties["job_queue_size"]) == 64 and int(properties["number_of_netty_threads"]) == 2
    default, prod = read_properties(PROFILES["default"]), read_properties(PROFILES["prod"])
    for key in ("vmargs", "job_queue_size", "number_of_netty_threads"):
        assert default[key] == prod[key], key


def test_a_unix_socket_address_goes_to_the_servers_run_folder(tmp_path):
    """`management_address=unix:management.sock` is written as an absolute path in the run folder of the config
    being written (logs/ for `make serve`, a test's own folder on free ports), never moved to a TCP port; a path
    the kernel cannot bind is refused with the reason."""
    from serving.config import config_on_free_ports

    written = read_properties(config_on_free_ports(PROFILES["default"], tmp_path / "run" / "config.properties",
                                                   tmp_path / "store"))
    assert written["management_address"] == f"unix:{tmp_path / 'run' / 'management.sock'}"
    assert urlparse(written["inference_address"]).hostname == "127.0.0.1"
    deep = tmp_path / ("d" * 100)
    with pytest.raises(ValueError, match="Unix sockets allow 107"):
        config_on_free_ports(PROFILES["default"], deep / "config.properties", tmp_path / "store")


def test_a_stale_management_socket_is_cleared_and_a_live_one_refuses_the_start(tmp_path):
    """java killed with -9 leaves its socket file, over which TorchServe cannot bind: the next start removes it.
    A socket something still listens on is another server's, and the start says so instead."""
    import socket

    from serving.config import config_on_free_ports
    from serving.preflight import StartupError
    from serving.process import TorchServe
    from serving.transport import socket_path

    run = tmp_path / "run"
    config = config_on_free_ports(PROFILES["default"], run / "config.properties", tmp_path / "store")
    server = TorchServe(config=config, model_store=tmp_path / "store", run_dir=run)
    path = socket_path(server.url("management"))
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(path))  # closed without unlinking, as a killed java leaves it
    server.clear_stale_sockets()
    assert not path.exists()
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(path))
        live.listen(1)
        with pytest.raises(StartupError, match="another server already listens on"):
            server.clear_stale_sockets()


def test_model_config_files_say_only_what_differs():
    """default.yaml holds every setting once; a model's or a version's file holds only what it changes (a value
    equal to the one it overrides would be a copy that could drift), and names no setting default.yaml lacks."""
    from serving.catalog import config_files

    for version in SHIPPED:
        files = config_files(version.model, version.version)
        assert files[0].name == "default.yaml"
        merged = yaml.safe_load(files[0].read_text())
        for path in files[1:]:
            layer = yaml.safe_load(path.read_text())
            for key, value in {**layer, **{f"handler.{k}": v for k, v in layer.pop("handler", {}).items()}}.items():
                section, _, name = key.rpartition(".")
                below = merged.get("handler", {}) if section else merged
                assert name in below, (path.name, key)
                assert below.get(name) != value, f"{path.name}: {key}: {value} repeats the value it overrides"
            merged = {**merged, **layer, "handler": {**merged["handler"], **yaml.safe_load(path.read_text()).get(
                "handler", {})}}
        assert merged == version.config


def test_stop_status_and_token_write_nothing(tmp_path, monkeypatch, capsys):
    """Only `start` writes the run folder's config; the read-only commands read what a running server was started
    with, or, before any start, what `start` would write (on the old code each of them rewrote
    logs/config.properties)."""
    from serving import server

    run_dir = tmp_path / "logs"
    run_dir.mkdir()
    monkeypatch.setattr(server, "RUN_DIR", run_dir)
    monkeypatch.setattr(server, "PROFILE_MARKER", run_dir / "profile")
    assert server.main(["status"]) == 0 and "not running" in capsys.readouterr().out
    assert server.main(["stop"]) == 0 and "was not running" in capsys.readouterr().out
    assert server.main(["token", "inference"]) == 1
    assert list(run_dir.iterdir()) == []
    local = server.local()
    assert local.url("management").endswith(str(run_dir / "management.sock").replace("/", "%2F"))
