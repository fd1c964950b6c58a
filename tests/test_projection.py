"""Projection, back-projection and shifts: physics, adjointness, round trips, odd/even boxes."""

import math

import pytest
import torch

from cryoprior.core.ctf import ctf_2d
from cryoprior.core.fft import fft2c, fft3c, ifft3c, radius_grid
from cryoprior.core.projection import (
    complete_hermitian,
    insert_slices,
    project,
    project_fourier,
    reconstruct,
    shift_images,
    volume_fourier,
)
from cryoprior.core.rotations import euler_to_matrix, random_rotations

BLOBS = [((5.0, -3.0, 2.0), 1.2), ((-4.0, 4.0, 0.0), 1.0), ((0.0, 0.0, -6.0), 1.5)]


def _blob_volume(d, device, blobs=BLOBS):
    c = d // 2
    z, y, x = torch.meshgrid(*[torch.arange(d, dtype=torch.float64, device=device) - c] * 3, indexing="ij")
    vol = sum(torch.exp(-((x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2) / (2 * s * s)) for p, s in blobs)
    return vol.float()


def _analytic_projection(d, rot, device, blobs=BLOBS):
    """A Gaussian blob at p projects to a 2D Gaussian at (A p)_xy with amplitude sqrt(2π)σ."""
    c = d // 2
    yy, xx = torch.meshgrid(*[torch.arange(d, dtype=torch.float64, device=device) - c] * 2, indexing="ij")
    out = torch.zeros(d, d, dtype=torch.float64, device=device)
    for p, s in blobs:
        q = rot @ torch.tensor(p, dtype=torch.float64, device=device)
        out += math.sqrt(2 * math.pi) * s * torch.exp(-((xx - q[0]) ** 2 + (yy - q[1]) ** 2) / (2 * s * s))
    return out


def _bandlimited_volume(d, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    vol = torch.randn(d, d, d, generator=g).to(device)
    r = radius_grid(d, 3, device=device)
    vol = ifft3c(fft3c(vol) * (r < d // 2 - 1)).real
    return vol * (r < d // 2 - 2)


def _shell_fsc(a, b):
    d = a.shape[-1]
    fa, fb = fft3c(a.double()), fft3c(b.double())
    shells = radius_grid(d, 3, device=a.device).round().long()
    out = []
    for s in range(1, d // 2):
        m = shells == s
        num = (fa[m] * fb[m].conj()).sum().real
        out.append((num / torch.sqrt((fa[m].abs() ** 2).sum() * (fb[m].abs() ** 2).sum())).item())
    return torch.tensor(out)


@pytest.mark.parametrize("d", [32, 33])
def test_centred_point_projects_to_centre(d, device):
    vol = _blob_volume(d, device, blobs=[((0.0, 0.0, 0.0), 1.5)])
    rots = random_rotations(16, torch.Generator().manual_seed(0), device=device).float()
    imgs = project(vol, rots)
    flat = imgs.reshape(16, -1).argmax(dim=1)
    assert ((flat // d) == d // 2).all() and ((flat % d) == d // 2).all()


@pytest.mark.parametrize("d", [32, 33])
def test_projection_matches_analytic_gaussians(d, device):
    """I(x, y) = ∫ V(Aᵀ(x, y, z)) dz: off-centre blobs land at (A p)_xy; error < 2% of the peak."""
    vol = _blob_volume(d, device)
    rots = random_rotations(6, torch.Generator().manual_seed(3), device=device)
    imgs = project(vol, rots.float())
    for i in range(6):
        ref = _analytic_projection(d, rots[i], device)
        assert (imgs[i].double() - ref).abs().max() / ref.max() < 0.02


def test_tilt_90_projects_along_x(device):
    """RELION: (rot, tilt) = (0, 90) looks along +x: a blob on the x axis lands on the centre."""
    d = 32
    vol = _blob_volume(d, device, blobs=[((6.0, 0.0, 0.0), 1.5)])
    a = euler_to_matrix(torch.tensor(0.0), torch.tensor(90.0), torch.tensor(0.0)).float().to(device)
    img = project(vol, a[None])[0]
    idx = img.argmax().item()
    assert (idx // d, idx % d) == (d // 2, d // 2)


def test_batched_equals_looped(device):
    vol = _blob_volume(24, device)
    rots = random_rotations(6, torch.Generator().manual_seed(1), device=device).float().reshape(2, 3, 3, 3)
    batched = project(vol, rots)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(batched[i, j], project(vol, rots[i, j][None])[0], atol=1e-5, rtol=0)


def _real_slices(d, b, seed, device):
    """Transforms of real images times astigmatic CTFs (Hermitian), the CTF² weights, rotations."""
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(b, d, d, generator=g, dtype=torch.float64).to(device)
    df = 1.0e4 + 1.0e4 * torch.rand(b, generator=g, dtype=torch.float64)
    ctf = ctf_2d(d, 2.0, df, df * 0.9, torch.rand(b, generator=g, dtype=torch.float64) * 180, dtype=torch.float64).to(device)
    return fft2c(imgs) * ctf, ctf**2, random_rotations(b, g, device=device)


@pytest.mark.parametrize("d", [16, 15])
@pytest.mark.parametrize("pad", [2, 1])
def test_half_insertion_equals_full(d, pad, device):
    """One of each ±k pair inserted, then completed = the full insertion: inside |k| < N/2 - 2
    (even boxes: the unpaired Nyquist samples land beyond), everywhere for odd boxes."""
    slices, w, rots = _real_slices(d, 40, 3, device)
    data, weight = insert_slices(slices, rots, w, pad)
    half_data, half_weight = insert_slices(slices, rots, w, pad, half=True)
    complete_hermitian(half_data, half_weight)
    n = pad * d
    inner = radius_grid(n, 3, device=device) < n / 2 - 2
    torch.testing.assert_close(half_data[inner], data[inner], rtol=0, atol=1e-9 * data.abs().max().item())
    torch.testing.assert_close(half_weight[inner], weight[inner], rtol=0, atol=1e-9 * weight.max().item())
    if d % 2:  # odd: every sample has its mirror on the grid, so equal everywhere
        torch.testing.assert_close(half_weight, weight, rtol=0, atol=1e-9 * weight.max().item())


def test_insertion_looped_equals_batched(device):
    """Image by image (index_add_) and all at once (bincount for dense batches) give the same grids."""
    slices, w, rots = _real_slices(16, 64, 4, device)
    batched = insert_slices(slices, rots, w, 2, half=True)
    looped = (torch.zeros_like(batched[0]), torch.zeros_like(batched[1]))
    for i in range(len(slices)):
        insert_slices(slices[i : i + 1], rots[i : i + 1], w[i : i + 1], 2, out=looped, half=True)
    for a, b in zip(batched, looped, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9 * b.abs().max().item())


def test_insertion_is_adjoint_of_slicing(device):
    """<S(F), G> = <F, Sᵀ(G)> for the trilinear slice operator S and insert_slices = Sᵀ."""
    d, n = 16, 32
    g = torch.Generator().manual_seed(5)
    vol_ft = torch.complex(torch.randn(n, n, n, generator=g, dtype=torch.float64),
                           torch.randn(n, n, n, generator=g, dtype=torch.float64)).to(device)
    slices = torch.complex(torch.randn(4, d, d, generator=g, dtype=torch.float64),
                           torch.randn(4, d, d, generator=g, dtype=torch.float64)).to(device)
    rots = random_rotations(4, g, device=device)
    lhs = (project_fourier(vol_ft, rots, d) * slices.conj()).sum()
    data, _ = insert_slices(slices, rots)
    rhs = (vol_ft * data.conj()).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("d", [32, 33])
def test_project_backproject_round_trip(d, device):
    vol = _bandlimited_volume(d, seed=0, device=device)
    rots = random_rotations(3000, torch.Generator().manual_seed(1), device=device).float()
    rec = reconstruct(project(vol, rots), rots)
    fsc = _shell_fsc(rec, vol)
    assert fsc[: d // 2 - 2].min() > 0.99
    scale = (rec * vol).sum() / (vol * vol).sum()
    assert 0.95 < scale < 1.05  # gridding-corrected amplitudes


def test_shift_moves_content_and_inverts(device):
    d = 32
    img = torch.zeros(d, d, device=device)
    img[d // 2, d // 2] = 1.0
    moved = shift_images(img, torch.tensor([3.0, -2.0], device=device))
    idx = moved.argmax().item()
    assert (idx // d, idx % d) == (d // 2 - 2, d // 2 + 3)  # (row = y, col = x)
    back = shift_images(moved, torch.tensor([-3.0, 2.0], device=device))
    torch.testing.assert_close(back, img, atol=1e-5, rtol=0)


def test_reconstruct_undoes_origin_shifts(device):
    """Images written as shift(projection, −origin) reconstruct when the origins are passed."""
    d = 32
    vol = _bandlimited_volume(d, seed=2, device=device)
    g = torch.Generator().manual_seed(4)
    rots = random_rotations(2000, g, device=device).float()
    origins = ((torch.rand(2000, 2, generator=g) - 0.5) * 6).to(device)
    imgs = shift_images(project(vol, rots), -origins)
    rec = reconstruct(imgs, rots, shifts_px=origins)
    assert _shell_fsc(rec, vol)[: d // 2 - 2].min() > 0.98
    unshifted = reconstruct(imgs, rots)
    assert _shell_fsc(unshifted, vol)[d // 4] < 0.5


def test_volume_fourier_rejects_non_cubic():
    with pytest.raises(ValueError, match=r"\(8, 8, 9\)"):
        volume_fourier(torch.zeros(8, 8, 9))


def test_fft_layout_delta_at_centre_is_flat():
    for d in (8, 9):
        x = torch.zeros(d, d)
        x[d // 2, d // 2] = 1
        torch.testing.assert_close(fft2c(x), torch.ones(d, d, dtype=torch.complex64))
