"""Denoising jobs: train a denoiser into a run folder, apply one to a particle stack.

``train`` checks every input before it creates anything; the run folder then fills as training
goes (checkpoints after each epoch), so an interrupted or diverged run resumes with
``resume=True``. ``apply`` writes its output folder atomically: all of it or nothing.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from cryoprior.config import config_to_dict, read_run_config, write_run_config
from cryoprior.core.ctf import phase_flip
from cryoprior.core.metrics import psnr
from cryoprior.errors import InputError, OutputExistsError
from cryoprior.fileutil import atomic_dir, foreign_entries, output_folder
from cryoprior.io.relion import ctf_from_star
from cryoprior.io.stack import ParticleStack
from cryoprior.io.star import OpticsFlags
from cryoprior.nn.cdae import CDAEConfig, train_cdae, train_single_dae
from cryoprior.nn.cdae_generic import shipped_record, train_cdae_generic
from cryoprior.nn.cdae_ops import check_levels, histogram_equalize, psnr_normalised
from cryoprior.nn.denoiser import denoise_images, load_model, read_model_file, resolved_precision
from cryoprior.nn.dncnn import DnCNNConfig, train_dncnn
from cryoprior.nn.drvae import (
    DRVAEConfig,
    check_stack_images,
    denoised_stream,
    drvae_metrics,
    train_drvae,
)
from cryoprior.nn.gan import GANConfig
from cryoprior.nn.training import resolve_device
from cryoprior.progress import bar
from cryoprior.workflows import denoise_gan
from cryoprior.workflows.runs import RunDir, run_folder

log = logging.getLogger(__name__)

METHODS = ("cdae", "single-dae", "dncnn", "gan", "drvae")
CLEAN_COLUMN = "cpCleanImageName"
APPLY_CHUNK = 4096  # images per chunk streamed through the network


def _open_stack(path: str | Path, optics: OpticsFlags | None = None) -> ParticleStack:
    path = Path(path)
    if not path.exists():
        raise InputError("file not found", path)
    return ParticleStack.from_file(path, optics)


def _check_inputs(method: str, pretrain, target, cdae: CDAEConfig, dncnn: DnCNNConfig,
                  optics: OpticsFlags | None = None) -> ParticleStack | None:
    """Validate everything (nothing is written); returns the opened target stack."""
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    needs_pretrain, needs_target = method == "dncnn", method in ("cdae", "single-dae", "drvae")
    if needs_pretrain and pretrain is None:
        raise InputError(f"--method {method} needs --pretrain SIM_DIR (simulated SNR pairs)")
    if method == "cdae" and pretrain is None:  # fine-tunes the shipped generic CDAE
        if cdae.widths is not None:
            raise InputError("--widths needs --pretrain SIM_DIR: the shipped generic CDAE's depth is fixed")
        shipped_record()
    if needs_target and target is None:
        raise InputError(f"--method {method} needs --target IN.star (the stack to fine-tune on)")
    (dncnn if method == "dncnn" else cdae).validate()
    stack = None if target is None else _open_stack(target, optics)
    if pretrain is not None:
        snrs = cdae.pretrain_snrs if method == "cdae" else [dncnn.snr_in, float("inf")]
        box = check_levels(pretrain, snrs)
        if stack is not None and box != stack.box:
            raise InputError(f"pre-training images are {box} px, the target's ({target}) {stack.box} px", pretrain)
    if stack is not None and cdae.widths is not None and stack.box < 2 ** len(cdae.widths) and method != "dncnn":
        raise InputError(f"images of {stack.box} px are smaller than the pooling factor {2 ** len(cdae.widths)}", target)
    return stack


#: what ``train`` writes in a run folder (``--overwrite`` replaces these and nothing else)
RUN_ENTRIES = ("model.pt", "checkpoints", "config.yaml", "losses.json", "losses.png", "run.log", "metrics.json")
#: config fields that may change between a run and its resumption
RESUMABLE_FIELDS = ("precision", "batch_size_inference")


def _prepare_out(out: Path, method: str, resume: bool, overwrite: bool, config) -> None:
    if not out.exists():
        return
    if overwrite:
        foreign = foreign_entries(out, RUN_ENTRIES)
        if foreign:
            raise InputError(f"--overwrite replaces only a denoise run, and this folder holds other files "
                             f"({', '.join(foreign[:5])}); choose another --out", out)
        for name in RUN_ENTRIES:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        return
    if not resume:
        raise OutputExistsError(out)
    cfg = out / "config.yaml"
    if not cfg.is_file():
        return
    record = read_run_config(cfg)
    if record.get("method") != method:
        raise InputError(f"holds a {record.get('method')} run, not {method}; cannot resume", out)
    old, new = record.get("config", {}), config_to_dict(config)
    # a field left None (auto, e.g. CDAE's widths) resumes with what the run resolved it to
    diff = sorted(k for k in set(old) | set(new)
                  if k not in RESUMABLE_FIELDS and new.get(k) is not None and old.get(k) != new.get(k))
    if diff:
        listing = ", ".join(f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in diff)
        raise InputError(f"cannot resume: the run was started with another config ({listing})", out)


def denoise_flipped(model, stack: ParticleStack, rows: np.ndarray, images: np.ndarray, batch_size: int, device,
                    equalize: bool = False, precision: str = "fp32", units: str = "input") -> np.ndarray:
    """``denoise_images`` of ``images`` (rows ``rows`` of ``stack``), phase-flipped by their CTFs
    before the network and flipped back after it when the model was trained on phase-flipped
    images (``phase_flip`` in its config) and the STAR has CTF columns: an estimate of the particle
    as recorded, CTF included, in the input's units (equalised output is not flipped back)."""
    flip = bool(getattr(model, "cryoprior_config", {}).get("phase_flip")) and stack.has_column("rlnDefocusU")
    if not flip:
        return denoise_images(model, images, batch_size, device, equalize, precision, units)
    ctf = ctf_from_star(stack, np.asarray(rows))
    x = phase_flip(torch.as_tensor(np.asarray(images, dtype=np.float32)), ctf)
    out = denoise_images(model, x, batch_size, device, equalize, precision, units)
    return out if equalize else phase_flip(torch.from_numpy(out), ctf).numpy()


