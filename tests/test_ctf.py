"""CTF physics against RELION's conventions and closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryoprior.core.ctf import (
    apply_ctf,
    ctf_2d,
    electron_wavelength_a,
    phase_flip,
    wiener_ctf_correct,
)
from cryoprior.core.fft import fft2c


@pytest.mark.parametrize("kv, lam", [(100, 0.037014), (200, 0.025079), (300, 0.019687)])
def test_wavelength_literature(kv, lam):
    assert electron_wavelength_a(kv) == pytest.approx(lam, abs=1e-6)
    t = electron_wavelength_a(torch.tensor([float(kv)], dtype=torch.float64))
    assert float(t[0]) == pytest.approx(lam, abs=1e-6)


def test_wavelength_rejects_nonpositive():
    with pytest.raises(ValueError):
        electron_wavelength_a(0.0)


@pytest.mark.parametrize("box", [64, 65])
@pytest.mark.parametrize("q0", [0.0, 0.07, 0.1])
def test_ctf_at_zero_frequency_is_amplitude_contrast(box, q0):
    c = ctf_2d(box, 1.2, 15000.0, 12000.0, 30.0, amplitude_contrast=q0, dtype=torch.float64)
    assert c.shape == (box, box)
    assert float(c[box // 2, box // 2]) == pytest.approx(q0, abs=1e-12)
    # 90 degrees of phase shift: -sin(-K5 - K3) = cos(K3) = sqrt(1 - Q0^2) at u = 0
    c90 = ctf_2d(box, 1.2, 15000.0, 12000.0, 30.0, amplitude_contrast=q0, phase_shift_deg=90.0,
                 dtype=torch.float64)
    assert float(c90[box // 2, box // 2]) == pytest.approx(math.sqrt(1 - q0**2), abs=1e-12)


def test_first_zero_at_analytic_frequency():
    """Cs = 0, no astigmatism: sin(pi lam df u^2 + K3) = 0 first at u^2 = (pi - K3) / (pi lam df)."""
    box, k, df, q0 = 128, 20, 20000.0, 0.1
    lam = electron_wavelength_a(300.0)
    k3 = math.atan(q0 / math.sqrt(1 - q0**2))
    u0 = math.sqrt((math.pi - k3) / (math.pi * lam * df))
    pixel = k / (box * u0)  # put the zero exactly on Fourier pixel k
    c = ctf_2d(box, pixel, df, df, 0.0, cs_mm=0.0, amplitude_contrast=q0, dtype=torch.float64)
    row = c[box // 2, box // 2 :]  # along +x
    col = c[box // 2 :, box // 2]  # along +y
    assert abs(float(row[k])) < 1e-10 and abs(float(col[k])) < 1e-10
    assert bool((row[:k] > 0).all()) and float(row[k + 1]) < 0
    # isotropic: a diagonal pixel at the same radius has the same value as the axis one
    ring = ctf_2d(box, pixel, df, df, 0.0, cs_mm=0.0, dtype=torch.float64)
    assert float(ring[box // 2 + 12, box // 2 + 16]) == pytest.approx(float(ring[box // 2, box // 2 + 20]))


def test_astigmatism_u_along_angle_v_perpendicular():
    """Angle 0: defocus U along x (last axis), V along y; angle 90 swaps them."""
    box, k, du, dv, q0 = 128, 20, 20000.0, 30000.0, 0.1
    lam = electron_wavelength_a(300.0)
    k3 = math.atan(q0 / math.sqrt(1 - q0**2))
    u0 = math.sqrt((math.pi - k3) / (math.pi * lam * du))
    pixel = k / (box * u0)  # first zero for defocus U on Fourier pixel k
    c, n = box // 2, box // 2 + k
    for angle, (x_zero, y_zero) in [(0.0, (True, False)), (90.0, (False, True))]:
        ctf = ctf_2d(box, pixel, du, dv, angle, cs_mm=0.0, amplitude_contrast=q0, dtype=torch.float64)
        assert (abs(float(ctf[c, n])) < 1e-10) is x_zero
        assert (abs(float(ctf[n, c])) < 1e-10) is y_zero
        # V is larger: its first zero comes earlier, so the V axis is already negative at pixel k
        assert float(ctf[n, c] if x_zero else ctf[c, n]) < 0


def _reference_ctf(box, pixel, du, dv, angle_deg, kv, cs_mm, q0, ps_deg, bfac):
    """Independent float64 numpy form: df(phi) = U cos^2(phi - az) + V sin^2(phi - az)."""
    lam = 12.2643247 / math.sqrt(kv * 1e3 * (1 + 0.978466e-6 * kv * 1e3))
    f = (np.arange(box) - box // 2) / (box * pixel)
    ky, kx = np.meshgrid(f, f, indexing="ij")
    u2 = kx**2 + ky**2
    phi = np.arctan2(ky, kx) - np.deg2rad(angle_deg)
    df = du * np.cos(phi) ** 2 + dv * np.sin(phi) ** 2
    gamma = math.pi * lam * df * u2 - 0.5 * math.pi * cs_mm * 1e7 * lam**3 * u2**2
    w = math.atan(q0 / math.sqrt(1 - q0**2)) + np.deg2rad(ps_deg)
    return np.sin(gamma + w) * np.exp(-bfac * u2 / 4)


@pytest.mark.parametrize("box", [48, 49])
def test_matches_reference_formula_everywhere(box):
    args = (box, 1.7, 14000.0, 11000.0, 37.0, 200.0, 2.0, 0.08, 20.0, 80.0)
    ref = _reference_ctf(*args)
    got = ctf_2d(*args[:5], voltage_kv=200.0, cs_mm=2.0, amplitude_contrast=0.08,
                 phase_shift_deg=20.0, b_factor=80.0, dtype=torch.float64)
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-10)


def test_phase_shift_90_turns_sin_into_cos():
    kw = dict(cs_mm=2.7, amplitude_contrast=0.0, dtype=torch.float64)
    c0 = ctf_2d(64, 1.5, 8000.0, 8000.0, 0.0, **kw)
    c90 = ctf_2d(64, 1.5, 8000.0, 8000.0, 0.0, phase_shift_deg=90.0, **kw)
    torch.testing.assert_close(c0**2 + c90**2, torch.ones_like(c0))
    assert float(c0[32, 32]) == pytest.approx(0.0, abs=1e-12)
    assert float(c90[32, 32]) == pytest.approx(1.0)


def test_b_factor_envelope():
    kw = dict(dtype=torch.float64)
    c0 = ctf_2d(32, 2.0, 10000.0, 9000.0, 10.0, **kw)
    cb = ctf_2d(32, 2.0, 10000.0, 9000.0, 10.0, b_factor=100.0, **kw)
    f = (torch.arange(32, dtype=torch.float64) - 16) / 64.0
    u2 = f[:, None] ** 2 + f[None, :] ** 2
    torch.testing.assert_close(cb, c0 * torch.exp(-100.0 * u2 / 4))


def test_batched_equals_looped():
    du = torch.tensor([[10000.0, 15000.0, 20000.0], [12000.0, 9000.0, 30000.0]])
    dv = du * 0.9
    ang = torch.tensor([0.0, 45.0, 120.0])  # broadcasts against (2, 3)
    ps = torch.tensor([[0.0], [30.0]])
    batched = ctf_2d(33, 1.3, du, dv, ang, phase_shift_deg=ps)
    assert batched.shape == (2, 3, 33, 33) and batched.dtype == torch.float32
    for i in range(2):
        for j in range(3):
            one = ctf_2d(33, 1.3, float(du[i, j]), float(dv[i, j]), float(ang[j]),
                         phase_shift_deg=float(ps[i, 0]))
            torch.testing.assert_close(batched[i, j], one)


def test_bad_parameters_raise():
    with pytest.raises(ValueError, match="broadcast"):
        ctf_2d(16, 1.0, torch.ones(3), torch.ones(4), 0.0)
    with pytest.raises(ValueError):
        ctf_2d(16, 1.0, 1e4, 1e4, 0.0, amplitude_contrast=1.0)
    with pytest.raises(ValueError):
        ctf_2d(16, 0.0, 1e4, 1e4, 0.0)


@pytest.mark.parametrize("box", [40, 41])
def test_apply_and_phase_flip(box):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, box, box, generator=g, dtype=torch.float64)
    ctf = ctf_2d(box, 1.5, torch.tensor([9000.0, 14000.0, 20000.0]), 10000.0, 20.0,
                 dtype=torch.float64)
    y = apply_ctf(x, ctf)
    assert y.shape == x.shape and not y.is_complex()
    # even boxes: the Nyquist row/column (index 0) has no Hermitian partner, compare inside it
    inner = (..., slice(1 - box % 2, None), slice(1 - box % 2, None))
    torch.testing.assert_close(fft2c(y)[inner], (fft2c(x) * ctf)[inner])
    flipped = phase_flip(y, ctf)
    torch.testing.assert_close(fft2c(flipped)[inner], (fft2c(x) * ctf.abs())[inner])
    twice = phase_flip(flipped, ctf)  # flip twice = identity
    torch.testing.assert_close(fft2c(twice)[inner], fft2c(y)[inner])
    if box % 2:
        torch.testing.assert_close(twice, y)
    with pytest.raises(ValueError, match=rf"\(3, {box}, {box}\).*\(32, 32\)"):
        apply_ctf(x, torch.ones(32, 32))


def test_wiener_inverts_ctf_at_high_snr():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 32, 32, generator=g, dtype=torch.float64)
    ctf = ctf_2d(32, 2.0, 5000.0, 5000.0, 0.0, amplitude_contrast=0.3, dtype=torch.float64)
    keep = ctf.abs() > 0.2  # where the CTF is far from zero, Wiener ~ 1 / ctf
    rec = wiener_ctf_correct(apply_ctf(x, ctf), ctf, snr=1e6)
    torch.testing.assert_close(fft2c(rec)[..., keep], fft2c(x)[..., keep], atol=1e-3, rtol=1e-3)
    with pytest.raises(ValueError):
        wiener_ctf_correct(x, ctf, snr=0.0)


def test_inputs_not_modified():
    du = torch.tensor([10000.0, 12000.0])
    before = du.clone()
    ctf_2d(16, 1.0, du, du, 0.0)
    assert torch.equal(du, before)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    du = torch.tensor([10000.0, 20000.0])
    cpu = ctf_2d(32, 1.0, du, du * 0.9, 30.0)
    gpu = ctf_2d(32, 1.0, du.cuda(), du.cuda() * 0.9, 30.0)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=1e-4)
