"""Masks, Fourier filters, whitening, normalisation and Fourier-cropping downsampling.

Radii are in pixels from the centre ``d // 2`` (real space) or from the zero frequency (Fourier
pixels, the centred layout of :mod:`cryoprior.core.fft`). A frequency in cycles/pixel ``f``
sits at Fourier radius ``f * d``; a resolution ``r`` Å at ``pixel_size_a / r`` cycles/pixel.
Functions taking ``ndim`` work on images (2) or volumes (3); see
:func:`cryoprior.core.fsc.spatial_ndim` for how ``ndim=None`` is resolved.
"""

from __future__ import annotations

import math

import torch

from cryoprior.core.fft import fft2c, ifft2c, radius_grid
from cryoprior.core.fsc import fftnc, ifftnc, radial_average, radial_shell_index, spatial_ndim


def _raised_cosine(r: torch.Tensor, start: float, width: float) -> torch.Tensor:
    """1 for ``r <= start``, 0 for ``r >= start + width``, cosine fall in between."""
    if width <= 0:
        return (r <= start).to(r.dtype)
    t = ((r - start) / width).clamp(0.0, 1.0)
    return 0.5 * (1.0 + torch.cos(math.pi * t))


def soft_sphere_mask(
    box: int,
    radius_px: float,
    width_px: float,
    ndim: int = 2,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Circle (ndim 2) or sphere (ndim 3) mask centred at ``box // 2``. ``(box,) * ndim``.

    1 up to ``radius_px``, a raised-cosine edge ``width_px`` wide, 0 from ``radius_px + width_px``
    (``width_px = 0``: a hard mask, 1 where ``r <= radius_px``).
    """
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim}")
    if radius_px < 0 or width_px < 0:
        raise ValueError(f"radius_px and width_px must be >= 0, got {radius_px}, {width_px}")
    return _raised_cosine(radius_grid(box, ndim, device, dtype), radius_px, width_px)


def soft_mask_outside_map(volume: torch.Tensor, radius_px: float | None = None, width_px: float = 3.0) -> torch.Tensor:
    """RELION's ``softMaskOutsideMap`` (3.1.3 ``src/mask.cpp:43-97``, defaults ``mask.h``): the
    corners outside the sphere of ``radius_px`` (default ``d / 2``, centre ``d // 2``) are
    replaced by the background level, the raised-cosine-weighted mean of the outside, blended
    over ``width_px`` px: ``(1 − w) v + w · bg``, ``w`` = 1 − :func:`soft_sphere_mask`.
    ``(..., d, d, d)``, one background level per volume."""
    d = volume.shape[-1]
    if volume.dim() < 3 or volume.shape[-3:] != (d, d, d):
        raise ValueError(f"expected (..., d, d, d), got {tuple(volume.shape)}")
    radius_px = d / 2 if radius_px is None else radius_px
    outside = 1.0 - soft_sphere_mask(d, radius_px, width_px, 3, volume.device, volume.dtype)
    total = outside.sum()
    if not float(total) > 0:  # nothing outside the sphere: RELION divides by 0; we leave the map
        return volume.clone()
    background = (outside * volume).sum(dim=(-3, -2, -1), keepdim=True) / total
    return (1.0 - outside) * volume + outside * background


def _cutoff_fourier_px(
    box: int, cutoff_a: float | None, cutoff_freq: float | None, pixel_size_a: float | None
) -> float:
    """Cut-off radius in Fourier pixels from a resolution in Å or a frequency in cycles/pixel."""
    if cutoff_freq is not None:
        if cutoff_a is not None:
            raise ValueError("give only one of cutoff_a and cutoff_freq")
        freq = cutoff_freq
    elif cutoff_a is None:
        raise ValueError("give one of cutoff_a (with pixel_size_a) and cutoff_freq")
    elif pixel_size_a is None or pixel_size_a <= 0 or cutoff_a <= 0:
        raise ValueError(
            f"cutoff_a needs positive cutoff_a and pixel_size_a, got {cutoff_a}, {pixel_size_a}"
        )
    else:
        freq = pixel_size_a / cutoff_a
    if freq < 0:
        raise ValueError(f"cutoff_freq must be >= 0 cycles/pixel, got {freq}")
    return freq * box


def _band_filter(
    x: torch.Tensor,
    cutoff_a: float | None,
    cutoff_freq: float | None,
    pixel_size_a: float | None,
    width_px: float,
    ndim: int | None,
    high: bool,
) -> torch.Tensor:
    ndim = spatial_ndim(x, ndim)
    box = x.shape[-1]
    cut = _cutoff_fourier_px(box, cutoff_a, cutoff_freq, pixel_size_a)
    r = radius_grid(box, ndim, x.device, x.real.dtype)
    filt = _raised_cosine(r, cut - width_px / 2, width_px)
    if high:
        filt = 1.0 - filt
    return ifftnc(fftnc(x, ndim) * filt, ndim).real


def lowpass(
    x: torch.Tensor,
    cutoff_a: float | None = None,
    *,
    cutoff_freq: float | None = None,
    pixel_size_a: float | None = None,
    width_px: float = 2.0,
    ndim: int | None = None,
) -> torch.Tensor:
    """Raised-cosine low-pass of real ``x`` ``(..., d, d[, d])`` → same shape.

    Cut-off as a resolution ``cutoff_a`` Å (with ``pixel_size_a``) or ``cutoff_freq``
    cycles/pixel. As RELION's ``lowPassFilterMap``: the cosine edge is ``width_px`` Fourier
    pixels wide and centred on the cut-off (gain 0.5 there).
    """
    return _band_filter(x, cutoff_a, cutoff_freq, pixel_size_a, width_px, ndim, high=False)


def highpass(
    x: torch.Tensor,
    cutoff_a: float | None = None,
    *,
    cutoff_freq: float | None = None,
    pixel_size_a: float | None = None,
    width_px: float = 2.0,
    ndim: int | None = None,
) -> torch.Tensor:
    """Complement of :func:`lowpass` (same arguments): keeps frequencies above the cut-off."""
    return _band_filter(x, cutoff_a, cutoff_freq, pixel_size_a, width_px, ndim, high=True)


def gaussian_lowpass(x: torch.Tensor, sigma_px: float, ndim: int | None = None) -> torch.Tensor:
    """Gaussian blur with real-space standard deviation ``sigma_px`` pixels (periodic boundary).

    Applied in Fourier space as ``exp(-2 pi^2 sigma^2 f^2)``, f in cycles/pixel.
    ``(..., d, d[, d])`` → same shape.
    """
    if sigma_px < 0:
        raise ValueError(f"sigma_px must be >= 0, got {sigma_px}")
    ndim = spatial_ndim(x, ndim)
    box = x.shape[-1]
    f = radius_grid(box, ndim, x.device, x.real.dtype) / box
    return ifftnc(fftnc(x, ndim) * torch.exp(-2.0 * math.pi**2 * sigma_px**2 * f * f), ndim).real


def _check_images(images: torch.Tensor) -> None:
    if images.dim() < 2 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"expected square images (..., d, d), got {tuple(images.shape)}")


def estimate_noise_psd(
    images: torch.Tensor, mask_radius_px: float | None = None, edge_width_px: float = 6.0
) -> torch.Tensor:
    """Radial noise power spectrum, averaged over all images. ``(..., d, d)`` → ``(d // 2 + 1,)``.

    Power per Fourier pixel divided by the number of pixels used, so white noise of variance
    ``s^2`` gives ``s^2`` in every shell. With ``mask_radius_px``, only the background is used:
    a taper ``w`` that is 0 up to ``mask_radius_px`` and rises to 1 over ``edge_width_px`` (a
    cosine edge, which keeps the disc's spectral leakage small); the weighted background mean is
    removed and the power divided by ``sum(w^2)``. Shell 0 (the mean) is set to shell 1's value.
    """
    _check_images(images)
    box = images.shape[-1]
    x = images.reshape(-1, box, box)  # (n, d, d)
    if mask_radius_px is None:
        norm = float(box * box)
        x = x - x.mean(dim=(-2, -1), keepdim=True)
    else:
        w = 1.0 - soft_sphere_mask(box, mask_radius_px, edge_width_px, 2, images.device, images.dtype)
        norm = float((w * w).sum())
        if norm == 0:
            raise ValueError(f"mask_radius_px={mask_radius_px} leaves no background in a {box} box")
        mean = (x * w).sum(dim=(-2, -1), keepdim=True) / w.sum()
        x = (x - mean) * w
    power = fft2c(x).abs() ** 2 / norm  # (n, d, d)
    psd = radial_average(power.mean(dim=0), ndim=2)  # (d // 2 + 1,)
    if box > 2:
        psd = torch.cat([psd[1:2], psd[1:]])
    return psd


def whiten(
    images: torch.Tensor,
    noise_psd: torch.Tensor | None = None,
    mask_radius_px: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Divide ``images`` ``(..., d, d)`` by ``sqrt(noise_psd)`` in Fourier space.

    ``noise_psd`` ``(d // 2 + 1,)`` or ``(..., d // 2 + 1)`` as from :func:`estimate_noise_psd`
    (estimated from ``images`` themselves, using ``mask_radius_px`` and the default edge, when
    not given). Fourier pixels beyond shell ``d // 2`` use the last shell. Noise of that PSD
    comes out white with unit variance. Returns ``(whitened images (..., d, d), noise_psd)``.
    """
    _check_images(images)
    box = images.shape[-1]
    if noise_psd is None:
        noise_psd = estimate_noise_psd(images, mask_radius_px)
    if noise_psd.shape[-1] != box // 2 + 1:
        raise ValueError(
            f"noise_psd must end in d // 2 + 1 shells: images.shape = {tuple(images.shape)} "
            f"vs noise_psd.shape = {tuple(noise_psd.shape)}"
        )
    psd = noise_psd.to(images.device, images.dtype)
    if bool((psd <= 0).any()):
        raise ValueError("noise_psd must be positive in every shell")
    idx = radial_shell_index(box, 2, images.device).clamp(max=box // 2)
    scale = torch.rsqrt(psd)[..., idx]  # (..., d, d)
    return ifft2c(fft2c(images) * scale).real, noise_psd


def normalize_images(images: torch.Tensor, mask_radius_px: float | None = None) -> torch.Tensor:
    """Zero mean, unit standard deviation per image. ``(..., d, d)`` → same shape.

    As RELION's ``relion_preprocess --norm``: with ``mask_radius_px`` the mean and (population)
    standard deviation come from the background ``r > mask_radius_px`` only. A constant
    background gives zeros rather than dividing by 0, and so does one that is constant up to
    rounding: a deviation below ``100·eps·max|image|`` of the dtype is rounding noise, not
    signal, and is not blown up to unit variance.
    """
    _check_images(images)
    box = images.shape[-1]
    if mask_radius_px is None:
        mean = images.mean(dim=(-2, -1), keepdim=True)
        std = images.std(dim=(-2, -1), keepdim=True, correction=0)
    else:
        bg = radius_grid(box, 2, images.device, images.dtype) > mask_radius_px
        n = int(bg.sum())
        if n < 2:
            raise ValueError(f"mask_radius_px={mask_radius_px} leaves < 2 background pixels")
        mean = (images * bg).sum(dim=(-2, -1), keepdim=True) / n
        std = torch.sqrt((((images - mean) * bg) ** 2).sum(dim=(-2, -1), keepdim=True) / n)
    floor = 100 * torch.finfo(images.dtype).eps * images.abs().amax(dim=(-2, -1), keepdim=True)
    return (images - mean) / torch.maximum(std, floor.clamp(min=torch.finfo(images.dtype).tiny))


def downsample(x: torch.Tensor, new_box: int, ndim: int | None = None) -> torch.Tensor:
    """Fourier-crop ``(..., d, d[, d])`` to ``(..., new_box, new_box[, new_box])``, ``new_box <= d``.

    The centred frequencies ``|k| < new_box / 2`` are kept; values are scaled so pixel values
    (and the mean) are preserved. Exact for inputs band-limited below the new Nyquist frequency.
    """
    ndim = spatial_ndim(x, ndim)
    box = x.shape[-1]
    if not 1 <= new_box <= box:
        raise ValueError(f"new_box must be in 1..{box} for shape {tuple(x.shape)}, got {new_box}")
    if new_box == box:
        return x.clone()
    start = box // 2 - new_box // 2
    f = fftnc(x, ndim)
    crop = (slice(start, start + new_box),) * ndim
    f = f[(..., *crop)]
    return ifftnc(f, ndim).real * (new_box / box) ** ndim


def resample(x: torch.Tensor, new_box: int, ndim: int | None = None) -> torch.Tensor:
    """The same field of view sampled at ``d / new_box`` times the pixel size: the centred transform
    of ``(..., d, d[, d])`` cropped (``new_box < d``) or zero-padded (``new_box > d``). An even
    box's Nyquist plane is split between ``±N/2`` when padding and the two are summed when
    cropping, so ``resample(resample(x, D), d) == x`` for ``D > d``. Pixel values are preserved."""
    ndim = spatial_ndim(x, ndim)
    box = x.shape[-1]
    if new_box == box:
        return x.clone()
    if new_box < 1:
        raise ValueError(f"new_box must be >= 1, got {new_box}")
    f = fftnc(x, ndim)
    for axis in range(-ndim, 0):
        if new_box > box:
            lo = new_box // 2 - box // 2
            pad = [0, 0] * (-axis - 1) + [lo, new_box - box - lo]
            f = torch.nn.functional.pad(f, pad)
            if box % 2 == 0:  # k = -box/2 held both signs: half of it to +box/2
                nyq = f.narrow(axis, lo, 1) / 2
                f = torch.cat((f.narrow(axis, 0, lo), nyq, f.narrow(axis, lo + 1, box - 1), nyq,
                               f.narrow(axis, lo + box + 1, new_box - lo - box - 1)), dim=axis)
        else:
            start = box // 2 - new_box // 2
            kept = f.narrow(axis, start, new_box)
            if new_box % 2 == 0 and start + new_box < box:  # fold +new/2 onto -new/2
                first = kept.narrow(axis, 0, 1) + f.narrow(axis, start + new_box, 1)
                kept = torch.cat((first, kept.narrow(axis, 1, new_box - 1)), dim=axis)
            f = kept
    return ifftnc(f, ndim).real * (new_box / box) ** ndim
