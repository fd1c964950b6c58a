"""The one training loop (:func:`train_loop`) and what every network shares: devices,
optimisers, checkpoints, loss curves, dihedral augmentation, weight averaging (:class:`WeightAverage`).

:func:`train_loop` runs epochs of a caller's step function with resumable checkpoints, per-epoch
seeding and a NaN/Inf stop; :func:`fit_pairs` is that loop for image-to-image pairs
``(n, 1, d, d)`` in memory (CDAE, DnCNN). The 3D prior, the GAN and DRVAE use the loop with their
own steps.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from cryoprior.core.rotations import rotate_images
from cryoprior.errors import InputError, TrainingDivergedError
from cryoprior.fileutil import atomic_path
from cryoprior.progress import bar

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
OPTIMIZERS = ("rmsprop", "adam")
AUGMENTATIONS = ("none", "dihedral", "rotate")


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → CUDA when present else CPU; ``"cuda"`` without a GPU is an error."""
    if isinstance(spec, torch.device):
        return spec
    name = str(spec).lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"device {spec!r} asked for, but no CUDA device is available")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise InputError(f"unknown device {spec!r}; choose from {', '.join(DEVICES)}")


def make_optimizer(params, name: str, lr: float) -> torch.optim.Optimizer:
    """RMSprop (as in the CDAE paper) or Adam."""
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")


# ---------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: str | Path, **state) -> None:
    """``torch.save`` of ``state`` (tensors, state dicts, plain values), atomically."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """A checkpoint written by :func:`save_checkpoint` (tensors and plain values only)."""
    path = Path(path)
    if not path.is_file():
        raise InputError("checkpoint not found", path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which one
        raise InputError(f"not a readable checkpoint ({type(exc).__name__}: {exc})", path) from exc


def _all_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


class WeightAverage(nn.Module):
    """Exponential moving average (Polyak/EMA) of a model's weights and floating-point buffers
    (batch-norm statistics), bias-corrected: after ``t`` calls of :meth:`update` it is
    ``Σ_s decay^(t−s) θ_s / Σ_s decay^(t−s)`` over the updates ``s = 1..t`` (the initial weights
    do not count); integer buffers are copied. ``.module`` is the averaged copy; the step count is
    a buffer, so a module entry of :func:`train_loop` checkpoints and resumes it exactly."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        if not 0 <= decay < 1:
            raise ValueError(f"decay must lie in [0, 1), got {decay}")
        self.decay = float(decay)
        self.module = copy.deepcopy(model)
        self.module.requires_grad_(False)
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        t = int(self.steps) + 1
        d = self.decay
        keep = d * (1 - d ** (t - 1)) / (1 - d**t) if d > 0 else 0.0  # weight of the old average
        pairs = list(zip(self.module.parameters(), model.parameters()))
        pairs += list(zip(self.module.buffers(), model.buffers()))
        for avg, new in pairs:
            if avg.is_floating_point():
                avg.lerp_(new.detach(), 1.0 - keep)
            else:
                avg.copy_(new)
        self.steps.fill_(t)


# --------------------------------------------------------------------------------- the one loop
StepFn = Callable[[int, int], "torch.Tensor | float"]


