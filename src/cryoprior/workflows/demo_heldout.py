"""The demo's held-out denoising stages on the uniform CTF stack (the robust-GAN paper's real-data
protocol, ``cryoprior denoise train --method gan --reference-map``).

The uniform stack (CTF, shifts, uniform orientations, known poses) is split with a fixed seed
into a training part and a held-out part (``--heldout-fraction``). The reference map is the
demo's own reconstruction of the NOISY uniform particles with the Gaussian prior
(``reconstruct_gaussian/map.mrc``: a user's consensus map; never the true map). Each method then
denoises the held-out particles, scored against their clean images (CTF applied) in the data's
units:

- ``gan``: the (.5,.5)-GAN + ℓ1 (``GANConfig`` defaults, ``--gan-epochs``) trained on
  (training particle, projection of the map at its pose with its CTF) pairs;
- ``l1-ae``: the ℓ1 autoencoder trained on the same pairs (``--gan none``);
- ``cdae``: the shipped generic CDAE fine-tuned on the training particles' noisy images, as the
  demo's four-view stage uses it (``denoise train --method cdae``);
- the classical baselines, on the held-out images alone.

The learned models are applied as ``cryoprior denoise apply`` does (the CDAE phase-flips by each
particle's CTF, the GAN scales by the held-out stack's statistics). The training STAR carries no
clean images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cryoprior.io.stack import ParticleStack
from cryoprior.nn.gan import split_rows

#: what can denoise the held-out particles (bm3d: only with the optional bm3d package)
HELDOUT_DENOISERS = ("gan", "l1-ae", "cdae", "nlm", "lowpass", "wiener", "bm3d")
LEARNED_FROM_MAP = {"gan": {}, "l1-ae": {"gan": "none", "recon_loss": "l1"}}
CLEAN_COLUMN = "cpCleanImageName"


def split_stack(star: Path, fraction: float, seed: int) -> dict:
    """Write ``train.star`` (without clean images) and ``heldout.star`` next to ``star``, a seeded
    split of its rows; returns the sizes."""
    stack = ParticleStack.from_file(star)
    train, held = split_rows(len(stack), fraction, seed)
    part = stack.subset(train)
    part = part.with_table(part.table.drop(columns=[c for c in part.table.columns if c == CLEAN_COLUMN]))
    part.write(star.parent / "train.star", star.parent / "train.mrcs")
    stack.subset(held).write(star.parent / "heldout.star", star.parent / "heldout.mrcs")
    return {"n_train": len(train), "n_heldout": len(held), "fraction": fraction, "seed": seed}


def gan_config(method: str, epochs: int, seed: int):
    """The GANConfig of a map-trained method (``gan`` or ``l1-ae``)."""
    from cryoprior.nn.gan import GANConfig

    return GANConfig(**LEARNED_FROM_MAP[method], gan_epochs=epochs, seed=seed, val_fraction=0.0)


def train_learned(method: str, folder: Path, train_star: Path, reference_map: Path, cdae_config, gan_epochs: int,
                  seed: int, device: str) -> None:
    """``cryoprior denoise train`` of ``method`` into ``folder`` (resumed from its checkpoints)."""
    from cryoprior.workflows.denoise import train

    if method == "cdae":
        train("cdae", folder, target=train_star, cdae=cdae_config, device=device, resume=True)
    else:
        train("gan", folder, reference_map=reference_map, target=train_star, gan=gan_config(method, gan_epochs, seed),
              device=device, resume=True)


def apply_learned(folder: Path, heldout_star: Path, device: str) -> np.ndarray:
    """``cryoprior denoise apply --model folder heldout.star`` (into ``denoised_<folder name>/`` next
    to ``heldout.star``); returns the denoised images."""
    from cryoprior.workflows.denoise import apply

    out = apply(folder, heldout_star, heldout_star.parent / f"denoised_{folder.name}", device=device, overwrite=True)
    return ParticleStack.from_file(out / "particles.star").images()

