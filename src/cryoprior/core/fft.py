"""Centred FFTs and frequency grids.

The centred transform places the real-space centre ``d // 2`` and the zero frequency both at
index ``d // 2``, so a delta at the centre has a flat, real transform::

    >>> import torch
    >>> x = torch.zeros(5, 5); x[2, 2] = 1
    >>> torch.allclose(fft2c(x), torch.ones(5, 5, dtype=torch.complex64))
    True

Recipe: ``fftshift(fftn(ifftshift(x)))`` over the last 2 (or 3) axes; ``ifft2c`` inverts it.
Frequency index ``j`` means ``(j - d // 2) / (d * pixel_size_a)`` cycles/Å.
"""

from __future__ import annotations

import torch


def fft2c(x: torch.Tensor) -> torch.Tensor:
    """Centred 2D FFT over the last two axes. ``(..., d, d)`` real or complex → complex."""
    dims = (-2, -1)
    return torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(x, dim=dims), dim=dims), dim=dims)


def ifft2c(f: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`fft2c` (complex out; take ``.real`` for real images)."""
    dims = (-2, -1)
    return torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(f, dim=dims), dim=dims), dim=dims)


def fft3c(x: torch.Tensor) -> torch.Tensor:
    """Centred 3D FFT over the last three axes. ``(..., d, d, d)`` → complex."""
    dims = (-3, -2, -1)
    return torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(x, dim=dims), dim=dims), dim=dims)


def ifft3c(f: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`fft3c` (complex out)."""
    dims = (-3, -2, -1)
    return torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(f, dim=dims), dim=dims), dim=dims)


def freqs_1d(d: int, pixel_size_a: float = 1.0, device=None, dtype=torch.float32) -> torch.Tensor:
    """Centred frequencies ``(j - d // 2) / (d * pixel_size_a)`` for ``j`` in ``0..d-1``. ``(d,)``."""
    return (torch.arange(d, device=device, dtype=dtype) - d // 2) / (d * pixel_size_a)


def freq_grid_2d(
    d: int, pixel_size_a: float = 1.0, device=None, dtype=torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Centred frequency grids ``(ky, kx)``, each ``(d, d)``, in cycles/Å (cycles/pixel at 1.0)."""
    f = freqs_1d(d, pixel_size_a, device, dtype)
    ky, kx = torch.meshgrid(f, f, indexing="ij")
    return ky, kx


def freq_grid_3d(
    d: int, pixel_size_a: float = 1.0, device=None, dtype=torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centred frequency grids ``(kz, ky, kx)``, each ``(d, d, d)``."""
    f = freqs_1d(d, pixel_size_a, device, dtype)
    kz, ky, kx = torch.meshgrid(f, f, f, indexing="ij")
    return kz, ky, kx


def radius_grid(d: int, ndim: int = 2, device=None, dtype=torch.float32) -> torch.Tensor:
    """Distance from the centre ``d // 2`` in pixels (also: frequency radius in Fourier pixels).

    ``(d,) * ndim``.
    """
    r = torch.arange(d, device=device, dtype=dtype) - d // 2
    grids = torch.meshgrid(*([r] * ndim), indexing="ij")
    return torch.sqrt(sum(g * g for g in grids))