def train_loop(
    step: StepFn,
    *,
    epochs: int,
    steps_per_epoch: int,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler] | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    checkpoint: str | Path | None = None,
    desc: str = "train",
    samples_per_epoch: int | None = None,
) -> list[float]:
    """Run ``epochs`` epochs of ``step(epoch, i)`` and return the mean loss of each epoch.

    The loop every network in cryoprior trains with. ``step`` does one optimisation step (forward,
    backward, ``optimizer.step()``) and returns its loss (a scalar tensor or float), or a pair
    ``(loss, weight)`` whose weight (e.g. the batch size) weights the epoch mean; the loop owns
    what must be the same for all of them:

    - **resume**: ``checkpoint`` holds each module, optimiser and scheduler state dict under its
      name, plus ``epoch`` and ``losses``; when it exists the loop restores them and continues
      after the last finished epoch;
    - **reproducibility**: each epoch runs under ``torch.manual_seed(seed · 100003 + epoch)``
      inside a forked RNG, so a resumed run draws the same batches, dropout masks and
      augmentations as an uninterrupted one (``epoch_seed`` gives the same number to ``step``);
    - **divergence**: a non-finite step loss, epoch mean or parameter stops training with
      :class:`TrainingDivergedError`; checkpoints are written (atomically) only after a finite
      epoch, so the one on disk is the last good one;
    - progress bar, per-epoch log line.
    """
    if epochs < 0 or steps_per_epoch < 1:
        raise ValueError(f"need epochs >= 0 and steps_per_epoch >= 1, got {epochs}, {steps_per_epoch}")
    device = resolve_device(device)
    schedulers = schedulers or {}
    stateful = {**modules, **optimizers, **schedulers}
    losses: list[float] = []
    start_epoch = 0
    ckpt = None if checkpoint is None else Path(checkpoint)
    if ckpt is not None and ckpt.exists():
        state = load_checkpoint(ckpt, device)
        missing = [k for k in stateful if k not in state]
        if missing:
            raise InputError(f"checkpoint lacks {', '.join(missing)}: from another kind of run?", ckpt)
        for name, obj in stateful.items():
            obj.load_state_dict(state[name])
        start_epoch, losses = int(state["epoch"]), list(state["losses"])
        log.info("%s: resumed from %s after epoch %d", desc, ckpt, start_epoch)
    devices = [device] if device.type == "cuda" else []
    for epoch in range(start_epoch, epochs):
        for m in modules.values():
            m.train()
        total, weight_sum = 0.0, 0.0
        with torch.random.fork_rng(devices=devices), bar(steps_per_epoch, f"{desc} epoch {epoch + 1}/{epochs}") as pbar:
            torch.manual_seed(epoch_seed(seed, epoch))
            for i in range(steps_per_epoch):
                out = step(epoch, i)
                loss, w = out if isinstance(out, tuple) else (out, 1.0)
                value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
                if not math.isfinite(value):
                    raise _diverged(desc, epoch, i, ckpt)
                total += value * float(w)
                weight_sum += float(w)
                pbar.update(1)
                pbar.set_postfix(loss=f"{value:.4g}", refresh=False)
        mean = total / max(weight_sum, 1e-30)
        if not (math.isfinite(mean) and all(_all_finite(m) for m in modules.values())):
            raise _diverged(desc, epoch, steps_per_epoch - 1, ckpt)
        losses.append(mean)
        log.info("%s: epoch %d/%d loss %.5g", desc, epoch + 1, epochs, mean)
        if ckpt is not None:
            save_checkpoint(
                ckpt, **{k: v.state_dict() for k, v in stateful.items()}, epoch=epoch + 1, losses=losses
            )
    for m in modules.values():
        m.eval()
    return losses


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch of :func:`train_loop` (and of its batch order)."""
    return seed * 100_003 + epoch


def fit_pairs(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    optimizer: str = "rmsprop",
    seed: int = 0,
    device: torch.device | str = "cpu",
    checkpoint: str | Path | None = None,
    desc: str = "train",
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    augment: str = "none",
) -> list[float]:
    """Train ``model`` on ``inputs → targets`` ``(n, 1, d, d)`` with :func:`train_loop`; return the
    mean loss per epoch.

    The model is moved to ``device`` and left in eval mode. ``inputs``/``targets`` stay where they
    are (CPU is fine); batches are copied to the device. Resumes from ``checkpoint`` if it exists.
    ``augment`` transforms each input and its target alike: ``"dihedral"``, one random symmetry
    of the square per batch (rotation by a multiple of 90°, optionally mirrored; pixel noise keeps
    its statistics exactly); ``"rotate"``, that and a random in-plane rotation per image
    (bilinear, reflected at the border, which smooths the noise slightly).
    """
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {augment!r}")
    if inputs.shape != targets.shape or inputs.dim() != 4 or inputs.shape[1] != 1:
        raise ValueError(
            f"inputs and targets must both be (n, 1, d, d): inputs.shape = {tuple(inputs.shape)} "
            f"vs targets.shape = {tuple(targets.shape)}"
        )
    if epochs < 0 or batch_size < 1:
        raise ValueError(f"need epochs >= 0 and batch_size >= 1, got {epochs}, {batch_size}")
    device = resolve_device(device)
    loss_fn = loss_fn or nn.functional.mse_loss
    fmt = torch.channels_last  # ~2x faster convolutions on CPU (oneDNN), harmless on CUDA
    model.to(device=device, memory_format=fmt)
    opt = make_optimizer(model.parameters(), optimizer, lr)
    n = inputs.shape[0]
    used = n - 1 if n > 1 and n % batch_size == 1 else n  # no batch of 1 (batch norm)
    steps = math.ceil(used / batch_size)
    orders: dict[int, torch.Tensor] = {}

    def step(epoch: int, i: int):
        if epoch not in orders:
            g = torch.Generator().manual_seed(epoch_seed(seed, epoch))
            orders.clear()
            orders[epoch] = torch.randperm(n, generator=g)[:used]
        idx = orders[epoch][i * batch_size : (i + 1) * batch_size]
        x = inputs[idx].to(device).contiguous(memory_format=fmt)  # (b, 1, d, d)
        y = targets[idx].to(device).contiguous(memory_format=fmt)
        if augment != "none":
            which = int(torch.randint(8, ()))  # seeded per epoch by the loop: resumable
            x, y = dihedral(x, which), dihedral(y, which)
        if augment == "rotate":
            angles = torch.rand(len(x)) * (math.pi / 2)  # the dihedral step covers the rest
            x, y = rotate_images(x, angles), rotate_images(y, angles)
        loss = loss_fn(model(x), y)
        if not torch.isfinite(loss):
            return loss, len(idx)  # the loop stops before the step is taken
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss, len(idx)

    losses = train_loop(
        step, epochs=epochs, steps_per_epoch=steps, modules={"model": model}, optimizers={"optimizer": opt},
        seed=seed, device=device, checkpoint=checkpoint, desc=desc,
    )
    model.to(memory_format=torch.contiguous_format).eval()
    return losses


def dihedral(x: torch.Tensor, which: int) -> torch.Tensor:
    """Symmetry ``which % 8`` of the square applied to images ``(..., d, d)``: rotation by
    ``(which % 4) · 90°``, mirrored when ``(which // 4) % 2``. ``which = 0`` is the identity."""
    y = torch.rot90(x, which % 4, dims=(-2, -1))
    return y.flip(-1) if (which // 4) % 2 else y


def _diverged(desc: str, epoch: int, step: int, ckpt: Path | None) -> TrainingDivergedError:
    """Checkpoints are written after every finished epoch, so the one on disk is epoch ``epoch``."""
    where = f"{desc}: the loss became NaN/Inf at epoch {epoch + 1}, step {step + 1}"
    if ckpt is not None and ckpt.exists():
        return TrainingDivergedError(
            f"{where}; the last good checkpoint {ckpt} (after epoch {epoch}) is kept — "
            "lower the learning rate and run again to resume"
        )
    return TrainingDivergedError(f"{where}; no checkpoint was written yet — lower the learning rate")


# ----------------------------------------------------------------------------------- loss curves
def save_loss_curves(curves: dict[str, list[float]], out_dir: str | Path, stem: str = "losses") -> tuple[Path, Path]:
    """Write ``{stem}.json`` (name → per-epoch losses) and ``{stem}.png`` (one line per curve)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    json_path, png_path = out_dir / f"{stem}.json", out_dir / f"{stem}.png"
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(curves, indent=2))
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, values in curves.items():
        if values:
            ax.plot(range(1, len(values) + 1), values, marker="o", ms=3, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("MSE loss")
    ax.set_yscale("log")
    if any(curves.values()):
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return json_path, png_path
