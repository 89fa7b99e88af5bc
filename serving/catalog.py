"""The served models: which handler, network and weights make each version.

`make archive` builds every version listed here; `make archive MODEL=... VERSION=... WEIGHTS=...` builds any
other from the same handler.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class ModelVersion:
    model: str
    version: str
    arch: str
    weights: Path

    @property
    def config_file(self) -> Path:
        return config_file(self.model, self.version)

    @property
    def archive_name(self) -> str:
        """1.0 keeps the plain `<model>.mar` TorchServe users expect; later versions sit beside it."""
        return f"{self.model}.mar" if self.version == "1.0" else f"{self.model}-{self.version}.mar"


def config_file(model: str, version: str) -> Path:
    """model-config/<model>-<version>.yaml when a version needs its own settings, else <model>.yaml."""
    specific = ROOT / "model-config" / f"{model}-{version}.yaml"
    return specific if specific.exists() else ROOT / "model-config" / f"{model}.yaml"


HANDLERS: dict[str, Path] = {
    "cifar10": ROOT / "handlers" / "cifar10.py",
    "mnist": ROOT / "handlers" / "mnist.py",
}

SHIPPED: list[ModelVersion] = [
    ModelVersion("cifar10", "1.0", "lenet", ROOT / "models" / "weights" / "cifar10_lenet.pt"),
    ModelVersion("cifar10", "2.0", "airbench", ROOT / "models" / "weights" / "cifar10_airbench.pt"),
    ModelVersion("mnist", "1.0", "convnet", ROOT / "models" / "weights" / "mnist_convnet.pt"),
]
