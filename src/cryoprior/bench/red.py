"""``cryoprior bench red``: Gaussian vs RED vs CW-RED on structures the denoiser never saw.

For four held-out structures × four SNRs: simulated particles (uniform SO(3), CTF, shifts), a
known-pose gold-standard reconstruction with each prior — FSC to truth (0.5 and 0.143) and the
half-map resolution (0.143; with a learned prior it can over-estimate the true one, which the
paper warns of) — and, on a subset, refinement from the truth low-passed (angular error). Each
known-pose row says whether it is a *target case* (the Gaussian half-map resolution finer than
CW-RED's λ = 0 threshold ``cw_low_a``: the model's calibrated one, else 10 Å) and there whether
RED / CW-RED beat the Gaussian's FSC-to-truth 0.143 resolution; the Markdown counts them.

The known-pose timing against cryoDRGN lives in :mod:`cryoprior.bench.red_timing`.
Writes ``bench_red.md``, ``bench_red.json`` and ``fsc_<structure>.png`` under ``out_dir``.
"""

from __future__ import annotations

import json
import logging
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cryoprior.bench.common import pick_structures, read_truth, simulate_heldout
from cryoprior.bench.red_timing import time_known_pose, timing_markdown
from cryoprior.core.filters import gaussian_lowpass, lowpass
from cryoprior.core.fsc import fsc, resolution_at
from cryoprior.errors import CryopriorError
from cryoprior.fileutil import atomic_path
from cryoprior.io.relion import half_sets
from cryoprior.io.stack import ParticleStack
from cryoprior.recon.mstep import (
    ReconstructionConfig,
    cw_thresholds,
    load_prior_denoiser,
    reconstruct_halves,
)
from cryoprior.recon.refine import RefineConfig
from cryoprior.sim.structures import (
    recommended_pixel_size_a,
)
from cryoprior.workflows.reconstruct import known_pose_accumulators, refine_stack

log = logging.getLogger(__name__)

PRIORS = ("gaussian", "red", "cw-red")


def _denoiser(device: str, model: str | None = None):
    if model is not None:  # a trained run folder: its errors are the user's to see
        return load_prior_denoiser(model, device), f"prior3d model {model}"
    try:
        return load_prior_denoiser(None, device), "shipped prior3d model"
    except CryopriorError as exc:
        note = f"STAND-IN gaussian_lowpass(sigma=1 px): the shipped prior3d model is unavailable ({exc})"
        return (lambda v: gaussian_lowpass(v, 1.0, ndim=3)), note


def _row(maps, truth: torch.Tensor, pixel: float, box: int) -> dict:
    curve = fsc(maps.full.volume, truth, ndim=3)
    return {
        "lambda": round(maps.full.lam, 3),
        "res_truth_05_a": round(resolution_at(curve, box, pixel, 0.5), 2),
        "res_truth_0143_a": round(resolution_at(curve, box, pixel, 0.143), 2),
        "res_half_0143_a": round(resolution_at(maps.fsc_half, box, pixel), 2),
        "fsc_truth": [round(float(v), 4) for v in curve],
        "fsc_half": [round(float(v), 4) for v in maps.fsc_half],
    }


