"""What a model's input and output mean: the single source that training and the serving handlers both read.

If serving normalised differently from training, accuracy would drop silently; keeping size, channels, mean/std and
class names here, and the normalisation itself in `DatasetSpec.normalize`, makes that drift impossible.
This module is shipped inside every archive (as `models/specs.py`), so it imports nothing but torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class DatasetSpec:
    """Input geometry, normalisation and labels of one data set."""

    name: str
    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    # MNIST digits are light ink on a dark background; photos and scans are the opposite and must be inverted.
    light_on_dark: bool = False
    # A mirror image is still an image of the same class (a photo of a cat) or not (a mirrored 7): test-time
    # augmentation, which averages over mirror images (models/inference.py), only makes sense for the first.
    mirror_symmetric: bool = True
    # The torchvision.datasets class that downloads it (`--data-source torchvision`), or None for a data set that
    # comes as an .npz file only (`images`: uint8 N×H×W×C or N×H×W, `labels`: integers; docs/models.md, "Your
    # own model").
    torchvision: str | None = None
    _scale: torch.Tensor = field(init=False, repr=False, compare=False)
    _shift: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Folding /255, -mean and /std into one multiply-add keeps per-batch normalisation to two tensor ops.
        std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        object.__setattr__(self, "_scale", 1.0 / (255.0 * std))
        object.__setattr__(self, "_shift", -mean / std)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(channels, height, width): what the seeds' `shape` field must say."""
        return (self.channels, self.image_size, self.image_size)

    @property
    def tta_levels(self) -> tuple[int, ...]:
        """The test-time augmentation levels this data set admits: every level but 0 includes mirror images."""
        return (0, 1, 2) if self.mirror_symmetric else (0,)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 N×C×H×W → normalised float32, the exact tensor the network was trained on, on the images' device
        (training and evaluation normalise on the GPU; `.to` is free where the constants already are)."""
        return torch.addcmul(self._shift.to(images.device), images.float(), self._scale.to(images.device))


CIFAR10 = DatasetSpec(
    name="cifar10",
    image_size=32,
    channels=3,
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
    classes=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    torchvision="CIFAR10",
)

MNIST = DatasetSpec(
    name="mnist",
    image_size=28,
    channels=1,
    mean=(0.1307,),
    std=(0.3081,),
    classes=tuple(str(digit) for digit in range(10)),
    light_on_dark=True,
    mirror_symmetric=False,
    torchvision="MNIST",
)

# Every data set the project trains, archives and serves: a new one is a DatasetSpec above and its name here;
# its handler, archive, model config and reference images follow from it (docs/models.md, "Serve your own classifier").
SPECS: dict[str, DatasetSpec] = {spec.name: spec for spec in (CIFAR10, MNIST)}
