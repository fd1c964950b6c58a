"""Reconstruct for RELION (``--external_reconstruct``) with a Gaussian, RED or CW-RED prior.

Reads RELION's <root>_external_reconstruct.star and its data/weight MRCs and writes the map
named by rlnExtReconsResult and, when the STAR names rlnExtReconsResultStarfile, the τ² table
RELION reads back from it (both atomically; half 1 and half 2 may run at the same time). RELION
passes no options, so each flag falls back to an environment variable: CRYOPRIOR_PRIOR
(gaussian|red|cw-red), CRYOPRIOR_DENOISER (model file; default the shipped one), CRYOPRIOR_TAU2
(auto|fsc|star), CRYOPRIOR_RED_LAMBDA, CRYOPRIOR_PIXEL_SIZE, CRYOPRIOR_DEVICE,
CRYOPRIOR_FULL_SET_FSC (relion|ssnr; default relion, RELION's sqrt(2f/(1+f))) and
CRYOPRIOR_MINRES_MAP (5). The pixel size is the STAR's rlnPixelSize, else --pixel-size, else
the run's newest <out>_it<NNN>[_half1]_model.star / <out>_it<NNN>_data.star; without one CW-RED
uses λ = 0 (never a failed exit: RELION would abort). A τ² table missing shells is an error.

example:
  export RELION_EXTERNAL_RECONSTRUCT_EXECUTABLE="cryoprior relion-external"
  export CRYOPRIOR_PRIOR=cw-red
  mpirun -n 3 relion_refine_mpi --auto_refine --split_random_halves ... --external_reconstruct
  cryoprior relion-external Refine3D/job010/run_it005_half1_class001_external_reconstruct.star --prior red
"""

from __future__ import annotations

import argparse

from cryoprior.config import add_config_args, config_from_args
from cryoprior.nn.training import resolve_device
from cryoprior.workflows.relion_external import RelionExternalConfig, run_external


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("star", help="<root>_external_reconstruct.star written by RELION")
    add_config_args(parser, RelionExternalConfig)


def main(args: argparse.Namespace) -> int:
    config = config_from_args(RelionExternalConfig, args)
    resolve_device(config.resolved().device)  # CRYOPRIOR_DEVICE=cuda without a GPU: one line, exit 2
    run_external(args.star, config)
    return 0
