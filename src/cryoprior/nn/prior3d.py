"""Learned 3D prior for RED reconstruction (Kimanius et al. 2020): a residual 3D U-Net denoiser.

``load_denoiser(path)`` returns ``D: (d, d, d) → (d, d, d)`` for the RED update
(``cryoprior.recon.mstep``); ``load_denoiser(None)`` loads the small model shipped in
``cryoprior/data/prior3d/`` (its README records how it was trained). A model is two files
side by side: ``model.pt`` (a ``state_dict``) and ``model.json`` (architecture and the
training summary). Inside ``D`` the volume is divided by its standard deviation within the
inscribed sphere (:func:`~cryoprior.nn.prior3d_data.sphere_std`), zero-padded about the
centre to a multiple of ``2 ** (levels - 1)``, denoised, cropped and scaled back.

Training (``train``) is Adam on pairs from :mod:`cryoprior.nn.prior3d_data` (random cube
rotation and crop per sample, gradient norm clipped at 1, cosine learning-rate decay), with the
residual head on a larger learning rate (``head_lr_factor``): in heavy noise the residual is
about minus the input, far from its zero start, and Adam's bounded steps would take thousands
of iterations to get there. A checkpoint per epoch; a rerun resumes from the last one.
"""

from __future__ import annotations

import io
import json
import logging
import math
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F

from cryoprior.errors import InputError
from cryoprior.fileutil import atomic_path
from cryoprior.nn.models.unet3d import UNet3D, UNet3DConfig
from cryoprior.nn.prior3d_data import NOISE_MODELS, TARGETS, rotate_cube, sphere_std
from cryoprior.nn.training import epoch_seed, resolve_device, train_loop
from cryoprior.sim.structures import list_builtin_structures

log = logging.getLogger(__name__)

HELD_OUT_STRUCTURES = ("1ake", "4ake", "2a2l", "3mht", "6flr")
"""Builtin structures never used to train the shipped model: keep them for benchmarks."""

MODEL_FILE, MODEL_CONFIG_FILE = "model.pt", "model.json"


def training_structures() -> list[str]:
    """Builtin ids the shipped model was trained on (all builtins but :data:`HELD_OUT_STRUCTURES`)."""
    return [s for s in list_builtin_structures() if s not in HELD_OUT_STRUCTURES]


