"""``cryoprior classify``: unsupervised 2D classification of a particle stack.

Images are phase-flipped by their CTF when the STAR has CTF columns, then normalised per image
(zero mean, unit variance; over the background outside ``mask_radius_px`` when given, as
``relion_preprocess --norm``). Methods: k-means, Ward (``hc``), BSK-means++ (``bsk``) on the
pixels; k-means on PCA / Isomap embeddings; ``align-kmeans`` (up to in-plane rotation and, with
``max_shift_px``, integer shifts, as RELION's 2D classification aligns; poses written to
``cpInplaneAngleDeg``, ``cpAlignShiftXPx``, ``cpAlignShiftYPx``); ``ml2d`` (maximum likelihood
over classes and those poses, as RELION's Class2D, started from align-kmeans); ``cae-kmeans``; ``cdae-*`` (on
images denoised by a CDAE given as ``model`` or trained here on ``pretrain_structure``, with a seed
of its own so that a simulated input is never its own training data); ``drvae-bsk`` (``nn.drvae``,
trained on the stack alone; its run is kept in ``drvae/``).

The output folder holds ``particles.star`` (the input's rows plus ``rlnClassNumber``, class 1 the
largest), ``class_averages.mrcs`` / ``.star`` (averages of the raw images, in each class's frame
for aligned methods; Wiener-filtered as RELION's: CTF-corrected with CTF columns and regularised
by each class's half-set SSNR), ``config.yaml`` and,
when the input carries truth labels, ``metrics.json`` (Hungarian-matched F1, precision, recall,
accuracy, NMI, ARI). It is written atomically.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryoprior.classical.cluster import align_kmeans, class_sums, cluster
from cryoprior.classical.cluster.align import to_class_frame
from cryoprior.classical.cluster.averages import (
    averages_from_sums,
    ctf_class_sums,
    half_set_labels,
    ssnr_wiener_averages,
)
from cryoprior.classical.cluster.ml2d import ANNEAL_ITERATIONS as ML2D_ANNEAL
from cryoprior.classical.cluster.ml2d import ITERATIONS as ML2D_ITERATIONS
from cryoprior.classical.cluster.ml2d import START_SHELL as ML2D_START_SHELL
from cryoprior.classical.cluster.ml2d import TEMPERATURE as ML2D_TEMPERATURE
from cryoprior.classical.cluster.ml2d import annealing_of, ml2d
from cryoprior.config import write_run_config
from cryoprior.core.filters import normalize_images
from cryoprior.core.metrics import classification_scores
from cryoprior.errors import InputError, OutputExistsError
from cryoprior.fileutil import atomic_dir, output_folder
from cryoprior.io.mrc import write_mrcs
from cryoprior.io.stack import ParticleStack
from cryoprior.io.star import OpticsFlags, resolve_image_names, write_star
from cryoprior.nn.drvae import DRVAEConfig
from cryoprior.nn.training import resolve_device

log = logging.getLogger(__name__)

METHODS = ("kmeans", "hc", "pca-kmeans", "isomap-kmeans", "bsk", "align-kmeans", "cae-kmeans", "cdae-kmeans",
           "cdae-hc", "cdae-align-kmeans", "drvae-bsk", "ml2d")
# align-kmeans: an image is its class average rotated by the angle, then moved by the shift
ALIGN_COLUMNS = ("cpInplaneAngleDeg", "cpAlignShiftXPx", "cpAlignShiftYPx")
TRUTH_COLUMNS = ("cpViewLabel", "cpConformationLabel")
PRETRAIN_VIEWS = 4
#: pre-training data get their own random stream (views, noise), never a target's simulated with --seed
PRETRAIN_SEED_OFFSET = 104_729


#: the fields of ``ClassifyConfig`` that a drvae-bsk run takes over into its ``DRVAEConfig`` (the
#: ``classify`` flags, which the CLI does not repeat in its drvae-bsk group)
DRVAE_SHARED = ("classes", "seed", "max_shift_px", "ml2d_iterations", "ml2d_temperature", "ml2d_anneal", "ml2d_start_shell")


@dataclass
class ClassifyConfig:
    """One classification run (saved in ``config.yaml``)."""

    classes: int = field(metadata={"help": "number of classes K", "metavar": "K"})
    method: str = field(default="pca-kmeans", metadata={"choices": list(METHODS), "help": "clustering method"})
    model: str | None = field(
        default=None, metadata={"metavar": "RUN_DIR", "help": "trained CDAE run folder (cdae-* methods)"}
    )
    pretrain_structure: str | None = field(
        default=None,
        metadata={"metavar": "FILE", "help": "structure to simulate CDAE pre-training data from (cdae-* without --model)"},
    )
    device: str = field(default="auto", metadata={"choices": ["auto", "cpu", "cuda"], "help": "torch device"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    mask_radius_px: float | None = field(
        default=None, metadata={"flag": "--mask-radius", "help": "normalise on the background outside this radius (px)"}
    )
    max_shift_px: int = field(
        default=0, metadata={"flag": "--max-shift", "help": "translations searched, pixels per axis (*align-kmeans)"}
    )
    ml2d_iterations: int = field(default=ML2D_ITERATIONS, metadata={"help": "EM steps (ml2d; drvae-bsk with --align)"})
    ml2d_temperature: float = field(default=ML2D_TEMPERATURE, metadata={
        "help": "ml2d: the first E-step sees the noise variance times this, falling to 1 over --ml2d-anneal steps"})
    ml2d_anneal: int = field(default=ML2D_ANNEAL, metadata={"help": "ml2d: steps of deterministic annealing (noise and resolution)"})
    ml2d_start_shell: float = field(default=ML2D_START_SHELL, metadata={
        "help": "ml2d: the first E-step compares images up to this Fourier shell (cycles per box), widening to Nyquist over --ml2d-anneal steps; 0: off"})
    pca_components: int = field(default=20, metadata={"help": "principal components (pca-kmeans)"})
    isomap_components: int = field(default=10, metadata={"help": "Isomap dimensions (isomap-kmeans)"})
    isomap_neighbors: int = field(default=10, metadata={"help": "Isomap graph neighbours (isomap-kmeans)"})
    cae_latent_dim: int = field(default=32, metadata={"help": "CAE bottleneck size (cae-kmeans)"})
    cae_epochs: int = field(default=30, metadata={"help": "CAE training epochs (cae-kmeans)"})
    pretrain_n: int = field(default=2000, metadata={"help": "simulated particles for CDAE pre-training"})
    batch_size: int = field(default=256, metadata={"help": "images per batch on the device"})
    drvae: DRVAEConfig | None = field(default=None, metadata={"cli": False})  # drvae-bsk; classes, seed, max shift from here

    def validate(self) -> None:
        if self.classes < 1:
            raise InputError(f"--classes must be >= 1, got {self.classes}")
        if self.method not in METHODS:
            raise InputError(f"unknown --method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.drvae is not None:
            self.drvae.validate()
        if self.method.startswith("cdae-") and self.model is None and self.pretrain_structure is None:
            raise InputError(f"--method {self.method} needs --model RUN_DIR or --pretrain-structure FILE")
        if self.model is not None and not Path(self.model).is_dir() and self.method != "drvae-bsk":
            raise InputError("CDAE run folder not found", self.model)
        counts = {
            "--batch-size": self.batch_size, "--pretrain-n": self.pretrain_n, "--pca-components": self.pca_components,
            "--isomap-components": self.isomap_components, "--isomap-neighbors": self.isomap_neighbors,
            "--cae-latent-dim": self.cae_latent_dim, "--cae-epochs": self.cae_epochs,
            "--ml2d-iterations": self.ml2d_iterations,
        }
        for flag, value in counts.items():
            if value < 1:
                raise InputError(f"{flag} must be >= 1, got {value}")
        if not 0 <= self.seed < 2**32:
            raise InputError(f"--seed must be in [0, 2**32), got {self.seed}")
        if self.max_shift_px < 0:
            raise InputError(f"--max-shift must be >= 0, got {self.max_shift_px}")
        if self.ml2d_temperature < 1 or self.ml2d_anneal < 0 or self.ml2d_start_shell < 0:
            raise InputError(f"--ml2d-temperature must be >= 1, --ml2d-anneal and --ml2d-start-shell >= 0, got "
                             f"{self.ml2d_temperature}, {self.ml2d_anneal}, {self.ml2d_start_shell}")
        if self.mask_radius_px is not None and self.mask_radius_px < 0:
            raise InputError(f"--mask-radius must be >= 0, got {self.mask_radius_px}")


def normalized_images(stack: ParticleStack, mask_radius_px: float | None = None, chunk: int = 4096) -> np.ndarray:
    """All images ``(n, d, d)`` float32, each with zero mean and unit standard deviation; phase-
    flipped by each particle's CTF first when the STAR has CTF columns (so that particles of one
    view at different defoci look alike, as RELION's 2D classification compares them)."""
    from cryoprior.core.ctf import phase_flip
    from cryoprior.io.relion import ctf_from_star

    has_ctf = stack.has_column("rlnDefocusU")
    out = np.empty((len(stack), stack.box, stack.box), dtype=np.float32)
    for start, images in stack.chunks(chunk):
        x = torch.from_numpy(images)
        if has_ctf:
            x = phase_flip(x, ctf_from_star(stack, np.arange(start, start + len(images))))
        out[start : start + len(images)] = normalize_images(x, mask_radius_px).numpy()
    return out


