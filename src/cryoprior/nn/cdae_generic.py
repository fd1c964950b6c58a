"""The shipped, generic pre-trained CDAE: simulated pairs on many built-in structures, its
training (``cryoprior denoise pretrain-generic``) and its use on any stack.

Pre-training pairs (:func:`simulate_levels`): every structure of :func:`training_structures`
(all builtins but :data:`EXCLUDED_STRUCTURES`, those some benchmark or the demo scores on) at the
reference pixel size :data:`REFERENCE_PIXEL_A` in boxes of :data:`REFERENCE_BOX` px: uniform
orientations (random in-plane angles), random shifts, a CTF (300 kV, defocus uniform in
``defocus_min_um..defocus_max_um``), projected in a box that holds the whole molecule and
cropped to the reference box. Each image gets its own input SNR ``s`` (log-uniform in
``snr_min..snr_max``); the cascade's levels are the same projection at ``s``, ``4 s``, ``6 s``
and clean (the paper's 0.1 → 0.4 → 0.6 → clean ladder, scaled), each with its own white noise
(σ² = var(clean image) / SNR), **phase-flipped** by its CTF (as ``classify`` and
``denoise train/apply`` feed the network) and normalised per image.

Use (:func:`train_cdae_generic`): a stack is phase-flipped when it has CTF columns and resampled in
Fourier space to the reference pixel size (``core.filters.resample``); the fine-tuned model
is wrapped in :class:`~cryoprior.nn.models.cdae.ResampledCascade`, which resamples to the model's grid and back inside the network,
so that the output's scale (Stein, ``denoiser.to_input_units``) is estimated on the input's grid.

Depth: the shipped model's depth is fixed (``model.json``: two encoder modules, receptive field
18 px = 22.5 Å at the reference pixel). ``nn.cdae.with_depth``'s rule allows it for particles of
36 reference pixels (45 Å) and more; smaller particles get a warning (see :func:`check_depth`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cryoprior.config import config_to_dict, write_run_config
from cryoprior.core.ctf import ctf_2d, phase_flip
from cryoprior.core.filters import normalize_images, resample
from cryoprior.core.projection import volume_fourier
from cryoprior.core.rotations import random_rotations
from cryoprior.errors import InputError
from cryoprior.io.stack import ParticleStack
from cryoprior.nn.cdae import CDAEConfig, finetune_cascade, pretrain_cascade
from cryoprior.nn.cdae_ops import (
    estimate_particle_diameter_px,
    flipped_images,
    modules_for_diameter,
    receptive_field_px,
)
from cryoprior.nn.denoiser import load_model, save_model
from cryoprior.nn.models.cdae import CDAECascade, ResampledCascade
from cryoprior.nn.training import resolve_device, save_loss_curves
from cryoprior.progress import bar
from cryoprior.sim.dataset import render_clean
from cryoprior.sim.structures import (
    list_builtin_structures,
    load_volume,
    max_radius_a,
    resolve_structure,
)

log = logging.getLogger(__name__)

REFERENCE_PIXEL_A = 1.25  # Å: typical 50-80 Å particles fill a 64-px box
REFERENCE_BOX = 64
LADDER = (1.0, 4.0, 6.0, math.inf)  # each level's SNR as a multiple of the image's input SNR

#: builtins never used for the shipped model: every structure a benchmark or the demo scores on
EXCLUDED_STRUCTURES: dict[str, str] = {
    "1ake": "the demo's molecule; bench gan / drvae (1ake + 4ake); 3D prior held out (bench red, relion)",
    "4ake": "bench gan / drvae (1ake + 4ake); 3D prior held out",
    "2a2l": "3D prior held out: bench.common.pick_structures (bench red, red_timing), bench relion",
    "3mht": "3D prior held out: bench.common.pick_structures, bench relion",
    "6flr": "3D prior held out (nn.prior3d.HELD_OUT_STRUCTURES), bench relion",
    "1h4a": "bench cdae and bench drvae test structure",
    "1or4": "bench cdae and bench drvae test structure",
    "1pwc": "bench cdae and bench drvae test structure",
    "3q4o": "bench drvae's development structure (its defaults were chosen on it)",
}


def training_structures() -> list[str]:
    """The builtins the shipped model is trained on: all but :data:`EXCLUDED_STRUCTURES`."""
    return [s for s in list_builtin_structures() if s not in EXCLUDED_STRUCTURES]


def shipped_model_dir() -> Path:
    """Folder of the shipped model (``model.pt``, ``model.json``, ``README.md``)."""
    return Path(__file__).resolve().parent.parent / "data" / "cdae"


@dataclass
class GenericCDAEConfig:
    """Pre-training pairs and training of the generic CDAE."""

    n_per_structure: int = field(default=700, metadata={"help": "simulated particles per structure"})
    snr_min: float = field(default=0.005, metadata={"help": "lowest input SNR (log-uniform per image)"})
    snr_max: float = field(default=0.5, metadata={"help": "highest input SNR"})
    defocus_min_um: float = field(default=0.5, metadata={"help": "defocus range, µm"})
    defocus_max_um: float = field(default=3.5, metadata={"help": "defocus range, µm"})
    shift_px: float = field(default=4.0, metadata={"help": "max |shift| per axis, reference pixels"})
    widths: list[int] = field(default_factory=lambda: [16, 32], metadata={"help": "encoder channels (depth)"})
    epochs: int = field(default=10, metadata={"help": "pre-training epochs per block"})
    structures: list[str] | None = field(
        default=None, metadata={"help": "builtins to train on (None: training_structures())"}
    )
    seed: int = field(default=0, metadata={"help": "random seed"})

    def validate(self) -> None:
        if self.n_per_structure < 2 or self.epochs < 0:
            raise InputError("n_per_structure must be >= 2 and epochs >= 0")
        if not 0 < self.snr_min <= self.snr_max:
            raise InputError(f"need 0 < snr_min <= snr_max, got {self.snr_min}, {self.snr_max}")
        if not 0 < self.defocus_min_um <= self.defocus_max_um:
            raise InputError("need 0 < defocus_min_um <= defocus_max_um")
        bad = [s for s in (self.structures or []) if s in EXCLUDED_STRUCTURES]
        if bad:
            raise InputError(f"{', '.join(bad)} are scored on by a benchmark or the demo; not for training")

    def cdae_config(self) -> CDAEConfig:
        """The cascade's config (the ladder as multiples of the input SNR)."""
        return CDAEConfig(widths=list(self.widths), pretrain_snrs=list(LADDER), pretrain_epochs=self.epochs,
                          seed=self.seed)