def truth_metrics(model, stack: ParticleStack, device, config: CDAEConfig, max_images: int = 4000) -> dict:
    """PSNR (dB, mean over images, peak = each clean image's range) of the noisy input and the
    denoised output against ``cpCleanImageName`` in the data's units, on up to ``max_images``;
    the ``*_fitted_db`` figures (both normalised per image, i.e. after an affine fit) and the
    histogram-equalised output's are labelled diagnostics."""
    idx = np.arange(min(len(stack), max_images))
    noisy, clean = stack.images(idx), stack.read_image_column(CLEAN_COLUMN, idx)
    t0 = time.perf_counter()
    denoised = denoise_flipped(model, stack, idx, noisy, config.batch_size_inference, device, precision=config.precision)
    seconds = time.perf_counter() - t0
    return {
        "n_images": len(idx),
        "psnr_input_db": float(psnr(torch.as_tensor(noisy), torch.as_tensor(clean)).mean()),
        "psnr_denoised_db": float(psnr(torch.as_tensor(denoised), torch.as_tensor(clean)).mean()),
        "psnr_input_fitted_db": float(psnr_normalised(noisy, clean).mean()),
        "psnr_denoised_fitted_db": float(psnr_normalised(denoised, clean).mean()),
        "psnr_denoised_equalized_fitted_db": float(psnr_normalised(histogram_equalize(denoised), clean).mean()),
        "inference_images_per_s": len(idx) / seconds,
    }


def train(
    method: str,
    out: str | Path,
    *,
    pretrain: str | Path | None = None,
    target: str | Path | None = None,
    cdae: CDAEConfig | None = None,
    dncnn: DnCNNConfig | None = None,
    drvae: DRVAEConfig | None = None,
    device: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    optics: OpticsFlags | None = None,
    gan: GANConfig | None = None,
    pairs: str | Path | None = None,
    reference_map: str | Path | None = None,
) -> dict:
    """Train ``method`` (cdae, single-dae, dncnn) into run folder ``out``; returns its metrics.

    The folder gets ``model.pt``, ``checkpoints/``, ``config.yaml``, ``losses.json``/``.png``,
    ``run.log`` and ``metrics.json`` (PSNR against the truth when the target carries
    ``cpCleanImageName``).
    """
    cdae, dncnn = cdae or CDAEConfig(), dncnn or DnCNNConfig()
    out = Path(out)
    if method == "gan":  # robust GAN: pairs from a simulated folder or a map + poses
        gan = gan or GANConfig()
        gan_inputs = denoise_gan.prepare(pairs, reference_map, target, gan)
        stack = None
        inputs = [pairs, reference_map, target]
    else:
        stack = _check_inputs(method, pretrain, target, cdae, dncnn, optics)
        inputs = [pretrain, target, *(stack.stack_paths if stack is not None else [])]
        if method == "drvae":
            drvae = drvae or DRVAEConfig()
            drvae.validate()
            if drvae.classes > len(stack):
                raise InputError(f"--classes {drvae.classes} is more than the {len(stack)} particles", target)
            check_stack_images(stack)
    dev = resolve_device(device)
    with run_folder(out, [p for p in inputs if p is not None]):
        _prepare_out(out, method, resume, overwrite,
                     {"cdae": cdae, "single-dae": cdae, "dncnn": dncnn, "drvae": drvae}.get(method, gan))
        if method == "gan":
            source = {"pairs": None if pairs is None else str(pairs), "reference_map": None if reference_map is None
                      else str(reference_map), "target": None if target is None else str(target)}
            return _train_gan(out, gan_inputs, gan, dev, source)
        return _train(method, out, stack, pretrain, target, cdae, dncnn, dev, drvae)