def truth_labels(stack: ParticleStack) -> tuple[str, np.ndarray] | None:
    """``(column, labels)`` from ``cpViewLabel`` when all >= 0, else ``cpConformationLabel``."""
    for name in TRUTH_COLUMNS:
        if stack.has_column(name):
            values = np.asarray(stack.column(name))
            if np.issubdtype(values.dtype, np.number) and (values >= 0).all():
                return name, values.astype(np.int64)
    return None


def order_by_size(labels: np.ndarray, k: int) -> np.ndarray:
    """Relabel so that class 0 is the largest (ties: the lower old label first)."""
    order = np.argsort(-np.bincount(labels, minlength=k), kind="stable")
    rank = np.empty(k, dtype=np.int64)
    rank[order] = np.arange(k)
    return rank[labels]


def _cdae_features(images: np.ndarray, stack: ParticleStack, config: ClassifyConfig, device, work: Path) -> np.ndarray:
    """Images denoised by a CDAE (loaded from ``config.model`` or trained under ``work``)."""
    from cryoprior.nn import cdae  # written alongside; imported only when used

    if config.model is not None:
        model = cdae.load_model(config.model, device)
    else:
        from cryoprior.sim.dataset import SimulationConfig, simulate_dataset

        cdae_config = cdae.CDAEConfig(seed=config.seed)  # its SNR ladder: 0.1, 0.4, 0.6, clean
        snrs = [float(s) for s in cdae_config.pretrain_snrs]
        sim = SimulationConfig(
            structures=[config.pretrain_structure], box=stack.box, pixel_size_a=stack.pixel_size_a,
            n=config.pretrain_n, views=PRETRAIN_VIEWS, snr=snrs[0], snr_levels=snrs,
            seed=config.seed + PRETRAIN_SEED_OFFSET,
        )
        pretrain_dir = simulate_dataset(sim, work / "pretrain_data")
        cdae.train_cdae(pretrain_dir, stack, cdae_config, work / "cdae", device)
        model = cdae.load_model(work / "cdae", device)  # the run folder it wrote, kept in the output
        shutil.rmtree(pretrain_dir)  # reproducible from config.yaml; the model stays in cdae/
    # clustering normalises every image, so the network's normalised output will do
    denoised = np.asarray(cdae.denoise_images(model, images, config.batch_size, device, units="normalised"), dtype=np.float32)
    return normalize_images(torch.from_numpy(denoised)).numpy()


