"""Losses of the robust-GAN denoiser: the (α,β) scoring-rule family, WGAN-GP and ℓp.

The (α,β)-GAN scores a discriminator probability ``t = sigmoid(s)`` (``s`` the logit) by

    S(t, 1) = −∫_t^1 c^(α−1) (1−c)^β dc          (the image is a reference)
    S(t, 0) = −∫_0^t c^α (1−c)^(β−1) dc          (the image is generated)

with α, β ∈ [−1, 1]; (0, 0) is the JS-GAN (``S(t,1) = log t``, ``S(t,0) = log(1−t)``), (1, 1)
the squared loss (``−(1−t)²/2``, ``−t²/2``), (−½, −½) the boosting score. The discriminator
maximises ``S(D(x),1) + S(D(G(y)),0)``, the generator minimises ``S(D(G(y)),0)``.

Computed in the logit: with ``c = sigmoid(u)``, ``dc = c(1−c) du``,

    S(t, 1) = ∫_0^s σ(u)^α σ(−u)^(β+1) du − C₁,   C₁ = ∫_{1/2}^1 c^(α−1)(1−c)^β dc
    S(t, 0) = −∫_0^s σ(u)^(α+1) σ(−u)^β du − C₀,  C₀ = ∫_0^{1/2} c^α (1−c)^(β−1) dc

The integrands are evaluated as ``exp(a·logsigmoid(u) + b·logsigmoid(−u))`` (no cancellation
near t = 0 or 1) and integrated in float64 by Gauss–Legendre on panels of at most one logit
unit; the constants by QUADPACK. At β = −1 (α = −1) the constant C₁ (C₀) is infinite: it is
dropped, which changes neither the gradients nor the optimum. The backward pass uses the exact
derivatives ``dS(t,1)/ds = t^α (1−t)^(β+1)`` and ``dS(t,0)/ds = −t^(α+1) (1−t)^β``.

WGAN-GP: ``S(t,1) = s``, ``S(t,0) = −s`` on the raw critic output, and the critic's objective
loses ``μ · E[(‖∇D(x̂)‖ − 1)²]`` on random interpolates ``x̂`` of reference and generated images.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import integrate

SCORES = ("beta", "wgan-gp", "none")
RECON_LOSSES = ("l1", "l2")

_GL_NODES = 8
_MAX_PANELS = 4096


@functools.lru_cache(maxsize=64)
def _constants(alpha: float, beta: float) -> tuple[float, float]:
    """(C₁, C₀) of the module docstring; 0 where the integral diverges (β = −1, α = −1)."""
    c1 = 0.0 if beta <= -1 else integrate.quad(lambda c: c ** (alpha - 1) * (1 - c) ** beta, 0.5, 1.0, limit=200)[0]
    c0 = 0.0 if alpha <= -1 else integrate.quad(lambda c: c**alpha * (1 - c) ** (beta - 1), 0.0, 0.5, limit=200)[0]
    return c1, c0


@functools.lru_cache(maxsize=4)
def _gauss_legendre(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, w = np.polynomial.legendre.leggauss(n)
    return torch.from_numpy((x + 1) / 2), torch.from_numpy(w / 2)  # nodes/weights on [0, 1]


def _log_integrand(u: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """log(σ(u)^a σ(−u)^b), exact for large |u|."""
    return a * F.logsigmoid(u) + b * F.logsigmoid(-u)


def _integral_from_zero(s: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """∫_0^s σ(u)^a σ(−u)^b du for each logit ``s`` ``(n,)`` float64 → ``(n,)`` float64."""
    if s.numel() == 0:
        return s.clone()
    panels = int(min(_MAX_PANELS, max(8, math.ceil(float(s.abs().max())))))
    x, w = _gauss_legendre(_GL_NODES)
    starts = torch.arange(panels, dtype=torch.float64) / panels
    nodes = (starts[:, None] + x[None, :] / panels).reshape(-1)  # (P·n,) on [0, 1]
    weights = (w[None, :] / panels).expand(panels, -1).reshape(-1)
    u = s[:, None] * nodes[None, :]  # (n, P·n)
    return s * (torch.exp(_log_integrand(u, a, b)) * weights).sum(dim=1)


def beta_score_values(s: torch.Tensor, alpha: float, beta: float, label: int) -> torch.Tensor:
    """S(sigmoid(s), label) (float64, no autograd): see the module docstring."""
    s64 = s.detach().to(torch.float64).reshape(-1)
    c1, c0 = _constants(float(alpha), float(beta))
    if label == 1:
        out = _integral_from_zero(s64, alpha, beta + 1) - c1
    else:
        out = -_integral_from_zero(s64, alpha + 1, beta) - c0
    return out.reshape(s.shape)


def beta_score_derivative(s: torch.Tensor, alpha: float, beta: float, label: int) -> torch.Tensor:
    """dS(sigmoid(s), label)/ds (float64): t^α (1−t)^(β+1) for label 1, −t^(α+1) (1−t)^β for 0."""
    s64 = s.detach().to(torch.float64)
    if label == 1:
        return torch.exp(_log_integrand(s64, alpha, beta + 1))
    return -torch.exp(_log_integrand(s64, alpha + 1, beta))


class _BetaScore(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, alpha, beta, label):  # noqa: D401 - autograd signature
        ctx.save_for_backward(s)
        ctx.params = (alpha, beta, label)
        return beta_score_values(s, alpha, beta, label).to(s.dtype)

    @staticmethod
    def backward(ctx, grad):
        (s,) = ctx.saved_tensors
        d = beta_score_derivative(s, *ctx.params).to(s.dtype)
        return grad * d, None, None, None


def beta_score(s: torch.Tensor, alpha: float, beta: float, label: int) -> torch.Tensor:
    """The (α,β) score S(sigmoid(s), label) of logits ``s`` (any shape), differentiable in ``s``."""
    check_alpha_beta(alpha, beta)
    if label not in (0, 1):
        raise ValueError(f"label must be 0 or 1, got {label}")
    return _BetaScore.apply(s, float(alpha), float(beta), int(label))


def check_alpha_beta(alpha: float, beta: float) -> None:
    if not (-1 <= alpha <= 1 and -1 <= beta <= 1):
        raise ValueError(f"alpha and beta must lie in [-1, 1], got ({alpha}, {beta})")


def score(s: torch.Tensor, label: int, gan: str, alpha: float = 0.5, beta: float = 0.5) -> torch.Tensor:
    """S(D, label) of discriminator outputs ``s`` for ``gan`` in ``beta`` / ``wgan-gp``."""
    if gan == "wgan-gp":
        return s if label == 1 else -s
    if gan == "beta":
        return beta_score(s, alpha, beta, label)
    raise ValueError(f"no score for gan={gan!r}")


def discriminator_loss(d_real: torch.Tensor, d_fake: torch.Tensor, gan: str, alpha: float, beta: float) -> torch.Tensor:
    """−(E S(D(x),1) + E S(D(G(y)),0)): minimised by the discriminator (penalty not included)."""
    return -(score(d_real, 1, gan, alpha, beta).mean() + score(d_fake, 0, gan, alpha, beta).mean())


def generator_adversarial_loss(d_fake: torch.Tensor, gan: str, alpha: float, beta: float) -> torch.Tensor:
    """E S(D(G(y)),0): minimised by the generator."""
    return score(d_fake, 0, gan, alpha, beta).mean()


def gradient_penalty(disc, real: torch.Tensor, fake: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """E[(‖∇_x̂ D(x̂)‖₂ − 1)²] over x̂ = e·x + (1−e)·G(y), e ~ U(0,1) per image ``(b, 1, d, d)``."""
    e = torch.rand(real.shape[0], *([1] * (real.dim() - 1)), generator=generator, device=real.device, dtype=real.dtype)
    x_hat = (e * real.detach() + (1 - e) * fake.detach()).requires_grad_(True)
    (grad,) = torch.autograd.grad(disc(x_hat).sum(), x_hat, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


def recon_loss(output: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean absolute (``l1``) or squared (``l2``) error per pixel."""
    if kind == "l1":
        return (output - target).abs().mean()
    if kind == "l2":
        return ((output - target) ** 2).mean()
    raise ValueError(f"recon loss must be one of {RECON_LOSSES}, got {kind!r}")
