"""ResNet building blocks for 2D images: residual blocks, a down-sampling encoder, the mirrored
decoder, an image-to-image autoencoder and an image classifier, all built from one config.

Used by the robust-GAN denoiser (generator = :class:`ResNetAutoencoder`, discriminator =
:class:`ResNetClassifier`) and DRVAE (encoder/decoder around a Gaussian latent). ``residual=False``
gives the plain-convolution variant of every block (the GAN paper's ablation).

Shapes: images ``(b, c, d, d)``; level ``i`` of the encoder works at ``d / (stem · 2**i)``. With
``stem`` > 1 the encoder first folds each ``stem × stem`` pixel block into channels
(pixel-unshuffle, lossless) and the decoder unfolds its output (pixel-shuffle), so every level
runs at a lower resolution: the cost is dominated by the full-resolution convolutions otherwise.
Boxes that are not a multiple of ``stem · 2**(levels - 1)`` are reflect-padded about the image and
cropped back, so any even box works. :func:`fuse_batchnorm` folds eval-mode batch norms into the
preceding convolutions for inference.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

NORMS = ("batch", "instance", "layer", "none")


@dataclass
class ResNetConfig:
    """Architecture of the ResNet encoder/decoder pair (and the classifier built on the encoder)."""

    widths: list[int] = field(default_factory=lambda: [32, 64, 128])  # channels per level
    blocks_per_level: int = 1
    residual: bool = True  # False: plain convolutions, no skip connections (ablation)
    norm: str = "batch"  # batch | instance | layer (GroupNorm(1)) | none
    in_channels: int = 1
    out_channels: int = 1
    stem: int = 1  # pixel-unshuffle factor before the first level (1: none)

    def validate(self) -> None:
        if not self.widths or any(w < 1 for w in self.widths):
            raise ValueError(f"widths must be positive channel counts, got {self.widths}")
        if self.blocks_per_level < 0:
            raise ValueError(f"blocks_per_level must be >= 0, got {self.blocks_per_level}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.stem < 1:
            raise ValueError(f"stem must be >= 1, got {self.stem}")

    @property
    def levels(self) -> int:
        return len(self.widths)

    @property
    def size_multiple(self) -> int:
        return self.stem * 2 ** (self.levels - 1)

    def to_dict(self) -> dict:
        return asdict(self)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    return nn.Identity()


def conv_block(c_in: int, c_out: int, norm: str, stride: int = 1) -> nn.Sequential:
    """3×3 convolution (stride 1 or 2), normalisation, LeakyReLU(0.2)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=norm == "none"),
        _norm(norm, c_out),
        nn.LeakyReLU(0.2, inplace=True),
    )


class ResBlock2d(nn.Module):
    """``act(x + norm(conv(act(norm(conv(x))))))``; without ``residual`` the skip is dropped."""

    def __init__(self, channels: int, norm: str = "batch", residual: bool = True):
        super().__init__()
        self.residual = residual
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=norm == "none"),
            _norm(norm, channels),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=norm == "none"),
            _norm(norm, channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return F.leaky_relu(x + y if self.residual else y, 0.2)


class ResNetEncoder(nn.Module):
    """``(b, in, d, d)`` → ``(b, widths[-1], s, s)``, ``s = d / (stem · 2**(L-1))`` (d a multiple of
    ``size_multiple``)."""

    def __init__(self, config: ResNetConfig):
        super().__init__()
        config.validate()
        self.config = config
        w = config.widths
        layers: list[nn.Module] = [conv_block(config.in_channels * config.stem**2, w[0], config.norm)]
        for i, width in enumerate(w):
            if i > 0:
                layers.append(conv_block(w[i - 1], width, config.norm, stride=2))  # (b, w_i, d/2^i, ·)
            layers += [ResBlock2d(width, config.norm, config.residual) for _ in range(config.blocks_per_level)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stem = self.config.stem
        return self.net(F.pixel_unshuffle(x, stem) if stem > 1 else x)  # (b, in·stem², d/stem, ·) first


class ResNetDecoder(nn.Module):
    """The encoder mirrored: ``(b, widths[-1], s, s)`` → ``(b, out, s · stem · 2**(L-1), ·)``, linear output."""

    def __init__(self, config: ResNetConfig):
        super().__init__()
        config.validate()
        self.config = config
        w = list(reversed(config.widths))
        layers: list[nn.Module] = []
        for i, width in enumerate(w):
            if i > 0:
                layers += [
                    nn.ConvTranspose2d(w[i - 1], width, 4, stride=2, padding=1, bias=config.norm == "none"),
                    _norm(config.norm, width),
                    nn.LeakyReLU(0.2, inplace=True),
                ]  # (b, w, 2s, 2s)
            layers += [ResBlock2d(width, config.norm, config.residual) for _ in range(config.blocks_per_level)]
        layers.append(nn.Conv2d(w[-1], config.out_channels * config.stem**2, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        stem = self.config.stem
        y = self.net(z)
        return F.pixel_shuffle(y, stem) if stem > 1 else y


def fuse_batchnorm(module: nn.Module) -> nn.Module:
    """A copy of ``module`` for inference (eval mode) in which every batch norm that directly follows
    a convolution (or transposed convolution) in an ``nn.Sequential`` is folded into it; the
    output is that of ``module.eval()`` up to rounding, at the cost of the convolutions alone."""
    fused = copy.deepcopy(module).eval()
    for seq in [m for m in fused.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            conv, bn = seq[i], seq[i + 1]
            if isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)) and isinstance(bn, nn.BatchNorm2d):
                transpose = isinstance(conv, nn.ConvTranspose2d)
                seq[i] = fuse_conv_bn_eval(conv, bn, transpose=transpose)
                seq[i + 1] = nn.Identity()
    return fused


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Reflect-pad ``(b, c, h, w)`` so that h and w are multiples of ``multiple``; returns the padded
    tensor and the (top, left) offsets that :func:`crop_back` needs."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x, (0, 0)
    top, left = ph // 2, pw // 2
    mode = "reflect" if min(h, w) > max(ph, pw) else "replicate"
    return F.pad(x, (left, pw - left, top, ph - top), mode=mode), (top, left)


def crop_back(y: torch.Tensor, offsets: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    top, left = offsets
    return y[..., top : top + size[0], left : left + size[1]]


class ResNetAutoencoder(nn.Module):
    """Image in, image out: :class:`ResNetEncoder` then :class:`ResNetDecoder`, any even box."""

    def __init__(self, config: ResNetConfig):
        super().__init__()
        self.config = config
        self.encoder = ResNetEncoder(config)
        self.decoder = ResNetDecoder(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xp, off = pad_to_multiple(x, self.config.size_multiple)
        return crop_back(self.decoder(self.encoder(xp)), off, x.shape[-2:])


class ResNetClassifier(nn.Module):
    """Image → one logit per image ``(b,)``: the encoder, global average pooling, a linear layer."""

    def __init__(self, config: ResNetConfig):
        super().__init__()
        self.config = config
        self.encoder = ResNetEncoder(config)
        self.head = nn.Linear(config.widths[-1], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xp, _ = pad_to_multiple(x, self.config.size_multiple)
        h = self.encoder(xp).mean(dim=(-2, -1))  # (b, widths[-1])
        return self.head(h)[:, 0]
