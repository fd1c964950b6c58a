"""Training pairs (noisy image, reference) for the robust-GAN denoiser, checked before any work.

1. A simulated folder (``cryoprior simulate``): ``particles.star`` rows pair ``rlnImageName``
   with the clean image ``cpCleanImageName`` (CTF applied when simulated with ``--ctf``).
2. A map and poses (the paper's protocol for real data): the reference of each particle is the
   projection of a consensus map at the particle's angles and origin, with its CTF,
   ``CTF ⊛ shift(project(V, A), −origin)`` — exactly the simulator's clean image
   (:func:`cryoprior.sim.dataset.render_clean`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cryoprior.core.ctf import apply_ctf
from cryoprior.core.projection import volume_fourier
from cryoprior.errors import InputError
from cryoprior.io.mrc import read_map
from cryoprior.io.relion import ctf_from_star, poses_from_star
from cryoprior.io.stack import ParticleStack
from cryoprior.sim.dataset import render_clean

CLEAN_COLUMN = "cpCleanImageName"
POSE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
CTF_COLUMNS = ("rlnDefocusU",)
PIXEL_TOLERANCE = 0.01  # relative


def open_stack(path: str | Path) -> ParticleStack:
    path = Path(path)
    if not path.exists():
        raise InputError("file not found", path)
    return ParticleStack.from_file(path)


def check_finite(images: np.ndarray, what: str, path) -> None:
    """One-line InputError when images hold NaN/Inf."""
    bad = ~np.isfinite(images).all(axis=(-2, -1))
    if bad.any():
        raise InputError(f"{int(bad.sum())} {what} contain NaN/Inf (first: row {int(np.flatnonzero(bad)[0])})", path)


def sim_pairs(sim_dir: str | Path) -> tuple[np.ndarray, np.ndarray, ParticleStack]:
    """(noisy ``(n, d, d)``, clean ``(n, d, d)``, stack) of a ``cryoprior simulate`` folder (or its
    particles.star)."""
    path = Path(sim_dir)
    star = path / "particles.star" if path.is_dir() else path
    stack = open_stack(star)
    if not stack.has_column(CLEAN_COLUMN):
        raise InputError(f"no {CLEAN_COLUMN} column: not a `cryoprior simulate` folder", star)
    noisy, clean = stack.images(), stack.read_image_column(CLEAN_COLUMN)
    check_finite(noisy, "noisy images", star)
    check_finite(clean, "clean images", star)
    return noisy, clean, stack


def check_map_against(stack: ParticleStack, map_path: str | Path) -> torch.Tensor:
    """Read the map and check it against the particles (box, pixel size, poses and CTF columns);
    returns the volume ``(d, d, d)``."""
    where = stack.path
    missing = [c for c in POSE_COLUMNS if not stack.has_column(c)]
    if missing:
        raise InputError(f"--reference-map needs particle poses; missing columns {', '.join(missing)}", where)
    if not stack.has_column("rlnDefocusU"):
        raise InputError("--reference-map needs the particles' CTF; missing column rlnDefocusU", where)
    map_path = Path(map_path)
    if not map_path.is_file():
        raise InputError("file not found", map_path)
    volume, map_pixel_a = read_map(map_path)
    if volume.shape[0] != stack.box:
        raise InputError(f"map box {volume.shape[0]} px differs from the particles' {stack.box} px ({where})", map_path)
    if abs(map_pixel_a / stack.pixel_size_a - 1) > PIXEL_TOLERANCE:
        raise InputError(
            f"map pixel size {map_pixel_a:.4g} Å differs from the particles' {stack.pixel_size_a:.4g} Å ({where})",
            map_path,
        )
    return torch.from_numpy(volume)


def project_references(stack: ParticleStack, volume: torch.Tensor, rows=None, chunk: int = 512) -> np.ndarray:
    """Reference of each particle of ``rows`` (default all): ``CTF ⊛ shift(project(V, A), −origin)``
    at the STAR's angles, origins and CTF. Returns float32 ``(n, d, d)``."""
    rows = np.arange(len(stack)) if rows is None else np.asarray(rows)
    vol_ft = volume_fourier(volume.float())
    out = np.empty((len(rows), stack.box, stack.box), dtype=np.float32)
    for start in range(0, len(rows), chunk):
        sel = rows[start : start + chunk]
        rot, shifts_px = poses_from_star(stack, sel)
        img = render_clean(vol_ft, rot, stack.box, stack.pixel_size_a, shifts_px.double() * stack.pixel_size_a)
        ctf = ctf_from_star(stack, sel)
        if ctf is not None:
            img = apply_ctf(img, ctf.to(img))
        out[start : start + len(sel)] = img.numpy()
    return out


def map_pairs(star: str | Path, map_path: str | Path) -> tuple[np.ndarray, np.ndarray, ParticleStack]:
    """(noisy, reference projections, stack) for ``--reference-map``: checks first, then projects."""
    stack = open_stack(star)
    volume = check_map_against(stack, map_path)
    noisy = stack.images()
    check_finite(noisy, "particle images", stack.path)
    return noisy, project_references(stack, volume), stack
