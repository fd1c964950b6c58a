"""RELION's external reconstruction (``relion_refine --external_reconstruct``) with our priors.

RELION writes ``<root>_external_reconstruct.star`` and three MRCs and runs
``$RELION_EXTERNAL_RECONSTRUCT_EXECUTABLE <root>_external_reconstruct.star`` from its project
folder, half 1 and half 2 at the same time; the files' layout is read and written by
:mod:`cryoprior.io.relion` (``read_job``, ``halfcomplex_to_centred``, ``write_tau2_star``).

When the general block names ``rlnExtReconsResultStarfile``, RELION reads it back after the call
(``BackProjector::externalReconstruct``) and takes its ``rlnReferenceTau2`` as the new τ² (and
``τ² / σ²`` as data-vs-prior); we write there the τ² the update used in RELION's units (ours ÷
``pad³ · T``) and the FSC it was given.

The pixel size (for CW-RED's λ, the log and the result's header) is, in this order: the STAR's
``rlnPixelSize`` (RELION ≥ 4.0.1), ``--pixel-size`` / ``CRYOPRIOR_PIXEL_SIZE``, then the run's
``<out>_it<NNN>[_half1]_model.star`` and ``<out>_it<NNN>_data.star``
(:func:`~cryoprior.io.relion.find_run_pixel_size`). Not found: a warning, and CW-RED uses λ = 0;
never an error, since any non-zero exit makes RELION abort the whole MPI job
(``backprojector.cpp:1282``). The τ² handed back holds only the shells with τ² > 0 (see
:func:`run_external`). A τ²/FSC table that does not cover every shell is the exception: that
request is corrupt, we exit non-zero and remove any result left from an earlier call.

The update is the one of :mod:`cryoprior.recon.mstep` (scales, τ² sources and what is written:
:func:`_run_job`); results are written atomically, nothing else is written.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cryoprior.core.fsc import resolution_at
from cryoprior.errors import InputError
from cryoprior.io.mrc import write_map
from cryoprior.io.relion import (
    ExternalJob,
    IncompleteTableError,
    find_run_pixel_size,
    halfcomplex_to_centred,
    read_grid,
    read_job,
    write_tau2_star,
)
from cryoprior.recon.accumulate import Accumulator
from cryoprior.recon.mstep import (
    FULL_SET_RULES,
    PRIORS,
    ReconstructionConfig,
    cw_thresholds,
    load_prior_denoiser,
    map_reconstruct,
)

log = logging.getLogger(__name__)

#: Environment variables read when the matching flag is not given (RELION passes no flags).
ENV = {
    "prior": "CRYOPRIOR_PRIOR",
    "denoiser": "CRYOPRIOR_DENOISER",
    "tau2_source": "CRYOPRIOR_TAU2",
    "red_lambda": "CRYOPRIOR_RED_LAMBDA",
    "pixel_size_a": "CRYOPRIOR_PIXEL_SIZE",
    "device": "CRYOPRIOR_DEVICE",
    "full_set_fsc": "CRYOPRIOR_FULL_SET_FSC",
    "minres_map": "CRYOPRIOR_MINRES_MAP",
}


@dataclass
class RelionExternalConfig:
    """Options of ``cryoprior relion-external``; None = environment variable, then default."""

    prior: str | None = field(default=None, metadata={"choices": list(PRIORS), "help": f"prior [env {ENV['prior']}, gaussian]"})
    denoiser: str | None = field(default=None, metadata={"help": f"denoiser model [env {ENV['denoiser']}, shipped model]"})
    tau2_source: str | None = field(
        default=None, metadata={"flag": "--tau2", "choices": ["auto", "fsc", "star"], "help": f"τ² from the FSC or RELION's τ² [env {ENV['tau2_source']}, auto]"}
    )
    red_lambda: float | None = field(default=None, metadata={"help": f"λ of --prior red [env {ENV['red_lambda']}, 1]"})
    cw_low_a: float | None = field(
        default=None, metadata={"help": "CW-RED: λ = 0 at this resolution (Å) [the model's calibrated value, else 10]"})
    cw_high_a: float | None = field(
        default=None, metadata={"help": "CW-RED: λ = 1 at this resolution (Å) [the model's calibrated value, else 4.5]"})
    pixel_size_a: float | None = field(
        default=None, metadata={"flag": "--pixel-size", "help": f"Å/pixel when the STAR has no rlnPixelSize [env {ENV['pixel_size_a']}]"}
    )
    device: str | None = field(default=None, metadata={"help": f"torch device [env {ENV['device']}, cpu]"})
    full_set_fsc: str | None = field(
        default=None, metadata={"choices": list(FULL_SET_RULES), "help": f"joined map's FSC: relion = sqrt(2f/(1+f)) as "
                                f"RELION, ssnr = 2f/(1+f) [env {ENV['full_set_fsc']}, relion]"}
    )
    minres_map: int | None = field(
        default=None, metadata={"help": f"no prior below this shell, as RELION's --minres_map [env {ENV['minres_map']}, 5]"}
    )

    def resolved(self) -> RelionExternalConfig:
        """A copy with unset fields filled from the environment, then the defaults."""
        values = dict(self.__dict__)
        casts = {"red_lambda": float, "pixel_size_a": float, "minres_map": int}
        for name, var in ENV.items():
            if values[name] is None and os.environ.get(var):
                try:
                    values[name] = casts.get(name, str)(os.environ[var])
                except ValueError as exc:
                    raise InputError(f"environment variable {var}={os.environ[var]!r} is not valid") from exc
        defaults = {"prior": "gaussian", "tau2_source": "auto", "red_lambda": 1.0, "device": "cpu",
                    "full_set_fsc": "relion", "minres_map": 5}
        for name, value in defaults.items():
            values[name] = value if values[name] is None else values[name]
        out = RelionExternalConfig(**values)
        if out.prior not in PRIORS:
            raise InputError(f"prior must be one of {PRIORS}, got {out.prior!r}")
        if out.tau2_source not in ("auto", "fsc", "star"):
            raise InputError(f"tau2 must be auto, fsc or star, got {out.tau2_source!r}")
        if out.pixel_size_a is not None and not (math.isfinite(out.pixel_size_a) and out.pixel_size_a > 0):
            raise InputError(f"pixel size must be a positive number of Å, got {out.pixel_size_a}")
        return out


def load_accumulator(job: ExternalJob, device: torch.device | str = "cpu") -> Accumulator:
    """B and K of the job on our centred grid and scale (B × d², see :func:`_run_job`)."""
    p = job.pad * job.ori_size
    shape = (p, p, p // 2 + 1)
    real, imag, weight = (read_grid(f, shape) for f in (job.data_real, job.data_imag, job.weight))
    h = torch.complex(torch.from_numpy(real), torch.from_numpy(imag)).to(device)
    data = halfcomplex_to_centred(h) * float(job.ori_size) ** 2
    k = halfcomplex_to_centred(torch.from_numpy(weight).to(device))
    return Accumulator(data, k.clamp(min=0.0), job.ori_size, job.pad)


def job_pixel_size(job: ExternalJob, flag_a: float | None) -> tuple[float | None, str]:
    """The pixel size (Å) of ``job`` and where it came from: the STAR, the flag/env, the run's
    model/data STARs; (None, why) when none has it."""
    if job.pixel_size_a is not None and job.pixel_size_a > 0:
        if flag_a is not None and not math.isclose(flag_a, job.pixel_size_a, rel_tol=1e-4):
            log.warning("%s: rlnPixelSize %g Å in the STAR, not %g Å as set; using the STAR's", job.star,
                        job.pixel_size_a, flag_a)
        return job.pixel_size_a, "rlnPixelSize"
    if flag_a is not None:
        return flag_a, f"--pixel-size / {ENV['pixel_size_a']}"
    return find_run_pixel_size(job.star)


def remove_stale(paths: list[Path | None]) -> None:
    """Delete result files an earlier call left, so RELION cannot read them as this call's."""
    for path in paths:
        if path is not None and path.exists():
            log.info("%s: removing the result of an earlier call", path)
            path.unlink()


