"""``cryoprior reconstruct``: gold-standard MAP reconstruction of a particle STAR file.

Known poses (``rlnAngleRot/Tilt/Psi``, ``rlnOriginX/YAngst``) are taken from the STAR unless
``refine``; then the poses are searched from a start map (``start``, or ``truth`` low-passed to
``start_lowpass_a``). Half sets come from ``rlnRandomSubset`` (alternating rows without it).
CTFs from the RELION columns when present. The run folder (written atomically) holds
``map.mrc``, ``half1.mrc``, ``half2.mrc``, ``fsc.json`` and ``config.yaml``.

True angles, for the angular error of ``refine``, are the STAR's own angles when the STAR is a
simulated dataset (it has the simulator's truth column ``cpCleanImageName``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cryoprior.config import config_to_dict, validated, write_run_config
from cryoprior.core.filters import lowpass
from cryoprior.core.fsc import fsc, resolution_at, shell_frequencies_a
from cryoprior.errors import InputError
from cryoprior.fileutil import atomic_dir, output_folder
from cryoprior.io.mrc import write_map
from cryoprior.io.relion import ctf_from_star, half_sets, poses_from_star
from cryoprior.io.stack import ParticleStack
from cryoprior.io.star import OpticsFlags
from cryoprior.nn.training import DEVICES, resolve_device
from cryoprior.progress import bar
from cryoprior.recon.accumulate import Accumulator, backproject
from cryoprior.recon.mstep import (
    HalfSetResult,
    ReconstructionConfig,
    cw_thresholds,
    load_prior_denoiser,
    reconstruct_halves,
)
from cryoprior.recon.refine import HalfData, RefineConfig, refine

log = logging.getLogger(__name__)

TRUTH_MARKER = "cpCleanImageName"


@dataclass
class ReconstructJob:
    """What the command does beyond the M-step (:class:`ReconstructionConfig`) and the search
    (:class:`RefineConfig`)."""

    denoiser: str | None = field(default=None, metadata={"help": "denoiser model (default: the shipped one)"})
    refine: bool = field(default=False, metadata={"help": "search the poses instead of using the STAR's"})
    truth: str | None = field(default=None, metadata={"help": "true map (MRC/PDB/builtin id) for the FSC to truth"})
    start: str | None = field(default=None, metadata={"help": "start map for --refine (default: --truth low-passed)"})
    start_lowpass_a: float = field(default=30.0, metadata={"help": "low-pass of the start map, Å"})
    device: str = field(default="cpu", metadata={"choices": list(DEVICES), "help": "torch device"})
    chunk: int = field(default=256, metadata={"help": "particles per back-projection batch"})

    def validate(self, recon: ReconstructionConfig | None = None, refine_cfg: RefineConfig | None = None) -> None:
        """Check this job and the M-step / search configs it runs with, before any work."""
        if self.chunk < 1:
            raise InputError(f"--chunk must be >= 1, got {self.chunk}")
        if not (math.isfinite(self.start_lowpass_a) and self.start_lowpass_a > 0):
            raise InputError(f"--start-lowpass-a must be a positive number of Å, got {self.start_lowpass_a}")
        resolve_device(self.device)  # InputError for cuda without a GPU
        for config in (recon, refine_cfg if self.refine else None):
            if config is not None:
                validated(config)  # ReconstructionConfig.validate: finite numbers, λ >= 0, 0 < FSC threshold < 1


def _load_map(spec: str, box: int, pixel_size_a: float, device) -> torch.Tensor:
    from cryoprior.sim.structures import (
        load_volume,  # scipy.ndimage: ~0.5 s of start-up, only for --truth/--start
    )

    return load_volume(spec, box, pixel_size_a).float().to(device)


def known_pose_accumulators(
    stack: ParticleStack, subset: np.ndarray, pad: int = 2, device: str = "cpu", chunk: int = 256
) -> list[Accumulator]:
    """B and K of half 1 and half 2 at the STAR's poses (CTF and origin offsets applied). Real
    images: one of each Hermitian pair is inserted, the grids completed at the end."""
    device = torch.device(device)
    accs = [Accumulator.zeros(stack.box, pad, device) for _ in range(2)]
    with bar(len(stack), "reconstruct: back-projecting") as pbar:
        for start, images in stack.chunks(chunk):
            rows = np.arange(start, start + len(images))
            rots, shifts = poses_from_star(stack, rows)
            ctf = ctf_from_star(stack, rows, device)
            imgs = torch.from_numpy(images).to(device)
            for h in (1, 2):
                sel = torch.from_numpy(np.flatnonzero(subset[rows] == h)).to(device)
                if len(sel):
                    c = None if ctf is None else ctf[sel]
                    backproject(imgs[sel], rots.to(device)[sel], c, shifts.to(device)[sel], out=accs[h - 1], pad=pad,
                                half=True)
            pbar.update(len(images))
    return [acc.complete_hermitian() for acc in accs]


def refine_stack(
    stack: ParticleStack, subset: np.ndarray, start: torch.Tensor, recon: ReconstructionConfig,
    refine_cfg: RefineConfig, denoiser=None, device: str = "cpu",
) -> tuple[HalfSetResult, list[dict]]:
    """Refine the poses of both halves (in memory) from ``start``; returns maps and history."""
    device = torch.device(device)
    has_truth = stack.has_column(TRUTH_MARKER) and stack.has_column("rlnAngleRot")
    halves = []
    for h in (1, 2):
        rows = np.flatnonzero(subset == h)
        true_rots = poses_from_star(stack, rows)[0].to(device) if has_truth else None
        ctf = ctf_from_star(stack, rows, device)
        halves.append(HalfData(torch.from_numpy(stack.images(rows)).to(device), ctf, None, None, true_rots))
    result = refine(halves, start, stack.pixel_size_a, refine_cfg, recon, denoiser)
    return result.maps, result.history


def fsc_report(maps: HalfSetResult, pixel_size_a: float, truth: torch.Tensor | None, prior: str) -> dict:
    """The JSON of ``fsc.json``: curves per shell and resolutions at 0.143 and 0.5."""
    d = maps.full.volume.shape[-1]
    report: dict = {
        "prior": prior,
        "lambda": maps.full.lam,
        "box": d,
        "pixel_size_a": pixel_size_a,
        "frequency_per_a": [round(float(f), 6) for f in shell_frequencies_a(d, pixel_size_a)],
        "fsc_half": [round(float(v), 5) for v in maps.fsc_half],
        "fsc_half_unregularised": [round(float(v), 5) for v in maps.fsc_unregularised],
    }
    for thr, tag in ((0.143, "0143"), (0.5, "05")):
        report[f"resolution_half_{tag}_a"] = round(resolution_at(maps.fsc_half, d, pixel_size_a, thr), 3)
        report[f"resolution_half_unregularised_{tag}_a"] = round(
            resolution_at(maps.fsc_unregularised, d, pixel_size_a, thr), 3
        )
    if truth is not None:
        curve = fsc(maps.full.volume, truth.to(maps.full.volume), ndim=3)
        report["fsc_truth"] = [round(float(v), 5) for v in curve]
        for thr, tag in ((0.143, "0143"), (0.5, "05")):
            report[f"resolution_truth_{tag}_a"] = round(resolution_at(curve, d, pixel_size_a, thr), 3)
    return report


def run_reconstruct(
    star: str | Path,
    out_dir: str | Path,
    job: ReconstructJob,
    recon: ReconstructionConfig,
    refine_cfg: RefineConfig | None = None,
    argv: list[str] | None = None,
    overwrite: bool = False,
    optics: OpticsFlags | None = None,
) -> dict:
    """Reconstruct ``star`` into the run folder ``out_dir``; returns the ``fsc.json`` content."""
    refine_cfg = refine_cfg or RefineConfig()
    job.validate(recon, refine_cfg)
    stack = ParticleStack.from_file(star, optics)
    inputs = [star, *stack.stack_paths, job.truth, job.start, job.denoiser]
    with output_folder(out_dir, inputs, overwrite, argv):
        return _run_reconstruct(stack, star, out_dir, job, recon, refine_cfg, argv, overwrite)


def _run_reconstruct(stack, star, out_dir, job: ReconstructJob, recon: ReconstructionConfig,
                     refine_cfg: RefineConfig, argv, overwrite: bool) -> dict:
    device = resolve_device(job.device)
    subset = half_sets(stack)
    truth = _load_map(job.truth, stack.box, stack.pixel_size_a, device) if job.truth else None
    denoiser = load_prior_denoiser(job.denoiser, device) if recon.prior != "gaussian" else None
    if recon.prior == "cw-red":  # unset thresholds: the model's calibrated ones (recorded in config.yaml)
        try:
            low, high = cw_thresholds(recon, denoiser)
        except ValueError as exc:
            raise InputError(f"invalid option: {exc}") from exc
        recon = dataclasses.replace(recon, cw_low_a=low, cw_high_a=high)
    if job.refine:
        if job.start is not None:
            start = _load_map(job.start, stack.box, stack.pixel_size_a, device)
        elif truth is not None:
            start = lowpass(truth, job.start_lowpass_a, pixel_size_a=stack.pixel_size_a, ndim=3)
        else:
            raise InputError("--refine needs a start map: give --start MAP or --truth MAP")
        maps, history = refine_stack(stack, subset, start, recon, refine_cfg, denoiser, job.device)
    else:
        acc1, acc2 = known_pose_accumulators(stack, subset, recon.pad, device, job.chunk)
        maps, history = reconstruct_halves(acc1, acc2, stack.pixel_size_a, recon, denoiser), []
    report = fsc_report(maps, stack.pixel_size_a, truth, recon.prior)
    report["n_particles"] = len(stack)
    if history:
        report["refine_history"] = history
        errors = [h for h in history if "angular_error_mean_deg" in h]
        if errors:
            report["angular_error_mean_deg"] = errors[-1]["angular_error_mean_deg"]
            report["angular_error_median_deg"] = errors[-1]["angular_error_median_deg"]
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        write_map(tmp / "map.mrc", maps.full.volume.cpu(), stack.pixel_size_a)
        write_map(tmp / "half1.mrc", maps.half1.volume.cpu(), stack.pixel_size_a)
        write_map(tmp / "half2.mrc", maps.half2.volume.cpu(), stack.pixel_size_a)
        (tmp / "fsc.json").write_text(json.dumps(report, indent=2))
        write_run_config(
            tmp / "config.yaml", job, argv, input=str(Path(star).absolute()),
            reconstruction=config_to_dict(recon), refinement=config_to_dict(refine_cfg) if job.refine else None,
        )
    log.info("wrote %s (half-map resolution %.2f Å)", out_dir, report["resolution_half_0143_a"])
    return report

