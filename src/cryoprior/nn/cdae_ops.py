"""CDAE building blocks without training: image normalisation, simulated SNR pairs, k-NN mean
targets, histogram equalisation and the scale-free PSNR used to score denoisers.

Normalisation convention (written once): every network input and every training target is an
image normalised on its own to zero mean and unit (population) variance,
``core.filters.normalize_images``. Denoised images come out in those units; they are compared
with the truth after both are normalised again (:func:`psnr_normalised`), which makes the score
independent of the arbitrary scale of cryo-EM images: ``MSE = 2 (1 - r)`` with ``r`` the Pearson
correlation of the two images.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from scipy.stats import rankdata

from cryoprior.classical.cluster import knn, pca
from cryoprior.core.filters import gaussian_lowpass, normalize_images
from cryoprior.core.metrics import psnr
from cryoprior.errors import InputError
from cryoprior.io.stack import ParticleStack

KNN_METRICS = ("euclidean", "correlation")


def as_images(images) -> torch.Tensor:
    """``(n, d, d)`` float32 CPU tensor (a copy when converted) from an array, tensor or stack."""
    if isinstance(images, ParticleStack):
        images = images.images()
    x = images.detach().cpu() if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))
    if x.dim() != 3 or x.shape[0] == 0:
        raise ValueError(f"expected images (n, h, w) with n >= 1, got shape {tuple(x.shape)}")
    return x.to(torch.float32)


def flipped_images(stack: ParticleStack) -> tuple[torch.Tensor, bool]:
    """All images ``(n, d, d)`` float32 of ``stack``, phase-flipped by each particle's CTF when
    the STAR has CTF columns (as the CDAE networks see them), and whether they were."""
    if not stack.has_column("rlnDefocusU"):
        return as_images(stack), False
    return flip_by_star(stack, as_images(stack)), True


def flip_by_star(stack: ParticleStack, images, chunk: int = 4096) -> torch.Tensor:
    """``images`` ``(n, d, d)``, one per particle of ``stack``, phase-flipped by the particles' CTFs."""
    from cryoprior.core.ctf import phase_flip
    from cryoprior.io.relion import ctf_from_star

    out = torch.as_tensor(np.asarray(images, dtype=np.float32)).clone()
    for start in range(0, len(out), chunk):
        rows = np.arange(start, min(start + chunk, len(out)))
        out[rows] = phase_flip(out[rows], ctf_from_star(stack, rows))
    return out


def normalize(images) -> torch.Tensor:
    """Images ``(n, d, d)`` → ``(n, 1, d, d)`` float32, each zero mean and unit variance."""
    return normalize_images(as_images(images)).unsqueeze(1)  # (n, 1, d, d)


# ------------------------------------------------------------------------------- simulated pairs
def level_column(snr: float) -> str:
    """STAR column of a simulated SNR level: ``cpImageNameSnr0p4``; ``inf`` → ``cpCleanImageName``."""
    if math.isinf(snr):
        return "cpCleanImageName"
    return f"cpImageNameSnr{snr:g}".replace(".", "p")


def _level_sources(sim_dir: str | Path, snrs: list[float]) -> tuple[ParticleStack, list[tuple[str, object]]]:
    """Open ``SIM_DIR/particles.star`` and find each level: ``("column", name)`` or ``("file", path)``."""
    sim_dir = Path(sim_dir)
    star = sim_dir / "particles.star"
    if not sim_dir.is_dir():
        raise InputError("pre-training folder not found (expected a `cryoprior simulate` output)", sim_dir)
    if not star.is_file():
        raise InputError("no particles.star: not a `cryoprior simulate` output folder", sim_dir)
    stack = ParticleStack.from_file(star)
    manifest_path = sim_dir / "dataset.json"
    try:
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    except json.JSONDecodeError as exc:
        raise InputError(f"not valid JSON ({exc})", manifest_path) from exc
    sources: list[tuple[str, object]] = []
    for snr in snrs:
        col = level_column(snr)
        name = "clean.mrcs" if math.isinf(snr) else f"snr_{snr:g}.mrcs"
        if stack.has_column(col):
            sources.append(("column", col))
        elif (sim_dir / name).is_file() and name in manifest.get("levels", {}).values():
            sources.append(("file", sim_dir / name))
        else:
            have = sorted(c for c in stack.table.columns if c.startswith("cpImageNameSnr"))
            raise InputError(
                f"no SNR {snr:g} images (column {col} or {name}); it has {', '.join(have) or 'no levels'}"
                " — simulate with e.g. --snr-levels 0.1 0.4 0.6 inf",
                star,
            )
    return stack, sources


