"""Which network file and class each `--arch` name means, and which data set it is trained for.

Training, export and archiving look architectures up here; the handlers never do (TorchServe hands them the
model file named in the archive), so this module is not shipped in archives.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from torch import nn

MODELS_DIR = Path(__file__).resolve().parent
WEIGHTS_DIR = MODELS_DIR / "weights"


@dataclass(frozen=True)
class Architecture:
    """One network: its source file (one class, as TorchServe requires) and its data set."""

    name: str
    dataset: str
    module: str
    class_name: str

    @property
    def source_file(self) -> Path:
        return MODELS_DIR / f"{self.module.rsplit('.', 1)[-1]}.py"

    def build(self) -> nn.Module:
        return getattr(importlib.import_module(self.module), self.class_name)()


ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        Architecture("lenet", "cifar10", "models.lenet", "LeNet"),
        Architecture("convnet", "mnist", "models.mnist_convnet", "ConvNet"),
        Architecture("airbench", "cifar10", "models.airbench", "Airbench"),
    )
}


def get(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}") from None
