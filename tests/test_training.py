"""Training, resume, evaluation and export end to end on tiny data the tests write (no network)."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models import data, zoo
from models.checksum import sha256_of
from models.specs import CIFAR10, SPECS
from serving.catalog import SHIPPED
from tests import reference
from training import evaluate, export, train
from training.augment import augment

ROOT = Path(__file__).resolve().parent.parent


def write_npz(path: Path, dataset: str, n: int = 240, seed: int = 0) -> Path:
    spec = SPECS[dataset]
    rng = np.random.default_rng(seed)
    shape = (n, 28, 28) if dataset == "mnist" else (n, 32, 32, 3)
    np.savez_compressed(path, images=rng.integers(0, 256, shape, dtype=np.uint8),
                        labels=rng.integers(0, spec.num_classes, n).astype(np.int64))
    return path


def write_mnist_idx(root: Path, n: int = 240, seed: int = 0) -> Path:
    """MNIST in torchvision's on-disk layout (MNIST/raw/*-ubyte), which it reads without checksums."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, count in (("train", n), ("t10k", 20)):
        pixels = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, count).astype(np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            np.array([0x803, count, 28, 28], dtype=">i4").tobytes() + pixels.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            np.array([0x801, count], dtype=">i4").tobytes() + labels.tobytes())
    return root


def run(tmp_path: Path, *extra: str, arch: str = "lenet", source: str = "npz", data_path: Path | None = None,
        out: str = "w.pt", epochs: int = 2) -> dict:
    data_path = data_path or write_npz(tmp_path / f"{arch}.npz", zoo.get(arch).dataset)
    return train.main(["--arch", arch, "--data-source", source, "--data-path", str(data_path),
                       "--out", str(tmp_path / out), "--checkpoint-dir", str(tmp_path / "ck"),
                       "--epochs", str(epochs), "--val-size", "40", "--batch-size", "32", "--threads", "1", *extra])


def test_train_lenet_from_npz_writes_weights_and_card(tmp_path):
    card = run(tmp_path)
    weights = torch.load(tmp_path / "w.pt", weights_only=True)
    assert set(weights) == set(zoo.get("lenet").build().state_dict())
    on_disk = json.loads((tmp_path / "w.json").read_text())
    assert on_disk == card
    assert card["architecture"]["name"] == "lenet" and card["data"]["train_images"] == 200
    assert card["validation_split"]["size"] == 40 and len(card["history"]) == 2
    assert set(card["validation"]["per_class"]) == set(CIFAR10.classes)
    assert card["weights"]["sha256"] == sha256_of(tmp_path / "w.pt")
    assert card["data"]["sha256"] == sha256_of(tmp_path / "lenet.npz")
    assert card["training"]["images_per_second"] > 0 and card["environment"]["torch"] == torch.__version__


def test_train_mnist_convnet_through_torchvision_idx_files(tmp_path):
    root = write_mnist_idx(tmp_path / "tv")
    card = run(tmp_path, arch="convnet", source="torchvision", data_path=root, epochs=1)
    assert card["data"]["source"] == "torchvision" and card["data"]["train_images"] == 200
    images, labels = data.load("mnist", "torchvision", root)
    assert images.shape == (240, 1, 28, 28) and images.dtype == torch.uint8 and labels.dtype == torch.int64


