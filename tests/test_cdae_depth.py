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
