"""Masks, Fourier filters, whitening, normalisation, downsampling and noise at a given SNR."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from cryoprior.core.fft import fft3c
from cryoprior.core.filters import (
    downsample,
    estimate_noise_psd,
    gaussian_lowpass,
    highpass,
    lowpass,
    normalize_images,
    soft_sphere_mask,
    whiten,
)
from cryoprior.core.fsc import radial_average
from cryoprior.core.noise import add_noise, measure_snr, noise_sigma_for_snr


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _wave(box, kx, ky=0, phase=0.0):
    """cos(2 pi (kx x + ky y) / box + phase), coordinates from the centre box // 2. (box, box)."""
    t = torch.arange(box, dtype=torch.float64) - box // 2
    return torch.cos(2 * math.pi * (kx * t[None, :] + ky * t[:, None]) / box + phase)


# --- masks ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("box", [64, 65])
def test_soft_sphere_mask_values(box):
    c = box // 2
    m = soft_sphere_mask(box, 10.0, 4.0)
    assert m.shape == (box, box) and m.dtype == torch.float32
    assert float(m[c, c]) == 1.0 and float(m[c, c + 10]) == 1.0
    assert float(m[c, c + 12]) == pytest.approx(0.5)  # middle of the cosine edge
    assert float(m[c + 12, c]) == pytest.approx(0.5)
    assert float(m[c, c + 14]) == 0.0 and float(m[0, 0]) == 0.0
    assert bool(((m >= 0) & (m <= 1)).all())
    torch.testing.assert_close(m, m.T)
    hard = soft_sphere_mask(box, 10.0, 0.0)
    assert float(hard[c, c + 10]) == 1.0 and float(hard[c, c + 11]) == 0.0
    m3 = soft_sphere_mask(box, 10.0, 4.0, ndim=3)
    assert m3.shape == (box,) * 3
    assert float(m3[c, c, c]) == 1.0 and float(m3[c + 12, c, c]) == pytest.approx(0.5)
    torch.testing.assert_close(m3[c], m)
    with pytest.raises(ValueError):
        soft_sphere_mask(box, 10.0, 4.0, ndim=4)


# --- Fourier filters -----------------------------------------------------------------------------


@pytest.mark.parametrize("box", [64, 65])
def test_lowpass_keeps_low_removes_high(box):
    low, high = _wave(box, 3, 1, 0.3), _wave(box, 20, -5, 1.1)
    x = torch.stack([low + high, 2 * low])  # (2, d, d)
    out = lowpass(x, cutoff_freq=0.15)  # shell 9.6 (> |(3, 1)| = 3.2, < |(20, 5)| = 20.6)
    torch.testing.assert_close(out, torch.stack([low, 2 * low]))
    torch.testing.assert_close(lowpass(x, 10.0, pixel_size_a=1.5), out)  # 1.5 / 10 = 0.15
    torch.testing.assert_close(highpass(x, cutoff_freq=0.15), torch.stack([high, 0 * low]))
    assert torch.equal(x[0], low + high)  # input untouched
    with pytest.raises(ValueError):
        lowpass(x, 10.0)  # cutoff_a without pixel size
    with pytest.raises(ValueError):
        lowpass(x, 10.0, cutoff_freq=0.1, pixel_size_a=1.0)


def test_lowpass_3d_edge_centred_on_cutoff():
    vol = _randn(20, 20, 20)
    out = lowpass(vol, cutoff_freq=0.25, width_px=2.0, ndim=3)  # shell 5, cosine edge 4..6
    gain = radial_average(fft3c(out).abs() / fft3c(vol).abs(), ndim=3)  # (11,)
    assert float(gain[3]) == pytest.approx(1.0) and float(gain[7]) == pytest.approx(0.0, abs=1e-9)
    assert 0.3 < float(gain[5]) < 0.7
    with pytest.raises(ValueError, match="ndim"):
        lowpass(vol, cutoff_freq=0.25)  # a volume or 20 images: ambiguous


def test_gaussian_lowpass_matches_scipy():
    x = _randn(2, 40, 40, seed=1)
    out = gaussian_lowpass(x, sigma_px=2.0)
    ref = np.stack([ndimage.gaussian_filter(im, 2.0, mode="wrap") for im in x.numpy()])
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-3)
    torch.testing.assert_close(out.sum(dim=(-2, -1)), x.sum(dim=(-2, -1)))  # DC gain 1


