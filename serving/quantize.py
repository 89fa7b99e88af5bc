"""The ONNX Runtime files an archive ships, built with it: fp32 ONNX, int8 ONNX, and what each measured.

    python -m serving.quantize --record     # make reference: measure the shipped versions, commit the records

For every archive `make archive` exports the network (BatchNorm folded into the convolutions, exact in eval
mode) to `model.onnx`, quantizes it to `model.int8.onnx` (models/onnx_runtime.py says why this recipe: static
QDQ, per-channel 7-bit int8 weights, uint8 activations with MinMax ranges, the first convolution in float32),
calibrated on the committed slice of the *training* split (models/reference.py), checks both against fp32's
answers for the reference images, and writes `numerics.json`: per mode, its top-1 agreement with fp32 there and,
per TTA level, its accuracy, temperature and ECE on the whole validation split. int8's logits differ from fp32's,
so its temperature is fitted anew (models/calibration.py); ONNX Runtime fp32's agree to 1e-5 and use fp32's.

Measuring takes minutes (5,000 images, every TTA view, each mode), so `make reference` records the numbers
beside the weights (`<weights>.numerics.json`, with the host that measured them), keyed by everything that
decides them: the weights, the calibration images, this recipe and the onnxruntime version. A build uses the
record when the key matches and its own files give the record's answers on the reference images; otherwise it
measures, where the validation split is on disk (the model card names it), or ships the files unmeasured, which
workers then never choose.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models import onnx_runtime, zoo
from models.checksum import sha256_of
from models.inference import TTA_WEIGHTS, tta_views
from models.numerics import MIN_AGREEMENT, cpu_model, isa, load_reference, top1
from models.reference import calibration_path_for, path_for
from models.specs import SPECS, DatasetSpec
from serving.catalog import ROOT, SHIPPED, ModelVersion

OPSET = 17
RECIPE = (f"onnx opset {OPSET} (torch.onnx TorchScript exporter), BatchNorm folded; int8: onnxruntime "
          "quantize_static, QDQ, per-channel int8 weights with reduce_range, uint8 activations, MinMax "
          "calibration, first Conv in float32")
MAX_ECE = 0.015  # a served mode's calibration error on the validation split (the bar, 1.5%)
RECORD_MATCH = 0.995  # a record describes freshly built files when their reference answers agree this closely


_EXPORTING = threading.Lock()


def record_path(weights: Path) -> Path:
    return weights.with_name(weights.stem + ".numerics.json")


def calibration_images(dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """The committed int8 calibration images (uint8 N×C×H×W) and their indices into the training file."""
    with np.load(calibration_path_for(dataset)) as saved:
        return saved["images"], saved["train_indices"]


def check_calibration(images: np.ndarray, forbidden: np.ndarray, what: str) -> None:
    """Refuse calibration images that include any of `forbidden` (the reference images, the validation split):
    ranges fitted on the images that judge the quantized model would flatter it."""
    seen = {image.tobytes() for image in forbidden}
    overlap = sum(image.tobytes() in seen for image in images)
    if overlap:
        raise ValueError(f"{overlap} of the {len(images)} int8 calibration images are {what}: calibrate on the "
                         "training split (models/reference.py), never on the images that judge the model")


def export(network: nn.Module, spec: DatasetSpec, path: Path) -> None:
    """`network` (BatchNorm folded where it can be) as ONNX with a dynamic batch axis."""
    folded = copy.deepcopy(network).eval()
    if hasattr(folded, "fold_batchnorm"):
        folded.fold_batchnorm()
    example = torch.zeros(2, *spec.input_shape)
    # The TorchScript-based exporter: the dynamo exporter's graph of airbench (adaptive max-pool, then a Reshape)
    # defeats onnxruntime's symbolic shape inference, which quantization needs (TypeError in _infer_Reshape).
    # It keeps its state in module globals, so builds in threads of one process take turns.
    with _EXPORTING, warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # its deprecation notice
        torch.onnx.export(folded, (example,), str(path), input_names=[onnx_runtime.INPUT],
                          output_names=[onnx_runtime.OUTPUT], dynamo=False, opset_version=OPSET,
                          dynamic_axes={onnx_runtime.INPUT: {0: "batch"}, onnx_runtime.OUTPUT: {0: "batch"}})


def quantize(fp32_path: Path, out: Path, calibration: torch.Tensor) -> None:
    """The int8 QDQ model of `fp32_path`, activation ranges from `calibration` (normalised float images)."""
    import onnx
    from onnxruntime import quantization as q
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Images(q.CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration.split(64))

        def get_next(self) -> dict | None:
            batch = next(self.batches, None)
            return None if batch is None else {onnx_runtime.INPUT: batch.numpy()}

    with tempfile.TemporaryDirectory(prefix="quantize-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        first_conv = next(node.name for node in onnx.load(str(prepared)).graph.node if node.op_type == "Conv")
        q.quantize_static(str(prepared), str(out), Images(), quant_format=q.QuantFormat.QDQ, per_channel=True,
                          reduce_range=True, activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                          calibrate_method=q.CalibrationMethod.MinMax, nodes_to_exclude=[first_conv])


def validation_split(card: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The validation images and labels the card's numbers were measured on, where the training file it names is
    on disk and unchanged (its sha256 is in the card); else None."""
    from models import data

    path = (ROOT / card["data"]["path"]).resolve()
    if card["data"].get("source") != "npz" or not path.is_file() or sha256_of(path) != card["data"]["sha256"]:
        return None
    images, labels = data.load(card["model"], "npz", path)
    split = data.split(images, labels, card["validation_split"]["size"], seed=card["validation_split"]["seed"])
    return split.val_images, split.val_labels


