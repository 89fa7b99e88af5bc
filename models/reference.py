"""Where a data set's committed reference and int8 calibration images live, and how many each file holds.

The reference images (a fixed sample of the held-out validation split) ship in every archive: a worker checks a
faster numeric mode against fp32 on them before it serves with it (models/numerics.py). The calibration images
(a fixed slice of the training split) are what int8 quantization fits its activation ranges on
(serving/quantize.py). Both are committed under models/weights/ so that `make archive` on a clone without the
data still ships them; training/reference.py writes them from a data set's split.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models import data
from models.zoo import WEIGHTS_DIR

REFERENCE_SIZE = 400  # 99% agreement then allows 4 disagreements; fp32 on 400 images costs ~2 s (2.0, Zen 3)
CALIBRATION_SIZE = 512  # int8 activation ranges: 512 gave the same agreement as more (../shared/notes/round3.md)


def path_for(dataset: str) -> Path:
    """The data set's reference images: `images` uint8 N×C×H×W and their `labels`."""
    return WEIGHTS_DIR / f"{dataset}_reference.npz"


def calibration_path_for(dataset: str) -> Path:
    """The data set's int8 calibration images: `images` uint8 N×C×H×W and their `train_indices`."""
    return WEIGHTS_DIR / f"{dataset}_calibration.npz"


def calibration_set(dataset: str, source: str, path: Path, val_size: int = 5000,
                    count: int = CALIBRATION_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 N×C×H×W images, their indices into the training file): the first `count` of the training split."""
    images, labels = data.load(dataset, source, path)
    return calibration_of(images, labels, val_size, count)


def calibration_of(images: torch.Tensor, labels: torch.Tensor, val_size: int,
                   count: int = CALIBRATION_SIZE) -> tuple[np.ndarray, np.ndarray]:
    train_idx, _ = data.validation_indices(len(labels), val_size)
    return images[train_idx[:count]].numpy(), train_idx[:count]


def reference_set(dataset: str, source: str, path: Path, val_size: int = 5000,
                  count: int = REFERENCE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 N×C×H×W images, int64 labels): the first `count` images of the validation split."""
    images, labels = data.load(dataset, source, path)
    return reference_of(images, labels, val_size, count)


def reference_of(images: torch.Tensor, labels: torch.Tensor, val_size: int,
                 count: int = REFERENCE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    split = data.split(images, labels, val_size)
    return split.val_images[:count].numpy(), split.val_labels[:count].numpy()
