"""docs/models.md, "Serve your own classifier", performed as a user would on a copy of the repository: a third data set
(3×64×64, 20 classes, synthetic) is one spec added to models/specs.py and a network is one new file in models/;
nothing else is edited. Then one epoch of `python -m training.train`, `make archive MODEL=shapes ...`, the archive
registered on a running TorchServe, and answers in every input form, over REST (plain, KServe v1 and v2 bodies)
and gRPC, equal to each other and to the network run here on the copy's own files.

On the old code this fails at its first step (`make archive MODEL=shapes` said "invalid choice"), and at every
later one a hand edit was missing: a handler file, the catalog's handler table, a model-config YAML, the
architecture table, reference images.
"""
from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
import torch
from PIL import Image

from serving.catalog import ROOT
from tests import readme_samples as samples
from tests.answers import same, tolerance, unexplained_top1_differences
from tests.images import b64

SPEC = '''
SHAPES = DatasetSpec(
    name="shapes",
    image_size=64,
    channels=3,
    mean=(0.5, 0.5, 0.5),
    std=(0.25, 0.25, 0.25),
    classes=tuple(f"shape{i:02d}" for i in range(20)),
)

'''
NETWORK = '''"""A small network for the shapes data set: 3x64x64 in, 20 logits out."""
from torch import nn


class TinyShapes(nn.Module):
    arch = "tinyshapes"
    dataset = "shapes"
    recipe = {"epochs": 1, "batch_size": 64, "lr": 0.1}

    def __init__(self, num_classes: int = 20) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))
'''
IMAGES, CLASSES, VAL_SIZE = 1000, 20, 300


def synthetic(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n uint8 64×64 RGB images on noise, each with a square whose colour is its class (N×H×W×C, as the npz
    format wants)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, n)
    images = rng.integers(0, 80, (n, 64, 64, 3), dtype=np.uint8)
    palette = rng.integers(0, 256, (CLASSES, 3), dtype=np.uint8)
    for image, label in zip(images, labels, strict=True):
        y, x = rng.integers(0, 40, 2)
        image[y:y + 24, x:x + 24] = palette[label]
    return images, labels


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A copy of the repository's tracked files (timestamps kept, so make sees an installed .venv), with the
    user's two additions: the spec and the network file."""
    project = tmp_path_factory.mktemp("own-model") / "repo"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in tracked.decode().split("\0"):
        if name and (ROOT / name).is_file():
            (project / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, project / name)
    (project / ".venv").symlink_to(ROOT / ".venv")
    specs = project / "models" / "specs.py"
    text = specs.read_text()
    registry = "SPECS: dict[str, DatasetSpec] = {spec.name: spec for spec in (CIFAR10, MNIST)}"
    assert registry in text
    anchor = text.index("# Every data set the project trains")
    specs.write_text(text[:anchor] + SPEC.lstrip()
                     + text[anchor:].replace("(CIFAR10, MNIST)", "(CIFAR10, MNIST, SHAPES)"))
    (project / "models" / "tiny_shapes.py").write_text(NETWORK)
    images, labels = synthetic(IMAGES)
    np.savez(project / "shapes_train.npz", images=images, labels=labels)
    return project


def documented() -> list[str]:
    """docs/models.md's commands for your own classifier, as the reader runs them: train, build, register, ask."""
    [block] = samples.blocks(ROOT / "docs" / "models.md", ("own model",))
    found = [sample.command for sample in block.samples]
    assert [c.split()[0] for c in found] == [".venv/bin/python", "make", ".venv/bin/python", "curl"], found
    return found


@pytest.fixture(scope="module")
def built(project) -> Path:
    """The docs' training and `make archive` commands, run as written in the copy."""
    train, make_archive, _, _ = documented()
    trained = samples.Target("", "", []).run(train, cwd=project)
    assert "shapes_reference.npz" in trained and "shapes_calibration.npz" in trained
    assert f"--val-size {VAL_SIZE}" in train
    out = samples.Target("", "", []).run(make_archive, cwd=project)
    assert "shapes.mar: shapes 1.0 (tinyshapes)" in out, out
    assert "pip install" not in out  # make found the installed .venv and did not reinstall it
    return project / "model_store" / "shapes.mar"


@pytest.fixture(scope="module")
def registered(served, built, project):
    """The docs' `client register` and curl commands, run as written against the suite's server (its model store
    holds the archive, as `make serve`'s would after `make archive`)."""
    from client.api import TorchServeClient

    for path in (built, built.with_name(built.name + ".sha256")):
        shutil.copy(path, served.model_store / path.name)
    _, _, register, ask = documented()
    target = samples.Target.plain(served)
    client = TorchServeClient(management_url=served.url("management"), inference_url=served.url("inference"),
                              timeout=240)
    try:
        target.run(register, cwd=project)
        answer = json.loads(target.run(ask, cwd=project))
        assert len(answer) == 5 and all(label.startswith("shape") for label in answer), answer
        yield client
    finally:
        client.unregister("shapes", "1.0", force=True)
        for path in (built, built.with_name(built.name + ".sha256")):
            (served.model_store / path.name).unlink()


