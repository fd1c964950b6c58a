"""Robust-GAN denoising (Gu, Xian, Unarta & Yao): a ResNet autoencoder generator ``G`` trained on
(noisy image ``y``, reference ``x``) pairs with an (α,β)-GAN or WGAN-GP discriminator ``D`` and
an ℓp reconstruction term,

    generator:      min  E S(D(G(y)), 0) + λ · ‖G(y) − x‖_p         (p ∈ {1, 2}, λ = 10)
    discriminator:  max  E S(D(x), 1) + E S(D(G(y)), 0)  [− μ · gradient penalty for WGAN-GP]

(losses in :mod:`cryoprior.nn.gan_losses`). ``gan="none"`` (λ = ∞) is the plain ℓ1/ℓ2
autoencoder. Training is the paper's Algorithm 1 run by :func:`cryoprior.nn.training.train_loop`:
per minibatch ``k_d`` discriminator steps, then ``k_g`` generator steps, Adam for both;
resumable checkpoints, a NaN/Inf stop that keeps the last good checkpoint. Options: a moving
average of the generator's weights as the result (``ema_epochs``), a λ schedule (``lambda_start``).

Intensities: images are scaled per *stack* (not per image): inputs ``(y − m_y) / s_y``,
references ``(x − m_x) / s_x`` with one mean and standard deviation for the whole training
stack. The model file keeps ``(m_x, s_x)``, so the denoised output is mapped back to the
references' intensity units (:func:`cryoprior.nn.denoiser.denoise_images_stack_scaled`).

>>> G, D, curves = train_gan(noisy, refs, GANConfig(gan="beta", alpha=0.5, beta=0.5))  # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cryoprior.errors import InputError
from cryoprior.nn.gan_losses import (
    RECON_LOSSES,
    SCORES,
    discriminator_loss,
    generator_adversarial_loss,
    gradient_penalty,
    recon_loss,
)
from cryoprior.nn.models.resnet import NORMS, ResNetAutoencoder, ResNetClassifier, ResNetConfig
from cryoprior.nn.training import WeightAverage, epoch_seed, resolve_device, train_loop

CONTAMINATION_TYPES = ("A", "B", "C")


@dataclass
class GANConfig:
    """The robust-GAN denoiser: loss family, reconstruction term, networks and Algorithm 1."""

    gan: str = field(default="beta", metadata={"choices": list(SCORES), "help": "adversarial loss: the "
                     "(alpha,beta)-GAN family, WGAN-GP, or none (the lp autoencoder, lambda = inf)"})
    alpha: float = field(default=0.5, metadata={"help": "alpha of the (alpha,beta)-GAN, in [-1, 1]"})
    beta: float = field(default=0.5, metadata={"help": "beta of the (alpha,beta)-GAN, in [-1, 1]"})
    recon_loss: str = field(default="l1", metadata={"choices": list(RECON_LOSSES), "help": "reconstruction loss"})
    recon_weight: float = field(default=10.0, metadata={"flag": "--lambda", "help": "weight lambda of the "
                                "reconstruction loss (inf: no GAN)"})
    gp_weight: float = field(default=10.0, metadata={"help": "WGAN-GP gradient-penalty weight mu"})
    k_d: int = field(default=1, metadata={"help": "discriminator steps per minibatch"})
    k_g: int = field(default=2, metadata={"help": "generator steps per minibatch"})
    warmup_epochs: int = field(default=0, metadata={"help": "first epochs of reconstruction-only generator "
                               "training (no discriminator) before Algorithm 1 starts; counted in --gan-epochs"})
    d_spectral_norm: bool = field(default=False, metadata={"help": "spectral normalisation of every "
                                  "discriminator convolution and linear layer"})
    ema_epochs: float = field(default=0.5, metadata={"help": "horizon (epochs) of an exponential moving average "
                              "of the generator's weights and batch-norm statistics: per generator step the average "
                              "moves 1/(ema_epochs * generator steps per epoch) toward the new weights (bias-corrected); "
                              "the average is the generator saved and applied (also with --gan none). 0: off"})
    lambda_start: float | None = field(default=None, metadata={"help": "lambda at the first step, moved geometrically "
                                       "(linearly if either is 0) to --lambda over the first --lambda-epochs epochs; "
                                       "default: --lambda throughout"})
    lambda_epochs: int = field(default=0, metadata={"help": "epochs of the --lambda-start schedule"})
    gan_epochs: int = field(default=30, metadata={"help": "GAN training epochs"})
    gan_batch_size: int = field(default=20, metadata={"help": "GAN minibatch size"})
    lr_g: float = field(default=2e-4, metadata={"help": "generator learning rate (Adam, beta1 0.5); the DCGAN "
                        "convention, not checked against the paper (its experiments section was not available)"})
    lr_d: float = field(default=2e-4, metadata={"help": "discriminator learning rate (Adam, beta1 0.5); as --lr-g"})
    g_widths: list[int] = field(default_factory=lambda: [16, 32],
                                metadata={"help": "generator channels per level (one down-sampling each)"})
    d_widths: list[int] = field(default_factory=lambda: [16, 32, 64], metadata={"help": "discriminator channels per level"})
    blocks_per_level: int = field(default=1, metadata={"help": "residual blocks per level"})
    stem: int = field(default=2, metadata={"help": "pixel-unshuffle factor before the first level of both networks "
                      "(2: the levels run at box/2, box/4, ...; 1: the first level at full resolution)"})
    residual: bool = field(default=True, metadata={"help": "residual blocks (--no-residual: plain "
                           "convolutions, the paper's ablation)"})
    g_norm: str = field(default="batch", metadata={"choices": list(NORMS), "help": "generator normalisation"})
    d_norm: str = field(default="layer", metadata={"choices": [n for n in NORMS if n != "batch"],
                        "help": "discriminator normalisation (no batch norm: the gradient penalty needs per-image gradients)"})
    contamination: str | None = field(default=None, metadata={"choices": list(CONTAMINATION_TYPES), "help":
                                      "Huber contamination of the training pairs: A references, B noisy images, C both"})
    epsilon: float = field(default=0.1, metadata={"help": "contaminated fraction with --contamination"})
    val_fraction: float = field(default=0.1, metadata={"help": "pairs held out of training to measure on"})
    batch_size_inference: int = field(default=256, metadata={"cli": False})
    precision: str = field(default="fp32", metadata={"cli": False})
    seed: int = field(default=0, metadata={"help": "random seed"})

    @property
    def adversarial(self) -> bool:
        return self.gan != "none" and not math.isinf(self.recon_weight)

    def validate(self) -> None:
        if self.gan not in SCORES:
            raise InputError(f"--gan must be one of {', '.join(SCORES)}, got {self.gan!r}")
        if not (-1 <= self.alpha <= 1 and -1 <= self.beta <= 1):
            raise InputError(f"--alpha and --beta must lie in [-1, 1], got ({self.alpha}, {self.beta})")
        if self.recon_loss not in RECON_LOSSES:
            raise InputError(f"--recon-loss must be one of {', '.join(RECON_LOSSES)}, got {self.recon_loss!r}")
        if not self.recon_weight >= 0 or not self.gp_weight >= 0:
            raise InputError(f"--lambda and --gp-weight must be >= 0, got {self.recon_weight}, {self.gp_weight}")
        if self.k_d < 1 or self.k_g < 1 or self.gan_batch_size < 2 or self.gan_epochs < 0 or self.warmup_epochs < 0:
            raise InputError("need k_d >= 1, k_g >= 1, gan_batch_size >= 2, gan_epochs >= 0 and warmup_epochs >= 0")
        if not (math.isfinite(self.ema_epochs) and self.ema_epochs >= 0) or self.lambda_epochs < 0:
            raise InputError(f"need finite ema_epochs >= 0 and lambda_epochs >= 0, got {self.ema_epochs}, "
                             f"{self.lambda_epochs}")
        if self.lambda_start is not None and not (math.isfinite(self.lambda_start) and self.lambda_start >= 0):
            raise InputError(f"--lambda-start must be finite and >= 0, got {self.lambda_start}")
        if not (self.lr_g > 0 and self.lr_d > 0):
            raise InputError(f"learning rates must be positive, got {self.lr_g}, {self.lr_d}")
        if self.d_norm == "batch":
            raise InputError("--d-norm batch is not allowed (gradient penalty); use instance, layer or none")
        if self.contamination is not None and self.contamination not in CONTAMINATION_TYPES:
            raise InputError(f"--contamination must be one of {', '.join(CONTAMINATION_TYPES)}")
        if not 0 <= self.epsilon <= 1 or not 0 <= self.val_fraction < 1:
            raise InputError(f"need 0 <= epsilon <= 1 and 0 <= val_fraction < 1, got {self.epsilon}, {self.val_fraction}")
        for cfg in (self.generator_config(), self.discriminator_config()):
            try:
                cfg.validate()
            except ValueError as exc:
                raise InputError(str(exc)) from exc

    def generator_config(self) -> ResNetConfig:
        return ResNetConfig(widths=list(self.g_widths), blocks_per_level=self.blocks_per_level,
                            residual=self.residual, norm=self.g_norm, stem=self.stem)

    def discriminator_config(self) -> ResNetConfig:
        return ResNetConfig(widths=list(self.d_widths), blocks_per_level=self.blocks_per_level,
                            residual=self.residual, norm=self.d_norm, stem=self.stem)

    def generator_arch(self) -> dict:
        """``nn.denoiser`` architecture record of the generator."""
        return {"kind": "resnet-ae", **self.generator_config().to_dict()}

    def lambda_at(self, progress_epochs: float) -> float:
        """λ after ``progress_epochs`` epochs of training (the ``lambda_start`` schedule)."""
        start, end = self.lambda_start, self.recon_weight
        if start is None or self.lambda_epochs == 0 or progress_epochs >= self.lambda_epochs:
            return end
        f = progress_epochs / self.lambda_epochs
        if start > 0 and end > 0:
            return start ** (1 - f) * end**f
        return start + f * (end - start)

    @property
    def label(self) -> str:
        """Short name as in the paper's tables, e.g. ``(0.5,0.5)-GAN+l1``, ``l2-AE``."""
        if not self.adversarial:
            return f"{self.recon_loss}-AE"
        name = "WGAN-GP" if self.gan == "wgan-gp" else f"({self.alpha:g},{self.beta:g})-GAN"
        return f"{name}+{self.recon_loss}" if self.recon_weight > 0 else name


