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


def _resize_axis(f: torch.Tensor, m: int, dim: int) -> torch.Tensor:
    """Crop or zero-pad centred spectra ``f`` along ``dim`` to ``m`` samples. An even-sized
    Nyquist sample is split in halves between ±Nyquist when padding and the two halves are
    summed when cropping, so that padding then cropping back is exact."""
    d = f.shape[dim]
    if m == d:
        return f
    f = f.movedim(dim, -1)
    if m > d:
        out = f.new_zeros(*f.shape[:-1], m)
        lo = m // 2 - d // 2
        out[..., lo : lo + d] = f
        if d % 2 == 0:  # source index 0 is -Nyquist: half there, half at +Nyquist
            out[..., lo] = 0.5 * f[..., 0]
            out[..., lo + d] = 0.5 * f[..., 0]
    else:
        lo = d // 2 - m // 2
        out = f[..., lo : lo + m].clone()
        if m % 2 == 0 and lo + m < d:  # the new -Nyquist also takes the +Nyquist sample
            out[..., 0] = out[..., 0] + f[..., lo + m]
    return out.movedim(-1, dim)


def fourier_resample(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resample real images ``(..., d, d)`` to ``(..., size, size)`` by cropping (``size < d``:
    the band above the new Nyquist is dropped) or zero-padding (``size > d``) their centred
    spectrum; values keep their units (a constant image stays that constant), and the pixel size
    becomes ``pixel · d / size``. Padding then cropping back returns the images exactly."""
    d = images.shape[-1]
    if images.shape[-2] != d:
        raise ValueError(f"images must be square, got shape {tuple(images.shape)}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if size == d:
        return images.clone()
    f = _resize_axis(_resize_axis(fft2c(images), size, -2), size, -1)
    return ifft2c(f).real * (size / d) ** 2
