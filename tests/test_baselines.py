"""Classical denoisers raise PSNR on simulated particles, NLM lowers total variation."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from cryoprior.classical import available, denoise, estimate_noise_sigma, nlm, wiener_filter
from cryoprior.core.metrics import psnr

HAS_BM3D = importlib.util.find_spec("bm3d") is not None


@pytest.fixture(scope="module")
def pair(simulate_pair):
    """24 noisy particles at SNR 0.5 and their clean images, box 32."""
    return simulate_pair(box=32, n=24, views=4, snr=0.5, seed=1)


@pytest.fixture(scope="module")
def denoised(pair):
    noisy, _ = pair
    before = noisy.copy()
    out = {method: denoise(noisy, method) for method in ("nlm", "lowpass", "wiener")}
    np.testing.assert_array_equal(noisy, before)  # inputs are never changed in place
    return out


def _psnr(x, clean):
    return float(psnr(torch.from_numpy(x), torch.from_numpy(clean)).mean())


def _tv(x):
    return float(np.abs(np.diff(x, axis=-1)).sum() + np.abs(np.diff(x, axis=-2)).sum())


@pytest.mark.parametrize("method", ["nlm", "lowpass", "wiener"])
def test_denoisers_raise_psnr(pair, denoised, method):
    noisy, clean = pair
    out = denoised[method]
    assert out.dtype == np.float32 and out.shape == noisy.shape
    assert _psnr(out, clean) > _psnr(noisy, clean) + 3.0  # dB


def test_nlm_lowers_total_variation(pair, denoised):
    assert _tv(denoised["nlm"]) < 0.5 * _tv(pair[0])


def test_nlm_batched_equals_looped_and_keeps_constants(pair):
    noisy, _ = pair
    batched = nlm(noisy[:4], search_size=5, chunk=3)
    looped = np.stack([nlm(img, search_size=5) for img in noisy[:4]])
    np.testing.assert_allclose(batched, looped, rtol=1e-5, atol=1e-5)
    flat = np.full((2, 17, 17), 3.0, dtype=np.float32)
    np.testing.assert_allclose(nlm(flat, sigma=1.0), flat, rtol=1e-6)


def test_noise_sigma_estimate_on_pure_noise():
    noise = np.random.default_rng(0).normal(scale=2.0, size=(8, 64, 64)).astype(np.float32)
    np.testing.assert_allclose(estimate_noise_sigma(noise), 2.0, rtol=0.1)


def test_wiener_filter_passes_signal_and_stops_noise(pair):
    noisy, _ = pair
    h = wiener_filter(torch.from_numpy(noisy))
    assert h[1] > 0.8 and h[-1] < 0.2  # low frequencies kept, Nyquist suppressed
    noise = torch.from_numpy(np.random.default_rng(1).normal(size=(16, 32, 32)).astype(np.float32))
    assert float(wiener_filter(noise).max()) < 0.35  # nothing to keep in pure noise


def test_available_and_unknown_methods():
    assert {"nlm", "lowpass", "wiener"} <= set(available())
    assert ("bm3d" in available()) == HAS_BM3D
    with pytest.raises(ValueError, match="unknown denoiser"):
        denoise(np.zeros((1, 8, 8), np.float32), "tv")
    with pytest.raises(ValueError, match="expected images"):
        denoise(np.zeros((2, 8, 9), np.float32), "lowpass")


@pytest.mark.skipif(HAS_BM3D, reason="bm3d is installed")
def test_bm3d_without_package_says_how_to_install():
    with pytest.raises(ImportError, match="pip install bm3d"):
        denoise(np.zeros((1, 8, 8), np.float32), "bm3d")


@pytest.mark.skipif(not HAS_BM3D, reason="optional bm3d package not installed")
def test_bm3d_raises_psnr(pair):
    noisy, clean = pair
    assert _psnr(denoise(noisy[:4], "bm3d"), clean[:4]) > _psnr(noisy[:4], clean[:4]) + 3.0
