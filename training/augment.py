"""Augmentation on whole uint8 batches by tensor indexing (models/data.py says why not per image)."""
from __future__ import annotations

import torch


def augment(images: torch.Tensor, pad: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to `pad` pixels (zero fill) and optional horizontal flip, for a whole batch."""
    n, c, h, w = images.shape
    if pad:
        padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n, 1, 1, 1), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (n, 1, 1, 1), generator=generator)
        rows = dy + torch.arange(h).view(1, 1, h, 1)
        cols = dx + torch.arange(w).view(1, 1, 1, w)
        images = padded[torch.arange(n).view(n, 1, 1, 1), torch.arange(c).view(1, c, 1, 1), rows, cols]
    if flip:
        mask = torch.rand(n, generator=generator) < 0.5
        images = torch.where(mask.view(n, 1, 1, 1), images.flip(3), images)
    return images

