"""Maximum-likelihood 2D classification with marginalisation over in-plane poses (Scheres et al.
2005, "ML2D"; the core of RELION's Class2D): soft ``align_kmeans``.

Each image is modelled as a class average rotated by one of ``n_angles`` angles, moved by an
integer shift up to ``max_shift`` px, plus white Gaussian noise of variance σ² per pixel. The
E-step gives every image a posterior over (class, angle, shift); the M-step makes each average
the posterior-weighted mean of the images brought back into its frame and re-estimates σ² and the
class weights. Hard k-means takes only the best pose and class, which at low SNR locks in wrong
alignments; the posterior keeps them uncertain until the averages settle. Images and averages
are seen through the soft circular mask of ``align_kmeans``. Options: RELION's τ² regularisation
of the averages (``regularise``), its CTF model (``ctf``), deterministic annealing. RELION's
per-frequency noise spectrum is not here: the inputs are white-noise images (phase-flipped,
Fourier-cropped particles).

>>> result = ml2d(images, averages0, max_shift=2)   # doctest: +SKIP
>>> result.labels, result.averages, result.log_likelihood   # doctest: +SKIP
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from cryoprior.core.fft import fft2c, ifft2c
from cryoprior.core.fsc import radial_average, radial_shell_index
from cryoprior.core.rotations import rotate_images

from .align import alignment_mask, centred_averages, rotated_copies
from .averages import TAU2_FUDGE_2D, ssnr_wiener_averages

__all__ = ["ANNEAL_ITERATIONS", "ITERATIONS", "ML2DResult", "TEMPERATURE", "ml2d"]

#: the defaults of ``classify --method ml2d`` and of drvae-bsk's last step (``--ml2d-*``), chosen on
#: development structures (docs/benchmarks.md, "ML2D's annealing")
ITERATIONS, TEMPERATURE, ANNEAL_ITERATIONS = 20, 4.0, 10


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


def _log_weights(x: torch.Tensor, t: torch.Tensor, sigma2: float, log_prior: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Unnormalised log posterior ``(n, S, k, R)`` of every shift, class and angle for masked images
    ``x`` ``(n, d, d)`` against masked rotated averages ``t`` ``(k, R, d, d)``: −|x − t|²/2σ²."""
    n = len(x)
    k, r = t.shape[:2]
    tt = t.reshape(k * r, -1)
    tn = (tt * tt).sum(1)  # a circular shift keeps it
    xn = (x * x).sum((1, 2))[:, None]
    out = torch.empty((n, len(_shifts(max_shift)), k, r), dtype=torch.float64)
    for j, (dy, dx) in enumerate(_shifts(max_shift)):
        rolled = torch.roll(x, (-dy, -dx), dims=(1, 2)).reshape(n, -1)
        cost = (xn + tn - 2 * rolled @ tt.T).reshape(n, k, r)
        out[:, j] = (-cost / (2 * sigma2)).double() + log_prior[None, :, None]
    return out


