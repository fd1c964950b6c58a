"""The (alpha,beta)-GAN scoring-rule family, WGAN-GP's gradient penalty, contamination of pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cryoprior.nn.gan_losses import (
    beta_score,
    beta_score_derivative,
    discriminator_loss,
    generator_adversarial_loss,
    gradient_penalty,
)
from cryoprior.sim.contamination import contaminate_pairs

LOGITS = torch.tensor([-30.0, -8.0, -2.5, -0.3, 0.0, 0.4, 3.0, 9.0, 30.0], dtype=torch.float64)


def test_closed_forms_js_and_squared():
    s = LOGITS
    t = torch.sigmoid(s)
    # (0, 0): JS-GAN, log t and log(1 - t) (computed as logsigmoid to stay exact at |s| = 30)
    torch.testing.assert_close(beta_score(s, 0, 0, 1), F.logsigmoid(s), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(beta_score(s, 0, 0, 0), F.logsigmoid(-s), rtol=1e-9, atol=1e-9)
    # (1, 1): the squared loss
    torch.testing.assert_close(beta_score(s, 1, 1, 1), -((1 - t) ** 2) / 2, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(beta_score(s, 1, 1, 0), -(t**2) / 2, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("alpha,beta", [(0.5, 0.5), (-0.5, -0.5), (1.0, -0.5), (-0.5, 1.0), (0.0, 1.0), (-1.0, -1.0), (0.3, -0.8)])
@pytest.mark.parametrize("label", [0, 1])
def test_gradient_matches_finite_differences_and_the_integral(alpha, beta, label):
    s = torch.tensor([-4.0, -1.2, 0.0, 0.7, 2.5, 5.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: beta_score(x, alpha, beta, label), (s,), eps=1e-6, atol=1e-6, rtol=1e-5)
    # the forward value is the integral whose derivative the backward returns: differences of
    # values agree with the closed-form derivative (this fails if the forward is wrong)
    h = 1e-5
    with torch.no_grad():
        fd = (beta_score(s + h, alpha, beta, label) - beta_score(s - h, alpha, beta, label)) / (2 * h)
    torch.testing.assert_close(fd, beta_score_derivative(s, alpha, beta, label), rtol=1e-6, atol=1e-9)
    # the discriminator's score of a reference rises with its logit, of a fake falls
    d = beta_score_derivative(s, alpha, beta, label)
    assert bool((d > 0).all()) if label == 1 else bool((d < 0).all())


@pytest.mark.parametrize("alpha,beta", [(0, 0), (1, 1), (0.5, 0.5), (-0.5, -0.5), (-1, 1), (1, -1)])
def test_finite_at_extreme_logits(alpha, beta):
    s = torch.tensor([-30.0, 30.0], dtype=torch.float32, requires_grad=True)
    total = beta_score(s, alpha, beta, 1).sum() + beta_score(s, alpha, beta, 0).sum()
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(s.grad).all()


def test_discriminator_and_generator_objectives():
    real, fake = torch.tensor([2.0, 3.0]), torch.tensor([-2.0, -1.0])
    # a discriminator that separates well has a lower loss than one that is fooled
    good = discriminator_loss(real, fake, "beta", 0.5, 0.5)
    fooled = discriminator_loss(fake, real, "beta", 0.5, 0.5)
    assert good < fooled
    # WGAN: critic loss is -(E D(x) - E D(G(y))), the generator's -E D(G(y))
    assert float(discriminator_loss(real, fake, "wgan-gp", 0, 0)) == pytest.approx(-(2.5 + 1.5))
    assert float(generator_adversarial_loss(fake, "wgan-gp", 0, 0)) == pytest.approx(1.5)
    # the generator's loss falls as the discriminator is fooled
    assert generator_adversarial_loss(real, "beta", 0.5, 0.5) < generator_adversarial_loss(fake, "beta", 0.5, 0.5)


def test_gradient_penalty_of_a_linear_critic():
    torch.manual_seed(0)
    w = torch.randn(1, 1, 8, 8)

    def critic(x):
        return (x * w).sum(dim=(1, 2, 3))

    real, fake = torch.randn(5, 1, 8, 8), torch.randn(5, 1, 8, 8)
    expected = (w.norm() - 1) ** 2  # ∇D = w everywhere
    torch.testing.assert_close(gradient_penalty(critic, real, fake), expected)
    w.data /= w.norm()
    assert float(gradient_penalty(critic, real, fake)) < 1e-10


@pytest.mark.parametrize("kind", ["A", "B", "C"])
def test_contamination_types(kind):
    rng = np.random.default_rng(0)
    clean = rng.standard_normal((200, 8, 8)).astype(np.float32) * 0.5 + 3.0
    noisy = clean + rng.standard_normal((200, 8, 8)).astype(np.float32) * 2.0
    y, x, mask = contaminate_pairs(noisy, clean, kind, 0.3, seed=1)
    assert mask.sum() == 60
    refs_changed = ~np.isclose(x, clean).all(axis=(1, 2))
    noisy_changed = ~np.isclose(y, noisy).all(axis=(1, 2))
    np.testing.assert_array_equal(refs_changed, mask if kind in ("A", "C") else np.zeros(200, bool))
    np.testing.assert_array_equal(noisy_changed, mask if kind in ("B", "C") else np.zeros(200, bool))
    if kind in ("A", "C"):  # pure noise with the stack's mean and std, unrelated to the clean image
        assert abs(x[mask].mean() - clean.mean()) < 0.1 and abs(x[mask].std() / clean.std() - 1) < 0.1
        assert abs(np.corrcoef(x[mask].ravel(), clean[mask].ravel())[0, 1]) < 0.05
    if kind in ("B", "C"):
        assert abs(np.corrcoef(y[mask].ravel(), clean[mask].ravel())[0, 1]) < 0.05
