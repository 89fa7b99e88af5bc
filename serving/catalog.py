"""The served models: which network and weights make each version, and each version's model config.

`make archive` builds every version listed here; `make archive MODEL=... VERSION=... WEIGHTS=...` builds any
other, for any data set in models/specs.py.
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
    def config(self) -> dict:
        return model_config(self.model, self.version)

    @property
    def archive_name(self) -> str:
        """1.0 keeps the plain `<model>.mar` TorchServe users expect; later versions sit beside it."""
        return f"{self.model}.mar" if self.version == "1.0" else f"{self.model}-{self.version}.mar"


def config_files(model: str, version: str) -> list[Path]:
    """The model-config files a version's settings come from, later ones winning: default.yaml (every setting,
    documented), then <model>.yaml and <model>-<version>.yaml where they exist (only what differs)."""
    folder = ROOT / "model-config"
    return [path for path in (folder / "default.yaml", folder / f"{model}.yaml", folder / f"{model}-{version}.yaml")
            if path.exists()]


def model_config(model: str, version: str) -> dict:
    """The version's model config, as the archive carries it (torch-model-archiver --config-file): the files of
    `config_files` merged key by key, the `handler` section too."""
    import yaml  # shipped in the image beside TorchServe, which needs it; imported here only

    merged: dict = {}
    for path in config_files(model, version):
        layer = yaml.safe_load(path.read_text()) or {}
        handler = {**merged.get("handler", {}), **(layer.pop("handler", None) or {})}
        merged.update(layer)
        merged["handler"] = handler
    return merged


SHIPPED: list[ModelVersion] = [
    ModelVersion("cifar10", "1.0", "lenet", ROOT / "models" / "weights" / "cifar10_lenet.pt"),
    ModelVersion("cifar10", "2.0", "airbench", ROOT / "models" / "weights" / "cifar10_airbench.pt"),
    ModelVersion("mnist", "1.0", "convnet", ROOT / "models" / "weights" / "mnist_convnet.pt"),
]
