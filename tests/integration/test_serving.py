"""Against a real TorchServe: every input format, per-item errors under concurrency, batching, versions,
scaling, metrics, the production profile and the client CLI."""
from __future__ import annotations

import contextlib
import json
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch

from serving import archive
from serving.catalog import ROOT, SHIPPED
from tests.answers import same
from tests.images import b64
from tests.integration.conftest import describe, served_tolerance

CAT = (ROOT / "examples" / "cat.png").read_bytes()
HORSE = (ROOT / "examples" / "horse.png").read_bytes()
DIGIT = (ROOT / "examples" / "digit7.png").read_bytes()


def test_every_input_format_over_http(served, predict_url):
    url = predict_url()
    tol = served_tolerance(served, "cifar10")  # a client batch of 2 runs other kernels than one of 1
    expected = requests.put(url, data=CAT, timeout=30).json()  # curl -T cat.png
    assert next(iter(expected)) == "cat" and len(expected) == 5
    horse = requests.post(url, data=HORSE, timeout=30).json()
    assert next(iter(horse)) == "horse"
    answers = {
        "image content type": requests.post(url, data=CAT, headers={"Content-Type": "image/png"}, timeout=30),
        "no content type": requests.post(url, data=CAT, timeout=30),
        "multipart data": requests.post(url, files={"data": ("cat.png", CAT, "image/png")}, timeout=30),
        "multipart other field": requests.post(url, files={"upload": ("c.png", CAT, "image/png")}, timeout=30),
        "base64 text": requests.post(url, data=b64(CAT), headers={"Content-Type": "text/plain"}, timeout=30),
        "data URL": requests.post(url, data="data:image/png;base64," + b64(CAT),
                                  headers={"Content-Type": "text/plain"}, timeout=30),
        "json": requests.post(url, json={"data": b64(CAT)}, timeout=30),
    }
    for name, response in answers.items():
        assert response.status_code == 200, (name, response.text)
        assert same(response.json(), expected, tol), name
    batch = requests.post(url, json={"data": [b64(CAT), b64(HORSE)]}, timeout=30)
    assert same(batch.json(), [expected, horse], tol)
    envelope = {"data": [{"content_type": "image/png", "data": b64(CAT), "shape": [3, 32, 32]}]}
    assert same(requests.post(url, json=envelope, timeout=30).json(), [expected], tol)
    kserve = requests.post(url, json={"instances": [{"b64": b64(CAT)}, {"b64": b64(HORSE)}]}, timeout=30)
    assert same(kserve.json(), {"predictions": [expected, horse]}, tol)
    mnist = requests.put(predict_url("mnist"), data=DIGIT, timeout=30).json()
    assert next(iter(mnist)) == "7" and len(mnist) == 3


def test_topk_per_request(predict_url):
    url = predict_url()
    assert len(requests.post(url, json={"data": b64(CAT), "topk": 2}, timeout=30).json()) == 2
    assert len(requests.put(url, data=CAT, headers={"X-TopK": "1"}, timeout=30).json()) == 1
    assert len(requests.post(url, files={"data": CAT, "topk": (None, "3")}, timeout=30).json()) == 3
    bad = requests.put(url, data=CAT, headers={"X-TopK": "0"}, timeout=30)
    assert bad.status_code == 400 and bad.json()["type"] == "InvalidTopK"
    # TorchServe's frontend passes no query parameter to a worker (docs/serving.md, Top-k): the YAML's k answers.
    assert len(requests.put(f"{url}?topk=2", data=CAT, timeout=30).json()) == 5
    assert len(requests.post(f"{url}?topk=2", json={"data": b64(CAT)}, timeout=30).json()) == 5


