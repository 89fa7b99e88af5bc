"""The MNIST ConvNet of seed 002 (mnist 1.0).

Layer names follow the seed (cn1, cn2, dp1, dp2, fc1, fc2) so a state_dict saved by the blog's code loads here.
TorchServe imports this file on its own and requires exactly one class in it.
"""
import torch
from torch import nn
from torch.nn import functional as F


class ConvNet(nn.Module):
    """conv 1→16 k3, conv 16→32 k3, max-pool 2, dropout 0.10, fc 4608→64, dropout 0.25, fc 64→10.

    The output is log_softmax, as in the seed; the serving handler exponentiates it back to probabilities.
    """

    arch = "convnet"  # the --arch name (models/zoo.py finds this class by it)
    dataset = "mnist"  # the models/specs.py data set it is trained for
    recipe = {"epochs": 16}  # what differs from training/train.py's Recipe defaults

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.cn1 = nn.Conv2d(1, 16, 3, 1)
        self.cn2 = nn.Conv2d(16, 32, 3, 1)
        self.dp1 = nn.Dropout2d(0.10)
        self.dp2 = nn.Dropout(0.25)
        self.fc1 = nn.Linear(4608, 64)
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.cn1(x))
        x = F.relu(self.cn2(x))
        x = self.dp1(F.max_pool2d(x, 2))
        x = torch.flatten(x, 1)
        x = self.dp2(F.relu(self.fc1(x)))
        return F.log_softmax(self.fc2(x), dim=1)
