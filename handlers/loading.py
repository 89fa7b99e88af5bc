"""What a worker settles once, in `initialize`, from its archive: threads, device, network, numerics, labels and
the temperature its probabilities are calibrated with."""
from __future__ import annotations

import importlib
import inspect
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch

from models import numerics, onnx_runtime
from models.specs import DatasetSpec

logger = logging.getLogger(__name__)


def threads(yaml_config: dict, handler: dict) -> int:
    """Workers are processes: torch threads beyond cores/workers only oversubscribe the CPU. TorchServe tells a
    worker its batch size but not how many workers share the cores, so `handler.threads` says it; without it, the
    YAML's maxWorkers bounds them."""
    workers = max(1, int(yaml_config.get("maxWorkers") or yaml_config.get("minWorkers") or 1))
    return int(handler.get("threads") or max(1, (os.cpu_count() or 1) // workers))


def device(properties: dict) -> torch.device:
    """The GPU TorchServe assigned this worker (`gpu_id`, present when `number_of_gpu` > 0) if CUDA is available,
    else the CPU: the CPU path never depends on a GPU."""
    gpu_id = properties.get("gpu_id")
    if gpu_id is not None and torch.cuda.is_available():
        return torch.device(f"cuda:{gpu_id}")
    return torch.device("cpu")


def network(model_dir: Path, manifest: dict) -> torch.nn.Module:
    """The archive's model file defines one nn.Module class; its state_dict loads with weights_only=True."""
    model_file = manifest["model"]["modelFile"]
    module = importlib.import_module(Path(model_file).stem)
    classes = [c for _, c in inspect.getmembers(module, inspect.isclass)
               if c.__module__ == module.__name__ and issubclass(c, torch.nn.Module)]
    if len(classes) != 1:
        raise RuntimeError(f"{model_file} must define exactly one nn.Module class, found {classes}")
    model = classes[0]()
    weights = model_dir / manifest["model"]["serializedFile"]
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval()


def serving_mode(model: torch.nn.Module, model_dir: Path, spec: DatasetSpec, on: torch.device, requested: str,
                 batch_size: int, onnx: numerics.OnnxFiles) -> tuple[numerics.AnyRunner, numerics.Choice]:
    """The network wrapped in the numeric mode to serve with (models/numerics.py): as configured, or measured on
    this host against the archive's reference images, once per version (its workers share the result). An
    archive without reference images serves fp32."""
    reference_file = model_dir / "reference.npz"
    if requested == "auto" and not reference_file.exists():
        logger.warning("%s has no reference.npz (built before numerics were chosen per host): serving fp32",
                       model_dir)
        return (numerics.Runner(model, "fp32", on),
                numerics.Choice("fp32", "no reference images", batch_size=batch_size))
    if requested != "auto":
        return numerics.choose(model, on, requested, torch.empty(0), batch_size, onnx=onnx)
    images, _, fp32_top1 = numerics.load_reference(reference_file)
    return numerics.choose_once(model_dir / ".numerics.json", model, on, spec.normalize(images), batch_size,
                                expected=fp32_top1, onnx=onnx)


def temperature(model_dir: Path, mode: str, tta: int, what: str) -> float:
    """T for this TTA level and numeric mode: an ONNX Runtime mode's own from the archive's numerics.json (int8's
    logits differ, so the build fitted its T on the validation split, serving/quantize.py), any other mode's from
    the model card (models/calibration.py fits it there). An archive built from a card without calibration serves
    T = 1, the uncalibrated softmax, and says so in its log."""
    card_file = model_dir / "model_card.json"
    card = json.loads(card_file.read_text()) if card_file.exists() else {}
    fitted = card.get("calibration", {}).get("levels", {}).get(str(tta))
    if mode in numerics.ORT_MODES:
        fitted = onnx_runtime.shipped(model_dir)[mode].get("levels", {}).get(str(tta), fitted)
    if fitted is None:
        logger.warning("%s is not calibrated (no temperature for tta %d in %s): its probabilities are the raw "
                       "softmax", what, tta, card_file.name if card_file.exists() else "the archive, which has no "
                       "model card")
        return 1.0
    value = float(fitted["temperature"])
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{card_file}: temperature for tta {tta} must be positive, got {value}")
    return value


def labels(model_dir: Path, spec: DatasetSpec) -> list[str]:
    """The spec's class names, checked against the archive's index_to_name.json so a stale archive fails."""
    names = list(spec.classes)
    mapping_file = model_dir / "index_to_name.json"
    if mapping_file.exists():
        mapping = json.loads(mapping_file.read_text())
        if [mapping[str(i)] for i in range(len(mapping))] != names:
            raise RuntimeError(f"{mapping_file} does not match the {spec.name} classes {names}")
    return names


def explainer(model: torch.nn.Module, runner: numerics.AnyRunner, on: torch.device) -> numerics.Runner:
    """What explanations run on: they need gradients, so torch float32 whatever serves predictions: the torch
    mode chosen, or for an ONNX Runtime mode the same arithmetic in channels_last (faster on a CPU, measured)."""
    if isinstance(runner, numerics.Runner):
        return runner
    return numerics.Runner(model, "fp32-cl" if on.type == "cpu" else "fp32", on)


def integrated_gradients(runner: numerics.Runner) -> Any:
    """Captum's Integrated Gradients over the network in float32 (whatever mode predictions use: gradients in
    bf16 would blur the attributions), or None where Captum is not installed: explanations then answer 501 and
    predictions are unaffected."""
    try:
        from captum.attr import IntegratedGradients
    except ImportError:
        logger.warning("captum is not installed: /explanations will answer 501")
        return None
    for parameter in runner.parameters():
        parameter.requires_grad_(False)  # only the input's gradient is needed; serving never trains
    return IntegratedGradients(lambda x: runner.model(x.contiguous(memory_format=runner.memory_format)))
