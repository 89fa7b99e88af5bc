"""A real TorchServe started from exactly `make kserve`'s layout (its ports moved to free ones, every address bound
to 127.0.0.1 instead of the layout's 0.0.0.0, and the model store's path), with each value
KServe may give TS_SERVICE_ENVELOPE: v1 and v2 clients at once, sharing server-side batches."""
from __future__ import annotations

import io
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

from serving import kserve
from serving.catalog import ROOT
from tests.conftest import require
from tests.images import b64

CAT = (ROOT / "examples" / "cat.png").read_bytes()
HORSE = (ROOT / "examples" / "horse.png").read_bytes()
SAMPLE = ROOT.parent / "shared" / "kserve" / "samples" / "v2_bytes_conv_mnist_v2_bytes.json"


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    return kserve.build(tmp_path_factory.mktemp("kserve") / "layout")


@pytest.fixture(scope="module", params=[None, "kserve", "kservev2"], ids=["unset", "kserve", "kservev2"])
def cluster(request, tmp_path_factory, layout):
    """TorchServe as KServe's runtime starts it: --ts-config and --model-store from the layout."""
    from serving.process import TorchServe

    run_dir = tmp_path_factory.mktemp(f"kserve-{request.param}")
    server = TorchServe.on_free_ports(layout / "config" / "config.properties", run_dir, layout / "model-store",
                                      env={"TS_SERVICE_ENVELOPE": request.param})
    server.start(timeout=240)
    try:
        yield server
    finally:
        server.stop()


def test_java_runs_with_the_layouts_memory_bounds(cluster, layout):
    """The bound the pod's memory limit was computed with (docs/serving.md, "Memory") is the one the running JVM holds:
    the heap cap of the layout's vmargs (direct memory follows it) and ExitOnOutOfMemoryError, read from the
    process."""
    from serving.config import read_properties
    from tests import jvm

    asked = jvm.asked(read_properties(layout / "config" / "config.properties")["vmargs"])
    assert asked["MaxHeapSize"] and asked["ExitOnOutOfMemoryError"]
    assert jvm.running(cluster.pid()) == asked


def v1(images: list[bytes]) -> dict:
    return {"instances": [{"b64": b64(i)} for i in images]}


def v2_bytes(images: list[bytes], request_id: str) -> dict:
    return {"id": request_id, "inputs": [{"name": "images", "datatype": "BYTES", "shape": [len(images)],
                                          "data": [b64(i) for i in images]}]}


def v2_uint8(image: bytes, request_id: str) -> dict:
    pixels = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))[None]
    return {"id": request_id, "inputs": [{"name": "pixels", "datatype": "UINT8", "shape": list(pixels.shape),
                                          "data": pixels.flatten().tolist()}]}


def top1_v2(body: dict) -> list[str]:
    labels = next(o for o in body["outputs"] if o["name"] == "labels")
    n, k = labels["shape"]
    return [labels["data"][i * k] for i in range(n)]


def test_v1_and_v2_clients_at_once_share_batches(cluster):
    """48 requests at 16-way concurrency, v1 and v2 (BYTES and UINT8) interleaved: each gets its own correct
    answer in its own protocol, and requests of both protocols shared server-side batches."""
    inference = cluster.url("inference")
    jobs = []
    for i in range(16):
        jobs.append(("v1", f"{inference}/v1/models/cifar10:predict", v1([CAT, HORSE][: 1 + i % 2]), None))
        jobs.append(("v2", f"{inference}/v2/models/cifar10/infer", v2_bytes([HORSE, CAT][: 1 + i % 2], f"b{i}"),
                     f"b{i}"))
        jobs.append(("v2", f"{inference}/v2/models/cifar10/infer", v2_uint8(CAT, f"u{i}"), f"u{i}"))

    def send(job):
        kind, url, body, request_id = job
        return job, requests.post(url, json=body, timeout=60)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(send, jobs))
    batched = 0
    for (kind, _, body, request_id), response in results:
        assert response.status_code == 200, response.text[:300]
        answer = response.json()
        if kind == "v1":
            expected = ["cat", "horse"][: len(body["instances"])]
            assert [next(iter(p)) for p in answer["predictions"]] == expected
        else:
            count = len(body["inputs"][0]["data"]) if body["inputs"][0]["datatype"] == "BYTES" else 1
            expected = ["horse", "cat"][:count] if request_id.startswith("b") else ["cat"]
            assert answer["id"] == request_id and answer["model_name"] == "cifar10"
            assert answer["model_version"] == "1.0" and top1_v2(answer) == expected
        batched = max(batched, int(response.headers.get("X-Batch-Size", 1)))
    assert batched > 1, "no two requests shared a server-side batch"


def test_kserve_sample_request_and_errors(cluster):
    inference = cluster.url("inference")
    require(SAMPLE.is_file(), f"{SAMPLE} is absent: KServe's samples are only on CI and the project's machines")
    sample = requests.post(f"{inference}/v2/models/mnist/infer", data=SAMPLE.read_bytes(),
                           headers={"Content-Type": "application/json"}, timeout=60)
    assert sample.status_code == 200, sample.text
    assert top1_v2(sample.json()) == ["0"] and sample.json()["model_name"] == "mnist"
    bad = requests.post(f"{inference}/v2/models/cifar10/infer", timeout=60, json={
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 32, 32, 3], "data": [7.0] * 3072}]})
    assert bad.status_code == 400 and "must lie in [0.0, 1.0]" in bad.json()["error"]
    bad_v1 = requests.post(f"{inference}/v1/models/cifar10:predict", json={"instances": [{"b64": "@@"}]}, timeout=60)
    assert bad_v1.status_code == 400 and list(bad_v1.json()) == ["error"]
    metrics = requests.get(f"{cluster.url('metrics')}/metrics", timeout=30).text  # what KServe scrapes (8082)
    assert 'ts_inference_requests_total{model_name="mnist"' in metrics


@pytest.mark.parametrize("cluster", ["kservev2"], indirect=True)  # one server is enough for the client
@pytest.mark.parametrize("protocol", ["v1", "v2"])
def test_cli_predict_speaks_kserve_protocols(cluster, protocol):
    def predict(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "client", "--inference-url", cluster.url("inference"),
                               "predict", "examples/cat.png", "--protocol", protocol, *extra], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)

    out = predict("--topk", "2")
    assert out.returncode == 0 and out.stdout.startswith("examples/cat.png: cat ") and out.stdout.count(",") == 1
    versioned = predict("--version", "2.0")  # TorchServe routes KServe paths to default versions only
    assert versioned.returncode == 2 and "default version only" in versioned.stderr


def test_the_canary_layout_answers_kserve_paths_with_2_0(tmp_path):
    """The canary revision's layout (make kserve: build/kserve-cifar10-canary) makes 2.0 what KServe reaches."""
    from serving.process import TorchServe

    layout = kserve.build(tmp_path / "canary", defaults={"cifar10": "2.0"}, only=["cifar10"])
    server = TorchServe.on_free_ports(layout / "config" / "config.properties", tmp_path / "run",
                                      layout / "model-store")
    server.start(timeout=240)
    try:
        answer = requests.post(f"{server.url('inference')}/v2/models/cifar10/infer", json=v2_bytes([CAT], "c"),
                               timeout=60).json()
        assert answer["model_version"] == "2.0" and top1_v2(answer) == ["cat"]
        assert server.expected_models() == {"cifar10": ["1.0", "2.0"]}
    finally:
        server.stop()
