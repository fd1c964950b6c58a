"""Gold-standard 3D refinement: E-step over an orientation grid, M-step by eq. (11) or RED.

Each half set (``rlnRandomSubset``) is refined against its own map. The E-step scores every
candidate pose ``(A, s)`` of image ``X`` with the Gaussian likelihood of eq. (8),

    log p(X | A, s) = −½ Σ_k |X_s(k) − CTF(k) P_A(k)|² / σ²(|k|)   (k within the current radius)

(``X_s`` the transform shifted by the origin offset ``s``, ``P_A`` the central slice of the
reference, σ² the noise power per shell re-estimated every iteration from the residuals at the
best poses), turns the scores into posterior weights over the poses, keeps the ``top_k`` and
back-projects each image at those poses with its weight (marginalisation). Work happens on
Fourier-cropped images of size ``2 · radius + 2`` (RELION's current size).

Orientations: the first iteration without known poses searches a global grid (Fibonacci
directions × in-plane steps, :func:`global_grid`); later iterations search a local cube of
rotation vectors around each particle's best pose, halving the step every iteration
(coarse to fine), and shifts around its best shift.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch

from cryoprior.core.fft import fft2c
from cryoprior.core.filters import soft_sphere_mask
from cryoprior.core.fsc import radial_shell_index
from cryoprior.core.projection import project_fourier, shift_phase, volume_fourier
from cryoprior.core.rotations import angular_distance_deg, euler_to_matrix, quaternion_to_matrix
from cryoprior.progress import bar
from cryoprior.recon.accumulate import Accumulator, backproject
from cryoprior.recon.mstep import Denoiser, HalfSetResult, ReconstructionConfig, reconstruct_halves

log = logging.getLogger(__name__)


@dataclass
class RefineConfig:
    """The E-step search and the iteration schedule."""

    iterations: int = field(default=4, metadata={"help": "refinement iterations"})
    global_step_deg: float = field(default=15.0, metadata={"help": "angular step of the global search"})
    local_step_deg: float = field(default=5.0, metadata={"help": "first local step (halved each iteration)"})
    min_step_deg: float = field(default=1.0, metadata={"help": "smallest local step"})
    shift_range_px: float = field(default=2.0, metadata={"help": "global shift search ± px"})
    shift_step_px: float = field(default=1.0, metadata={"help": "shift step, px (halved locally)"})
    top_k: int = field(default=4, metadata={"help": "poses kept per particle"})
    min_radius_px: int = field(default=6, metadata={"help": "smallest comparison radius, Fourier px"})
    radius_margin_px: int = field(default=3, metadata={"help": "shells beyond the resolution compared"})
    mask_radius_frac: float = field(default=0.45, metadata={"help": "reference mask radius / box"})
    batch_size: int = field(default=64, metadata={"help": "particles per E-step batch"})

    def validate(self) -> None:
        if self.iterations < 1 or self.top_k < 1 or self.batch_size < 1:
            raise ValueError("iterations, top_k and batch_size must be >= 1")
        if not (self.global_step_deg > 0 and self.local_step_deg > 0 and self.min_step_deg > 0):
            raise ValueError("angular steps must be positive")
        if self.shift_range_px < 0 or self.shift_step_px <= 0:
            raise ValueError("need shift_range_px >= 0 and shift_step_px > 0")


@dataclass
class HalfData:
    """One half set in memory: images ``(n, d, d)``, CTFs ``(n, d, d)`` or None, poses."""

    images: torch.Tensor
    ctf: torch.Tensor | None
    rotations: torch.Tensor | None = None  # (n, 3, 3) current best, None before a global search
    shifts_px: torch.Tensor | None = None  # (n, 2) current best origin offsets
    true_rotations: torch.Tensor | None = None  # (n, 3, 3) for the angular error


@dataclass
class RefineResult:
    maps: HalfSetResult
    halves: list[HalfData]
    history: list[dict]


# ---------------------------------------------------------------------------- orientation grids
def global_grid(step_deg: float, device=None) -> torch.Tensor:
    """About uniform SO(3) sampling: ``≈ 4π / step²`` Fibonacci directions × ``360 / step`` psi.

    Returns ``(n, 3, 3)`` float32 (RELION Euler convention, direction = third row of A).
    """
    step = math.radians(step_deg)
    n_dirs = max(1, round(4 * math.pi / step**2))
    n_psi = max(1, round(360.0 / step_deg))
    i = torch.arange(n_dirs, dtype=torch.float64)
    z = 1 - 2 * (i + 0.5) / n_dirs
    phi = i * math.pi * (3 - math.sqrt(5))
    tilt = torch.rad2deg(torch.arccos(z.clamp(-1, 1)))
    rot = torch.rad2deg(phi) % 360.0
    psi = torch.arange(n_psi, dtype=torch.float64) * (360.0 / n_psi)
    mats = euler_to_matrix(rot[:, None], tilt[:, None], psi[None, :])  # (n_dirs, n_psi, 3, 3)
    return mats.reshape(-1, 3, 3).float().to(device)


def rotation_vector_grid(step_deg: float, extent: int = 1, device=None) -> torch.Tensor:
    """Small rotations ``exp(ω)``, ω on the cube ``step · {−extent..extent}³``. ``(m, 3, 3)``."""
    r = torch.arange(-extent, extent + 1, dtype=torch.float64) * math.radians(step_deg)
    w = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)  # (m, 3)
    angle = w.norm(dim=1, keepdim=True)
    axis = torch.where(angle > 0, w / angle.clamp(min=1e-12), torch.tensor([0.0, 0.0, 1.0], dtype=w.dtype))
    q = torch.cat([torch.cos(angle / 2), axis * torch.sin(angle / 2)], dim=1)  # (w, x, y, z)
    return quaternion_to_matrix(q).float().to(device)


def shift_grid(range_px: float, step_px: float, device=None) -> torch.Tensor:
    """Offsets ``(m, 2)`` on a square grid ``−range..range`` with ``step`` (0 included)."""
    k = int(math.floor(range_px / step_px + 1e-9))
    r = torch.arange(-k, k + 1, dtype=torch.float32) * step_px
    return torch.stack(torch.meshgrid(r, r, indexing="xy"), -1).reshape(-1, 2).to(device)


# ---------------------------------------------------------------------------- E-step
def _crop2(f: torch.Tensor, size: int) -> torch.Tensor:
    lo = f.shape[-1] // 2 - size // 2
    return f[..., lo : lo + size, lo : lo + size]


def _crop3(f: torch.Tensor, size: int) -> torch.Tensor:
    lo = f.shape[-1] // 2 - size // 2
    return f[..., lo : lo + size, lo : lo + size, lo : lo + size]


def _embed3(small: torch.Tensor, n: int) -> torch.Tensor:
    out = small.new_zeros(n, n, n)
    lo = n // 2 - small.shape[-1] // 2
    m = small.shape[-1]
    out[lo : lo + m, lo : lo + m, lo : lo + m] = small
    return out


def _current_size(box: int, radius: float) -> int:
    """Even-compatible crop size ``2 · ceil(radius) + 2`` (same parity as ``box``), ≤ box."""
    size = 2 * math.ceil(radius) + 2
    size += (size - box) % 2
    return min(box, size)


@dataclass
class _Search:
    """What one E-step batch returns: kept poses and weights, best pose, residual power."""

    rotations: torch.Tensor  # (b, k, 3, 3)
    shifts: torch.Tensor  # (b, k, 2)
    weights: torch.Tensor  # (b, k)


def _scores(x, c2w, phase, projections, local: bool) -> torch.Tensor:
    """Log-likelihoods up to a per-image constant. x ``(b, M)`` = CTF·X/σ², c2w ``(b, M)`` =
    CTF²/σ², phase ``(b|1, S, M)``, projections ``(R, M)`` (global) or ``(b, C, M)`` (local).
    Returns ``(b, S, R|C)``."""
    y = x[:, None, :] * phase  # (b, S, M)
    if not local:
        yr = torch.cat([y.real, y.imag], -1)  # (b, S, 2M): Re(y · conj(p)) as one real matmul
        pr = torch.cat([projections.real, projections.imag], -1)  # (R, 2M)
        cross = yr @ pr.T  # (b, S, R)
        quad = c2w @ (projections.abs() ** 2).T  # (b, R)
        return cross - 0.5 * quad[:, None, :]
    cross = torch.einsum("bsm,bcm->bsc", y, projections.conj()).real  # (b, S, C)
    quad = torch.einsum("bm,bcm->bc", c2w, projections.abs() ** 2)  # (b, C)
    return cross - 0.5 * quad[:, None, :]


def _top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior weights of the ``k`` best of ``(b, S, R)`` scores: ``(b, k)`` weights and
    flat indices; poses under 1 % of the best are dropped (weight 0)."""
    flat = scores.reshape(scores.shape[0], -1)  # (b, S·R)
    k = min(k, flat.shape[1])
    top, idx = flat.topk(k, dim=1)
    w = torch.softmax(top, dim=1)
    w = torch.where(w >= 1e-2 * w[:, :1], w, 0.0)
    return w / w.sum(dim=1, keepdim=True), idx