def run_external(star: str | Path, config: RelionExternalConfig | None = None) -> Path:
    """Carry out one request: read, update by the configured prior, write ``rlnExtReconsResult``
    (and the τ² table to ``rlnExtReconsResultStarfile`` when the STAR names one).

    A missing pixel size is never an error (see the module docstring); an incomplete τ²/FSC
    table is (``IncompleteTableError``): RELION aborts the MPI job on our non-zero exit, which is
    right for corrupted input, and the stale results of an earlier call are removed first.
    """
    cfg = (config or RelionExternalConfig()).resolved()
    try:
        job = read_job(star)
    except IncompleteTableError as exc:
        remove_stale(exc.outputs)
        raise
    try:
        return _run_job(job, cfg)
    except BaseException:
        remove_stale([job.result, job.result_star])  # never leave a result behind a failure
        raise


def _run_job(job: ExternalJob, cfg: RelionExternalConfig) -> Path:
    """The update of one request. B / K arrive in RELION's FFT scale (forward transforms divided by
    the 2D image size, so ``B / K`` is our ``fft2c`` scale divided by ``d²``). τ² from the FSC
    (eq. 12, full-set FSC for a map without ``_half1``/``_half2`` in its name, by RELION's
    ``sqrt(2f / (1 + f))`` unless ``--full-set-fsc ssnr``), no prior below shell ``minres_map``
    (RELION's default 5, as RELION passes none), or, with ``tau2=star`` or when the FSC is empty
    (classification), RELION's own τ² with its correction ``pad³ · T``. The result is cropped to
    ``d``, gridding-corrected and written atomically (a unique temporary file beside it, then a
    rename), as is the τ² STAR."""
    pixel, where = job_pixel_size(job, cfg.pixel_size_a)
    if pixel is None:
        log.warning("%s: pixel size unknown (%s; set --pixel-size or %s)%s", job.star, where, ENV["pixel_size_a"],
                    "; CW-RED uses λ = 0" if cfg.prior == "cw-red" else "")
    else:
        log.info("%s: pixel size %g Å from %s", job.star.name, pixel, where)
    acc = load_accumulator(job, cfg.device)
    fsc = torch.from_numpy(job.fsc)
    has_fsc = bool((fsc[1:] > 0.001).any())
    source = cfg.tau2_source if cfg.tau2_source != "auto" else ("fsc" if has_fsc else "star")
    tau2 = None
    if source == "star":
        # RELION: 1 / τ²_eff = 1 / (pad³ · T · τ²), with K as written (oversampling correction)
        tau2 = torch.from_numpy(job.tau2 * job.pad**3 * job.fudge)
    recon = ReconstructionConfig(
        prior=cfg.prior, pad=job.pad, tau2_fudge=job.fudge, red_lambda=cfg.red_lambda,
        cw_low_a=cfg.cw_low_a, cw_high_a=cfg.cw_high_a, full_set_fsc=cfg.full_set_fsc, minres_map=cfg.minres_map,
        shell_gain_after_mask=False,  # RELION's order (Wiener on the padded grid, then crop and mask): parity
    )
    try:
        recon.validate()
    except ValueError as exc:
        raise InputError(f"invalid option: {exc}", job.star) from exc
    lam = None
    if cfg.prior == "cw-red" and not has_fsc:
        log.warning("%s: no gold-standard FSC; CW-RED uses λ = 0", job.star)
        lam = 0.0
    elif cfg.prior == "cw-red" and pixel is None:
        lam = 0.0  # λ needs the resolution in Å; RELION would abort on an error exit
    denoiser = None
    if cfg.prior != "gaussian" and lam != 0.0:
        denoiser = load_prior_denoiser(cfg.denoiser, cfg.device)
    if cfg.prior == "cw-red" and denoiser is not None:  # unset thresholds: the model's calibrated ones
        try:
            recon = dataclasses.replace(recon, **dict(zip(("cw_low_a", "cw_high_a"), cw_thresholds(recon, denoiser))))
        except ValueError as exc:
            raise InputError(f"invalid option: {exc}", job.star) from exc
    result = map_reconstruct(
        acc, fsc, pixel or 0.0, recon, denoiser, full_set=not job.is_half, r_max=job.current_size / 2, lam=lam,
        tau2=tau2,
    )
    write_map(job.result, result.volume.cpu(), pixel or 0.0)  # 0: unknown, as RELION writes it then
    if job.result_star is not None:
        # RELION regularises with 1 / (pad³ · T · τ²): hand back ours in those units. Only shells
        # with τ² > 0 (those with weight, inside the current size): RELION keeps its own values
        # for rows absent (backprojector.cpp:1291-1330), while a 0 row would make its
        # data_vs_prior 0/0 = NaN there (1307) and its resolution search (ml_optimiser.cpp:4615-4660)
        # could then run to Nyquist. In fsc mode the rows equal RELION's own τ² (T once).
        tau2_relion = result.tau2.detach().cpu().double().numpy() / (job.pad**3 * job.fudge)
        keep = np.flatnonzero(tau2_relion > 0)
        write_tau2_star(job.result_star, tau2_relion[keep], job.fsc[keep], keep)
    res = resolution_at(fsc, job.ori_size, pixel) if has_fsc and pixel else float("nan")
    log.info(
        "%s: prior %s, λ = %.3g, τ² from %s%s, FSC resolution %.2f Å → %s",
        job.star.name, cfg.prior, result.lam, source, "" if job.is_half else f" (full set, {cfg.full_set_fsc})", res,
        job.result,
    )
    return job.result
