"""Explanations: Captum's Integrated Gradients through the real handler, checked against a property IG has."""
from __future__ import annotations

import importlib.abc
import sys

import numpy as np
import pytest
import torch

from models import numerics
from models.specs import SPECS
from serving.catalog import SHIPPED
from tests import images, reference
from tests.conftest import version_key
from training.reference import path_for

VERSIONS = {f"{v.model}-{v.version}": v for v in SHIPPED}
# Completeness: IG's attributions sum to output(image) - output(baseline) for the target class, up to the error of
# its 64-step quadrature along the path. For the airbench network (GELU, smooth) that error stayed under 1.1% on
# these 32 reference images; for the ReLU/max-pool networks the integrand has kinks and single images reach 16%
# (cifar10 1.0) while the median stays near 1%. The bounds below leave margin over those measurements; a wrong
# explanation (gradient × input, the wrong target, channels not summed) misses them by far more.
MAX_RELATIVE_ERROR = {"cifar10-1.0": 0.25, "cifar10-2.0": 0.02, "mnist-1.0": 0.25}
MEDIAN_RELATIVE_ERROR = 0.02


def pngs_of(dataset: str, count: int) -> tuple[list[bytes], torch.Tensor]:
    reference, _, _ = numerics.load_reference(path_for(dataset))
    pixels = reference[:count]
    encoded = [images.encode(p.permute(1, 2, 0).squeeze(-1).numpy()) for p in pixels]
    return encoded, pixels


@pytest.mark.parametrize("name", VERSIONS)
def test_attributions_are_complete_on_the_real_model(harness, name):
    """The sum of each served attribution map equals the target's output difference from the black baseline,
    computed here by an independently built fp32 network; the reported completeness_delta is that gap."""
    version = VERSIONS[name]
    spec = SPECS[version.model]
    h = harness(version_key(version.model, version.version))
    mode = h.handler.describe()["numerics"]["mode"]
    encoded, pixels = pngs_of(version.model, 32)
    model = reference.network(version)
    errors = []
    for start in range(0, 32, 4):  # 4 images per request: the explanation limit
        request = {"body": {"data": [images.b64(png) for png in encoded[start:start + 4]]}}
        status, body = h.one(request, route="explanations")
        assert status == 200, body
        with torch.inference_mode():
            x = spec.normalize(pixels[start:start + 4])
            outputs, baseline = model(x), model(spec.normalize(torch.zeros_like(pixels[:1])))
        # The explained class is the served top-1, computed in the worker's mode (the same batch of 4 here);
        # the attributions themselves are float32 whatever that mode is.
        served_top1 = reference.probabilities(version, mode, x, batch_size=4).argmax(1)
        for i, item in enumerate(body):
            target = spec.classes.index(item["label"])
            assert target == int(served_top1[i])
            gap = float(outputs[i, target] - baseline[0, target])
            attributions = np.array(item["attributions"])
            assert attributions.shape == (spec.image_size, spec.image_size)
            total = attributions.sum()
            # 1,024 values rounded to 6 places: the sum moves by at most 5e-4.
            assert abs((total - gap) - item["completeness_delta"]) < 1e-3 + 1e-4 * abs(gap)
            errors.append(abs(total - gap) / abs(gap))
    assert max(errors) <= MAX_RELATIVE_ERROR[name], errors
    assert float(np.median(errors)) <= MEDIAN_RELATIVE_ERROR, errors


def test_an_explanation_carries_the_calibrated_answer_and_its_method(harness):
    h = harness("cifar10")
    png = images.encode(images.noise(32, 32))
    status, explanation = h.one({"body": png}, {"X-TopK": "3"}, "explanations")
    _, prediction = h.one({"body": png}, {"X-TopK": "3"})
    assert status == 200
    assert explanation["topk"] == prediction and explanation["label"] == next(iter(prediction))
    assert explanation["probability"] == prediction[explanation["label"]]
    assert (explanation["method"], explanation["baseline"], explanation["steps"]) == ("integrated_gradients",
                                                                                     "black", 64)


def test_explanations_speak_kserve_v1_and_v2(harness):
    h = harness("mnist")
    png = images.encode(images.digit())
    status, v1 = h.one({"body": {"instances": [{"b64": images.b64(png)}]}}, route="kserve-explain")
    assert status == 200 and v1["explanations"][0]["label"] == "1"
    v2_request = {"id": "e1", "inputs": [{"name": "input-0", "shape": [1], "datatype": "BYTES",
                                         "data": [images.b64(png)]}]}
    status, v2 = h.one({"body": v2_request}, route="explanations")
    assert status == 200 and v2["id"] == "e1" and v2["model_name"] == "mnist"
    outputs = {o["name"]: o for o in v2["outputs"]}
    assert outputs["labels"]["data"] == ["1"] and outputs["attributions"]["shape"] == [1, 28, 28]
    assert len(outputs["attributions"]["data"]) == 28 * 28
    np.testing.assert_allclose(np.array(outputs["attributions"]["data"]).reshape(28, 28),
                               np.array(v1["explanations"][0]["attributions"]), atol=1e-6)


def test_bad_input_to_an_explanation_is_the_same_4xx_as_a_prediction(harness):
    h = harness("cifar10")
    for row in ({"body": b"not an image"}, {"body": images.encode(images.noise(4, 4))}):
        assert h.one(row, route="explanations") == h.one(row)
    five = {"body": {"data": [images.b64(images.encode(images.noise(32, 32)))] * 5}}
    status, body = h.one(five, route="explanations")
    assert status == 413 and "4 images per explanation request" in body["message"]


class _NoCaptum(importlib.abc.MetaPathFinder):
    """An interpreter without Captum: its import fails as it does where the package is not installed."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name == "captum" or name.startswith("captum."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


def test_without_captum_an_explanation_answers_501_and_predictions_still_work(model_dirs, monkeypatch, caplog):
    """The handler's own lazy import meets a missing Captum (imported modules forgotten, the import refused) at
    initialize: the worker starts, says so in its log and in describe, explanations answer 501, and predictions
    answer as a worker with Captum does."""
    from serving.inprocess import InProcessHandler

    with_captum = InProcessHandler(model_dirs["mnist"])
    for name in [name for name in sys.modules if name == "captum" or name.startswith("captum.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_NoCaptum(), *sys.meta_path])
    h = InProcessHandler(model_dirs["mnist"])
    assert any("captum is not installed" in record.getMessage() for record in caplog.records)
    assert h.handler.describe()["explanations"]["available"] is False
    png = images.encode(images.digit())
    status, body = h.one({"body": png}, route="explanations")
    assert status == 501 and "Captum" in body["message"] and body["type"] == "NotImplemented"
    assert h.one({"body": png}) == with_captum.one({"body": png})
