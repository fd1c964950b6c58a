"""Training pairs for the learned 3D prior: noisy intermediate maps and their targets.

A pair is ``(input, target)`` on one structure's grid ``(d, d, d)``:

- ``reconstruction`` noise model (Kimanius et al. 2020): project the truth at ``n`` uniform
  orientations, apply a CTF (random defocus), add white noise at ``snr`` (one σ per stack, as
  :mod:`cryoprior.core.noise`), and reconstruct with the true poses perturbed by a random
  rotation of ``pose_error_deg`` RMS angle and a small Wiener constant (unregularised):
  ``input`` then carries the noise and blur of a refinement intermediate.
- ``gaussian`` noise model: ``input = truth + σ N(0, 1)`` with ``σ = level · std(truth)``
  (std inside the inscribed sphere).

Target ``half-map`` (the paper's): the particles are split into two halves, ``input`` is half 1's
map and ``target = truth × FSC(half 1, half 2)`` per shell (the Gaussian model draws two noise
maps); ``fsc-truth``: ``target = fsc_weighted_lowpass(truth, fsc(input, truth))``, more amplitude
near the resolution limit. Either way the truth at the input's resolution, so the network learns
to remove noise, not to invent detail. ``band_limit`` (a probability) cuts a pair at RELION's
current size (:func:`band_limit_shell`). Maps are divided by the input's :func:`sphere_std`.

Augmentation by the 24 proper rotations of the cube about voxel ``d // 2``
(:func:`cube_rotations`): exact, by axis permutations and flips (with a one-voxel roll for even
``d``, so the centre ``d // 2`` stays put).
"""

from __future__ import annotations

import itertools
import math
import zlib
from dataclasses import dataclass

import torch

from cryoprior.core.ctf import apply_ctf, ctf_2d
from cryoprior.core.filters import soft_sphere_mask
from cryoprior.core.fsc import fsc, fsc_weighted_lowpass, shell_filter
from cryoprior.core.noise import add_noise
from cryoprior.core.projection import project, reconstruct
from cryoprior.core.rotations import quaternion_to_matrix, random_rotations
from cryoprior.errors import InputError
from cryoprior.sim.structures import load_volume, recommended_pixel_size_a

NOISE_MODELS = ("reconstruction", "gaussian")
TARGETS = ("half-map", "fsc-truth")
PSEUDO_PREFIX = "pseudo:"
PSEUDO_BOX_EDGE_A = 96.0  # pseudo-proteins: box edge in Å at every box size (3 Å pixels at 32)
PSEUDO_ATOMS = (1500, 3500)  # heavy-atom count range, drawn from the seed


# ------------------------------------------------------------------------------ cube rotations
def _permutation_sign(perm: tuple[int, ...]) -> int:
    inversions = sum(1 for i, j in itertools.combinations(range(len(perm)), 2) if perm[i] > perm[j])
    return -1 if inversions % 2 else 1


def _cube_group() -> list[tuple[tuple[int, int, int], tuple[int, int, int]]]:
    """The 24 (permutation, signs) with ``det = sign(perm) · prod(signs) = +1``; identity first."""
    out = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            if _permutation_sign(perm) * math.prod(signs) == 1:
                out.append((perm, signs))
    return out


def cube_rotation_matrices(dtype=torch.float64) -> torch.Tensor:
    """The 24 rotations of the cube as signed permutation matrices ``(24, 3, 3)`` (det +1).

    They act on voxel offsets from the centre in array order ``(z, y, x)``; matrix ``k`` is the
    one :func:`cube_rotations` applies as its ``k``-th output: ``out_k[c + R p] = vol[c + p]``.
    """
    mats = torch.zeros(24, 3, 3, dtype=dtype)
    for k, (perm, signs) in enumerate(_cube_group()):
        for i in range(3):
            mats[k, i, perm[i]] = signs[i]
    return mats