def test_a_body_sent_as_a_form_that_is_not_one_is_the_frontends_500(predict_url):
    """docs/serving.md, Errors: a body sent as a form that is not one is refused by the frontend itself with a
    500, before any handler runs (curl -d / --data-binary without a Content-Type); the same bytes with their
    type, or sent with curl -T, are answered."""
    url = predict_url()
    form = requests.post(url, data=CAT, headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=30)
    assert form.status_code == 500 and form.json()["type"] == "ErrorDataDecoderException"
    typed = requests.post(url, data=CAT, headers={"Content-Type": "image/png"}, timeout=30)
    assert typed.status_code == 200 and next(iter(typed.json())) == "cat"


BAD_REQUESTS = [
    (dict(data=b""), 400),
    (dict(data=b"\x89PNG\r\n\x1a\n garbage"), 400),
    (dict(json={"data": "!!!"}), 400),
    (dict(json={"data": [{"data": b64(CAT), "shape": [1, 28, 28]}]}), 400),
    (dict(json={"nothing": 1}), 400),
]


def test_per_item_errors_inside_batches_under_concurrency(served, predict_url):
    url = predict_url()
    expected = requests.put(url, data=CAT, timeout=30).json()
    tol = served_tolerance(served, "cifar10")  # answered in batches of every size up to 8
    pids_before = {w["pid"] for w in describe(served, "cifar10")[0]["workers"]}
    jobs = [(dict(data=CAT), 200)] * 48 + BAD_REQUESTS * 8
    jobs = [jobs[(i * 37) % len(jobs)] for i in range(len(jobs))]  # interleave good and bad
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda job: requests.post(url, timeout=30, **job[0]), jobs))
    batched = 0
    for (_, status), response in zip(jobs, responses, strict=True):
        assert response.status_code == status, response.text
        body = response.json()
        if status == 200:
            assert same(body, expected, tol)
        else:
            assert body["code"] == status and body["message"] and body["type"]
        batched = max(batched, int(response.headers["X-Batch-Size"]))
    assert batched > 1, "no request shared a server-side batch"
    assert {w["pid"] for w in describe(served, "cifar10")[0]["workers"]} == pids_before


def test_server_side_batching_under_concurrent_load(predict_url):
    """X-Batch-Size is set by the handler from the batch TorchServe handed it."""
    with ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(lambda _: requests.put(predict_url(), data=CAT, timeout=30), range(256)))
    sizes = [int(r.headers["X-Batch-Size"]) for r in responses]
    assert all(r.status_code == 200 for r in responses)
    # How full batches get depends on how fast this client sends (a busy host fills fewer); that requests share
    # batches at all is what the server promises.
    assert max(sizes) > 1, sizes


def request_counters(served) -> tuple[float, float]:
    """(Requests2XX, Requests4XX) from one Prometheus scrape."""
    text = requests.get(f"{served.url('metrics')}/metrics", timeout=10).text
    return tuple(sum(float(v) for v in re.findall(rf"^{name}{{[^}}]*}} ([0-9.]+)$", text, re.MULTILINE))
                 for name in ("Requests2XX", "Requests4XX"))


def test_metrics_count_requests(served, predict_url):
    """Requests2XX/4XX count every request the frontend answers. Whether a scrape counts itself (and when in the
    scrape) is TorchServe's business, so two scrapes with nothing between them measure what one scrape adds."""
    first, _ = request_counters(served)
    ok_before, bad_before = request_counters(served)
    per_scrape = ok_before - first
    for _ in range(7):
        assert requests.put(predict_url("mnist"), data=DIGIT, timeout=30).status_code == 200
    for _ in range(3):
        assert requests.put(predict_url("mnist"), data=b"nope", timeout=30).status_code == 400
    ok_after, bad_after = request_counters(served)
    assert ok_after - ok_before == 7 + per_scrape
    assert bad_after - bad_before == 3


def log_lines(served) -> int:
    return sum(len((served.log_dir / name).read_text().splitlines()) for name in ("ts_log.log", "model_log.log"))


