"""DRVAE + BSK-means++: iterative denoising and balanced clustering of a particle stack.

1. The stack is prepared: phase-flipped by each particle's CTF when the STAR has CTF columns,
   normalised per image (zero mean, unit variance; the mean and deviation are kept to return the
   denoised images in the input's units) and Fourier-cropped to ``net_box`` (the working box of
   the network; most of the signal at SNR ≤ 0.1 lies below its Nyquist frequency).
2. A :class:`~cryoprior.nn.models.drvae.DRVAE` is trained unsupervised on those images alone
   (reconstruction + β·KL), for ``warmup_steps``.
3. Rounds: the denoised images (decoder of the latent mean), or the latent means, are clustered
   by BSK-means++ into K classes of equal size (``align``: up to in-plane rotation and shift, the
   assignment being the balanced one under the aligned distance of ``cluster.align``); within each
   class the ``reliable_fraction`` nearest the centre are reliable, and each reliable image gets
   its class average (of the denoised images, or of the network inputs, ``pseudo_targets``; moved
   into the image's own frame when aligned) as a pseudo-target with weight ``target_weight``;
   training goes on for ``round_steps``. The rounds stop when fewer than ``stop_fraction`` of the
   particles change class, or after ``max_rounds`` clusterings. What the clusterings see
   (``nn.drvae_features``; defaults chosen on development structures): first the low-passed inputs
   with SSNR-regularised centres (``first_clustering="ssnr"``), then the denoised images next to
   them (``cluster_on="both"``), each from the previous classes (``warm_start``).

Every training phase runs in :func:`cryoprior.nn.training.train_loop` with its own checkpoint
(``checkpoints/round_00.pt`` for the warm-up, ``round_RR.pt`` after clustering ``RR``), and each
clustering is saved (``rounds/round_RR.npz``), so a rerun on the same folder resumes and gives
what an uninterrupted run gives.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

import cryoprior.classical.cluster.ml2d as ml2d_defaults
from cryoprior.classical.cluster.align import (
    align_kmeans,
    aligned_averages,
    aligned_costs,
    alignment_mask,
)
from cryoprior.classical.cluster.averages import class_averages
from cryoprior.classical.cluster.bsk import balanced_assignment, bsk_means, reliable_mask
from cryoprior.core.ctf import phase_flip
from cryoprior.core.fft import fft2c, ifft2c
from cryoprior.core.filters import downsample
from cryoprior.core.metrics import classification_scores, match_labels
from cryoprior.core.rotations import rotate_images
from cryoprior.errors import InputError
from cryoprior.fileutil import atomic_path
from cryoprior.io.relion import ctf_from_star
from cryoprior.io.stack import ParticleStack
from cryoprior.nn.denoiser import denoise_tensor, read_model_file, save_model
from cryoprior.nn.drvae_features import joint_features, lowpass_inputs, ml2d_refine, ssnr_first
from cryoprior.nn.models.drvae import DRVAE, DRVAEDenoiser, vae_loss
from cryoprior.nn.training import epoch_seed, train_loop

log = logging.getLogger(__name__)

CLUSTER_ON = ("denoised", "latent", "both")
FIRST_CLUSTERING = ("network", "lowpass", "ssnr")
PSEUDO_TARGETS = ("denoised", "raw")
CHUNK = 4096


@dataclass
class DRVAEConfig:
    """DRVAE training and the BSK-means++ rounds (``cryoprior classify --method drvae-bsk``,
    ``cryoprior denoise train --method drvae``)."""

    classes: int = field(default=4, metadata={"help": "number of classes K", "metavar": "K"})
    latent_dim: int = field(default=16, metadata={"help": "size of the Gaussian latent"})
    vae_widths: list[int] = field(default_factory=lambda: [16, 32, 64], metadata={"help": "ResNet channels per level"})
    net_box: int = field(default=32, metadata={"help": "working box of the network, px (Fourier crop; 0: the input's)"})
    beta: float = field(default=1.0, metadata={"flag": "--kl-beta", "help": "weight of the KL term (β-VAE)"})
    vae_lr: float = field(default=1e-3, metadata={"help": "Adam learning rate"})
    vae_batch_size: int = field(default=64, metadata={"help": "images per minibatch"})
    warmup_steps: int = field(default=300, metadata={"help": "unsupervised minibatch steps before the first clustering (whole epochs)"})
    round_steps: int = field(default=100, metadata={"help": "minibatch steps with pseudo-targets per round (whole epochs)"})
    max_rounds: int = field(default=4, metadata={"help": "most clusterings"})
    stop_fraction: float = field(default=0.01, metadata={"help": "stop when fewer particles than this change class"})
    size_tolerance: float = field(default=0.5, metadata={"help": "BSK class sizes may range over (1 ± τ)·n/K; 0: exactly balanced (the paper)"})
    reliable_fraction: float = field(default=0.5, metadata={"help": "fraction of each class nearest its centre given a pseudo-target"})
    target_weight: float = field(default=1.0, metadata={"help": "weight of the pseudo-target loss"})
    cluster_on: str = field(default="both", metadata={"choices": list(CLUSTER_ON), "help": "what BSK-means++ clusters: the latent means, the denoised images, or both: the denoised images next to the inputs low-passed by --lowpass-sigma (joint_features); with --align: their sum for both, else the denoised images"})
    denoised_weight: float = field(default=0.5, metadata={"help": "with --cluster-on both: weight of the denoised images against the low-passed inputs"})
    first_clustering: str = field(default="ssnr", metadata={"choices": list(FIRST_CLUSTERING), "help": "what the first clustering sees: what --cluster-on says (network), the network inputs Gaussian low-passed by --lowpass-sigma (lowpass), or (ssnr) k-means of those refined by BSK-means with SSNR-regularised centres on the inputs (ssnr_bsk; with --align: as lowpass)"})
    lowpass_sigma_px: float = field(default=1.5, metadata={"flag": "--lowpass-sigma", "help": "real-space width of the low-pass of --first-clustering lowpass, input px"})
    warm_start: bool = field(default=True, metadata={"help": "each clustering after the first starts from the previous round's classes (no new k-means++ seeding)"})
    bsk_restarts: int = field(default=3, metadata={"help": "k-means++ seedings of BSK-means++, the lowest inertia kept"})
    ml2d_iterations: int = field(default=ml2d_defaults.ITERATIONS, metadata={"help": "with --align: EM steps of ML2D (classes and in-plane poses marginalised, as RELION's Class2D) that refine the last clustering's classes; 0: off"})
    ml2d_temperature: float = field(default=ml2d_defaults.TEMPERATURE, metadata={"help": "ML2D's first E-step sees the noise variance times this, falling to 1 over --ml2d-anneal steps (deterministic annealing; 1: plain EM)"})
    ml2d_anneal: int = field(default=ml2d_defaults.ANNEAL_ITERATIONS, metadata={"help": "ML2D steps over which --ml2d-temperature falls to 1 and the resolution rises from --ml2d-start-shell to Nyquist"})
    ml2d_start_shell: float = field(default=ml2d_defaults.START_SHELL, metadata={"help": "ML2D's first E-step compares images only up to this Fourier shell (cycles per box), widening to Nyquist over --ml2d-anneal steps, as RELION's Class2D starts coarse; 0: the whole band throughout"})
    align_restarts: int = field(default=1, metadata={"help": "with --align: align-kmeans seedings of the first clustering, the lowest aligned cost kept"})
    pseudo_targets: str = field(default="denoised", metadata={"choices": list(PSEUDO_TARGETS), "help": "class averages of the denoised images or of the network inputs"})
    align: bool = field(default=False, metadata={"help": "cluster up to in-plane rotation (and --max-shift)"})
    max_shift_px: int = field(default=0, metadata={"flag": "--max-shift", "help": "translations searched with --align, input px per axis"})
    seed: int = field(default=0, metadata={"help": "random seed"})

    def validate(self) -> None:
        positive = {"--classes": self.classes, "--latent-dim": self.latent_dim, "--vae-batch-size": self.vae_batch_size,
                    "--max-rounds": self.max_rounds, "--bsk-restarts": self.bsk_restarts,
                    "--align-restarts": self.align_restarts}
        for flag, value in positive.items():
            if value < 1:
                raise InputError(f"{flag} must be >= 1, got {value}")
        if not self.vae_widths or min(self.vae_widths) < 1:
            raise InputError(f"--vae-widths must be positive, got {self.vae_widths}")
        if self.net_box < 0 or self.net_box % 2:
            raise InputError(f"--net-box must be an even number of pixels (0: the input's), got {self.net_box}")
        if min(self.warmup_steps, self.round_steps, self.max_shift_px, self.ml2d_iterations, self.ml2d_anneal,
               self.ml2d_start_shell) < 0:
            raise InputError("--warmup-steps, --round-steps, --max-shift and --ml2d-iterations, -anneal, -start-shell must be >= 0")
        if self.ml2d_temperature < 1:
            raise InputError(f"--ml2d-temperature must be >= 1, got {self.ml2d_temperature}")
        if not (self.beta >= 0 and self.target_weight >= 0 and self.denoised_weight >= 0 and self.vae_lr > 0):
            raise InputError("--kl-beta, --target-weight and --denoised-weight must be >= 0, --vae-lr > 0")
        if not 0 <= self.size_tolerance <= 1:
            raise InputError(f"--size-tolerance must be in [0, 1], got {self.size_tolerance}")
        if not 0 < self.reliable_fraction <= 1 or not 0 <= self.stop_fraction <= 1:
            raise InputError("--reliable-fraction must be in (0, 1], --stop-fraction in [0, 1]")
        if self.cluster_on not in CLUSTER_ON or self.pseudo_targets not in PSEUDO_TARGETS:
            raise InputError(f"--cluster-on must be one of {CLUSTER_ON}, --pseudo-targets one of {PSEUDO_TARGETS}")
        if self.first_clustering not in FIRST_CLUSTERING or not self.lowpass_sigma_px >= 0:
            raise InputError(f"--first-clustering must be one of {FIRST_CLUSTERING}, --lowpass-sigma >= 0")

    def working_box(self, box: int) -> int:
        return box if self.net_box == 0 else min(self.net_box, box)


# ------------------------------------------------------------------------------ preparation
@dataclass
class Prepared:
    """Network inputs ``x`` ``(n, 1, b, b)`` and what undoes the normalisation (``mean``, ``std`` ``(n,)``)."""

    x: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    box: int
    ctf: bool


def check_images(images: np.ndarray, where) -> None:
    if not np.isfinite(images).all():
        bad = int((~np.isfinite(images.reshape(len(images), -1))).any(1).sum())
        raise InputError(f"{bad} image(s) hold NaN or Inf values", where)


def prepare(stack: ParticleStack, net_box: int) -> Prepared:
    """Phase-flip (with CTF columns), normalise per image and Fourier-crop the whole stack."""
    n, box = len(stack), stack.box
    x = torch.empty((n, 1, net_box, net_box))
    mean, std = torch.empty(n), torch.empty(n)
    has_ctf = stack.has_column("rlnDefocusU")
    for start, chunk in stack.chunks(CHUNK):
        check_images(chunk, stack.path)
        images = torch.as_tensor(np.asarray(chunk, dtype=np.float32))
        if has_ctf:
            images = phase_flip(images, ctf_from_star(stack, np.arange(start, start + len(chunk))))
        m = images.mean(dim=(-2, -1))
        s = images.std(dim=(-2, -1)).clamp(min=1e-12)
        part = slice(start, start + len(chunk))
        mean[part], std[part] = m, s
        x[part, 0] = downsample((images - m[:, None, None]) / s[:, None, None], net_box)
    return Prepared(x, mean, std, box, has_ctf)


def upsample(x: torch.Tensor, box: int) -> torch.Tensor:
    """Fourier zero-pad ``(..., b, b)`` to ``(..., box, box)`` (the inverse of ``filters.downsample``)."""
    b = x.shape[-1]
    if b == box:
        return x
    f = fft2c(x)
    out = torch.zeros((*x.shape[:-2], box, box), dtype=f.dtype)
    s = box // 2 - b // 2
    out[..., s : s + b, s : s + b] = f
    return ifft2c(out).real * (box / b) ** 2


def to_input_units(y: torch.Tensor, prep: Prepared, rows: slice) -> torch.Tensor:
    """Network outputs ``(m, 1, b, b)`` of ``rows`` → ``(m, box, box)`` in the input's intensity units."""
    return upsample(y[:, 0], prep.box) * prep.std[rows, None, None] + prep.mean[rows, None, None]


