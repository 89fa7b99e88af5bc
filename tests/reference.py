"""Independent references for served answers: built from the repository's weights, model-config YAML and model card,
never from the handler's own attributes, so a handler that loads the wrong weights, TTA level or temperature (or
computes in another mode than it reports) disagrees with them."""
from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import torch
from torch import nn

from models import onnx_runtime, zoo
from models.inference import calibrated_probabilities
from models.numerics import ORT_MODES, AnyRunner, Runner
from models.specs import SPECS
from serving.catalog import ModelVersion


def network(version: ModelVersion) -> nn.Module:
    """The version's network, built from models/zoo.py and its shipped state_dict, in eval mode."""
    model = zoo.get(version.arch).build()
    model.load_state_dict(torch.load(version.weights, weights_only=True))
    return model.eval()


def handler_config(version: ModelVersion) -> dict:
    """The `handler:` section of the version's model config, merged from the repository's model-config/."""
    return version.config.get("handler") or {}


def tta(version: ModelVersion) -> int:
    return int(handler_config(version).get("tta", 0))


def temperature(version: ModelVersion, mode: str = "fp32") -> float:
    """T for the version's configured TTA level and numeric mode: an ONNX Runtime mode's from the record committed
    beside the weights (serving/quantize.py fits int8's), any other from the model card (1.0 where it has none)."""
    if mode in ORT_MODES:
        from serving import quantize

        record = json.loads(quantize.record_path(version.weights).read_text())
        return float(record["modes"][mode][str(tta(version))]["temperature"])
    card = json.loads(version.weights.with_suffix(".json").read_text())
    fitted = card.get("calibration", {}).get("levels", {}).get(str(tta(version)))
    return float(fitted["temperature"]) if fitted else 1.0


@functools.cache
def onnx_files(version: ModelVersion) -> Path:
    """The version's ONNX files built here from its shipped weights and the committed calibration images, by the
    recipe's own steps (export, quantize), not taken from an archive: a handler that ran another file disagrees."""
    from serving import quantize

    out = Path(tempfile.mkdtemp(prefix=f"reference-onnx-{version.model}-{version.version}-"))
    files = {mode: out / name for mode, name in onnx_runtime.FILES.items()}
    quantize.export(network(version), SPECS[version.model], files["ort-fp32"])
    images, _ = quantize.calibration_images(version.model)
    quantize.quantize(files["ort-fp32"], files["ort-int8"], SPECS[version.model].normalize(torch.from_numpy(images)))
    return out


def runner(version: ModelVersion, mode: str) -> AnyRunner:
    """The version's network in `mode`, one thread as in a worker."""
    if mode in ORT_MODES:
        return onnx_runtime.OrtRunner(mode, onnx_files(version) / onnx_runtime.FILES[mode], threads=1)
    return Runner(network(version), mode, torch.device("cpu"))


def probabilities(version: ModelVersion, mode: str, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Served probabilities computed here: softmax(logits / T) averaged over the configured TTA views, by the
    network run in `mode`, over `images` (normalised) in batches of `batch_size`, one torch thread as a worker."""
    run = runner(version, mode)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            return torch.cat([calibrated_probabilities(run, images[i:i + batch_size], tta(version),
                                                       temperature(version, mode))
                              for i in range(0, len(images), batch_size)])
    finally:
        torch.set_num_threads(threads)