def test_the_logs_hold_no_lines_per_request_while_metrics_still_count(served, predict_url):
    """TorchServe logs five or six INFO lines per batch (frontend: "Sending response for jobId", "Looping backend
    response", "Backend response time", the worker's two [METRICS] lines echoed as "result="; worker: "Backend
    received inference at"), which on two cores cost ~2 ms of the frontend's CPU per request at one connection
    (docs/speed.md, Speed). serving/log4j2.xml drops exactly those; the worker's metrics are still parsed into
    Prometheus. Twenty sequential requests leave fewer than 20 lines (before: over 100)."""
    before = log_lines(served)
    for _ in range(20):
        assert requests.put(predict_url("mnist"), data=DIGIT, timeout=30).status_code == 200
    assert log_lines(served) - before < 20
    text = requests.get(f"{served.url('metrics')}/metrics", timeout=10).text
    handler_time = re.findall(r'^HandlerTime{[^}]*ModelName="mnist"[^}]*} ([0-9.]+)$', text, re.MULTILINE)
    assert handler_time and float(handler_time[0]) > 0, text[:2000]


def test_scaling_workers(served, cli):
    cli("scale", "mnist", "--workers", "2")
    workers = describe(served, "mnist")[0]["workers"]
    assert len(workers) == 2 and all(w["status"] == "READY" for w in workers)
    cli("scale", "mnist", "--workers", "1")
    deadline = time.monotonic() + 120  # a generous bound on a condition, not a timing claim
    while len(describe(served, "mnist")[0]["workers"]) != 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(describe(served, "mnist")[0]["workers"]) == 1


def answered_by(predict_url, path: str = "cifar10") -> str:
    response = requests.put(predict_url(path), data=CAT, timeout=30)
    assert response.status_code == 200, response.text
    return response.headers["X-Model-Version"]


def test_versioning_story_with_the_cli(served, cli, predict_url):
    """The README's story: 2.0 beside 1.0, try it, promote it, roll back; unregister and register again."""
    listing = cli("versions", "cifar10").stdout
    assert "cifar10 1.0 (default)" in listing and "cifar10 2.0:" in listing
    try:
        assert answered_by(predict_url, "cifar10/2.0") == "2.0"
        assert answered_by(predict_url, "cifar10/1.0") == "1.0"
        assert answered_by(predict_url) == "1.0"
        cli("promote", "cifar10", "2.0")
        assert answered_by(predict_url) == "2.0"
        assert "default is now 1.0" in cli("rollback", "cifar10").stdout
        assert answered_by(predict_url) == "1.0"
        failed = cli("unregister", "cifar10", "1.0", check=False)  # the default version cannot be removed
        assert failed.returncode == 1 and "HTTP 403: cifar10 1.0 is the default version" in failed.stderr
        cli("unregister", "cifar10", "2.0")
        assert [d["modelVersion"] for d in describe(served, "cifar10")] == ["1.0"]
        assert requests.put(predict_url("cifar10/2.0"), data=CAT, timeout=30).status_code == 404
        assert "registered" in cli("register", "cifar10-2.0.mar").stdout
        assert answered_by(predict_url, "cifar10/2.0") == "2.0"
    finally:
        cli("promote", "cifar10", "1.0", check=False)
        if "2.0" not in [d["modelVersion"] for d in describe(served, "cifar10")]:
            cli("register", "cifar10-2.0.mar", check=False)
    assert answered_by(predict_url) == "1.0"


