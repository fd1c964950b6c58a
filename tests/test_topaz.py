"""Topaz-Denoise (optional GPL-3 extra) as a baseline: raises PSNR at SNR 0.1 in the input's units,
equals topaz's own ``denoise_image`` per image, follows the input's scale and offset, and says how
to install it when missing."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from cryoprior import classical
from cryoprior.classical import available, denoise, topaz_baseline
from cryoprior.core.metrics import psnr

MISSING = topaz_baseline.topaz_missing()
needs_topaz = pytest.mark.skipif(MISSING is not None, reason=f"optional topaz-em not usable: {MISSING}")


@pytest.fixture(scope="module")
def pair(simulate_pair):
    """16 noisy images of 1AKE (four views) at SNR 0.1 and their clean images, box 32, 2 Å/px."""
    return simulate_pair(box=32, n=16, views=4, snr=0.1, seed=3)


def _psnr(x, clean):
    return float(psnr(torch.from_numpy(x), torch.from_numpy(clean)).mean())


@needs_topaz
def test_topaz_raises_psnr_in_input_units(pair):
    noisy, clean = pair
    before = noisy.copy()
    out = denoise(noisy, "topaz")
    np.testing.assert_array_equal(noisy, before)  # the input is not changed in place
    assert out.dtype == np.float32 and out.shape == noisy.shape
    assert "topaz" in available()
    # plain PSNR against the clean images in the data's units (no fit); raw is near 1 dB here
    assert _psnr(out, clean) > _psnr(noisy, clean) + 8.0


@needs_topaz
def test_topaz_follows_scale_and_offset(pair):
    noisy, _ = pair
    out = denoise(noisy[:4], "topaz")
    scaled = denoise(noisy[:4] * 10.0 + 3.0, "topaz")
    np.testing.assert_allclose(scaled, out * 10.0 + 3.0, rtol=1e-4, atol=1e-3 * float(np.abs(out).max()) * 10)
    flat = np.full((1, 32, 32), 2.5, np.float32)
    np.testing.assert_allclose(denoise(flat, "topaz"), flat, rtol=1e-6)  # a constant image stays constant


@needs_topaz
def test_topaz_equals_topaz_denoise_image(pair, device):
    """Batched here (on each device) = ``topaz denoise``'s per-micrograph path with its defaults,
    image by image on the CPU."""
    from topaz.denoise import Denoise, denoise_image

    noisy, _ = pair
    net = topaz_baseline._load("unet", torch.device("cpu"))
    reference = Denoise(torch.nn.Sequential(net))  # (topaz's type check accepts Sequential, not subclasses)
    want = np.stack([denoise_image(img.copy(), [reference], lowpass=1, cutoff=0, patch_size=1024, padding=500)
                     for img in noisy[:3]])
    got = denoise(noisy[:3], "topaz", batch_size=2, device=device)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


@needs_topaz
def test_topaz_model_choice(pair):
    noisy, _ = pair
    assert set(topaz_baseline.pretrained_models()) >= {"unet", "unet-small", "fcnn", "affine"}
    a = denoise(noisy[:2], "topaz", model="affine")
    assert not np.allclose(a, denoise(noisy[:2], "topaz"))  # another network, another estimate
    with pytest.raises(ValueError, match="unknown Topaz model"):
        denoise(noisy[:2], "topaz", model="no-such-model")
    with pytest.raises(ValueError, match="3D"):
        denoise(noisy[:2], "topaz", model="unet-3d")


def test_topaz_missing_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "topaz" else real(name, *a))
    assert "topaz" not in available()
    with pytest.raises(ImportError, match=r"GPL-3.*pip install --no-deps topaz-em h5py"):
        denoise(np.zeros((1, 8, 8), np.float32), "topaz")
    assert "topaz" in classical.DENOISERS  # known, only unavailable
