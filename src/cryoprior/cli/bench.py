"""Benchmarks (JSON out): speed and memory figures as ratios against a baseline in the same run.

The command's --help text is :data:`HELP` (the module docstring's first line is its summary).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from cryoprior.errors import InputError
from cryoprior.fileutil import atomic_path

# bench name -> (module under cryoprior.bench, default kwargs, quick kwargs)
BENCHES: dict[str, tuple[str, dict, dict]] = {
    "startup": ("startup", {"repeats": 5}, {"repeats": 3}),
    "io": ("io", {"n": 100_000, "box": 128}, {"n": 10_000, "box": 128}),
    "simulate": ("simulate", {"n": 10_000, "box": 128}, {"n": 1_000, "box": 128}),
    # red: --n/--box override the particles per dataset and the box; figures go to out_dir
    "red": ("red", {"quick": False, "out_dir": "bench_red"}, {"quick": True, "out_dir": "bench_red_quick"}),
    # relion: --n/--box override the particles per stack and the box; tables go to out_dir
    "relion": ("relion", {"quick": False, "out_dir": "bench_relion"}, {"quick": True, "out_dir": "bench_relion_quick"}),
    # cdae: --n = test images per view; tables (bench_cdae.md/.json) go to out_dir
    "cdae": ("cdae", {"n": 1000, "box": 64, "quick": False, "out_dir": "bench_cdae"},
             {"n": 150, "box": 64, "quick": True, "out_dir": "bench_cdae_quick"}),
    # gan: --n = training pairs, --box the image size; tables (bench_gan.md/.json) go to out_dir
    "gan": ("gan", {"quick": False, "out_dir": "bench_gan"}, {"quick": True, "out_dir": "bench_gan_quick"}),
    # drvae: --n = particles per stack; tables (bench_drvae.md/.json) go to out_dir
    "drvae": ("drvae", {"n": 2000, "box": 64, "quick": False, "out_dir": "bench_drvae"},
              {"n": 400, "box": 64, "quick": True, "out_dir": "bench_drvae_quick"}),
}
MODEL_BENCHES = ("red", "relion")  # the ones that take a trained 3D prior (--model)


HELP = """Benchmarks (JSON out): speed and memory figures as ratios against a baseline in the same run.

  startup   seconds from process start to the end of `cryoprior --help`, `cryoprior
            relion-external --help` and `cryoprior --version`, against `python -c "import torch"`
  io        stream a particle stack through ParticleStack.chunks (images/s, peak RSS) against a
            plain mrcfile memory map read
  simulate  simulate particles with CTF (images/s) against the projection alone
  cdae      the CDAE paper's protocol: PSNR and clustering F1 for every denoiser and clustering
            method against the oracle, over SNR 0.1/0.05/0.01 and in-plane rotations
  red       Gaussian vs RED vs CW-RED reconstruction: FSC-to-truth and half-map resolutions, and
            known-pose timing (10,000 64² particles; 2,000 with --quick) against
            core.projection.reconstruct and cryoDRGN's backproject_voxel when the cryodrgn
            command is installed (pip install cryodrgn; optional, GPL-3)
  gan       the robust-GAN paper's experiments on a five-conformation adenylate kinase set:
            MSE/PSNR/SSIM of NLM, low-pass, Wiener, l2/l1-AE and four GANs at SNR 0.1/0.05,
            Huber contamination, Isomap + k-means of the conformations, inference speed
  relion    RELION 3.1 auto-refine with its own M-step vs --external_reconstruct with
            cryoprior relion-external (gaussian, red, cw-red) on held-out simulated stacks:
            reported and true resolution, iterations, wall time; and cryoprior reconstruct vs
            relion_reconstruct at known poses (needs relion_refine_mpi, mpirun)
  drvae     DRVAE + BSK-means++ against low-pass/PCA k-means, align-kmeans, BSK on raw images,
            RELION Class2D (when relion_refine is on the PATH) and the oracle: F1, accuracy, NMI,
            class-size ratio, time, over views / in-plane+shift / CTF / conformation settings

example:
  cryoprior bench startup
  cryoprior bench io --n 100000 --box 128 --out bench_io.json
  cryoprior bench simulate --n 10000 --box 128 --out bench_sim.json
  cryoprior bench cdae --quick --out bench_cdae.json
  cryoprior bench red --quick --out bench_red.json
  cryoprior bench gan --quick --out bench_gan.json
  cryoprior bench relion --quick --out bench_relion.json
  cryoprior bench drvae --quick --out bench_drvae.json
"""


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("which", choices=sorted(BENCHES), help="which benchmark")
    parser.add_argument("--n", type=int, default=None, help="number of particles")
    parser.add_argument("--box", type=int, default=None, help="image size")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--model", default=None, help="red, relion: a trained 3D prior's folder "
                        "(cryoprior train-prior3d --out); default: the shipped model")
    parser.add_argument("--out", default=None, help="write the JSON here (default: stdout only); benchmarks "
                        "with tables or figures write them to a folder next to it (default: ./bench_NAME[_quick])")


def main(args: argparse.Namespace) -> int:
    for flag, value, least in (("--n", args.n, 1), ("--box", args.box, 8)):
        if value is not None and value < least:
            raise InputError(f"{flag} must be >= {least}, got {value}")
    module_name, full, quick = BENCHES[args.which]
    kwargs = dict(quick if args.quick else full)
    if args.n is not None:
        kwargs["n"] = args.n
    if args.box is not None:
        kwargs["box"] = args.box
    if args.model is not None:
        if args.which not in MODEL_BENCHES:
            raise InputError(f"--model applies to bench {' and '.join(MODEL_BENCHES)}, not {args.which}")
        if not Path(args.model).exists():
            raise InputError(f"--model {args.model}: no such folder or file")
        kwargs["model"] = args.model
    if args.out and "out_dir" in kwargs:  # tables and figures next to the JSON, not in the working folder
        kwargs["out_dir"] = str(Path(args.out).parent / kwargs["out_dir"])
    module = importlib.import_module(f"cryoprior.bench.{module_name}")
    result = {"bench": args.which, **module.run(**kwargs)}
    text = json.dumps(result, indent=2)
    if args.out:
        with atomic_path(Path(args.out)) as tmp:
            tmp.write_text(text + "\n")
    sys.stdout.write(text + "\n")
    return 0
