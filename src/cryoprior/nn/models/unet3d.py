"""Residual 3D U-Net: ``output = input + U(input)``, the learned prior of RED (Kimanius et al. 2020).

The network is built from parameters, one loop per path, so any depth and width share one code
path. ``levels`` resolution levels (five in the paper) give ``levels - 1`` halvings, so the box
must be a multiple of :attr:`UNet3D.size_multiple` ``= 2 ** (levels - 1)`` (callers pad; see
``cryoprior.nn.prior3d``). Level ``i`` has ``round(base_channels * channel_growth ** i)``
channels. The residual comes from a 3×3×3 convolution of the finest decoder features together
with the input itself (so a linear filter of the input is one layer away); it starts at zero,
so a fresh network is the identity.

>>> net = UNet3D(UNet3DConfig(levels=4, base_channels=4))
>>> x = torch.randn(2, 1, 16, 16, 16)
>>> bool(torch.equal(net(x), x))
True
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class UNet3DConfig:
    """Architecture of :class:`UNet3D` (saved beside the weights as JSON)."""

    levels: int = 5
    base_channels: int = 8
    channel_growth: float = 1.5
    convs_per_level: int = 2
    in_channels: int = 1

    def channels(self) -> list[int]:
        """Channels per level, finest first."""
        return [max(1, round(self.base_channels * self.channel_growth**i)) for i in range(self.levels)]

    def to_dict(self) -> dict:
        return asdict(self)


def _block(c_in: int, c_out: int, n_convs: int) -> nn.Sequential:
    """``n_convs`` × (3×3×3 conv → LeakyReLU), the first mapping ``c_in`` → ``c_out``."""
    layers: list[nn.Module] = []
    for i in range(n_convs):
        layers += [nn.Conv3d(c_in if i == 0 else c_out, c_out, 3, padding=1), nn.LeakyReLU(0.1)]
    return nn.Sequential(*layers)


class UNet3D(nn.Module):
    """Residual 3D U-Net on ``(b, in_channels, d, d, d)``, d a multiple of ``size_multiple``.

    Encoder: a block per level, average pooling between levels. Decoder: trilinear upsampling,
    concatenation with the encoder's features at that level, a block. The residual (3×3×3 conv
    of the finest decoder features and the input, zero at init) is added to the first channel.
    """

    def __init__(self, config: UNet3DConfig | None = None):
        super().__init__()
        self.config = config = config or UNet3DConfig()
        if config.levels < 1 or config.convs_per_level < 1 or config.base_channels < 1:
            raise ValueError(f"levels, convs_per_level and base_channels must be >= 1: {config}")
        ch = config.channels()
        self.encoders = nn.ModuleList(
            _block(config.in_channels if i == 0 else ch[i - 1], ch[i], config.convs_per_level)
            for i in range(config.levels)
        )
        self.decoders = nn.ModuleList(
            _block(ch[i] + ch[i + 1], ch[i], config.convs_per_level) for i in range(config.levels - 1)
        )
        self.head = nn.Conv3d(ch[0] + config.in_channels, 1, 3, padding=1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def size_multiple(self) -> int:
        return 2 ** (self.config.levels - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"expected (b, {self.config.in_channels}, d, d, d), got {tuple(x.shape)}"
            )
        m = self.size_multiple
        if any(s % m for s in x.shape[-3:]):
            raise ValueError(f"spatial size must be a multiple of {m}, got {tuple(x.shape[-3:])}")
        skips = []
        h = x
        for i, enc in enumerate(self.encoders):
            if i > 0:
                h = F.avg_pool3d(h, 2)  # (b, c, d / 2^i, ...)
            h = enc(h)
            skips.append(h)
        for i in reversed(range(self.config.levels - 1)):
            h = F.interpolate(h, scale_factor=2, mode="trilinear", align_corners=False)
            h = self.decoders[i](torch.cat([skips[i], h], dim=1))  # (b, ch[i], ...)
        return x[:, :1] + self.head(torch.cat([h, x], dim=1))  # (b, 1, d, d, d)