def check_levels(sim_dir: str | Path, snrs: list[float]) -> int:
    """Check that ``sim_dir`` holds every SNR level (nothing is read); returns its image size."""
    stack, _ = _level_sources(sim_dir, snrs)
    return stack.box


def load_levels(sim_dir: str | Path, snrs: list[float]) -> list[torch.Tensor]:
    """The same projections at each SNR of ``snrs``, normalised, ``[(n, 1, d, d), ...]``.

    Reads ``SIM_DIR/particles.star`` (``cryoprior simulate --snr-levels ...``) through its
    ``cpImageNameSnr*``/``cpCleanImageName`` columns, or else the ``snr_<L>.mrcs``/``clean.mrcs``
    stacks listed in ``dataset.json``. Simulated with a CTF (``--ctf``, ``--ctf-from``), every
    level is phase-flipped by each particle's CTF, as the networks see a target with a CTF.
    """
    stack, sources = _level_sources(sim_dir, snrs)
    levels = []
    for kind, where in sources:
        if kind == "column":
            images = stack.read_image_column(str(where))
        else:
            images = ParticleStack.from_file(Path(str(where))).images()
            if len(images) != len(stack) or images.shape[-1] != stack.box:
                raise InputError(f"holds {images.shape} images, particles.star ({len(stack)}, {stack.box}, {stack.box})", where)
        if stack.has_column("rlnDefocusU"):  # as the target is seen: phase-flipped
            images = flip_by_star(stack, images)
        levels.append(normalize(images))
    return levels


# --------------------------------------------------------------------------------- k-NN targets
def knn_mean_targets(
    features: torch.Tensor,
    values: torch.Tensor | None = None,
    k: int = 30,
    metric: str = "euclidean",
    pca_dims: int = 64,
    seed: int = 0,
) -> torch.Tensor:
    """Each image's target: the mean of ``values`` over its ``k`` nearest neighbours (not itself).

    Neighbours are found among ``features`` ``(n, ...)`` (flattened; reduced to ``pca_dims``
    principal components first when ``0 < pca_dims`` < pixels) with ``cryoprior.classical.cluster.knn``
    (faiss, exact). ``values`` defaults to ``features``. Returns a tensor shaped like ``values``.
    """
    if metric not in KNN_METRICS:
        raise ValueError(f"knn metric must be one of {KNN_METRICS}, got {metric!r}")
    values = features if values is None else values
    n = features.shape[0]
    if values.shape[0] != n:
        raise ValueError(f"features and values differ in length: {n} vs {values.shape[0]}")
    if n < 2:
        raise ValueError(f"k-NN targets need at least 2 images, got {n}")
    k = min(int(k), n - 1)
    flat = features.detach().cpu().reshape(n, -1).numpy().astype(np.float32)  # (n, p)
    if 0 < pca_dims < min(flat.shape):
        flat = pca(flat, pca_dims, seed)  # (n, pca_dims)
    _, idx = knn(flat, k, metric=metric)  # (n, k)
    vals = values.detach().cpu()
    out = torch.zeros_like(vals)
    for j in range(k):  # mean over neighbours without an (n, k, ...) temporary
        out += vals[torch.from_numpy(idx[:, j])]
    return out / k