def _flip_about_centre(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``out[q] = x[2c - q]`` along ``dim`` (``c = d // 2``, periodic): a flip, rolled for even d."""
    out = torch.flip(x, (dim,))
    return torch.roll(out, 1, dim) if x.shape[dim] % 2 == 0 else out


def rotate_cube(vol: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th (0..23) cube rotation of ``vol`` ``(..., d, d, d)`` about voxel ``d // 2``."""
    perm, signs = _cube_group()[k]
    lead = vol.dim() - 3
    out = vol.permute(*range(lead), *(lead + p for p in perm))
    for i, s in enumerate(signs):
        if s < 0:
            out = _flip_about_centre(out, lead + i)
    return out


def cube_rotations(vol: torch.Tensor) -> torch.Tensor:
    """All 24 proper rotations of a cubic volume ``(d, d, d)`` → ``(24, d, d, d)``, identity first."""
    if vol.dim() != 3 or len(set(vol.shape)) != 1:
        raise InputError(f"expected a cubic volume (d, d, d), got shape {tuple(vol.shape)}")
    return torch.stack([rotate_cube(vol, k) for k in range(24)])


# ------------------------------------------------------------------------------- normalisation
def sphere_std(vol: torch.Tensor) -> torch.Tensor:
    """Standard deviation of ``vol`` ``(..., d, d, d)`` inside the inscribed sphere. → ``(...,)``."""
    d = vol.shape[-1]
    mask = soft_sphere_mask(d, d / 2, 0.0, 3, vol.device, vol.dtype) > 0
    inside = vol[..., mask]  # (..., m)
    return inside.std(dim=-1).clamp(min=torch.finfo(vol.dtype).tiny)


# --------------------------------------------------------------------------------- structures
def pair_seed(*parts: object) -> int:
    """A stable seed from names and numbers (``hash()`` is salted per process)."""
    return zlib.crc32("/".join(map(str, parts)).encode())


def load_truth(spec: str, box: int) -> tuple[torch.Tensor, float]:
    """Ground-truth map ``(box, box, box)`` and its pixel size (Å) for a builtin id, file or pseudo.

    Structures use :func:`recommended_pixel_size_a` (the molecule fills ~80 % of the box);
    ``"pseudo:<seed>"`` is a procedural pseudo-protein (:mod:`cryoprior.sim.pseudo`) of
    1500-3500 atoms in a box :data:`PSEUDO_BOX_EDGE_A` wide, which it fills about as much.
    """
    if spec.startswith(PSEUDO_PREFIX):
        from cryoprior.sim.pseudo import pseudo_protein

        seed = int(spec[len(PSEUDO_PREFIX) :])
        pixel_size_a = PSEUDO_BOX_EDGE_A / box
        u = float(torch.rand((), generator=torch.Generator().manual_seed(seed)))
        n_atoms = int(PSEUDO_ATOMS[0] + u * (PSEUDO_ATOMS[1] - PSEUDO_ATOMS[0]))
        return pseudo_protein(box, pixel_size_a, n_atoms, seed), pixel_size_a
    pixel_size_a = recommended_pixel_size_a(spec, box)
    return load_volume(spec, box, pixel_size_a), pixel_size_a


# -------------------------------------------------------------------------------------- pairs
@dataclass
class NoiseSettings:
    """Ranges the pair parameters are drawn from (log-uniform for counts, SNRs and levels)."""

    n_particles: tuple[int, int] = (200, 3000)
    snr: tuple[float, float] = (0.005, 0.2)
    pose_error_deg: float = 3.0
    ctf: bool = True
    defocus_um: tuple[float, float] = (1.0, 3.0)
    wiener_constant: float = 1e-3
    gaussian_level: tuple[float, float] = (0.3, 5.0)
    target: str = "fsc-truth"
    band_limit: float = 0.0  # probability that a pair is cut at RELION's current size
    band_limit_extra_shells: tuple[int, int] = (4, 10)


def _log_uniform(lo: float, hi: float, g: torch.Generator) -> float:
    u = float(torch.rand((), generator=g, dtype=torch.float64))
    return math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))


def perturb_rotations(
    rotations: torch.Tensor, rms_deg: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Compose ``(n, 3, 3)`` rotations with random small ones of RMS angle ``rms_deg``.

    Each error rotation has a uniform random axis and an angle whose three components are
    N(0, (rms_deg/√3)²), so ``E[angle²] = rms_deg²``. Returns ``(n, 3, 3)``.
    """
    if rms_deg <= 0:
        return rotations.clone()
    n = rotations.shape[0]
    half = torch.randn(n, 3, generator=generator, dtype=torch.float64)
    half = half * math.radians(rms_deg) / math.sqrt(3) / 2  # (n, 3) half-angle rotation vectors
    angle = half.norm(dim=-1, keepdim=True)
    q = torch.cat([torch.cos(angle), torch.sinc(angle / math.pi) * half], dim=-1)  # (n, 4) w,x,y,z
    return quaternion_to_matrix(q).to(rotations) @ rotations


def simulate_particles(
    truth: torch.Tensor,
    pixel_size_a: float,
    n_particles: int,
    snr: float,
    settings: NoiseSettings,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Noisy projections of ``truth`` ``(d, d, d)`` at ``n`` uniform orientations, CTF-modulated
    (random defocus) when ``settings.ctf``, white noise at ``snr`` (one σ per stack).
    → images ``(n, d, d)``, true rotations ``(n, 3, 3)``, CTFs ``(n, d, d)`` or None."""
    d = truth.shape[-1]
    rots = random_rotations(n_particles, generator, dtype=torch.float32)
    images = project(truth, rots)  # (n, d, d)
    ctf = None
    if settings.ctf:
        lo, hi = settings.defocus_um
        df = (lo + (hi - lo) * torch.rand(n_particles, generator=generator)) * 1e4  # Å
        ctf = ctf_2d(d, pixel_size_a, df, df, 0.0, dtype=images.dtype)  # (n, d, d)
        images = apply_ctf(images, ctf)
    noisy, _ = add_noise(images, snr, generator, per_stack=True)
    return noisy, rots, ctf


def reconstruction_input(
    truth: torch.Tensor,
    pixel_size_a: float,
    n_particles: int,
    snr: float,
    pose_error_deg: float,
    settings: NoiseSettings,
    generator: torch.Generator,
) -> torch.Tensor:
    """An unregularised reconstruction of ``truth`` ``(d, d, d)`` from noisy projections. → ``(d, d, d)``."""
    noisy, rots, ctf = simulate_particles(truth, pixel_size_a, n_particles, snr, settings, generator)
    est = perturb_rotations(rots, pose_error_deg, generator)
    return reconstruct(noisy, est, ctf=ctf, wiener_constant=settings.wiener_constant)


def reconstruction_halves(
    truth: torch.Tensor, pixel_size_a: float, draw: tuple[int, float, float], settings: NoiseSettings,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two unregularised half-set reconstructions (particles split by parity, as
    ``rlnRandomSubset`` splits them) of ``truth`` ``(d, d, d)``; ``draw`` is
    :func:`draw_reconstruction`'s ``(n_particles, snr, pose_error_deg)``. → ``(half1, half2)``."""
    n_particles, snr, pose_error_deg = draw
    noisy, rots, ctf = simulate_particles(truth, pixel_size_a, max(n_particles, 2), snr, settings, generator)
    est = perturb_rotations(rots, pose_error_deg, generator)
    return tuple(  # type: ignore[return-value]
        reconstruct(noisy[h::2], est[h::2], ctf=None if ctf is None else ctf[h::2],
                    wiener_constant=settings.wiener_constant)
        for h in (0, 1)
    )


def band_limit_shell(fsc_half: torch.Tensor, extra_shells: int) -> int:
    """RELION 3.1's current size after an iteration, as a shell radius: the last shell before the
    half-map FSC first drops below 0.143, plus ``extra_shells`` (``MlOptimiser::
    updateImageSizeAndResolutionPointers``: ``current_size = 2·(resolution shell + incr)``, incr 4
    by default, 10 when the resolution stalls), at most ``d // 2``."""
    below = (fsc_half[1:] < 0.143).nonzero()
    last = int(below[0]) if len(below) else len(fsc_half) - 1
    return min(len(fsc_half) - 1, last + extra_shells)


def draw_reconstruction(settings: NoiseSettings, generator: torch.Generator) -> tuple[int, float, float]:
    """``(n_particles, snr, pose_error_deg)`` of one reconstruction pair: log-uniform count and SNR
    in the settings' ranges, pose error uniform in ``[0, settings.pose_error_deg]``."""
    n = int(round(_log_uniform(*settings.n_particles, generator)))
    snr = _log_uniform(*settings.snr, generator)
    pose = settings.pose_error_deg * float(torch.rand((), generator=generator))
    return n, snr, pose


def make_pair(
    spec: str, box: int, noise_model: str, index: int, settings: NoiseSettings, seed: int = 0
) -> dict:
    """Pair ``index`` of structure ``spec`` at ``box``, deterministic in its arguments.

    Returns ``{"input", "target", "truth"}`` (each ``(box,)*3`` float32, divided by the input's
    :func:`sphere_std`), ``"scale"`` (that std) and ``"meta"`` (the drawn parameters and FSCs).
    """
    if noise_model not in NOISE_MODELS:
        raise InputError(f"noise_model must be one of {NOISE_MODELS}, got {noise_model!r}")
    g = torch.Generator().manual_seed(pair_seed(seed, spec, box, noise_model, index))
    truth, pixel_size_a = load_truth(spec, box)
    meta: dict = {"structure": spec, "box": box, "pixel_size_a": pixel_size_a, "index": index}
    if settings.target not in TARGETS:
        raise InputError(f"target must be one of {TARGETS}, got {settings.target!r}")
    half_map = settings.target == "half-map"
    if noise_model == "reconstruction":
        n, snr, pose = draw_reconstruction(settings, g)
        if half_map:
            noisy, other = reconstruction_halves(truth, pixel_size_a, (n, snr, pose), settings, g)
        else:
            noisy = reconstruction_input(truth, pixel_size_a, n, snr, pose, settings, g)
        meta.update(n_particles=n, snr=snr, pose_error_deg=pose)
    else:
        level = _log_uniform(*settings.gaussian_level, g)
        sigma = level * sphere_std(truth)
        maps = [truth + sigma * torch.randn(truth.shape, generator=g, dtype=truth.dtype)
                for _ in range(2 if half_map else 1)]
        noisy, other = maps[0], maps[-1]
        meta.update(gaussian_level=level)
    if half_map:
        fsc_half = fsc(noisy, other, ndim=3)  # (box // 2 + 1,)
        weights = fsc_half.clamp(0.0, 1.0)
        meta["fsc_half"] = [round(float(v), 4) for v in fsc_half]
    else:
        fsc_half, weights = None, None
    if float(torch.rand((), generator=g)) < settings.band_limit:
        lo, hi = settings.band_limit_extra_shells
        extra = int(torch.randint(lo, hi + 1, (), generator=g))
        if fsc_half is None:  # a full map's FSC to the truth f ↔ half maps' FSC f² / (2 − f²)
            f2 = fsc(noisy, truth, ndim=3).clamp(min=0.0) ** 2
            fsc_half = f2 / (2.0 - f2)
        r_max = band_limit_shell(fsc_half, extra)
        keep = (torch.arange(box // 2 + 1) <= r_max).to(noisy.dtype)
        noisy = shell_filter(noisy, keep, ndim=3)
        weights = keep if weights is None else weights * keep
        meta["band_limit_shell"] = r_max
    curve = fsc(noisy, truth, ndim=3)  # (box // 2 + 1,)
    if half_map:
        target = shell_filter(truth, weights, ndim=3)
    else:
        target = fsc_weighted_lowpass(truth, curve, ndim=3)
        if weights is not None:
            target = shell_filter(target, weights, ndim=3)
    scale = sphere_std(noisy)
    meta["fsc_input"] = [round(float(v), 4) for v in curve]
    meta["fsc_target"] = [round(float(v), 4) for v in fsc(target, truth, ndim=3)]
    return {
        "input": (noisy / scale).float(),
        "target": (target / scale).float(),
        "truth": (truth / scale).float(),
        "scale": float(scale),
        "meta": meta,
    }
