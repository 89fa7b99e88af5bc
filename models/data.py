"""A data set's images as one uint8 N×C×H×W tensor in memory, and the fixed validation split.

Training reads them (training/train.py), and so does an archive's build, which measures its int8 network on the
validation split the model card names (serving/quantize.py). One tensor (150 MB for CIFAR-10) rather than PIL
images keeps augmentation (training/augment.py) to tensor indexing, no per-sample Python work, which on two
cores would cost more than the small networks' forward passes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision import datasets

from models.specs import SPECS

SOURCES = ("npz", "torchvision")


@dataclass(frozen=True)
class Split:
    """The training and held-out validation images of one data set, uint8 N×C×H×W."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor


def load(dataset: str, source: str, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """All training images (uint8 N×C×H×W) and labels (int64) from an npz file or torchvision's loader.

    `source="torchvision"` uses the real torchvision class the spec names (`datasets.CIFAR10(download=True)`),
    which downloads into `path` when online and otherwise reads what is already there in torchvision's layout.
    """
    spec = SPECS[dataset]
    if source == "npz":
        with np.load(path) as archive:
            images, labels = archive["images"], archive["labels"]
    elif source == "torchvision":
        if spec.torchvision is None:
            raise ValueError(f"{dataset} names no torchvision dataset (models/specs.py): use --data-source npz")
        ds = getattr(datasets, spec.torchvision)(root=str(path), train=True, download=True)
        images, labels = np.asarray(ds.data), np.asarray(ds.targets)
    else:
        raise ValueError(f"unknown data source {source!r}; expected one of {SOURCES}")
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    tensor = tensor.unsqueeze(1) if tensor.ndim == 3 else tensor.permute(0, 3, 1, 2)
    if tuple(tensor.shape[1:]) != spec.input_shape or tensor.dtype != torch.uint8:
        raise ValueError(f"{path}: expected uint8 images of shape {spec.input_shape}, got {tuple(tensor.shape[1:])}")
    targets = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    if len(targets) != len(tensor) or targets.min() < 0 or targets.max() >= spec.num_classes:
        raise ValueError(f"{path}: expected one label per image in 0..{spec.num_classes - 1} ({dataset}'s classes)")
    return tensor.contiguous(), targets


def validation_indices(n: int, val_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices: the first `val_size` of a seeded permutation are held out, as shared/data/README says."""
    if not 0 < val_size < n:
        raise ValueError(f"val_size must be between 1 and {n - 1}, got {val_size}")
    perm = np.random.default_rng(seed).permutation(n)
    return perm[val_size:], perm[:val_size]


def split(images: torch.Tensor, labels: torch.Tensor, val_size: int, seed: int = 0) -> Split:
    train_idx, val_idx = validation_indices(len(labels), val_size, seed)
    train_idx, val_idx = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
    return Split(images[train_idx], labels[train_idx], images[val_idx], labels[val_idx])