def levels_of(runner: object, images: torch.Tensor, labels: torch.Tensor, spec: DatasetSpec,
              temperatures: dict[str, float] | None) -> dict[str, dict]:
    """Per TTA level: accuracy, ECE and the temperature (fitted here where `temperatures` is None) of the served
    probabilities, by the serving formula."""
    from models import calibration

    normalised = spec.normalize(images)
    levels = {}
    for level in spec.tta_levels:
        with torch.inference_mode():
            chunks = [[runner(view) for _, view in tta_views(chunk, level)] for chunk in normalised.split(500)]
        views = torch.stack([torch.cat(view) for view in zip(*chunks, strict=True)])
        weights = torch.tensor(TTA_WEIGHTS[level], dtype=torch.float64)
        temperature = (calibration.fit_temperature(views, weights, labels) if temperatures is None
                       else temperatures[str(level)])
        served = calibration.measures(calibration.probabilities(views, weights, temperature), labels)
        levels[str(level)] = {"accuracy": served["accuracy"], "ece": served["ece"], "temperature": temperature}
    return levels


def card_levels(card: dict) -> dict[str, dict]:
    """fp32's numbers per TTA level, as `make evaluate` measured them into the model card."""
    return {level: {"accuracy": fitted["after"]["accuracy"], "ece": fitted["after"]["ece"],
                    "temperature": fitted["temperature"]}
            for level, fitted in card.get("calibration", {}).get("levels", {}).items()}


def record_key(model: str, weights: Path) -> dict:
    return {"weights_sha256": sha256_of(weights), "calibration_sha256": sha256_of(calibration_path_for(model)),
            "recipe": RECIPE, "onnxruntime": onnx_runtime.onnxruntime_version()}


def measure(files: dict[str, Path], card: dict, spec: DatasetSpec,
            split: tuple[torch.Tensor, torch.Tensor]) -> dict[str, dict]:
    """Per ORT mode, its numbers per TTA level on the validation split (`split`: images, labels)."""
    threads = torch.get_num_threads()  # measuring is offline work: every core
    fp32 = card_levels(card)
    temperatures = {level: numbers["temperature"] for level, numbers in fp32.items()}
    return {mode: levels_of(onnx_runtime.OrtRunner(mode, path, threads), *split, spec,
                            temperatures if mode == "ort-fp32" else None)
            for mode, path in files.items()}


