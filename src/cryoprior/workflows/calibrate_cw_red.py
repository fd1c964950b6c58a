"""``cryoprior calibrate-cw-red``: CW-RED's λ thresholds for a 3D prior, set on data it never saw.

CW-RED (Kimanius et al. 2021) weights the RED prior term of eq. (17) by a confidence λ read off
the half-map resolution: 0 at ``low_a`` or worse, 1 at ``high_a`` or better, linear between. The
paper set its 10 Å / 4.5 Å from how its own network did on its validation set; these numbers
belong to the network, so each model gets its own, stored in its ``model.json``::

    "cw_red": {"low_a": ..., "high_a": ..., "calibration": {...}}

which ``nn.prior3d.load_denoiser`` reads and ``recon.mstep.cw_thresholds`` uses whenever the user
sets no ``--cw-low-a`` / ``--cw-high-a``.

The calibration set and the choice of λ*: :func:`calibrate`.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cryoprior.core.fsc import fsc, resolution_at
from cryoprior.errors import InputError
from cryoprior.nn.prior3d import Prior3DConfig, load_denoiser, model_record, write_model_record
from cryoprior.nn.prior3d_data import (
    PSEUDO_PREFIX,
    draw_reconstruction,
    load_truth,
    pair_seed,
    perturb_rotations,
    simulate_particles,
)
from cryoprior.progress import progress
from cryoprior.recon.accumulate import Accumulator, backproject
from cryoprior.recon.mstep import (
    PAPER_CW_THRESHOLDS_A,
    Denoiser,
    ReconstructionConfig,
    cw_red_lambda,
    inside_mask,
    reconstruct_halves,
)
from cryoprior.workflows.train_prior3d import noise_settings

log = logging.getLogger(__name__)

CALIBRATION_SEED_OFFSET = 2_000_000  # pseudo-protein seeds: training uses pseudo:0..N-1
METRICS = ("mean_fsc", "res_0143")
TIE = {"mean_fsc": 1e-4, "res_0143": 1e-3}  # differences below these (FSC, Å) count as equal


@dataclass
class CWRedCalibrationConfig:
    """Options of ``cryoprior calibrate-cw-red`` (the calibration set and the λ grid)."""

    maps: int = field(default=32, metadata={"help": "pseudo-proteins, one simulated data set each"})
    box: int = field(default=32, metadata={"help": "box of the maps"})
    n_particles: list[int] = field(
        default_factory=lambda: [50, 20000], metadata={"nargs": 2, "help": "particle count range (log-uniform)"}
    )
    snr: list[float] = field(
        default_factory=lambda: [0.002, 1.0], metadata={"nargs": 2, "help": "image SNR range (log-uniform)"}
    )
    band_limit_shells: list[int] = field(
        default_factory=lambda: [4, 10],
        metadata={"nargs": "*", "help": "also each map band-limited at current size 2·(resolution shell + n), "
                  "as RELION's (none: full box only)"},
    )
    lambda_steps: int = field(default=20, metadata={"help": "λ grid 0, 1/steps, ..., 1"})
    metric: str = field(
        default="mean_fsc", metadata={"choices": list(METRICS), "help": "what λ maximises: mean FSC to truth over "
                                      "shells 1..r_max of the half maps, or minus their FSC-0.143 resolution"}
    )
    seed: int = field(default=0, metadata={"help": "random seed"})
    device: str = field(default="cpu", metadata={"choices": ("cpu", "cuda"), "help": "torch device"})

    def validate(self) -> None:
        if self.maps < 1 or self.lambda_steps < 1:
            raise InputError(f"maps and lambda_steps must be >= 1, got {self.maps}, {self.lambda_steps}")
        if self.box < 8:
            raise InputError(f"box must be at least 8 voxels, got {self.box}")
        for name, (lo, hi) in (("n_particles", self.n_particles), ("snr", self.snr)):
            if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
                raise InputError(f"{name} must be a range 0 < low <= high, got {lo} {hi}")
        if self.n_particles[0] < 4:
            raise InputError(f"need at least 4 particles (two per half), got {self.n_particles[0]}")
        if any(n < 1 for n in self.band_limit_shells):
            raise InputError(f"band_limit_shells must be >= 1, got {self.band_limit_shells}")
        if self.metric not in METRICS:
            raise InputError(f"metric must be one of {METRICS}, got {self.metric!r}")


# ------------------------------------------------------------------------------- the data
def model_noise_config(model: str | Path | None) -> Prior3DConfig:
    """The ``Prior3DConfig`` a saved model was trained with (``model.json`` ``training.config``;
    unknown keys dropped), the defaults when the record lacks it."""
    cfg = model_record(model)
    training = cfg.get("training") if isinstance(cfg, dict) else None
    record = training.get("config") if isinstance(training, dict) else None
    if not isinstance(record, dict):
        return Prior3DConfig()
    names = {f.name for f in dataclasses.fields(Prior3DConfig)}
    return Prior3DConfig(**{k: v for k, v in record.items() if k in names})


def simulate_halves(spec: str, box: int, index: int, base: Prior3DConfig, seed: int = 0, pad: int = 2,
                    device: str = "cpu") -> dict:
    """One calibration data set: ``spec``'s truth ``(box,)*3``, particles drawn as the prior's
    reconstruction pairs are (``base``'s noise settings: counts, SNR, CTF, pose error), split by
    parity into two halves and back-projected at the perturbed poses. → ``{"acc1", "acc2",
    "truth", "pixel_size_a", "meta"}``."""
    settings = noise_settings(base)
    g = torch.Generator().manual_seed(pair_seed(seed, spec, box, "cw-red", index))
    truth, pixel_size_a = load_truth(spec, box)
    n, snr, pose = draw_reconstruction(settings, g)
    n = max(n, 4)
    images, rots, ctf = simulate_particles(truth, pixel_size_a, n, snr, settings, g)
    est = perturb_rotations(rots, pose, g)
    accs = []
    for half in (0, 1):
        sel = slice(half, None, 2)
        acc = backproject(images[sel].to(device), est[sel].to(device), None if ctf is None else ctf[sel].to(device),
                          pad=pad, half=True)
        accs.append(acc.complete_hermitian())
    meta = {"structure": spec, "n_particles": n, "snr": round(snr, 5), "pose_error_deg": round(pose, 2),
            "pixel_size_a": pixel_size_a}
    return {"acc1": accs[0], "acc2": accs[1], "truth": truth.to(device), "pixel_size_a": pixel_size_a, "meta": meta}


def band_limit(acc: Accumulator, r_max: float) -> Accumulator:
    """B and K zero outside ``|k| < r_max`` shells (RELION's M-step input at current size 2·r_max)."""
    keep = inside_mask(acc.data.shape[-1], acc.pad, r_max, acc.data.device)
    return Accumulator(acc.data * keep, acc.weight * keep, acc.box, acc.pad)


# ----------------------------------------------------------------------------- the λ curve
def _score(vol: torch.Tensor, truth: torch.Tensor, pixel_size_a: float, r_max: float) -> dict:
    curve = fsc(vol, truth, ndim=3)
    box = truth.shape[-1]
    top = max(1, min(box // 2, int(math.floor(r_max))))
    return {"mean_fsc": float(curve[1 : top + 1].mean()),
            "res_0143_a": resolution_at(curve, box, pixel_size_a, 0.143),
            "res_05_a": resolution_at(curve, box, pixel_size_a, 0.5)}


def lambda_curve(case: dict, denoiser: Denoiser, lambdas: list[float], r_max: float | None = None,
                 metric: str = "mean_fsc") -> dict:
    """The RED M-step of ``case`` (``simulate_halves``) at each λ: the input resolution the CW-RED
    rule reads, and per λ the half maps' (mean of the two) and the full map's FSC-to-truth figures.
    ``r_max``: band-limit B, K and the M-step at that shell (None: the whole box)."""
    acc1, acc2, truth, px = case["acc1"], case["acc2"], case["truth"], case["pixel_size_a"]
    box = truth.shape[-1]
    r = box // 2 if r_max is None else r_max
    if r_max is not None:
        acc1, acc2 = band_limit(acc1, r_max), band_limit(acc2, r_max)
    ends = [reconstruct_halves(acc1, acc2, px, ReconstructionConfig(prior="red", red_lambda=lam), denoiser, r_max)
            for lam in (0.0, 1.0)]
    res_in = resolution_at(ends[0].fsc_unregularised, box, px, 0.143)
    rows = []
    for lam in lambdas:  # eq. (17) is linear in λ: map(λ) = map(0) + λ (map(1) − map(0))
        vols = [a.volume + lam * (b.volume - a.volume) for a, b in
                ((ends[0].half1, ends[1].half1), (ends[0].half2, ends[1].half2), (ends[0].full, ends[1].full))]
        h1, h2, full = (_score(v, truth, px, r) for v in vols)
        halves = {k: (h1[k] + h2[k]) / 2 for k in h1}
        rows.append({"lambda": lam, "halves": halves, "full": full})
    keys = {"mean_fsc": lambda row: row["halves"]["mean_fsc"], "res_0143": lambda row: -row["halves"]["res_0143_a"]}
    # λ* = the lowest λ within TIE of the best: a prior term that changes nothing measurable is not trusted
    stars = {name: next(row["lambda"] for row in rows if k(row) >= max(map(k, rows)) - TIE[name])
             for name, k in keys.items()}
    return {"input_res_a": res_in, "r_max": r, "lambda_star": stars[metric], "lambda_star_by": stars,
            "objective": [keys[metric](row) for row in rows], "rows": rows}


# ---------------------------------------------------------------------------- the ramp fit
def _interp(lambdas: list[float], values: list[float], lam: float) -> float:
    for i in range(1, len(lambdas)):
        if lam <= lambdas[i]:
            t = (lam - lambdas[i - 1]) / (lambdas[i] - lambdas[i - 1])
            return values[i - 1] + t * (values[i] - values[i - 1])
    return values[-1]


def ramp_score(curves: list[dict], lambdas: list[float], low_a: float, high_a: float) -> float:
    """Mean objective over ``curves`` with λ from the ramp at each map's input resolution."""
    return sum(_interp(lambdas, c["objective"], cw_red_lambda(c["input_res_a"], low_a, high_a))
               for c in curves) / len(curves)


def fit_ramp(curves: list[dict], lambdas: list[float], step_a: float = 0.25, tol: float = 1e-4) -> dict:
    """``(low_a, high_a)`` on a ``step_a`` grid maximising :func:`ramp_score`. Among ramps within
    ``tol`` of the best: the one closest to the λ* (least squares), then the smallest ``low_a``
    (λ reaches 0 soonest beyond the evidence), then the largest ``high_a``."""
    res = [c["input_res_a"] for c in curves]
    lo_grid = max(step_a, step_a * math.floor(min(res) / step_a) - 2 * step_a)
    hi_grid = step_a * math.ceil(max(res) / step_a) + 2 * step_a
    grid = [lo_grid + i * step_a for i in range(int(round((hi_grid - lo_grid) / step_a)) + 1)]
    scored = []
    for i, high in enumerate(grid):
        for low in grid[i + 1 :]:
            lsq = sum((cw_red_lambda(c["input_res_a"], low, high) - c["lambda_star"]) ** 2 for c in curves)
            scored.append((ramp_score(curves, lambdas, low, high), lsq, low, high))
    best = max(s[0] for s in scored)
    near = [s for s in scored if s[0] >= best - tol]
    score, lsq, low, high = min(near, key=lambda s: (round(s[1], 9), s[2], -s[3]))
    return {"low_a": round(low, 3), "high_a": round(high, 3), "score": score, "lambda_lsq": lsq}


# ------------------------------------------------------------------------------- the job
def _cases(specs: list[str] | None, config: CWRedCalibrationConfig, base: Prior3DConfig):
    """``simulate_halves`` of each of ``specs``, or of ``config.maps`` pseudo-proteins from
    :data:`CALIBRATION_SEED_OFFSET` on, skipping those whose atoms do not fit the box."""
    if specs:
        for index, spec in enumerate(specs):
            yield simulate_halves(spec, config.box, index, base, config.seed, device=config.device)
        return
    made, seed = 0, CALIBRATION_SEED_OFFSET
    while made < config.maps:
        if seed > CALIBRATION_SEED_OFFSET + 10 * config.maps:
            raise InputError(f"only {made} of {config.maps} pseudo-proteins fit a {config.box}³ box")
        try:
            case = simulate_halves(f"{PSEUDO_PREFIX}{seed}", config.box, made, base, config.seed, device=config.device)
        except InputError as exc:  # a pseudo-protein that reaches out of the box
            log.info("skipping %s%d: %s", PSEUDO_PREFIX, seed, exc)
        else:
            made += 1
            yield case
        seed += 1


def calibrate(denoiser: Denoiser, config: CWRedCalibrationConfig, base: Prior3DConfig | None = None,
              specs: list[str] | None = None) -> dict:
    """λ curves of every calibration map (and its band-limited copies) and the fitted ramp.
    ``specs`` overrides the pseudo-proteins (tests).

    Calibration set: procedural pseudo-proteins (``pseudo:<seed>`` of ``nn.prior3d_data``, seeds from
    :data:`CALIBRATION_SEED_OFFSET`, never used for training nor by any benchmark; the builtin
    held-out structures are what ``bench red`` / ``bench relion`` test on, so they are not used here).
    Each map is simulated as the prior's training and validation maps are (``prior3d_data``: uniform
    views, CTF, white noise at one σ per stack, poses perturbed by the model's training pose error),
    with particle counts and SNRs spread over a wider range so that the half-map resolutions span
    ~25 Å to Nyquist; the particles are split into two halves and back-projected (``recon.accumulate``).
    Each case is also band-limited as RELION's M-step input is, at a current image size of
    ``2 · (resolution shell + n)`` (RELION 3.1 ``MlOptimiser::updateImageSizeAndResolutionPointers``:
    n = 10 shells near convergence, a quarter of the half box early on): B and K zero beyond, so
    the FSC the λ rule reads is zero there too.

    For every map the gold-standard RED M-step (``recon.mstep.reconstruct_halves``) is evaluated on a
    λ grid. Eq. (17) is linear in λ (f̂ depends on x̃ = B / K only), so the maps at λ = 0 and λ = 1
    give every other λ exactly. λ* maximises the mean FSC to the truth over shells 1..r_max of the
    two half maps (the references refinement iterates): unlike an FSC-threshold resolution it is
    continuous in λ and sees every shell the prior term changes. The ramp ``(low_a, high_a)`` is
    then the one with the highest mean of that figure over all maps at λ_ramp(input resolution),
    the input resolution being what the rule reads (FSC 0.143 of the unregularised half maps)."""
    config.validate()
    base = base or Prior3DConfig()
    base = dataclasses.replace(base, n_particles=list(config.n_particles), snr=list(config.snr))
    lambdas = [i / config.lambda_steps for i in range(config.lambda_steps + 1)]
    curves, table = [], []
    for case in progress(_cases(specs, config, base), total=len(specs or []) or config.maps, desc="calibrate-cw-red"):
        full = lambda_curve(case, denoiser, lambdas, None, config.metric)
        variants = [("full box", full)]
        shell = config.box / full["input_res_a"] * case["pixel_size_a"]  # resolution as a shell radius
        for n in config.band_limit_shells:
            r_max = float(round(shell) + n)
            if r_max < config.box // 2:  # RELION's current size is at most the box
                variants.append((f"current size {int(2 * r_max)}", lambda_curve(case, denoiser, lambdas, r_max, config.metric)))
        for name, curve in variants:
            curves.append(curve)
            rows = curve["rows"]
            star = next(r for r in rows if r["lambda"] == curve["lambda_star"])
            table.append({**case["meta"], "variant": name, "input_res_a": round(curve["input_res_a"], 2),
                          "lambda_star": curve["lambda_star"],
                          **{f"lambda_star_{k}": v for k, v in curve["lambda_star_by"].items()},
                          **{f"{k}_{tag}": round(r["halves"][k], 4 if k == "mean_fsc" else 2)
                             for tag, r in (("l0", rows[0]), ("l1", rows[-1]), ("star", star))
                             for k in ("mean_fsc", "res_0143_a")}})
    fit = fit_ramp(curves, lambdas)
    summary = {"fitted": fit["score"], "paper_10_4.5": ramp_score(curves, lambdas, *PAPER_CW_THRESHOLDS_A),
               "lambda_0": sum(c["objective"][0] for c in curves) / len(curves),
               "lambda_1": sum(c["objective"][-1] for c in curves) / len(curves),
               "per_map_optimum": sum(max(c["objective"]) for c in curves) / len(curves)}
    return {"low_a": fit["low_a"], "high_a": fit["high_a"], "metric": config.metric,
            "mean_objective": {k: round(v, 5) for k, v in summary.items()},
            "input_res_range_a": [round(min(c["input_res_a"] for c in curves), 2),
                                  round(max(c["input_res_a"] for c in curves), 2)],
            "table": table}


def run_calibration(model: str | Path, config: CWRedCalibrationConfig, argv: list[str] | None = None) -> dict:
    """Calibrate the saved model at ``model`` (folder or ``model.pt``) and write its ``model.json``
    ``cw_red`` record atomically. Raises :class:`InputError` (one line) for a path that is not a
    model, before any work. → the record."""
    config.validate()
    denoiser = load_denoiser(model, config.device)  # InputError naming the file when it is no model
    result = calibrate(denoiser, config, model_noise_config(model))
    record = {"low_a": result["low_a"], "high_a": result["high_a"], "calibration": {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
        "command": " ".join(argv) if argv else "cryoprior calibrate-cw-red",
        "config": dataclasses.asdict(config),
        **{k: v for k, v in result.items() if k not in ("low_a", "high_a")}}}
    write_model_record(model, "cw_red", record)
    return record


def markdown_table(record: dict) -> str:
    """The calibration table (one row per map and variant) as Markdown."""
    lines = ["| structure | particles | SNR | variant | input res (Å) | λ* | mean FSC λ=0 / λ=1 / λ* | "
             "truth 0.143 λ=0 / λ=1 (Å) |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(record["calibration"]["table"], key=lambda r: r["input_res_a"]):
        lines.append(f"| {r['structure']} | {r['n_particles']} | {r['snr']:g} | {r['variant']} | "
                     f"{r['input_res_a']:.2f} | {r['lambda_star']:.2f} | {r['mean_fsc_l0']:.3f} / "
                     f"{r['mean_fsc_l1']:.3f} / {r['mean_fsc_star']:.3f} | {r['res_0143_a_l0']:.2f} / "
                     f"{r['res_0143_a_l1']:.2f} |")
    return "\n".join(lines)