# --------------------------------------------------------------------------------- clustering
@dataclass
class Assignment:
    """One clustering round: ``labels``, ``reliable`` ``(n,)``, pseudo-``targets`` ``(n, 1, b, b)``,
    poses ``angles`` ``(n,)`` rad and ``shifts`` ``(n, 2)`` net px (zeros without ``align``)."""

    labels: np.ndarray
    reliable: np.ndarray
    targets: torch.Tensor
    angles: np.ndarray
    shifts: np.ndarray


def encode_all(vae: DRVAE, x: torch.Tensor, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent means ``(n, L)`` and denoised images ``(n, 1, b, b)`` (decoder of the mean), on CPU."""
    den = DRVAEDenoiser(vae.box, vae=vae)
    vae.eval().to(device)
    with torch.inference_mode():
        mu = torch.cat([vae.encode(x[s : s + batch].to(device))[0].cpu() for s in range(0, len(x), batch)])
    return mu, denoise_tensor(den, x, batch, device, precision="fp32")


def _in_own_frame(averages: torch.Tensor, labels: np.ndarray, angles: np.ndarray, shifts: np.ndarray) -> torch.Tensor:
    """Each particle's class average rotated by its angle, then moved by its shift: ``(n, 1, b, b)``."""
    t = rotate_images(averages[torch.as_tensor(labels)][:, None], torch.as_tensor(angles, dtype=torch.float32))
    if np.any(shifts):
        t = torch.stack([torch.roll(im, (int(dy), int(dx)), dims=(-2, -1)) for im, (dx, dy) in zip(t, shifts.tolist())])
    return t


def aligned_bsk(images: torch.Tensor, k: int, seed: int, max_shift: int, n_angles: int = 36, max_iter: int = 10,
                size_tolerance: float = 0.0, init: Assignment | None = None, n_init: int = 1
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """BSK-means++ up to in-plane rotation and integer shifts: seeded by ``align_kmeans`` (or by
    the classes and poses of ``init``; best of ``n_init`` seedings), then balanced assignments under the aligned distance.
    ``images`` ``(n, d, d)``.

    Returns ``(labels, angles rad, shifts (n, 2) px, averages (k, d, d), own cost (n,))``.
    """
    if init is None:
        labels, _, _, centres = align_kmeans(images, k, seed, n_angles=n_angles, max_shift=max_shift, n_init=n_init)
        centres = torch.as_tensor(centres)
    else:
        labels = init.labels
        centres = aligned_averages(images, torch.as_tensor(labels), torch.as_tensor(init.angles, dtype=torch.float32),
                                   torch.as_tensor(init.shifts), k, centre=max_shift > 0)
    mask = alignment_mask(images.shape[-1])
    x = images * mask
    grid = torch.arange(n_angles, dtype=torch.float32) * (2 * math.pi / n_angles)
    new = None
    for _ in range(max_iter):
        cost, rot, shift = aligned_costs(x, centres, grid, mask, max_shift)
        new = balanced_assignment(cost.double().numpy(), labels, size_tolerance=size_tolerance)
        lab = torch.as_tensor(new)
        angle, move = grid[rot[torch.arange(len(lab)), lab]], shift[torch.arange(len(lab)), lab]
        centres = aligned_averages(images, lab, angle, move, k, centre=max_shift > 0)
        if np.array_equal(new, labels):
            break
        labels = new
    own = cost[torch.arange(len(lab)), lab].clamp(min=0).numpy()
    return new, angle.numpy().astype(np.float64), move.numpy(), centres, own


def cluster_round(vae: DRVAE, x: torch.Tensor, config: DRVAEConfig, seed: int, device, max_shift_net: int,
                  features: torch.Tensor | None = None, previous: Assignment | None = None,
                  clustered: tuple | None = None, lowpassed: torch.Tensor | None = None) -> Assignment:
    """Cluster the current denoised images (or latent means; or ``features`` ``(n, 1, b, b)`` when
    given), pick the reliable samples, build targets. ``previous``: start from its classes;
    ``clustered``: ``(labels, seen, centres)`` of a clustering already made (not with ``align``);
    ``lowpassed``: the low-passed inputs (``--cluster-on both``)."""
    k, n = config.classes, len(x)
    mu, denoised = encode_all(vae, x, config.vae_batch_size * 4, device)
    values = denoised if config.pseudo_targets == "denoised" else x  # (n, 1, b, b)
    if config.align:
        seen = denoised if features is None else features
        if features is None and config.cluster_on == "both":  # one image: the sum of the two parts
            seen = torch.as_tensor(joint_features(lowpassed, denoised, config.denoised_weight, summed=True))
        labels, angles, shifts, _, own = aligned_bsk(seen[:, 0], k, seed, max_shift_net,
                                                        size_tolerance=config.size_tolerance, init=previous,
                                                        n_init=config.align_restarts)
        reliable = reliable_mask(np.sqrt(own)[:, None], labels, np.zeros((k, 1)), config.reliable_fraction)
        averages = aligned_averages(values[:, 0], torch.as_tensor(labels), torch.as_tensor(angles, dtype=torch.float32),
                           torch.as_tensor(shifts), k, centre=False)
        targets = _in_own_frame(averages, labels, angles, shifts)
    else:
        if clustered is not None:
            labels, seen, centres = clustered
        else:
            if features is not None:
                seen = features.reshape(n, -1).numpy()
            elif config.cluster_on == "both":
                seen = joint_features(lowpassed, denoised, config.denoised_weight)
            else:
                seen = mu.numpy() if config.cluster_on == "latent" else denoised.reshape(n, -1).numpy()
            labels, centres = bsk_means(seen, k, seed, n_init=config.bsk_restarts, size_tolerance=config.size_tolerance,
                                        init_labels=None if previous is None else previous.labels)
        reliable = reliable_mask(seen, labels, centres, config.reliable_fraction)
        averages = torch.as_tensor(class_averages(values[:, 0].numpy(), labels, k))
        targets = averages[torch.as_tensor(labels)][:, None]
        angles, shifts = np.zeros(n), np.zeros((n, 2), dtype=np.int64)
    return Assignment(labels.astype(np.int64), reliable, targets.float(), angles, np.asarray(shifts, dtype=np.int64))


def _relabel(a: Assignment, prev: np.ndarray, k: int) -> None:
    """Renumber ``a``'s classes in place to agree best with ``prev`` (Hungarian matching)."""
    mapping = match_labels(prev, a.labels)
    lut = np.array([mapping.get(j, j) for j in range(k)], dtype=np.int64)
    a.labels = lut[a.labels]


def _save_assignment(path: Path, a: Assignment) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, labels=a.labels, reliable=a.reliable, targets=a.targets.numpy(), angles=a.angles, shifts=a.shifts)


def _load_assignment(path: Path) -> Assignment:
    z = np.load(path)
    return Assignment(z["labels"], z["reliable"], torch.as_tensor(z["targets"]), z["angles"], z["shifts"])


# ----------------------------------------------------------------------------------- training
@dataclass
class DRVAEResult:
    """What a run gives: final ``labels`` ``(n,)``, poses (``angles`` rad, ``shifts`` (n, 2) input
    px; zeros without ``align``), the trained ``vae``, the ``prepared`` inputs and the round ``curves``."""

    labels: np.ndarray
    angles: np.ndarray
    shifts: np.ndarray
    vae: DRVAE
    prepared: Prepared
    curves: dict


def train_phase(vae: DRVAE, opt, x: torch.Tensor, config: DRVAEConfig, steps: int, seed: int, device,
                 checkpoint: Path, desc: str, assignment: Assignment | None = None) -> list[float]:
    """The DRVAE loss (plus the pseudo-target term with ``assignment``) in train_loop, for the
    whole epochs that make at least ``steps`` minibatch steps (none for 0)."""
    n, bs = len(x), config.vae_batch_size
    used = n - 1 if n > 1 and n % bs == 1 else n  # no batch of 1 (batch norm)
    epochs = math.ceil(steps / math.ceil(used / bs))
    orders: dict[int, torch.Tensor] = {}
    weights = None if assignment is None else torch.as_tensor(assignment.reliable, dtype=torch.float32)

    def step(epoch: int, i: int):
        if epoch not in orders:
            orders.clear()
            orders[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))[:used]
        idx = orders[epoch][i * bs : (i + 1) * bs]
        xb = x[idx].to(device)
        recon, mu, logvar = vae(xb)
        if assignment is None:
            loss = vae_loss(recon, xb, mu, logvar, config.beta)
        else:
            loss = vae_loss(recon, xb, mu, logvar, config.beta, weights[idx].to(device),
                            assignment.targets[idx].to(device), config.target_weight)
        if torch.isfinite(loss):
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return loss, len(idx)

    return train_loop(step, epochs=epochs, steps_per_epoch=math.ceil(used / bs), modules={"vae": vae},
                      optimizers={"optimizer": opt}, seed=seed, device=device, checkpoint=checkpoint, desc=desc)