def _train_gan(out: Path, gan_inputs, gan: GANConfig, dev, source: dict) -> dict:
    run = RunDir(out)
    run.attach_log()
    try:
        metrics = denoise_gan.train_run(*gan_inputs, gan, out, dev, source)
        run.write_metrics(metrics)
    finally:
        run.close()
    return metrics


def _train(method, out: Path, stack, pretrain, target, cdae: CDAEConfig, dncnn: DnCNNConfig, dev,
           drvae: DRVAEConfig | None = None) -> dict:
    run = RunDir(out)
    run.attach_log()
    try:
        t0 = time.perf_counter()
        if method == "cdae" and pretrain is None:
            train_cdae_generic(stack, cdae, out, dev)
        elif method == "cdae":
            train_cdae(pretrain, stack, cdae, out, dev)
        elif method == "single-dae":
            train_single_dae(stack, cdae, out, dev)
        elif method == "drvae":
            result = train_drvae(stack, drvae, out, dev)
        else:
            train_dncnn(pretrain, dncnn, out, dev)
        # the precision truth_metrics runs at, as it resolves on this machine (auto may be bf16)
        metrics: dict = {"method": method, "train_seconds": time.perf_counter() - t0, "device": str(dev),
                         "inference_precision": resolved_precision(cdae.precision, dev)}
        if method == "drvae":
            metrics.update(drvae_metrics(result, stack, dev))
        elif stack is not None:
            metrics["target"] = str(target)
            if stack.has_column(CLEAN_COLUMN):
                metrics.update(truth_metrics(load_model(out, dev), stack, dev, cdae))
        run.write_metrics(metrics)
    finally:
        run.close()
    return metrics


def apply(
    model_dir: str | Path,
    in_path: str | Path,
    out: str | Path,
    *,
    device: str = "auto",
    batch_size: int | None = None,
    equalize: bool | None = None,
    precision: str | None = None,
    overwrite: bool = False,
    units: str = "input",
    optics: OpticsFlags | None = None,
) -> Path:
    """Denoise ``in_path`` (STAR/MRCS) with the model of ``model_dir`` into folder ``out``:
    ``denoised.mrcs`` and ``particles.star`` (rlnImageName → denoised.mrcs, other columns kept).
    ``units``: ``"input"`` (the clean-image estimate in the input's units) or ``"normalised"``.

    ``batch_size``/``equalize``/``precision`` default to the model's training config.
    """
    record = read_model_file(model_dir)  # checks the model before anything is written
    stack = _open_stack(in_path, optics)
    cfg = record.get("config", {})
    batch_size = int(batch_size or cfg.get("batch_size_inference", 256))
    equalize = bool(cfg.get("equalize", False)) if equalize is None else equalize
    precision = precision or cfg.get("precision", "fp32")
    dev = resolve_device(device)
    model = load_model(model_dir, dev)
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(out)
    with output_folder(out, [model_dir, in_path, *stack.stack_paths], overwrite):
        _apply(model, record, model_dir, stack, in_path, out, batch_size, equalize, precision, dev, overwrite, units)
    log.info("wrote %d denoised particles to %s", len(stack), out)
    return out



def _apply(model, record, model_dir, stack, in_path, out, batch_size, equalize, precision, dev, overwrite,
           units: str) -> None:
    cfg = record.get("config", {})
    scaled = denoise_gan.SCALE_KEY in cfg  # per-stack scaling, output in the references' units
    in_scale = denoise_gan.stack_scale_streamed(stack) if scaled else None

    def stream():
        with bar(len(stack), "denoise") as pbar:
            if record["method"] == "drvae":  # in the input's units (phase-flipped with CTF columns)
                for start, chunk in denoised_stream(model, stack, dev, batch_size):
                    yield start, chunk
                    pbar.update(len(chunk))
                return
            for start, chunk in stack.chunks(APPLY_CHUNK):
                if scaled:
                    yield start, denoise_gan.denoise_with(model, record, chunk, in_scale, batch_size, dev, precision)
                else:
                    rows = np.arange(start, start + len(chunk))
                    yield start, denoise_flipped(model, stack, rows, chunk, batch_size, dev, equalize, precision, units)
                pbar.update(len(chunk))

    with atomic_dir(out, overwrite=overwrite) as tmp:
        stack.write(tmp / "particles.star", tmp / "denoised.mrcs", images=stream())
        write_run_config(
            tmp / "config.yaml", None, model=str(Path(model_dir).absolute()), method=record["method"],
            input=str(Path(in_path).absolute()), equalize=equalize, precision=precision,
            units="(0, 1) histogram-equalised" if equalize else units,
            inference_precision=resolved_precision(precision, dev), device=str(dev),
        )
