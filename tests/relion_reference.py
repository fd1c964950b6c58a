"""Direct numpy transcriptions of RELION 3.1.3's M-step pieces, for parity tests.

Independent of cryoprior's code: loops and formulas as written in RELION's C++ (file:line of
the 3.1.3 tag), on the centred full Fourier grid. Not a test module (no ``test_`` prefix).
"""

from __future__ import annotations

import math

import numpy as np


def relion_round(x):
    """``ROUND`` of ``src/macros.h:195``: halves away from zero."""
    return np.where(x > 0, np.floor(x + 0.5), np.ceil(x - 0.5)).astype(np.int64)


def soft_mask_outside_map(vol: np.ndarray, cosine_width: float = 3.0) -> np.ndarray:
    """``softMaskOutsideMap(vol)`` (``src/mask.cpp:43-97``, radius < 0 → XSIZE / 2), element by
    element, Xmipp origin ``-(d // 2)`` (``FIRST_XMIPP_INDEX``)."""
    vol = np.array(vol, dtype=np.float64)
    d = vol.shape[0]
    o = -(d // 2)
    radius = d / 2.0
    radius_p = radius + cosine_width
    sum_bg = total = 0.0
    for k in range(d):
        for i in range(d):
            for j in range(d):
                r = math.sqrt((k + o) ** 2 + (i + o) ** 2 + (j + o) ** 2)
                if r < radius:
                    continue
                if r > radius_p:
                    total += 1.0
                    sum_bg += vol[k, i, j]
                else:
                    raisedcos = 0.5 + 0.5 * math.cos(math.pi * (radius_p - r) / cosine_width)
                    total += raisedcos
                    sum_bg += raisedcos * vol[k, i, j]
    sum_bg /= total
    out = vol.copy()
    for k in range(d):
        for i in range(d):
            for j in range(d):
                r = math.sqrt((k + o) ** 2 + (i + o) ** 2 + (j + o) ** 2)
                if r < radius:
                    continue
                if r > radius_p:
                    out[k, i, j] = sum_bg
                else:
                    raisedcos = 0.5 + 0.5 * math.cos(math.pi * (radius_p - r) / cosine_width)
                    out[k, i, j] = (1 - raisedcos) * vol[k, i, j] + raisedcos * sum_bg
    return out


def relion_map_weight(weight: np.ndarray, fsc: np.ndarray, pad: int, r_max: float, fudge: float,
                      whole: bool = False, minres_map: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """RELION's regularised weight W' on the centred ``(n, n, n)`` grid and its τ² per shell.

    ``updateSSNRarrays`` (``backprojector.cpp:1041-1122``): σ²_s = N_s / Σ pad³ W over the voxels
    with ``r² < ROUND(r_max · pad)²`` of shell ``s = ROUND(|k| / pad)``; f = max(0.001, FSC),
    joined map: sqrt(2f / (f + 1)), min(0.999, ·); τ²_s = T · f / (1 − f) · σ²_s. Then
    ``reconstruct`` (1420-1451): inside r_max, ``W += 1 / (pad³ · T · τ²_s)`` where s ≥ minres_map
    (τ² = 0: 1 / (0.001 W)). Returns (W', τ²)."""
    n = weight.shape[0]
    c = np.arange(n) - n // 2
    r2 = c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2
    max_r2 = int(relion_round(np.array(r_max * pad))) ** 2
    ires = relion_round(np.sqrt(r2) / pad)
    inside = r2 < max_r2
    half = len(fsc)
    sigma2, counter = np.zeros(half), np.zeros(half)
    np.add.at(sigma2, ires[inside], pad**3 * weight[inside])
    np.add.at(counter, ires[inside], 1.0)
    sigma2 = np.where(sigma2 > 1e-10, counter / np.where(sigma2 > 0, sigma2, 1.0), 0.0)
    f = np.maximum(0.001, fsc)
    if whole:
        f = np.sqrt(2.0 * f / (f + 1.0))
    f = np.minimum(0.999, f)
    tau2 = fudge * f / (1.0 - f) * sigma2
    out = weight.astype(np.float64).copy()
    for idx in zip(*np.nonzero(inside)):
        s = ires[idx]
        if tau2[s] > 0:
            inv = 1.0 / (pad**3 * fudge * tau2[s])
        else:
            inv = 1.0 / (0.001 * weight[idx]) if weight[idx] > 1e-20 else 0.0
        if s >= minres_map:
            out[idx] += inv
    return out, tau2
