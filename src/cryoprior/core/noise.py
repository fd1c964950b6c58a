"""White Gaussian noise at a given SNR.

SNR is defined as in the denoising papers: ``var(clean image) / var(added noise)``, the variance
taken over the pixels of each image (the last two axes, population variance)::

    sigma = sqrt(var(clean) / snr);   noisy = clean + sigma * N(0, 1)

``snr = inf`` adds nothing (sigma = 0).
"""

from __future__ import annotations

import torch

Snr = float | torch.Tensor


def _check_images(clean: torch.Tensor) -> None:
    if clean.dim() < 2:
        raise ValueError(f"expected images (..., h, w), got shape {tuple(clean.shape)}")


def _image_var(x: torch.Tensor) -> torch.Tensor:
    return x.var(dim=(-2, -1), correction=0)


def noise_sigma_for_snr(clean: torch.Tensor, snr: Snr, per_stack: bool = False) -> torch.Tensor:
    """Noise standard deviation giving ``snr`` for each image of ``clean`` ``(..., h, w)``.

    ``snr``: float or tensor broadcasting with ``(...,)``; must be > 0 (``inf`` gives 0).
    ``per_stack=False``: ``sqrt(var(image) / snr)`` per image. ``per_stack=True``: one sigma from
    the mean variance over all images, ``sqrt(mean(var) / snr)``, so dimmer images (e.g. other
    views) get a lower SNR. Returns ``(...,)``.
    """
    _check_images(clean)
    snr_t = torch.as_tensor(snr, device=clean.device, dtype=clean.dtype)
    if bool((snr_t <= 0).any()) or bool(torch.isnan(snr_t).any()):
        raise ValueError(f"snr must be > 0 (inf allowed), got {snr}")
    var = _image_var(clean)  # (...,)
    if per_stack:
        var = var.mean().expand(var.shape)
    return torch.sqrt(var / snr_t).expand(torch.broadcast_shapes(var.shape, snr_t.shape))


def add_noise(
    clean: torch.Tensor,
    snr: Snr,
    generator: torch.Generator | None = None,
    per_stack: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add white Gaussian noise at ``snr`` to ``clean`` ``(..., h, w)``.

    Per image by default (each image gets its own sigma, the simulator's default); with
    ``per_stack=True`` one sigma for the whole stack (see :func:`noise_sigma_for_snr`).
    Deterministic for a given ``generator`` (on ``clean``'s device). ``snr = inf`` returns an
    exact copy of ``clean``. Returns ``(noisy (..., h, w), sigma (...,))``.
    """
    sigma = noise_sigma_for_snr(clean, snr, per_stack=per_stack)
    noise = torch.randn(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
    return clean + sigma[..., None, None] * noise, sigma


def measure_snr(clean: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
    """``var(clean) / var(noisy - clean)`` per image. ``(..., h, w)`` twice → ``(...,)``."""
    if clean.shape != noisy.shape:
        raise ValueError(
            f"shapes must match: clean.shape = {tuple(clean.shape)} vs noisy.shape = {tuple(noisy.shape)}"
        )
    _check_images(clean)
    return _image_var(clean) / _image_var(noisy - clean)
