"""Maximum-likelihood 2D classification with marginalisation over in-plane poses (Scheres et al.
2005, "ML2D"; the core of RELION's Class2D): soft ``align_kmeans``.

Each image is modelled as a class average rotated by one of ``n_angles`` angles, moved by an
integer shift up to ``max_shift`` px, plus white Gaussian noise of variance σ² per pixel. The
E-step gives every image a posterior over (class, angle, shift); the M-step makes each average
the posterior-weighted mean of the images brought back into its frame and re-estimates σ² and the
class weights. Hard k-means takes only the best pose and class, which at low SNR locks in wrong
alignments; the posterior keeps them uncertain until the averages settle. Images and averages
are seen through the soft circular mask of ``align_kmeans``, optionally with deterministic
annealing of the noise and of the resolution. What RELION adds (a per-frequency noise spectrum,
τ² regularisation of the averages, CTF) is not here: the inputs are white-noise images
(phase-flipped, Fourier-cropped particles).
Each of those was built and measured on development stacks and none classified better, so none
is kept (docs/benchmarks.md, DRVAE): τ² as a half-set SSNR filter and a CTF model (sixth
session), a per-shell noise spectrum (eighth), and RELION's own τ² rule (ninth).

>>> result = ml2d(images, averages0, max_shift=2)   # doctest: +SKIP
>>> result.labels, result.averages, result.log_likelihood   # doctest: +SKIP
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from cryoprior.core.filters import lowpass
from cryoprior.core.rotations import rotate_images

from .align import aligned_costs, alignment_mask, centred_averages, rotated_copies

__all__ = ["ANNEAL_ITERATIONS", "ITERATIONS", "ML2DResult", "START_SHELL", "TEMPERATURE", "annealing_of", "ml2d"]

#: the defaults of ``classify --method ml2d`` and of drvae-bsk's last step (``--ml2d-*``), chosen on
#: development structures (docs/benchmarks.md, "ML2D's annealing" and "ML2D's resolution annealing")
ITERATIONS, TEMPERATURE, ANNEAL_ITERATIONS, START_SHELL = 20, 4.0, 10, 5.0


def annealing_of(config) -> dict:
    """:func:`ml2d`'s annealing arguments from a config with ``--ml2d-*`` fields (``ClassifyConfig``,
    ``DRVAEConfig``)."""
    return {"temperature": config.ml2d_temperature, "anneal_iterations": config.ml2d_anneal,
            "start_shell": config.ml2d_start_shell}


class ML2DResult(NamedTuple):
    """What :func:`ml2d` returns; unpacks as a tuple in this order."""

    labels: np.ndarray  # (n,) int64: the class of largest marginal posterior
    posterior: np.ndarray  # (n, k): marginal over poses
    averages: np.ndarray  # (k, d, d)
    angles: np.ndarray  # (n,) rad: the most probable angle in the image's class, align_kmeans' convention
    shifts: np.ndarray  # (n, 2) int (dx, dy) px: its most probable shift there
    log_likelihood: float  # per image, with poses and classes marginalised (compare runs on one stack)


def _shifts(max_shift: int) -> list[tuple[int, int]]:
    return [(dy, dx) for dy in range(-max_shift, max_shift + 1) for dx in range(-max_shift, max_shift + 1)]


def _sq_distance(x: torch.Tensor, t: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``|roll(x, (−dy, −dx)) − t|²`` ``(n, k, R)`` of masked images ``x`` ``(n, d, d)`` against masked
    rotated averages ``t`` ``(k, R, d, d)``."""
    tt = t.reshape(-1, x.shape[-1] * x.shape[-1])
    rolled = torch.roll(x, (-dy, -dx), dims=(1, 2)).reshape(len(x), -1)
    xn = (rolled * rolled).sum(1)[:, None]
    return (xn + (tt * tt).sum(1) - 2 * rolled @ tt.T).reshape(len(x), *t.shape[:2])