def new_vae(config: DRVAEConfig, box: int) -> DRVAE:
    return DRVAE(box, config.latent_dim, list(config.vae_widths))


def train_drvae(stack: ParticleStack, config: DRVAEConfig, run_dir: str | Path, device) -> DRVAEResult:
    """Train DRVAE on ``stack`` and cluster it in rounds (module docstring) in ``run_dir``
    (``checkpoints/``, ``rounds/``, ``curves.json``, ``model.pt``); resumes what is there."""
    config.validate()
    n = len(stack)
    if config.classes > n:
        raise InputError(f"--classes {config.classes} is more than the {n} particles", stack.path)
    run = Path(run_dir)
    _check_run_config(run, config, stack)
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run / "rounds").mkdir(exist_ok=True)
    b = config.working_box(stack.box)
    prep = prepare(stack, b)
    scale = stack.box / b
    max_shift_net = math.ceil(config.max_shift_px / scale) if config.align else 0
    lowpassed = (lowpass_inputs(prep.x, config.lowpass_sigma_px / scale)
                 if config.first_clustering != "network" or config.cluster_on == "both" else None)
    torch.manual_seed(config.seed)
    vae = new_vae(config, b).to(device)
    opt = torch.optim.Adam(vae.parameters(), lr=config.vae_lr)
    warm = train_phase(vae, opt, prep.x, config, config.warmup_steps, config.seed, device,
                        run / "checkpoints" / "round_00.pt", "drvae warm-up")
    curves: dict = {"warmup_loss": warm, "rounds": [], "converged": False}
    prev: np.ndarray | None = None
    assignment = None
    for r in range(1, config.max_rounds + 1):
        path = run / "rounds" / f"round_{r:02d}.npz"
        if path.is_file():
            assignment = _load_assignment(path)
        else:
            features = clustered = None
            if r == 1 and config.first_clustering != "network":
                features = lowpassed
                if config.first_clustering == "ssnr" and not config.align:
                    clustered = ssnr_first(prep.x, lowpassed, config.classes, config.seed + r, config.size_tolerance)
            start = assignment if config.warm_start and assignment is not None else None
            assignment = cluster_round(vae, prep.x, config, config.seed + r, device, max_shift_net, features, start,
                                       clustered, lowpassed)
            if prev is not None:  # class j keeps its number from round to round
                _relabel(assignment, prev, config.classes)
            _save_assignment(path, assignment)
        changed = 1.0 if prev is None else float((assignment.labels != prev).mean())
        record = {"round": r, "changed_fraction": round(changed, 5),
                  "class_sizes": np.bincount(assignment.labels, minlength=config.classes).tolist(),
                  "reliable": int(assignment.reliable.sum()), "loss": []}
        curves["rounds"].append(record)
        log.info("drvae round %d: %.2f%% of the particles changed class; sizes %s", r, 100 * changed,
                 record["class_sizes"])
        if prev is not None and changed < config.stop_fraction:
            curves["converged"] = True
            break
        prev = assignment.labels
        if r == config.max_rounds:
            break
        record["loss"] = train_phase(vae, opt, prep.x, config, config.round_steps, config.seed + 7919 * r, device,
                                      run / "checkpoints" / f"round_{r:02d}.pt", f"drvae round {r}", assignment)
    assert assignment is not None
    if config.align and config.ml2d_iterations > 0:
        last = assignment.labels
        assignment = ml2d_refine(prep.x[:, 0], assignment, config.classes, max_shift_net, config.ml2d_iterations,
                                 config.size_tolerance, **ml2d_defaults.annealing_of(config))
        curves["ml2d"] = {"iterations": config.ml2d_iterations, "changed_fraction": round(float((assignment.labels != last).mean()), 5),
                          "class_sizes": np.bincount(assignment.labels, minlength=config.classes).tolist()}
    with atomic_path(run / "curves.json") as tmp:
        tmp.write_text(json.dumps(curves, indent=2))
    save_model(run / "model.pt", "drvae", model_arch(config, b), DRVAEDenoiser(b, vae=vae),
               {**asdict(config), "input_box": stack.box, "ctf": prep.ctf})
    return DRVAEResult(assignment.labels, assignment.angles, assignment.shifts.astype(np.float64) * scale,
                       vae.eval(), prep, curves)


