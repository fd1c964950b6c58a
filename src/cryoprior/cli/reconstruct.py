"""Gold-standard 3D reconstruction with a Gaussian, RED or CW-RED prior (Kimanius et al. 2020).

Known poses come from the STAR (rlnAngleRot/Tilt/Psi, rlnOriginX/YAngst) unless --refine,
which searches them from --start MAP (or --truth low-passed to --start-lowpass-a Å). Half sets
from rlnRandomSubset. Writes OUT/map.mrc, half1.mrc, half2.mrc, fsc.json (half-map FSC, FSC
to --truth, resolutions at 0.143 and 0.5, angular errors of --refine on simulated data) and
config.yaml.

example:
  cryoprior simulate --structure 1ake --uniform --n 4000 --box 64 --snr 0.05 --out sim/
  cryoprior reconstruct sim/particles.star --prior cw-red --truth sim/volumes/1ake.mrc --out rec/
  cryoprior reconstruct sim/particles.star --prior red --refine --truth sim/volumes/1ake.mrc \\
      --iterations 4 --out rec_refine/
"""

from __future__ import annotations

import argparse
import sys

from cryoprior.config import add_config_args, config_from_args
from cryoprior.io.star import OpticsFlags
from cryoprior.recon.mstep import ReconstructionConfig
from cryoprior.recon.refine import RefineConfig
from cryoprior.workflows.reconstruct import ReconstructJob, run_reconstruct


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("star", help="particle STAR file (RELION 3.0 or 3.1+)")
    add_config_args(parser, ReconstructionConfig)
    add_config_args(parser, ReconstructJob)
    add_config_args(parser.add_argument_group("optics the STAR lacks"), OpticsFlags)
    group = parser.add_argument_group("refinement (with --refine)")
    add_config_args(group, RefineConfig)
    parser.add_argument("--out", required=True, help="output folder (must not exist)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def main(args: argparse.Namespace) -> int:
    report = run_reconstruct(
        args.star, args.out, config_from_args(ReconstructJob, args), config_from_args(ReconstructionConfig, args),
        config_from_args(RefineConfig, args), argv=sys.argv, overwrite=args.overwrite,
        optics=config_from_args(OpticsFlags, args),
    )
    line = f"half-map resolution {report['resolution_half_0143_a']:.2f} Å (FSC 0.143)"
    if "resolution_truth_05_a" in report:
        line += f", to truth {report['resolution_truth_05_a']:.2f} Å (FSC 0.5)"
    print(f"wrote {args.out}/map.mrc: {line}")
    return 0
