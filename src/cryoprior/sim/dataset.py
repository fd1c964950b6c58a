"""Simulated particle datasets with known truth.

``simulate_dataset(config, out_dir)`` writes a folder that RELION, cryoSPARC and cryoDRGN read:

    particles.star     RELION 3.1 (optics + particles): rlnImageName, rlnAngleRot/Tilt/Psi,
                       rlnOriginXAngst/YAngst, CTF fields (with --ctf), rlnRandomSubset, and truth
                       columns cpCleanImageName, cpViewLabel, cpConformationLabel, cpContaminated
    particles.mrcs     noisy images at ``config.snr``
    clean.mrcs         the same particles without noise (CTF applied when --ctf)
    snr_<L>.mrcs       the same projections at each extra level of ``config.snr_levels``
    volumes/<id>.mrc   the source volumes (one per conformation)
    dataset.json       the config and the manifest of the files above

Image model (RELION): ``image = CTF ⊛ shift(project(V, A), −origin) + noise``, where the
projection convention is in :mod:`cryoprior.core.projection`. Noise is white Gaussian with one
σ per stack: ``σ² = mean_i var(clean_i) / SNR`` (the papers' SNR: variance of the clean image over
the variance of the added noise), so the noise level carries no information about the view.

Huber contamination of a fraction ε of the particles (the robust-GAN paper's types):
A, the clean reference is replaced by pure noise; B, the noisy image is replaced by pure noise;
C, both. Pure noise has the variance of the image it replaces.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cryoprior import __version__
from cryoprior.core.ctf import apply_ctf, ctf_2d
from cryoprior.core.fft import ifft2c
from cryoprior.core.projection import project_fourier, shift_images, volume_fourier
from cryoprior.core.rotations import euler_to_matrix, matrix_to_euler, random_rotations
from cryoprior.errors import InputError
from cryoprior.fileutil import atomic_dir
from cryoprior.io.mrc import MrcsWriter, read_mrc, write_map
from cryoprior.io.relion import ctf_parameters
from cryoprior.io.stack import ParticleStack
from cryoprior.io.star import write_star
from cryoprior.progress import bar
from cryoprior.sim.structures import load_volume

log = logging.getLogger(__name__)

CONTAMINATION_TYPES = ("A", "B", "C")
TRUTH_COLUMN = "cpCleanImageName"


@dataclass
class SimulationConfig:
    """Everything that defines a simulated dataset (saved in ``dataset.json``)."""

    structures: list[str] = field(
        default_factory=lambda: ["1ake"],
        metadata={"flag": "--structure", "help": "PDB/mmCIF/MRC files or built-in ids; several = conformations"},
    )
    morph: list[str] = field(
        default_factory=list,
        metadata={"nargs": 2, "help": "two models of one protein (A B): simulate --steps conformations "
                  "interpolated between them (matched atoms, B superposed on A), instead of --structure"},
    )
    steps: int = field(default=5, metadata={"help": "conformations of --morph (cpConformationLabel 0..steps-1)"})
    box: int = field(default=64, metadata={"help": "image size in pixels"})
    pixel_size_a: float = field(default=2.0, metadata={"flag": "--pixel-size", "help": "Å/pixel"})
    n: int = field(default=4000, metadata={"help": "number of particles"})
    views: int | None = field(
        default=4, metadata={"help": "K discrete projection directions (--uniform: SO(3))", "metavar": "K"}
    )
    inplane: bool = field(default=False, metadata={"help": "random in-plane angle with --views"})
    view_spread_deg: float = field(
        default=0.0, metadata={"flag": "--view-spread", "help": "with --views: tilt each particle's viewing "
                               "direction from its view's by up to this many degrees (uniform on the cap)"}
    )
    snr: float = field(default=0.1, metadata={"help": "var(clean) / var(noise)"})
    snr_levels: list[float] = field(
        default_factory=list,
        metadata={"help": "extra SNR levels of the same projections (inf = clean), e.g. 0.1 0.4 0.6 inf"},
    )
    ctf: bool = field(default=False, metadata={"help": "apply a CTF with random defocus"})
    ctf_from: str | None = field(
        default=None, metadata={"metavar": "STAR", "help": "apply a CTF drawn from this STAR's particles "
                                "(defocus U, V, angle of a random particle each; its voltage, Cs and "
                                "amplitude contrast), e.g. the stack a CDAE pre-trained on this is for"},
    )
    defocus_min_a: float = field(default=10_000.0, metadata={"flag": "--defocus-min", "help": "Å"})
    defocus_max_a: float = field(default=25_000.0, metadata={"flag": "--defocus-max", "help": "Å"})
    astigmatism_a: float = field(default=500.0, metadata={"flag": "--astigmatism", "help": "max U−V, Å"})
    voltage_kv: float = field(default=300.0, metadata={"flag": "--voltage", "help": "kV"})
    cs_mm: float = field(default=2.7, metadata={"flag": "--cs", "help": "spherical aberration, mm"})
    amplitude_contrast: float = field(default=0.1, metadata={"help": "fraction"})
    shift_a: float = field(
        default=0.0, metadata={"flag": "--shift", "help": "max |origin offset| per axis, Å"}
    )
    contamination: str | None = field(
        default=None, metadata={"choices": ["A", "B", "C"], "help": "Huber contamination type"}
    )
    epsilon: float = field(default=0.1, metadata={"help": "contaminated fraction"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    chunk: int = field(default=256, metadata={"cli": False})

    def validate(self) -> None:
        if not self.structures and not self.morph:
            raise InputError("at least one structure is needed")
        if self.morph and (len(self.morph) != 2 or self.steps < 2):
            raise InputError(f"--morph needs two models and --steps >= 2, got {self.morph}, {self.steps}")
        if self.box < 8:
            raise InputError(f"box must be at least 8 pixels, got {self.box}")
        if self.pixel_size_a <= 0:
            raise InputError(f"pixel size must be positive, got {self.pixel_size_a}")
        if self.n < 1:
            raise InputError(f"n must be positive, got {self.n}")
        if self.views is not None and self.views < 1:
            raise InputError(f"views must be positive, got {self.views}")
        if not 0 <= self.view_spread_deg <= 180:
            raise InputError(f"--view-spread must be in [0, 180] degrees, got {self.view_spread_deg}")
        for s in [self.snr, *self.snr_levels]:
            if not s > 0:
                raise InputError(f"SNR must be positive (inf for clean), got {s}")
        if self.contamination is not None and self.contamination not in CONTAMINATION_TYPES:
            raise InputError(f"contamination must be one of {CONTAMINATION_TYPES}, got {self.contamination}")
        if not 0 <= self.epsilon <= 1:
            raise InputError(f"epsilon must be in [0, 1], got {self.epsilon}")
        if self.ctf_from is not None and not Path(self.ctf_from).is_file():
            raise InputError("--ctf-from: file not found", self.ctf_from)
        if self.ctf and not 0 < self.defocus_min_a <= self.defocus_max_a:
            raise InputError("defocus range must satisfy 0 < min <= max")

    @property
    def n_conformations(self) -> int:
        return self.steps if self.morph else len(self.structures)

    def volume_specs(self) -> list[str]:
        """Names of the conformations' volumes (``volumes/<name>.mrc``)."""
        if self.morph:
            a, b = (Path(m).name.split(".")[0] for m in self.morph)
            return [f"morph_{a}_{b}_{i}" for i in range(self.steps)]
        return list(self.structures)

    def load_volumes(self) -> list[torch.Tensor]:
        if self.morph:
            from cryoprior.sim.morph import morph_volumes

            return morph_volumes(self.morph[0], self.morph[1], self.steps, self.box, self.pixel_size_a)
        return [load_volume(s, self.box, self.pixel_size_a) for s in self.structures]


