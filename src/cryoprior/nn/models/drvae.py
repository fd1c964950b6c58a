"""DRVAE: a denoising ResNet variational autoencoder for particle images.

:class:`~cryoprior.nn.models.resnet.ResNetEncoder` → flatten → linear heads for the mean and
log-variance of a Gaussian latent ``z`` ``(b, latent_dim)`` → reparameterisation
``z = mu + exp(logvar / 2) · eps`` (training; the mean at evaluation) → linear layer back to the
encoder's feature map → the mirrored :class:`~cryoprior.nn.models.resnet.ResNetDecoder`.

The loss (:func:`vae_loss`) is the per-pixel mean squared error plus ``beta`` times the KL
divergence of ``N(mu, exp(logvar))`` from ``N(0, 1)`` summed over the latent and divided by the
number of pixels: with per-image normalised inputs (noise variance ≈ 1 at low SNR) ``beta = 1``
is the evidence lower bound of a unit-variance Gaussian likelihood.
"""

from __future__ import annotations

import torch
from torch import nn

from cryoprior.nn.models.resnet import (
    ResNetConfig,
    ResNetDecoder,
    ResNetEncoder,
    crop_back,
    pad_to_multiple,
)


class DRVAE(nn.Module):
    """Images ``(b, 1, box, box)`` → ``(reconstruction (b, 1, box, box), mu (b, L), logvar (b, L))``."""

    def __init__(self, box: int, latent_dim: int = 16, widths: list[int] | None = None, blocks_per_level: int = 1,
                 norm: str = "batch"):
        super().__init__()
        if box < 2 or latent_dim < 1:
            raise ValueError(f"need box >= 2 and latent_dim >= 1, got {box}, {latent_dim}")
        self.config = ResNetConfig(widths=list(widths or [16, 32, 64]), blocks_per_level=blocks_per_level, norm=norm)
        self.box, self.latent_dim = box, latent_dim
        m = self.config.size_multiple
        side = (box + (-box) % m) // m  # feature map side after the encoder (padded box / 2**(L-1))
        self.feature_shape = (self.config.widths[-1], side, side)
        features = self.config.widths[-1] * side * side
        self.encoder = ResNetEncoder(self.config)
        self.stats = nn.Linear(features, 2 * latent_dim)  # → (mu, logvar)
        self.expand = nn.Linear(latent_dim, features)
        self.decoder = ResNetDecoder(self.config)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(b, 1, box, box)`` → ``mu, logvar`` each ``(b, latent_dim)``."""
        xp, _ = pad_to_multiple(x, self.config.size_multiple)
        h = self.encoder(xp).flatten(1)
        mu, logvar = self.stats(h).chunk(2, dim=1)
        return mu, logvar.clamp(-20.0, 10.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``(b, latent_dim)`` → ``(b, 1, box, box)``."""
        h = self.expand(z).view(len(z), *self.feature_shape)
        y = self.decoder(h)
        pad = y.shape[-1] - self.box
        return crop_back(y, (pad // 2, pad // 2), (self.box, self.box))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x)
        z = reparameterize(mu, logvar) if self.training else mu
        return self.decode(z), mu, logvar


class DRVAEDenoiser(nn.Module):
    """The deterministic denoiser of a trained :class:`DRVAE`: ``(b, 1, box, box)`` → ``(b, 1, box, box)``
    (decoder of the latent mean), for :func:`cryoprior.nn.denoiser.denoise_tensor`; ``vae`` wraps a
    trained one (the other arguments are then ignored)."""

    def __init__(self, box: int, latent_dim: int = 16, widths: list[int] | None = None, blocks_per_level: int = 1,
                 norm: str = "batch", vae: DRVAE | None = None):
        super().__init__()
        self.vae = vae if vae is not None else DRVAE(box, latent_dim, widths, blocks_per_level, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(self.vae.encode(x)[0])


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``mu + exp(logvar / 2) · eps``, ``eps ~ N(0, 1)``; gradients flow to ``mu`` and ``logvar``."""
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``KL(N(mu, exp(logvar)) || N(0, 1))`` summed over the latent: ``(b, L)`` → ``(b,)``."""
    return 0.5 * (mu * mu + logvar.exp() - 1.0 - logvar).sum(dim=1)


def vae_loss(recon: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, beta: float,
             weights: torch.Tensor | None = None, targets: torch.Tensor | None = None, target_weight: float = 0.0
             ) -> torch.Tensor:
    """``mean_i [ mse(recon_i, x_i) + beta · KL_i / pixels + target_weight · w_i · mse(recon_i, t_i) ]``.

    ``recon``, ``x``, ``targets`` ``(b, 1, d, d)``; ``weights`` ``(b,)`` 1 for a sample with a
    pseudo-target (reliable), else 0.
    """
    pixels = x[0].numel()
    per_image = ((recon - x) ** 2).flatten(1).mean(1) + beta * kl_divergence(mu, logvar) / pixels
    if targets is not None and weights is not None and target_weight > 0:
        per_image = per_image + target_weight * weights * ((recon - targets) ** 2).flatten(1).mean(1)
    return per_image.mean()