# --- whitening and normalisation -----------------------------------------------------------------


def _coloured_noise(n, box, seed):
    """White noise shaped by 1 / (1 + (f / 0.1)^2): power falls ~25x from DC to Nyquist."""
    white = _randn(n, box, box, seed=seed)
    t = torch.arange(box, dtype=torch.float64) - box // 2
    f = torch.sqrt(t[:, None] ** 2 + t[None, :] ** 2) / box
    shape = 1.0 / (1.0 + (f / 0.1) ** 2)
    return torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(
        torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(white))) * shape))).real


def test_whitening_coloured_noise_gives_flat_psd():
    train, test = _coloured_noise(400, 48, seed=2), _coloured_noise(400, 48, seed=3)
    psd = estimate_noise_psd(train)
    assert psd.shape == (25,)
    assert float(psd[1] / psd[-1]) > 10  # really coloured
    white, used = whiten(test, psd)
    assert used is psd and white.shape == test.shape
    flat = estimate_noise_psd(white)[1:]
    assert float((flat - 1.0).abs().max()) < 0.1  # unit variance white noise, within 10 %
    # estimating from the images themselves (and with a background mask) also flattens them
    white_self, _ = whiten(test)
    assert float((estimate_noise_psd(white_self)[1:] - 1).abs().max()) < 0.1
    # background only: the taper blurs the PSD by ~1 shell, so the steep shell 1 is left out
    white_bg, _ = whiten(test, mask_radius_px=14)
    assert float((estimate_noise_psd(white_bg)[2:] - 1).abs().max()) < 0.1


def test_noise_psd_of_white_noise():
    noise = 2.0 * _randn(300, 48, 48, seed=4)
    for radius in (None, 16.0):
        psd = estimate_noise_psd(noise, mask_radius_px=radius)
        torch.testing.assert_close(psd, torch.full_like(psd, 4.0), rtol=0.1, atol=0.0)
    with pytest.raises(ValueError, match="shells"):
        whiten(noise, torch.ones(10))


