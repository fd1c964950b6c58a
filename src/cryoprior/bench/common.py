"""Helpers shared by the benchmarks: held-out structures, their simulated stacks and truth maps,
and map scores against the truth (FSC resolutions, alignment of hand/sign/shift)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from cryoprior.core.filters import soft_sphere_mask
from cryoprior.core.fsc import fsc, resolution_at
from cryoprior.fileutil import atomic_path
from cryoprior.io.mrc import read_map
from cryoprior.sim.dataset import SimulationConfig, simulate_dataset
from cryoprior.sim.structures import list_builtin_structures, max_radius_a, resolve_structure

FALLBACK_STRUCTURES = ("1ake", "4ake", "2a2l", "3mht")


def pick_structures(k: int = 4) -> tuple[list[str], str]:
    """``k`` builtins outside the denoiser's training set (smallest first), and where that set came from."""
    try:
        from cryoprior.nn.prior3d import training_structures

        held_out = [s for s in list_builtin_structures() if s not in set(training_structures())]
        source = "cryoprior.nn.prior3d.training_structures()"
    except ImportError:
        return list(FALLBACK_STRUCTURES[:k]), "prior3d unavailable: fixed fallback list"
    held_out.sort(key=lambda s: max_radius_a(resolve_structure(s)))
    return held_out[:k], source


def simulate_heldout(tmp: Path, structure: str, box: int, pixel: float, n: int, snr: float, seed: int) -> Path:
    cfg = SimulationConfig(
        structures=[structure], box=box, pixel_size_a=pixel, n=n, views=None, snr=snr, ctf=True,
        shift_a=2 * pixel, seed=seed,
    )
    return simulate_dataset(cfg, tmp / f"{structure}_snr{snr:g}")


def map_scores(volume: torch.Tensor, truth: torch.Tensor, pixel: float, fsc_half: torch.Tensor | None = None) -> dict:
    """Resolutions (Å) of ``volume``'s FSC to ``truth`` at 0.5 and 0.143, unmasked and with one
    soft sphere on both (radius 0.4·box, the molecule's bound in ``recommended_pixel_size_a``,
    0.05·box cosine edge: blind to how a program apodises the empty box), and of its half-map
    FSC ``fsc_half`` ``(box // 2 + 1,)`` at 0.143 when given."""
    box = truth.shape[-1]
    mask = soft_sphere_mask(box, 0.4 * box, 0.05 * box, ndim=3, dtype=truth.dtype)
    out = {}
    for tag, m in (("", 1.0), ("masked_", mask)):
        curve = fsc(volume * m, truth * m, ndim=3)
        out[f"res_truth_{tag}05_a"] = round(resolution_at(curve, box, pixel, 0.5), 2)
        out[f"res_truth_{tag}0143_a"] = round(resolution_at(curve, box, pixel, 0.143), 2)
    if fsc_half is not None:
        out["res_half_0143_a"] = round(resolution_at(fsc_half, box, pixel), 2)
    return out


def align_to_truth(volume: torch.Tensor, truth: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The copy of ``volume`` ``(d, d, d)`` that correlates best with ``truth``: sign ±1, hand
    as is or mirrored (z → −z), then the circular integer shift that maximises the
    cross-correlation. Returns it and ``{"sign", "hand_flip", "shift_px" (z, y, x)}``; a map in
    our conventions comes back as is (1, False, [0, 0, 0]). FSC is blind to scale, not to these."""
    if volume.shape != truth.shape or volume.ndim != 3:
        raise ValueError(f"need two (d, d, d) maps, got {tuple(volume.shape)} and {tuple(truth.shape)}")
    t = (truth - truth.mean()).double()
    t_ft = torch.fft.fftn(t)
    best_cc, best = -float("inf"), (False, 1, [0, 0, 0])
    for flip in (False, True):
        v = (volume - volume.mean()).double()
        v = torch.flip(v, (0,)) if flip else v
        # cc[s] = Σ_x t(x) v(x − s) / (|t| |v|): torch.roll(v, s) lines v up with t
        cc = torch.fft.ifftn(t_ft * torch.fft.fftn(v).conj()).real / (t.norm() * v.norm())  # (d, d, d)
        for sign in (1, -1):
            k = int(torch.argmax(sign * cc))
            if sign * float(cc.flatten()[k]) > best_cc:
                idx = np.unravel_index(k, tuple(cc.shape))
                shift = [int(i) if i <= n // 2 else int(i) - n for i, n in zip(idx, cc.shape)]
                best_cc, best = sign * float(cc.flatten()[k]), (flip, sign, shift)
    flip, sign, shift = best
    out = torch.roll(torch.flip(volume, (0,)) if flip else volume, shift, (0, 1, 2)) * sign
    return out, {"sign": sign, "hand_flip": flip, "shift_px": shift, "correlation": round(best_cc, 4)}


def read_truth(folder: Path) -> tuple[torch.Tensor, float]:
    vol, pixel = read_map(next((folder / "volumes").glob("*.mrc")))
    return torch.from_numpy(vol), pixel


def write_result(out_dir: str | Path | None, name: str, result: dict) -> None:
    """Write ``out_dir/<name>.json`` (the whole result) and ``out_dir/<name>.md`` (its
    ``"markdown"``), each atomically; nothing when ``out_dir`` is None."""
    if out_dir is None:
        return
    out = Path(out_dir)
    with atomic_path(out / f"{name}.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    with atomic_path(out / f"{name}.md") as tmp:
        tmp.write_text(result["markdown"] + "\n")
