"""DnCNN as a supervised baseline denoiser, trained on the same simulated pairs as CDAE's
pre-training: input SNR ``snr_in`` (0.1) → clean, both normalised per image (zero mean, unit
variance), MSE loss. It sees no target data: it is what supervised training on simulations
alone gives.

>>> run = train_dncnn("sim_pretrain/", DnCNNConfig(), "runs/dncnn", "cpu")        # doctest: +SKIP
>>> denoised = denoise_images(load_model(run), images)                          # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cryoprior.config import config_to_dict, write_run_config
from cryoprior.errors import InputError
from cryoprior.nn.cdae_ops import load_levels
from cryoprior.nn.denoiser import save_model
from cryoprior.nn.models.dncnn import DnCNN
from cryoprior.nn.training import OPTIMIZERS, fit_pairs, save_loss_curves

# fields shared with CDAEConfig (one CLI flag serves both)
SHARED_FIELDS = ("batch_size", "lr", "optimizer", "seed")


@dataclass
class DnCNNConfig:
    """Architecture and training of the DnCNN baseline."""

    depth: int = field(default=8, metadata={"flag": "--dncnn-depth", "help": "DnCNN layers (paper: 17)"})
    width: int = field(default=16, metadata={"flag": "--dncnn-width", "help": "DnCNN channels (paper: 64)"})
    epochs: int = field(default=10, metadata={"flag": "--dncnn-epochs", "help": "DnCNN training epochs"})
    snr_in: float = field(default=0.1, metadata={"flag": "--dncnn-snr-in", "help": "input SNR of the pairs"})
    batch_size: int = field(default=64, metadata={"help": "minibatch size"})
    lr: float = field(default=1e-3, metadata={"help": "learning rate"})
    optimizer: str = field(default="rmsprop", metadata={"choices": list(OPTIMIZERS), "help": "optimiser"})
    seed: int = field(default=0, metadata={"help": "random seed"})

    def validate(self) -> None:
        if self.depth < 2 or self.width < 1:
            raise InputError(f"DnCNN needs depth >= 2 and width >= 1, got {self.depth}, {self.width}")
        if self.epochs < 0 or self.batch_size < 1 or not self.lr > 0:
            raise InputError("DnCNN needs epochs >= 0, batch_size >= 1 and lr > 0")
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if not self.snr_in > 0 or math.isinf(self.snr_in):
            raise InputError(f"snr_in must be a finite positive SNR, got {self.snr_in}")

    def arch(self) -> dict:
        return {"kind": "dncnn", "depth": self.depth, "width": self.width}


def fit_dncnn(
    levels: list[torch.Tensor],
    config: DnCNNConfig,
    device: str | torch.device = "auto",
    checkpoint: str | Path | None = None,
) -> tuple[DnCNN, list[float]]:
    """Train a DnCNN on normalised pairs ``levels = [noisy (n, 1, d, d), clean (n, 1, d, d)]``."""
    config.validate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = DnCNN(config.depth, config.width)
    losses = fit_pairs(
        model, levels[0], levels[1], epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
        optimizer=config.optimizer, seed=config.seed, device=device, checkpoint=checkpoint, desc="DnCNN",
    )
    return model.eval(), losses


def train_dncnn(
    pretrain_dir: str | Path, config: DnCNNConfig | None, out_dir: str | Path, device: str | torch.device = "auto"
) -> Path:
    """Train on ``pretrain_dir`` (SNR ``snr_in`` and clean images) and write a run folder:
    ``model.pt``, ``checkpoints/``, ``losses.json``/``.png``, ``config.yaml``. Resumable."""
    config = config or DnCNNConfig()
    config.validate()
    out_dir = Path(out_dir)
    levels = load_levels(pretrain_dir, [config.snr_in, math.inf])
    (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    write_run_config(out_dir / "config.yaml", config, method="dncnn", pretrain=str(pretrain_dir))
    model, losses = fit_dncnn(levels, config, device, out_dir / "checkpoints" / "dncnn.pt")
    save_model(out_dir / "model.pt", "dncnn", config.arch(), model, config_to_dict(config))
    save_loss_curves({"DnCNN": losses}, out_dir)
    return out_dir
