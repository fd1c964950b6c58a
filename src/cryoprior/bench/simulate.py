"""``cryoprior bench simulate``: simulation throughput with CTF against the bare projection."""

from __future__ import annotations

import platform
import tempfile
import time
from pathlib import Path

import torch

from cryoprior.core.projection import project_fourier, volume_fourier
from cryoprior.core.rotations import random_rotations
from cryoprior.sim.dataset import SimulationConfig, simulate_dataset
from cryoprior.sim.structures import load_volume


def run(n: int = 10_000, box: int = 128, structure: str = "1ake", pixel_size_a: float = 1.5) -> dict:
    """Time ``simulate_dataset`` (uniform SO(3), CTF, shifts, SNR 0.1, written to disk) and, as the
    baseline in the same run, the Fourier-slice projection alone of the same number of images."""
    vol = load_volume(structure, box, pixel_size_a)
    vol_ft = volume_fourier(vol)
    rots = random_rotations(n, torch.Generator().manual_seed(0)).float()
    t0 = time.perf_counter()
    for start in range(0, n, 256):
        project_fourier(vol_ft, rots[start : start + 256], box)
    t_proj = time.perf_counter() - t0

    config = SimulationConfig(
        structures=[structure], box=box, pixel_size_a=pixel_size_a, n=n, views=None, snr=0.1,
        ctf=True, shift_a=3 * pixel_size_a, seed=0,
    )
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        simulate_dataset(config, Path(tmp) / "sim")
        t_sim = time.perf_counter() - t0
    return {
        "n": n,
        "box": box,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "simulate_seconds": round(t_sim, 3),
        "simulate_images_per_s": round(n / t_sim, 1),
        "baseline_projection_only_images_per_s": round(n / t_proj, 1),
        "ratio_simulate_over_projection": round(t_proj / t_sim, 3),
    }
