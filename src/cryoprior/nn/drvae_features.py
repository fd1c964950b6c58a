"""What DRVAE's clusterings see besides the latent means (``nn.drvae``, options of ``DRVAEConfig``).

- :func:`lowpass_inputs`: the network inputs Gaussian low-passed (``--first-clustering lowpass``;
  the filter of the low-pass + k-means baseline).
- :func:`ssnr_first`: ``--first-clustering ssnr``: k-means of those, refined by BSK-means with
  centres regularised by their half-set spectral SNR (``cluster.bsk.ssnr_bsk``).
- :func:`joint_features`: ``--cluster-on both``: the denoised images next to the low-passed inputs,
  so that a clustering of the network's output keeps each image's own evidence.
"""

from __future__ import annotations

import numpy as np
import torch

from cryoprior.classical.cluster.bsk import ssnr_bsk
from cryoprior.classical.cluster.kmeans import kmeans
from cryoprior.core.filters import gaussian_lowpass, normalize_images


def lowpass_inputs(x: torch.Tensor, sigma_net_px: float) -> torch.Tensor:
    """The network inputs ``(n, 1, b, b)`` Gaussian low-passed (``sigma_net_px``, working-box px)
    and normalised again per image."""
    return normalize_images(gaussian_lowpass(x, sigma_net_px, ndim=2))


def ssnr_first(x: torch.Tensor, lowpassed: torch.Tensor, k: int, seed: int, size_tolerance: float
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """k-means (10 seedings, as the low-pass + k-means baseline) of ``lowpassed`` ``(n, 1, b, b)``,
    refined by :func:`ssnr_bsk` on the inputs ``x`` ``(n, 1, b, b)``.
    Returns ``(labels (n,), what was clustered (n, b*b), centres (k, b*b))``."""
    n = len(x)
    start = kmeans(lowpassed.reshape(n, -1).numpy(), k, seed, n_init=10)[0]
    labels, centres = ssnr_bsk(x[:, 0].numpy(), k, start, size_tolerance=size_tolerance)
    return labels, x.reshape(n, -1).numpy(), centres


def joint_features(lowpassed: torch.Tensor, denoised: torch.Tensor, denoised_weight: float, summed: bool = False
                   ) -> np.ndarray:
    """``(n, 2 b*b)``: the low-passed inputs and the denoised images ``(n, 1, b, b)``, each scaled to
    a mean squared norm of 1, the denoised ones then by ``denoised_weight`` (squared distances add).
    ``summed``: their sum ``(n, 1, b, b)`` instead, one image to align (``--align``)."""
    n = len(lowpassed)
    parts = []
    for part, weight in ((lowpassed, 1.0), (denoised, denoised_weight)):
        p = part.double().numpy()
        parts.append(weight * p / max(float(np.sqrt((p * p).sum((1, 2, 3)).mean())), 1e-12))
    if summed:
        return (parts[0] + parts[1]).astype(np.float32)
    return np.concatenate([p.reshape(n, -1) for p in parts], axis=1).astype(np.float32)