def ctf_groups(ctf: torch.Tensor, n_groups: int = 8, seed: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    """Images grouped by their CTF (``(n, d, d)`` centred): ``(group (n,) int, |CTF| (G, d, d))``,
    each group's isotropic |CTF| the mean radial profile of its members (k-means of the profiles)."""
    from sklearn.cluster import KMeans

    d = ctf.shape[-1]
    shell = radial_shell_index(d).clamp(max=d // 2)
    profiles = radial_average(ctf.abs().double())  # (n, d//2+1)
    g = min(n_groups, len(np.unique(profiles.numpy().round(6), axis=0)))
    group = KMeans(g, n_init=3, random_state=seed).fit_predict(profiles.numpy()) if g > 1 else np.zeros(len(ctf), int)
    means = torch.stack([profiles[torch.as_tensor(group == j)].mean(0) for j in range(g)])
    return group.astype(np.int64), means[:, shell].float()


def _group_log_weights(x: torch.Tensor, centres: torch.Tensor, angles: torch.Tensor, mask: torch.Tensor,
                       groups: tuple[np.ndarray, torch.Tensor] | None, sigma2: float, log_prior: torch.Tensor,
                       max_shift: int) -> torch.Tensor:
    """:func:`_log_weights` of masked images ``x`` against the rotated ``centres``, seen through each
    image's CTF group (its |CTF| applied to every rotated average before the mask) when given."""
    rotated = rotated_copies(centres, angles)
    if groups is None:
        return _log_weights(x, rotated * mask, sigma2, log_prior, max_shift)
    group, absc = groups
    out = torch.empty((len(x), len(_shifts(max_shift)), *rotated.shape[:2]), dtype=torch.float64)
    for j in range(len(absc)):
        idx = torch.as_tensor(np.flatnonzero(group == j))
        seen = ifft2c(fft2c(rotated) * absc[j]).real.float() * mask
        out[idx] = _log_weights(x[idx], seen, sigma2, log_prior, max_shift)
    return out


def ml2d(images, averages, n_angles: int = 36, max_shift: int = 0, iterations: int = 10, regularise: bool = False,
         tau2_fudge: float = TAU2_FUDGE_2D, temperature: float = 1.0, anneal_iterations: int = 0,
         ctf=None, ctf_groups_n: int = 8) -> ML2DResult:
    """Refine class ``averages`` ``(k, d, d)`` of ``images`` ``(n, d, d)`` by ``iterations`` EM steps
    with marginalisation over ``n_angles`` in-plane angles and integer shifts up to ``max_shift``.

    Returns an :class:`ML2DResult`: labels, posteriors, averages, each image's most probable pose in
    its class (``align_kmeans``' convention) and the mean log-likelihood per image of the final
    model (Gaussian noise, uniform pose prior), by which runs from different starts on the same
    images compare. Deterministic (no random draws); start it from a hard classification's averages
    (``align_kmeans``, ``aligned_bsk``).

    ``regularise``: each M-step's averages are Wiener-filtered per shell by their half-set spectral
    SNR (``averages.ssnr_wiener_averages``, even and odd images as the half sets), as RELION
    regularises its references with τ² (``tau2_fudge`` is its ``--tau2_fudge``).

    ``temperature`` T > 1 with ``anneal_iterations`` A: deterministic annealing. The E-step of
    iteration i < A sees the noise variance σ²·T^(1 − i/A), so that early posteriors are flatter
    and the averages can leave the starting partition; from iteration A on it is plain EM.

    ``ctf`` ``(n, d, d)``: each image's centred CTF (``core.ctf.ctf_2d``), the ``images`` being
    phase-flipped by it. The model is then image = |CTF| ∗ (moved, rotated average) + noise, as in
    RELION: the likelihood compares each image with its average seen through its CTF and then
    masked, and the M-step is the Wiener estimate Σ w·|CTF|·x / Σ w·CTF² (with ``regularise`` its
    half-set SSNR as the regulariser, else 10⁻³ of the class mass). The images are binned into
    ``ctf_groups_n`` groups of similar CTF (:func:`ctf_groups`), each seen through its group's
    isotropic mean |CTF| (astigmatism is neglected, so it commutes with the rotations), and the
    averages are not re-centred (centring the Wiener averages, noisy at low frequency, cost up to
    0.3 F1). On development stacks with CTF it did not classify better than ML2D on the
    phase-flipped images alone (docs/benchmarks.md), so ``classify`` and ``drvae-bsk`` do not use it.
    """
    images = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    centres = torch.as_tensor(np.asarray(averages), dtype=torch.float32).clone()
    if images.ndim != 3 or images.shape[1] != images.shape[2] or centres.shape[1:] != images.shape[1:]:
        raise ValueError(f"ml2d needs images (n, d, d) and averages (k, d, d) of one size, got "
                         f"{tuple(images.shape)} and {tuple(centres.shape)}")
    if temperature < 1 or anneal_iterations < 0:
        raise ValueError(f"need temperature >= 1 and anneal_iterations >= 0, got {temperature}, {anneal_iterations}")
    if not 0 <= max_shift < images.shape[-1] // 2:
        raise ValueError(f"max_shift must be in 0..{images.shape[-1] // 2 - 1} px, got {max_shift}")
    n, d, _ = images.shape
    k = len(centres)
    mask = alignment_mask(d)
    x = images * mask
    groups = None
    filtered = images  # |CTF|·x: what the M-step sums (the phase-flipped image through its |CTF|)
    if ctf is not None:
        ctf = torch.as_tensor(np.asarray(ctf), dtype=torch.float32)
        if ctf.shape != images.shape:
            raise ValueError(f"ctf must match the images: {tuple(ctf.shape)} vs {tuple(images.shape)}")
        groups = ctf_groups(ctf, ctf_groups_n)
        absc = groups[1][torch.as_tensor(groups[0])]  # (n, d, d)
        filtered = ifft2c(fft2c(images) * absc).real.float()
    angles = torch.arange(n_angles, dtype=torch.float32) * (2 * math.pi / n_angles)
    shifts = _shifts(max_shift)
    log_prior = torch.full((k,), -math.log(k), dtype=torch.float64)
    # the M-step's sums over the two half sets (even, odd images) that τ² needs, else over all
    halves = (torch.stack([torch.arange(n) % 2 == 0, torch.arange(n) % 2 == 1]) if regularise
              else torch.ones((1, n), dtype=torch.bool)).float()  # (H, n)
    h = len(halves)
    # σ² from the hard fit of the starting averages: the mean best residual per masked pixel
    # (σ² = −1/2 turns the log weights into the costs themselves)
    best_cost = _group_log_weights(x, centres, angles, mask, groups, -0.5, torch.zeros(k, dtype=torch.float64),
                                   max_shift).reshape(n, -1).amin(1)
    pixels = float((mask * mask).sum())
    sigma2 = max(float(best_cost.mean()) / pixels, 1e-12)
    for i in range(iterations):
        temp = temperature ** (1 - i / anneal_iterations) if i < anneal_iterations else 1.0
        logw = _group_log_weights(x, centres, angles, mask, groups, sigma2 * temp, log_prior, max_shift)
        w = torch.softmax(logw.reshape(n, -1), dim=1).reshape(logw.shape).float()  # (n, S, k, R)
        # M-step: Σ_i w_iskr · roll(image_i, -shift_s), then each (k, r) sum rotated back by -angle_r
        sums = torch.zeros((h, k, n_angles, d * d))
        for j, (dy, dx) in enumerate(shifts):
            rolled = torch.roll(filtered, (-dy, -dx), dims=(1, 2)).reshape(n, -1)
            sums += torch.einsum("hn,nkr,np->hkrp", halves, w[:, j], rolled)
        back = rotate_images(sums.reshape(h * k * n_angles, 1, d, d), -angles.repeat(h * k)).reshape(h * k, n_angles, d, d).sum(1)
        mass_h = torch.einsum("hn,nskr->hk", halves, w).reshape(h * k).clamp(min=1e-12)  # (H k,)
        mass = mass_h.reshape(h, k).sum(0)
        if regularise or groups is not None:
            num = fft2c(back.double())
            if groups is None:
                den = mass_h.double()[:, None, None].expand(num.shape)
            else:  # Σ_i w_ik CTF_i² per half set
                den = torch.einsum("hn,nk,np->hkp", halves.double(), w.sum(dim=(1, 3)).double(),
                                   absc.square().reshape(n, -1).double()).reshape(num.shape)
            if regularise:
                centres = torch.as_tensor(ssnr_wiener_averages(num.numpy(), den.contiguous().numpy(), tau2_fudge))
            else:
                centres = ifft2c(num / torch.maximum(den, 1e-3 * mass.double()[:, None, None])).real.float()
        else:
            centres = back / mass[:, None, None]
        if max_shift > 0 and groups is None:  # (with a CTF the centring made things worse: see docs)
            centres = centred_averages(centres)
        # σ²: the posterior-expected residual per masked pixel; class weights: their posterior mass
        cost = -2 * sigma2 * temp * (logw - log_prior[None, None, :, None])
        sigma2 = max(float((w.double() * cost).sum()) / (n * pixels), 1e-12)
        log_prior = torch.log((mass / n).double().clamp(min=1e-12))
    logw = _group_log_weights(x, centres, angles, mask, groups, sigma2, log_prior, max_shift)
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