@dataclass
class Prior3DConfig:
    """Everything that defines a ``train-prior3d`` run (the command's flags are built from it)."""

    structures: list[str] = field(
        default_factory=training_structures,
        metadata={"help": "training structures: builtin ids or PDB/mmCIF/MRC files"},
    )
    validation_structures: list[str] = field(
        default_factory=lambda: list(HELD_OUT_STRUCTURES),
        metadata={"help": "held-out structures for the validation metric"},
    )
    pseudo_proteins: int = field(default=16, metadata={"help": "add N procedural pseudo-proteins"})
    box: list[int] = field(default_factory=lambda: [32, 64], metadata={"help": "box size(s) of the maps"})
    crop: int | None = field(default=None, metadata={"help": "training crop size, None: the smallest box"})
    pairs_per_structure: int = field(default=4, metadata={"help": "noisy maps per structure and box"})
    validation_pairs: int = field(default=2, metadata={"help": "noisy maps per validation structure"})
    noise_model: str = field(
        default="reconstruction",
        metadata={"choices": NOISE_MODELS, "help": "noisy reconstructions or truth + white noise"},
    )
    n_particles: list[int] = field(
        default_factory=lambda: [150, 2000], metadata={"nargs": 2, "help": "particle count range"}
    )
    snr: list[float] = field(
        default_factory=lambda: [0.005, 0.2], metadata={"nargs": 2, "help": "image SNR range"}
    )
    pose_error_deg: float = field(default=3.0, metadata={"help": "largest RMS pose error (deg)"})
    target: str = field(
        default="fsc-truth",
        metadata={"choices": TARGETS, "help": "fsc-truth: truth × sqrt(2f/(1+f)), f the input's FSC to "
                  "the truth; half-map (the paper's): input = a half map, target = truth × FSC of the two "
                  "half maps (less amplitude near the resolution limit; worse RED maps in our benches)"},
    )
    band_limit: float = field(
        default=0.5,
        metadata={"help": "fraction of pairs cut at RELION's current size (half-map FSC-0.143 shell "
                  "+ 4..10 shells), as RELION's M-step inputs are before the last iteration"},
    )
    ctf: bool = field(default=True, metadata={"help": "apply a CTF (defocus 1-3 µm)"})
    wiener_constant: float = field(default=1e-3, metadata={"help": "reconstruction Wiener constant"})
    gaussian_level: list[float] = field(
        default_factory=lambda: [0.3, 5.0],
        metadata={"nargs": 2, "help": "noise std / map std range (gaussian noise model)"},
    )
    levels: int = field(default=4, metadata={"help": "U-Net resolution levels (5 in the paper)"})
    base_channels: int = field(default=6, metadata={"help": "channels at the finest level"})
    channel_growth: float = field(default=1.75, metadata={"help": "channel factor per level"})
    convs_per_level: int = field(default=2, metadata={"help": "3x3x3 convolutions per block"})
    epochs: int = field(default=60, metadata={"help": "passes over the training pairs"})
    batch_size: int = field(default=4, metadata={"help": "maps per step"})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate"})
    head_lr_factor: float = field(
        default=30.0,
        metadata={"help": "learning-rate factor of the residual head: in heavy noise the residual "
                  "(minus the noise) is as large as the input, far from its zero init"},
    )
    loss: str = field(default="l2", metadata={"choices": ("l1", "l2"), "help": "training loss"})
    seed: int = field(default=0, metadata={"help": "random seed (data and training)"})
    device: str = field(default="auto", metadata={"choices": ("auto", "cpu", "cuda")})

    def unet(self) -> UNet3DConfig:
        return UNet3DConfig(
            levels=self.levels,
            base_channels=self.base_channels,
            channel_growth=self.channel_growth,
            convs_per_level=self.convs_per_level,
        )

    def validate(self) -> None:
        if not self.box or min(self.box) < 8:
            raise InputError(f"box sizes must be at least 8 voxels, got {self.box}")
        if self.crop is not None and self.crop < 1:
            raise InputError(f"crop must be >= 1, got {self.crop}")
        counts = {"levels": self.levels, "base_channels": self.base_channels, "convs_per_level": self.convs_per_level,
                  "pairs_per_structure": self.pairs_per_structure}
        bad = [f"{k}={v}" for k, v in counts.items() if v < 1]
        if bad or self.validation_pairs < 0 or self.pseudo_proteins < 0:
            raise InputError(f"counts must be >= 1 (validation_pairs, pseudo_proteins >= 0): {', '.join(bad) or ''}"
                             f" validation_pairs={self.validation_pairs} pseudo_proteins={self.pseudo_proteins}")
        if not self.structures and not self.pseudo_proteins:
            raise InputError("no training data: give --structures or --pseudo-proteins")
        if not self.channel_growth > 0:
            raise InputError(f"channel_growth must be positive, got {self.channel_growth}")
        for name, (lo, hi) in (("n_particles", self.n_particles), ("snr", self.snr),
                               ("gaussian_level", self.gaussian_level)):
            if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
                raise InputError(f"{name} must be a range 0 < low <= high, got {lo} {hi}")
        if not (math.isfinite(self.pose_error_deg) and self.pose_error_deg >= 0):
            raise InputError(f"pose_error_deg must be >= 0, got {self.pose_error_deg}")
        if not (math.isfinite(self.wiener_constant) and self.wiener_constant > 0):
            raise InputError(f"wiener_constant must be positive, got {self.wiener_constant}")
        if self.target not in TARGETS:
            raise InputError(f"target must be one of {TARGETS}, got {self.target!r}")
        if not 0.0 <= self.band_limit <= 1.0:
            raise InputError(f"band_limit is a fraction in [0, 1], got {self.band_limit}")
        if self.noise_model not in NOISE_MODELS:
            raise InputError(f"noise_model must be one of {NOISE_MODELS}, got {self.noise_model!r}")
        if self.loss not in ("l1", "l2"):
            raise InputError(f"loss must be l1 or l2, got {self.loss!r}")
        multiple = 2 ** (self.levels - 1)
        crop = self.crop or min(self.box)
        if crop % multiple or crop > min(self.box):
            raise InputError(
                f"crop {crop} must be a multiple of 2**(levels-1) = {multiple} and <= every box "
                f"{self.box}"
            )
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.head_lr_factor <= 0:
            raise InputError("epochs, batch_size, lr and head_lr_factor must be positive")


