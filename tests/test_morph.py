"""Morph between two models of one protein: endpoints, monotone RMSD, simulated conformations."""

from __future__ import annotations

import numpy as np
import pytest

from cryoprior.io.stack import ParticleStack
from cryoprior.sim.dataset import SimulationConfig, simulate_dataset
from cryoprior.sim.morph import (
    kabsch,
    matched_coordinates,
    model_coordinates,
    morph_structures,
    rmsd,
)


def test_endpoints_are_the_two_models_and_rmsd_is_monotone():
    _, _, xa, xb = matched_coordinates("1ake", "4ake")
    models = [model_coordinates(m) for m in morph_structures("1ake", "4ake", 5)]
    centre = xa.mean(0)
    np.testing.assert_allclose(models[0], xa - centre, atol=1e-3)  # A, centred
    np.testing.assert_allclose(models[-1], xb - centre, atol=1e-3)  # B superposed on A
    # the last model is B up to a rigid motion, and the superposition is the least-squares one
    r, t = kabsch(models[-1], xb)
    assert rmsd(models[-1] @ r.T + t, xb) < 1e-3
    assert rmsd(xb, xa) < rmsd(xb + 0.0 + np.array([1.0, 0, 0]), xa)
    d = [rmsd(m, models[0]) for m in models]
    assert d[0] == 0 and all(b > a + 0.5 for a, b in zip(d, d[1:])), d  # open/closed differ by several Å
    np.testing.assert_allclose(np.diff(d), d[-1] / 4, rtol=1e-6)  # linear interpolation


def test_kabsch_recovers_a_rigid_motion():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 3))
    q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    q *= np.sign(np.linalg.det(q))
    r, t = kabsch(x @ q.T + 2.0, x)
    np.testing.assert_allclose(r, q.T, atol=1e-10)


def test_simulate_morph_labels_conformations(tmp_path):
    cfg = SimulationConfig(morph=["1ake", "4ake"], steps=3, box=32, pixel_size_a=3.0, n=30, views=1, snr=1.0, seed=0)
    simulate_dataset(cfg, tmp_path / "m")
    stack = ParticleStack.from_file(tmp_path / "m" / "particles.star")
    labels = stack.column("cpConformationLabel")
    assert set(labels) == {0, 1, 2}
    assert len(list((tmp_path / "m" / "volumes").glob("*.mrc"))) == 3
    clean = stack.read_image_column("cpCleanImageName")
    mean = [clean[labels == c].mean(0) for c in range(3)]  # one view: the conformations differ
    d01, d02 = np.linalg.norm(mean[0] - mean[1]), np.linalg.norm(mean[0] - mean[2])
    assert d02 > d01 > 0.05 * np.linalg.norm(mean[0]), (d01, d02)


def test_morph_needs_two_models(tmp_path):
    from cryoprior.errors import InputError

    with pytest.raises(InputError):
        SimulationConfig(morph=["1ake"], box=32).validate()
