"""CDAE's depth follows the particle size: the receptive field stays within half the diameter."""

import numpy as np
import pytest
import torch

from cryoprior.nn.cdae import CDAEConfig, with_depth
from cryoprior.nn.cdae_ops import (
    estimate_particle_diameter_px,
    modules_for_diameter,
    receptive_field_px,
)
from cryoprior.nn.models.cdae import ConvAEBlock


@pytest.mark.parametrize("modules", [1, 2, 3])
def test_receptive_field_formula_matches_the_network(modules):
    """An impulse's influence on the output spans exactly the formula's receptive field."""
    torch.manual_seed(0)
    block = ConvAEBlock(widths=[4] * modules, dropout=0.0).double().eval()
    d = 96
    x = torch.zeros(1, 1, d, d, dtype=torch.float64, requires_grad=True)
    block(x)[0, 0, d // 2, d // 2].backward()
    rows = torch.nonzero(x.grad[0, 0].abs().sum(dim=1) > 0).flatten()
    assert int(rows.max() - rows.min() + 1) <= receptive_field_px(modules)
    assert int(rows.max() - rows.min() + 1) > receptive_field_px(modules) // 2


def _disc_stack(diameter_px: float, n: int = 400, d: int = 64, snr: float = 0.05, seed: int = 0) -> np.ndarray:
    """Discs of random contrast (so the variance across images marks the particle) plus noise."""
    g = np.random.default_rng(seed)
    c = np.arange(d) - d // 2
    disc = (np.hypot(c[:, None], c[None, :]) < diameter_px / 2).astype(np.float32)
    clean = g.normal(size=(n, 1, 1)).astype(np.float32) * disc
    sigma = np.sqrt(clean.var() / snr)
    return clean + g.normal(scale=sigma, size=clean.shape).astype(np.float32)


@pytest.mark.parametrize("diameter", [20, 36, 50])
def test_diameter_estimate_from_a_noisy_stack(diameter):
    est = estimate_particle_diameter_px(_disc_stack(diameter))
    assert abs(est - diameter) <= 4, est


def test_depth_rule_keeps_the_measured_default_and_grows_with_the_particle():
    assert modules_for_diameter(36) == 2 and modules_for_diameter(50) == 2  # measured best
    assert modules_for_diameter(20) == 1 and modules_for_diameter(80) == 3
    small = with_depth(CDAEConfig(), _disc_stack(20))
    large = with_depth(CDAEConfig(), _disc_stack(36, d=128))
    assert small.widths == [8] and large.widths == [8, 16]
    given = with_depth(CDAEConfig(particle_diameter_a=160.0), _disc_stack(20), pixel_size_a=2.0)
    assert given.widths == [8, 16, 32]  # 80 px from the flag, not the 20 px of the stack
    fixed = CDAEConfig(widths=[32, 64, 128])
    assert with_depth(fixed, _disc_stack(20)) is fixed


def test_diameter_estimate_holds_at_the_snr_of_real_particles(tmp_path):
    """Projections of 3Q4O (a development structure) at uniform orientations, SNR 0.03: the
    estimate from the noisy stack is within 4 px of that from its clean images. Unsmoothed, the
    radial variance profile is noise and the estimate was 8 px for a 38 px particle."""
    from cryoprior.io.stack import ParticleStack
    from cryoprior.sim.dataset import SimulationConfig, simulate_dataset

    out = simulate_dataset(SimulationConfig(structures=["3q4o"], box=64, pixel_size_a=1.25, views=None, n=300,
                                            snr=0.03, seed=1), tmp_path / "sim")
    stack = ParticleStack.from_file(out / "particles.star")
    clean = estimate_particle_diameter_px(stack.read_image_column("cpCleanImageName"))
    noisy = estimate_particle_diameter_px(stack.images())
    assert 30 <= clean <= 48 and abs(noisy - clean) <= 4, (noisy, clean)
    assert modules_for_diameter(noisy) == modules_for_diameter(clean)