def _render_box(structure: str) -> int:
    """An even box (reference pixels) that holds the whole molecule and its CTF fringes."""
    need = 2 * max_radius_a(resolve_structure(structure)) / REFERENCE_PIXEL_A + 16
    return max(REFERENCE_BOX, 2 * math.ceil(need / 2))


def simulate_levels(config: GenericCDAEConfig) -> list[torch.Tensor]:
    """The pre-training levels ``[(n, 1, 64, 64) × 4]`` (input, 4×, 6× its SNR, clean), phase-flipped
    and normalised; deterministic in ``config.seed`` and the structure list."""
    structures = config.structures or training_structures()
    n, box = config.n_per_structure, REFERENCE_BOX
    levels = [torch.empty(n * len(structures), 1, box, box) for _ in LADDER]
    gen = torch.Generator().manual_seed(config.seed)
    with bar(len(structures), "simulate pre-training pairs", unit="structure") as pbar:
        for k, name in enumerate(structures):
            big = _render_box(name)
            vol_ft = volume_fourier(load_volume(name, big, REFERENCE_PIXEL_A).float())
            rots = random_rotations(n, gen)  # uniform on SO(3): random in-plane angles too
            shifts = (torch.rand(n, 2, generator=gen, dtype=torch.float64) * 2 - 1) * config.shift_px
            u = config.defocus_min_um + torch.rand(n, generator=gen) * (config.defocus_max_um - config.defocus_min_um)
            defocus = torch.stack([u * 1e4, u * 1e4 - 500 * torch.rand(n, generator=gen),
                                   180 * torch.rand(n, generator=gen)], 1).double()  # (n, 3) Å, Å, deg
            log_snr = math.log(config.snr_min) + torch.rand(n, generator=gen) * math.log(config.snr_max / config.snr_min)
            snr = torch.exp(log_snr)  # (n,)
            for start in range(0, n, 128):
                sl = slice(start, min(start + 128, n))
                clean = render_clean(vol_ft, rots[sl], big, REFERENCE_PIXEL_A, shifts[sl] * REFERENCE_PIXEL_A,
                                     defocus[sl])  # (b, big, big)
                lo = big // 2 - box // 2
                clean = clean[:, lo : lo + box, lo : lo + box].float()  # (b, 64, 64)
                d = defocus[sl].float()
                ctf = ctf_2d(box, REFERENCE_PIXEL_A, d[:, 0], d[:, 1], d[:, 2])
                var = clean.var(dim=(-2, -1), unbiased=False)  # (b,)
                rows = slice(k * n + sl.start, k * n + sl.stop)
                for j, factor in enumerate(LADDER):
                    sigma = torch.zeros_like(var) if math.isinf(factor) else torch.sqrt(var / (factor * snr[sl]))
                    noisy = clean + sigma[:, None, None] * torch.randn(clean.shape, generator=gen)
                    levels[j][rows, 0] = normalize_images(phase_flip(noisy, ctf))
            pbar.update(1)
    return levels


