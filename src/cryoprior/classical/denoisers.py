"""Classical denoisers: non-local means, Gaussian low-pass, Wiener filter; BM3D and Topaz (optional).

All take images ``(n, d, d)`` (or one ``(d, d)``), array or tensor, and return float32 numpy of
the same shape; nothing is changed in place. Noise is assumed additive; its standard deviation
``sigma`` is estimated per image, when not given, from the finest diagonal Haar wavelet band
(Donoho's ``median(|HH|) / 0.6745``, as scikit-image's ``estimate_sigma``), which signal barely
reaches at the SNRs of cryo-EM.

- ``nlm``: non-local means (Buades et al. 2005), vectorised over images and search offsets;
  weights ``exp(-max(d2 - 2 sigma^2, 0) / h^2)`` with ``d2`` the mean squared difference of
  ``patch_size``² patches and ``h = h_factor * sigma`` (scikit-image's formula).
- ``lowpass``: Gaussian blur with ``sigma_px`` pixels (``core.filters.gaussian_lowpass``).
- ``wiener``: one filter for the stack, ``H(r) = S(r) / (S(r) + N(r))`` per Fourier shell, with
  the noise power ``N`` white at ``sigma^2`` (or a given / background-estimated PSD) and the
  signal power ``S = max(P - N, 0)`` from the stack's mean power spectrum ``P``.
- ``bm3d``: the ``bm3d`` package (non-commercial licence, an optional extra that cryoprior never
  requires) per image, with the estimated ``sigma``.
- ``topaz``: Topaz-Denoise's pretrained network (GPL-3 ``topaz-em``, an optional extra) per image,
  as ``topaz denoise`` does a micrograph (``classical.topaz_baseline``); ``model=`` picks another
  pretrained model than ``unet``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from cryoprior.classical.topaz_baseline import topaz_denoise, topaz_missing
from cryoprior.core.fft import fft2c, ifft2c
from cryoprior.core.filters import estimate_noise_psd, gaussian_lowpass
from cryoprior.core.fsc import radial_average, radial_shell_index


def _as_images(images) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``(n, d, d)`` float32 tensor (a copy) and the caller's shape."""
    x = images.detach().cpu() if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))
    shape = tuple(x.shape)
    if x.dim() == 2:
        x = x[None]
    if x.dim() != 3 or x.shape[-1] != x.shape[-2] or x.shape[0] == 0:
        raise ValueError(f"expected images (n, d, d) or (d, d), got shape {shape}")
    x = x.to(torch.float32).clone()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("images contain NaN or Inf")
    return x, shape


def _out(x: torch.Tensor, shape: tuple[int, ...]) -> np.ndarray:
    return x.reshape(shape).numpy().astype(np.float32, copy=False)


def _noise_sigma(x: torch.Tensor) -> torch.Tensor:
    """Haar-wavelet (HH band) MAD estimate of white-noise sigma per image. ``(n, d, d)`` → ``(n,)``."""
    e = x.shape[-1] // 2 * 2
    if e < 2:
        raise ValueError(f"images of {x.shape[-1]} px are too small to estimate the noise")
    y = x[:, :e, :e]
    hh = (y[:, 0::2, 0::2] - y[:, 0::2, 1::2] - y[:, 1::2, 0::2] + y[:, 1::2, 1::2]) / 2  # (n, e/2, e/2)
    return hh.abs().reshape(len(x), -1).median(dim=1).values / 0.6745


def estimate_noise_sigma(images) -> np.ndarray:
    """Noise standard deviation per image ``(n,)`` float32 (Haar HH band, ``median(|HH|)/0.6745``)."""
    x, _ = _as_images(images)
    return _noise_sigma(x).numpy()


def _sigmas(x: torch.Tensor, sigma) -> torch.Tensor:
    if sigma is None:
        return _noise_sigma(x)
    s = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1).expand(len(x)).clone()
    if bool((s < 0).any()):
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    return s


def _nlm_chunk(x: torch.Tensor, sigma: torch.Tensor, h: torch.Tensor, patch: int, search: int) -> torch.Tensor:
    b, d, _ = x.shape
    R, P = search // 2, patch // 2
    pad = R + P
    mode = "reflect" if pad < d else "replicate"
    xp = F.pad(x[:, None], (pad, pad, pad, pad), mode=mode)[:, 0]  # (b, d + 2 pad, d + 2 pad)
    halo = d + 2 * P
    centre = xp[:, R : R + halo, R : R + halo]  # (b, d + 2P, d + 2P)
    two_s2 = (2 * sigma**2)[:, None, None]
    inv_h2 = (1.0 / torch.clamp(h**2, min=torch.finfo(x.dtype).tiny))[:, None, None]
    num = torch.zeros_like(x)
    den = torch.zeros_like(x)
    for dy in range(-R, R + 1):
        for dx in range(-R, R + 1):
            shifted = xp[:, R + dy : R + dy + halo, R + dx : R + dx + halo]  # (b, d + 2P, d + 2P)
            dist = F.avg_pool2d(((centre - shifted) ** 2)[:, None], patch, stride=1)[:, 0]  # (b, d, d)
            w = torch.exp(-torch.clamp(dist - two_s2, min=0) * inv_h2)
            num += w * shifted[:, P : P + d, P : P + d]
            den += w
    return num / den


