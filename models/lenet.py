"""The seeds' LeNet-style CIFAR-10 network (cifar10 1.0).

Kept layer for layer as in the seed tutorial so that its weights and the blog posts stay comparable.
TorchServe imports this file on its own and requires exactly one class in it.
"""
import torch
from torch import nn
from torch.nn import functional as F


class LeNet(nn.Module):
    """conv 3→6 k5, max-pool 2, conv 6→16 k5, max-pool 2, fc 400→120→84→10; returns logits."""

    arch = "lenet"  # the --arch name (models/zoo.py finds this class by it)
    dataset = "cifar10"  # the models/specs.py data set it is trained for
    recipe = {"epochs": 40, "translate": 4, "flip": True, "channels_last": True}  # training/train.py's Recipe

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)
