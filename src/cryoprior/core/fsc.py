"""Radial shells, Fourier shell correlation and resolution.

Shell ``i`` holds the Fourier pixels of the centred grid (:mod:`cryoprior.core.fft`) whose
distance from the zero frequency rounds to ``i``; shells ``0..box // 2`` are kept (the corners
beyond Nyquist are dropped). Shell ``i`` is at ``i / (box * pixel_size_a)`` cycles/Å::

    fsc_i = Re(sum F1 conj(F2)) / sqrt(sum |F1|^2 sum |F2|^2)     (sums over shell i)

Functions take ``ndim`` (2: images ``(..., d, d)``, 3: volumes ``(..., d, d, d)``). Left as
``None`` it is inferred only where the shape is unambiguous (see :func:`spatial_ndim`).
"""

from __future__ import annotations

import torch

from cryoprior.core.fft import fft2c, fft3c, ifft2c, ifft3c, radius_grid
from cryoprior.errors import NonFiniteError


def spatial_ndim(x: torch.Tensor, ndim: int | None) -> int:
    """Resolve the number of spatial axes of ``x`` and check they are equal (square/cubic).

    ``ndim=None``: 2 if ``x`` has 2 axes or its last three axes are not all equal; a tensor whose
    last three axes are equal (``(d, d, d)`` — a volume, or a stack of ``d`` images) is ambiguous
    and raises, asking for ``ndim``.
    """
    if ndim is None:
        if x.dim() == 2 or (x.dim() >= 3 and len(set(x.shape[-3:])) > 1):
            ndim = 2
        else:
            raise ValueError(
                f"cannot tell images from a volume for shape {tuple(x.shape)}: pass ndim=2 or 3"
            )
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim}")
    if x.dim() < ndim or len(set(x.shape[-ndim:])) != 1:
        raise ValueError(f"expected (..., d{', d' * (ndim - 1)}) for ndim={ndim}, got {tuple(x.shape)}")
    return ndim