def discrete_view_rotations(k: int, seed: int = 0) -> torch.Tensor:
    """``k`` well-separated projection directions (a Fibonacci sphere, randomly turned by ``seed``).

    Returns ``(k, 3, 3)`` float64 rotations with psi = 0 in their own frame.
    """
    if k == 1:
        dirs = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    else:
        i = torch.arange(k, dtype=torch.float64)
        z = 1 - 2 * (i + 0.5) / k
        phi = i * math.pi * (3 - math.sqrt(5))
        rr = torch.sqrt(1 - z * z)
        dirs = torch.stack([rr * torch.cos(phi), rr * torch.sin(phi), z], dim=1)  # (k, 3)
    turn = random_rotations(1, torch.Generator().manual_seed(seed))[0]
    dirs = dirs @ turn.T
    # viewing direction = third row of A = (sin t cos r, sin t sin r, cos t)
    tilt = torch.rad2deg(torch.arccos(dirs[:, 2].clamp(-1, 1)))
    rot = torch.rad2deg(torch.atan2(dirs[:, 1], dirs[:, 0]))
    return euler_to_matrix(rot, tilt, torch.zeros_like(rot))


@dataclass
class Poses:
    """Per-particle truth drawn before rendering."""

    rotations: torch.Tensor  # (n, 3, 3) float64
    view: np.ndarray  # (n,) int, -1 for uniform orientations
    conformation: np.ndarray  # (n,) int
    origins_a: torch.Tensor  # (n, 2) float64, (x, y) Å
    defocus: np.ndarray | None  # (n, 3): U, V (Å), angle (deg)
    contaminated: np.ndarray  # (n,) bool


