"""The in-process harness frames requests as the real frontend does: an echo handler (tests/echo_handler.py) on a
real TorchServe answers with the row and headers its worker handed it, for each way a client sends a request, and
the harness (`serving.inprocess.frontend_request` through TorchServe's own message decoder) must produce the same.
So every unit test that drives the handlers in process sees what a worker sees."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from serving.catalog import ROOT
from serving.inprocess import frontend_request, worker_batch
from tests.echo_handler import _value

PNG = (ROOT / "examples" / "cat.png").read_bytes()
B64 = base64.b64encode(PNG).decode()
# Headers whose values belong to the client library or the connection, not to the request's meaning.
CLIENT_SPECIFIC = {"host", "user-agent", "accept-encoding", "connection", "content-length", "accept"}


@pytest.fixture(scope="module")
def echo(served, model_store, tmp_path_factory):
    """echo.mar registered beside the shipped versions, one worker; unregistered afterwards."""
    staging = tmp_path_factory.mktemp("echo")
    subprocess.run([str(Path(sys.executable).with_name("torch-model-archiver")), "--model-name", "echo",
                    "--version", "1.0", "--handler", str(ROOT / "tests" / "echo_handler.py"),
                    "--export-path", str(model_store), "--force"],
                   check=True, env=dict(os.environ, TMPDIR=str(staging)))
    management = served.url("management")
    registered = served.http.post(f"{management}/models", params={"url": "echo.mar", "initial_workers": 1,
                                                                  "synchronous": "true"}, timeout=120)
    assert registered.status_code == 200, registered.text
    yield served
    served.http.delete(f"{management}/models/echo/1.0", timeout=60)
    (model_store / "echo.mar").unlink()


def harness(row: dict, headers: dict | None = None, route: str = "predictions") -> dict:
    processors, rows, _ = worker_batch([frontend_request(row, headers, route)])
    return {"row": {name: _value(value) for name, value in rows[0].items()},
            "headers": processors[0].get_request_properties()}


def meaning(headers: dict) -> dict:
    """The headers a handler may act on: without the client's and connection's own, and a multipart body's
    Content-Type without its (random) boundary."""
    kept = {name: value for name, value in headers.items() if name.lower() not in CLIENT_SPECIFIC}
    if isinstance(kept.get("Content-Type"), str):
        kept["Content-Type"] = kept["Content-Type"].split(";")[0]
    return kept


def assert_same_request(real: dict, ours: dict) -> None:
    assert real["row"] == ours["row"]
    real_headers = dict(real["headers"])
    assert meaning(real_headers) == meaning(ours["headers"])
    assert {name.lower() for name in ours["headers"]} <= {name.lower() for name in real_headers}


HTTP_CASES = {
    # name: (method, path, requests kwargs, harness row, harness headers, harness route)
    "raw bytes, no content type (curl -T)": ("PUT", "/predictions/echo", {"data": PNG}, {"body": PNG}, {},
                                             "predictions"),
    "raw bytes as image/png": ("POST", "/predictions/echo", {"data": PNG, "headers": {"Content-Type": "image/png"}},
                               {"body": PNG}, {"Content-Type": "image/png"}, "predictions"),
    "JSON": ("POST", "/predictions/echo", {"json": {"data": B64, "topk": 2}}, {"body": {"data": B64, "topk": 2}}, {},
             "predictions"),
    "base64 text": ("POST", "/predictions/echo", {"data": B64, "headers": {"Content-Type": "text/plain"}},
                    {"body": B64}, {}, "predictions"),
    "multipart with a topk field": ("POST", "/predictions/echo",
                                    {"files": {"data": ("cat.png", PNG), "topk": (None, "3")}},
                                    {"data": PNG, "topk": "3"}, {}, "predictions"),
    "X-TopK header": ("PUT", "/predictions/echo", {"data": PNG, "headers": {"X-TopK": "4"}}, {"body": PNG},
                      {"X-TopK": "4"}, "predictions"),
    # TorchServe 0.12 passes no query parameter to a worker, for PUT or POST: `?topk=` never reaches a handler.
    "query parameter (dropped)": ("PUT", "/predictions/echo?topk=2", {"data": PNG}, {"body": PNG}, {},
                                  "predictions"),
    "query parameter on a POST (dropped)": ("POST", "/predictions/echo?topk=2", {"json": {"data": B64}},
                                            {"body": {"data": B64}}, {}, "predictions"),
    "/explanations": ("POST", "/explanations/echo", {"json": {"data": B64}}, {"body": {"data": B64}}, {},
                      "explanations"),
    "KServe v1 :predict": ("POST", "/v1/models/echo:predict", {"json": {"instances": [{"b64": B64}]}},
                           {"body": {"instances": [{"b64": B64}]}}, {}, "kserve"),
    "KServe v1 :explain": ("POST", "/v1/models/echo:explain", {"json": {"instances": [{"b64": B64}]}},
                           {"body": {"instances": [{"b64": B64}]}}, {}, "kserve-explain"),
    "KServe v2 infer": ("POST", "/v2/models/echo/infer", {"json": {"inputs": []}}, {"body": {"inputs": []}}, {},
                        "kserve"),
}


@pytest.mark.parametrize("name", HTTP_CASES)
def test_the_harness_frames_http_requests_as_the_frontend_does(echo, name):
    method, path, kwargs, row, headers, route = HTTP_CASES[name]
    response = requests.request(method, echo.url("inference") + path, timeout=60, **kwargs)
    assert response.status_code == 200, response.text[:300]
    assert_same_request(response.json(), harness(row, headers, route))


def test_the_harness_frames_describe_as_the_management_api_does(echo):
    described = echo.http.get(f"{echo.url('management')}/models/echo/1.0", params={"customized": "true"},
                              timeout=60).json()[0]["customizedMetadata"]
    assert_same_request(described if isinstance(described, dict) else json.loads(described),
                        harness({}, None, "describe"))


def test_the_harness_frames_grpc_requests_as_the_frontend_does(echo, stubs):
    import grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{echo.grpc_port()}")
    try:
        stub = stubs.inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        answer = stub.Predictions(stubs.inference_pb2.PredictionsRequest(
            model_name="echo", input={"data": PNG, "topk": b"3"}), timeout=60)
    finally:
        channel.close()
    real = json.loads(answer.prediction)
    assert_same_request(real, harness({"data": PNG, "topk": b"3"}, None, "grpc"))
    assert all(isinstance(value, dict) for _, value in real["headers"])  # what the handler's gRPC test relies on
