"""Test-time augmentation, shared by evaluation and the serving handler so both compute the same numbers.

Level 0 is one forward pass; level 1 averages the logits of the image and its mirror image; level 2 (airbench's)
also averages the mirrored passes of the image shifted one pixel up-left and down-right. Levels 1 and 2 cost 2×
and 6× the forward passes, which is why serving switches them in the model-config YAML (`handler.tta`).
Shipped in every archive, so it imports nothing but torch.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

TTA_LEVELS = (0, 1, 2)


def _mirrored(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (model(x) + model(x.flip(3)))


def tta_logits(model: nn.Module, x: torch.Tensor, level: int = 0) -> torch.Tensor:
    if level not in TTA_LEVELS:
        raise ValueError(f"tta level must be one of {TTA_LEVELS}, got {level!r}")
    if level == 0:
        return model(x)
    logits = _mirrored(model, x)
    if level == 1:
        return logits
    height, width = x.shape[2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    shifted = [padded[:, :, :height, :width], padded[:, :, 2:, 2:]]
    return 0.5 * logits + 0.25 * sum(_mirrored(model, s) for s in shifted)
