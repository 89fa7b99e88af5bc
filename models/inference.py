"""Test-time augmentation and calibrated probabilities, shared by evaluation, calibration and the serving handler
so that all three compute the same numbers.

Level 0 is one forward pass; level 1 adds the mirror image; level 2 (airbench's) also adds the image shifted one
pixel up-left and down-right, each with its mirror image. Levels 1 and 2 cost 2× and 6× the forward passes, which
is why serving switches them in the model-config YAML (`handler.tta`). A served probability is the weighted mean
of the views' softmax(logits / T), T being the temperature fitted for that level (models/calibration.py).
Shipped in every archive, so it imports nothing but torch.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

# Per level, the weight of each view in the order `tta_views` yields them (the image, its mirror, then each shifted
# copy and its mirror); they sum to 1.
TTA_WEIGHTS: dict[int, tuple[float, ...]] = {0: (1.0,), 1: (0.5, 0.5), 2: (0.25, 0.25, 0.125, 0.125, 0.125, 0.125)}
TTA_LEVELS = tuple(TTA_WEIGHTS)


def tta_views(x: torch.Tensor, level: int = 0) -> list[tuple[float, torch.Tensor]]:
    """(weight, view) pairs: the image, its mirror, and for level 2 two shifted copies with their mirrors."""
    if level not in TTA_LEVELS:
        raise ValueError(f"tta level must be one of {TTA_LEVELS}, got {level!r}")
    views = [x] if level == 0 else [x, x.flip(3)]
    if level == 2:
        height, width = x.shape[2:]
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        views += [v for s in (padded[:, :, :height, :width], padded[:, :, 2:, 2:]) for v in (s, s.flip(3))]
    return list(zip(TTA_WEIGHTS[level], views))


def tta_logits(model: nn.Module, x: torch.Tensor, level: int = 0) -> torch.Tensor:
    """The weighted mean of the views' logits: what the model cards' accuracies were measured with."""
    return sum(weight * model(view) for weight, view in tta_views(x, level))


def mean_softmax(view_logits: Iterable[torch.Tensor], weights: Sequence[float], temperature: float) -> torch.Tensor:
    """Σ_v w_v · softmax(logits_v / T): the one formula for a served probability, which calibration fits T for."""
    return sum(w * torch.softmax(logits / temperature, dim=-1)
               for w, logits in zip(weights, view_logits))


def calibrated_probabilities(model: nn.Module, x: torch.Tensor, level: int = 0,
                             temperature: float = 1.0) -> torch.Tensor:
    """The weighted mean of the views' softmax(logits / T): the probabilities the server answers with."""
    views = tta_views(x, level)
    return mean_softmax((model(view) for _, view in views), [weight for weight, _ in views], temperature)
