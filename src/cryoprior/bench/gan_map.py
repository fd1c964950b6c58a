"""The parts of ``cryoprior bench gan`` that use poses.

- **3D** (:func:`fsc_rows`): the denoised images of a test set with uniform orientations are
  reconstructed at their known poses (``recon``: the M-step of ``cryoprior reconstruct``,
  Gaussian prior) and each map is scored against the truth (``bench.common.map_scores``: FSC 0.5
  and 0.143 resolutions, unmasked and masked), next to the raw images' map and the classical
  baselines'.
- **Map + poses protocol** (:func:`map_protocol`, the paper's protocol for real data): a stack of
  a held-out structure with CTF, shifts and uniform orientations (in-plane angles included) is
  split into training and held-out particles. The reference map is reconstructed from the NOISY
  training particles at their poses (a user's consensus map; never the truth), the GAN and the
  ℓ1-AE are trained on (noisy particle, projection of that map with the particle's pose and CTF)
  pairs, and every method denoises the held-out particles, scored against their clean images
  (CTF applied) in the data's units. The classical baselines see only the held-out images; the
  CDAE is pre-trained on :data:`cryoprior.bench.cdae.PRETRAIN` simulated the same way and
  fine-tuned on the whole stack's noisy images, as ``bench cdae`` does.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from cryoprior import classical
from cryoprior.bench.cdae import FULL as CDAE_FULL
from cryoprior.bench.cdae import PRETRAIN as CDAE_PRETRAIN
from cryoprior.bench.cdae import QUICK as CDAE_QUICK
from cryoprior.bench.common import map_scores
from cryoprior.core.ctf import phase_flip
from cryoprior.core.metrics import psnr, ssim
from cryoprior.io.relion import ctf_from_star, half_sets
from cryoprior.io.stack import ParticleStack
from cryoprior.nn.cdae import finetune_cascade, pretrain_cascade, with_depth
from cryoprior.nn.cdae_ops import flip_by_star, load_levels
from cryoprior.nn.denoiser import denoise_images, denoise_images_stack_scaled
from cryoprior.nn.gan import GANConfig, fit_scaled, split_rows, stack_scale
from cryoprior.nn.gan_data import project_references, sim_pairs
from cryoprior.recon.mstep import ReconstructionConfig, reconstruct_halves
from cryoprior.sim.dataset import SimulationConfig, simulate_dataset
from cryoprior.workflows.reconstruct import known_pose_accumulators

#: held-out structure of the map + poses protocol (bench cdae tests on it too; no GAN or CDAE default was chosen on it)
MAP_STRUCTURE = "1or4"
PIXEL_SIZE_AT_32 = 2.5  # Å, as bench cdae (1.25 Å at 64 px)
SHIFT_PX = 2.0  # maximal origin offset, pixels
HELD_OUT_FRACTION = 0.2


def reconstruct(stack: ParticleStack, images: np.ndarray, pad: int = 2) -> torch.Tensor:
    """Map ``(d, d, d)`` of ``images`` ``(n, d, d)`` at ``stack``'s poses, origins and CTF (Gaussian
    prior, half sets from the STAR or alternating rows), as ``cryoprior reconstruct`` does."""
    s = ParticleStack.from_array(images, stack.pixel_size_a, stack.table, stack.optics)
    acc1, acc2 = known_pose_accumulators(s, half_sets(s), pad, "cpu")
    return reconstruct_halves(acc1, acc2, s.pixel_size_a, ReconstructionConfig(pad=pad)).full.volume.float()


def fsc_rows(stack: ParticleStack, outputs: dict[str, np.ndarray], truth: torch.Tensor) -> dict[str, dict]:
    """``map_scores`` of the reconstruction of every image set in ``outputs`` (name → ``(n, d, d)``)."""
    return {name: map_scores(reconstruct(stack, img), truth.float(), stack.pixel_size_a) for name, img in outputs.items()}


def mixture_truth(stack: ParticleStack, volumes: list[torch.Tensor]) -> torch.Tensor:
    """The map a reconstruction of a conformational mixture estimates: the volumes weighted by how
    often each conformation (``cpConformationLabel``) occurs in ``stack``."""
    labels = stack.column("cpConformationLabel").astype(np.int64)
    w = np.bincount(labels, minlength=len(volumes)) / len(labels)
    return sum(float(wi) * v.double() for wi, v in zip(w, volumes)).float()


def _simulate(out: Path, structure: str, box: int, n: int, snr: float, seed: int, levels=None) -> Path:
    if not out.exists():
        cfg = SimulationConfig(structures=[structure], box=box, pixel_size_a=PIXEL_SIZE_AT_32 * 32 / box, n=n,
                               views=None, snr=snr, snr_levels=list(levels or []), ctf=True,
                               shift_a=SHIFT_PX * PIXEL_SIZE_AT_32 * 32 / box, seed=seed)
        simulate_dataset(cfg, out)
    return out


def _cdae(work: Path, stack: ParticleStack, noisy: np.ndarray, test: np.ndarray, n_pretrain: int, quick: bool,
          seed: int) -> np.ndarray:
    """CDAE as ``denoise train/apply`` run it on a stack with CTF: pre-trained on phase-flipped
    pairs (``load_levels``), fine-tuned on the phase-flipped ``noisy`` ``(n, d, d)``, applied to
    rows ``test`` and flipped back."""
    cfg = dataclasses.replace((CDAE_QUICK if quick else CDAE_FULL)["cdae"], seed=seed)
    pre = _simulate(work / f"cdae_pretrain_{seed}", CDAE_PRETRAIN, stack.box, n_pretrain, 0.1, 500 + seed,
                    cfg.pretrain_snrs)
    levels = load_levels(pre, cfg.pretrain_snrs)
    cfg = with_depth(cfg, levels[0][:, 0])
    cascade, _ = pretrain_cascade(levels, cfg, "cpu")
    flipped = flip_by_star(stack, noisy)  # (n, d, d)
    tuned, _ = finetune_cascade(cascade, flipped, cfg, "cpu")
    out = torch.from_numpy(denoise_images(tuned, flipped[test], 256, "cpu"))
    return phase_flip(out, ctf_from_star(stack, test)).numpy()


def width_overrides(cfg: dict) -> dict:
    """GANConfig width overrides of a bench size preset (``widths`` None: the defaults)."""
    return {} if cfg.get("widths") is None else {"g_widths": list(cfg["widths"]), "d_widths": list(cfg["widths"])}


def image_metrics(den: np.ndarray, clean: np.ndarray) -> dict:
    """Mean MSE, PSNR and SSIM (peak = each clean image's max − min) over the images."""
    d = torch.from_numpy(np.asarray(den, np.float32))
    c = torch.from_numpy(np.asarray(clean, np.float32))
    return {"mse": float(((d - c) ** 2).mean()), "psnr_db": float(psnr(d, c).mean()), "ssim": float(ssim(d, c).mean())}


def apply_generator(gen, scale: dict, images: np.ndarray) -> np.ndarray:
    """A trained generator on ``images`` ``(n, d, d)`` (scaled by their own stack statistics), in
    the training references' units (``scale`` from ``nn.gan.fit_scaled``)."""
    return denoise_images_stack_scaled(gen, images, stack_scale(images), (scale["out_mean"], scale["out_std"]))


def map_protocol(work: Path, cfg: dict, methods: dict[str, dict], seed: int) -> dict:
    """One seed of the map + poses protocol: held-out-particle metrics of every method, the
    consensus map's and every method's FSC to truth (reconstruction of the held-out particles),
    and the sizes. ``methods``: label → GANConfig overrides (trained with ``--reference-map``)."""
    box, n = cfg["box"], cfg["n_map"]
    folder = _simulate(work / f"map_{seed}", MAP_STRUCTURE, box, n, cfg["snrs"][0], 700 + seed)
    noisy, clean, stack = sim_pairs(folder)
    train, test = split_rows(n, HELD_OUT_FRACTION, seed)
    consensus = reconstruct(stack.subset(train), noisy[train])  # from the noisy training particles only
    refs = project_references(stack, consensus, train)  # (n_train, d, d) with CTF
    outputs: dict[str, np.ndarray] = {"raw": noisy[test]}
    for name in classical.available():
        outputs[name] = classical.denoise(noisy[test], name)
    for label, kw in methods.items():
        config = GANConfig(**kw, gan_epochs=cfg["epochs"], seed=seed, **width_overrides(cfg))
        gen, _, scale = fit_scaled(noisy[train], refs, config, "cpu", desc=f"{label} map seed {seed}")
        outputs[label] = apply_generator(gen, scale, noisy[test])
    outputs["cdae"] = _cdae(work, stack, noisy, test, cfg["n_cdae_pretrain"], cfg["quick"], seed)
    metrics = {name: image_metrics(img, clean[test]) for name, img in outputs.items()}
    metrics["reference projections (oracle of the map)"] = image_metrics(project_references(stack, consensus, test),
                                                                         clean[test])
    truth = torch.from_numpy(SimulationConfig(structures=[MAP_STRUCTURE], box=box,
                                              pixel_size_a=stack.pixel_size_a).load_volumes()[0].numpy())
    fsc = fsc_rows(stack.subset(test), outputs, truth)
    fsc["consensus map (training particles)"] = map_scores(consensus, truth.float(), stack.pixel_size_a)
    return {"metrics": metrics, "fsc": fsc, "n_train": len(train), "n_test": len(test)}
