"""One cell of ``bench cdae`` with Topaz-Denoise (docs/benchmarks.md, "Topaz-Denoise (optional extra)").

1H4A (held out from the shipped CDAE's training), 64 px at 1.25 Å: four views at SNR 0.1 and
0.05, and uniform orientations with a CTF (defocus 1–3 µm) at SNR 0.1 and 0.05, ``n`` images per
view (4 × n with the CTF), simulated as ``bench cdae`` does. Plain PSNR (dB) in the input's units
against the clean images of Topaz's pretrained models, NLM, Wiener, low-pass and the shipped generic
CDAE (phase-flipped in and flipped back with a CTF, as ``bench cdae``'s ``_evaluate``; the other
methods see the images as they are), then inference images/s of Topaz (unet) and NLM at 64² in
the same run. Run from the repository root::

    OMP_NUM_THREADS=1 PYTHONPATH=src python3 docs/scripts/topaz_cell.py --out topaz_cell.json
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cryoprior import classical
from cryoprior.bench.cdae import SETTINGS, VIEWS, _simulate
from cryoprior.core.ctf import phase_flip
from cryoprior.core.metrics import psnr
from cryoprior.io.relion import ctf_from_star
from cryoprior.nn.cdae_generic import load_shipped
from cryoprior.nn.cdae_ops import flipped_images
from cryoprior.nn.denoiser import denoise_images

CELLS = ("snr0.1", "snr0.05", "snr0.1-ctf", "snr0.05-ctf")
TOPAZ_MODELS = ("unet", "unet-small", "fcnn", "affine")


def images_per_second(fn, x: np.ndarray, repeats: int = 2) -> float:
    fn(x[:4])  # warm-up (and model load)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - t0)
    return round(len(x) / best, 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=150, help="images per view")
    parser.add_argument("--structure", default="1h4a")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--speed-n", type=int, default=128)
    parser.add_argument("--out", default="topaz_cell.json")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    shipped = load_shipped()
    result: dict = {"structure": args.structure, "n_per_view": args.n, "box": 64, "pixel_size_a": 1.25,
                    "psnr_db": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for i, cell in enumerate(CELLS):
            snr, inplane, ctf = SETTINGS[cell]
            stack = _simulate(args.structure, VIEWS * args.n, 64, snr, inplane, args.seed + 10 + i,
                              Path(tmp) / cell, ctf=ctf)
            noisy = stack.images()
            clean = torch.as_tensor(stack.read_image_column("cpCleanImageName"))
            flipped, has_ctf = flipped_images(stack)
            out = {"raw": noisy}
            cdae = denoise_images(shipped, flipped, 256, "cpu")
            if has_ctf:
                cdae = phase_flip(torch.from_numpy(cdae), ctf_from_star(stack, np.arange(len(stack)))).numpy()
            out["cdae-generic-shipped"] = cdae
            for name in ("nlm", "wiener", "lowpass"):
                out[name] = classical.denoise(noisy, name)
            for model in TOPAZ_MODELS:
                out[f"topaz-{model}"] = classical.denoise(noisy, "topaz", model=model)
            result["psnr_db"][cell] = {k: round(float(psnr(torch.as_tensor(v), clean).mean()), 2)
                                       for k, v in out.items()}
            print(cell, result["psnr_db"][cell], flush=True)
    x = torch.randn(args.speed_n, 64, 64).numpy()
    speed = {"topaz-unet": images_per_second(lambda y: classical.denoise(y, "topaz"), x),
             "nlm": images_per_second(lambda y: classical.denoise(y, "nlm"), x)}
    speed["topaz_over_nlm"] = round(speed["topaz-unet"] / speed["nlm"], 3)
    result["images_per_second_64px"] = speed
    result["torch_threads"] = torch.get_num_threads()
    print(speed)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
