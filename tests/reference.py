"""Independent references for served answers: built from the repository's weights, model-config YAML and model card,
never from the handler's own attributes, so a handler that loads the wrong weights, TTA level or temperature (or
computes in another mode than it reports) disagrees with them."""
from __future__ import annotations

import json

import torch
import yaml
from torch import nn

from models import zoo
from models.inference import calibrated_probabilities
from models.numerics import Runner
from serving.catalog import ModelVersion


def network(version: ModelVersion) -> nn.Module:
    """The version's network, built from models/zoo.py and its shipped state_dict, in eval mode."""
    model = zoo.get(version.arch).build()
    model.load_state_dict(torch.load(version.weights, weights_only=True))
    return model.eval()


def handler_config(version: ModelVersion) -> dict:
    """The `handler:` section of the version's model-config YAML, read from the repository."""
    return yaml.safe_load(version.config_file.read_text()).get("handler") or {}


def tta(version: ModelVersion) -> int:
    return int(handler_config(version).get("tta", 0))


def temperature(version: ModelVersion) -> float:
    """T for the version's configured TTA level, from its model card (1.0 where the card has none)."""
    card = json.loads(version.weights.with_suffix(".json").read_text())
    fitted = card.get("calibration", {}).get("levels", {}).get(str(tta(version)))
    return float(fitted["temperature"]) if fitted else 1.0


def probabilities(version: ModelVersion, mode: str, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Served probabilities computed here: softmax(logits / T) averaged over the configured TTA views, by the
    network run in `mode`, over `images` (normalised) in batches of `batch_size`, one torch thread as a worker."""
    runner = Runner(network(version), mode, torch.device("cpu"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            return torch.cat([calibrated_probabilities(runner, images[i:i + batch_size], tta(version),
                                                       temperature(version))
                              for i in range(0, len(images), batch_size)])
    finally:
        torch.set_num_threads(threads)