# --------------------------------------------------------------------------------- the denoiser
def _centre_pad(x: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad ``(..., d, d, d)`` to ``size`` keeping voxel ``d // 2`` at ``size // 2``."""
    d = x.shape[-1]
    lo = size // 2 - d // 2
    return F.pad(x, (lo, size - d - lo) * 3)


def _centre_crop(x: torch.Tensor, d: int) -> torch.Tensor:
    n = x.shape[-1]
    lo = n // 2 - d // 2
    return x[..., lo : lo + d, lo : lo + d, lo : lo + d]


def apply_denoiser(net: UNet3D, vol: torch.Tensor) -> torch.Tensor:
    """Denoise one volume ``(d, d, d)`` with ``net`` (any d): normalise, pad, run, crop, restore."""
    if vol.dim() != 3 or len(set(vol.shape)) != 1:
        raise InputError(f"expected a cubic volume (d, d, d), got shape {tuple(vol.shape)}")
    param = next(net.parameters())
    x = vol.to(param.device, param.dtype)
    scale = sphere_std(x)
    d = x.shape[-1]
    m = net.size_multiple
    size = -(-d // m) * m
    with torch.no_grad():
        y = net(_centre_pad(x / scale, size)[None, None])[0, 0]  # (size, size, size)
    return (_centre_crop(y, d) * scale).to(vol.device, vol.dtype)


def _model_files(path: str | Path | None) -> tuple[bytes, dict, str]:
    """(weights bytes, config dict, source name) for a model file, folder or the shipped model."""
    if path is None:
        root = resources.files("cryoprior").joinpath("data", "prior3d")
        weights, cfg = root.joinpath(MODEL_FILE), root.joinpath(MODEL_CONFIG_FILE)
        if not weights.is_file() or not cfg.is_file():
            raise InputError("the shipped 3D prior is missing from the package", str(weights))
        return weights.read_bytes(), json.loads(cfg.read_text()), "shipped prior3d model"
    path = Path(path)
    weights = path / MODEL_FILE if path.is_dir() else path
    cfg = weights.with_suffix(".json")
    if not weights.is_file():
        raise InputError("model file not found", weights)
    if not cfg.is_file():
        raise InputError(f"model config {cfg.name} not found beside the weights", cfg)
    try:
        return weights.read_bytes(), json.loads(cfg.read_text()), str(weights)
    except json.JSONDecodeError as exc:
        raise InputError(f"cannot read model config ({exc})", cfg) from exc


def load_model(path: str | Path | None = None, device: str | torch.device = "cpu") -> UNet3D:
    """The U-Net of a saved model (see :func:`load_denoiser`), float32, eval mode, on ``device``."""
    weights, cfg, source = _model_files(path)
    try:
        net = UNet3D(UNet3DConfig(**cfg["unet"]))
        state = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
        net.load_state_dict({k: v.float() for k, v in state.items()})
    except (KeyError, TypeError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        raise InputError(f"not a prior3d model ({exc})", source) from exc
    return net.to(resolve_device(device)).eval()


def load_denoiser(
    path: str | Path | None = None, device: str | torch.device = "cpu"
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A denoiser ``D(vol)`` for real-space volumes ``(d, d, d)`` → ``(d, d, d)``, same device/dtype.

    ``path``: a ``model.pt`` (with ``model.json`` beside it), a folder holding both (a
    ``train-prior3d`` output), or None for the model shipped with the package. The network
    runs on ``device`` without gradients; the input may live anywhere. Raises
    :class:`InputError` naming the file when it is missing or not a model, and naming the shape
    for a non-cubic input.
    """
    net = load_model(path, device)

    def denoise(vol: torch.Tensor) -> torch.Tensor:
        return apply_denoiser(net, vol)

    # (lo, hi) Å/px the model was trained at, or None for a model without that record: the
    # M-step (recon.mstep.red_prior_fourier) resamples a map at another pixel size into it
    denoise.pixel_size_a = training_pixel_size_a(path)
    # CW-RED's (low, high) Å calibrated for this model, or None: recon.mstep.cw_thresholds
    denoise.cw_red_a = cw_red_thresholds(path)
    return denoise


def training_pixel_size_a(path: str | Path | None = None) -> tuple[float, float] | None:
    """``(lo, hi)``: the pixel sizes (Å) a saved model was trained at (``model.json``
    ``training.pixel_size_a``), None when the record lacks them."""
    _, cfg, _ = _model_files(path)
    training = cfg.get("training")
    value = training.get("pixel_size_a") if isinstance(training, dict) else None
    if not (isinstance(value, list) and len(value) == 2 and 0 < value[0] <= value[1]):
        return None
    return float(value[0]), float(value[1])


def model_record(path: str | Path | None = None) -> dict:
    """The ``model.json`` of a saved model (folder or ``model.pt``; None: the shipped one)."""
    return _model_files(path)[1]


def cw_red_thresholds(path: str | Path | None = None) -> tuple[float, float] | None:
    """``(low_a, high_a)``: CW-RED's λ = 0 / λ = 1 resolutions calibrated for a saved model
    (``model.json`` ``cw_red``, written by ``cryoprior calibrate-cw-red``), None when absent."""
    _, cfg, _ = _model_files(path)
    record = cfg.get("cw_red")
    if not isinstance(record, dict):
        return None
    low, high = record.get("low_a"), record.get("high_a")
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (low, high)) or not 0 < high < low:
        return None
    return float(low), float(high)


def write_model_record(path: str | Path, key: str, record: dict) -> Path:
    """Set ``model.json[key] = record`` of the saved model at ``path`` (folder or ``model.pt``),
    written atomically (a temporary file renamed over it). Raises :class:`InputError` naming
    the file when it is not a model. → the ``model.json`` path."""
    if path is None:
        raise InputError("give the model folder to write to (the shipped model: src/cryoprior/data/prior3d)")
    _, cfg, _ = _model_files(path)
    if not isinstance(cfg, dict) or "unet" not in cfg:
        raise InputError("not a prior3d model config (no 'unet' entry)", _config_path(path))
    cfg[key] = record
    target = _config_path(path)
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(cfg, indent=2) + "\n")
    return target


def _config_path(path: str | Path) -> Path:
    path = Path(path)
    return (path / MODEL_FILE if path.is_dir() else path).with_suffix(".json")


def save_model(net: UNet3D, folder: str | Path, summary: dict | None = None, half: bool = False) -> Path:
    """Write ``folder/model.pt`` (float16 weights if ``half``) and ``folder/model.json``."""
    folder = Path(folder)
    state = {k: (v.half() if half else v).detach().cpu() for k, v in net.state_dict().items()}
    with atomic_path(folder / MODEL_FILE) as tmp:
        torch.save(state, tmp)
    with atomic_path(folder / MODEL_CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps({"unet": net.config.to_dict(), **(summary or {})}, indent=2))
    return folder / MODEL_FILE


# -------------------------------------------------------------------------------------- training
def _random_crop(x: torch.Tensor, crop: int, g: torch.Generator) -> tuple[slice, ...]:
    starts = torch.randint(x.shape[-1] - crop + 1, (3,), generator=g).tolist()
    return tuple(slice(s, s + crop) for s in starts)


def make_batch(
    pairs: list[dict], idx: list[int], crop: int, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets ``(b, 1, crop, crop, crop)``, each randomly cube-rotated and cropped."""
    xs, ys = [], []
    for i in idx:
        k = int(torch.randint(24, (), generator=g))
        cut = _random_crop(pairs[i]["input"], crop, g)
        xs.append(rotate_cube(pairs[i]["input"][cut], k))
        ys.append(rotate_cube(pairs[i]["target"][cut], k))
    return torch.stack(xs)[:, None], torch.stack(ys)[:, None]  # (b, 1, c, c, c)


def loss_fn(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return F.l1_loss if name == "l1" else F.mse_loss


def train(
    pairs: list[dict], config: Prior3DConfig, out_dir: str | Path
) -> tuple[UNet3D, list[float]]:
    """Train a U-Net on ``pairs`` (dicts with ``input``/``target`` ``(d, d, d)``, see prior3d_data).

    Runs :func:`~cryoprior.nn.training.train_loop`: ``out_dir/checkpoint.pt`` after each epoch,
    resumed from when present. Returns the network (on the training device) and the mean loss of
    each epoch. Raises :class:`TrainingDivergedError` on a NaN/Inf loss, keeping the last good
    checkpoint.
    """
    config.validate()
    if not pairs:
        raise InputError("no training pairs")
    out_dir = Path(out_dir)
    device = resolve_device(config.device)
    crop = config.crop or min(config.box)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        # channels-last: about twice as fast for 3D convolutions on CPU
        net = UNet3D(config.unet()).to(device, memory_format=torch.channels_last_3d)
    head = list(net.head.parameters())
    body = [p for name, p in net.named_parameters() if not name.startswith("head.")]
    opt = torch.optim.Adam(
        [{"params": body}, {"params": head, "lr": config.lr * config.head_lr_factor}], lr=config.lr
    )
    steps_per_epoch = max(1, math.ceil(len(pairs) / config.batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config.epochs * steps_per_epoch)
    criterion = loss_fn(config.loss)
    batches: dict[int, tuple[torch.Generator, list[int]]] = {}

    def step(epoch: int, i: int) -> torch.Tensor:
        if epoch not in batches:  # one generator per epoch: crops and rotations resume exactly
            g = torch.Generator().manual_seed(epoch_seed(config.seed, epoch))
            batches.clear()
            batches[epoch] = (g, torch.randperm(len(pairs), generator=g).tolist())
        g, order = batches[epoch]
        idx = order[i * config.batch_size : (i + 1) * config.batch_size]
        x, y = make_batch(pairs, idx, crop, g)  # (b, 1, c, c, c)
        x, y = (t.to(device, memory_format=torch.channels_last_3d) for t in (x, y))
        loss = criterion(net(x), y)
        if not torch.isfinite(loss):
            return loss  # the loop stops before the step is taken
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        return loss

    losses = train_loop(
        step, epochs=config.epochs, steps_per_epoch=steps_per_epoch, modules={"model": net},
        optimizers={"optimizer": opt}, schedulers={"scheduler": sched}, seed=config.seed,
        device=device, checkpoint=out_dir / "checkpoint.pt", desc="prior3d",
    )
    return net, losses