def sample_poses(config: SimulationConfig, generator: torch.Generator, defocus_pool: np.ndarray | None = None) -> Poses:
    """Draw orientations, conformations, shifts, defoci and contamination flags; with
    ``defocus_pool`` ``(m, 3)`` (U, V, angle) each particle's defocus is a random row of it."""
    n = config.n
    if config.views is None:
        rots = random_rotations(n, generator)
        view = np.full(n, -1, dtype=np.int64)
    else:
        base = discrete_view_rotations(config.views, config.seed)
        view_t = torch.randint(config.views, (n,), generator=generator)
        rots = base[view_t]
        if config.view_spread_deg > 0:  # tilt by θ (cos θ uniform: uniform on the cap) about an in-plane axis
            cos_max = math.cos(math.radians(config.view_spread_deg))
            cos_t = 1 - torch.rand(n, generator=generator, dtype=torch.float64) * (1 - cos_max)
            axis = torch.rand(n, generator=generator, dtype=torch.float64) * 360.0
            rots = euler_to_matrix(axis, torch.rad2deg(torch.arccos(cos_t)), -axis) @ rots
        if config.inplane:
            psi = torch.rand(n, generator=generator, dtype=torch.float64) * 360.0
            zero = torch.zeros_like(psi)
            rots = euler_to_matrix(zero, zero, psi) @ rots
        view = view_t.numpy().astype(np.int64)
    conformation = torch.randint(config.n_conformations, (n,), generator=generator).numpy()
    origins = (torch.rand(n, 2, generator=generator, dtype=torch.float64) * 2 - 1) * config.shift_a
    defocus = None
    if defocus_pool is not None:
        defocus = defocus_pool[torch.randint(len(defocus_pool), (n,), generator=generator).numpy()]
    elif config.ctf:
        u = config.defocus_min_a + torch.rand(n, generator=generator, dtype=torch.float64) * (
            config.defocus_max_a - config.defocus_min_a
        )
        v = u - torch.rand(n, generator=generator, dtype=torch.float64) * config.astigmatism_a
        angle = torch.rand(n, generator=generator, dtype=torch.float64) * 180.0
        defocus = torch.stack([u, v, angle], dim=1).numpy()
    contaminated = np.zeros(n, dtype=bool)
    if config.contamination is not None:
        k = int(round(config.epsilon * n))
        idx = torch.randperm(n, generator=generator)[:k].numpy()
        contaminated[idx] = True
    return Poses(rots, view, conformation, origins, defocus, contaminated)