# ------------------------------------------------------------------------------ normalisation
def stack_scale(images) -> tuple[float, float]:
    """One (mean, std) for a whole stack ``(n, d, d)`` (float64 sums)."""
    x = torch.as_tensor(np.asarray(images)).to(torch.float64)
    mean = float(x.mean())
    std = float(x.std())
    return mean, (std if std > 0 else 1.0)


def _scaled(images, mean: float, std: float) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(images, dtype=np.float32))
    return ((x - mean) / std)[:, None].contiguous()  # (n, 1, d, d)


# ----------------------------------------------------------------------------------- training
def build_networks(config: GANConfig) -> tuple[ResNetAutoencoder, ResNetClassifier | None]:
    """Generator and (for adversarial training) discriminator, initialised from ``config.seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        gen = ResNetAutoencoder(config.generator_config())
        disc = ResNetClassifier(config.discriminator_config()) if config.adversarial else None
        if disc is not None and config.d_spectral_norm:
            for module in list(disc.modules()):
                if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                    torch.nn.utils.parametrizations.spectral_norm(module)
    return gen, disc


def train_gan(
    noisy: torch.Tensor,
    refs: torch.Tensor,
    config: GANConfig,
    device: str | torch.device = "cpu",
    checkpoint: str | Path | None = None,
    desc: str | None = None,
) -> tuple[ResNetAutoencoder, ResNetClassifier | None, dict[str, list[float]]]:
    """Algorithm 1 on scaled pairs ``noisy → refs`` ``(n, 1, d, d)``; returns G (the weight
    average with ``ema_epochs`` > 0), D (None without GAN) and per-epoch loss curves
    (``generator``: the generator objective; ``recon``: its ℓp term; ``discriminator``: the
    discriminator's loss incl. penalty). Resumes from ``checkpoint``.

    The curves of epochs before a resume are in the checkpoint's ``losses`` only for
    ``generator``.
    """
    config.validate()
    if noisy.shape != refs.shape or noisy.dim() != 4 or noisy.shape[1] != 1:
        raise ValueError(f"need (n, 1, d, d) pairs, got {tuple(noisy.shape)} and {tuple(refs.shape)}")
    device = resolve_device(device)
    gen, disc = build_networks(config)
    gen.to(device)
    modules = {"generator": gen}
    opt_g = torch.optim.Adam(gen.parameters(), lr=config.lr_g, betas=(0.5, 0.999))
    optimizers = {"opt_g": opt_g}
    if disc is not None:
        disc.to(device)
        modules["discriminator"] = disc
        opt_d = torch.optim.Adam(disc.parameters(), lr=config.lr_d, betas=(0.5, 0.999))
        optimizers["opt_d"] = opt_d
    n, b = noisy.shape[0], config.gan_batch_size
    used = n - 1 if n > 1 and n % b == 1 else n  # no batch of 1 (batch norm)
    steps = max(1, math.ceil(used / b))
    ema = None
    if config.ema_epochs > 0:
        ema = WeightAverage(gen, 1.0 - 1.0 / max(1.0, config.ema_epochs * steps * config.k_g))
        modules["generator_ema"] = ema
    orders: dict[int, torch.Tensor] = {}
    side = {"recon": [], "discriminator": []}
    acc = {"recon": 0.0, "discriminator": 0.0, "count": 0, "epoch": -1}

    def flush():
        if acc["count"]:
            side["recon"].append(acc["recon"] / acc["count"])
            side["discriminator"].append(acc["discriminator"] / acc["count"])
        acc.update(recon=0.0, discriminator=0.0, count=0)

    def step(epoch: int, i: int):
        if epoch not in orders:
            g = torch.Generator().manual_seed(epoch_seed(config.seed, epoch))
            orders.clear()
            orders[epoch] = torch.randperm(n, generator=g)[:used]
        if acc["epoch"] != epoch:
            flush()
            acc["epoch"] = epoch
        idx = orders[epoch][i * b : (i + 1) * b]
        y, x = noisy[idx].to(device), refs[idx].to(device)
        d_value = 0.0
        adversarial = disc is not None and epoch >= config.warmup_epochs
        if adversarial:
            for _ in range(config.k_d):
                with torch.no_grad():
                    fake = gen(y)
                loss_d = discriminator_loss(disc(x), disc(fake), config.gan, config.alpha, config.beta)
                if config.gan == "wgan-gp" and config.gp_weight > 0:
                    loss_d = loss_d + config.gp_weight * gradient_penalty(disc, x, fake)
                if not torch.isfinite(loss_d):
                    return loss_d, len(idx)
                opt_d.zero_grad(set_to_none=True)
                loss_d.backward()
                opt_d.step()
                d_value = float(loss_d.detach())
        for _ in range(config.k_g):
            out = gen(y)
            rec = recon_loss(out, x, config.recon_loss)
            if not adversarial:
                loss_g = rec
            else:
                loss_g = generator_adversarial_loss(disc(out), config.gan, config.alpha, config.beta)
                weight = config.lambda_at(epoch + i / steps)
                if weight > 0:
                    loss_g = loss_g + weight * rec
            if not torch.isfinite(loss_g):
                return loss_g, len(idx)
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            if ema is not None:
                ema.update(gen)
        acc["recon"] += float(rec.detach()) * len(idx)
        acc["discriminator"] += d_value * len(idx)
        acc["count"] += len(idx)
        return loss_g, len(idx)

    losses = train_loop(
        step, epochs=config.gan_epochs, steps_per_epoch=steps, modules=modules, optimizers=optimizers,
        seed=config.seed, device=device, checkpoint=checkpoint, desc=desc or config.label,
    )
    flush()
    curves = {"generator": losses, "recon": side["recon"]}
    if disc is not None:
        curves["discriminator"] = side["discriminator"]
    gen = gen if ema is None else ema.module  # the average is the trained generator
    return gen.eval(), (None if disc is None else disc.eval()), curves


def split_rows(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, held-out rows) of ``n`` pairs, a seeded random split."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(val_fraction * n)) if n > 1 else 0
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def fit_scaled(noisy: np.ndarray, refs: np.ndarray, config: GANConfig, device="cpu", checkpoint=None, desc=None):
    """Scale a stack of pairs ``(n, d, d)`` per stack, train, and return ``(G, curves, scale)``;
    ``scale = {"in_mean", "in_std", "out_mean", "out_std"}`` for the model file."""
    in_mean, in_std = stack_scale(noisy)
    out_mean, out_std = stack_scale(refs)
    gen, _, curves = train_gan(_scaled(noisy, in_mean, in_std), _scaled(refs, out_mean, out_std), config, device,
                               checkpoint, desc)
    scale = {"in_mean": in_mean, "in_std": in_std, "out_mean": out_mean, "out_std": out_std}
    return gen, curves, scale
