"""Denoising baselines: non-local means, Gaussian low-pass, Wiener; BM3D and Topaz-Denoise (optional).

>>> denoised = denoise(images, "nlm")        # (n, d, d) float32 in and out   # doctest: +SKIP
>>> available()                              # ['nlm', 'lowpass', 'wiener'] (+ 'bm3d', 'topaz' if installed)  # doctest: +SKIP
"""

from cryoprior.classical.denoisers import (
    DENOISERS,
    available,
    bm3d_denoise,
    denoise,
    estimate_noise_sigma,
    lowpass,
    nlm,
    topaz_denoise,
    wiener,
    wiener_filter,
)

__all__ = [
    "DENOISERS",
    "available",
    "bm3d_denoise",
    "denoise",
    "estimate_noise_sigma",
    "lowpass",
    "nlm",
    "topaz_denoise",
    "wiener",
    "wiener_filter",
]
