"""What DRVAE's clusterings see besides the latent means (``nn.drvae``, options of ``DRVAEConfig``).

- :func:`lowpass_inputs`: the network inputs Gaussian low-passed (``--first-clustering lowpass``;
  the filter of the low-pass + k-means baseline).
- :func:`ssnr_first`: ``--first-clustering ssnr``: k-means of those, refined by BSK-means with
  centres regularised by their half-set spectral SNR (``cluster.bsk.ssnr_bsk``).
- :func:`joint_features`: ``--cluster-on both``: the denoised images next to the low-passed inputs,
  so that a clustering of the network's output keeps each image's own evidence.
- :func:`ml2d_refine`: with ``--align``, the last clustering's classes refined by ML2D
  (``--ml2d-iterations``), within BSK's size bounds.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from cryoprior.classical.cluster.align import aligned_averages, aligned_costs, alignment_mask
from cryoprior.classical.cluster.bsk import balanced_assignment, ssnr_bsk
from cryoprior.classical.cluster.kmeans import kmeans
from cryoprior.classical.cluster.ml2d import ml2d
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


def ml2d_refine(x: torch.Tensor, assignment, k: int, max_shift: int, iterations: int, size_tolerance: float,
                n_angles: int = 36, **annealing):
    """``assignment`` (an ``nn.drvae.Assignment`` with poses) refined by ``iterations`` EM steps of
    ML2D on the network inputs ``x`` ``(n, b, b)``, started from its aligned class averages. The
    labels maximise the summed log posterior within BSK's size bounds (``size_tolerance``); each
    image's pose is then its best one against its class's refined average. ``annealing``: ML2D's
    ``temperature``, ``anneal_iterations`` and ``start_shell`` (:func:`~cryoprior.classical.cluster.ml2d.ml2d`)."""
    start = aligned_averages(x, torch.as_tensor(assignment.labels), torch.as_tensor(assignment.angles, dtype=torch.float32),
                             torch.as_tensor(assignment.shifts), k, centre=max_shift > 0)
    _, posterior, averages, *_ = ml2d(x, start, n_angles=n_angles, max_shift=max_shift, iterations=iterations, **annealing)
    labels = balanced_assignment(-np.log(np.clip(posterior, 1e-300, None)), size_tolerance=size_tolerance)
    mask = alignment_mask(x.shape[-1])
    grid = torch.arange(n_angles, dtype=torch.float32) * (2 * math.pi / n_angles)
    _, rot, shift = aligned_costs(x * mask, torch.as_tensor(averages), grid, mask, max_shift)
    pick = torch.as_tensor(labels)[:, None]
    return dataclasses.replace(assignment, labels=labels.astype(np.int64), angles=grid[rot.gather(1, pick)[:, 0]].numpy().astype(np.float64),
                               shifts=shift[torch.arange(len(labels)), torch.as_tensor(labels)].numpy())