def expected_probabilities(project: Path, pngs: list[bytes], mode: str) -> torch.Tensor:
    """The copy's own network and weights, decoded and normalised by the copy's own modules, in the mode the
    worker serves with, calibrated by the card's temperature: computed in a process of the copy, which alone
    knows the new spec."""
    script = '''
import json, sys, zipfile
import numpy as np, torch
from handlers.imaging import Limits, decode_image
from models import zoo
from models.inference import calibrated_probabilities
from models.numerics import Runner
from models.specs import SPECS
from tests import reference
from serving.catalog import ModelVersion
spec, mode, pngs = SPECS["shapes"], sys.argv[1], [bytes.fromhex(h) for h in json.load(sys.stdin)]
version = ModelVersion("shapes", "1.0", "tinyshapes", zoo.WEIGHTS_DIR / "shapes_tinyshapes.pt")
runner = reference.runner(version, mode)
try:
    temperature = reference.temperature(version, mode)
except FileNotFoundError:  # an ORT mode's T is fitted by the build (serving/quantize.py); no record is committed
    numbers = json.loads(zipfile.ZipFile("model_store/shapes.mar").read("numerics.json"))
    temperature = numbers["modes"][mode]["levels"][str(reference.tta(version))]["temperature"]
torch.set_num_threads(1)
decoded = np.stack([decode_image(p, 64, 3, Limits(), False) for p in pngs])
pixels = spec.normalize(torch.from_numpy(decoded).permute(0, 3, 1, 2))
with torch.inference_mode():
    probs = calibrated_probabilities(runner, pixels, reference.tta(version), temperature)
print(json.dumps(probs.tolist()))
'''
    done = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-c", script, mode], cwd=project,
                          input=json.dumps([p.hex() for p in pngs]), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.tensor(json.loads(done.stdout))


def test_a_new_data_set_and_network_serve_in_every_form_and_protocol(project, served, registered, stubs):
    inference = served.url("inference")
    url = f"{inference}/predictions/shapes"
    described = registered.handler_description("shapes", "1.0")
    assert described["input"]["shape"] == [3, 64, 64] and len(described["labels"]) == CLASSES
    mode = described["numerics"]["mode"]
    tol = tolerance(mode)

    images, _ = synthetic(8, seed=1)
    pngs = [png(image) for image in images]
    first = requests.put(url, data=pngs[0], timeout=60)  # curl -T image.png
    assert first.status_code == 200, first.text
    expected = first.json()
    assert len(expected) == 5 and all(label.startswith("shape") for label in expected)
    answers = {
        "raw POST": requests.post(url, data=pngs[0], timeout=60).json(),
        "multipart": requests.post(url, files={"data": ("x.png", pngs[0], "image/png")}, timeout=60).json(),
        "base64 text": requests.post(url, data=b64(pngs[0]), headers={"Content-Type": "text/plain"},
                                     timeout=60).json(),
        "data URL": requests.post(url, data="data:image/png;base64," + b64(pngs[0]),
                                  headers={"Content-Type": "text/plain"}, timeout=60).json(),
        "json": requests.post(url, json={"data": b64(pngs[0])}, timeout=60).json(),
        "json batch": requests.post(url, json={"data": [b64(pngs[0])]}, timeout=60).json()[0],
        "KServe v1": requests.post(url, json={"instances": [{"b64": b64(pngs[0])}]},
                                   timeout=60).json()["predictions"][0],
    }
    request = stubs.inference_pb2.PredictionsRequest(model_name="shapes", input={"data": pngs[0]})
    with grpc.insecure_channel(f"127.0.0.1:{served.grpc_port()}") as channel:
        reply = stubs.inference_pb2_grpc.InferenceAPIsServiceStub(channel).Predictions(request, timeout=60)
    answers["gRPC"] = json.loads(reply.prediction)
    for name, answer in answers.items():
        assert same(answer, expected, tol), (name, answer, expected)

    pixels = images[0].flatten().tolist()
    for tensor in ({"name": "pixels", "datatype": "UINT8", "shape": [1, 64, 64, 3], "data": pixels},
                   {"name": "images", "datatype": "BYTES", "shape": [1], "data": [b64(pngs[0])]}):
        v2 = requests.post(url, json={"id": "r1", "inputs": [tensor]}, timeout=60)  # KServe v2
        assert v2.status_code == 200, v2.text
        outputs = {o["name"]: o["data"] for o in v2.json()["outputs"]}
        assert v2.json()["id"] == "r1" and outputs["labels"] == list(expected), tensor["datatype"]
        assert outputs["probabilities"] == pytest.approx(list(expected.values()), abs=tol + 1e-6)
    wrong = requests.post(url, json={"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 32, 32, 3],
                                                 "data": [0] * 3072}]}, timeout=60)
    assert wrong.status_code == 400 and "64" in wrong.text  # the new input shape is the one checked

    every = requests.put(url, data=pngs[0], headers={"X-TopK": str(CLASSES)}, timeout=60)
    served_probs = []
    for image in pngs:
        body = requests.put(url, data=image, headers={"X-TopK": str(CLASSES)}, timeout=60).json()
        served_probs.append([body[f"shape{i:02d}"] for i in range(CLASSES)])
    assert len(every.json()) == CLASSES
    reference_probs = expected_probabilities(project, pngs, mode)
    # One image per request, so each is a batch of one as here: the mode's tolerance (tests/answers.py).
    torch.testing.assert_close(torch.tensor(served_probs), reference_probs, atol=tol, rtol=0)
    assert not unexplained_top1_differences(torch.tensor(served_probs).argmax(1), reference_probs, mode)


def test_the_archive_build_refuses_plainly_what_it_cannot_build(project, built):
    """The placeholder docs/serving.md shows, a network for another data set: one line each, no traceback."""
    for args, message in ((["WEIGHTS=path/to/weights.pt"], "weights not found: path/to/weights.pt"),
                          (["WEIGHTS=models/weights/cifar10_lenet.pt", "ARCH=lenet"],
                           "--arch lenet is a cifar10 network, not a shapes one")):
        done = subprocess.run(["make", "archive", "MODEL=shapes", *args], cwd=project, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode != 0 and message in done.stderr, done.stderr
        assert "Traceback" not in done.stderr