def fftnc(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """Centred FFT over the last ``ndim`` (2 or 3) axes."""
    return fft2c(x) if ndim == 2 else fft3c(x)


def ifftnc(f: torch.Tensor, ndim: int) -> torch.Tensor:
    """Inverse of :func:`fftnc` (complex out)."""
    return ifft2c(f) if ndim == 2 else ifft3c(f)


def radial_shell_index(box: int, ndim: int = 2, device=None) -> torch.Tensor:
    """``round(radius)`` in Fourier pixels on the centred grid. LongTensor ``(box,) * ndim``."""
    return torch.round(radius_grid(box, ndim, device=device, dtype=torch.float64)).long()


def _shell_sums(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """Sum of real ``x`` ``(..., d, ...)`` per shell ``0..d//2``. → ``(..., d // 2 + 1)``."""
    box = x.shape[-1]
    n_shells = box // 2 + 1
    idx = radial_shell_index(box, ndim, x.device).reshape(-1)  # (d^ndim,)
    flat = x.reshape(*x.shape[: x.dim() - ndim], -1)  # (..., d^ndim)
    out = torch.zeros(*flat.shape[:-1], idx.max().item() + 1, device=x.device, dtype=x.dtype)
    out = out.index_add(-1, idx, flat)
    return out[..., :n_shells]


def shell_counts(box: int, ndim: int = 2, device=None) -> torch.Tensor:
    """Number of Fourier pixels per shell ``0..box // 2``. ``(box // 2 + 1,)`` float64."""
    idx = radial_shell_index(box, ndim, device).reshape(-1)
    return torch.bincount(idx).to(torch.float64)[: box // 2 + 1]


def radial_average(x: torch.Tensor, ndim: int | None = None) -> torch.Tensor:
    """Mean of real ``x`` over each shell ``0..box // 2`` of the centred layout.

    ``(..., d, d)`` (ndim 2) or ``(..., d, d, d)`` (ndim 3) → ``(..., d // 2 + 1)``.
    """
    ndim = spatial_ndim(x, ndim)
    if x.is_complex():
        raise ValueError("radial_average takes real input; pass .abs() or .real of a spectrum")
    counts = shell_counts(x.shape[-1], ndim, x.device).to(x.dtype)
    return _shell_sums(x, ndim) / counts


def fsc(a: torch.Tensor, b: torch.Tensor, ndim: int | None = None) -> torch.Tensor:
    """Fourier shell (ring) correlation of real maps or images, per shell ``0..d // 2``.

    ``a``, ``b``: ``(..., d, d)`` (ndim 2) or ``(..., d, d, d)`` (ndim 3), same shape.
    Returns ``(..., d // 2 + 1)``; a shell with no power in either input gives 0. NaN or Inf in
    either input is a :class:`~cryoprior.errors.NonFiniteError` (it would read as FSC 0).
    """
    if a.shape != b.shape:
        raise ValueError(f"shapes must match: a.shape = {tuple(a.shape)} vs b.shape = {tuple(b.shape)}")
    for name, x in (("first", a), ("second", b)):
        if not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).sum())
            raise NonFiniteError(f"FSC: the {name} map holds {bad} NaN/Inf value(s)")
    ndim = spatial_ndim(a, ndim)
    fa, fb = fftnc(a, ndim), fftnc(b, ndim)
    num = _shell_sums((fa * fb.conj()).real, ndim)
    den = _shell_sums(fa.abs() ** 2, ndim) * _shell_sums(fb.abs() ** 2, ndim)
    ok = den > 0
    return torch.where(ok, num / torch.sqrt(torch.where(ok, den, 1.0)), 0.0)


def shell_frequencies_a(box: int, pixel_size_a: float, device=None) -> torch.Tensor:
    """Spatial frequency of shells ``0..box // 2``: ``i / (box * pixel_size_a)`` cycles/Å."""
    if pixel_size_a <= 0:
        raise ValueError(f"pixel_size_a must be positive, got {pixel_size_a}")
    return torch.arange(box // 2 + 1, device=device, dtype=torch.float64) / (box * pixel_size_a)


def resolution_at(
    fsc_curve: torch.Tensor, box: int, pixel_size_a: float, threshold: float = 0.143
) -> float:
    """Resolution in Å where ``fsc_curve`` ``(box // 2 + 1,)`` first drops below ``threshold``.

    Shell 0 is ignored. The crossing between shells ``i - 1`` and ``i`` is interpolated linearly
    in frequency; a curve already below the threshold at shell 1 gives shell 1's resolution
    (``box * pixel_size_a``); a curve that never crosses gives Nyquist (``2 * pixel_size_a``).
    """
    curve = fsc_curve.detach().to("cpu", torch.float64)
    if curve.dim() != 1 or curve.shape[0] != box // 2 + 1:
        raise ValueError(
            f"fsc_curve must be (box // 2 + 1,) = ({box // 2 + 1},), got {tuple(fsc_curve.shape)}"
        )
    if pixel_size_a <= 0:
        raise ValueError(f"pixel_size_a must be positive, got {pixel_size_a}")
    if not bool(torch.isfinite(curve).all()):  # NaN compares False: it would read as Nyquist
        raise NonFiniteError(f"the FSC curve holds NaN/Inf at shell(s) "
                             f"{torch.nonzero(~torch.isfinite(curve)).flatten().tolist()}")
    below = torch.nonzero(curve[1:] < threshold).flatten()
    if below.numel() == 0:
        return 2.0 * pixel_size_a
    i = int(below[0]) + 1
    if i == 1:
        shell = 1.0
    else:
        hi, lo = float(curve[i - 1]), float(curve[i])
        shell = (i - 1) + (hi - threshold) / (hi - lo)
    return box * pixel_size_a / shell


def shell_filter(volume: torch.Tensor, weights: torch.Tensor, ndim: int | None = None) -> torch.Tensor:
    """Multiply each Fourier shell of ``volume`` ``(..., d, d, d)`` (or images, ``ndim=2``) by
    ``weights`` ``(..., d // 2 + 1)`` (broadcasting with the leading dims); Fourier pixels beyond
    shell ``d // 2`` (the corners) are zeroed. Real out, same shape."""
    ndim = spatial_ndim(volume, ndim)
    box = volume.shape[-1]
    if weights.shape[-1] != box // 2 + 1:
        raise ValueError(
            f"shell weights must end in box // 2 + 1 = {box // 2 + 1} shells: "
            f"volume.shape = {tuple(volume.shape)} vs weights.shape = {tuple(weights.shape)}"
        )
    w = weights.to(volume.device, volume.real.dtype)
    w = torch.cat([w, torch.zeros_like(w[..., :1])], dim=-1)  # extra shell: the corners
    idx = radial_shell_index(box, ndim, volume.device).clamp(max=box // 2 + 1)
    return ifftnc(fftnc(volume, ndim) * w[..., idx], ndim).real


def fsc_weighted_lowpass(
    volume: torch.Tensor, fsc_curve: torch.Tensor, ndim: int | None = None
) -> torch.Tensor:
    """Multiply each Fourier shell by ``sqrt(2 FSC / (1 + FSC))``, FSC clamped at 0.

    The "FSC-weighted" filter (Rosenthal & Henderson 2003). ``volume`` ``(..., d, d, d)`` (or
    images with ``ndim=2``); ``fsc_curve`` ``(..., d // 2 + 1)`` broadcasting with the leading
    dims. Fourier pixels beyond shell ``d // 2`` (the corners) are zeroed. Real out, same shape.
    """
    f = fsc_curve.to(volume.real.dtype).clamp(min=0.0)
    return shell_filter(volume, torch.sqrt(2.0 * f / (1.0 + f)), ndim)

