"""KServe as KServe runs it: each runtime image's stack (Python 3.9, its torch, TorchServe and kserve), the layout
uploaded to an S3-compatible server and downloaded by that stack's own `kserve.storage.Storage` (the storage
initializer's call), then TorchServe and the image's `kserve_wrapper` started as the image's entrypoint starts them
(serving/kserve_pod.py), and every request sent to KServe's server on 8080/8081, never to TorchServe."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests

from serving import kserve, kserve_pod
from serving.catalog import ROOT
from serving.config import free_ports, port_is_free, read_properties
from tests import jvm
from tests.conftest import require
from tests.images import b64

CAT = (ROOT / "examples" / "cat.png").read_bytes()
HORSE = (ROOT / "examples" / "horse.png").read_bytes()
DIGIT7 = (ROOT / "examples" / "digit7.png").read_bytes()
SAMPLE = ROOT.parent / "shared" / "kserve" / "samples" / "v2_bytes_conv_mnist_v2_bytes.json"
BUCKET, PREFIX = "models", "classifiers/kserve"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on loopback, the layout `make kserve` writes uploaded under s3://models/classifiers/kserve/."""
    import boto3

    port = free_ports(1)[0]
    log = open(tmp_path_factory.mktemp("s3") / "moto.log", "wb")
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p",
                               str(port)], stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            # moto builds its S3 backend on the first request: on a loaded 2-core host that answer took over 1 s
            # (a ReadTimeout, seen once in two runs), so a slow answer is waited for like a refused connection.
            requests.get(endpoint, timeout=(1, 30))
            break
        except (requests.ConnectionError, requests.Timeout):
            assert server.poll() is None and time.monotonic() < deadline, "moto_server did not start"
            time.sleep(0.1)
    layout = kserve.build(tmp_path_factory.mktemp("layout") / "kserve")
    client = boto3.client("s3", endpoint_url=endpoint, **{k.lower(): v for k, v in CREDENTIALS.items()
                                                           if k != "AWS_DEFAULT_REGION"}, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    for path in sorted(layout.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), BUCKET, f"{PREFIX}/{path.relative_to(layout)}")
    try:
        yield {"endpoint": endpoint, "layout": layout}
    finally:
        server.terminate()
        server.wait(10)
        log.close()


def storage_download(stack: str, uri: str, dest: Path, endpoint: str) -> subprocess.CompletedProcess:
    """What KServe's storage initializer runs for `storageUri`: Storage.download(uri, dest), in the image's stack."""
    return subprocess.run([str(kserve_pod.stack_python(stack)), "-c",
                           "import sys; from kserve.storage import Storage; Storage.download(sys.argv[1], sys.argv[2])",
                           uri, str(dest)], env=dict(os.environ, AWS_ENDPOINT_URL=endpoint, **CREDENTIALS),
                          capture_output=True, text=True, timeout=120)


# (stack, front): the stock runtime's image (kfs 0.9.0), kfs 0.12.0 as it is, and this project's runtime image
# (kfs 0.12.0 with deploy/docker/kserve-entrypoint.sh), which every manifest in deploy/kserve/ names.
IMAGES = {"kfs-0.9.0": ("0.9.0", "stock"), "kfs-0.12.0": ("0.12.0", "stock"), "runtime": ("0.12.0", "project")}


@pytest.fixture(scope="module", params=list(IMAGES))
def image(request):
    stack, front = IMAGES[request.param]
    require(kserve_pod.stack_python(stack).exists(),
            f".venv-kfs-{stack} is missing: make kserve-stack-{stack} (make test builds it)")
    require(kserve_pod.wrapper_dir(stack).is_dir(), "../shared/kserve is only on the project's machines")
    busy = [port for port in kserve_pod.POD_PORTS if not port_is_free("127.0.0.1", port)]
    require(not busy, f"ports {busy} are in use (`make serve` takes 8080-8082): a pod listens on the image's "
            "fixed ports; stop the server to run these tests")
    return stack, front


@pytest.fixture(scope="module")
def stack(image):
    return image[0]