def _log_weights(x: torch.Tensor, t: torch.Tensor, sigma2: float, log_prior: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Unnormalised log posterior ``(n, S, k, R)`` of every shift, class and angle for masked images
    ``x`` ``(n, d, d)`` against masked rotated averages ``t`` ``(k, R, d, d)``: −|x − t|²/2σ²."""
    out = torch.empty((len(x), len(_shifts(max_shift)), *t.shape[:2]), dtype=torch.float64)
    for j, (dy, dx) in enumerate(_shifts(max_shift)):
        out[:, j] = (-_sq_distance(x, t, dy, dx) / (2 * sigma2)).double() + log_prior[None, :, None]
    return out


def ml2d(images, averages, n_angles: int = 36, max_shift: int = 0, iterations: int = 10,
         temperature: float = 1.0, anneal_iterations: int = 0, start_shell: float = 0.0) -> ML2DResult:
    """Refine class ``averages`` ``(k, d, d)`` of ``images`` ``(n, d, d)`` by ``iterations`` EM steps
    with marginalisation over ``n_angles`` in-plane angles and integer shifts up to ``max_shift``.

    Returns an :class:`ML2DResult`: labels, posteriors, averages, each image's most probable pose in
    its class (``align_kmeans``' convention) and the mean log-likelihood per image of the final
    model (Gaussian noise, uniform pose prior), by which runs from different starts on the same
    images compare. Deterministic (no random draws); start it from a hard classification's averages
    (``align_kmeans``, ``aligned_bsk``).

    ``temperature`` T > 1 with ``anneal_iterations`` A: deterministic annealing. The E-step of
    iteration i < A sees the noise variance σ²·T^(1 − i/A), so that early posteriors are flatter
    and the averages can leave the starting partition; from iteration A on it is plain EM.

    ``start_shell`` s > 0 (Fourier shells, i.e. cycles per box, so the same physical frequency at
    any sampling of one box) anneals the resolution over the same A iterations, as RELION's
    Class2D widens its resolution from a coarse start: the E-step of iteration i < A compares
    images and averages only at frequencies up to s/d + (1/2 − s/d)·i/A cycles/px (a sharp
    Fourier mask, so with white noise that is the exact likelihood of that band), with σ² still
    estimated on the whole band.
    """
    images = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    centres = torch.as_tensor(np.asarray(averages), dtype=torch.float32).clone()
    if images.ndim != 3 or images.shape[1] != images.shape[2] or centres.shape[1:] != images.shape[1:]:
        raise ValueError(f"ml2d needs images (n, d, d) and averages (k, d, d) of one size, got "
                         f"{tuple(images.shape)} and {tuple(centres.shape)}")
    if temperature < 1 or anneal_iterations < 0 or start_shell < 0:
        raise ValueError(f"need temperature >= 1, anneal_iterations >= 0 and start_shell >= 0, got "
                         f"{temperature}, {anneal_iterations}, {start_shell}")
    if not 0 <= max_shift < images.shape[-1] // 2:
        raise ValueError(f"max_shift must be in 0..{images.shape[-1] // 2 - 1} px, got {max_shift}")
    n, d, _ = images.shape
    k = len(centres)
    mask = alignment_mask(d)
    x = images * mask
    angles = torch.arange(n_angles, dtype=torch.float32) * (2 * math.pi / n_angles)
    shifts = _shifts(max_shift)
    log_prior = torch.full((k,), -math.log(k), dtype=torch.float64)
    # σ² from the hard fit of the starting averages: the mean best residual per masked pixel
    best_cost = aligned_costs(x, centres, angles, mask, max_shift)[0].amin(dim=1)
    pixels = float((mask * mask).sum())
    sigma2 = max(float(best_cost.mean()) / pixels, 1e-12)
    for i in range(iterations):
        temp = temperature ** (1 - i / anneal_iterations) if i < anneal_iterations else 1.0
        t = rotated_copies(centres, angles) * mask
        banded = 0 < start_shell and i < anneal_iterations and start_shell / d < 0.5
        if banded:  # the E-step sees the band up to `radius` cycles/px only
            radius = start_shell / d + (0.5 - start_shell / d) * i / anneal_iterations
            logw = _log_weights(lowpass(x, cutoff_freq=radius, width_px=0), lowpass(t, cutoff_freq=radius, width_px=0),
                                sigma2 * temp, log_prior, max_shift)
        else:
            logw = _log_weights(x, t, sigma2 * temp, log_prior, max_shift)
        w = torch.softmax(logw.reshape(n, -1), dim=1).reshape(logw.shape).float()  # (n, S, k, R)
        # M-step: Σ_i w_iskr · roll(image_i, -shift_s), then each (k, r) sum rotated back by -angle_r
        sums = torch.zeros((k, n_angles, d * d))
        for j, (dy, dx) in enumerate(shifts):
            rolled = torch.roll(images, (-dy, -dx), dims=(1, 2)).reshape(n, -1)
            sums += torch.einsum("nkr,np->krp", w[:, j], rolled)
        back = rotate_images(sums.reshape(k * n_angles, 1, d, d), -angles.repeat(k)).reshape(k, n_angles, d, d)
        mass = w.sum(dim=(0, 1, 3)).clamp(min=1e-12)  # (k,)
        centres = back.sum(1) / mass[:, None, None]
        if max_shift > 0:
            centres = centred_averages(centres)
        # σ²: the posterior-expected residual per masked pixel; class weights: their posterior mass
        if banded:  # the whole band's residual, shift by shift, not kept
            cost = sum(float((w[:, j].double() * _sq_distance(x, t, dy, dx).double()).sum()) for j, (dy, dx) in enumerate(shifts))
        else:
            cost = float((w.double() * -2 * sigma2 * temp * (logw - log_prior[None, None, :, None])).sum())
        sigma2 = max(cost / (n * pixels), 1e-12)
        log_prior = torch.log((mass / n).double().clamp(min=1e-12))
    logw = _log_weights(x, rotated_copies(centres, angles) * mask, sigma2, log_prior, max_shift)
    flat = logw.reshape(n, -1)
    posterior = torch.softmax(flat, dim=1).reshape(logw.shape).sum(dim=(1, 3))
    # log p(x_i) = logsumexp over (shift, class, angle) of log w − log(S R) − (P/2) log(2π σ²)
    log_likelihood = float(torch.logsumexp(flat, dim=1).mean()) - math.log(len(shifts) * n_angles) \
        - 0.5 * pixels * math.log(2 * math.pi * sigma2)
    labels = posterior.argmax(1)
    own = logw[torch.arange(n), :, labels].reshape(n, -1).argmax(1)  # the best (shift, angle) in its class
    pose_shift = torch.tensor([(dx, dy) for dy, dx in shifts], dtype=torch.long)[own // n_angles]
    return ML2DResult(labels.numpy().astype(np.int64), posterior.numpy(), centres.numpy(),
                      angles[own % n_angles].numpy().astype(np.float64), pose_shift.numpy(), log_likelihood)
