"""Train the learned 3D prior (a residual 3D U-Net) for RED reconstruction.

Builds noisy intermediate maps of many structures (cached in OUT/pairs, reused on a rerun),
trains with Adam (checkpoint each epoch, resumes), and validates on held-out structures: the
FSC-to-truth resolution of the noisy input vs of the denoised output (OUT/validation.json).
Load the result with ``cryoprior.nn.prior3d.load_denoiser(OUT)``; set its CW-RED thresholds with
``cryoprior calibrate-cw-red --model OUT``.

example:
  cryoprior train-prior3d --out prior3d_run --box 32 --epochs 20
  cryoprior train-prior3d --out prior3d_gauss --noise-model gaussian --structures 1bd2 3o21
"""

from __future__ import annotations

import argparse
import sys

from cryoprior.config import add_config_args, config_from_args
from cryoprior.nn.prior3d import Prior3DConfig
from cryoprior.workflows.train_prior3d import run_train_prior3d


def add_args(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser, Prior3DConfig)
    parser.add_argument("--out", required=True, help="run folder (created; a rerun resumes)")


def main(args: argparse.Namespace) -> int:
    config = config_from_args(Prior3DConfig, args)
    result = run_train_prior3d(config, args.out, argv=sys.argv)
    mean = result["mean"]
    print(
        f"wrote {args.out}/model.pt; held-out FSC 0.5 resolution "
        f"{mean['input']['resolution_0.5_a']:.2f} Å → {mean['output']['resolution_0.5_a']:.2f} Å, "
        f"mean FSC {mean['input']['mean_fsc']:.3f} → {mean['output']['mean_fsc']:.3f}"
    )
    return 0