@pytest.fixture(scope="module")
def mnt(stack, s3, tmp_path_factory):
    """/mnt of the pod: models/ downloaded from S3 by the stack's own storage code, byte for byte the layout."""
    mnt = tmp_path_factory.mktemp(f"mnt-{stack}")
    done = storage_download(stack, f"s3://{BUCKET}/{PREFIX}", mnt / "models", s3["endpoint"])
    assert done.returncode == 0, done.stderr[-2000:]
    uploaded = {p.relative_to(s3["layout"]): p.read_bytes() for p in s3["layout"].rglob("*") if p.is_file()}
    downloaded = {p.relative_to(mnt / "models"): p.read_bytes() for p in (mnt / "models").rglob("*") if p.is_file()}
    assert downloaded == uploaded
    return mnt


def test_a_missing_prefix_fails_with_kserves_own_error(stack, s3, tmp_path):
    done = storage_download(stack, f"s3://{BUCKET}/classifiers/no-such-layout", tmp_path / "models", s3["endpoint"])
    assert done.returncode != 0
    assert "RuntimeError: Failed to fetch model. No model found in" in done.stderr, done.stderr[-2000:]


def start_pod(image: tuple[str, str], mnt: Path, run_dir: Path, protocol: str, envelope: str) -> kserve_pod.Pod:
    """Start a pod and record what TorchServe's workers were doing the moment KServe's server first said ready,
    and how a request sent at that moment was answered."""
    # MODEL_LOAD_DELAY (the 0.12.0 wrapper's pause between readiness polls, 30 s by default) is an env variable
    # the wrapper reads; 1 s only makes the pod ready sooner after its workers are.
    stack, front = image
    pod = kserve_pod.Pod(stack, mnt, run_dir, protocol=protocol, envelope=envelope, front=front,
                         extra_env={"MODEL_LOAD_DELAY": "1"})
    pod.launch()
    try:
        started = time.monotonic()
        while not pod.ready():
            assert pod.wrapper.poll() is None, pod.log_tail()
            assert time.monotonic() - started < 300, pod.log_tail()
            time.sleep(0.05)
        pod.not_ready_at_ready = pod.defaults_not_ready()
        if protocol != "grpc-v2":
            pod.first_answer = predict(pod, "cifar10", [CAT])
        pod.wait_for_workers = pod.defaults_not_ready()
        deadline = time.monotonic() + 240
        while pod.defaults_not_ready():  # the other tests start from a pod whose workers are up
            assert time.monotonic() < deadline, pod.log_tail()
            time.sleep(0.25)
    except BaseException:
        pod.stop()
        raise
    return pod


# PROTOCOL_VERSION → the TS_SERVICE_ENVELOPE label that goes with it. One fixture, so that pytest never holds two
# pods at once (they share the image's fixed ports): each test names the protocols it runs on.
ENVELOPES = {"v1": "kserve", "v2": "kservev2", "grpc-v2": "kservev2"}
REST = pytest.mark.parametrize("pod", ["v1", "v2"], indirect=True)
GRPC = pytest.mark.parametrize("pod", ["grpc-v2"], indirect=True)


@pytest.fixture(scope="module")
def pod(request, image, mnt, tmp_path_factory):
    protocol = request.param
    pod = start_pod(image, mnt, tmp_path_factory.mktemp(f"pod-{'-'.join(image)}-{protocol}"), protocol,
                    ENVELOPES[protocol])
    try:
        yield pod
    finally:
        pod.stop()


def predict(pod, model: str, images: list[bytes | str]) -> tuple[int, list[str] | str]:
    """(status, top-1 labels or the error text) in the pod's own protocol: KServe's server forwards a request in
    PROTOCOL_VERSION's form, so a v2 pod answers v2 clients (a v1 body there fails inside KServe's server)."""
    data = [im if isinstance(im, str) else b64(im) for im in images]
    if pod.protocol == "v1":
        answer = requests.post(f"{pod.http}/v1/models/{model}:predict",
                               json={"instances": [{"b64": d} for d in data]}, timeout=120)
        return answer.status_code, ([next(iter(p)) for p in answer.json()["predictions"]]
                                    if answer.status_code == 200 else answer.text)
    answer = requests.post(f"{pod.http}/v2/models/{model}/infer", timeout=120, json={
        "inputs": [{"name": "images", "datatype": "BYTES", "shape": [len(data)], "data": data}]})
    return answer.status_code, top1_v2(answer.json()) if answer.status_code == 200 else answer.text


