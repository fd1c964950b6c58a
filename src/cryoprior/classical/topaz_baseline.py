"""Topaz-Denoise's pretrained 2D models (Bepler et al. 2020) as an optional baseline.

Topaz (``topaz-em``) is GPL-3: an optional extra that cryoprior never requires and never imports
unless this baseline is asked for. Install it without letting pip replace the installed PyTorch
(topaz also declares torchvision and psutil, which its denoising code does not import)::

    python3 -m pip install --no-deps topaz-em h5py

Each particle image is denoised as ``topaz denoise`` denoises one micrograph with its defaults
(``denoise_image``: no low-pass, Gaussian or deconvolution filter, no pixel cutoff, no
``--normalize``; patches only above 1024 + 500 px, so a particle image goes through whole):
normalise by the image's mean and standard deviation, apply the network, and scale the output
back, so the estimate is in the input's intensity units. The images of a chunk go through the
network as one batch; topaz normalises twice (``numpy`` std, then ``torch`` std), which composes
to one normalisation by the unbiased standard deviation, as here.

The pretrained models were trained on whole micrographs at their own pixel sizes (several
EMPIAR data sets), not on particle images at this stack's sampling; topaz's documentation gives
no pixel size to resample to (its ``--lowpass`` binning filter is off by default), so the images
are used at the sampling they have. Topaz's authors note that denoising whole micrographs and
then extracting particles tends to work better than denoising particle stacks.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
from pathlib import Path

import numpy as np
import torch

DEFAULT_MODEL = "unet"  # ``topaz denoise``'s default: unet_L2_v0.2.2
INSTALL = "pip install --no-deps topaz-em h5py"
_MODELS: dict[tuple[str, str], torch.nn.Module] = {}  # (model, device) -> loaded network


def topaz_missing() -> str | None:
    """Why Topaz-Denoise cannot run here (a one-line reason), or None when ``topaz.denoise`` imports."""
    if importlib.util.find_spec("topaz") is None:
        return f"Topaz-Denoise needs the optional topaz-em package (GPL-3): {INSTALL}"
    try:
        importlib.import_module("topaz.denoise")
    except Exception as e:  # noqa: BLE001 - any failure means the baseline is unavailable
        return f"topaz is installed but topaz.denoise does not import ({type(e).__name__}: {e}); {INSTALL}"
    return None


def pretrained_models() -> list[str]:
    """Names of topaz's pretrained 2D denoising models (``topaz denoise -m``)."""
    from topaz.denoising.models import model_name_dict

    return [name for name in model_name_dict if "3d" not in name]


def _load(model: str, device: torch.device) -> torch.nn.Module:
    """Topaz's ``load_model``: a pretrained name, or the path of a model ``topaz denoise`` trained."""
    key = (model, str(device))
    if key not in _MODELS:
        from topaz.denoising import models as tm

        if model not in tm.model_name_dict and not Path(model).is_file():
            raise ValueError(f"unknown Topaz model {model!r}: choose from {', '.join(pretrained_models())} "
                             "or give the path of a topaz denoising model")
        if model in tm.model_name_dict and model not in pretrained_models():
            raise ValueError(f"Topaz model {model!r} is a 3D (tomogram) model; 2D models: {', '.join(pretrained_models())}")
        with contextlib.redirect_stderr(io.StringIO()):  # topaz prints "# loading pretrained model"
            try:
                net = tm.load_model(model)
            except RuntimeError:
                if model not in tm.model_name_dict:
                    raise
                # topaz 0.3.20 reads its packaged weights relative to topaz.denoising.models, which
                # only pkg_resources (setuptools < 81) resolves: read them from the package topaz
                original = tm.load_state_dict_from_pkg
                tm.load_state_dict_from_pkg = lambda pkg, path, **kw: original("topaz", path.removeprefix("../"), **kw)
                try:
                    net = tm.load_model(model)
                finally:
                    tm.load_state_dict_from_pkg = original
        _MODELS[key] = net.eval().to(device)
    return _MODELS[key]


def topaz_denoise(images, model: str = DEFAULT_MODEL, device: str | torch.device = "auto",
                  batch_size: int = 32) -> np.ndarray:
    """Topaz-Denoise pretrained ``model`` per particle image, in the input's intensity units.

    ``images`` ``(n, d, d)`` or ``(d, d)``; ``model`` a name of :func:`pretrained_models`
    (default ``unet``, ``topaz denoise``'s default) or a topaz model file; ``device`` ``"auto"``
    (a GPU when there is one, as ``topaz denoise``), ``"cpu"`` or ``"cuda"``. Returns float32 of
    the input's shape. Raises ImportError, with how to install it, when topaz is missing.
    """
    reason = topaz_missing()
    if reason is not None:
        raise ImportError(reason)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    from cryoprior.classical.denoisers import _as_images, _out

    x, shape = _as_images(images)  # (n, d, d) float32
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    net = _load(model, dev)
    out = torch.empty_like(x)
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            chunk = x[start : start + batch_size].to(dev)  # (b, d, d)
            mu = chunk.mean(dim=(-2, -1), keepdim=True)
            sd = chunk.flatten(1).std(dim=1).reshape(-1, 1, 1)  # unbiased, as topaz's torch.std
            sd = torch.clamp(sd, min=torch.finfo(torch.float32).tiny)  # a constant image stays constant
            pred = net(((chunk - mu) / sd)[:, None])[:, 0]  # (b, d, d)
            out[start : start + batch_size] = (pred * sd + mu).cpu()
    return _out(out, shape)