def build(model: str, weights: Path, arch: zoo.Architecture, dest: Path, fp32_top1: np.ndarray,
          use_record: bool = True, calibration: np.ndarray | None = None) -> dict:
    """Write model.onnx, model.int8.onnx and numerics.json into `dest` (an archive's extra files); returns what
    numerics.json says. A file whose reference answers agree with fp32's on less than MIN_AGREEMENT is not shipped
    (its absence is said in numerics.json): a worker would refuse it anyway. `calibration`: uint8 images to
    calibrate on instead of the committed ones (checked the same way)."""
    if onnx_runtime.onnxruntime_version() is None:
        raise RuntimeError("onnxruntime is not installed: make install")
    spec = SPECS[model]
    card = json.loads(weights.with_suffix(".json").read_text()) if weights.with_suffix(".json").is_file() else {}
    network = arch.build()
    network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    reference, _, _ = load_reference(path_for(model))
    committed, indices = calibration_images(model)
    calibration = committed if calibration is None else calibration
    check_calibration(calibration, reference.numpy(), "reference (validation) images")
    split = validation_split(card) if card else None
    if split is not None:
        check_calibration(calibration, split[0].numpy(), "validation images")
    started = time.perf_counter()
    files = {mode: dest / name for mode, name in onnx_runtime.FILES.items()}
    export(network.eval(), spec, files["ort-fp32"])
    quantize(files["ort-fp32"], files["ort-int8"], spec.normalize(torch.from_numpy(calibration)))
    numbers: dict = {"recipe": RECIPE, "onnxruntime": onnx_runtime.onnxruntime_version(),
                     "calibration": {"images": len(calibration), "split": "training",
                                     "train_indices_first": indices[:8].tolist() if calibration is committed
                                     else None},
                     "build_seconds": round(time.perf_counter() - started, 1), "modes": {}, "not_shipped": {}}
    normalised = spec.normalize(reference)
    answers = {}
    for mode, path in files.items():
        answers[mode] = top1(onnx_runtime.OrtRunner(mode, path, torch.get_num_threads()), normalised).numpy()
        agreement = float((answers[mode] == fp32_top1).mean())
        if agreement < MIN_AGREEMENT:
            path.unlink()
            numbers["not_shipped"][mode] = (f"top-1 agreement with fp32 on the reference images {agreement:.2%}, "
                                            f"under {MIN_AGREEMENT:.0%}")
            continue
        numbers["modes"][mode] = {"file": path.name, "reference_agreement": round(agreement, 4)}
    numbers["modes"] = {"fp32": {"levels": card_levels(card)}, **numbers["modes"]} if card else numbers["modes"]
    shipped = {mode: files[mode] for mode in numbers["modes"] if mode in files}
    record = json.loads(record_path(weights).read_text()) if use_record and record_path(weights).is_file() else None
    if record is not None and record["key"] == record_key(model, weights) and all(
            mode in record["modes"] and np.mean(np.array(record["reference_top1"][mode]) == answers[mode])
            >= RECORD_MATCH for mode in shipped):
        measured, numbers["measured_on"] = {m: record["modes"][m] for m in shipped}, record["host"]
    else:
        measured = measure(shipped, card, spec, split) if split is not None else None
        numbers["measured_on"] = host() if measured else None
    for mode in shipped:
        numbers["modes"][mode]["levels"] = measured[mode] if measured else {}
    numbers["reference_top1"] = {mode: answers[mode].tolist() for mode in shipped}
    (dest / onnx_runtime.NUMBERS_FILE).write_text(json.dumps(numbers, indent=1) + "\n")
    return numbers


def host() -> dict:
    import onnxruntime

    return {"cpu": cpu_model(), "isa": isa(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}


def record(version: ModelVersion) -> Path:
    """Measure a shipped version's ORT files afresh and commit the numbers beside its weights."""
    from serving.archive import computed_fp32_top1, recorded_fp32_top1

    arch = zoo.get(version.arch)
    fp32 = recorded_fp32_top1(version.model, version.weights)
    if fp32 is None:
        fp32 = computed_fp32_top1(version.model, version.weights, arch, load_reference(path_for(version.model))[0])
    with tempfile.TemporaryDirectory(prefix="record-") as tmp:
        numbers = build(version.model, version.weights, arch, Path(tmp), fp32, use_record=False)
    if numbers["measured_on"] is None:
        raise SystemExit(f"{version.model} {version.version}: the validation split its card names is not on disk")
    path = record_path(version.weights)
    path.write_text(json.dumps({"key": record_key(version.model, version.weights), "host": numbers["measured_on"],
                                "modes": {m: n["levels"] for m, n in numbers["modes"].items() if m != "fp32"},
                                "reference_top1": numbers["reference_top1"],
                                "not_shipped": numbers["not_shipped"]}, indent=1) + "\n")
    return path


def summary(numbers: dict, tta: int) -> str:
    """One line per archive for `make archive`'s output: each mode's accuracy at the served TTA level."""
    parts = []
    for mode, entry in numbers["modes"].items():
        level = entry.get("levels", {}).get(str(tta))
        parts.append(f"{mode} {level['accuracy']:.2%}" if level else f"{mode} not measured")
    parts += [f"{mode} not shipped ({why})" for mode, why in numbers["not_shipped"].items()]
    return f"validation accuracy at tta {tta}: " + ", ".join(parts)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--record", action="store_true", help="measure every shipped version, write the records")
    args = p.parse_args(argv)
    if not args.record:
        p.error("nothing to do: --record (make archive builds the files itself)")
    torch.set_num_threads(os.cpu_count() or 1)
    for version in SHIPPED:
        start = time.perf_counter()
        path = record(version)
        print(f"{path.relative_to(ROOT)}: {version.model} {version.version}, {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