def top1_v2(body: dict) -> list[str]:
    labels = next(o for o in body["outputs"] if o["name"] == "labels")
    n, k = labels["shape"]
    return [labels["data"][i * k] for i in range(n)]


@REST
def test_readiness_and_a_request_at_that_moment(pod):
    """The 0.12.0 wrapper says ready only once every default version has a READY worker (it polls TorchServe's
    management API); the 0.9.0 wrapper says ready as soon as it finds a .mar file, before any worker is up
    (its TorchserveModel.load), so there a request at that moment waits in TorchServe's queue, or, when java has
    not bound its inference port yet (TorchServe registers every archive first), fails inside KServe's server
    with a connection error (docs/kserve.md, "Which runtime"; seen once in a fresh-clone CI run here). With the 0.12.0
    wrapper the request at that moment is answered correctly."""
    if pod.stack == "0.12.0":
        assert pod.not_ready_at_ready == []
        assert pod.first_answer == (200, ["cat"])
    else:
        status, body = pod.first_answer
        assert (status, body) == (200, ["cat"]) or (status == 500 and "ConnectError" in body), pod.first_answer


@REST
def test_v1_and_v2_clients_at_once_share_batches(pod):
    """48 requests at 16-way concurrency through KServe's server, v1 and v2 interleaved (a v2 pod: v2 only, see
    `predict`): each gets its own correct answer in its own protocol, and TorchServe ran them in shared
    server-side batches."""
    jobs = []
    for i in range(16):
        jobs.append(("v1", "cifar10", {"instances": [{"b64": b64(im)} for im in [CAT, HORSE][: 1 + i % 2]]},
                     ["cat", "horse"][: 1 + i % 2]))
        jobs.append(("v2", "cifar10", {"id": f"b{i}", "inputs": [{"name": "images", "datatype": "BYTES",
                                                                   "shape": [2], "data": [b64(HORSE), b64(CAT)]}]},
                     ["horse", "cat"]))
        jobs.append(("v1", "mnist", {"instances": [{"b64": b64(DIGIT7)}]}, ["7"]))
    if pod.protocol == "v2":  # as many cifar10 requests as the v1 pods get, so batches have the same chance
        jobs = [job for job in jobs if job[0] == "v2"] * 2 + [
            ("v2", "mnist", {"id": f"m{i}", "inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                                                         "data": [b64(DIGIT7)]}]}, ["7"]) for i in range(16)]
    cifar10 = sum(1 for job in jobs if job[1] == "cifar10")

    def send(job):
        protocol, model, body, _ = job
        url = (f"{pod.http}/v1/models/{model}:predict" if protocol == "v1" else f"{pod.http}/v2/models/{model}/infer")
        return requests.post(url, json=body, timeout=120)

    before = batches_received(pod)
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(send, jobs))
    for (protocol, _, body, expected), answer in zip(jobs, answers, strict=True):
        assert answer.status_code == 200, answer.text
        if protocol == "v1":
            assert [next(iter(p)) for p in answer.json()["predictions"]] == expected
        else:
            assert answer.json()["id"] == body["id"] and top1_v2(answer.json()) == expected
    batches = settled(lambda: batches_received(pod)) - before
    assert 0 < batches < cifar10, f"{cifar10} cifar10 requests ran in {batches} batches: none shared"


def batches_received(pod) -> int:
    """Batches cifar10 1.0's workers have received: TorchServe's worker logs one line per batch."""
    log = pod.torchserve.log_dir / "model_log.log"
    return sum(1 for line in log.read_text(errors="replace").splitlines()
               if "cifar10_1.0" in line and "Backend received inference" in line)


def settled(count, quiet: float = 1.0, timeout: float = 30.0) -> int:
    """`count()` once it has stopped changing for `quiet` seconds (java's log lines arrive a moment late)."""
    value, since, deadline = count(), time.monotonic(), time.monotonic() + timeout
    while time.monotonic() - since < quiet and time.monotonic() < deadline:
        time.sleep(0.1)
        if (now := count()) != value:
            value, since = now, time.monotonic()
    return value


@REST
def test_kserves_own_v2_sample_in_the_form_kserves_server_accepts(pod):
    """KServe's v2 MNIST sample as it is gets 422 from KServe's own request model (`"shape": -1` and a bare
    string as `data`; kserve/kserve#3478); with `"shape": [1]` and `"data": [<base64>]` it is answered."""
    sample = json.loads(SAMPLE.read_text())
    as_is = requests.post(f"{pod.http}/v2/models/mnist/infer", json=sample, timeout=60)
    assert as_is.status_code == 422, as_is.text
    tensor = sample["inputs"][0]
    accepted = dict(sample, inputs=[dict(tensor, shape=[1], data=[tensor["data"]])])
    answer = requests.post(f"{pod.http}/v2/models/mnist/infer", json=accepted, timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json()["model_name"] == "mnist" and top1_v2(answer.json()) == ["0"]


CLUSTER_ONLY = ("kubectl ", "docker ", "gsutil ", "HOST=$(kubectl ")  # what needs a real cluster or registry


@REST
def test_the_docs_cluster_requests_through_kserves_server(pod):
    """docs/kserve.md's requests to an InferenceService, run as written against KServe's own server in the pod:
    only the ingress address (and the Host header an ingress routes by) point at the pod; the lines that need a
    Kubernetes API server or a registry are the only ones left out. A v2 pod answers v2 clients only."""
    from tests import readme_samples as samples

    commands = [sample.command for block in samples.blocks(ROOT / "docs" / "kserve.md", ("cluster",))
                for sample in block.samples]
    requests_ = [c for c in commands if not c.startswith(CLUSTER_ONLY)]
    assert {c.split()[0] for c in requests_} == {"curl", ".venv/bin/python"}, requests_
    ingress = [("-H \"Host: $HOST\" ", ""), ("http://$INGRESS_HOST:$INGRESS_PORT", pod.http)]  # routes by Host
    target = samples.Target(pod.http, "", [*ingress, (".venv/bin/python", sys.executable)])
    ran = 0
    for command in requests_:
        if pod.protocol == "v2" and "/v1/" in command:
            continue
        answer = target.run(command)
        if command.startswith("curl"):
            body = json.loads(answer)
            assert "predictions" in body or "outputs" in body, answer
            top = next(iter(body["predictions"][0])) if "predictions" in body else body["outputs"][0]["data"][0]
            assert top == ("cat" if "cifar10" in command else "7"), answer
        else:
            assert answer.startswith("examples/cat.png: cat "), answer
        ran += 1
    assert ran == (3 if pod.protocol == "v1" else 2)


@REST
def test_explain_through_kserves_server(pod):
    answer = requests.post(f"{pod.http}/v1/models/cifar10:explain", json={"instances": [{"b64": b64(CAT)}]},
                           timeout=180)
    assert answer.status_code == 200, answer.text
    explanation = answer.json()["explanations"][0]
    assert explanation["label"] == "cat" and explanation["method"] == "integrated_gradients"
    assert np.asarray(explanation["attributions"]).shape == (32, 32)


def mixed(explain: tuple[str, dict], predict, predictions: int = 8) -> tuple[requests.Response, list]:
    """One explanation and `predictions` predictions sent at once, so that they can share a server-side batch."""
    url, kwargs = explain
    with ThreadPoolExecutor(predictions + 1) as pool:
        explained = pool.submit(requests.post, url, timeout=180, **kwargs)
        predicted = [pool.submit(predict) for _ in range(predictions)]
        return explained.result(), [future.result() for future in predicted]


@REST
def test_an_explanation_sharing_a_batch_answers_its_predictions_first(pod):
    """In this stack's TorchServe the handler answers a batch's predictions before it computes the batch's
    explanation (handlers/explaining.py): straight from TorchServe such an explanation is a chunked stream whose
    body is whole. Through KServe's server the same mix of requests is answered whole too."""
    direct = pod.torchserve.url("inference")
    explain = (f"{direct}/explanations/cifar10", {"data": CAT, "headers": {"Content-Type": "image/png"}})
    streamed = None
    for _ in range(20):  # TorchServe forms the batches: try until one holds both kinds
        explained, predicted = mixed(explain, lambda: requests.post(f"{direct}/predictions/cifar10", data=CAT,
                                                                    timeout=120))
        assert explained.status_code == 200 and [p.status_code for p in predicted] == [200] * 8, explained.text
        if explained.headers.get("Transfer-Encoding") == "chunked":
            streamed = explained
            break
    assert streamed is not None, "no explanation shared a batch with a prediction in 20 tries"
    assert streamed.json()["label"] == "cat" and np.asarray(streamed.json()["attributions"]).shape == (32, 32)
    for _ in range(3):
        explained, predicted = mixed((f"{pod.http}/v1/models/cifar10:explain",
                                      {"json": {"instances": [{"b64": b64(CAT)}]}}),
                                     lambda: predict(pod, "cifar10", [CAT]))
        assert explained.status_code == 200, explained.text
        assert explained.json()["explanations"][0]["label"] == "cat"
        assert predicted == [(200, ["cat"])] * 8


@REST
def test_bad_input_gets_its_own_4xx_through_this_projects_runtime(pod):
    """KServe's server (0.11.2 and 0.13.0 alike) turns every non-2xx answer of TorchServe into its own 500
    (`Model._http_predict` raises httpx's HTTPStatusError, which only its generic handler catches): through the
    kfs images' own entrypoint a bad image is a 500 that carries the handler's message and status. This
    project's runtime (serving/kserve_front.py) passes TorchServe's status on: 400 for an undecodable image, 413
    for more images than a request may hold, each with the handler's message. A v2 body that is not a v2
    request is KServe's own 422 everywhere, and a good request beside them is answered."""
    status, error = predict(pod, "cifar10", ["not base64!"])
    too_many_status, too_many = predict(pod, "cifar10", [CAT] * 65)
    assert "invalid base64" in error, error
    assert "the limit is 64 per request" in too_many, too_many
    if pod.front == "project":
        assert (status, too_many_status) == (400, 413)
        assert set(json.loads(error)) == {"detail"}
    else:
        assert (status, too_many_status) == (500, 500)
        assert "400 Bad Request" in error and "413" in too_many
    malformed = requests.post(f"{pod.http}/v2/models/cifar10/infer", json={"inputs": "x"}, timeout=60)
    assert malformed.status_code == 422, malformed.text
    assert predict(pod, "cifar10", [HORSE]) == (200, ["horse"])


def non_loopback_address() -> str:
    """This machine's address as another pod would reach it (any IPv4 address of an interface but loopback)."""
    addresses = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                 if a.family == socket.AF_INET and not a.address.startswith("127.")]
    require(bool(addresses), "this machine has no IPv4 address but loopback")
    return addresses[0]


@REST
def test_only_kserves_server_and_metrics_are_reachable_from_outside_the_pod(pod):
    """From another pod (this machine's non-loopback address), TorchServe's management and inference (8085) and
    its gRPC (7070, 7071) refuse the connection; KServe's server (8080) and metrics (8082) answer."""
    address = non_loopback_address()
    for port in (8085, 7070, 7071):
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://{address}:{port}/models", timeout=5)
    assert requests.get(f"http://{address}:8080/v2/health/ready", timeout=5).status_code == 200
    assert requests.get(f"http://{address}:8082/metrics", timeout=5).status_code == 200
    # Inside the pod the wrapper reaches management on loopback, as its readiness polls do.
    assert requests.get("http://127.0.0.1:8085/models", timeout=5).status_code == 200


GRPC_CLIENT = """
import json, sys
import grpc
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb, grpc_predict_v2_pb2_grpc as stubs
address, model, image = sys.argv[1:]
contents = pb.InferTensorContents(bytes_contents=[open(image, "rb").read()])
tensor = pb.ModelInferRequest.InferInputTensor(name="images", datatype="BYTES", shape=[1], contents=contents)
request = pb.ModelInferRequest(model_name=model, id="g1", inputs=[tensor])
try:
    reply = stubs.GRPCInferenceServiceStub(grpc.insecure_channel(address)).ModelInfer(request, timeout=60)
    outputs = {o.name: o for o in reply.outputs}
    labels = outputs["labels"].contents.bytes_contents or [b for b in reply.raw_output_contents[:1]]
    print(json.dumps({"code": "OK", "id": reply.id, "model": reply.model_name, "outputs": sorted(outputs),
                      "top1": labels[0].decode()}))
except grpc.RpcError as error:
    print(json.dumps({"code": error.code().name, "details": error.details()}))
"""


def grpc_infer(pod, model: str, image: bytes, tmp_path: Path) -> dict:
    """A gRPC v2 client built on KServe's own protos (they ship in the stack's kserve), sent to 8081."""
    path = tmp_path / f"{model}.png"
    path.write_bytes(image)
    done = subprocess.run([str(kserve_pod.stack_python(pod.stack)), "-c", GRPC_CLIENT, pod.grpc, model, str(path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@GRPC
def test_grpc_v2_through_kserves_server(pod, tmp_path):
    """KServe's gRPC ModelInfer on 8081, forwarded by the wrapper to TorchServe's gRPC Predictions on the pod's
    loopback (its conversion sends one BYTES element per tensor: one image per request)."""
    for model, image, label in (("cifar10", CAT, "cat"), ("mnist", DIGIT7, "7")):
        answer = grpc_infer(pod, model, image, tmp_path)
        assert answer["code"] == "OK", answer
        assert answer["model"] == model and answer["top1"] == label
        assert answer["outputs"] == ["labels", "probabilities"]
    # An undecodable image: the handler's error comes back from TorchServe's gRPC as a body without
    # "outputs", which the wrapper's from_ts_grpc cannot convert: the client sees UNKNOWN (docs/kserve.md says so).
    garbage = grpc_infer(pod, "cifar10", b"not an image", tmp_path)
    assert garbage["code"] != "OK", garbage
    assert grpc_infer(pod, "cifar10", HORSE, tmp_path)["top1"] == "horse"  # and the pod serves on


@pytest.mark.parametrize("pod", ["v1"], indirect=True)
def test_java_runs_with_the_layouts_memory_bounds(pod):
    """Both images' launchers (TorchServe 0.9 and 0.12) start java with the layout's vmargs: the heap cap
    the manifests' memory limits were computed with (docs/serving.md, "Memory")."""
    asked = jvm.asked(read_properties(pod.mnt / "models" / "config" / "config.properties")["vmargs"])
    assert asked["MaxHeapSize"] and asked["ExitOnOutOfMemoryError"]
    assert jvm.command_line(pod.torchserve.pid()) == asked


@pytest.mark.parametrize("pod", ["v1"], indirect=True)
def test_when_java_dies_this_projects_pod_ends_and_the_stock_one_answers_500(pod):
    """java exits on a heap OutOfMemoryError (vmargs). In this project's runtime KServe's server then exits 1
    (serving/kserve_front.py), so the kubelet restarts the container; the stock images' server stays up and
    answers 500 to everything. Kills java: the last test on its pod (pytest keeps file order within a pod)."""
    os.kill(pod.torchserve.pid(), signal.SIGKILL)
    if pod.front == "project":
        assert pod.wrapper.wait(timeout=30) == 1, pod.log_tail()
        assert "has exited: ending the container" in pod.log_tail()
    else:
        status, _ = predict(pod, "cifar10", [CAT])
        assert status == 500 and pod.wrapper.poll() is None, pod.log_tail()

