"""Rotations: RELION ZYZ Euler angles ↔ matrices, and uniform sampling on SO(3).

Convention (RELION, XMIPP, SPIDER, FREALIGN; Heymann et al. 2005): angles in degrees,
``rot`` about Z, then ``tilt`` about the new Y, then ``psi`` about the new Z. The matrix
``A = euler_to_matrix(rot, tilt, psi)`` is RELION's ``Euler_angles2matrix``: it rotates the
reference into the observation. A vector is ``(x, y, z)``; volumes are indexed ``[z, y, x]``.

The projection of a volume V at A (``core.projection``) is the image
``I(x, y) = ∫ V(Aᵀ (x, y, z)) dz``, i.e. in Fourier space ``Î(k) = V̂(Aᵀ (kx, ky, 0))``, as
RELION's ``Projector::project`` samples the 3D transform at ``A⁻¹ (x, y, 0)``.

Known values (also in the tests)::

    >>> import torch
    >>> euler_to_matrix(torch.tensor(90.), torch.tensor(0.), torch.tensor(0.)).round().int()
    tensor([[ 0,  1,  0],
            [-1,  0,  0],
            [ 0,  0,  1]], dtype=torch.int32)
"""

from __future__ import annotations

import math

import torch


def euler_to_matrix(rot_deg: torch.Tensor, tilt_deg: torch.Tensor, psi_deg: torch.Tensor) -> torch.Tensor:
    """RELION ZYZ Euler angles (degrees) → rotation matrices.

    rot_deg, tilt_deg, psi_deg: ``(...)`` broadcastable tensors. Returns ``(..., 3, 3)``.
    """
    rot_deg, tilt_deg, psi_deg = torch.broadcast_tensors(
        torch.as_tensor(rot_deg), torch.as_tensor(tilt_deg), torch.as_tensor(psi_deg)
    )
    if not rot_deg.is_floating_point():
        rot_deg, tilt_deg, psi_deg = rot_deg.double(), tilt_deg.double(), psi_deg.double()
    a, b, g = torch.deg2rad(rot_deg), torch.deg2rad(tilt_deg), torch.deg2rad(psi_deg)
    ca, sa, cb, sb, cg, sg = a.cos(), a.sin(), b.cos(), b.sin(), g.cos(), g.sin()
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    row0 = torch.stack([cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb], dim=-1)
    row1 = torch.stack([-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb], dim=-1)
    row2 = torch.stack([sc, ss, cb], dim=-1)
    return torch.stack([row0, row1, row2], dim=-2)  # (..., 3, 3)


def matrix_to_euler(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rotation matrices ``(..., 3, 3)`` → RELION (rot, tilt, psi) in degrees, tilt in [0, 180].

    Inverse of :func:`euler_to_matrix` (RELION's ``Euler_matrix2angles``); at tilt 0 or 180 the
    rotation is assigned wholly to psi.
    """
    if matrix.shape[-2:] != (3, 3):
        raise ValueError(f"expected (..., 3, 3) matrices, got shape {tuple(matrix.shape)}")
    m = matrix
    abs_sb = torch.sqrt(m[..., 0, 2] ** 2 + m[..., 1, 2] ** 2)
    eps = 16 * torch.finfo(m.dtype).eps
    regular = abs_sb > eps
    tilt = torch.atan2(abs_sb, m[..., 2, 2])
    rot = torch.where(regular, torch.atan2(m[..., 2, 1], m[..., 2, 0]), torch.zeros_like(tilt))
    psi_reg = torch.atan2(m[..., 1, 2], -m[..., 0, 2])
    psi_up = torch.atan2(-m[..., 1, 0], m[..., 0, 0])  # tilt = 0
    psi_down = torch.atan2(m[..., 1, 0], -m[..., 0, 0])  # tilt = 180
    psi = torch.where(regular, psi_reg, torch.where(m[..., 2, 2] > 0, psi_up, psi_down))
    tilt = torch.where(regular, tilt, torch.where(m[..., 2, 2] > 0, 0.0 * tilt, math.pi + 0.0 * tilt))
    return torch.rad2deg(rot), torch.rad2deg(tilt), torch.rad2deg(psi)


def quaternion_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """Unit quaternions ``(..., 4)`` as (w, x, y, z) → rotation matrices ``(..., 3, 3)``."""
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    return torch.stack(
        [
            torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            torch.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            torch.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        dim=-2,
    )


def random_rotations(
    n: int, generator: torch.Generator | None = None, dtype=torch.float64, device=None
) -> torch.Tensor:
    """``n`` rotations drawn uniformly (Haar measure) on SO(3): normalised Gaussian quaternions.

    Returns ``(n, 3, 3)``.
    """
    q = torch.randn(n, 4, generator=generator, dtype=dtype)
    return quaternion_to_matrix(q).to(device)


def inplane_rotation(psi_deg: torch.Tensor) -> torch.Tensor:
    """Rotation about Z by psi (RELION's matrix for rot = tilt = 0). ``(...)`` → ``(..., 3, 3)``."""
    psi_deg = torch.as_tensor(psi_deg)
    zero = torch.zeros_like(psi_deg)
    return euler_to_matrix(zero, zero, psi_deg)


def angular_distance_deg(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Geodesic angle (degrees) between rotation matrices ``(..., 3, 3)``: arccos((tr(AᵀB) − 1)/2)."""
    tr = (a * b).sum(dim=(-2, -1))
    return torch.rad2deg(torch.arccos(((tr - 1) / 2).clamp(-1.0, 1.0)))


def viewing_direction_distance_deg(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Angle (degrees) between projection directions (third rows of A), ignoring in-plane psi."""
    cos = (a[..., 2, :] * b[..., 2, :]).sum(-1)
    return torch.rad2deg(torch.arccos(cos.clamp(-1.0, 1.0)))


def rotate_images(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Images ``(b, c, h, w)`` rotated in-plane about their centre by ``angles`` ``(b,)`` (radians,
    bilinear, reflection at the border); ``angles`` then ``-angles`` gives the image back, up to
    interpolation."""
    cos, sin = torch.cos(angles), torch.sin(angles)
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], -1), torch.stack([sin, cos, zero], -1)], 1)  # (b, 2, 3)
    grid = torch.nn.functional.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
