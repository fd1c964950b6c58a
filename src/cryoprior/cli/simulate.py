"""Simulate a particle stack with known truth from atomic models or maps.

Writes OUT/particles.star (RELION 3.1 with truth columns), particles.mrcs, clean.mrcs,
snr_<L>.mrcs for each --snr-levels entry, volumes/*.mrc and dataset.json.

example:
  cryoprior simulate --structure 1ake 4ake --box 64 --pixel-size 2.0 --n 4000 --views 4 \\
      --snr 0.1 --snr-levels 0.1 0.4 0.6 inf --seed 0 --out sim/
  cryoprior simulate --structure model.cif --uniform --ctf --shift 4 --snr 0.05 --out sim_ctf/
  cryoprior simulate --structure 1ake --contamination B --epsilon 0.1 --out sim_huber/
"""

from __future__ import annotations

import argparse

from cryoprior.config import add_config_args, config_from_args
from cryoprior.fileutil import output_folder
from cryoprior.sim.dataset import SimulationConfig, simulate_dataset


def add_args(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser, SimulationConfig)
    parser.add_argument(
        "--uniform", action="store_true", help="orientations uniform on SO(3) instead of --views"
    )
    parser.add_argument("--out", required=True, help="output folder (must not exist)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def main(args: argparse.Namespace) -> int:
    config = config_from_args(SimulationConfig, args, views=None if args.uniform else args.views)
    config.validate()
    with output_folder(args.out, config.structures, args.overwrite):
        out = simulate_dataset(config, args.out, overwrite=args.overwrite)
    print(f"wrote {config.n} particles to {out}/particles.star")
    return 0