def classify_images(
    images: np.ndarray, config: ClassifyConfig, device: torch.device | str = "cpu",
    stack: ParticleStack | None = None, work: Path | None = None,
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """Labels ``(n,)`` in ``0..K-1`` (class 0 the largest) of normalised images ``(n, d, d)``,
    and, for the ``*align-kmeans`` and ``ml2d`` methods, ``(angles (n,) radians, shifts (n, 2) px)``
    (else None).

    ``stack`` and ``work`` (a folder for the CDAE run) are needed by ``cdae-*`` without a model.
    """
    k, method, seed = config.classes, config.method, config.seed
    if method == "drvae-bsk":
        if stack is None or work is None:
            raise ValueError("drvae-bsk needs the stack and a work folder")
        return _drvae_bsk(stack, config, device, work)
    if method.startswith("cdae-"):
        if config.model is None and (stack is None or work is None):
            raise ValueError("cdae-* without a model needs the stack and a work folder")
        images = _cdae_features(images, stack, config, device, work)  # type: ignore[arg-type]
        method = method.removeprefix("cdae-")
    pose = None
    if method == "align-kmeans":
        labels, angles, shifts, _ = align_kmeans(images, k, seed, max_shift=config.max_shift_px)
        pose = (angles, shifts)
    elif method == "ml2d":  # EM from align-kmeans' averages, as drvae-bsk --align ends
        start = align_kmeans(images, k, seed, max_shift=config.max_shift_px)[3]
        result = ml2d(images, start, max_shift=config.max_shift_px, iterations=config.ml2d_iterations,
                      **annealing_of(config))
        labels, pose = result.labels, (result.angles, result.shifts)
    elif method == "cae-kmeans":
        from cryoprior.nn.cae import CAEConfig, cae_embed

        cae = CAEConfig(latent_dim=config.cae_latent_dim, epochs=config.cae_epochs, seed=seed)
        labels = cluster(cae_embed(images, cae, device, config.batch_size), k, "kmeans", seed)
    elif method == "pca-kmeans":
        labels = cluster(images, k, method, seed, n_components=config.pca_components)
    elif method == "isomap-kmeans":
        labels = cluster(
            images, k, method, seed, n_components=config.isomap_components, n_neighbors=config.isomap_neighbors
        )
    else:  # kmeans, hc, bsk
        labels = cluster(images, k, method, seed)
    return order_by_size(labels, k), pose


def drvae_config(config: ClassifyConfig) -> DRVAEConfig:
    """The DRVAE settings of a ``drvae-bsk`` run, with the fields it shares with ``config``
    (:data:`DRVAE_SHARED`: K, seed, max shift and ML2D's) taken from ``config``."""
    return replace(config.drvae or DRVAEConfig(), **{name: getattr(config, name) for name in DRVAE_SHARED})


def _drvae_bsk(stack: ParticleStack, config: ClassifyConfig, device, work: Path
               ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """Labels and poses of ``drvae-bsk``; writes the denoised stack and averages and the round curves."""
    from cryoprior.nn.drvae import denoised_stream, train_drvae

    cfg = drvae_config(config)
    run = Path(config.model) if config.model is not None else work / "drvae"
    result = train_drvae(stack, cfg, run, device)
    labels = order_by_size(result.labels, cfg.classes)
    pose = (result.angles, np.rint(result.shifts).astype(np.int64)) if cfg.align else None
    sums, counts = np.zeros((cfg.classes, stack.box, stack.box)), np.zeros(cfg.classes, dtype=np.int64)
    images = []
    for start, den in denoised_stream(result.vae, stack, device, config.batch_size):
        images.append(den)
        part = slice(start, start + len(den))
        if pose is not None:
            den = to_class_frame(den, pose[0][part], pose[1][part]).numpy()
        s, c = class_sums(den, labels[part], cfg.classes)
        sums, counts = sums + s, counts + c
    (work / "drvae").mkdir(exist_ok=True)
    write_mrcs(work / "drvae" / "denoised.mrcs", np.concatenate(images), stack.pixel_size_a)
    write_mrcs(work / "class_averages_denoised.mrcs", averages_from_sums(sums, counts), stack.pixel_size_a)
    (work / "rounds.json").write_text(json.dumps(result.curves, indent=2))
    return labels, pose


def rebased_table(stack: ParticleStack, new_dir: Path) -> pd.DataFrame:
    """The stack's table with every ``*ImageName*`` column rewritten relative to ``new_dir``."""
    table = stack.table.copy()
    anchor = stack.path
    for name in [c for c in table.columns if "ImageName" in c]:
        try:
            paths, file_index, slice_index = resolve_image_names(table[name], anchor)
        except InputError as exc:
            if name == "rlnImageName":
                raise
            log.warning("column %s kept as it was: %s", name, exc)
            continue
        rel = [Path(os.path.relpath(p, new_dir)).as_posix() for p in paths]
        table[name] = [f"{s + 1:06d}@{rel[f]}" for f, s in zip(file_index, slice_index)]
    return table


def _write_outputs(tmp: Path, out: Path, stack: ParticleStack, labels: np.ndarray, k: int,
                   pose: tuple[np.ndarray, np.ndarray] | None = None) -> list[int]:
    table = rebased_table(stack, out.absolute())
    table["rlnClassNumber"] = labels + 1
    table = table.drop(columns=[c for c in ALIGN_COLUMNS if c in table.columns])  # poses of an earlier run
    if pose is not None:
        angles, shifts = pose
        table[ALIGN_COLUMNS[0]] = np.round(np.rad2deg(angles), 3)
        table[ALIGN_COLUMNS[1]], table[ALIGN_COLUMNS[2]] = shifts[:, 0], shifts[:, 1]
    write_star(tmp / "particles.star", table, stack.optics, pixel_size_a=stack.pixel_size_a, box=stack.box)
    averages, counts = _wiener_averages(stack, labels, k, pose)
    write_mrcs(tmp / "class_averages.mrcs", averages, stack.pixel_size_a)
    classes = pd.DataFrame({
        "rlnImageName": [f"{j:06d}@class_averages.mrcs" for j in range(1, k + 1)],
        "rlnClassNumber": np.arange(1, k + 1),
        "rlnClassDistribution": counts / counts.sum(),
        "cpClassSize": counts,
    })
    write_star(tmp / "class_averages.star", classes, pixel_size_a=stack.pixel_size_a, box=stack.box)
    return counts.tolist()


def _wiener_averages(stack: ParticleStack, labels: np.ndarray, k: int,
                     pose: tuple[np.ndarray, np.ndarray] | None) -> tuple[np.ndarray, np.ndarray]:
    """Class averages ``(k, d, d)`` of the raw images and the class sizes, Wiener-filtered as
    RELION's 2D references are: CTF-corrected when the STAR has CTF columns (ctf ≡ 1 without),
    and regularised per shell by the SSNR of each class's two half sets
    (``ssnr_wiener_averages``). With poses the (phase-flipped) images are moved into their
    class's frame; the CTF weights are not rotated with them (astigmatism is neglected there)."""
    from cryoprior.core.ctf import phase_flip
    from cryoprior.io.relion import ctf_from_star

    has_ctf = stack.has_column("rlnDefocusU")
    num = np.zeros((2 * k, stack.box, stack.box), dtype=np.complex128)
    den = np.zeros((2 * k, stack.box, stack.box))
    for start, raw in stack.chunks(4096):
        part = slice(start, start + len(raw))
        if has_ctf:
            ctf = ctf_from_star(stack, np.arange(part.start, part.stop))
            flipped = phase_flip(torch.as_tensor(raw, dtype=torch.float32), ctf)
        else:
            flipped = torch.as_tensor(raw, dtype=torch.float32)
            ctf = torch.ones_like(flipped)
        if pose is not None:
            flipped = to_class_frame(flipped, pose[0][part], pose[1][part])
        a, b = ctf_class_sums(flipped.numpy(), ctf.numpy(), half_set_labels(labels[part], k, part.start), 2 * k,
                              flipped=True)
        num, den = num + a, den + b
    counts = np.bincount(labels, minlength=k)
    return ssnr_wiener_averages(num, den), counts


def run_classify(
    in_path: str | Path, out_dir: str | Path, config: ClassifyConfig,
    argv: list[str] | None = None, overwrite: bool = False, optics: OpticsFlags | None = None,
) -> dict:
    """Classify the stack at ``in_path`` into the new folder ``out_dir`` (see the module docstring).

    Returns ``{"out", "n", "class_sizes", "metrics"}`` (``metrics`` None without truth labels).
    """
    config.validate()
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise OutputExistsError(out)
    stack = ParticleStack.from_file(in_path, optics)
    inputs = [in_path, *stack.stack_paths, config.model, config.pretrain_structure]
    with output_folder(out, inputs, overwrite, argv):
        return _run_classify(stack, in_path, out, config, argv, overwrite)


def _run_classify(stack: ParticleStack, in_path, out: Path, config: ClassifyConfig, argv, overwrite: bool) -> dict:
    n = len(stack)
    if config.classes > n:
        raise InputError(f"--classes {config.classes} is more than the {n} particles", in_path)
    if config.max_shift_px >= stack.box // 2:
        raise InputError(f"--max-shift {config.max_shift_px} px is half the {stack.box}-px box or more", in_path)
    if config.mask_radius_px is not None and config.mask_radius_px >= stack.box / 2:
        raise InputError(f"--mask-radius {config.mask_radius_px} leaves no background in {stack.box}-px images", in_path)
    device = resolve_device(config.device)
    truth = truth_labels(stack)
    t0 = time.perf_counter()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        images = normalized_images(stack, config.mask_radius_px)
        labels, pose = classify_images(images, config, device, stack, tmp)
        del images
        sizes = _write_outputs(tmp, out, stack, labels, config.classes, pose)
        seconds = round(time.perf_counter() - t0, 2)
        metrics = None
        if truth is not None:
            metrics = {
                "method": config.method, "classes": config.classes, "n": n, "label_column": truth[0],
                **classification_scores(truth[1], labels), "class_sizes": sizes, "seconds": seconds,
            }
            (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        write_run_config(
            tmp / "config.yaml", config, argv, input=str(Path(in_path).absolute()), device=str(device), seconds=seconds
        )
    log.info("classified %d particles into %d classes in %.1f s: %s", n, config.classes, seconds, out)
    return {"out": str(out), "n": n, "class_sizes": sizes, "metrics": metrics}