@pytest.mark.parametrize("version", [v for v in SHIPPED if v.model == "cifar10"], ids=lambda v: v.version)
def test_served_top1_equals_in_process_top1(served, predict_url, validation_split, version):
    """200 validation images, PNG-encoded over HTTP from 8 clients at once (so in server-side batches of any size
    up to 8), get the top-1 an independent reference computes in the mode the version's workers report; where
    that mode is an fp32 one, the eager fp32 network's top-1 too (tests/answers.py states the tolerances)."""
    from client.api import TorchServeClient
    from models.specs import CIFAR10
    from tests import images, reference
    from tests.answers import unexplained_top1_differences

    val_images, _ = validation_split("cifar10")
    val_images = val_images[:200]
    mode = TorchServeClient(management_url=served.url("management")).handler_description(
        version.model, version.version)["numerics"]["mode"]
    pngs = [images.encode(img.permute(1, 2, 0).numpy()) for img in val_images]
    url = predict_url(f"cifar10/{version.version}")
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda png: requests.put(url, data=png, timeout=60), pngs))
    assert all(r.status_code == 200 for r in responses)
    served_top1 = torch.tensor([CIFAR10.classes.index(next(iter(r.json()))) for r in responses])
    in_mode = reference.probabilities(version, mode, CIFAR10.normalize(val_images), batch_size=8)
    assert unexplained_top1_differences(served_top1, in_mode, mode) == []
    if mode in ("fp32", "fp32-cl"):
        fp32 = reference.probabilities(version, "fp32", CIFAR10.normalize(val_images), batch_size=200)
        assert unexplained_top1_differences(served_top1, fp32, "fp32") == []


def test_cli_predict(cli):
    out = cli("predict", "examples/cat.png", "examples/horse.png", "--topk", "2").stdout.splitlines()
    assert out[0].startswith("examples/cat.png: cat ") and out[1].startswith("examples/horse.png: horse ")
    assert all(line.count(",") == 1 for line in out)
    digit = cli("predict", "examples/digit7.png", "--model", "mnist").stdout
    assert digit.startswith("examples/digit7.png: 7 ")
    missing = cli("predict", "examples/cat.png", "--model", "nope", check=False)
    assert missing.returncode == 1 and "404" in missing.stderr


def test_production_profile_requires_tokens_and_refuses_the_model_api(served_prod):
    inference, management = served_prod.url("inference"), served_prod.url("management")
    tls = {"verify": served_prod.verify, "timeout": 30}
    url = f"{inference}/predictions/cifar10"
    assert requests.put(url, data=CAT, **tls).status_code in (400, 401)
    assert requests.get(f"{management}/models", **tls).status_code in (400, 401)
    auth = {"Authorization": f"Bearer {served_prod.token('inference')}"}
    answer = requests.put(url, data=CAT, headers=auth, **tls)
    assert answer.status_code == 200 and next(iter(answer.json())) == "cat"
    manage = {"Authorization": f"Bearer {served_prod.token('management')}"}
    assert requests.get(f"{management}/models", headers=manage, **tls).status_code == 200
    register = requests.post(f"{management}/models", params={"url": "cifar10-2.0.mar"}, headers=manage, **tls)
    assert register.status_code == 405
    too_big = requests.put(url, data=b"\0" * (2 * 1024 * 1024), headers=auth, **tls)
    assert too_big.status_code == 413


B64_CAT = b64(CAT)
V2_BODY = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": [B64_CAT]}]}
# Every route TorchServe 0.12 serves on the prod profile's inference and management ports, KServe's included, with
# what a keyed call answers (the management routes that change state go last, on a version nothing else uses).
PROD_ROUTES = [
    ("inference", "GET", "/ping", {}, 200),
    ("inference", "PUT", "/predictions/cifar10", {"data": CAT}, 200),
    ("inference", "PUT", "/predictions/cifar10/2.0", {"data": CAT}, 200),
    ("inference", "PUT", "/explanations/mnist", {"data": DIGIT}, 200),
    ("inference", "POST", "/v1/models/cifar10:predict", {"json": {"instances": [{"b64": B64_CAT}]}}, 200),
    ("inference", "POST", "/v1/models/mnist:explain",
     {"json": {"instances": [{"b64": b64(DIGIT)}]}}, 200),
    ("inference", "POST", "/v2/models/cifar10/infer", {"json": V2_BODY}, 200),
    ("inference", "GET", "/v2/health/live", {}, 404),  # no such route: the key is checked before the route
    ("management", "GET", "/models", {}, 200),
    ("management", "GET", "/models/cifar10", {}, 200),
    ("management", "GET", "/models/cifar10/all", {}, 200),
    ("management", "GET", "/models/cifar10/1.0?customized=true", {}, 200),
    ("management", "POST", "/models?url=mnist.mar&model_name=intruder", {}, 405),  # model API off
    ("management", "PUT", "/models/mnist/1.0?min_worker=1&synchronous=true", {}, 200),
    ("management", "PUT", "/models/mnist/1.0/set-default", {}, 200),
    ("management", "DELETE", "/models/intruder/1.0", {}, 405),
    ("management", "POST", "/token?type=inference", {}, 400),  # needs the API key, not the management key
]


