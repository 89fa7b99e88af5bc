"""Which network file and class each `--arch` name means, and which data set it is trained for.

A network is one file in `models/` holding one `nn.Module` class (TorchServe imports the file on its own and
requires exactly one) with two class attributes, `arch` (its `--arch` name) and `dataset` (a name in
`models/specs.py`). This module finds every such file: adding a network is adding its file, nothing else.
Training, export and archiving look architectures up here; the handlers never do (TorchServe hands them the
model file named in the archive), so this module is not shipped in archives.
"""
from __future__ import annotations

import ast
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


def _declares_arch(node: ast.stmt) -> bool:
    """A class whose body assigns `arch = ...`: read from the source, so finding networks imports only them."""
    return isinstance(node, ast.ClassDef) and any(
        isinstance(item, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "arch" for t in item.targets)
        for item in node.body)


def discover(models_dir: Path = MODELS_DIR) -> dict[str, Architecture]:
    """Every network file in `models/`, by its `arch` name; two classes claiming one name is an error."""
    found: dict[str, Architecture] = {}
    for path in sorted(models_dir.glob("*.py")):
        for node in ast.parse(path.read_text(), str(path)).body:
            if not _declares_arch(node):
                continue
            module = f"models.{path.stem}"
            cls = getattr(importlib.import_module(module), node.name)
            if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
                raise TypeError(f"{path}: {node.name} declares arch but is not an nn.Module")
            if cls.arch in found:
                raise ValueError(f"{path}: arch {cls.arch!r} is already {found[cls.arch].source_file}")
            found[cls.arch] = Architecture(cls.arch, cls.dataset, module, node.name)
    return found


ARCHITECTURES: dict[str, Architecture] = discover()


def get(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}") from None


def for_dataset(dataset: str) -> list[Architecture]:
    """The networks trained for `dataset`."""
    return [arch for arch in ARCHITECTURES.values() if arch.dataset == dataset]