def render_clean(
    vol_ft: torch.Tensor,
    rotations: torch.Tensor,
    box: int,
    pixel_size_a: float,
    origins_a: torch.Tensor | None = None,
    defocus: torch.Tensor | None = None,
    ctf_kwargs: dict | None = None,
) -> torch.Tensor:
    """Clean particle images from a prepared volume transform (``core.projection.volume_fourier``).

    rotations ``(b, 3, 3)``, origins_a ``(b, 2)`` Å, defocus ``(b, 3)`` (U, V Å, angle deg).
    Returns ``(b, box, box)``: ``CTF ⊛ shift(project(V, A), −origin)``.
    """
    images = ifft2c(project_fourier(vol_ft, rotations.to(vol_ft.real.dtype), box)).real
    if origins_a is not None:
        images = shift_images(images, -origins_a.to(images) / pixel_size_a)
    if defocus is not None:
        d = defocus.to(images)
        ctf = ctf_2d(box, pixel_size_a, d[:, 0], d[:, 1], d[:, 2], **(ctf_kwargs or {}))
        images = apply_ctf(images, ctf)
    return images


def _level_name(snr: float) -> str:
    return "clean.mrcs" if math.isinf(snr) else f"snr_{snr:g}.mrcs"


def _particle_table(config: SimulationConfig, poses: Poses, names: list[str]) -> pd.DataFrame:
    n = config.n
    rot, tilt, psi = matrix_to_euler(poses.rotations)
    idx = np.arange(1, n + 1)
    table = {
        "rlnImageName": [f"{i:06d}@particles.mrcs" for i in idx],
        "rlnMicrographName": [f"sim/mic{(i - 1) // 100:05d}.mrc" for i in idx],
        "rlnAngleRot": rot.numpy(),
        "rlnAngleTilt": tilt.numpy(),
        "rlnAnglePsi": psi.numpy(),
        "rlnOriginXAngst": poses.origins_a[:, 0].numpy(),
        "rlnOriginYAngst": poses.origins_a[:, 1].numpy(),
    }
    if poses.defocus is not None:
        table["rlnDefocusU"] = poses.defocus[:, 0]
        table["rlnDefocusV"] = poses.defocus[:, 1]
        table["rlnDefocusAngle"] = poses.defocus[:, 2]
        table["rlnPhaseShift"] = np.zeros(n)
        table["rlnCtfBfactor"] = np.zeros(n)
    table["rlnOpticsGroup"] = np.ones(n, dtype=np.int64)
    table["rlnRandomSubset"] = (idx - 1) % 2 + 1
    table["rlnClassNumber"] = np.ones(n, dtype=np.int64)
    table["cpCleanImageName"] = [f"{i:06d}@clean.mrcs" for i in idx]
    table["cpViewLabel"] = poses.view
    table["cpConformationLabel"] = poses.conformation
    table["cpContaminated"] = poses.contaminated.astype(np.int64)
    for snr, name in zip(config.snr_levels, names):
        if not math.isinf(snr):
            table[f"cpImageNameSnr{snr:g}".replace(".", "p")] = [f"{i:06d}@{name}" for i in idx]
    return pd.DataFrame(table)


def optics_table(config: SimulationConfig) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnImagePixelSize": [config.pixel_size_a],
            "rlnImageSize": [config.box],
            "rlnImageDimensionality": [2],
            "rlnVoltage": [config.voltage_kv],
            "rlnSphericalAberration": [config.cs_mm],
            "rlnAmplitudeContrast": [config.amplitude_contrast],
        }
    )


