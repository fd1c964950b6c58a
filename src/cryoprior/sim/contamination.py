"""Huber contamination of (noisy image, reference) pairs, the robust-GAN paper's three types.

A fraction ε of the pairs is contaminated: type **A** replaces the reference by pure noise,
**B** the noisy image, **C** both. Pure noise is white Gaussian with the mean and standard
deviation of the whole stack it replaces (so the contaminated images cannot be told apart by
their intensity statistics). The simulator (``sim.dataset``, ``--contamination``) writes the
same three types into its ``clean.mrcs``/``particles.mrcs`` and flags them in ``cpContaminated``;
:func:`contaminate_pairs` applies them to pairs in memory (``denoise train --contamination``).
"""

from __future__ import annotations

import numpy as np

TYPES = ("A", "B", "C")


def contamination_mask(n: int, epsilon: float, seed: int = 0) -> np.ndarray:
    """Boolean ``(n,)``: exactly ``round(ε · n)`` rows, chosen at random."""
    if not 0 <= epsilon <= 1:
        raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(seed).permutation(n)[: int(round(epsilon * n))]] = True
    return mask


def _pure_noise(like: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    mean, std = float(like.mean(dtype=np.float64)), float(like.std(dtype=np.float64))
    return (mean + std * rng.standard_normal((count, *like.shape[1:]))).astype(like.dtype)


def contaminate_pairs(
    noisy: np.ndarray, refs: np.ndarray, kind: str | None, epsilon: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Copies of ``noisy`` and ``refs`` ``(n, d, d)`` with type ``kind`` contamination of a fraction
    ``epsilon``, and the mask ``(n,)`` of contaminated pairs. ``kind=None``: unchanged copies."""
    noisy, refs = np.array(noisy, copy=True), np.array(refs, copy=True)
    if noisy.shape != refs.shape:
        raise ValueError(f"noisy {noisy.shape} and references {refs.shape} differ in shape")
    if kind is None:
        return noisy, refs, np.zeros(len(noisy), dtype=bool)
    if kind not in TYPES:
        raise ValueError(f"contamination type must be one of {TYPES}, got {kind!r}")
    mask = contamination_mask(len(noisy), epsilon, seed)
    rng = np.random.default_rng(seed + 1)
    k = int(mask.sum())
    if k and kind in ("A", "C"):
        refs[mask] = _pure_noise(refs, k, rng)
    if k and kind in ("B", "C"):
        noisy[mask] = _pure_noise(noisy, k, rng)
    return noisy, refs, mask