def train_generic(config: GenericCDAEConfig, out_dir: str | Path, device: str = "auto") -> Path:
    """Simulate the pairs, pre-train the cascade and write ``out_dir``: ``model.pt`` (the
    ``denoise`` model format), ``model.json`` (the training record), ``losses.json``/``.png`` and
    ``checkpoints/`` (resumable: run again with the same ``out_dir``)."""
    config.validate()
    out_dir = Path(out_dir)
    (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    t0 = time.perf_counter()
    levels = simulate_levels(config)
    sim_s = time.perf_counter() - t0
    cfg = config.cdae_config()
    t0 = time.perf_counter()
    cascade, curves = pretrain_cascade(levels, cfg, dev, out_dir / "checkpoints")
    train_s = time.perf_counter() - t0
    arch = {"kind": "cdae", "n_blocks": cfg.n_blocks, **cfg.block_arch()}
    save_model(out_dir / "model.pt", "cdae", arch, cascade, config_to_dict(cfg))
    save_loss_curves(curves, out_dir)
    record = {
        "reference_pixel_size_a": REFERENCE_PIXEL_A, "reference_box": REFERENCE_BOX, "arch": arch,
        "ladder_snr_multiples": [str(f) for f in LADDER], "generic_config": dataclasses.asdict(config),
        "structures": config.structures or training_structures(), "excluded": EXCLUDED_STRUCTURES,
        "n_pairs": int(levels[0].shape[0]), "simulate_seconds": round(sim_s, 1), "train_seconds": round(train_s, 1),
        "threads": torch.get_num_threads(), "device": str(dev),
        "final_losses": {k: round(v[-1], 4) for k, v in curves.items() if v},
    }
    (out_dir / "model.json").write_text(json.dumps(record, indent=2) + "\n")
    return out_dir


# ------------------------------------------------------------------------------------- use
def shipped_record(model_dir: str | Path | None = None) -> dict:
    """``model.json`` of the shipped model (or of a ``pretrain-generic`` folder)."""
    path = Path(model_dir or shipped_model_dir()) / "model.json"
    if not path.is_file():
        raise InputError("no generic CDAE here (expected model.pt and model.json)", path.parent)
    return json.loads(path.read_text())


def load_shipped(model_dir: str | Path | None = None, device: str | torch.device = "cpu") -> CDAECascade:
    """The generic pre-trained cascade (the shipped one by default), in eval mode."""
    return load_model(Path(model_dir or shipped_model_dir()), device)


def model_box(box: int, pixel_size_a: float | None, reference_pixel_a: float = REFERENCE_PIXEL_A) -> int:
    """The box (px) of a ``box``-px image of ``pixel_size_a`` resampled to the reference pixel size
    (the same box when the pixel size is unknown); the achieved pixel is ``pixel · box / result``."""
    if not pixel_size_a:
        return box
    return max(8, int(round(box * pixel_size_a / reference_pixel_a)))


def check_depth(images: torch.Tensor, modules: int, convs_per_module: int = 2,
                diameter_a: float | None = None, pixel_size_a: float | None = None) -> float:
    """The particle diameter in model pixels (``diameter_a`` or estimated from ``images``
    ``(n, d, d)`` already on the model's grid); warns when the fixed depth's receptive field
    exceeds half of it (``nn.cdae_ops.modules_for_diameter`` would choose fewer modules)."""
    diameter_px = diameter_a / pixel_size_a if diameter_a and pixel_size_a else estimate_particle_diameter_px(images)
    allowed = modules_for_diameter(diameter_px, convs_per_module)
    if allowed < modules:
        log.warning("particle diameter %.0f model px: the shipped CDAE's receptive field (%d px) exceeds half of "
                    "it; the depth rule would use %d module(s) (pre-train your own with --pretrain)",
                    diameter_px, receptive_field_px(modules, convs_per_module), allowed)
    return diameter_px


def generic_config(config: CDAEConfig | None, model_dir: str | Path | None = None) -> CDAEConfig:
    """``config`` (fine-tuning and k-NN settings) with the generic model's architecture."""
    config = config or CDAEConfig()
    if config.widths is not None:
        raise InputError("--widths sets the depth of a cascade you pre-train (--pretrain SIM_DIR); the generic "
                         "CDAE's depth is fixed")
    arch = shipped_record(model_dir)["arch"]
    config = dataclasses.replace(config, widths=list(arch["widths"]), convs_per_module=arch["convs_per_module"],
                                 dropout=arch["dropout"])
    config.validate()
    if config.n_blocks != arch["n_blocks"]:
        raise InputError(f"--pretrain-snrs asks for {config.n_blocks} blocks; the generic CDAE has {arch['n_blocks']}")
    return config


def finetune_generic(
    images, pixel_size_a: float | None, config: CDAEConfig, device: str | torch.device = "auto",
    model_dir: str | Path | None = None, checkpoint_dir: str | Path | None = None,
) -> tuple[nn.Module, dict, dict]:
    """Fine-tune the generic CDAE on ``images`` ``(n, d, d)`` (already phase-flipped when they
    carry a CTF) of ``pixel_size_a``, resampled to the model's pixel size. ``config`` from
    :func:`generic_config`. Returns the network for ``(b, 1, d, d)`` inputs (a
    :class:`ResampledCascade` when the grids differ), its ``arch`` and a record (model box and
    pixel, particle diameter in model pixels, loss curves)."""
    images = torch.as_tensor(np.asarray(images, dtype=np.float32))
    d, reference = images.shape[-1], float(shipped_record(model_dir)["reference_pixel_size_a"])
    m = model_box(d, pixel_size_a, reference)
    x = resample(images, m, ndim=2)  # (n, m, m)
    pixel = (pixel_size_a or reference) * d / m
    log.info("generic CDAE: %d px of %s Å resampled to %d px of %.3f Å (model: %.3f Å)", d,
             pixel_size_a or "unknown", m, pixel, reference)
    diameter = check_depth(x, len(config.widths), config.convs_per_module, config.particle_diameter_a, pixel)
    tuned, curves = finetune_cascade(load_shipped(model_dir, "cpu"), x, config, device, checkpoint_dir)
    blocks = {"n_blocks": config.n_blocks, **config.block_arch()}
    if m == d:
        return tuned, {"kind": "cdae", **blocks}, {"model_box": m, "model_pixel_size_a": round(pixel, 4),
                                                   "particle_diameter_model_px": round(diameter, 1), "curves": curves}
    model = ResampledCascade(m, **blocks)
    model.inner.load_state_dict(tuned.state_dict())
    return model.eval(), {"kind": "cdae-resampled", "model_box": m, **blocks}, {
        "model_box": m, "model_pixel_size_a": round(pixel, 4), "particle_diameter_model_px": round(diameter, 1),
        "curves": curves}


def train_cdae_generic(
    target_stack: ParticleStack,
    config: CDAEConfig | None,
    out_dir: str | Path,
    device: str | torch.device = "auto",
    model_dir: str | Path | None = None,
) -> Path:
    """Fine-tune the generic CDAE (the shipped one, or ``model_dir``) on ``target_stack``: its
    images phase-flipped when it has CTF columns and resampled to the model's pixel size, k-NN
    mean targets (:func:`~cryoprior.nn.cdae.finetune_cascade`). Writes ``out_dir`` as
    :func:`~cryoprior.nn.cdae.train_cdae` does; the saved model resamples to its grid and back by
    itself (``cdae-resampled``) when the target's pixel size differs. Returns ``out_dir``."""
    config = generic_config(config, model_dir)
    out_dir = Path(out_dir)
    ckdir = out_dir / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    images, flipped = flipped_images(target_stack)  # (n, d, d)
    write_run_config(out_dir / "config.yaml", config, method="cdae", pretrain="generic CDAE "
                     + str(Path(model_dir) if model_dir else "(shipped)"))
    model, arch, info = finetune_generic(images, target_stack.pixel_size_a, config, device, model_dir, ckdir)
    curves = info.pop("curves")
    extra = {"phase_flip": flipped, "generic_model": str(model_dir or "shipped"), **info}
    save_model(out_dir / "model.pt", "cdae", arch, model, {**config_to_dict(config), **extra})
    save_loss_curves(curves, out_dir)
    return out_dir
