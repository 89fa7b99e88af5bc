"""Explanations over real HTTP on every route TorchServe gives them: its own and KServe's v1 and v2."""
from __future__ import annotations

import base64

import requests

from serving.catalog import ROOT

CAT = (ROOT / "examples" / "cat.png").read_bytes()
DIGIT = (ROOT / "examples" / "digit7.png").read_bytes()


def test_explanations_on_torchserves_route_for_each_version(served):
    inference = served.url("inference")
    for path, version in (("cifar10", "1.0"), ("cifar10/2.0", "2.0")):
        response = requests.post(f"{inference}/explanations/{path}", data=CAT,
                                 headers={"Content-Type": "image/png"}, timeout=60)
        assert response.status_code == 200, response.text[:300]
        body = response.json()
        assert body["label"] == "cat" and body["model_version"] == version
        assert response.headers["X-Model-Version"] == version
        assert len(body["attributions"]) == 32 and all(len(row) == 32 for row in body["attributions"])
        assert any(value != 0 for row in body["attributions"] for value in row)


def test_explanations_on_kserves_v1_and_v2_routes(served):
    inference = served.url("inference")
    v1 = requests.post(f"{inference}/v1/models/cifar10:explain", timeout=60,
                       json={"instances": [{"b64": base64.b64encode(CAT).decode()}]})
    assert v1.status_code == 200, v1.text[:300]
    assert v1.json()["explanations"][0]["label"] == "cat"
    v2 = requests.post(f"{inference}/v2/models/mnist/explain", timeout=60, json={
        "id": "x1", "inputs": [{"name": "input-0", "shape": [1], "datatype": "BYTES",
                                "data": [base64.b64encode(DIGIT).decode()]}]})
    assert v2.status_code == 200, v2.text[:300]
    outputs = {o["name"]: o for o in v2.json()["outputs"]}
    assert outputs["labels"]["data"] == ["7"] and outputs["attributions"]["shape"] == [1, 28, 28]


def test_a_bad_explanation_request_gets_the_predictions_4xx(served):
    inference = served.url("inference")
    for body in (b"not an image", b"\x89PNG\r\n\x1a\n"):
        explained = requests.post(f"{inference}/explanations/cifar10", data=body, timeout=60,
                                  headers={"Content-Type": "application/octet-stream"})
        predicted = requests.post(f"{inference}/predictions/cifar10", data=body, timeout=60,
                                  headers={"Content-Type": "application/octet-stream"})
        assert explained.status_code == predicted.status_code == 400
        assert explained.json() == predicted.json()
