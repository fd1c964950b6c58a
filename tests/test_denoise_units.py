"""Denoisers return the clean image in the input's intensity units (plain PSNR, no fit)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cryoprior.core.metrics import psnr
from cryoprior.nn.cdae_ops import normalize
from cryoprior.nn.denoiser import denoise_images, to_input_units
from cryoprior.nn.models.cdae import ConvAEBlock
from cryoprior.nn.training import fit_pairs

sys.path.insert(0, str(Path(__file__).parent))
from test_cdae import _noisy_set  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def _plain_psnr(x, ref) -> float:
    return float(psnr(torch.as_tensor(np.asarray(x)), torch.as_tensor(np.asarray(ref))).mean())


def test_identity_on_clean_images_returns_them_unchanged_in_scale():
    _, clean, _ = _noisy_set(16, snr=1.0, seed=0)
    scaled = 250.0 * clean + 40.0  # arbitrary detector units
    out = denoise_images(nn.Identity(), scaled, precision="fp32")
    np.testing.assert_allclose(out, scaled.numpy(), rtol=0, atol=2e-3 * float(scaled.std()))


def test_identity_on_noisy_images_is_the_scalar_wiener_shrinkage():
    noisy, clean, _ = _noisy_set(32, snr=0.5, seed=1)
    out = torch.as_tensor(denoise_images(nn.Identity(), noisy, precision="fp32"))
    # (y - m) · (s² - σ²) / s²: the best scalar shrinkage towards the mean; it can only gain
    assert _plain_psnr(out, clean) > _plain_psnr(noisy, clean) + 1.0
    m = noisy.mean(dim=(-2, -1), keepdim=True)
    ratio = ((out - m).std(dim=(-2, -1)) / (noisy - m).std(dim=(-2, -1)))  # (n,)
    expected = 1 / (1 + 1 / 0.5)  # s² = var_x (1 + 1/SNR): shrink to var_x / s²
    assert abs(float(ratio.mean()) - expected) < 0.08


def test_to_input_units_recovers_the_clean_scale_from_any_affine_output():
    _, clean, _ = _noisy_set(8, snr=1.0, seed=2)
    out = -3.0 + 0.01 * clean  # a denoiser whose output is the clean image in other units
    est = to_input_units(clean.double(), out.double(), torch.zeros(8, dtype=torch.float64), torch.zeros(8, dtype=torch.float64))
    torch.testing.assert_close(est.float(), clean, rtol=0, atol=1e-4)


def test_trained_denoiser_raises_plain_psnr_and_normalised_output_does_not(device):
    noisy, clean, _ = _noisy_set(384, snr=0.2, seed=3)
    test_noisy, test_clean, _ = _noisy_set(64, snr=0.2, seed=4)
    test_noisy, test_clean = 80.0 * test_noisy + 5.0, 80.0 * test_clean + 5.0  # units unlike training
    torch.manual_seed(0)
    block = ConvAEBlock(widths=(8, 16, 16), dropout=0.1)
    fit_pairs(block, normalize(noisy), normalize(clean), epochs=6, batch_size=32, lr=2e-3,
              optimizer="adam", seed=0, device=device)
    before = _plain_psnr(test_noisy, test_clean)
    after = _plain_psnr(denoise_images(block, test_noisy, 32, device, precision="fp32"), test_clean)
    normalised = _plain_psnr(denoise_images(block, test_noisy, 32, device, precision="fp32", units="normalised"), test_clean)
    assert after > before + 3.0, (before, after)
    assert after > normalised + 10.0, (after, normalised)  # the old output, in the wrong units


def test_denoising_commutes_with_an_affine_change_of_units():
    noisy, _, _ = _noisy_set(8, snr=0.3, seed=5)
    torch.manual_seed(1)
    block = ConvAEBlock(widths=(4, 8)).eval()
    a = denoise_images(block, noisy, precision="fp32")
    b = denoise_images(block, 7.0 * noisy - 2.0, precision="fp32")
    np.testing.assert_allclose(b, 7.0 * a - 2.0, rtol=0, atol=1e-3 * 7.0 * float(np.abs(a).max()))
