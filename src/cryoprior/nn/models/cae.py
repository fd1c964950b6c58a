"""A plain convolutional autoencoder with a vector bottleneck (the "CAE" of "CAE + k-means").

Encoder: per width ``w`` in ``widths``, a 3×3 stride-2 convolution + batch norm + ReLU (each
halves the image), then a linear map to ``latent_dim``. Decoder: the mirror, with 4×4 stride-2
transposed convolutions and a final 3×3 convolution to one channel. Images of any size are
zero-padded to the next multiple of ``2**len(widths)`` and cropped back; inputs are expected
normalised per image (zero mean, unit variance), where zero padding is neutral.

>>> model = ConvAutoencoder(box=33, latent_dim=8)
>>> model.eval()(torch.zeros(2, 33, 33)).shape
torch.Size([2, 33, 33])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_WIDTHS = (16, 32, 64)


class ConvAutoencoder(nn.Module):
    """``(b, d, d)`` images ↔ ``(b, latent_dim)`` codes."""

    def __init__(self, box: int, latent_dim: int = 32, widths: Sequence[int] = DEFAULT_WIDTHS):
        super().__init__()
        if box < 2 or latent_dim < 1 or len(widths) < 1 or min(widths) < 1:
            raise ValueError(
                f"need box >= 2, latent_dim >= 1 and positive widths, got {box}, {latent_dim}, {tuple(widths)}"
            )
        self.box, self.latent_dim, self.widths = int(box), int(latent_dim), tuple(int(w) for w in widths)
        factor = 2 ** len(self.widths)
        self.padded = -(-self.box // factor) * factor
        self.side = self.padded // factor  # bottleneck feature map side
        enc: list[nn.Module] = []
        c_in = 1
        for w in self.widths:
            enc += [nn.Conv2d(c_in, w, 3, stride=2, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            c_in = w
        self.encoder = nn.Sequential(*enc)
        flat = self.widths[-1] * self.side * self.side
        self.to_latent = nn.Linear(flat, self.latent_dim)
        self.from_latent = nn.Linear(self.latent_dim, flat)
        dec: list[nn.Module] = []
        outs = [*self.widths[-2::-1], self.widths[0]]  # widths reversed, ending at widths[0]
        for c_out in outs:
            dec += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c_in = c_out
        dec.append(nn.Conv2d(c_in, 1, 3, padding=1))
        self.decoder = nn.Sequential(*dec)

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and x.shape[1] == 1:
            x = x[:, 0]
        if x.dim() != 3 or x.shape[-2:] != (self.box, self.box):
            raise ValueError(f"expected images (b, {self.box}, {self.box}), got shape {tuple(x.shape)}")
        return x

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``(b, d, d)`` (or ``(b, 1, d, d)``) → ``(b, latent_dim)``."""
        x = self._check(x)
        pad = self.padded - self.box
        h = F.pad(x[:, None], (0, pad, 0, pad))  # (b, 1, D, D)
        h = self.encoder(h)  # (b, widths[-1], side, side)
        return self.to_latent(h.flatten(1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``(b, latent_dim)`` → ``(b, d, d)``."""
        h = self.from_latent(z).reshape(-1, self.widths[-1], self.side, self.side)  # (b, C, s, s)
        out = self.decoder(h)  # (b, 1, D, D)
        return out[:, 0, : self.box, : self.box]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))