def test_npz_and_torchvision_sources_load_the_same_pixels(tmp_path):
    root = write_mnist_idx(tmp_path / "tv", n=50)
    tv_images, tv_labels = data.load("mnist", "torchvision", root)
    raw = root / "MNIST" / "raw"
    pixels = np.frombuffer((raw / "train-images-idx3-ubyte").read_bytes()[16:], np.uint8).reshape(-1, 28, 28)
    labels = np.frombuffer((raw / "train-labels-idx1-ubyte").read_bytes()[8:], np.uint8).astype(np.int64)
    np.savez_compressed(tmp_path / "m.npz", images=pixels, labels=labels)
    npz_images, npz_labels = data.load("mnist", "npz", tmp_path / "m.npz")
    assert torch.equal(tv_images, npz_images) and torch.equal(tv_labels, npz_labels)


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    npz = write_npz(tmp_path / "d.npz", "cifar10")
    run(full, data_path=npz, epochs=3)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    card = run(resumed, "--resume", str(full / "ck" / "cifar10_lenet" / "epoch-001.pt"), data_path=npz, epochs=3)
    a = torch.load(full / "w.pt", weights_only=True)
    b = torch.load(resumed / "w.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert card["training"]["resumed"] and len(card["history"]) == 3
    checkpoint = torch.load(full / "ck" / "cifar10_lenet" / "epoch-003.pt", weights_only=True)
    assert {"epoch", "model_state_dict", "optimizer_state_dict", "scheduler_state_dict",
            "best_accuracy"} <= set(checkpoint)


def test_validation_split_is_fixed_and_disjoint():
    train_a, val_a = data.validation_indices(1000, 100)
    train_b, val_b = data.validation_indices(1000, 100)
    assert np.array_equal(val_a, val_b) and not set(train_a) & set(val_a) and len(train_a) + len(val_a) == 1000


def translations(image: torch.Tensor, pad: int) -> list[tuple[int, int, bool, torch.Tensor]]:
    """Every zero-filled shift of `image` by up to `pad` pixels, unflipped and flipped: what augment may return."""
    _, h, w = image.shape
    padded = torch.nn.functional.pad(image, (pad, pad, pad, pad))
    return [(dy, dx, flip, (padded[:, dy:dy + h, dx:dx + w].flip(2) if flip else padded[:, dy:dy + h, dx:dx + w]))
            for dy in range(2 * pad + 1) for dx in range(2 * pad + 1) for flip in (False, True)]


def test_augment_translates_and_flips_whole_batches():
    """Each output image is one of its input's shifts (zero fill) or their mirror images, and a seeded batch of
    64 uses many different ones, flips included: a no-op or a wrong shift fails."""
    images = torch.randint(1, 256, (64, 3, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    out = augment(images, pad=2, flip=True, generator=torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    chosen = []
    for source, result in zip(images, out, strict=True):
        matches = [(dy, dx, flip) for dy, dx, flip, candidate in translations(source, 2)
                   if torch.equal(candidate, result)]
        assert matches, "an output image is no shift or flip of its input"
        chosen.append(matches[0])
    assert len(set(chosen)) >= 10  # 50 possible (dy, dx, flip); a seeded draw of 64 covers many
    assert any(flip for _, _, flip in chosen) and not all(flip for _, _, flip in chosen)
    assert any((dy, dx) != (2, 2) for dy, dx, _ in chosen)  # (2, 2) is no shift at all
    assert torch.equal(augment(images, pad=0, flip=False, generator=torch.Generator()), images)


def test_evaluate_prints_per_class_accuracy_and_writes_plots(tmp_path, capsys):
    npz = write_npz(tmp_path / "d.npz", "cifar10")
    run(tmp_path, data_path=npz, epochs=1)
    report = evaluate.main(["--weights", str(tmp_path / "w.pt"), "--data-path", str(npz)])
    printed = capsys.readouterr().out
    assert "confusion matrix" in printed and "airplane" in printed
    assert sum(map(sum, report["confusion_matrix"])) == 40
    for suffix in ("confusion", "curve"):
        assert (tmp_path / f"w.{suffix}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("version", SHIPPED, ids=lambda v: f"{v.model}-{v.version}")
def test_export_torchscript_and_onnx_match_eager(tmp_path, version):
    script_path, onnx_path = export.export(version.weights, tmp_path)
    import onnx

    graph_input = onnx.load(str(onnx_path)).graph.input[0]
    assert graph_input.type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch axis
    assert torch.jit.load(str(script_path))(torch.zeros(5, *SPECS[version.model].input_shape)).shape == (5, 10)


def defined_classes(path: Path) -> list[str]:
    return [node.name for node in ast.parse(path.read_text()).body if isinstance(node, ast.ClassDef)]


@pytest.mark.parametrize("arch", zoo.ARCHITECTURES.values(), ids=lambda a: a.name)
def test_every_model_file_defines_exactly_one_class(arch):
    assert defined_classes(arch.source_file) == [arch.class_name]


def test_every_handler_defines_exactly_one_class_and_reads_the_training_spec():
    """The handler an archive carries is generated per data set (serving/archive.py): one class, whose spec is
    the very object training normalises with."""
    from serving.archive import handler_source

    assert len(defined_classes(ROOT / "handlers" / "image_classifier.py")) == 1
    for name, spec in SPECS.items():
        source = handler_source(name)
        (cls,) = [node.name for node in ast.parse(source).body if isinstance(node, ast.ClassDef)]
        namespace: dict = {}
        exec(compile(source, f"{name}.py", "exec"), namespace)
        assert namespace[cls].spec is spec


def test_training_and_serving_read_the_same_constants():
    assert train.SPECS is SPECS
    for version in SHIPPED:
        card = json.loads(version.weights.with_suffix(".json").read_text())
        spec = SPECS[version.model]
        assert card["input"] == {"shape": list(spec.input_shape), "mean": list(spec.mean), "std": list(spec.std),
                                 "classes": list(spec.classes)}


@pytest.mark.parametrize("version", SHIPPED, ids=lambda v: f"{v.model}-{v.version}")
def test_shipped_weights_load_weights_only_and_reach_the_card_accuracy(version, validation_split):
    card = json.loads(version.weights.with_suffix(".json").read_text())
    assert card["weights"]["sha256"] == sha256_of(version.weights)
    model = reference.network(version)
    images, labels = validation_split(version.model)
    spec = SPECS[version.model]
    with torch.inference_mode():
        logits = torch.cat([model.eval()(spec.normalize(chunk)) for chunk in images.split(1000)])
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    # The card's headline may include test-time augmentation; it also records the plain forward pass.
    plain = card["validation"].get("accuracy_without_tta", card["validation"]["accuracy"])
    # The card was computed on another CPU, whose fp32 kernels differ from this one's by ~1e-6 in a logit: only an
    # image whose best two logits are that close can change its answer. Each such near-tie (within 1e-4, 100x
    # that) may move the accuracy by one image; every other image must be answered as on the card's host.
    top2 = logits.topk(2, dim=1).values
    near_ties = int((top2[:, 0] - top2[:, 1] < 1e-4).sum())
    assert abs(accuracy - plain) <= (near_ties + 0.5) / len(labels), (accuracy, plain, near_ties)


def test_airbench_trains_from_scratch_on_tiny_data(tmp_path):
    card = run(tmp_path, "--batch-size", "64", arch="airbench", epochs=1)
    assert card["architecture"]["name"] == "airbench" and card["validation"]["tta"] == 2
    assert "accuracy_without_tta" in card["validation"] and card["training"]["optimizer"]["lookahead"]
    weights = torch.load(tmp_path / "w.pt", weights_only=True)
    # The frozen whitening layer holds the PCA whitening of the training images' patches: what init_whitening
    # computes from the same images (the first 5,000 of the training split), not a fresh layer's random init.
    from models.airbench import Airbench

    images, labels = data.load("cifar10", "npz", tmp_path / "airbench.npz")
    fitted = Airbench()
    fitted.init_whitening(CIFAR10.normalize(data.split(images, labels, 40).train_images[:5000]))
    torch.testing.assert_close(weights["whiten.weight"], fitted.whiten.weight, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(Airbench().whiten.weight, fitted.whiten.weight)


def test_airbench_batchnorm_folding_is_exact():
    from models.airbench import Airbench

    torch.manual_seed(0)
    model = Airbench()
    model.train()
    with torch.no_grad():
        for _ in range(3):  # give every BatchNorm non-trivial running statistics and biases
            model(torch.randn(16, 3, 32, 32) * 2 + 0.5)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.bias.normal_()
    model.eval()
    x = torch.randn(8, 3, 32, 32)
    with torch.inference_mode():
        expected = model(x)
        folded = model.fold_batchnorm()(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(folded, expected, atol=1e-4, rtol=1e-4)


def test_archives_of_one_model_build_side_by_side(tmp_path):
    """torch-model-archiver stages in $TMPDIR/<model-name>/; builds at once (a test beside `make archive`) must
    not share it (one CI run failed on exactly that: FileNotFoundError /tmp/cifar10/cifar10.py)."""
    import zipfile
    from concurrent.futures import ThreadPoolExecutor

    from serving import archive

    version = next(v for v in SHIPPED if v.version == "2.0")
    with ThreadPoolExecutor(4) as pool:
        built = list(pool.map(lambda i: archive.build(version, tmp_path / f"store{i}"), range(4)))
    for path in built:
        with zipfile.ZipFile(path) as zf:
            assert zf.testzip() is None and "handlers/image_classifier.py" in zf.namelist()


def test_training_runs_on_the_cpu_unless_cuda_is_there(tmp_path, capsys):
    """--device auto picks CUDA only when it is available, and the card says where training ran; asking for
    CUDA on a machine without it is refused before any work."""
    card = run(tmp_path, "--device", "auto", epochs=1)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert card["training"]["device"] == expected
    assert card["training"]["autocast"] == ("bf16" if expected == "cuda" else None)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            run(tmp_path, "--device", "cuda", epochs=1)
        assert "CUDA is not available" in capsys.readouterr().err


def test_normalisation_runs_on_the_images_device():
    """Training and evaluation normalise batches where they are (the GPU with --device cuda): the constants must
    follow the images. The meta device stands in for a GPU here; before, this raised a device mismatch, which is
    how the first one-epoch run on an H100 failed."""
    on_meta = CIFAR10.normalize(torch.zeros((2, 3, 32, 32), dtype=torch.uint8, device="meta"))
    assert on_meta.device.type == "meta" and on_meta.shape == (2, 3, 32, 32)
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    mean = torch.tensor(CIFAR10.mean).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10.std).view(1, 3, 1, 1)
    torch.testing.assert_close(CIFAR10.normalize(pixels), (pixels / 255.0 - mean) / std)