def _check_run_config(run: Path, config: DRVAEConfig, stack: ParticleStack) -> None:
    """Record the config and the stack's size in ``run/drvae_config.json``; a run folder holding
    another config or stack is refused (it would be resumed into a mix)."""
    record = {**asdict(config), "n": len(stack), "box": stack.box}
    path = run / "drvae_config.json"
    if path.is_file():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(record) if old.get(k) != record.get(k))
        if diff:
            raise InputError(f"holds a DRVAE run with other settings ({', '.join(diff)}); cannot resume", run)
        return
    run.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2))


def model_arch(config: DRVAEConfig, box: int) -> dict:
    return {"kind": "drvae", "box": box, "latent_dim": config.latent_dim, "widths": list(config.vae_widths)}


def denoised_stream(vae_or_denoiser: torch.nn.Module, stack: ParticleStack, device, batch: int = 256):
    """``(start, images (m, box, box) float32)`` chunks of ``stack`` denoised, in its intensity units
    (with CTF columns: the phase-flipped image, denoised)."""
    model = vae_or_denoiser if isinstance(vae_or_denoiser, DRVAEDenoiser) else DRVAEDenoiser(0, vae=vae_or_denoiser)
    b = model.vae.box
    if stack.box < b:
        raise InputError(f"images of {stack.box} px are smaller than the model's working box {b} px", stack.path)
    for start, chunk in stack.chunks(CHUNK):
        prep = prepare(stack.subset(np.arange(start, start + len(chunk))), b)
        y = denoise_tensor(model, prep.x, batch, device, precision="fp32")
        yield start, to_input_units(y, prep, slice(None)).numpy().astype(np.float32)