def e_step(
    half: HalfData, volume: torch.Tensor, noise_var: torch.Tensor, radius: float, config: RefineConfig,
    step_deg: float | None, pad: int = 2, desc: str = "E-step",
) -> _Search:
    """Score the poses of every image of ``half`` against ``volume`` within ``radius`` Fourier px.

    ``step_deg=None`` (or no current poses): global search on :func:`global_grid`; else a local
    search of ``3³`` rotations at ``step_deg`` and ``5²`` shifts around the best pose.
    """
    n, d, _ = half.images.shape
    dev = half.images.device
    size = _current_size(d, radius)
    vol_c = _crop3(volume_fourier(volume, pad), pad * size)  # central (pad·size)³ of the transform
    f = torch.arange(size, device=dev, dtype=torch.float32) - size // 2
    inside = (f[:, None] ** 2 + f[None, :] ** 2) <= radius**2  # (size, size)
    shells = radial_shell_index(size, 2, dev).clamp(max=noise_var.shape[0] - 1)[inside]
    inv_sig2 = 1.0 / noise_var.to(dev, torch.float32)[shells]  # (M,)
    local = step_deg is not None and half.rotations is not None
    if local:
        deltas = rotation_vector_grid(step_deg, 1, dev)  # (C, 3, 3)
        offsets = shift_grid(config.shift_step_px, config.shift_step_px / 2, dev)  # (S, 2)
    else:
        grid = global_grid(config.global_step_deg, dev)
        offsets = shift_grid(config.shift_range_px, config.shift_step_px, dev)
        proj = torch.cat([project_fourier(vol_c, grid[s : s + 512], size)[:, inside] for s in range(0, len(grid), 512)])
    out_r, out_s, out_w = [], [], []
    with bar(n, desc) as pbar:
        for start in range(0, n, config.batch_size):
            sl = slice(start, start + config.batch_size)
            x = _crop2(fft2c(half.images[sl]), size)[:, inside]  # (b, M)
            c = _crop2(half.ctf[sl], size)[:, inside] if half.ctf is not None else torch.ones_like(x.real)
            base = half.shifts_px[sl] if (local and half.shifts_px is not None) else torch.zeros(x.shape[0], 2, device=dev)
            shifts = base[:, None, :] + offsets[None]  # (b, S, 2)
            phase = shift_phase(shifts, size, d)[..., inside]  # (b, S, M)
            xw, c2w = x * c * inv_sig2, c * c * inv_sig2
            if local:
                cand = half.rotations[sl][:, None] @ deltas[None]  # (b, C, 3, 3)
                p = project_fourier(vol_c, cand.reshape(-1, 3, 3), size)[:, inside]
                scores = _scores(xw, c2w, phase, p.reshape(x.shape[0], len(deltas), -1), True)
            else:
                cand = grid
                scores = _scores(xw, c2w, phase, proj, False)
            w, idx = _top_k(scores, config.top_k)
            n_rot = scores.shape[2]
            si, ri = idx // n_rot, idx % n_rot  # (b, k)
            rows = torch.arange(x.shape[0], device=dev)[:, None]
            out_r.append(cand[rows, ri] if local else cand[ri])
            out_s.append(shifts[rows, si])
            out_w.append(w)
            pbar.update(x.shape[0])
    return _Search(torch.cat(out_r), torch.cat(out_s), torch.cat(out_w))


