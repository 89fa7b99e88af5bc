"""The ONNX Runtime modes (models/onnx_runtime.py, serving/quantize.py): built with the archive, measured on the
validation split, calibrated per mode, checked again by every worker on its own host, and refused where they
disagree or lose accuracy."""
from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch

from models import numerics, onnx_runtime, zoo
from models.reference import path_for
from models.specs import SPECS
from serving import archive, quantize
from serving.catalog import SHIPPED
from tests import reference

V2 = next(v for v in SHIPPED if (v.model, v.version) == ("cifar10", "2.0"))
MNIST = next(v for v in SHIPPED if v.model == "mnist")
AUTO = {"numerics": "auto"}


def numbers_of(model_dir) -> dict:
    return json.loads((model_dir / onnx_runtime.NUMBERS_FILE).read_text())


def test_the_2_0_archive_ships_int8_measured_on_the_whole_validation_split(model_dirs):
    """The issue's bars, as the archive ships them: int8 and ONNX Runtime fp32 within 0.3 points of fp32 at every
    TTA level, agreeing with fp32 on at least 99% of the reference images, each level's ECE at most 1.5% with the
    temperature fitted for that mode, calibrated on training images."""
    shipped = numbers_of(model_dirs["cifar10/2.0"])
    assert set(shipped["modes"]) == {"fp32", "ort-fp32", "ort-int8"} and shipped["not_shipped"] == {}
    assert shipped["calibration"]["split"] == "training" and shipped["measured_on"]["cpu"]
    fp32 = shipped["modes"]["fp32"]["levels"]
    for mode in onnx_runtime.FILES:
        entry = shipped["modes"][mode]
        assert (model_dirs["cifar10/2.0"] / entry["file"]).is_file()
        assert entry["reference_agreement"] >= numerics.MIN_AGREEMENT
        assert set(entry["levels"]) == {str(level) for level in SPECS["cifar10"].tta_levels}
        for level, measured in entry["levels"].items():
            assert measured["accuracy"] >= fp32[level]["accuracy"] - numerics.MAX_ACCURACY_DROP, (mode, level)
            assert measured["ece"] <= quantize.MAX_ECE, (mode, level, measured)
    assert shipped["modes"]["ort-int8"]["levels"]["0"]["temperature"] != fp32["0"]["temperature"]
    assert shipped["modes"]["ort-fp32"]["levels"] == fp32  # logits agree to 1e-5: fp32's T and numbers


def test_int8_accuracy_on_the_validation_split_is_what_the_archive_says(model_dirs, validation_split):
    """The archive's int8 file, run here on all 5,000 validation images, scores what the committed record (measured
    on the host it names) says: 7-bit weights make ONNX Runtime's integer sums exact on every x86 CPU, so the
    number holds across hosts; within 2 images for the float32 parts (first convolution, GELU) around them."""
    images, labels = validation_split("cifar10")
    model_dir = model_dirs["cifar10/2.0"]
    run = onnx_runtime.OrtRunner("ort-int8", model_dir / onnx_runtime.FILES["ort-int8"], threads=2)
    accuracy = (numerics.top1(run, SPECS["cifar10"].normalize(images), batch_size=500) == labels).double().mean()
    recorded = numbers_of(model_dir)["modes"]["ort-int8"]["levels"]["0"]["accuracy"]
    assert abs(float(accuracy) - recorded) <= 2 / len(labels), (float(accuracy), recorded)


def build_mnist(tmp_path, calibration: np.ndarray) -> dict:
    fp32 = archive.recorded_fp32_top1(MNIST.model, MNIST.weights)
    return quantize.build(MNIST.model, MNIST.weights, zoo.get(MNIST.arch), tmp_path, fp32, use_record=False,
                          calibration=calibration)


def test_a_build_that_would_calibrate_on_validation_images_fails(tmp_path):
    validation, _, _ = numerics.load_reference(path_for("mnist"))  # the first validation images
    committed, _ = quantize.calibration_images("mnist")
    mixed = np.concatenate([committed[:500], validation[:12].numpy()])
    with pytest.raises(ValueError, match="12 of the 512 int8 calibration images are reference"):
        build_mnist(tmp_path, mixed)


def test_a_quantized_model_that_disagrees_with_fp32_is_not_shipped(tmp_path):
    """Activation ranges fitted on blank pages clip every real digit's activations: that int8 file disagrees with
    fp32 and the build leaves it out, saying why."""
    blank = np.zeros((64, 1, 28, 28), dtype=np.uint8)
    shipped = build_mnist(tmp_path, blank)
    assert "ort-int8" not in shipped["modes"] and not (tmp_path / onnx_runtime.FILES["ort-int8"]).exists()
    assert "under 99%" in shipped["not_shipped"]["ort-int8"]
    assert "ort-fp32" in shipped["modes"]


