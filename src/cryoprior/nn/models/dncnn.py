"""DnCNN (Zhang et al., IEEE TIP 2017): a plain stack of 3×3 convolutions that predicts the
noise, ``output = input - net(input)`` (residual learning).

``depth`` layers in all: conv+ReLU, ``depth - 2`` × (conv + batch norm + ReLU), conv. The paper's
``depth=17, width=64`` costs ~35× the default here (8 layers, 16 channels), sized for CPUs.

>>> DnCNN(depth=5, width=8).eval()(torch.zeros(2, 1, 33, 33)).shape
torch.Size([2, 1, 33, 33])
"""

from __future__ import annotations

import torch
from torch import nn


class DnCNN(nn.Module):
    """``(b, 1, h, w)`` → ``(b, 1, h, w)``, any image size."""

    def __init__(self, depth: int = 8, width: int = 16, kernel_size: int = 3):
        super().__init__()
        if depth < 2 or width < 1:
            raise ValueError(f"need depth >= 2 and width >= 1, got depth={depth}, width={width}")
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        pad = kernel_size // 2
        layers: list[nn.Module] = [nn.Conv2d(1, width, kernel_size, padding=pad), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [
                nn.Conv2d(width, width, kernel_size, padding=pad, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
        layers.append(nn.Conv2d(width, 1, kernel_size, padding=pad))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(f"expected images (b, 1, h, w), got shape {tuple(x.shape)}")
        return x - self.net(x)
