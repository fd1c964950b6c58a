"""Class averages: the mean image of each class, streamed over chunks if need be.

>>> sums, counts = class_sums(images, labels, k)          # doctest: +SKIP
>>> averages = averages_from_sums(sums, counts)           # (k, d, d); empty classes are zeros
"""

from __future__ import annotations

import numpy as np
from scipy import sparse


def _check(images: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise ValueError(
            f"expected images (n, d, d) and labels (n,): images.shape = {images.shape} "
            f"vs labels.shape = {labels.shape}"
        )
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if labels.size and (labels.min() < 0 or labels.max() >= k or not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(f"labels must be integers in 0..{k - 1}, got {labels.min()}..{labels.max()}")
    return images, labels


def class_sums(images, labels, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class sums ``(k, d, d)`` float64 and counts ``(k,)`` int64 of images ``(n, d, d)``."""
    images, labels = _check(images, labels, k)
    n, h, w = images.shape
    onehot = sparse.csr_matrix((np.ones(n), (labels, np.arange(n))), shape=(k, n))  # (k, n)
    sums = onehot @ images.reshape(n, h * w).astype(np.float64)  # (k, d*d)
    counts = np.bincount(labels, minlength=k).astype(np.int64)
    return np.asarray(sums).reshape(k, h, w), counts


def averages_from_sums(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Means ``(k, d, d)`` float32 from :func:`class_sums` (accumulated); zeros where a count is 0."""
    c = np.maximum(counts, 1).astype(np.float64)[:, None, None]
    return (sums / c).astype(np.float32)


def class_averages(images, labels, k: int) -> np.ndarray:
    """Mean image of each class ``0..k-1``: images ``(n, d, d)``, labels ``(n,)`` → ``(k, d, d)``.

    An empty class gives a zero image.
    """
    return averages_from_sums(*class_sums(images, labels, k))


def ctf_class_sums(images, ctfs, labels, k: int, flipped: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per-class Wiener numerators and denominators of images ``(n, d, d)`` with their centred
    CTFs ``(n, d, d)`` (``core.ctf.ctf_2d``): ``(sum F(x)·ctf (k, d, d) complex128, sum ctf² (k, d, d))``.

    ``flipped``: the images are already phase-flipped (``core.ctf.phase_flip``), so ``F(x)·|ctf|``
    is summed (the same thing for the unflipped image).
    """
    import torch

    from cryoprior.core.fft import fft2c

    images, labels = _check(images, labels, k)
    ctfs = np.asarray(ctfs)
    if ctfs.shape != images.shape:
        raise ValueError(f"ctfs must match the images: ctfs.shape = {ctfs.shape} vs images.shape = {images.shape}")
    f = fft2c(torch.as_tensor(images, dtype=torch.float64)).numpy()
    c = np.abs(ctfs) if flipped else ctfs
    n, h, w = images.shape
    onehot = sparse.csr_matrix((np.ones(n), (labels, np.arange(n))), shape=(k, n))  # (k, n)
    num = onehot @ (f * c).reshape(n, h * w)
    den = onehot @ (ctfs.astype(np.float64) ** 2).reshape(n, h * w)
    return np.asarray(num).reshape(k, h, w), np.asarray(den).reshape(k, h, w)


def wiener_averages_from_sums(num: np.ndarray, den: np.ndarray, counts: np.ndarray,
                              wiener_constant: float = 0.1) -> np.ndarray:
    """CTF-corrected class averages ``(k, d, d)`` float32: ``F⁻¹[sum F(x)·ctf / (sum ctf² + c·n_j)]``
    with a flat regulariser ``c = wiener_constant`` per image (RELION uses the class's spectral
    SNR instead). Without a CTF (ctf ≡ 1) this is the plain mean divided by ``1 + c``."""
    import torch

    from cryoprior.core.fft import ifft2c

    if wiener_constant <= 0:
        raise ValueError(f"wiener_constant must be positive, got {wiener_constant}")
    reg = wiener_constant * np.maximum(counts, 1).astype(np.float64)[:, None, None]
    f = torch.as_tensor(num / (den + reg))
    return ifft2c(f).real.numpy().astype(np.float32)


def half_set_labels(labels, k: int, offset: int = 0) -> np.ndarray:
    """Labels into ``2k`` half-set classes: ``label + k`` for particles at odd global index
    ``offset + i``, so that summing with :func:`ctf_class_sums` over ``2k`` classes gives each
    class's two half sets (rows ``0..k-1`` and ``k..2k-1``)."""
    labels = np.asarray(labels, dtype=np.int64)
    return labels + k * ((offset + np.arange(len(labels))) % 2)


#: RELION's ``--tau2_fudge`` default for 2D classification (its GUI; the refine program's own is 1)
TAU2_FUDGE_2D = 2.0


def ssnr_wiener_averages(num2: np.ndarray, den2: np.ndarray, tau2_fudge: float = TAU2_FUDGE_2D) -> np.ndarray:
    """Class averages ``(k, d, d)`` float32 regularised as RELION regularises its 2D references:
    ``F⁻¹[Σ F(x)·ctf / (Σ ctf² + σ²/(T·τ²))]``, with σ²/τ² per shell estimated from the class's
    own two half sets instead of a flat constant.

    ``num2`` ``(2k, d, d)`` complex and ``den2`` ``(2k, d, d)`` are :func:`ctf_class_sums` over
    :func:`half_set_labels` (``ctf ≡ 1`` without a CTF: ``den`` is then the count). The FRC ``f``
    of the two unregularised half averages gives the spectral SNR of the full average,
    ``SSNR = 2f/(1−f)`` (the half-to-full-set relation RELION uses in ``ml_optimiser.cpp``'s
    ``updateSSNRarrays`` for the gold-standard FSC), and with ``SSNR = τ²·Σctf²/σ²`` the
    regulariser is ``⟨Σ ctf²⟩_shell / (T·SSNR)``. A shell with ``f ≤ 0`` gets no signal (the
    average is zero there), as RELION's τ² = 0 does. ``T`` is RELION's ``--tau2_fudge``.
    """
    import torch

    from cryoprior.core.fft import ifft2c
    from cryoprior.core.fsc import radial_average, radial_shell_index

    if tau2_fudge <= 0:
        raise ValueError(f"tau2_fudge must be positive, got {tau2_fudge}")
    k = len(num2) // 2
    if num2.shape != den2.shape or len(num2) != 2 * k or k == 0:
        raise ValueError(f"need half-set sums (2k, d, d), got {num2.shape} and {den2.shape}")
    num = torch.as_tensor(num2[:k] + num2[k:])  # (k, d, d) complex
    den = torch.as_tensor(den2[:k] + den2[k:], dtype=torch.float64)
    halves = torch.as_tensor(num2) / torch.as_tensor(den2, dtype=torch.float64).clamp(min=1e-12)  # (2k, d, d)
    a, b = halves[:k], halves[k:]
    shell = radial_shell_index(num.shape[-1], 2)
    box = num.shape[-1]
    cross = radial_average((a * b.conj()).real)  # (k, d//2+1)
    power = torch.sqrt(radial_average(a.abs() ** 2) * radial_average(b.abs() ** 2)).clamp(min=1e-30)
    frc = (cross / power).clamp(max=0.999)
    ssnr = torch.where(frc > 0, 2 * frc / (1 - frc), torch.zeros_like(frc))  # (k, d//2+1)
    mean_den = radial_average(den)  # (k, d//2+1)
    reg_shell = torch.where(ssnr > 0, mean_den / (tau2_fudge * ssnr.clamp(min=1e-30)), torch.full_like(ssnr, float("inf")))
    inside = shell <= box // 2
    reg = torch.full_like(den, float("inf"))
    reg[:, inside] = reg_shell[:, shell[inside]]
    f = torch.where(torch.isfinite(reg), num / (den + torch.where(torch.isfinite(reg), reg, 0.0)), torch.zeros_like(num))
    f[:, box // 2, box // 2] = num[:, box // 2, box // 2] / den[:, box // 2, box // 2].clamp(min=1e-12)  # keep the mean
    return ifft2c(f).real.numpy().astype(np.float32)


def ssnr_averages(images, labels, k: int) -> np.ndarray:
    """Class averages ``(k, d, d)`` of images ``(n, d, d)`` without a CTF, regularised per shell by
    their half-set spectral SNR (:func:`ssnr_wiener_averages` with ctf ≡ 1), as RELION's 2D
    references are."""
    images = np.asarray(images, dtype=np.float32)
    num2, den2 = ctf_class_sums(images, np.ones_like(images), half_set_labels(labels, k), 2 * k)
    return ssnr_wiener_averages(num2, den2)
