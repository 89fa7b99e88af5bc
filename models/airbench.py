"""cifar10 2.0: an airbench-style network (Keller Jordan's CIFAR-10 speedruns), sized for a 2-core CPU.

A frozen 2×2 patch-whitening convolution, three conv groups (conv → max-pool → BN → GELU → conv → BN →
GELU) of 64/256/256 channels (airbench94's widths), a global max-pool and a linear layer scaled by 1/9. BatchNorm
scales are fixed at 1, so every BN is a positive per-channel affine map that commutes with max-pooling:
`fold_batchnorm` folds all of them into the preceding convolutions for inference. TorchServe imports this file
on its own and requires exactly one class in it.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class Airbench(nn.Module):
    """1.97 M parameters; input 3×32×32 normalised, output logits."""

    arch = "airbench"  # the --arch name (models/zoo.py finds this class by it)
    dataset = "cifar10"  # the models/specs.py data set it is trained for
    # airbench's recipe (lr and weight decay converted from its summed loss to a mean loss): training/train.py
    recipe = {"epochs": 10, "batch_size": 1024, "lr": 1.5, "momentum": 0.85, "weight_decay": 1.33e-3,
              "label_smoothing": 0.2, "flip": True, "channels_last": True, "pct_start": 0.23, "div_factor": 5.0,
              "final_div_factor": 0.2 / 0.07, "anneal": "linear", "cycle_momentum": False, "bias_lr_scale": 64.0,
              "lookahead": True, "tta": 2}

    WIDTHS = (64, 256, 256)
    WHITEN_CHANNELS = 24  # 12 eigen-patches of 3×2×2 pixels and their negatives

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.whiten = nn.Conv2d(3, self.WHITEN_CHANNELS, kernel_size=2, bias=True)
        self.whiten.weight.requires_grad_(False)
        layers = []
        channels = self.WHITEN_CHANNELS
        for width in self.WIDTHS:
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.MaxPool2d(2),
                       self._batchnorm(width), nn.GELU(),
                       nn.Conv2d(width, width, 3, padding=1, bias=False), self._batchnorm(width), nn.GELU()]
            channels = width
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes, bias=False)
        for module in self.layers:
            if isinstance(module, nn.Conv2d):  # identity-like start: each conv first passes its input through
                nn.init.dirac_(module.weight.data[: module.in_channels])

    @staticmethod
    def _batchnorm(width: int) -> nn.BatchNorm2d:
        bn = nn.BatchNorm2d(width, momentum=0.6, eps=1e-12)
        bn.weight.requires_grad_(False)
        return bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.whiten(x))
        x = self.layers(x)
        x = F.adaptive_max_pool2d(x, 1).flatten(1)
        return self.head(x) / 9

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the frozen first layer to the PCA whitening of the training images' 2×2 patches."""
        patches = images.unfold(2, 2, 1).unfold(3, 2, 1).transpose(1, 3).reshape(-1, 3, 2, 2).float()
        flat = patches.flatten(1)
        flat = flat - flat.mean(0)
        covariance = flat.T @ flat / len(flat)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        filters = (eigenvectors.T / torch.sqrt(eigenvalues + eps)[:, None]).view(-1, 3, 2, 2)
        self.whiten.weight.copy_(torch.cat([filters, -filters]))

    @torch.no_grad()
    def fold_batchnorm(self) -> Airbench:
        """Fold every BatchNorm into the convolution before it (exact in eval mode); returns self."""
        modules = list(self.layers)
        folded: list[nn.Module] = []
        conv = None
        for module in modules:
            if isinstance(module, nn.Conv2d):
                conv = module
            if isinstance(module, nn.BatchNorm2d):
                scale = module.weight / torch.sqrt(module.running_var + module.eps)  # > 0: commutes with max-pool
                conv.weight.mul_(scale.view(-1, 1, 1, 1))
                conv.bias = nn.Parameter(module.bias - module.running_mean * scale)
                continue
            folded.append(module)
        self.layers = nn.Sequential(*folded)
        return self
