"""RELION ZYZ Euler angles: known matrices, composition, round trips, uniformity."""

import math

import pytest
import torch

from cryoprior.core.rotations import (
    angular_distance_deg,
    euler_to_matrix,
    matrix_to_euler,
    random_rotations,
)


def _rz(a):  # RELION's rotation about Z by a (degrees): rotates the reference frame
    c, s = math.cos(math.radians(a)), math.sin(math.radians(a))
    return torch.tensor([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)


def _ry(b):
    c, s = math.cos(math.radians(b)), math.sin(math.radians(b))
    return torch.tensor([[c, 0.0, -s], [0.0, 1.0, 0.0], [s, 0.0, c]], dtype=torch.float64)


@pytest.mark.parametrize(
    "angles, matrix",
    [
        ((90.0, 0.0, 0.0), [[0, 1, 0], [-1, 0, 0], [0, 0, 1]]),
        ((0.0, 90.0, 0.0), [[0, 0, -1], [0, 1, 0], [1, 0, 0]]),
        ((0.0, 0.0, 90.0), [[0, 1, 0], [-1, 0, 0], [0, 0, 1]]),
        ((0.0, 180.0, 0.0), [[-1, 0, 0], [0, 1, 0], [0, 0, -1]]),
    ],
)
def test_known_relion_matrices(angles, matrix):
    a = euler_to_matrix(*(torch.tensor(x, dtype=torch.float64) for x in angles))
    torch.testing.assert_close(a, torch.tensor(matrix, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("rot, tilt, psi", [(30.0, 60.0, 45.0), (-150.0, 120.0, 10.0), (200.0, 5.0, -80.0)])
def test_matrix_is_psi_tilt_rot_composition(rot, tilt, psi):
    """RELION: A = Rz(psi) · Ry(tilt) · Rz(rot); the viewing direction is A's third row."""
    a = euler_to_matrix(torch.tensor(rot, dtype=torch.float64), torch.tensor(tilt, dtype=torch.float64),
                        torch.tensor(psi, dtype=torch.float64))
    torch.testing.assert_close(a, _rz(psi) @ _ry(tilt) @ _rz(rot), atol=1e-12, rtol=0)
    r, t = math.radians(rot), math.radians(tilt)
    direction = torch.tensor([math.sin(t) * math.cos(r), math.sin(t) * math.sin(r), math.cos(t)],
                             dtype=torch.float64)
    torch.testing.assert_close(a[2], direction, atol=1e-12, rtol=0)


def test_euler_round_trip_and_orthonormal():
    rots = random_rotations(2000, torch.Generator().manual_seed(0))
    eye = torch.eye(3, dtype=torch.float64).expand(2000, 3, 3)
    torch.testing.assert_close(rots @ rots.transpose(-1, -2), eye, atol=1e-12, rtol=0)
    assert torch.allclose(torch.linalg.det(rots), torch.ones(2000, dtype=torch.float64))
    rot, tilt, psi = matrix_to_euler(rots)
    assert (tilt >= 0).all() and (tilt <= 180).all()
    torch.testing.assert_close(euler_to_matrix(rot, tilt, psi), rots, atol=1e-10, rtol=0)


def test_degenerate_tilts_round_trip():
    for tilt in (0.0, 180.0):
        a = euler_to_matrix(torch.tensor(40.0, dtype=torch.float64), torch.tensor(tilt, dtype=torch.float64),
                            torch.tensor(25.0, dtype=torch.float64))
        torch.testing.assert_close(euler_to_matrix(*matrix_to_euler(a)), a, atol=1e-10, rtol=0)


def test_batched_equals_looped():
    g = torch.Generator().manual_seed(1)
    angles = torch.rand(3, 7, 3, generator=g, dtype=torch.float64) * 360 - 180
    batched = euler_to_matrix(angles[..., 0], angles[..., 1], angles[..., 2])
    for i in range(3):
        for j in range(7):
            torch.testing.assert_close(batched[i, j], euler_to_matrix(*angles[i, j]))


def test_random_rotations_are_uniform():
    """Haar measure: viewing directions uniform on the sphere (cos tilt uniform on [-1, 1]), and the
    rotation angle θ has density (1 − cos θ)/π, i.e. mean angle π/2 + 2/π."""
    rots = random_rotations(200_000, torch.Generator().manual_seed(2))
    cos_tilt = rots[:, 2, 2]
    hist = torch.histc(cos_tilt, bins=10, min=-1, max=1) / len(cos_tilt)
    assert (hist - 0.1).abs().max() < 0.005
    theta = torch.deg2rad(angular_distance_deg(rots, torch.eye(3, dtype=torch.float64)))
    assert abs(theta.mean().item() - (math.pi / 2 + 2 / math.pi)) < 0.01