def _plot(path: Path, structure: str, rows: list[dict], freqs: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    snrs = sorted({r["snr"] for r in rows})
    fig, axes = plt.subplots(1, len(snrs), figsize=(4 * len(snrs), 3.4), squeeze=False)
    for ax, snr in zip(axes[0], snrs):
        for r in (r for r in rows if r["snr"] == snr):
            line = ax.plot(freqs, r["fsc_truth"], label=f"{r['prior']} vs truth")[0]
            ax.plot(freqs, r["fsc_half"], "--", color=line.get_color(), label=f"{r['prior']} half maps")
        ax.axhline(0.143, color="grey", lw=0.5)
        ax.axhline(0.5, color="grey", lw=0.5)
        ax.set(title=f"{structure}, SNR {snr:g}", xlabel="1/Å", ylim=(-0.1, 1.02))
    axes[0][0].set_ylabel("FSC")
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def target_cases(rows: list[dict], half_limit_a: float) -> tuple[list[dict], dict]:
    """Copies of the known-pose ``rows`` with ``target_case`` (the Gaussian half-map 0.143
    resolution of that structure and SNR finer than ``half_limit_a``, CW-RED's λ = 0 limit; λ
    itself comes from the unregularised half maps, so close to the limit it may still be 0) and,
    for RED / CW-RED rows there, ``beats_gaussian`` (FSC-to-truth 0.143 resolution finer than
    the Gaussian's; None elsewhere); and the counts over (structure, SNR) cases."""
    gauss = {(r["structure"], r["snr"]): r for r in rows if r["prior"] == "gaussian"}
    out = []
    for r in rows:
        g = gauss[(r["structure"], r["snr"])]
        target = g["res_half_0143_a"] < half_limit_a
        beats = r["res_truth_0143_a"] < g["res_truth_0143_a"] if target and r["prior"] != "gaussian" else None
        out.append({**r, "target_case": target, "beats_gaussian": beats})
    summary = {"half_limit_a": half_limit_a, "cases": len(gauss),
               "met": sum(g["res_half_0143_a"] < half_limit_a for g in gauss.values())}
    for prior in ("red", "cw-red"):
        summary[f"{prior}_beats_gaussian"] = sum(r["beats_gaussian"] is True for r in out if r["prior"] == prior)
    return out, summary


def _target_cell(r: dict) -> str:
    if not r["target_case"]:
        return "no"
    return "yes" if r["beats_gaussian"] is None else ("yes: beats G" if r["beats_gaussian"] else "yes: not better")


def _markdown(result: dict) -> str:
    tc = result["target_case"]
    pixels = sorted({r["pixel_size_a"] for r in result["known_pose"]})
    lines = [
        "# RED benchmark: Gaussian vs RED vs CW-RED", "",
        f"Denoiser: {result['denoiser']}.  Structures: {', '.join(result['structures'])} "
        f"({result['structures_source']}).  Box {result['box']}, {result['n']} particles per dataset, CTF, "
        f"uniform SO(3).  {result['seconds']:.0f} s on {result['threads']} threads.", "",
        "## Known poses (resolutions in Å; half = half-map FSC 0.143, truth = FSC to truth)", "",
        f"Pixel sizes {pixels[0]:g}–{pixels[-1]:g} Å (recommended_pixel_size_a: radius ≤ 0.4·box·pixel; "
        f"Nyquist {2 * pixels[0]:g}–{2 * pixels[-1]:g} Å).  Target case: the Gaussian half-map resolution "
        f"finer than {tc['half_limit_a']:g} Å (CW-RED's λ > 0): met in {tc['met']} of {tc['cases']} "
        f"(structure, SNR) cases; there RED beat the Gaussian's truth 0.143 in {tc['red_beats_gaussian']}/"
        f"{tc['met']}, CW-RED in {tc['cw-red_beats_gaussian']}/{tc['met']}.", "",
        "| structure | px Å | SNR | prior | λ | truth 0.5 | truth 0.143 | half 0.143 | target case |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["known_pose"]:
        lines.append(
            f"| {r['structure']} | {r['pixel_size_a']:g} | {r['snr']:g} | {r['prior']} | {r['lambda']:.2f} | "
            f"{r['res_truth_05_a']:.2f} | {r['res_truth_0143_a']:.2f} | {r['res_half_0143_a']:.2f} | {_target_cell(r)} |"
        )
    lines += ["", f"## Refinement (start: truth low-passed to {result['refine_start_lowpass_a']:g} Å, "
              f"{result['refine_iterations']} iterations, global search first)", "",
              "| structure | SNR | prior | angular error mean ° | median ° | truth 0.5 | half 0.143 |",
              "|---|---|---|---|---|---|---|"]
    for r in result["refine"]:
        lines.append(
            f"| {r['structure']} | {r['snr']:g} | {r['prior']} | {r['angular_error_mean_deg']:.1f} | "
            f"{r['angular_error_median_deg']:.1f} | {r['res_truth_05_a']:.2f} | {r['res_half_0143_a']:.2f} |"
        )
    return "\n".join(lines + timing_markdown(result["timing"]))


def run(
    quick: bool = True, n: int | None = None, box: int | None = None, out_dir: str | Path = "bench_red",
    snrs: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3), device: str = "cpu", seed: int = 0,
    timing_n: int | None = None, n_structures: int = 4, model: str | None = None,
) -> dict:
    """The benchmark; ``quick`` (box 32, 1,000 particles, refinement of one structure at the two
    highest SNRs with 400 particles, timing on 2,000 64² particles) runs in minutes on 2 cores.
    ``timing_n`` overrides the timing's particle count (10,000 in full), ``n_structures`` the
    number of held-out structures (for smoke runs); ``model`` a trained prior (default: the shipped one)."""
    t_start = time.perf_counter()
    box = box or (32 if quick else 48)
    n = n or (1000 if quick else 4000)
    n_refine, refine_snrs = (400, snrs[-2:]) if quick else (n // 2, snrs)
    refine_structures = 1 if quick else 4
    structures, source = pick_structures(n_structures)
    denoiser, denoiser_note = _denoiser(device, model)
    refine_cfg = RefineConfig(iterations=3, top_k=2)
    start_lowpass_a = 15.0
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    known, refined = [], []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for si, structure in enumerate(structures):
            pixel = recommended_pixel_size_a(structure, box)
            rows = []
            for k, snr in enumerate(snrs):
                folder = simulate_heldout(tmp, structure, box, pixel, n, snr, seed + 10 * si + k)
                stack = ParticleStack.from_file(folder / "particles.star")
                truth, _ = read_truth(folder)
                subset = half_sets(stack)
                acc1, acc2 = known_pose_accumulators(stack, subset, 2, device)
                for prior in PRIORS:
                    maps = reconstruct_halves(acc1, acc2, pixel, ReconstructionConfig(prior=prior), denoiser)
                    rows.append({"structure": structure, "pixel_size_a": pixel, "snr": snr, "prior": prior, **_row(maps, truth, pixel, box)})
                    log.info("bench red %s", {k: v for k, v in rows[-1].items() if not k.startswith("fsc")})
                if si < refine_structures and snr in refine_snrs:
                    sub = stack.subset(np.arange(min(n_refine, len(stack))))
                    start = lowpass(truth, start_lowpass_a, pixel_size_a=pixel, ndim=3)
                    for prior in PRIORS:
                        maps, history = refine_stack(sub, half_sets(sub), start, ReconstructionConfig(prior=prior), refine_cfg, denoiser, device)
                        row = {"structure": structure, "snr": snr, "prior": prior, "n": len(sub), **_row(maps, truth, pixel, box)}
                        row.update({k: history[-1][k] for k in ("angular_error_mean_deg", "angular_error_median_deg")})
                        row["history"] = history
                        refined.append(row)
            known += rows
            _plot(out_dir / f"fsc_{structure}.png", structure, rows, np.arange(box // 2 + 1) / (box * pixel))
    timing = time_known_pose(timing_n or (2000 if quick else 10_000), 64, device)
    known, target = target_cases(known, cw_thresholds(ReconstructionConfig(), denoiser)[0])
    result = {
        "quick": quick, "box": box, "n": n, "snrs": list(snrs), "structures": structures,
        "structures_source": source, "denoiser": denoiser_note, "threads": torch.get_num_threads(),
        "machine": platform.machine(), "refine_iterations": refine_cfg.iterations,
        "refine_start_lowpass_a": start_lowpass_a, "known_pose": known, "refine": refined,
        "target_case": target, "timing": timing,
    }
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    with atomic_path(out_dir / "bench_red.json") as tmp_json:
        tmp_json.write_text(json.dumps(result, indent=2))
    with atomic_path(out_dir / "bench_red.md") as tmp_md:
        tmp_md.write_text(_markdown(result))
    summary = {k: v for k, v in result.items() if k not in ("known_pose", "refine")}
    summary["table"] = [{k: v for k, v in r.items() if not k.startswith("fsc") and k != "history"} for r in known + refined]
    summary["out_dir"] = str(out_dir)
    return summary

