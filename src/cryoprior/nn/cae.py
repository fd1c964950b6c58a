"""Training a plain convolutional autoencoder and clustering its codes ("CAE + k-means").

The autoencoder (:class:`cryoprior.nn.models.cae.ConvAutoencoder`) learns to reconstruct the
images, normalised per image, under a mean-squared error; its bottleneck codes are the features
that k-means then clusters. Training is deterministic on CPU for a given ``seed`` (the global
torch random state is left as it was).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from cryoprior.core.filters import normalize_images
from cryoprior.errors import TrainingDivergedError
from cryoprior.nn.models.cae import ConvAutoencoder
from cryoprior.progress import progress

log = logging.getLogger(__name__)


@dataclass
class CAEConfig:
    """Architecture and training of the CAE."""

    latent_dim: int = field(default=32, metadata={"help": "bottleneck size"})
    widths: list[int] = field(default_factory=lambda: [16, 32, 64], metadata={"help": "encoder channels"})
    epochs: int = field(default=30, metadata={"help": "training epochs"})
    batch_size: int = field(default=64, metadata={"help": "minibatch size"})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate"})
    seed: int = field(default=0, metadata={"help": "random seed"})


def _tensor(images) -> torch.Tensor:
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images, dtype=np.float32))
    if x.dim() != 3 or x.shape[-1] != x.shape[-2] or len(x) == 0:
        raise ValueError(f"expected images (n, d, d), got shape {tuple(x.shape)}")
    return normalize_images(x.to(torch.float32))


def train_cae(images, config: CAEConfig | None = None, device: str | torch.device = "cpu") -> ConvAutoencoder:
    """Train a CAE on images ``(n, d, d)`` (normalised here per image); returns it in eval mode."""
    config = config or CAEConfig()
    x = _tensor(images)
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        model = ConvAutoencoder(x.shape[-1], config.latent_dim, config.widths).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=config.lr)
        gen = torch.Generator().manual_seed(config.seed)
        model.train()
        for epoch in progress(range(config.epochs), desc="CAE training"):
            order = torch.randperm(len(x), generator=gen)
            total = 0.0
            for start in range(0, len(x), config.batch_size):
                idx = order[start : start + config.batch_size]
                if len(idx) < 2 and len(x) >= 2:
                    continue  # batch norm needs two samples
                batch = x[idx].to(device)
                loss = torch.mean((model(batch) - batch) ** 2)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
            if not np.isfinite(total):
                raise TrainingDivergedError(f"CAE training diverged at epoch {epoch + 1} (loss {total})")
            log.debug("CAE epoch %d: loss %.4f", epoch + 1, total / len(x))
    return model.eval()


@torch.no_grad()
def encode(model: ConvAutoencoder, images, batch_size: int = 256, device: str | torch.device = "cpu") -> np.ndarray:
    """Bottleneck codes ``(n, latent_dim)`` float32 of images ``(n, d, d)`` (normalised here)."""
    x = _tensor(images)
    model = model.eval().to(device)
    codes = [model.encode(x[s : s + batch_size].to(device)).cpu() for s in range(0, len(x), batch_size)]
    return torch.cat(codes).numpy()


def cae_embed(images, config: CAEConfig | None = None, device: str | torch.device = "cpu", batch_size: int = 256) -> np.ndarray:
    """Train a CAE on ``images`` ``(n, d, d)`` and return their codes ``(n, latent_dim)``."""
    model = train_cae(images, config, device)
    return encode(model, images, batch_size, device)