def nlm(
    images,
    sigma=None,
    h_factor: float = 0.8,
    patch_size: int = 5,
    search_size: int = 11,
    chunk: int = 128,
) -> np.ndarray:
    """Non-local means. ``sigma``: noise std (scalar or per image; estimated when None).

    ``patch_size`` and ``search_size`` (odd, pixels) set the compared patches and the window of
    candidate pixels; ``h = h_factor * sigma``. Reflecting borders. Returns float32, input shape.
    """
    if patch_size < 1 or patch_size % 2 == 0 or search_size < 1 or search_size % 2 == 0:
        raise ValueError(f"patch_size and search_size must be odd and positive, got {patch_size}, {search_size}")
    if h_factor <= 0:
        raise ValueError(f"h_factor must be > 0, got {h_factor}")
    x, shape = _as_images(images)
    s = _sigmas(x, sigma)
    out = torch.empty_like(x)
    with torch.no_grad():
        for start in range(0, len(x), chunk):
            sl = slice(start, start + chunk)
            out[sl] = _nlm_chunk(x[sl], s[sl], h_factor * s[sl], patch_size, search_size)
    return _out(out, shape)


def lowpass(images, sigma_px: float = 1.5) -> np.ndarray:
    """Gaussian low-pass, real-space standard deviation ``sigma_px`` pixels (periodic borders)."""
    x, shape = _as_images(images)
    return _out(gaussian_lowpass(x, sigma_px, ndim=2), shape)


def wiener_filter(x: torch.Tensor, noise_psd=None, mask_radius_px: float | None = None) -> torch.Tensor:
    """The stack's radial Wiener filter ``H`` ``(d // 2 + 1,)`` float64 for images ``(n, d, d)``."""
    d = x.shape[-1]
    xd = x.to(torch.float64)
    centred = xd - xd.mean(dim=(-2, -1), keepdim=True)
    power = torch.zeros(d, d, dtype=torch.float64)
    for start in range(0, len(x), 1024):
        power += (fft2c(centred[start : start + 1024]).abs() ** 2).sum(0)
    p = radial_average(power / (len(x) * d * d), ndim=2)  # (d // 2 + 1,)
    if noise_psd is not None:
        noise = torch.as_tensor(noise_psd, dtype=torch.float64).reshape(-1)
        if noise.shape != p.shape:
            raise ValueError(f"noise_psd must have d // 2 + 1 = {len(p)} shells, got {tuple(noise.shape)}")
    elif mask_radius_px is not None:
        noise = estimate_noise_psd(xd, mask_radius_px)
    else:
        noise = torch.full_like(p, float(_noise_sigma(x).median()) ** 2)
    signal = torch.clamp(p - noise, min=0)
    return signal / torch.clamp(signal + noise, min=torch.finfo(torch.float64).tiny)


def wiener(images, noise_psd=None, mask_radius_px: float | None = None) -> np.ndarray:
    """Wiener filter by radial SNR, one filter for the stack (see the module docstring).

    ``noise_psd`` ``(d // 2 + 1,)`` as from ``core.filters.estimate_noise_psd``; else estimated
    from the background outside ``mask_radius_px``; else white at the median Haar ``sigma^2``.
    Image means are kept.
    """
    x, shape = _as_images(images)
    d = x.shape[-1]
    h = wiener_filter(x, noise_psd, mask_radius_px)
    gain = h[radial_shell_index(d, 2).clamp(max=d // 2)].to(torch.float32)  # (d, d)
    out = torch.empty_like(x)
    for start in range(0, len(x), 1024):
        chunk = x[start : start + 1024]
        mean = chunk.mean(dim=(-2, -1), keepdim=True)
        out[start : start + 1024] = ifft2c(fft2c(chunk - mean) * gain).real + mean
    return _out(out, shape)


def bm3d_denoise(images, sigma=None) -> np.ndarray:
    """BM3D (Dabov et al. 2007) per image through the optional ``bm3d`` package."""
    if importlib.util.find_spec("bm3d") is None:
        raise ImportError("BM3D needs the optional bm3d package (non-commercial licence): pip install bm3d")
    import bm3d

    x, shape = _as_images(images)
    s = _sigmas(x, sigma)
    out = np.stack([bm3d.bm3d(img.numpy(), sigma_psd=float(si)) for img, si in zip(x, s)])
    return out.reshape(shape).astype(np.float32)


#: method name -> function(images, **kw) -> float32 images
DENOISERS: dict[str, Callable[..., np.ndarray]] = {
    "nlm": nlm,
    "lowpass": lowpass,
    "wiener": wiener,
    "bm3d": bm3d_denoise,
    "topaz": topaz_denoise,
}


def available() -> list[str]:
    """The denoisers usable here: always nlm, lowpass, wiener; bm3d when its package is installed;
    topaz when ``topaz.denoise`` imports."""
    optional = {"bm3d": lambda: importlib.util.find_spec("bm3d") is not None, "topaz": lambda: topaz_missing() is None}
    return [m for m in DENOISERS if m not in optional or optional[m]()]


def denoise(images, method: str, **kw) -> np.ndarray:
    """Denoise images ``(n, d, d)`` with ``method`` in ``{"nlm", "lowpass", "wiener", "bm3d", "topaz"}``.

    Keyword options go to the method's function. Returns float32 ``(n, d, d)``.
    """
    if method not in DENOISERS:
        raise ValueError(f"unknown denoiser {method!r}; choose from {', '.join(DENOISERS)}")
    return DENOISERS[method](images, **kw)