# ------------------------------------------------------------------------ histogram equalisation
def histogram_equalize(images) -> np.ndarray:
    """Rank-based histogram equalisation of each image ``(..., h, w)`` → values in ``(0, 1)``.

    Pixel ``i`` of an image with ``N`` pixels becomes ``(rank_i - 1/2) / N`` (ranks 1..N, ties
    averaged), so the values of every image are uniformly distributed: its empirical CDF is the
    identity on ``(0, 1)``. A constant image becomes 0.5 everywhere.
    """
    arr = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.ndim < 2:
        raise ValueError(f"expected images (..., h, w), got shape {arr.shape}")
    flat = arr.reshape(-1, arr.shape[-2] * arr.shape[-1])  # (b, h*w)
    ranks = rankdata(flat, method="average", axis=1)
    return ((ranks - 0.5) / flat.shape[1]).astype(np.float32).reshape(arr.shape)


# ------------------------------------------------------------------------------------ scoring
def psnr_normalised(images, clean) -> np.ndarray:
    """PSNR (dB) per image ``(n,)`` after normalising both ``(n, d, d)`` stacks per image."""
    x, ref = normalize_images(as_images(images)), normalize_images(as_images(clean))
    if x.shape != ref.shape:
        raise ValueError(f"shapes differ: images {tuple(x.shape)} vs clean {tuple(ref.shape)}")
    return psnr(x, ref).numpy()


# ------------------------------------------------------------------------ depth from particle size
def receptive_field_px(modules: int, convs_per_module: int = 2, kernel_size: int = 3) -> int:
    """Receptive field (px) of a :class:`~cryoprior.nn.models.cdae.ConvAEBlock` with ``modules``
    encoder modules: each 3×3 convolution adds ``(k − 1) · jump``, each 2×2 pooling ``jump`` and
    doubles the jump; the 2×2 stride-2 transposed convolutions add nothing and the final
    convolution adds ``k − 1``. Two modules: 18 px; three: 38 px."""
    r, jump = 1, 1
    for _ in range(modules):
        r += convs_per_module * (kernel_size - 1) * jump + jump
        jump *= 2
    return r + kernel_size - 1


def modules_for_diameter(diameter_px: float, convs_per_module: int = 2, max_modules: int = 4) -> int:
    """The most encoder modules whose receptive field stays within half the particle diameter
    (at least one): a block that sees most of the particle learns the pre-training views as
    templates (docs/benchmarks.md, CDAE). 36–50 px particles → 2 modules, as measured best."""
    m = 1
    while m < max_modules and receptive_field_px(m + 1, convs_per_module) <= 0.5 * diameter_px:
        m += 1
    return m


def estimate_particle_diameter_px(images, fraction: float = 0.1, smooth_px: float = 1.0) -> float:
    """Particle diameter (px) of a stack ``(n, d, d)``: twice the radius where the excess of the
    per-pixel variance across images (signal; the noise is flat) over its background level (pixels
    beyond 0.45 d) falls below ``fraction`` of its peak, from the radial average. The images are
    first smoothed by a Gaussian of ``smooth_px`` (it keeps most of a particle's power and removes
    ~90% of white noise's, without which the profile is noise at SNR ≤ 0.03 and the estimate a few
    pixels). Centred particles are assumed (shifts of a few pixels widen the estimate by as much)."""
    x = torch.as_tensor(np.asarray(images, dtype=np.float32))  # (n, d, d)
    if smooth_px > 0:
        x = gaussian_lowpass(x, smooth_px, ndim=2)
    d = x.shape[-1]
    var = x.double().var(dim=0)  # (d, d)
    c = torch.arange(d, dtype=torch.float64) - d // 2
    r = torch.sqrt(c[:, None] ** 2 + c[None, :] ** 2)
    background = var[r > 0.45 * d].median()
    shells = r.round().long()
    prof = torch.zeros(int(shells.max()) + 1, dtype=torch.float64).index_add_(0, shells.flatten(), var.flatten())
    prof /= torch.bincount(shells.flatten(), minlength=len(prof)).clamp(min=1)
    excess = (prof - background)[: d // 2]
    peak = float(excess.max())
    if not peak > 0:
        return float(d)
    below = torch.nonzero(excess < fraction * peak).flatten()
    below = below[below > int(torch.argmax(excess))]
    radius = float(below[0]) if len(below) else d / 2
    return 2.0 * radius
