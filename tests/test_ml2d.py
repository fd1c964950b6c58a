"""ML2D (soft align-kmeans): the M-step brings images back into their class frame, the E-step
weighs classes and poses by likelihood, shifts are searched, no balance is imposed."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryoprior.classical.cluster.align import alignment_mask
from cryoprior.classical.cluster.ml2d import ml2d
from cryoprior.core.filters import highpass, lowpass
from cryoprior.core.metrics import classification_scores
from cryoprior.core.rotations import rotate_images

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def _templates(d: int = 32) -> torch.Tensor:
    """Two asymmetric images that no rotation maps onto each other."""
    y, x = torch.meshgrid(torch.arange(d) - 15.5, torch.arange(d) - 15.5, indexing="ij")
    a = torch.exp(-((x - 6) ** 2 + (y - 2) ** 2) / 8) + torch.exp(-(x**2) / 4 - (y / 6) ** 2) * (y > -2)
    b = torch.exp(-((x + 3) ** 2 + (y - 5) ** 2) / 6) + torch.exp(-((x - 4) ** 2 + (y + 4) ** 2) / 12)
    return torch.stack([a, b])


def _stack(n: int, sigma: float, seed: int, fraction_a: float = 0.5):
    """``n`` images: template 0 for the first ``fraction_a`` of them, else 1, each rotated by a
    random angle of the 10° grid, plus white noise ``sigma``."""
    gen = torch.Generator().manual_seed(seed)
    t = _templates()
    labels = (torch.arange(n) >= int(fraction_a * n)).long()
    angles = torch.randint(36, (n,), generator=gen).float() * (2 * math.pi / 36)
    images = rotate_images(t[labels][:, None], angles)[:, 0] + sigma * torch.randn((n, 32, 32), generator=gen)
    return images.numpy(), labels.numpy(), t


def _corr(a, b, mask) -> float:
    a, b = (np.asarray(a) * mask).ravel(), (np.asarray(b) * mask).ravel()
    return float(np.corrcoef(a, b)[0, 1])


def test_averages_converge_to_the_templates_from_a_poor_start():
    """From starting averages that are the templates buried in noise (correlation ~0.4), a few EM
    steps recover both templates (in their own frame: the back-rotation is right) and every label."""
    images, truth, t = _stack(120, 0.1, seed=0)
    gen = torch.Generator().manual_seed(1)
    start = t + 2.5 * float(t.std()) * torch.randn(t.shape, generator=gen)
    mask = alignment_mask(32).numpy()
    assert max(_corr(start[i], t[i], mask) for i in range(2)) < 0.6
    labels, posterior, averages, angles, *_ = ml2d(images, start.numpy(), iterations=5)
    assert classification_scores(truth, labels)["f1"] == 1.0
    assert np.allclose(posterior.sum(1), 1.0, atol=1e-5)
    assert min(_corr(averages[i], t[i], mask) for i in range(2)) > 0.98


def test_class_weights_follow_an_imbalanced_truth_and_shifts_are_searched():
    """A 75/25 mixture, each image also rolled by up to 2 px: every label recovered with the shift
    search (no balance is imposed) and the posterior mass is 75/25."""
    images, truth, t = _stack(160, 0.1, seed=2, fraction_a=0.75)
    gen = np.random.default_rng(3)
    images = np.stack([np.roll(im, tuple(gen.integers(-2, 3, 2)), axis=(0, 1)) for im in images])
    labels, posterior, averages, angles, shifts, _ = ml2d(images, t.numpy(), max_shift=2, iterations=5)
    assert classification_scores(truth, labels)["f1"] == 1.0
    assert abs(posterior[:, 0].mean() - 0.75) < 0.01
    # the poses, in align_kmeans' convention: image ≈ its average rotated by the angle, then moved
    # (noise-limited: align_kmeans' own poses score 0.81 here; with dx and dy swapped 0.55)
    mask = alignment_mask(32).numpy()
    rotated = rotate_images(torch.as_tensor(averages)[labels][:, None], torch.as_tensor(angles, dtype=torch.float32))[:, 0]

    def fit(order):
        posed = [np.roll(p, tuple(int(v) for v in sh[order]), axis=(0, 1)) for p, sh in zip(rotated.numpy(), shifts)]
        return np.mean([_corr(a, b, mask) for a, b in zip(posed, images)])

    assert fit([1, 0]) > 0.78 and fit([0, 1]) < 0.7


def test_log_likelihood_is_the_gaussian_maximum_and_ranks_solutions():
    """One class, one angle, no shift: the model is a Gaussian with the mean image and the mean
    masked residual as σ², whose mean log-likelihood per image is −(P/2)(1 + log 2πσ²), P the
    mask's weight. And EM's fixed point with both classes the merged mean (a start it cannot leave)
    scores below the right one on the same images, so runs from different starts compare."""
    images, truth, t = _stack(60, 0.3, seed=4)
    mask = alignment_mask(32).numpy()
    one = ml2d(images, images[:1], n_angles=1, iterations=3)
    mu = images.mean(0)
    p = float((mask * mask).sum())
    sigma2 = float((((images - mu) * mask) ** 2).sum((1, 2)).mean()) / p
    assert np.allclose(one.averages[0], mu, atol=1e-5)
    assert one.log_likelihood == pytest.approx(-0.5 * p * (1 + math.log(2 * math.pi * sigma2)), rel=1e-5)
    right = ml2d(images, t.numpy(), iterations=5)
    merged = np.stack([images.mean(0)] * 2)
    wrong = ml2d(images, merged, iterations=5)
    assert classification_scores(truth, wrong.labels)["f1"] < 0.7
    assert right.log_likelihood > wrong.log_likelihood + 1.0


def test_annealing_leaves_the_fixed_point_and_validates():
    """From the true templates, deterministic annealing (flatter posteriors first) ends where plain
    EM does; temperature 1 is plain EM exactly."""
    images, truth, t = _stack(120, 0.2, seed=5)
    plain = ml2d(images, t.numpy(), iterations=8)
    same = ml2d(images, t.numpy(), iterations=8, temperature=1.0, anneal_iterations=4)
    annealed = ml2d(images, t.numpy(), iterations=12, temperature=8.0, anneal_iterations=6)
    assert np.array_equal(plain.posterior, same.posterior)
    assert classification_scores(truth, annealed.labels)["f1"] == 1.0
    assert annealed.log_likelihood == pytest.approx(plain.log_likelihood, abs=0.05)
    with pytest.raises(ValueError, match="temperature"):
        ml2d(images, t.numpy(), temperature=0.5)


def test_ml2d_checks_its_input():
    with pytest.raises(ValueError, match="one size"):
        ml2d(np.zeros((4, 32, 32)), np.zeros((2, 16, 16)))
    with pytest.raises(ValueError, match="max_shift"):
        ml2d(np.zeros((4, 32, 32)), np.zeros((2, 32, 32)), max_shift=16)


def test_resolution_annealing_compares_only_the_band_at_first():
    """Two classes alike below shell 4 and different only above shell 8: from the true templates
    plain EM keeps them apart, while an E-step that sees shells up to 2 only cannot tell them
    apart, so its M-step mixes them. After the annealing (the band widened to Nyquist) they come
    apart again within it (shells 9 to 13.7 in its last three steps); a start shell at Nyquist is plain EM."""
    d = 32
    gen = torch.Generator().manual_seed(6)
    base = lowpass(torch.randn((d, d), generator=gen), cutoff_freq=4 / d, width_px=0)
    detail = highpass(torch.randn((2, d, d), generator=gen), cutoff_freq=8 / d, width_px=0)
    t = base + 0.5 * detail
    truth = np.repeat([0, 1], 50)
    images = (t[truth] + 1.0 * torch.randn((100, d, d), generator=gen)).numpy()
    mask = alignment_mask(d).numpy()

    def apart(result) -> float:  # 1 − correlation of the two averages
        return 1 - _corr(result.averages[0], result.averages[1], mask)

    plain = ml2d(images, t.numpy(), n_angles=1, iterations=1)
    coarse = ml2d(images, t.numpy(), n_angles=1, iterations=1, anneal_iterations=1, start_shell=2)
    assert classification_scores(truth, plain.labels)["f1"] == 1.0 and apart(plain) > 0.2
    assert apart(coarse) < 0.02
    widened = ml2d(images, t.numpy(), n_angles=1, iterations=6, anneal_iterations=6, start_shell=2)
    assert apart(widened) > 0.5 and classification_scores(truth, widened.labels)["f1"] == 1.0
    assert np.array_equal(ml2d(images, t.numpy(), n_angles=1, iterations=2, anneal_iterations=2, start_shell=d / 2).posterior,
                          ml2d(images, t.numpy(), n_angles=1, iterations=2).posterior)