@pytest.mark.parametrize("box", [32, 33])
def test_normalize_images(box):
    x = 3.0 + 5.0 * _randn(4, box, box, seed=5)
    out = normalize_images(x)
    torch.testing.assert_close(out.mean(dim=(-2, -1)), torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(out.std(dim=(-2, -1), correction=0), torch.ones(4, dtype=torch.float64))
    x_particle = x.clone()
    x_particle[:, box // 2 - 4 : box // 2 + 4, box // 2 - 4 : box // 2 + 4] += 100.0  # bright centre
    out = normalize_images(x_particle, mask_radius_px=10)
    t = torch.arange(box) - box // 2
    bg = (t[:, None] ** 2 + t[None, :] ** 2) > 100
    torch.testing.assert_close(out[:, bg].mean(dim=-1), torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(out[:, bg].std(dim=-1, correction=0), torch.ones(4, dtype=torch.float64))
    assert torch.equal(normalize_images(torch.ones(2, box, box)), torch.zeros(2, box, box))


# --- downsampling --------------------------------------------------------------------------------


@pytest.mark.parametrize("box, new_box", [(64, 32), (65, 33), (64, 33), (45, 30)])
def test_downsample_band_limited_equals_coarse_sampling(box, new_box):
    # integer frequencies well below the new Nyquist: exactly representable on both grids
    waves = [(3, 1, 0.2), (-5, 7, 1.0), (0, 4, 2.5)]
    fine = sum(_wave(box, kx, ky, p) for kx, ky, p in waves) + 0.7
    coarse = sum(_wave(new_box, kx, ky, p) for kx, ky, p in waves) + 0.7
    out = downsample(torch.stack([fine, 2 * fine]), new_box)
    assert out.shape == (2, new_box, new_box)
    torch.testing.assert_close(out, torch.stack([coarse, 2 * coarse]))


@pytest.mark.parametrize("box, new_box", [(24, 12), (25, 16)])
def test_downsample_3d_preserves_mean_and_batches(box, new_box):
    vols = _randn(3, box, box, box, seed=6) + 1.5
    out = downsample(vols, new_box, ndim=3)
    assert out.shape == (3, new_box, new_box, new_box)
    torch.testing.assert_close(out.mean(dim=(-3, -2, -1)), vols.mean(dim=(-3, -2, -1)))
    for i in range(3):
        torch.testing.assert_close(out[i], downsample(vols[i], new_box, ndim=3))
    x = _randn(5, 24, 24)
    assert torch.equal(downsample(x, 24), x)
    with pytest.raises(ValueError, match=r"\(5, 24, 24\)"):
        downsample(x, 30)


# --- noise at a given SNR ------------------------------------------------------------------------


def _clean_stack(n=64, box=64, seed=7):
    blobs = gaussian_lowpass(_randn(n, box, box, seed=seed), sigma_px=3.0, ndim=2)
    return blobs * torch.linspace(0.5, 2.0, n, dtype=torch.float64)[:, None, None]  # varied power


@pytest.mark.parametrize("snr", [0.1, 0.01])
def test_measured_snr_matches_requested(snr):
    clean = _clean_stack()
    noisy, sigma = add_noise(clean, snr, generator=torch.Generator().manual_seed(8))
    assert noisy.shape == clean.shape and sigma.shape == (64,)
    assert float(measure_snr(clean, noisy).mean()) == pytest.approx(snr, rel=0.05)
    torch.testing.assert_close(sigma, noise_sigma_for_snr(clean, snr))
    torch.testing.assert_close(sigma**2 * snr, clean.var(dim=(-2, -1), correction=0))


def test_add_noise_reproducible_and_inf_exact():
    clean = _clean_stack(8, 32)
    a, _ = add_noise(clean, 0.1, generator=torch.Generator().manual_seed(9))
    b, _ = add_noise(clean, 0.1, generator=torch.Generator().manual_seed(9))
    c, _ = add_noise(clean, 0.1, generator=torch.Generator().manual_seed(10))
    assert torch.equal(a, b) and not torch.equal(a, c)
    same, sigma = add_noise(clean, math.inf)
    assert torch.equal(same, clean) and torch.equal(sigma, torch.zeros(8, dtype=torch.float64))
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError):
            add_noise(clean, bad)


def test_per_stack_and_per_image_snr():
    clean = _clean_stack(16, 32)
    var = clean.var(dim=(-2, -1), correction=0)
    sig = noise_sigma_for_snr(clean, 0.5, per_stack=True)
    torch.testing.assert_close(sig, torch.full((16,), float(torch.sqrt(var.mean() / 0.5)),
                                                dtype=torch.float64))
    snrs = torch.linspace(0.05, 1.0, 16, dtype=torch.float64)  # one SNR per image
    torch.testing.assert_close(noise_sigma_for_snr(clean, snrs), torch.sqrt(var / snrs))
    _, s = add_noise(clean.reshape(4, 4, 32, 32), 0.1, per_stack=True)
    assert s.shape == (4, 4) and float(s.std()) == 0.0
    with pytest.raises(ValueError, match=r"\(16, 32, 32\).*\(16, 32, 31\)"):
        measure_snr(clean, clean[..., :31])


@pytest.mark.parametrize("box, new_box", [(32, 64), (32, 45), (31, 64), (16, 40)])
def test_resample_round_trip_is_exact(box, new_box):
    """Fourier padding then cropping gives the map back (an even box's Nyquist plane is split
    between ±N/2 and folded back), keeps the mean, and adds no frequency."""
    from cryoprior.core.filters import resample

    x = torch.randn(box, box, box, generator=torch.Generator().manual_seed(box), dtype=torch.float64)
    up = resample(x, new_box, ndim=3)
    assert up.shape == (new_box,) * 3
    torch.testing.assert_close(resample(up, box, ndim=3), x, rtol=0, atol=1e-12)
    assert float(up.mean()) == pytest.approx(float(x.mean()), abs=1e-12)


def test_normalize_images_does_not_blow_up_rounding_noise():
    from cryoprior.core.filters import normalize_images

    gen = torch.Generator().manual_seed(0)
    flat = torch.full((1, 16, 16), 3.0) + 1e-7 * torch.randn(1, 16, 16, generator=gen)  # constant up to rounding
    signal = torch.randn(2, 16, 16, generator=gen)
    out = normalize_images(torch.cat([flat, signal]))
    assert out[0].abs().max() < 0.1  # not rescaled to unit variance (it would reach ~3)
    torch.testing.assert_close(out[1:].std(dim=(-2, -1), correction=0), torch.ones(2))
    assert torch.equal(normalize_images(torch.zeros(1, 8, 8)), torch.zeros(1, 8, 8))