def noise_spectrum(half: HalfData, volume: torch.Tensor, pad: int = 2, batch: int = 256) -> torch.Tensor:
    """σ² per 2D shell ``(d // 2 + 1,)``: mean ``|X_s − CTF · P_A|²`` at the current best poses
    (or of ``|X|²`` before any pose is known)."""
    n, d, _ = half.images.shape
    shells = radial_shell_index(d, 2, half.images.device)
    keep = shells <= d // 2
    sums = torch.zeros(d // 2 + 1, dtype=torch.float64, device=half.images.device)
    vol_ft = volume_fourier(volume, pad) if half.rotations is not None else None
    for start in range(0, n, batch):
        sl = slice(start, start + batch)
        x = fft2c(half.images[sl])
        if vol_ft is not None:
            if half.shifts_px is not None:
                x = x * shift_phase(half.shifts_px[sl], d)
            p = project_fourier(vol_ft, half.rotations[sl], d)
            x = x - (half.ctf[sl] * p if half.ctf is not None else p)
        power = (x.abs() ** 2).double().sum(0)  # (d, d)
        sums.index_add_(0, shells[keep], power[keep])
    counts = torch.bincount(shells[keep], minlength=d // 2 + 1).double() * n
    return (sums / counts).float().clamp(min=1e-12)


def m_step_accumulate(half: HalfData, search: _Search, noise_var: torch.Tensor, size: int, pad: int = 2) -> Accumulator:
    """Back-project every image at its kept poses with their weights (Fourier crop ``size``)."""
    n, d, _ = half.images.shape
    acc = Accumulator.zeros(size, pad, half.images.device)
    k = search.weights.shape[1]
    for start in range(0, n, 128):
        sl = slice(start, start + 128)
        w = search.weights[sl]  # (b, k)
        use = w > 0
        x = _crop2(fft2c(half.images[sl]), size)[:, None].expand(-1, k, -1, -1)[use]  # (m, size, size)
        x = x * shift_phase(search.shifts[sl][use], size, d)
        c = _crop2(half.ctf[sl], size)[:, None].expand(-1, k, -1, -1)[use] if half.ctf is not None else None
        backproject(x, search.rotations[sl][use], c, None, w[use], noise_var[: size // 2 + 1], acc, pad, fourier=True)
    if size == d:
        return acc
    n_full = pad * d
    return Accumulator(_embed3(acc.data, n_full), _embed3(acc.weight, n_full), d, pad)


# ---------------------------------------------------------------------------- the loop
def _angular_error(half: HalfData) -> torch.Tensor | None:
    if half.true_rotations is None or half.rotations is None:
        return None
    return angular_distance_deg(half.rotations.double(), half.true_rotations.double())


def refine(
    halves: list[HalfData],
    start_volume: torch.Tensor,
    pixel_size_a: float,
    config: RefineConfig,
    recon: ReconstructionConfig,
    denoiser: Denoiser | None = None,
) -> RefineResult:
    """Refine both half sets from ``start_volume`` ``(d, d, d)`` (e.g. the truth low-passed to
    30 Å). Halves with poses start with a local search, otherwise with a global one."""
    config.validate()
    recon.validate()
    if len(halves) != 2:
        raise ValueError(f"expected two half sets, got {len(halves)}")
    d = start_volume.shape[-1]
    mask = soft_sphere_mask(d, config.mask_radius_frac * d, 3.0, 3, start_volume.device)
    refs = [start_volume * mask, start_volume * mask]
    noise = [noise_spectrum(h, refs[i], recon.pad) for i, h in enumerate(halves)]
    radius = float(config.min_radius_px)
    step = config.local_step_deg if all(h.rotations is not None for h in halves) else None
    history: list[dict] = []
    maps: HalfSetResult | None = None
    for it in range(1, config.iterations + 1):
        t0 = time.perf_counter()
        last = it == config.iterations
        size = d if last else _current_size(d, radius + config.radius_margin_px)
        accs = []
        for i, h in enumerate(halves):
            search = e_step(h, refs[i], noise[i], radius, config, step, recon.pad, f"refine it {it} half {i + 1}")
            best = search.weights.argmax(dim=1)
            rows = torch.arange(len(best), device=best.device)
            h.rotations, h.shifts_px = search.rotations[rows, best], search.shifts[rows, best]
            accs.append(m_step_accumulate(h, search, noise[i], size, recon.pad))
            noise[i] = noise_spectrum(h, refs[i], recon.pad)
        maps = reconstruct_halves(accs[0], accs[1], pixel_size_a, recon, denoiser, r_max=size // 2)
        refs = [maps.half1.volume * mask, maps.half2.volume * mask]
        res_a = maps.resolution_a(pixel_size_a, recon.fsc_threshold, regularised=False)
        res_shell = d * pixel_size_a / res_a
        entry = {
            "iteration": it,
            "search": "global" if step is None else f"local {step:g} deg",
            "radius_px": radius,
            "current_size": size,
            "resolution_half_a": round(maps.resolution_a(pixel_size_a, recon.fsc_threshold), 3),
            "resolution_unregularised_a": round(res_a, 3),
            "lambda": maps.half1.lam,
            "seconds": round(time.perf_counter() - t0, 2),
        }
        errors = [e for e in (_angular_error(h) for h in halves) if e is not None]
        if errors:
            err = torch.cat(errors)
            entry["angular_error_mean_deg"] = round(float(err.mean()), 3)
            entry["angular_error_median_deg"] = round(float(err.median()), 3)
        history.append(entry)
        log.info("refine iteration %s", entry)
        radius = float(min(d // 2, max(config.min_radius_px, math.ceil(res_shell) + config.radius_margin_px)))
        step = config.local_step_deg if step is None else max(config.min_step_deg, step / 2)
    assert maps is not None  # iterations >= 1 was validated
    return RefineResult(maps, halves, history)
