"""The shipped generic CDAE: Fourier resampling, held-out denoising, phase flipping inside
``denoise train/apply``, and that it never saw a structure a benchmark or the demo scores on."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from cryoprior.core.ctf import phase_flip
from cryoprior.core.filters import resample
from cryoprior.core.metrics import psnr
from cryoprior.io.relion import ctf_from_star
from cryoprior.io.stack import ParticleStack
from cryoprior.nn.cdae import CDAEConfig
from cryoprior.nn.cdae_generic import (
    EXCLUDED_STRUCTURES,
    REFERENCE_PIXEL_A,
    load_shipped,
    shipped_model_dir,
    shipped_record,
    training_structures,
)
from cryoprior.nn.denoiser import denoise_images, load_model, read_model_file
from cryoprior.sim.dataset import SimulationConfig, simulate_dataset
from cryoprior.workflows import denoise as pipeline

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def _ctf_stack(tmp_path, box: int, pixel: float, n: int, snr: float, seed: int) -> ParticleStack:
    """1AKE (held out from the generic model), uniform orientations, CTF 1-3 µm."""
    cfg = SimulationConfig(structures=["1ake"], box=box, pixel_size_a=pixel, n=n, views=None, snr=snr, ctf=True,
                           defocus_min_a=1e4, defocus_max_a=3e4, seed=seed)
    return ParticleStack.from_file(simulate_dataset(cfg, tmp_path / f"sim_{box}_{seed}") / "particles.star")


def _psnr(images, clean) -> float:
    return float(psnr(torch.as_tensor(np.asarray(images)), torch.as_tensor(np.asarray(clean))).mean())


def test_fourier_resample_round_trip_keeps_units_and_band_limited_signals():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 64, 64, generator=g, dtype=torch.float64)
    for size in (80, 81, 96):  # pad then crop back: exact, even and odd sizes
        assert torch.allclose(resample(resample(x, size, ndim=2), 64, ndim=2), x, atol=1e-10)
    y = torch.randn(2, 53, 53, generator=g, dtype=torch.float64)
    assert torch.allclose(resample(resample(y, 64, ndim=2), 53, ndim=2), y, atol=1e-10)
    const = torch.full((1, 64, 64), 2.5)
    assert torch.allclose(resample(const, 53, ndim=2), torch.full((1, 53, 53), 2.5), atol=1e-5)
    # a cosine of 5 cycles per box is the same function sampled on the coarser grid
    def wave(d):
        t = (torch.arange(d, dtype=torch.float64) - d // 2) / d
        return torch.cos(2 * math.pi * 5 * t)[None, :].expand(d, d)[None]
    assert torch.allclose(resample(wave(64), 40, ndim=2), wave(40), atol=1e-10)
    assert torch.allclose(resample(wave(40), 64, ndim=2), wave(64), atol=1e-10)


def test_generic_model_never_saw_a_scored_structure():
    from cryoprior.bench import cdae as bench_cdae
    from cryoprior.bench import drvae as bench_drvae
    from cryoprior.bench import gan as bench_gan
    from cryoprior.bench.common import FALLBACK_STRUCTURES, pick_structures
    from cryoprior.nn.prior3d import HELD_OUT_STRUCTURES
    from cryoprior.workflows.demo import DemoConfig

    scored = {*bench_cdae.TESTS, *bench_drvae.TESTS, *bench_drvae.CONFORMATIONS, bench_drvae.DEV_STRUCTURE,
              *bench_gan.MORPH, *HELD_OUT_STRUCTURES, *FALLBACK_STRUCTURES, *pick_structures(4)[0],
              DemoConfig().structure}
    assert scored <= set(EXCLUDED_STRUCTURES)
    record = shipped_record()
    assert set(record["structures"]) == set(training_structures())
    assert not set(record["structures"]) & scored and len(record["structures"]) >= 10
    assert record["reference_pixel_size_a"] == REFERENCE_PIXEL_A
    assert (shipped_model_dir() / "README.md").is_file()
    assert (shipped_model_dir() / "model.pt").stat().st_size < 2_000_000


def test_shipped_model_denoises_held_out_particles_with_ctf(tmp_path):
    """1AKE at the reference pixel, CTF, SNR 0.1: the shipped model, as shipped (no fine-tuning),
    on phase-flipped images (flipped back), beats the identity's Stein/Wiener shrinkage and a
    zero output by a clear margin of plain PSNR."""
    stack = _ctf_stack(tmp_path, 64, REFERENCE_PIXEL_A, 96, 0.1, 3)
    noisy, clean = stack.images(), stack.read_image_column("cpCleanImageName")
    ctf = ctf_from_star(stack, np.arange(len(stack)))
    flipped = phase_flip(torch.from_numpy(noisy), ctf)

    def score(model):
        return _psnr(phase_flip(torch.from_numpy(denoise_images(model, flipped, 64, "cpu")), ctf), clean)

    shipped, identity = score(load_shipped()), score(nn.Identity())
    zero = _psnr(noisy.mean(axis=(1, 2), keepdims=True) * np.ones_like(noisy), clean)  # each image its mean
    assert shipped > identity + 3.0, (shipped, identity)
    assert shipped > zero + 3.0, (shipped, zero)
    assert shipped > _psnr(noisy, clean) + 12.0


def test_denoise_train_and_apply_phase_flip_and_resample(tmp_path):
    """A CTF stack at 2.5 Å: `denoise train --method cdae` without --pretrain fine-tunes the shipped
    model on the phase-flipped stack resampled to 1.25 Å; `apply` flips before and after the
    network (which beats feeding it the unflipped images)."""
    stack = _ctf_stack(tmp_path, 32, 2.5, 120, 0.1, 4)
    star = stack.path
    run = tmp_path / "run"
    metrics = pipeline.train("cdae", run, target=star, device="cpu",
                             cdae=CDAEConfig(finetune_epochs=1, knn_k=10, batch_size=16))
    record = read_model_file(run)
    assert record["arch"]["kind"] == "cdae-resampled" and record["arch"]["model_box"] == 64
    assert record["config"]["phase_flip"] is True and record["config"]["model_pixel_size_a"] == 1.25
    assert metrics["psnr_denoised_db"] > metrics["psnr_input_db"] + 8.0
    out = pipeline.apply(run, star, tmp_path / "den", device="cpu")
    denoised = ParticleStack.from_file(out / "particles.star").images()
    noisy, clean = stack.images(), stack.read_image_column("cpCleanImageName")
    assert denoised.shape == noisy.shape
    model = load_model(run, "cpu")
    ctf = ctf_from_star(stack, np.arange(len(stack)))
    manual = phase_flip(torch.from_numpy(denoise_images(model, phase_flip(torch.from_numpy(noisy), ctf))), ctf)
    assert np.allclose(denoised, manual.numpy(), atol=1e-4 * float(np.abs(manual.numpy()).max()))
    unflipped = denoise_images(model, noisy)
    assert _psnr(denoised, clean) > _psnr(unflipped, clean) + 0.1
    assert json.loads((run / "metrics.json").read_text())["psnr_denoised_db"] == pytest.approx(
        metrics["psnr_denoised_db"])
