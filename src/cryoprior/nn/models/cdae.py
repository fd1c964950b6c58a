"""Convolutional autoencoder block and the cascade of CDAE (Lei & Yang, Front. Genet. 2021).

One block (``ConvAEBlock``), built from parameters:

- encoder: ``len(widths)`` modules, each ``convs_per_module`` 3×3 convolutions (+ReLU) and a
  2×2 max-pooling, then dropout;
- decoder: one 2×2 stride-2 transposed convolution (+ReLU) per encoder module, with widths
  ``widths[-2], ..., widths[0], widths[0]`` (dropout after the first), and a final 3×3
  convolution merging the ``widths[0]`` channels into 1. With the paper's ``widths=(32, 64, 128)``
  that last layer merges 32 channels into 1; the default ``(8, 16, 32)`` is 16× cheaper.

Images of any size ``d >= 2**depth`` are accepted: they are zero-padded to the next multiple of
``2**depth`` (the pooling factor) and cropped back, so the output has the input's shape for odd
and even sizes alike. Inputs are expected per-image normalised (zero mean, unit variance; see
``core.filters.normalize_images``), where zero padding is neutral.

>>> block = ConvAEBlock(widths=(8, 16, 32))
>>> block.eval()(torch.zeros(2, 1, 63, 63)).shape
torch.Size([2, 1, 63, 63])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cryoprior.core.filters import normalize_images, resample

DEFAULT_WIDTHS = (8, 16, 32)


class ConvAEBlock(nn.Module):
    """One denoising autoencoder: ``(b, 1, h, w)`` → ``(b, 1, h, w)``."""

    def __init__(
        self,
        widths: Sequence[int] = DEFAULT_WIDTHS,
        convs_per_module: int = 2,
        dropout: float = 0.5,
        kernel_size: int = 3,
    ):
        super().__init__()
        if len(widths) < 1 or min(widths) < 1:
            raise ValueError(f"widths must be positive channel counts, got {tuple(widths)}")
        if convs_per_module < 1:
            raise ValueError(f"convs_per_module must be >= 1, got {convs_per_module}")
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.widths = tuple(int(w) for w in widths)
        self.depth = len(self.widths)
        pad = kernel_size // 2
        layers: list[nn.Module] = []
        c_in = 1
        for w in self.widths:
            for _ in range(convs_per_module):
                layers += [nn.Conv2d(c_in, w, kernel_size, padding=pad), nn.ReLU(inplace=True)]
                c_in = w
            layers.append(nn.MaxPool2d(2))
        layers.append(nn.Dropout(dropout))
        self.encoder = nn.Sequential(*layers)
        up_widths = [*self.widths[-2::-1], self.widths[0]]  # e.g. 32 → 16 → 8 → 8
        layers = []
        for i, w in enumerate(up_widths):
            layers += [nn.ConvTranspose2d(c_in, w, 2, stride=2), nn.ReLU(inplace=True)]
            if i == 0:
                layers.append(nn.Dropout(dropout))
            c_in = w
        self.decoder = nn.Sequential(*layers)
        self.head = nn.Conv2d(c_in, 1, kernel_size, padding=pad)

    @property
    def multiple(self) -> int:
        """Image sizes are padded to a multiple of this (the total pooling factor)."""
        return 2**self.depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(f"expected images (b, 1, h, w), got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        m = self.multiple
        if min(h, w) < m:
            raise ValueError(
                f"images of {h}×{w} px are smaller than the pooling factor {m} "
                f"(2**{self.depth}); use fewer widths or larger images"
            )
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))  # (b, 1, h', w')
        y = self.head(self.decoder(self.encoder(x)))
        if ph or pw:
            y = y[..., ph // 2 : ph // 2 + h, pw // 2 : pw // 2 + w]  # (b, 1, h, w)
        return y


class CDAECascade(nn.Module):
    """``n_blocks`` ConvAEBlocks in a row; each block's output is re-normalised per image
    (zero mean, unit variance) before it enters the next block, as block ``j + 1`` was
    pre-trained on normalised images of the next SNR level."""

    def __init__(self, n_blocks: int = 3, **block_kw):
        super().__init__()
        if n_blocks < 1:
            raise ValueError(f"n_blocks must be >= 1, got {n_blocks}")
        self.blocks = nn.ModuleList(ConvAEBlock(**block_kw) for _ in range(n_blocks))

    def forward(self, x: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        """Run blocks ``0 .. upto - 1`` (all by default). ``(b, 1, h, w)`` → same shape."""
        blocks = self.blocks if upto is None else self.blocks[:upto]
        for i, block in enumerate(blocks):
            if i > 0:
                x = normalize_images(x.float())  # statistics in float32 under bf16 autocast
            x = block(x)
        return x


class ResampledCascade(nn.Module):
    """A cascade trained on another pixel grid (the shipped generic CDAE): ``(b, 1, d, d)`` →
    resampled in Fourier space to ``model_box`` px, normalised per image, the cascade, resampled
    back to ``d`` px."""

    def __init__(self, model_box: int, n_blocks: int = 3, **block_kw):
        super().__init__()
        self.model_box = int(model_box)
        self.inner = CDAECascade(n_blocks, **block_kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        y = resample(x.float().contiguous(), self.model_box, ndim=2)  # (b, 1, m, m)
        y = self.inner(normalize_images(y))
        return resample(y.float().contiguous(), d, ndim=2).to(x.dtype)
