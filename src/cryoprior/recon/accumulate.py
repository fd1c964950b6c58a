"""Back-projection into the M-step's accumulators (Kimanius et al. 2020, eq. 9).

``B = Σ_i CTF_i · Î_i / σ²`` and ``K = Σ_i CTF_i² / σ²`` on the padded, centred 3D Fourier grid of
:mod:`cryoprior.core.projection` (``N = pad · d``), by trilinear insertion at each image's pose.
The M-step that turns them into a map is :mod:`cryoprior.recon.mstep`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cryoprior.core.fft import fft2c
from cryoprior.core.fsc import radial_shell_index
from cryoprior.core.projection import complete_hermitian, insert_slices, shift_phase


@dataclass
class Accumulator:
    """Numerator ``data`` (B, ``(N, N, N)`` complex) and ``weight`` (K, real) for a ``box`` map."""

    data: torch.Tensor
    weight: torch.Tensor
    box: int
    pad: int

    @classmethod
    def zeros(cls, box: int, pad: int = 2, device=None, dtype=torch.float32) -> Accumulator:
        n = pad * box
        cdtype = torch.complex64 if dtype == torch.float32 else torch.complex128
        return cls(
            torch.zeros(n, n, n, dtype=cdtype, device=device),
            torch.zeros(n, n, n, dtype=dtype, device=device),
            box,
            pad,
        )

    def __add__(self, other: Accumulator) -> Accumulator:
        if (self.box, self.pad) != (other.box, other.pad):
            raise ValueError(f"cannot add accumulators of box/pad {self.box}/{self.pad} and {other.box}/{other.pad}")
        return Accumulator(self.data + other.data, self.weight + other.weight, self.box, self.pad)

    def complete_hermitian(self) -> Accumulator:
        """Finish insertions made with ``backproject(..., half=True)`` (in place; returns self)."""
        complete_hermitian(self.data, self.weight)
        return self


def backproject(
    images: torch.Tensor,
    rotations: torch.Tensor,
    ctf: torch.Tensor | None = None,
    shifts_px: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    noise_var: torch.Tensor | None = None,
    out: Accumulator | None = None,
    pad: int = 2,
    fourier: bool = False,
    half: bool = False,
) -> Accumulator:
    """Insert images at poses into ``B`` and ``K`` (eq. 9). Accumulates into ``out`` when given.

    images ``(b, d, d)`` real (or their ``fft2c`` with ``fourier=True``); rotations ``(b, 3, 3)``;
    ctf ``(b, d, d)`` centred or None; shifts_px ``(b, 2)`` the origin offsets (undone before
    insertion, see ``core.projection``); weights ``(b,)`` pose probabilities; noise_var
    ``(d // 2 + 1,)`` σ² per 2D shell (B and K are divided by it). ``half``: insert one of each
    Hermitian pair only (real images: half the work); call ``out.complete_hermitian()`` once
    after the last image (see ``core.projection.insert_slices``).
    """
    if images.ndim != 3 or rotations.shape != (images.shape[0], 3, 3):
        raise ValueError(
            f"expected images (b, d, d) and rotations (b, 3, 3), got {tuple(images.shape)} and "
            f"{tuple(rotations.shape)}"
        )
    b, d, _ = images.shape
    acc = out if out is not None else Accumulator.zeros(d, pad, images.device, images.real.dtype)
    if acc.box != d:
        raise ValueError(f"accumulator box {acc.box} != image box {d}")
    rdtype = acc.weight.dtype
    f = images.to(acc.data.dtype) if fourier else fft2c(images.to(rdtype))
    if shifts_px is not None:
        f = f * shift_phase(shifts_px, d, dtype=rdtype)
    w = torch.ones(b, d, d, dtype=rdtype, device=images.device)
    if ctf is not None:
        f = f * ctf
        w = w * ctf.to(rdtype) ** 2
    scale = torch.ones(b, 1, 1, dtype=rdtype, device=images.device)
    if weights is not None:
        scale = scale * weights.to(rdtype)[:, None, None]
    if noise_var is not None:
        shells = radial_shell_index(d, 2, images.device).clamp(max=d // 2)
        inv = 1.0 / noise_var.to(images.device, rdtype).clamp(min=torch.finfo(rdtype).tiny)
        scale = scale * inv[shells]  # (b, d, d)
    insert_slices(f * scale, rotations.to(rdtype), w * scale, acc.pad, out=(acc.data, acc.weight), half=half)
    return acc