def simulate_dataset(config: SimulationConfig, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Simulate and write a dataset folder (see the module docstring). Atomic: all or nothing."""
    config.validate()
    out_dir = Path(out_dir)
    check_resources(config, out_dir)
    pool = None
    if config.ctf_from is not None:  # the target's defoci and microscope
        params = ctf_parameters(ParticleStack.from_file(config.ctf_from))
        pool = params.pop("defocus")
        config = replace(config, ctf=True, **params)
    gen = torch.Generator().manual_seed(config.seed)
    volumes = config.load_volumes()
    poses = sample_poses(config, gen, pool)
    levels = list(config.snr_levels)
    level_names = [_level_name(s) for s in levels]
    ctf_kwargs = dict(
        voltage_kv=config.voltage_kv, cs_mm=config.cs_mm, amplitude_contrast=config.amplitude_contrast
    )
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        (tmp / "volumes").mkdir()
        vol_names = []
        for spec, vol in zip(config.volume_specs(), volumes):
            name = _volume_name(spec, vol_names)
            vol_names.append(name)
            write_map(tmp / "volumes" / name, vol, config.pixel_size_a)
        signal_path = tmp / ".signal.mrcs"
        var_sum = _render_signal_stack(config, volumes, poses, signal_path, ctf_kwargs)
        mean_clean_var = var_sum / config.n
        _write_noisy_stacks(config, poses, tmp, signal_path, mean_clean_var, gen, levels, level_names)
        signal_path.unlink()
        table = _particle_table(config, poses, level_names)
        write_star(tmp / "particles.star", table, optics_table(config))
        manifest = {
            "cryoprior_version": __version__,
            "config": asdict(config),
            "mean_clean_variance": mean_clean_var,
            "noise_sigma": _sigma(mean_clean_var, config.snr),
            "volumes": [f"volumes/{v}" for v in vol_names],
            "levels": {str(s): name for s, name in zip(levels, level_names)},
        }
        (tmp / "dataset.json").write_text(json.dumps(manifest, indent=2, default=str))
    log.info("wrote %d particles to %s", config.n, out_dir)
    return out_dir


#: memory per particle held at once: poses, CTF parameters and the particle table (measured ~0.5 kB)
_BYTES_PER_ROW = 1024


def check_resources(config: SimulationConfig, out_dir: Path) -> None:
    """``InputError`` before any work when the run would not fit: the particle table and poses
    are held in memory, the stacks (noisy, clean, each SNR level, a temporary signal stack) on disk."""
    need_ram = config.n * _BYTES_PER_ROW
    try:
        avail_ram = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        avail_ram = None
    if avail_ram is not None and need_ram > avail_ram:
        raise InputError(f"--n {config.n} needs about {need_ram / 2**30:.1f} GiB of memory for the particle "
                         f"table and poses, {avail_ram / 2**30:.1f} GiB are free; simulate fewer particles")
    stacks = 3 + len(config.snr_levels)  # noisy, clean, the signal, each level
    need_disk = config.n * config.box**2 * 4 * stacks
    parent = out_dir.absolute().parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if need_disk > free:
        raise InputError(f"--n {config.n} at box {config.box} writes about {need_disk / 2**30:.1f} GiB, "
                         f"{free / 2**30:.1f} GiB are free under {parent}; simulate fewer particles")


def _volume_name(spec: str, taken: list[str]) -> str:
    stem = Path(spec).name.split(".")[0] or "volume"
    name, k = f"{stem}.mrc", 1
    while name in taken:
        k += 1
        name = f"{stem}_{k}.mrc"
    return name


def _sigma(mean_clean_var: float, snr: float) -> float:
    return 0.0 if math.isinf(snr) else math.sqrt(mean_clean_var / snr)


def _render_signal_stack(config, volumes, poses, path, ctf_kwargs) -> float:
    """Render every particle's true clean image into ``path``; returns Σ var(clean_i)."""
    var_sum = 0.0
    fts = [volume_fourier(v.float()) for v in volumes]
    with MrcsWriter(path, config.n, config.box, config.pixel_size_a) as writer, bar(
        config.n, "simulate: projecting"
    ) as pbar:
        for start in range(0, config.n, config.chunk):
            stop = min(start + config.chunk, config.n)
            out = torch.empty(stop - start, config.box, config.box)
            for c, vol_ft in enumerate(fts):
                sel = np.nonzero(poses.conformation[start:stop] == c)[0]
                if len(sel) == 0:
                    continue
                gidx = sel + start
                defocus = None if poses.defocus is None else torch.from_numpy(poses.defocus[gidx])
                out[sel] = render_clean(
                    vol_ft, poses.rotations[gidx], config.box, config.pixel_size_a,
                    poses.origins_a[gidx], defocus, ctf_kwargs,
                )
            var_sum += float(out.var(dim=(-2, -1), unbiased=False).sum())
            writer.write(start, out.numpy())
            pbar.update(stop - start)
    return var_sum


def _write_noisy_stacks(config, poses, tmp, signal_path, mean_clean_var, gen, levels, level_names):
    """From the true signal: the reference ``clean.mrcs`` (contaminated for A/C), the noisy
    ``particles.mrcs`` at the main SNR (contaminated for B/C) and one stack per extra level."""
    signal, _ = read_mrc(signal_path)
    outputs = [(math.inf, tmp / "clean.mrcs"), (config.snr, tmp / "particles.mrcs")]
    outputs += [(s, tmp / name) for s, name in zip(levels, level_names) if not math.isinf(s)]
    for snr, path in outputs:
        sigma = _sigma(mean_clean_var, snr)
        is_reference = math.isinf(snr)
        contaminate = config.contamination in (("A", "C") if is_reference else ("B", "C"))
        with MrcsWriter(path, config.n, config.box, config.pixel_size_a) as writer, bar(
            config.n, f"simulate: {'clean' if is_reference else f'SNR {snr:g}'}"
        ) as pbar:
            for start in range(0, config.n, config.chunk):
                stop = min(start + config.chunk, config.n)
                img = torch.from_numpy(np.array(signal[start:stop], dtype=np.float32))
                if sigma > 0:
                    img = img + sigma * torch.randn(img.shape, generator=gen)
                bad = torch.from_numpy(poses.contaminated[start:stop])
                if contaminate and bad.any():
                    # pure noise with the variance of the image it replaces
                    sd = math.sqrt(mean_clean_var + sigma * sigma)
                    img[bad] = sd * torch.randn(int(bad.sum()), config.box, config.box, generator=gen)
                writer.write(start, img.numpy())
                pbar.update(stop - start)
    del signal


def measured_snr(stack: ParticleStack, max_images: int = 2000, chunk: int = 256) -> dict[str, Any]:
    """SNR = mean_i var(clean_i) / mean_i var(noisy_i - clean_i) (population variances over the
    pixels of each image), over up to ``max_images`` uncontaminated rows spread through the stack.
    """
    pool = np.arange(len(stack))
    if stack.has_column("cpContaminated"):
        pool = pool[~stack.column("cpContaminated").astype(bool)]
    if len(pool) == 0:
        return {"snr": None, "snr_db": None, "snr_n_images": 0}
    picks = pool[
        np.unique(
            np.linspace(0, len(pool) - 1, min(max_images, len(pool))).round().astype(np.int64)
        )
    ]
    signal, noise = 0.0, 0.0
    for start in range(0, len(picks), chunk):
        rows = picks[start : start + chunk]
        noisy = stack.images(rows)  # (k, d, d)
        clean = stack.read_image_column(TRUTH_COLUMN, rows)  # (k, d, d)
        signal += float(clean.var(axis=(1, 2), dtype=np.float64).sum())
        noise += float((noisy - clean).var(axis=(1, 2), dtype=np.float64).sum())
    snr = signal / noise if noise > 0 else float("inf")
    return {
        "snr": snr,
        "snr_db": float(10 * np.log10(snr)) if 0 < snr < float("inf") else None,
        "snr_n_images": int(len(picks)),
    }
