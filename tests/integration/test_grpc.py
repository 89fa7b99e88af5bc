"""TorchServe's gRPC APIs against these handlers, with stubs built from the protos inside TorchServe's own jar.

gRPC is not this product's main API (REST and KServe's REST protocols are), but TorchServe 0.12 always starts
it, so it is bound to 127.0.0.1 in every profile and needs the inference/management key in prod. Every unary
method works, StreamPredictions answers exactly like the unary call, and StreamPredictions2 (bidirectional, for
TorchServe's sequence batching, which these stateless models do not use) is refused by the gRPC front clients
call (serving/grpc_front.py): sent to TorchServe 0.12 itself, a half-closed one loses the version's worker for
good (SECURITY.md).
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import requests

from serving.catalog import ROOT
from tests.answers import same
from tests.integration.conftest import describe, served_tolerance
from tests.integration.test_reliability import worker_pids

CAT = (ROOT / "examples" / "cat.png").read_bytes()
DIGIT = (ROOT / "examples" / "digit7.png").read_bytes()


@pytest.fixture(scope="module")
def inference(served, stubs):
    channel = grpc.insecure_channel(f"127.0.0.1:{served.grpc_port()}")
    yield stubs.inference_pb2_grpc.InferenceAPIsServiceStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def management(served, stubs):
    channel = grpc.insecure_channel(f"127.0.0.1:{served.properties['grpc_management_port']}")
    yield stubs.management_pb2_grpc.ManagementAPIsServiceStub(channel)
    channel.close()


def rest(served, path: str, image: bytes) -> dict:
    return requests.put(f"{served.url('inference')}/predictions/{path}", data=image, timeout=30).json()


def test_ping_and_predictions_answer_like_rest(served, stubs, inference):
    from google.protobuf import empty_pb2

    assert inference.Ping(empty_pb2.Empty(), timeout=30).health.strip().startswith("{")
    request = stubs.inference_pb2.PredictionsRequest
    for model, image in (("cifar10", CAT), ("mnist", DIGIT)):
        answer = inference.Predictions(request(model_name=model, input={"data": image}), timeout=30)
        assert same(requests.compat.json.loads(answer.prediction), rest(served, model, image),
                    served_tolerance(served, model))
    versioned = inference.Predictions(request(model_name="cifar10", model_version="2.0", input={"data": CAT}),
                                      timeout=30)
    assert next(iter(requests.compat.json.loads(versioned.prediction))) == "cat"
    # TorchServe 0.12's gRPC path carries no per-request status: a refused request answers with the same JSON
    # error body REST sends with its 400.
    refused = inference.Predictions(request(model_name="cifar10", input={"data": b"\x00\xff not an image"}), timeout=30)
    body = requests.compat.json.loads(refused.prediction)
    assert body["code"] == 400 and "not a decodable image" in body["message"]


def test_stream_predictions_answers_one_message_like_the_unary_call(served, stubs, inference):
    """Before the handler set ts_stream_next, the frontend failed the worker on every StreamPredictions."""
    pids = worker_pids(served)
    request = stubs.inference_pb2.PredictionsRequest
    for model, image in (("mnist", DIGIT), ("cifar10", CAT)):
        messages = list(inference.StreamPredictions(request(model_name=model, input={"data": image}), timeout=30))
        assert len(messages) == 1
        assert same(requests.compat.json.loads(messages[0].prediction), rest(served, model, image),
                    served_tolerance(served, model))
    assert worker_pids(served) == pids


def stream_predictions2(inference, request, polite: bool) -> grpc.RpcError:
    """One StreamPredictions2 call of one message: the client half-closes at once, or only after an answer."""
    answered = threading.Event()

    def messages():
        yield request
        if polite:
            answered.wait(30)

    with pytest.raises(grpc.RpcError) as refused:
        for _ in inference.StreamPredictions2(messages(), timeout=30):
            answered.set()
    answered.set()
    return refused.value


def test_no_sequence_of_stream_predictions2_calls_wedges_a_version(served, stubs, inference):
    """The sequence that wedged versions, and more: three rounds over every version (mnist 1.0 has one worker,
    cifar10's two each) of StreamPredictions, then StreamPredictions2 with sequence ids hidden-1, hidden-1,
    hidden-2 and none, each once closing at once and once waiting. Straight to TorchServe 0.12 this left mnist
    answering no HTTP request in 2 of 4 tries of one round, describe still READY with a pid that no longer
    existed. Through the front (serving/grpc_front.py) every StreamPredictions2 is refused UNIMPLEMENTED with
    the reason, and afterwards every version answers HTTP, from the same worker pids."""
    pids = worker_pids(served)
    request = stubs.inference_pb2.PredictionsRequest
    versions = (("mnist", "1.0", DIGIT), ("cifar10", "1.0", CAT), ("cifar10", "2.0", CAT))
    for _ in range(3):
        for model, version, image in versions:
            streamed = inference.StreamPredictions(request(model_name=model, model_version=version,
                                                           input={"data": image}), timeout=30)
            assert len(list(streamed)) == 1
            for sequence in ("hidden-1", "hidden-1", "hidden-2", ""):
                for polite in (False, True):
                    refused = stream_predictions2(inference, request(
                        model_name=model, model_version=version, input={"data": image}, sequence_id=sequence), polite)
                    assert refused.code() == grpc.StatusCode.UNIMPLEMENTED, refused
                    assert "StreamPredictions2 is refused" in refused.details()
    assert worker_pids(served) == pids
    for model, version, image in versions:
        url = f"{served.url('inference')}/predictions/{model}/{version}"
        with ThreadPoolExecutor(4) as pool:  # enough to reach both workers of a cifar10 version
            statuses = list(pool.map(lambda _, u=url, i=image: requests.put(u, data=i, timeout=30).status_code,
                                     range(16)))
        assert statuses == [200] * 16, (model, version, statuses)


def test_management_methods(served, stubs, management):
    pb = stubs.management_pb2
    listed = requests.compat.json.loads(management.ListModels(pb.ListModelsRequest(limit=100), timeout=30).msg)
    assert {m["modelName"] for m in listed["models"]} == {"cifar10", "mnist"}
    described = requests.compat.json.loads(management.DescribeModel(
        pb.DescribeModelRequest(model_name="cifar10", model_version="2.0"), timeout=30).msg)
    assert described[0]["modelVersion"] == "2.0" and described[0]["batchSize"] == 8
    try:
        management.SetDefault(pb.SetDefaultRequest(model_name="cifar10", model_version="2.0"), timeout=30)
        assert requests.put(f"{served.url('inference')}/predictions/cifar10", data=CAT,
                            timeout=30).headers["X-Model-Version"] == "2.0"
    finally:
        management.SetDefault(pb.SetDefaultRequest(model_name="cifar10", model_version="1.0"), timeout=30)
    management.ScaleWorker(pb.ScaleWorkerRequest(model_name="mnist", min_worker=2, max_worker=2, synchronous=True),
                           timeout=120)
    assert len(describe(served, "mnist")[0]["workers"]) == 2
    management.ScaleWorker(pb.ScaleWorkerRequest(model_name="mnist", min_worker=1, max_worker=1, synchronous=True),
                           timeout=120)
    assert len(describe(served, "mnist")[0]["workers"]) == 1
    management.RegisterModel(pb.RegisterModelRequest(url="mnist.mar", model_name="mnist_grpc", initial_workers=1,
                                                     synchronous=True), timeout=120)
    try:
        assert next(iter(rest(served, "mnist_grpc", DIGIT))) == "7"
    finally:
        management.UnregisterModel(pb.UnregisterModelRequest(model_name="mnist_grpc"), timeout=120)
    assert requests.put(f"{served.url('inference')}/predictions/mnist_grpc", data=DIGIT,
                        timeout=30).status_code == 404


def test_a_dead_front_is_reported_by_the_health_check_and_started_again_by_make_serve(served, stubs):
    """The front is a process of its own: killed, the health check (the plain image's HEALTHCHECK) says so, and
    `start` on the running server (what `make serve` does again) starts a new one, which answers."""
    import psutil

    from serving.container import healthy

    pid = served.front_pid()
    assert pid is not None and healthy(served) == []
    psutil.Process(pid).kill()
    psutil.Process(pid).wait(10)
    assert any("gRPC front" in problem for problem in healthy(served)), healthy(served)
    served.start(timeout=120)
    assert served.front_pid() not in (None, pid) and healthy(served) == []
    with grpc.insecure_channel(f"127.0.0.1:{served.grpc_port()}") as channel:
        answer = stubs.inference_pb2_grpc.InferenceAPIsServiceStub(channel).Predictions(
            stubs.inference_pb2.PredictionsRequest(model_name="mnist", input={"data": DIGIT}), timeout=30)
    assert next(iter(requests.compat.json.loads(answer.prediction))) == "7"
