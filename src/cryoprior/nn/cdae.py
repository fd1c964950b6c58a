"""CDAE: cascaded denoising autoencoders (Lei & Yang, Front. Genet. 2021).

1. **Pre-training** on simulated pairs of the same projections: block ``j`` learns
   ``SNR_j → SNR_{j+1}`` (default 0.1 → 0.4 → 0.6 → clean) under an MSE loss, RMSprop as in
   the paper (Adam an option). With ``pretrain_inputs="pairs"`` (default) block ``j > 1`` reads
   the simulated SNR_j images; ``"cascade"`` feeds it block ``j-1``'s output instead (it collapses
   similar views onto the mean image, hence not the default; nor is the paper's dropout 0.5).
   ``augment="dihedral"`` applies one random symmetry of the square per batch to input and target
   alike, so that the blocks do not learn the few pre-training views as templates.
2. **Fine-tuning** on the target stack (no clean images): block by block, each image's target is
   the mean over its ``k`` (30) nearest neighbours among the block's outputs (faiss, after PCA).
   ``knn_values`` says what is averaged: the neighbours' raw images (default; averaging outputs,
   the paper's reading, compounds over blocks like diffusion on the k-NN graph), their outputs or
   their inputs. Fine-tuning has its own learning rate (``finetune_lr``): RMSprop's first steps
   move each weight by ~10× the learning rate.
3. Optional **histogram equalisation** of the final output (rank-based, per image).

Deviation from the paper: the depth follows the particle (:func:`with_depth`; ``--widths 32 64
128`` restores the paper's). The ablation **single DAE** is one block, no pre-training. Blocks work on per-image normalised images;
:func:`~cryoprior.nn.denoiser.denoise_images` returns the clean estimate in the input's units.

>>> run = train_cdae("sim_pretrain/", "particles.star", CDAEConfig(), "runs/cdae", "auto")  # doctest: +SKIP
>>> model = load_model(run, "cpu")                                                           # doctest: +SKIP
>>> denoised = denoise_images(model, images, batch_size=256, device="cpu")       # (n, d, d)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cryoprior.config import config_to_dict, write_run_config
from cryoprior.errors import InputError
from cryoprior.io.stack import ParticleStack
from cryoprior.nn.cdae_ops import (
    KNN_METRICS,
    as_images,
    estimate_particle_diameter_px,
    flipped_images,
    histogram_equalize,
    knn_mean_targets,
    load_levels,
    modules_for_diameter,
    normalize,
    psnr_normalised,
    receptive_field_px,
)
from cryoprior.nn.denoiser import (
    PRECISIONS,
    denoise_images,
    denoise_tensor,
    load_model,
    save_model,
)
from cryoprior.nn.models.cdae import CDAECascade, ConvAEBlock
from cryoprior.nn.training import (
    AUGMENTATIONS,
    OPTIMIZERS,
    fit_pairs,
    load_checkpoint,
    resolve_device,
    save_loss_curves,
)

log = logging.getLogger(__name__)

KNN_FEATURES = ("output", "input")  # where fine-tuning finds each image's neighbours
KNN_VALUES = ("output", "input", "raw")  # what it averages over them into the target

__all__ = [
    "CDAEConfig",
    "denoise_images",
    "finetune_cascade",
    "histogram_equalize",
    "knn_mean_targets",
    "load_model",
    "pretrain_cascade",
    "psnr_normalised",
    "train_cdae",
    "train_single_dae",
]


@dataclass
class CDAEConfig:
    """Architecture, pre-training and fine-tuning of CDAE (and of the single-DAE ablation)."""

    widths: list[int] | None = field(
        default=None,
        metadata={"help": "channels of the encoder modules, one pooling each (paper: 32 64 128); None: as "
                          "many modules of 8, 16, 32, ... channels as keep the receptive field within half "
                          "the particle diameter (more learn the pre-training views as templates)"},
    )
    particle_diameter_a: float | None = field(
        default=None, metadata={"help": "particle diameter (Å) that sets the depth when --widths is not "
                                        "given; None: estimated from the target stack's variance profile"},
    )
    convs_per_module: int = field(default=2, metadata={"help": "3x3 convolutions per encoder module"})
    dropout: float = field(
        default=0.0, metadata={"help": "dropout in encoder and decoder (paper: 0.5; collapses the "
                                       "outputs towards the mean image at the default widths)"},
    )
    pretrain_snrs: list[float] = field(
        default_factory=lambda: [0.1, 0.4, 0.6, math.inf],
        metadata={"help": "SNR ladder of the pre-training pairs, one block per step (inf = clean)"},
    )
    pretrain_inputs: str = field(
        default="pairs", metadata={"choices": ["pairs", "cascade"], "help": "pre-training input of block j > 1: "
                                   "the simulated SNR_j images (pairs) or block j-1's output (cascade; "
                                   "collapses on similar views)"},
    )
    augment: str = field(
        default="dihedral", metadata={"choices": list(AUGMENTATIONS), "help": "augmentation of the pre-training "
                                      "pairs: random 90-degree rotations and mirrors (dihedral), also arbitrary "
                                      "in-plane angles (rotate), or none"},
    )
    pretrain_epochs: int = field(default=10, metadata={"help": "pre-training epochs per block"})
    finetune_epochs: int = field(default=8, metadata={"help": "fine-tuning epochs per block"})
    single_dae_epochs: int = field(default=12, metadata={"help": "training epochs of --method single-dae"})
    batch_size: int = field(default=32, metadata={"help": "minibatch size"})
    lr: float = field(default=1e-3, metadata={"help": "learning rate of pre-training and of the single DAE"})
    finetune_lr: float = field(
        default=3e-4, metadata={"help": "learning rate of fine-tuning (RMSprop's first "
                                "steps are ~10x lr per weight, which at 1e-3 wrecks a pre-trained block)"},
    )
    optimizer: str = field(default="rmsprop", metadata={"choices": list(OPTIMIZERS), "help": "optimiser"})
    knn_rounds: int = field(default=1, metadata={"help": "k-NN target refreshes per block while fine-tuning"})
    knn_k: int = field(default=30, metadata={"help": "neighbours averaged into each fine-tuning target"})
    knn_metric: str = field(
        default="euclidean", metadata={"choices": list(KNN_METRICS), "help": "k-NN distance"}
    )
    knn_features: str = field(
        default="output", metadata={"choices": list(KNN_FEATURES), "help": "fine-tuning: find each image's "
                                    "neighbours among the block's outputs or among its inputs"},
    )
    knn_values: str = field(
        default="raw", metadata={"choices": list(KNN_VALUES), "help": "fine-tuning: average the "
                                    "neighbours' block outputs, block inputs or raw images into the target"},
    )
    knn_pca_dims: int = field(default=64, metadata={"help": "PCA dimensions before k-NN (0: none)"})
    equalize: bool = field(default=False, metadata={"help": "histogram-equalise the denoised output"})
    precision: str = field(
        default="fp32", metadata={"choices": list(PRECISIONS), "help": "inference precision (fp32: the same on every machine; auto: bf16 on CPUs with native bf16)"}
    )
    batch_size_inference: int = field(default=256, metadata={"help": "images per inference batch"})
    seed: int = field(default=0, metadata={"help": "random seed"})

    def validate(self) -> None:
        if len(self.pretrain_snrs) < 2:
            raise InputError(f"pretrain_snrs needs at least 2 levels, got {self.pretrain_snrs}")
        if any(not s > 0 for s in self.pretrain_snrs):
            raise InputError(f"pretrain_snrs must be positive (inf = clean), got {self.pretrain_snrs}")
        if self.widths is not None and (not self.widths or min(self.widths) < 1):
            raise InputError(f"widths must be positive, got {self.widths}")
        if self.particle_diameter_a is not None and not self.particle_diameter_a > 0:
            raise InputError(f"particle_diameter_a must be positive, got {self.particle_diameter_a}")
        if not 0 <= self.dropout < 1:
            raise InputError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.knn_rounds < 1 or self.knn_k < 1 or self.batch_size < 1 or self.batch_size_inference < 1:
            raise InputError("knn_rounds, knn_k, batch_size and batch_size_inference must be >= 1")
        for name, value, allowed in [
            ("pretrain_inputs", self.pretrain_inputs, ("pairs", "cascade")),
            ("optimizer", self.optimizer, OPTIMIZERS),
            ("knn_metric", self.knn_metric, KNN_METRICS),
            ("knn_features", self.knn_features, KNN_FEATURES),
            ("knn_values", self.knn_values, KNN_VALUES),
            ("augment", self.augment, AUGMENTATIONS),
            ("precision", self.precision, PRECISIONS),
        ]:
            if value not in allowed:
                raise InputError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if min(self.pretrain_epochs, self.finetune_epochs, self.single_dae_epochs) < 0:
            raise InputError("epochs must be >= 0")
        if not (self.lr > 0 and self.finetune_lr > 0):
            raise InputError(f"learning rates must be positive, got {self.lr}, {self.finetune_lr}")

    @property
    def n_blocks(self) -> int:
        return len(self.pretrain_snrs) - 1

    def block_arch(self) -> dict:
        if self.widths is None:
            raise ValueError("CDAEConfig.widths is unresolved: call with_depth(config, images) first")
        return {"widths": list(self.widths), "convs_per_module": self.convs_per_module, "dropout": self.dropout}

    def fit_kwargs(self, device, finetune: bool = False) -> dict:
        return {
            "batch_size": self.batch_size, "lr": self.finetune_lr if finetune else self.lr,
            "optimizer": self.optimizer, "seed": self.seed, "device": device,
        }


def with_depth(config: CDAEConfig, images, pixel_size_a: float | None = None) -> CDAEConfig:
    """``config`` with ``widths`` set from the particle diameter when it is None: ``8 · 2**i`` channels
    for the number of modules :func:`~cryoprior.nn.cdae_ops.modules_for_diameter` allows, the
    diameter from ``particle_diameter_a`` (needs ``pixel_size_a``) or estimated from ``images``
    ``(n, d, d)``. A config with widths is returned unchanged.

    This deviates from the paper's fixed three modules: as many encoder modules as keep the
    receptive field within half the diameter (two for the paper's geometry), since a block that
    sees the whole particle learns the pre-training views as templates (measurements in
    ``docs/benchmarks.md``, CDAE)."""
    if config.widths is not None:
        return config
    if config.particle_diameter_a is not None and pixel_size_a:
        diameter_px, source = config.particle_diameter_a / pixel_size_a, f"{config.particle_diameter_a:g} Å"
    else:
        diameter_px, source = estimate_particle_diameter_px(images), "estimated from the stack"
    modules = modules_for_diameter(diameter_px, config.convs_per_module)
    widths = [8 * 2**i for i in range(modules)]
    log.info("CDAE depth: particle diameter %.0f px (%s) -> %d encoder modules, widths %s, receptive "
             "field %d px", diameter_px, source, modules, widths, receptive_field_px(modules, config.convs_per_module))
    return dataclasses.replace(config, widths=widths)


def _seeded(fn, seed: int):
    """Call ``fn()`` with the global torch RNG seeded, restoring it afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


def _done(checkpoint: Path | None, epochs: int) -> bool:
    return checkpoint is not None and checkpoint.exists() and load_checkpoint(checkpoint)["epoch"] >= epochs


def new_cascade(config: CDAEConfig, n_blocks: int | None = None) -> CDAECascade:
    """An untrained cascade, initialised from ``config.seed``."""
    n = config.n_blocks if n_blocks is None else n_blocks
    return _seeded(lambda: CDAECascade(n, **config.block_arch()), config.seed)


def pretrain_cascade(
    levels: list[torch.Tensor] | str | Path,
    config: CDAEConfig,
    device: str | torch.device = "auto",
    checkpoint_dir: str | Path | None = None,
) -> tuple[CDAECascade, dict[str, list[float]]]:
    """Pre-train a new cascade on normalised SNR levels ``[(n, 1, d, d), ...]`` (or a simulated
    folder, read with ``load_levels``). Returns the cascade and the loss curve of each block."""
    config.validate()
    device = resolve_device(device)
    if not isinstance(levels, list):
        levels = load_levels(levels, config.pretrain_snrs)
    if len(levels) != config.n_blocks + 1:
        raise ValueError(f"{len(levels)} SNR levels for {config.n_blocks} blocks")
    config = with_depth(config, levels[0][:, 0])  # widths None: from the particle size
    cascade = new_cascade(config)
    ckdir = None if checkpoint_dir is None else Path(checkpoint_dir)
    curves = {}
    x = levels[0]
    for j, block in enumerate(cascade.blocks):
        if j > 0:
            prev = cascade.blocks[j - 1]
            x = normalize(denoise_tensor(prev, x, config.batch_size_inference, device)[:, 0]) \
                if config.pretrain_inputs == "cascade" else levels[j]
        desc = f"pre-train block {j + 1} (SNR {config.pretrain_snrs[j]:g} -> {config.pretrain_snrs[j + 1]:g})"
        ckpt = None if ckdir is None else ckdir / f"pretrain_{j + 1}.pt"
        curves[f"pretrain block {j + 1}"] = fit_pairs(
            block, x, levels[j + 1], epochs=config.pretrain_epochs, checkpoint=ckpt, desc=desc,
            augment=config.augment, **config.fit_kwargs(device),
        )
    return cascade.eval(), curves


def finetune_cascade(
    cascade: CDAECascade,
    images,
    config: CDAEConfig,
    device: str | torch.device = "auto",
    checkpoint_dir: str | Path | None = None,
) -> tuple[CDAECascade, dict[str, list[float]]]:
    """Fine-tune a copy of a pre-trained cascade on ``images`` ``(n, d, d)`` with k-NN mean targets.

    Blocks in order: the targets of block ``j`` are the means, over each image's ``knn_k``
    nearest neighbours, of the pre-trained block's outputs; the fine-tuned block's (normalised)
    output is the next block's input.
    """
    config.validate()
    device = resolve_device(device)
    cascade = copy.deepcopy(cascade)
    x = raw = normalize(images)  # (n, 1, d, d)
    ckdir = None if checkpoint_dir is None else Path(checkpoint_dir)
    curves = {}
    for j, block in enumerate(cascade.blocks):
        losses: list[float] = []
        for r in range(config.knn_rounds):
            name = f"finetune_{j + 1}" + (f"_round{r + 1}" if config.knn_rounds > 1 else "")
            ckpt = None if ckdir is None else ckdir / f"{name}.pt"
            if _done(ckpt, config.finetune_epochs):  # resumed: targets not needed
                targets = x
            else:
                out = denoise_tensor(block, x, config.batch_size_inference, device)  # (n, 1, d, d)
                feats = out if config.knn_features == "output" else x
                vals = {"output": out, "input": x, "raw": raw}[config.knn_values]
                targets = knn_mean_targets(feats, vals, config.knn_k, config.knn_metric, config.knn_pca_dims, config.seed)
            losses += fit_pairs(
                block, x, targets, epochs=config.finetune_epochs, checkpoint=ckpt,
                desc=f"fine-tune block {j + 1}/{len(cascade.blocks)}", **config.fit_kwargs(device, finetune=True),
            )
        curves[f"finetune block {j + 1}"] = losses
        if j + 1 < len(cascade.blocks):
            x = normalize(denoise_tensor(block, x, config.batch_size_inference, device)[:, 0])
    return cascade.eval(), curves


def single_dae(
    images, config: CDAEConfig, device: str | torch.device = "auto", checkpoint: str | Path | None = None
) -> tuple[ConvAEBlock, list[float]]:
    """The ablation: one block, random initialisation, trained on ``images`` ``(n, d, d)``
    towards the k-NN means of the (normalised) input images."""
    config.validate()
    config = with_depth(config, images)
    x = normalize(images)  # (n, 1, d, d)
    block = _seeded(lambda: ConvAEBlock(**config.block_arch()), config.seed)
    ckpt = None if checkpoint is None else Path(checkpoint)
    targets = x if _done(ckpt, config.single_dae_epochs) else knn_mean_targets(
        x, None, config.knn_k, config.knn_metric, config.knn_pca_dims, config.seed
    )
    losses = fit_pairs(
        block, x, targets, epochs=config.single_dae_epochs, checkpoint=ckpt, desc="single DAE",
        **config.fit_kwargs(resolve_device(device)),
    )
    return block.eval(), losses


# --------------------------------------------------------------------------------- run folders
def _target_images(target_stack) -> tuple[torch.Tensor, bool]:
    """The target's images ``(n, d, d)``, phase-flipped when it is a stack with CTF columns, and
    whether they were."""
    if isinstance(target_stack, (str, Path)):
        target_stack = ParticleStack.from_file(target_stack)
    if isinstance(target_stack, ParticleStack):
        return flipped_images(target_stack)
    return as_images(target_stack), False


def _check_pretrain_ctf(pretrain_dir: str | Path, target_flipped: bool) -> None:
    """Warn when the pre-training pairs and the target differ in having a CTF: the networks then
    see phase-flipped images in one and not the other."""
    pre_ctf = ParticleStack.from_file(Path(pretrain_dir) / "particles.star").has_column("rlnDefocusU")
    if target_flipped and not pre_ctf:
        log.warning("the target has a CTF and the pre-training pairs in %s none: simulate them with "
                    "`cryoprior simulate --ctf-from TARGET.star` to draw the target's defoci", pretrain_dir)
    elif pre_ctf and not target_flipped:
        log.warning("the pre-training pairs in %s have a CTF and the target none", pretrain_dir)


def train_cdae(
    pretrain_dir: str | Path,
    target_stack,
    config: CDAEConfig | None,
    out_dir: str | Path,
    device: str | torch.device = "auto",
) -> Path:
    """Pre-train on ``pretrain_dir`` (``cryoprior simulate --snr-levels ...``), fine-tune on
    ``target_stack`` (ParticleStack, STAR/MRCS path or ``(n, d, d)`` images) and write
    ``out_dir``: ``model.pt``, ``checkpoints/``, ``losses.json``/``.png``, ``config.yaml``.

    Resumable: run again with the same ``out_dir`` and finished blocks and epochs are skipped.
    Returns ``out_dir``.
    """
    config = config or CDAEConfig()
    config.validate()
    out_dir = Path(out_dir)
    images, flipped = _target_images(target_stack)
    config = with_depth(config, images, getattr(target_stack, "pixel_size_a", None))
    levels = load_levels(pretrain_dir, config.pretrain_snrs)
    _check_pretrain_ctf(pretrain_dir, flipped)
    if levels[0].shape[-2:] != images.shape[-2:]:
        raise InputError(
            f"pre-training images are {tuple(levels[0].shape[-2:])} px, the target's are "
            f"{tuple(images.shape[-2:])} px", pretrain_dir,
        )
    ckdir = out_dir / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    write_run_config(out_dir / "config.yaml", config, method="cdae", pretrain=str(pretrain_dir))
    cascade, curves = pretrain_cascade(levels, config, device, ckdir)
    cascade, ft_curves = finetune_cascade(cascade, images, config, device, ckdir)
    curves.update(ft_curves)
    save_model(out_dir / "model.pt", "cdae", {"kind": "cdae", "n_blocks": config.n_blocks, **config.block_arch()},
               cascade, {**config_to_dict(config), "phase_flip": flipped})
    save_loss_curves(curves, out_dir)
    return out_dir


def train_single_dae(
    target_stack, config: CDAEConfig | None, out_dir: str | Path, device: str | torch.device = "auto"
) -> Path:
    """The single-DAE ablation as a run folder (same layout as :func:`train_cdae`)."""
    config = config or CDAEConfig()
    config.validate()
    out_dir = Path(out_dir)
    images, flipped = _target_images(target_stack)
    config = with_depth(config, images, getattr(target_stack, "pixel_size_a", None))
    (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    write_run_config(out_dir / "config.yaml", config, method="single-dae")
    block, losses = single_dae(images, config, device, out_dir / "checkpoints" / "single_dae.pt")
    save_model(out_dir / "model.pt", "single-dae", {"kind": "dae", **config.block_arch()}, block,
               {**config_to_dict(config), "phase_flip": flipped})
    save_loss_curves({"single DAE": losses}, out_dir)
    return out_dir