def test_production_refuses_every_route_without_its_key(served_prod):
    """Without a key, or with a wrong one, every route of the inference and management APIs answers 400
    InvalidKeyException (TorchServe's answer; not 401) and does nothing; with its key each answers as it should.
    Not keyed by TorchServe, and said so in SECURITY.md: `/api-description` (the OpenAPI text every TorchServe
    serves) and `/metrics` (its own port)."""
    tls = {"verify": served_prod.verify, "timeout": 60}
    before = {d["modelVersion"]: len(d["workers"]) for d in served_prod.describe("mnist")}
    for api, method, path, kwargs, _ in PROD_ROUTES:
        url = served_prod.url(api) + path
        for headers in ({}, {"Authorization": "Bearer not-the-key"}, {"Authorization": "not-a-bearer-header"}):
            refused = requests.request(method, url, headers=headers, **kwargs, **tls)
            assert refused.status_code == 400 and refused.json()["type"] == "InvalidKeyException", \
                (method, path, headers, refused.status_code, refused.text[:200])
        other_key = served_prod.token("management" if api == "inference" else "inference")
        crossed = requests.request(method, url, headers={"Authorization": f"Bearer {other_key}"}, **kwargs, **tls)
        assert crossed.status_code == 400, (method, path, "the other API's key", crossed.status_code)
    assert {d["modelVersion"]: len(d["workers"]) for d in served_prod.describe("mnist")} == before
    for api, method, path, kwargs, keyed_status in PROD_ROUTES:
        keyed = requests.request(method, served_prod.url(api) + path, **kwargs, **tls,
                                 headers={"Authorization": f"Bearer {served_prod.token(api)}"})
        assert keyed.status_code == keyed_status, (method, path, keyed.status_code, keyed.text[:200])
    assert requests.get(f"{served_prod.url('inference')}/api-description", **tls).status_code == 200
    assert requests.get(f"{served_prod.url('metrics')}/metrics", **tls).status_code == 200


