"""Test-time augmentation and calibrated probabilities, shared by evaluation, calibration and the serving handler
so that all three compute the same numbers.

Level 0 is one forward pass; level 1 adds the mirror image; level 2 (airbench's) also adds the image shifted one
pixel up-left and down-right, each with its mirror image. Levels 1 and 2 cost 2× and 6× the forward passes, which
is why serving switches them in the model-config YAML (`handler.tta`). A served probability is the weighted mean
of the views' softmax(logits / T), T being the temperature fitted for that level (training/calibration.py).
Shipped in every archive, so it imports nothing but torch.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

TTA_LEVELS = (0, 1, 2)


def tta_views(x: torch.Tensor, level: int = 0) -> list[tuple[float, torch.Tensor]]:
    """(weight, view) pairs whose weights sum to 1: the image, its mirror, and for level 2 two shifted copies."""
    if level not in TTA_LEVELS:
        raise ValueError(f"tta level must be one of {TTA_LEVELS}, got {level!r}")
    if level == 0:
        return [(1.0, x)]
    if level == 1:
        return [(0.5, x), (0.5, x.flip(3))]
    height, width = x.shape[2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    shifted = [padded[:, :, :height, :width], padded[:, :, 2:, 2:]]
    return [(0.25, x), (0.25, x.flip(3))] + [(0.125, v) for s in shifted for v in (s, s.flip(3))]


def tta_logits(model: nn.Module, x: torch.Tensor, level: int = 0) -> torch.Tensor:
    """The weighted mean of the views' logits: what the model cards' accuracies were measured with."""
    return sum(weight * model(view) for weight, view in tta_views(x, level))


def calibrated_probabilities(model: nn.Module, x: torch.Tensor, level: int = 0,
                             temperature: float = 1.0) -> torch.Tensor:
    """The weighted mean of the views' softmax(logits / T): the probabilities the server answers with."""
    return sum(weight * torch.softmax(model(view) / temperature, dim=1) for weight, view in tta_views(x, level))
