"""Fourier-space MAP reconstruction: Gaussian prior, RED and CW-RED (Kimanius et al. 2020).

Notation of the paper, on the padded, centred 3D Fourier grid of :mod:`cryoprior.core.projection`
(``N = pad · d``, zero frequency at ``N // 2``, our unnormalised ``fft2c`` scale):

- eq. (9)   ``B = Σ_i CTF_i · Î_i / σ²``, ``K = Σ_i CTF_i² / σ²`` (trilinear insertion at the poses,
  each image optionally weighted by its pose probability, σ² the per-shell noise power);
- eq. (11)  Gaussian prior: ``x = B / (K + τ⁻²)``;
- eq. (12)  ``τ² = T² · FSC / (1 − FSC) / ⟨K⟩_shell`` per shell (``T`` RELION's fudge factor,
  which RELION applies twice, see :func:`tau2_from_fsc`; ``⟨K⟩`` the mean weight over the
  shell's voxels, FSC clamped to [0.001, 0.999] as RELION); for a map from both halves a
  full-set FSC is used: ``2 FSC / (1 + FSC)`` (``full_set_fsc="ssnr"``: twice the half-set
  SSNR, the statistically right value) or RELION's ``sqrt(2 FSC / (1 + FSC))`` (``"relion"``);
- as RELION's M-step: no prior in shells below ``minres_map`` (there x = B / K), and the
  cropped map's corners are soft-masked (RELION's ``softMaskOutsideMap``) before the gridding
  correction;
- eq. (17)  RED: ``x = (B + λ τ⁻² f(x̃)) / (K + τ⁻²)`` with ``x̃ = B / K`` and ``f`` a denoiser
  applied in real space. We evaluate it as ``(τ² B + λ f̂) / (τ² K + 1)``, defined for τ² = 0.
- CW-RED:   ``λ`` from the half-map resolution, 0 at ``cw_low_a`` or worse, 1 at ``cw_high_a`` or
  better, linear between (the paper's rule), with the model's calibrated thresholds unless set
  (:func:`cw_thresholds`, ``workflows.calibrate_cw_red``).

Shells and the current size: :func:`padded_shells`; unlike RELION on purpose: :func:`map_update`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from cryoprior.core.fft import fft3c, ifft3c
from cryoprior.core.filters import resample, soft_mask_outside_map
from cryoprior.core.fsc import fsc, radial_shell_index, resolution_at
from cryoprior.core.projection import fourier_to_volume, gridding_kernel
from cryoprior.recon.accumulate import Accumulator

Denoiser = Callable[[torch.Tensor], torch.Tensor]
PRIORS = ("gaussian", "red", "cw-red")
FULL_SET_RULES = ("ssnr", "relion")


@dataclass
class ReconstructionConfig:
    """The M-step: prior, padding and the τ² / λ rules."""

    prior: str = field(default="gaussian", metadata={"choices": list(PRIORS), "help": "M-step prior"})
    pad: int = field(default=2, metadata={"help": "Fourier padding factor"})
    tau2_fudge: float = field(default=1.0, metadata={"help": "RELION's τ² fudge factor T"})
    red_lambda: float = field(default=1.0, metadata={"help": "λ of --prior red"})
    cw_low_a: float | None = field(default=None, metadata={
        "help": "CW-RED: λ = 0 at this resolution (Å) or worse [the model's calibrated value (model.json cw_red), else 10]"})
    cw_high_a: float | None = field(default=None, metadata={
        "help": "CW-RED: λ = 1 at this resolution (Å) or better [the model's calibrated value, else 4.5]"})
    fsc_threshold: float = field(default=0.143, metadata={"help": "FSC threshold for the resolution"})
    full_set_fsc: str = field(
        default="ssnr", metadata={"choices": list(FULL_SET_RULES), "help": "full-set map's FSC from the half-set f: "
                                  "ssnr = 2f/(1+f) (twice the half SSNR), relion = sqrt(2f/(1+f)) (RELION 3.1)"}
    )
    minres_map: int = field(default=5, metadata={"help": "no prior in shells below this one (RELION --minres_map)"})
    soft_mask_corners: bool = field(
        default=True, metadata={"help": "soft-mask the corners outside d/2 before the gridding correction (RELION)"}
    )
    shell_gain_after_mask: bool = field(
        default=True, metadata={"help": "apply each shell's mean Wiener gain to the cropped, masked map "
                                "(false: on the padded grid before the crop, RELION's order)"}
    )
    weight_floor: float = field(
        default=1e-3, metadata={"help": "x̃ = B / max(K, floor · mean K): relative floor of K"}
    )

    def validate(self) -> None:
        if self.prior not in PRIORS:
            raise ValueError(f"prior must be one of {PRIORS}, got {self.prior!r}")
        if self.pad < 1:
            raise ValueError(f"pad must be >= 1, got {self.pad}")
        numbers = {"red_lambda": self.red_lambda, "tau2_fudge": self.tau2_fudge, "cw_low_a": self.cw_low_a,
                   "cw_high_a": self.cw_high_a, "weight_floor": self.weight_floor, "fsc_threshold": self.fsc_threshold}
        numbers = {k: v for k, v in numbers.items() if v is not None}  # unset thresholds: the model's
        for name, value in numbers.items():
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        if not self.tau2_fudge > 0:
            raise ValueError(f"tau2_fudge must be positive, got {self.tau2_fudge}")
        if self.red_lambda < 0:
            raise ValueError(f"red_lambda must be >= 0, got {self.red_lambda}")
        for name in ("cw_low_a", "cw_high_a"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.cw_low_a is not None and self.cw_high_a is not None and not self.cw_high_a < self.cw_low_a:
            raise ValueError(f"need 0 < cw_high_a < cw_low_a, got {self.cw_high_a}, {self.cw_low_a}")
        if not 0 < self.fsc_threshold < 1:
            raise ValueError(f"fsc_threshold must lie strictly between 0 and 1, got {self.fsc_threshold}")
        if not self.weight_floor > 0:
            raise ValueError(f"weight_floor must be positive, got {self.weight_floor}")
        if self.full_set_fsc not in FULL_SET_RULES:
            raise ValueError(f"full_set_fsc must be one of {FULL_SET_RULES}, got {self.full_set_fsc!r}")
        if isinstance(self.minres_map, bool) or not isinstance(self.minres_map, int) or self.minres_map < 0:
            raise ValueError(f"minres_map must be an integer shell >= 0, got {self.minres_map!r}")
        for name in ("soft_mask_corners", "shell_gain_after_mask"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")


# ---------------------------------------------------------------------------- shells and τ²
def padded_shells(n: int, pad: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ires, r²)`` on the centred ``(n, n, n)`` grid: ``round(|k| / pad)`` and ``|k|²``.
    Cached for the last grid (one M-step asks ~20 times); treat the tensors as read-only.

    Padded voxel ``k`` belongs to shell ``round(|k| / pad)`` of the original box (as RELION); only
    voxels with ``|k|² < round(r_max · pad)²`` take part (``r_max`` = current size / 2), the rest
    of the result is zero. Real-space maps come out of :func:`~cryoprior.core.projection.
    fourier_to_volume` (cropped, gridding-corrected); :func:`volume_to_fourier` is its inverse."""
    return _padded_shells(n, pad, str(torch.device(device or "cpu")))