def test_production_grpc_speaks_tls_and_needs_the_keys(served_prod, stubs):
    """gRPC in prod: TLS with the configured certificate (a plaintext channel gets nowhere), and without the
    key (or with the other API's) every call is refused PERMISSION_DENIED (TorchServe's code); with it, it
    is answered."""
    import grpc

    trust = grpc.ssl_channel_credentials(root_certificates=Path(served_prod.verify).read_bytes())
    # Inference through the gRPC front clients call (serving/grpc_front.py: TLS on both of its sides, the key
    # passed through), management straight to TorchServe.
    ports = {"inference": served_prod.grpc_port(), "management": served_prod.properties["grpc_management_port"]}
    request = stubs.inference_pb2.PredictionsRequest(model_name="cifar10", input={"data": CAT})
    with grpc.insecure_channel(f"127.0.0.1:{ports['inference']}") as plain:
        with pytest.raises(grpc.RpcError) as refused:
            stubs.inference_pb2_grpc.InferenceAPIsServiceStub(plain).Predictions(request, timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    with grpc.secure_channel(f"127.0.0.1:{ports['inference']}", trust) as channel, \
            grpc.secure_channel(f"127.0.0.1:{ports['management']}", trust) as manage_channel:
        inference = stubs.inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        management = stubs.management_pb2_grpc.ManagementAPIsServiceStub(manage_channel)
        describe_request = stubs.management_pb2.DescribeModelRequest(model_name="cifar10")
        for metadata in ((), (("authorization", "Bearer not-the-key"),),
                         (("authorization", f"Bearer {served_prod.token('management')}"),)):
            with pytest.raises(grpc.RpcError) as refused:
                inference.Predictions(request, metadata=metadata, timeout=30)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, (metadata, refused.value)
        for metadata in ((), (("authorization", f"Bearer {served_prod.token('inference')}"),)):
            with pytest.raises(grpc.RpcError) as refused:
                management.DescribeModel(describe_request, metadata=metadata, timeout=30)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, (metadata, refused.value)
        answer = inference.Predictions(request, timeout=30,
                                       metadata=(("authorization", f"Bearer {served_prod.token('inference')}"),))
        assert next(iter(json.loads(answer.prediction))) == "cat"
        described = management.DescribeModel(describe_request, timeout=30,
                                             metadata=(("authorization", f"Bearer {served_prod.token('management')}"),))
        assert json.loads(described.msg)[0]["modelName"] == "cifar10"
    # TorchServe's own gRPC inference port, behind the front, asks for the key as well.
    with grpc.secure_channel(f"127.0.0.1:{served_prod.properties['grpc_inference_port']}", trust) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            stubs.inference_pb2_grpc.InferenceAPIsServiceStub(channel).Predictions(request, timeout=30)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_production_profile_speaks_tls_only(served_prod):
    """Every API is https with the configured certificate; plain http to the same ports is refused (TorchServe
    answers 403 and closes), and a client that does not trust the certificate refuses to talk."""
    for api in ("inference", "management", "metrics"):
        address = served_prod.url(api)
        assert address.startswith("https://127.0.0.1:"), address
        plain = requests.put(address.replace("https://", "http://") + "/predictions/cifar10", data=CAT, timeout=10)
        assert plain.status_code == 403 and "only accepts HTTPS" in plain.json()["status"]
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(f"{address}/ping", timeout=10)  # the system's CAs do not know a self-signed pair
    assert requests.get(f"{served_prod.url('metrics')}/metrics", verify=served_prod.verify, timeout=30).ok
    assert served_prod.properties["enable_grpc_ssl"] == "true"


def test_production_keys_are_removed_on_stop(tmp_path, model_store):
    from serving.certs import generate
    from serving.process import TorchServe

    certificate, key = generate(tmp_path / "certs")
    server = TorchServe.on_free_ports(ROOT / "config.prod.properties", tmp_path / "run", model_store,
                                      {"certificate_file": str(certificate), "private_key_file": str(key)})
    server.start(timeout=240)
    try:
        assert server.key_file.is_file() and server.token("inference")
    finally:
        server.stop()
    assert not server.key_file.exists()


def test_cli_over_tls_with_keys(served_prod):
    """docs/serving.md's prod client line: https URLs, the key file and the certificate to trust."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "client", "--inference-url", served_prod.url("inference"),
                          "--management-url", served_prod.url("management"), "--metrics-url",
                          served_prod.url("metrics"), "--key-file", str(served_prod.key_file), "--ca-cert",
                          str(served_prod.verify), "predict", "examples/cat.png"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("examples/cat.png: cat "), out.stderr


@pytest.mark.parametrize("version", SHIPPED, ids=lambda v: f"{v.model}-{v.version}")
def test_served_probabilities_equal_the_calibrated_in_process_ones(served, predict_url, version):
    """Every probability a real server answers (all 10 classes, one request at a time, so each is a batch of
    one) equals softmax(logits / T) computed here with the card's T by an independently built network in the
    numeric mode the version's workers report, one thread as in a worker: within 1e-6 (answers are rounded to 6
    places, 5e-7; the same kernels on the same input otherwise)."""
    from client.api import TorchServeClient
    from handlers.imaging import Limits, decode_image
    from models.inference import calibrated_probabilities
    from models.specs import SPECS
    from tests import images, reference

    spec = SPECS[version.model]
    described = TorchServeClient(management_url=served.url("management")).handler_description(
        version.model, version.version)
    mode = described["numerics"]["mode"]
    tta, temperature = reference.tta(version), reference.temperature(version, mode)  # the YAML's; card's or record's
    assert (described["tta"], described["temperature"]) == (tta, temperature)
    runner = reference.runner(version, mode)
    pictures = ([images.digit(), images.digit(dark_on_light=True)] if spec.channels == 1
                else [images.noise(32, 32, seed=i) for i in range(3)] + [CAT, HORSE])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for picture in pictures:
            png = picture if isinstance(picture, bytes) else images.encode(picture)
            response = requests.put(predict_url(f"{version.model}/{version.version}"), data=png,
                                    headers={"X-TopK": "10"}, timeout=30)
            assert response.status_code == 200, response.text
            decoded = decode_image(png, spec.image_size, spec.channels, Limits(), spec.light_on_dark)
            pixels = spec.normalize(torch.tensor(decoded).permute(2, 0, 1)[None])
            with torch.inference_mode():
                expected = calibrated_probabilities(runner, pixels, tta, temperature)[0]
            served_probs = torch.tensor([response.json()[label] for label in spec.classes])
            torch.testing.assert_close(served_probs, expected, atol=1e-6, rtol=0)
    finally:
        torch.set_num_threads(threads)


def test_int8_served_by_torchserve_equals_in_process_int8(served, predict_url, validation_split, tmp_path):
    """cifar10 2.0 with `handler.numerics: ort-int8` on a real TorchServe: 64 validation PNGs from 8 clients at once
    (batches of any size up to 8) get int8's probabilities as an int8 session built here from the shipped weights
    computes them, with int8's own temperature, within 1e-6 (rounded to 6 places; ONNX Runtime gave bitwise equal
    answers at every batch size, tests/answers.py), whatever mode this host's `auto` would choose."""

    from client.api import TorchServeClient
    from models.specs import CIFAR10
    from tests import images, reference

    version = next(v for v in SHIPPED if (v.model, v.version) == ("cifar10", "2.0"))
    config = version.config
    config.update(minWorkers=1, maxWorkers=1, handler={**config["handler"], "numerics": "ort-int8"})
    built = archive.build(version, tmp_path / "built", config)
    target = served.model_store / "cifar10_int8.mar"
    shutil.copy(built, target)
    shutil.copy(built.with_name(built.name + ".sha256"), target.with_name(target.name + ".sha256"))
    client = TorchServeClient(management_url=served.url("management"), timeout=120)
    try:
        client.register(target.name, 1, model_name="cifar10_int8")
        described = client.handler_description("cifar10_int8", "2.0")
        assert (described["numerics"]["mode"], described["numerics"]["chosen_by"]) == ("ort-int8", "config")
        assert described["temperature"] == reference.temperature(version, "ort-int8")
        val_images, _ = validation_split("cifar10")
        pngs = [images.encode(img.permute(1, 2, 0).numpy()) for img in val_images[:64]]
        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda png: requests.put(predict_url("cifar10_int8"), data=png,
                                                               headers={"X-TopK": "10"}, timeout=60), pngs))
        assert all(r.status_code == 200 for r in responses)
        served_probs = torch.tensor([[r.json()[label] for label in CIFAR10.classes] for r in responses])
        expected = reference.probabilities(version, "ort-int8", CIFAR10.normalize(val_images[:64]), batch_size=8)
        torch.testing.assert_close(served_probs, expected.float(), atol=1e-6, rtol=0)
    finally:
        with contextlib.suppress(Exception):
            client.unregister("cifar10_int8", "2.0", force=True)
        target.unlink()
        target.with_name(target.name + ".sha256").unlink()
