"""The robust-GAN branch of ``cryoprior denoise train|apply`` (see :mod:`cryoprior.nn.gan`).

Training pairs come from a simulated folder (``--pairs SIM_DIR``; ``--target`` is then the stack
measured after training) or from a map and the target's poses and CTF (``--reference-map``;
the target supplies the pairs). A seeded fraction ``val_fraction`` of the pairs is held out of
training; ``metrics.json`` reports MSE and PSNR on it (PSNR with each reference's
max − min as the peak), in the references' intensity units.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from cryoprior.config import config_to_dict, write_run_config
from cryoprior.core.metrics import psnr
from cryoprior.errors import InputError
from cryoprior.io.stack import ParticleStack
from cryoprior.nn.denoiser import denoise_images_stack_scaled, save_model
from cryoprior.nn.gan import GANConfig, fit_scaled, split_rows
from cryoprior.nn.gan_data import CLEAN_COLUMN, check_finite, map_pairs, open_stack, sim_pairs
from cryoprior.nn.training import save_loss_curves
from cryoprior.sim.contamination import contaminate_pairs

log = logging.getLogger(__name__)

SCALE_KEY = "intensity_scale"


def prepare(pairs, reference_map, target, config: GANConfig):
    """Check everything and load the pairs (nothing is written): ``(noisy, refs, target_stack)``."""
    config.validate()
    if (pairs is None) == (reference_map is None):
        raise InputError("--method gan needs exactly one of --pairs SIM_DIR and --reference-map MAP.mrc")
    if reference_map is not None:
        if target is None:
            raise InputError("--reference-map needs --target particles.star (with poses and CTF)")
        noisy, refs, stack = map_pairs(target, reference_map)
        return noisy, refs, stack
    noisy, refs, _ = sim_pairs(pairs)
    stack = None
    if target is not None:
        stack = open_stack(target)
        if stack.box != noisy.shape[-1]:
            raise InputError(f"training pairs are {noisy.shape[-1]} px, the target's {stack.box} px", target)
    if noisy.shape[-1] < 2 ** (len(config.g_widths) - 1) or noisy.shape[-1] % 2:
        raise InputError(f"images of {noisy.shape[-1]} px: need an even box of at least {2 ** (len(config.g_widths) - 1)}", pairs)
    return noisy, refs, stack


def pair_metrics(denoised: np.ndarray, refs: np.ndarray, noisy: np.ndarray | None = None) -> dict:
    """MSE and PSNR (peak = each reference's max − min) of ``denoised`` against ``refs``."""
    d, r = torch.from_numpy(np.asarray(denoised, np.float32)), torch.from_numpy(np.asarray(refs, np.float32))
    out = {"n_images": len(r), "mse": float(((d - r) ** 2).mean()), "psnr_db": float(psnr(d, r).mean())}
    if noisy is not None:
        out["psnr_input_db"] = float(psnr(torch.from_numpy(np.asarray(noisy, np.float32)), r).mean())
    return out


def stack_scale_streamed(stack: ParticleStack, chunk: int = 4096) -> tuple[float, float]:
    """(mean, std) of all pixels of a stack, streamed in chunks; NaN/Inf images are an InputError."""
    total, sq, count = 0.0, 0.0, 0
    for start, images in stack.chunks(chunk):
        check_finite(images, f"images (from row {start})", stack.path)
        x = images.astype(np.float64)
        total, sq, count = total + x.sum(), sq + (x * x).sum(), count + x.size
    mean = total / count
    std = float(np.sqrt(max(sq / count - mean * mean, 0.0)))
    return mean, (std if std > 0 else 1.0)


def denoise_with(model, record: dict, images, stack_scale: tuple[float, float], batch_size: int, device,
                 precision: str) -> np.ndarray:
    """Denoise ``images`` with a GAN model record: input scaled by ``stack_scale``, output in the
    training references' units."""
    s = record["config"][SCALE_KEY]
    return denoise_images_stack_scaled(model, images, stack_scale, (s["out_mean"], s["out_std"]), batch_size,
                                       device, precision)


def train_run(noisy, refs, stack, config: GANConfig, out: Path, device, source: dict) -> dict:
    """Train into run folder ``out`` (created by the caller) and return the metrics."""
    t0 = time.perf_counter()
    train_rows, val_rows = split_rows(len(noisy), config.val_fraction, config.seed)
    y, x, mask = contaminate_pairs(noisy[train_rows], refs[train_rows], config.contamination, config.epsilon,
                                   config.seed)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    write_run_config(out / "config.yaml", config, method="gan", **source)
    gen, curves, scale = fit_scaled(y, x, config, device, out / "checkpoints" / "gan.pt")
    record_config = config_to_dict(config) | {SCALE_KEY: scale}
    save_model(out / "model.pt", "gan", config.generator_arch(), gen, record_config)
    save_loss_curves(curves, out)
    record = {"config": record_config}
    metrics: dict = {"method": "gan", "label": config.label, "train_seconds": time.perf_counter() - t0,
                     "n_train_pairs": len(train_rows), "n_contaminated": int(mask.sum()),
                     "intensity_units": "the training references' (denoised = model output * out_std + out_mean)"}
    if len(val_rows):
        den = denoise_with(gen, record, noisy[val_rows], (scale["in_mean"], scale["in_std"]),
                           config.batch_size_inference, device, config.precision)
        metrics["held_out"] = pair_metrics(den, refs[val_rows], noisy[val_rows])
    if stack is not None and source.get("pairs") is not None and stack.has_column(CLEAN_COLUMN):
        idx = np.arange(min(len(stack), 4000))
        tn, tc = stack.images(idx), stack.read_image_column(CLEAN_COLUMN, idx)
        t1 = time.perf_counter()
        den = denoise_with(gen, record, tn, stack_scale_streamed(stack), config.batch_size_inference, device,
                           config.precision)
        metrics["target"] = pair_metrics(den, tc, tn) | {"inference_images_per_s": len(idx) / (time.perf_counter() - t1)}
    return metrics