@pytest.fixture
def v2_copy(model_dirs, tmp_path):
    return shutil.copytree(model_dirs["cifar10/2.0"], tmp_path / "v2", ignore=shutil.ignore_patterns(".numerics*"))


def test_a_worker_refuses_an_int8_file_that_disagrees_on_its_host(v2_copy, tmp_path):
    """What keeps int8 off a host whose kernels compute it worse: the worker's own agreement check. The archive's
    int8 file is swapped for one that disagrees (calibrated on black images), its numbers left as measured."""
    from serving.inprocess import InProcessHandler

    black = SPECS["cifar10"].normalize(torch.zeros(64, 3, 32, 32, dtype=torch.uint8))
    quantize.quantize(v2_copy / onnx_runtime.FILES["ort-fp32"], v2_copy / onnx_runtime.FILES["ort-int8"], black)
    choice = InProcessHandler(v2_copy, {"handler": {**AUTO, "threads": 1}}).handler.numerics
    assert choice.mode != "ort-int8", choice
    if "ort-int8" in choice.agreement:  # checked because it was the fastest candidate left
        assert choice.agreement["ort-int8"] < numerics.MIN_AGREEMENT


def test_a_mode_below_the_accuracy_bar_is_not_a_candidate(v2_copy):
    from serving.inprocess import InProcessHandler

    shipped = numbers_of(v2_copy)
    fp32 = shipped["modes"]["fp32"]["levels"]["0"]["accuracy"]
    shipped["modes"]["ort-int8"]["levels"]["0"]["accuracy"] = round(fp32 - 0.004, 5)
    (v2_copy / onnx_runtime.NUMBERS_FILE).write_text(json.dumps(shipped))
    choice = InProcessHandler(v2_copy, {"handler": {**AUTO, "tta": 0}}).handler.numerics
    assert "ort-int8" not in choice.images_per_s and "ort-fp32" in choice.images_per_s
    assert "at most 0.3% lower" in choice.refused["ort-int8"]
    assert "ort-int8 not a candidate" in choice.summary()


def test_without_onnxruntime_the_ort_modes_are_skipped_and_the_worker_says_so(v2_copy, monkeypatch):
    from serving.inprocess import InProcessHandler

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError, as in an image
    auto = InProcessHandler(v2_copy, {"handler": AUTO}).handler.numerics
    assert set(auto.images_per_s) == set(numerics.candidates(torch.device("cpu")))
    assert auto.refused == dict.fromkeys(onnx_runtime.FILES, "onnxruntime is not installed in this image")
    configured = InProcessHandler(v2_copy, {"handler": {"numerics": "ort-int8"}}).handler
    assert configured.numerics.mode == "fp32" and "unavailable" in configured.numerics.chosen_by


def test_a_configured_int8_worker_serves_int8_with_its_own_temperature_and_explains_in_torch(v2_copy):
    """handler.numerics: ort-int8 serves the archive's int8 file with int8's temperature at the YAML's TTA level;
    its probabilities equal an int8 session built here from the shipped weights by the recipe (within 1e-6:
    rounding to 6 places, and the same integer kernels); explanations still run on the torch network."""
    from serving.inprocess import InProcessHandler
    from tests import images

    h = InProcessHandler(v2_copy, {"handler": {"numerics": "ort-int8", "threads": 1}})
    # (the archive's own modules run the worker, so its classes are not this process's: compare by name)
    assert type(h.handler.model).__name__ == "OrtRunner" and h.handler.model.mode == "ort-int8"
    assert h.handler.temperature == reference.temperature(V2, "ort-int8")
    assert type(h.handler.explainer).__name__ == "Runner" and h.handler.explainer.mode == "fp32-cl"
    rows = [{"body": images.encode(images.noise(32, 32, seed=i))} for i in range(4)]
    batch = h.preprocess(rows)
    expected = reference.probabilities(V2, "ort-int8", batch.images, batch_size=4)
    for (status, body), probs in zip(h.run(rows, [{"X-TopK": "10"}] * 4), expected, strict=True):
        assert status == 200
        torch.testing.assert_close(torch.tensor([body[c] for c in SPECS["cifar10"].classes]), probs, atol=1e-6,
                                   rtol=0)
    explained = h.run([{"body": images.encode(images.noise(32, 32, seed=9))}], [{"explain": "True"}])
    assert explained[0][0] == 200 and "attributions" in explained[0][1]