@functools.lru_cache(maxsize=1)
def _padded_shells(n: int, pad: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    f = torch.arange(n, device=device, dtype=torch.float64) - n // 2
    r2 = f[:, None, None] ** 2 + f[None, :, None] ** 2 + f[None, None, :] ** 2
    # RELION's ROUND (macros.h:195) rounds halves up: |k| = 1, pad 2 is shell 1 (torch.round: 0)
    return torch.floor(torch.sqrt(r2) / pad + 0.5).long(), r2


def inside_mask(n: int, pad: int, r_max: float, device=None) -> torch.Tensor:
    """Voxels that take part: ``|k|² < round(r_max · pad)²`` (RELION's ``max_r2``). Bool ``(n,)*3``."""
    _, r2 = padded_shells(n, pad, device)
    return r2 < round(r_max * pad) ** 2


def _shell_bins(n: int, pad: int, box: int, r_max: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat shell index of every padded voxel, ``box // 2 + 1`` for voxels outside ``r_max`` (a
    bin that is dropped), and the voxel count per shell ``0..box // 2``. Cached for the last grid."""
    return _shell_bins_cached(n, pad, box, float(r_max), str(torch.device(device or "cpu")))


@functools.lru_cache(maxsize=2)
def _shell_bins_cached(n: int, pad: int, box: int, r_max: float, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    ires, _ = padded_shells(n, pad, device)
    keep = inside_mask(n, pad, r_max, device) & (ires <= box // 2)
    idx = torch.where(keep, ires, box // 2 + 1).reshape(-1)
    return idx, torch.bincount(idx, minlength=box // 2 + 2)[: box // 2 + 1].double()


def shell_sums(values: torch.Tensor, pad: int, box: int, r_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of real ``values`` ``(n, n, n)`` over each shell ``0..box // 2`` inside ``r_max`` and the
    voxel counts, both float64 ``(box // 2 + 1,)``."""
    idx, counts = _shell_bins(values.shape[-1], pad, box, r_max, values.device)
    sums = torch.bincount(idx, weights=values.reshape(-1).double(), minlength=box // 2 + 2)[: box // 2 + 1]
    return sums, counts


def shell_mean_weight(weight: torch.Tensor, pad: int, box: int, r_max: float | None = None) -> torch.Tensor:
    """Mean of K over the padded voxels of each shell ``0..box // 2`` (inside ``r_max``). float64."""
    sums, counts = shell_sums(weight, pad, box, box // 2 if r_max is None else r_max)
    return torch.where(counts > 0, sums / counts.clamp(min=1), 0.0)


def full_set_fsc(fsc_half: torch.Tensor, rule: str = "ssnr") -> torch.Tensor:
    """The FSC that sets τ² of the full-set (joined) map, from the half-set FSC ``f``.

    ``"ssnr"``: ``2 f / (1 + f)`` (f ≥ 0), the FSC expected between two full-set maps: the
    full set has twice the half set's SSNR (tests/test_red.py checks the τ² it gives against
    the true signal power). ``"relion"``: RELION 3.1.3's ``sqrt(2 f / (1 + f))`` with f ≥ 0.001
    (``backprojector.cpp:1107-1113``, "Sqrt-term to get 60-degree phase errors"), which
    regularises the joined map 2.2× (f = 0.5) to 3× (f = 0.143) less than ``"ssnr"``.
    """
    if rule == "relion":
        f = fsc_half.clamp(min=0.001)  # backprojector.cpp:1107 XMIPP_MAX(0.001, fsc)
        return torch.sqrt(2 * f / (f + 1))  # backprojector.cpp:1108-1113
    if rule != "ssnr":
        raise ValueError(f"rule must be one of {FULL_SET_RULES}, got {rule!r}")
    f = fsc_half.clamp(min=0.0)
    return 2 * f / (1 + f)


def tau2_from_fsc(fsc_curve: torch.Tensor, mean_weight: torch.Tensor, fudge: float = 1.0) -> torch.Tensor:
    """Eq. (12) as RELION 3.1.3 applies it: ``τ² = T² · FSC / (1 − FSC) / ⟨K⟩`` per shell, FSC
    clamped to [0.001, 0.999].

    RELION multiplies the SSNR by T in ``updateSSNRarrays`` (``backprojector.cpp:1117``,
    τ²_R = T · SSNR · σ², σ² = 1 / (pad³ ⟨W⟩)) and again in ``reconstruct``
    (``backprojector.cpp:1429``, 1/τ² term = 1 / (pad³ · T · τ²_R)), so the term added to the
    weight is ``⟨K⟩ / (T² · SSNR)``. Shells with no weight get τ² = 0 (the prior alone; zero
    for the Gaussian prior).

    Units of τ² (tested against the truth in ``tests/test_red.py``): the FSC of the cropped half maps
    gives the SSNR of the box-sized map, so eq. (12) makes τ² = pad³ · ⟨|F(V)|²⟩_shell / σ², σ² the
    noise power of one ``fft2c`` coefficient — RELION's ``rlnReferenceTau2`` × pad³. RELION divides
    by pad³ in ``sigma2`` and multiplies by it again in ``invtau2``; the ``1 / τ²`` added to K is the
    same (``⟨K⟩ (1 − FSC) / (T² · FSC)``), and scaling it by 1/4 or 4 raises the error to the truth.
    The Wiener weights do not lower the FSC to the truth on the padded grid, but the crop to the box
    (like any mask) mixes neighbouring shells: where SSNR ≪ 1 the attenuated shell then carries
    leakage from the lower, less-attenuated ones, so the FSC of the *regularised* map to a reference
    falls below that of B / K near 0.143. Resolution is read from the unregularised half maps.
    """
    if fsc_curve.shape != mean_weight.shape:
        raise ValueError(f"fsc {tuple(fsc_curve.shape)} and mean weight {tuple(mean_weight.shape)} differ")
    f = fsc_curve.double().clamp(0.001, 0.999)
    k = mean_weight.double().to(f.device)
    return torch.where(k > 0, fudge**2 * f / (1 - f) / k.clamp(min=1e-300), 0.0)


def tau2_grid(tau2: torch.Tensor, n: int, pad: int, r_max: float | None = None) -> torch.Tensor:
    """Spread per-shell τ² ``(box // 2 + 1,)`` over the padded grid; 0 beyond the shells/r_max."""
    box_half = tau2.shape[0] - 1
    r_max = box_half if r_max is None else r_max
    idx, _ = _shell_bins(n, pad, 2 * box_half, r_max, tau2.device)  # the bin box_half + 1 is outside
    return torch.cat((tau2, tau2.new_zeros(1)))[idx].reshape(n, n, n)


# ---------------------------------------------------------------------------- updates
def map_update(
    data: torch.Tensor, weight: torch.Tensor, tau2: torch.Tensor, prior_ft: torch.Tensor | None = None,
    lam: float = 0.0,
) -> torch.Tensor:
    """``(τ² B + λ f̂) / (τ² K + 1)``, i.e. eq. (11) (no ``prior_ft``) or eq. (17). Same grid shape.

    Unlike RELION: the division is direct (RELION runs 10 Pipe–Menon iterations for density-
    compensation weights; docs/benchmarks.md measures the difference), and the gridding correction
    (``fourier_to_volume``) is the separable ``Π sinc²(x_i / N)``, the exact transform of the
    trilinear kernel (RELION divides by the radial ``sinc²(r / N)``, an approximation of it)."""
    t = tau2.to(weight.dtype)
    num = t * data
    if prior_ft is not None and lam != 0.0:
        num = num + lam * prior_ft
    return num / (t * weight + 1.0)


def regularised_ratio(data: torch.Tensor, weight: torch.Tensor, floor: float = 1e-3) -> torch.Tensor:
    """``x̃ = B / max(K, floor · mean(K > 0))``: the unregularised map, defined where K ≈ 0."""
    pos = weight[weight > 0]
    k0 = floor * (pos.mean() if pos.numel() else torch.ones((), dtype=weight.dtype, device=weight.device))
    return data / torch.maximum(weight, k0)


def volume_to_fourier(volume: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """Inverse of ``fourier_to_volume``: ``fft3c`` of the padded ``volume · gridding kernel``."""
    d = volume.shape[-1]
    n = pad * d
    g = gridding_kernel(d, n, 3, volume.device, volume.dtype)
    lo = n // 2 - d // 2
    padded = torch.nn.functional.pad(volume * g, [lo, n - lo - d] * 3)  # (n, n, n)
    return fft3c(padded)


def apply_denoiser(denoiser: Denoiser, volume: torch.Tensor) -> torch.Tensor:
    """Run ``denoiser`` on ``volume / std`` and scale back (idempotent with a denoiser that
    normalises its input by a scale itself; the background keeps its zero level)."""
    std = volume.std()
    if not float(std) > 0:
        return volume.clone()
    with torch.no_grad():
        out = denoiser(volume / std)
    if out.shape != volume.shape:
        raise ValueError(f"denoiser returned shape {tuple(out.shape)} for input {tuple(volume.shape)}")
    return out.to(volume.dtype) * std


def denoiser_box(denoiser: Denoiser, box: int, pixel_size_a: float | None) -> int:
    """The box at which ``denoiser`` sees a ``box`` map of ``pixel_size_a`` Å/px: the same field of
    view at the nearest pixel size inside the range the denoiser was trained at (its
    ``pixel_size_a = (lo, hi)`` attribute, see ``nn.prior3d.load_denoiser``). ``box`` itself when
    the pixel size or the range is unknown (``pixel_size_a`` None or <= 0) or already inside."""
    trained = getattr(denoiser, "pixel_size_a", None)
    if not trained or not pixel_size_a or pixel_size_a <= 0:
        return box
    target = min(max(pixel_size_a, trained[0]), trained[1])
    return max(8, round(box * pixel_size_a / target))


def apply_denoiser_at_pixel_size(denoiser: Denoiser, volume: torch.Tensor, pixel_size_a: float | None) -> torch.Tensor:
    """:func:`apply_denoiser` on ``volume`` ``(d, d, d)`` resampled in Fourier space to the
    denoiser's training pixel sizes (:func:`denoiser_box`) and back, as RELION 5's Blush
    resamples its input. Coarsening drops the shells beyond the coarser Nyquist: the prior term
    is zero there (the update pulls them towards 0 as the Gaussian prior does)."""
    d = volume.shape[-1]
    inner = denoiser_box(denoiser, d, pixel_size_a)
    if inner == d:
        return apply_denoiser(denoiser, volume)
    return resample(apply_denoiser(denoiser, resample(volume, inner, ndim=3)), d, ndim=3)


def red_prior_fourier(
    data: torch.Tensor, weight: torch.Tensor, box: int, pad: int, denoiser: Denoiser, floor: float = 1e-3,
    pixel_size_a: float | None = None,
) -> torch.Tensor:
    """``f̂ = F(f(x̃))``: x̃ = B / K to real space (cropped, gridding-corrected), f (at the
    denoiser's training pixel size when ``pixel_size_a`` is given), back."""
    x_tilde = regularised_ratio(data, weight, floor)
    vol = fourier_to_volume(x_tilde, box)
    return volume_to_fourier(apply_denoiser_at_pixel_size(denoiser, vol, pixel_size_a), pad)


PAPER_CW_THRESHOLDS_A = (10.0, 4.5)  # Kimanius et al.'s (low, high) for their network: the fallback


def cw_thresholds(config: ReconstructionConfig, denoiser: Denoiser | None = None) -> tuple[float, float]:
    """CW-RED's ``(low_a, high_a)``: each set in ``config`` wins; an unset one is the denoiser's
    calibrated value (its ``cw_red_a = (low, high)`` attribute, from ``model.json``, see
    ``nn.prior3d.load_denoiser``), else the paper's (:data:`PAPER_CW_THRESHOLDS_A`). Raises
    ValueError when the pair is not ``low > high > 0``."""
    model = getattr(denoiser, "cw_red_a", None) or PAPER_CW_THRESHOLDS_A
    low = model[0] if config.cw_low_a is None else config.cw_low_a
    high = model[1] if config.cw_high_a is None else config.cw_high_a
    if not 0 < high < low:
        raise ValueError(f"CW-RED needs 0 < cw_high_a < cw_low_a, got cw_high_a {high:g}, cw_low_a {low:g} "
                         f"(the model's thresholds are {model[0]:g} / {model[1]:g} Å)")
    return float(low), float(high)


def cw_red_lambda(resolution_a: float, low_a: float = 10.0, high_a: float = 4.5) -> float:
    """CW-RED confidence: 0 at ``low_a`` Å or worse, 1 at ``high_a`` or better, linear between
    (the paper's rule; the public reference script's threshold test always yields λ = 1)."""
    if not 0 < high_a < low_a:
        raise ValueError(f"need 0 < high_a < low_a, got {high_a}, {low_a}")
    return float(min(1.0, max(0.0, (low_a - resolution_a) / (low_a - high_a))))


def cw_red_lambda_from_fsc(
    fsc_curve: torch.Tensor, box: int, pixel_size_a: float, low_a: float = 10.0, high_a: float = 4.5,
    threshold: float = 0.143,
) -> float:
    """:func:`cw_red_lambda` at the resolution where the half-map FSC crosses ``threshold``."""
    return cw_red_lambda(resolution_at(fsc_curve, box, pixel_size_a, threshold), low_a, high_a)


# ---------------------------------------------------------------------------- whole M-step
@dataclass
class MapResult:
    volume: torch.Tensor  # (d, d, d)
    tau2: torch.Tensor  # (d // 2 + 1,) per shell
    lam: float  # λ used (0 for the Gaussian prior)


def map_reconstruct(
    acc: Accumulator,
    fsc_curve: torch.Tensor,
    pixel_size_a: float,
    config: ReconstructionConfig,
    denoiser: Denoiser | None = None,
    full_set: bool = False,
    r_max: float | None = None,
    lam: float | None = None,
    tau2: torch.Tensor | None = None,
) -> MapResult:
    """The M-step for one map: τ² from ``fsc_curve`` (the half-set FSC, converted by
    ``config.full_set_fsc`` when ``full_set``), then eq. (11) or eq. (17) with the configured
    prior, B / K in shells below ``config.minres_map``, the crop to the box, the corner soft
    mask (``config.soft_mask_corners``) and the gridding correction. ``pixel_size_a`` (Å/px; 0 =
    unknown: then give ``lam`` for CW-RED) sets CW-RED's λ and the denoiser's input resampling
    (:func:`apply_denoiser_at_pixel_size`). ``lam`` overrides λ;
    ``tau2`` ``(box // 2 + 1,)`` overrides the τ² per shell (already scaled to K)."""
    config.validate()
    box, pad, n = acc.box, acc.pad, acc.data.shape[-1]
    r_max = box // 2 if r_max is None else r_max
    if tau2 is None:
        curve = full_set_fsc(fsc_curve, config.full_set_fsc) if full_set else fsc_curve
        mean_k = shell_mean_weight(acc.weight, pad, box, r_max)
        tau2 = tau2_from_fsc(curve.to(acc.weight.device), mean_k, config.tau2_fudge)
    tau2 = tau2.to(acc.weight.device)
    grid = tau2_grid(tau2, n, pad, r_max)
    if lam is None and config.prior == "cw-red":
        if not pixel_size_a > 0:
            raise ValueError("CW-RED needs the pixel size for λ (or give lam)")
        lam = cw_red_lambda_from_fsc(
            fsc_curve.cpu(), box, pixel_size_a, *cw_thresholds(config, denoiser), config.fsc_threshold
        )
    elif lam is None:
        lam = config.red_lambda if config.prior == "red" else 0.0
    prior_ft = None
    if lam != 0.0:
        if denoiser is None:
            raise ValueError(f"prior {config.prior!r} needs a denoiser")
        prior_ft = red_prior_fourier(acc.data, acc.weight, box, pad, denoiser, config.weight_floor, pixel_size_a)
    split = config.shell_gain_after_mask and prior_ft is not None and lam != 0.0
    # eq. (17) is linear: (τ² B + λ f̂) / (τ² K + 1) = data part + prior part; with the shell gain
    # applied after the mask only the data part (attenuated by the gain) goes that way
    x = map_update(acc.data, acc.weight, grid, None if split else prior_ft, lam)
    prior_part = map_update(torch.zeros_like(acc.data), acc.weight, grid, prior_ft, lam) if split else None
    ires, _ = padded_shells(n, pad, x.device)
    if config.minres_map > 0:
        # RELION adds the 1/τ² term only where ires >= minres_map (backprojector.cpp:1443-1451;
        # default --minres_map 5, ml_optimiser.cpp:452/785): B / K below, whatever the prior
        low = (ires < config.minres_map) & (acc.weight > 0)
        x = torch.where(low, acc.data / acc.weight.clamp(min=1e-300), x)
        if prior_part is not None:
            prior_part = torch.where(low, 0.0, prior_part)
    inside = inside_mask(n, pad, r_max, x.device)

    def to_volume(ft: torch.Tensor) -> torch.Tensor:
        vol = fourier_to_volume(ft * inside, box, gridding_correct=False)
        if config.soft_mask_corners:
            # RELION's order: windowToOridimRealSpace crops and soft-masks the corners
            # (backprojector.cpp:1734 → 2339, mask.cpp:43-97), then griddingCorrect (backprojector.cpp:1747)
            vol = soft_mask_outside_map(vol)
        return vol / gridding_kernel(box, n, 3, vol.device, vol.dtype)

    if not config.shell_gain_after_mask:
        return MapResult(to_volume(x), tau2, float(lam))
    # The crop to the box and the corner mask are real-space masks: they mix neighbouring shells,
    # and where the Wiener gain falls steeply (near FSC 0.143) an attenuated shell then takes in
    # the less attenuated ones below it, which lowers its FSC to the truth (RELION's regularised
    # `relion_reconstruct --fsc` map shows it too; its default map is unregularised: do_map only
    # with --fsc, reconstructor.cpp:683-704, 779). So the shell-mean gain is divided out on the
    # padded grid and applied to the finished map; the in-shell weighting of eq. (11) stays.
    # Without crop and mask both orders give the same map.
    gains = shell_gains(acc.weight, grid, pad, box, r_max, config.minres_map)
    vol = apply_shell_gains(to_volume(x / gains.to(x.device, acc.weight.dtype)[ires.clamp(max=box // 2)]), gains)
    if prior_part is not None:
        vol = vol + to_volume(prior_part)
    return MapResult(vol, tau2, float(lam))


def shell_gains(weight: torch.Tensor, tau2_on_grid: torch.Tensor, pad: int, box: int, r_max: float,
                minres_map: int = 0) -> torch.Tensor:
    """Mean Wiener gain ``τ² K / (τ² K + 1)`` over each shell's voxels inside ``r_max`` (1 below
    ``minres_map``, where the update is B / K), ``(box // 2 + 1,)`` float64; 1 for shells with no
    voxel or a gain below 1e-6 (nothing to undo there)."""
    t = tau2_on_grid.to(weight.dtype)
    sums, counts = shell_sums(t * weight / (t * weight + 1.0), pad, box, r_max)
    mean = sums / counts.clamp(min=1)
    mean[:minres_map] = 1.0
    return torch.where((counts > 0) & (mean > 1e-6), mean, 1.0)


def apply_shell_gains(volume: torch.Tensor, gains: torch.Tensor) -> torch.Tensor:
    """Multiply each Fourier shell ``round(|k|)`` ``0..box // 2`` of ``volume`` ``(box,)*3`` by
    ``gains[shell]`` (shells beyond ``box // 2``, the corners, are left as they are)."""
    box = volume.shape[-1]
    shells = radial_shell_index(box, 3, volume.device)
    g = gains.to(volume.device, volume.dtype)[shells.clamp(max=box // 2)]
    g = torch.where(shells <= box // 2, g, 1.0)
    return ifft3c(fft3c(volume) * g).real


def unregularised_volume(acc: Accumulator, floor: float = 1e-3, soft_mask_corners: bool = False) -> torch.Tensor:
    """Real-space ``B / K`` (floored) inside ``|k| < box / 2``, cropped, optionally corner-masked
    (as RELION's ``windowToOridimRealSpace``) and gridding-corrected. ``(d, d, d)``."""
    n = acc.data.shape[-1]
    x = regularised_ratio(acc.data, acc.weight, floor) * inside_mask(n, acc.pad, acc.box // 2, acc.data.device)
    if not soft_mask_corners:
        return fourier_to_volume(x, acc.box)
    vol = soft_mask_outside_map(fourier_to_volume(x, acc.box, gridding_correct=False))
    return vol / gridding_kernel(acc.box, n, 3, vol.device, vol.dtype)


@dataclass
class HalfSetResult:
    half1: MapResult
    half2: MapResult
    full: MapResult
    fsc_unregularised: torch.Tensor  # FSC of the B/K half maps: the SSNR estimate behind τ²
    fsc_half: torch.Tensor  # FSC of the regularised halves (RELION's gold standard: the line above)

    def resolution_a(self, pixel_size_a: float, threshold: float = 0.143, regularised: bool = True) -> float:
        curve = self.fsc_half if regularised else self.fsc_unregularised
        return resolution_at(curve, self.full.volume.shape[-1], pixel_size_a, threshold)


def reconstruct_halves(
    acc1: Accumulator,
    acc2: Accumulator,
    pixel_size_a: float,
    config: ReconstructionConfig,
    denoiser: Denoiser | None = None,
    r_max: float | None = None,
) -> HalfSetResult:
    """Gold-standard M-step: FSC of the unregularised halves → τ² → prior update of each half
    (own B, K, own x̃) and of the full map (B1 + B2, full-set FSC). λ comes from that FSC."""
    # the SSNR estimate behind τ²: FSC of the B / K halves, corner-masked as RELION's half maps
    # (windowToOridimRealSpace, backprojector.cpp:2339): the unmasked corners' noise lowers it
    # (here by ~0.05 at FSC 0.143), which over-regularises
    fsc_unreg = fsc(*(unregularised_volume(a, config.weight_floor, config.soft_mask_corners) for a in (acc1, acc2)), ndim=3)
    lam = None
    if config.prior == "cw-red":
        lam = cw_red_lambda_from_fsc(
            fsc_unreg.cpu(), acc1.box, pixel_size_a, *cw_thresholds(config, denoiser), config.fsc_threshold
        )
    h1 = map_reconstruct(acc1, fsc_unreg, pixel_size_a, config, denoiser, False, r_max, lam)
    h2 = map_reconstruct(acc2, fsc_unreg, pixel_size_a, config, denoiser, False, r_max, lam)
    full = map_reconstruct(acc1 + acc2, fsc_unreg, pixel_size_a, config, denoiser, True, r_max, lam)
    return HalfSetResult(h1, h2, full, fsc_unreg, fsc(h1.volume, h2.volume, ndim=3))


def load_prior_denoiser(path: str | None, device: torch.device | str = "cpu") -> Denoiser:
    """The learned 3D prior, ``cryoprior.nn.prior3d.load_denoiser(path, device)`` (None: the
    model shipped in the package), imported lazily. Raises ``CryopriorError`` when unavailable."""
    from cryoprior.errors import CryopriorError

    try:
        from cryoprior.nn.prior3d import load_denoiser
    except ImportError as exc:
        raise CryopriorError(
            f"the learned 3D prior is not available ({exc}); use --prior gaussian"
        ) from exc
    return load_denoiser(path, torch.device(device))