def check_drvae_model(run_dir) -> dict:
    """The model record of a DRVAE run folder (an InputError for any other)."""
    record = read_model_file(run_dir)
    if record.get("method") != "drvae":
        raise InputError(f"holds a {record.get('method')} model, not drvae", run_dir)
    return record



def check_stack_images(stack: ParticleStack) -> None:
    """An InputError when any image of ``stack`` holds NaN or Inf (nothing is written before)."""
    for _, chunk in stack.chunks(CHUNK):
        check_images(chunk, stack.path)


def drvae_metrics(result: DRVAEResult, stack: ParticleStack, device, max_images: int = 4000) -> dict:
    """Round summary, and against the truth when the stack has it: PSNR (dB, per-image
    normalised; ``nn.cdae_ops.psnr_normalised``) of input and output vs ``cpCleanImageName``,
    and the classification scores vs ``cpViewLabel`` (else ``cpConformationLabel``)."""
    from cryoprior.nn.cdae_ops import psnr_normalised

    out: dict = {"rounds": len(result.curves["rounds"]), "converged": result.curves["converged"],
                 "class_sizes": np.bincount(result.labels, minlength=int(result.labels.max()) + 1).tolist()}
    if stack.has_column("cpCleanImageName"):
        idx = np.arange(min(len(stack), max_images))
        sub = stack.subset(idx)
        denoised = np.concatenate([d for _, d in denoised_stream(result.vae, sub, device)])
        clean = sub.read_image_column("cpCleanImageName")
        if sub.has_column("rlnDefocusU"):  # the output is of the phase-flipped image
            clean = phase_flip(torch.as_tensor(clean), ctf_from_star(sub, idx)).numpy()
        out["psnr_input_db"] = float(psnr_normalised(sub.images(), clean).mean())
        out["psnr_denoised_db"] = float(psnr_normalised(denoised, clean).mean())
    for column in ("cpViewLabel", "cpConformationLabel"):
        if stack.has_column(column) and (np.asarray(stack.column(column)) >= 0).all():
            out["label_column"] = column
            out.update(classification_scores(stack.column(column).astype(np.int64), result.labels))
            break
    return out
