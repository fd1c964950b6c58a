"""Calibrate CW-RED's λ thresholds (λ = 0 / λ = 1 resolutions) for a trained 3D prior.

For each of --maps procedural pseudo-proteins (never used for training or benchmarks), simulates
a data set as the prior's training maps are (wider particle/SNR ranges: half-map resolutions from
~25 Å to Nyquist), also band-limited as RELION's M-step input, runs the RED M-step on a λ grid and
takes the λ with the best FSC to the truth; then fits the ramp (low_a, high_a) to those λ against
the half-map resolution. Writes them into MODEL/model.json ("cw_red", atomically), where
`cryoprior reconstruct` and `relion-external` read them when --cw-low-a/--cw-high-a are not set.

example:
  cryoprior calibrate-cw-red --model prior3d_run                # after cryoprior train-prior3d
  cryoprior calibrate-cw-red --model src/cryoprior/data/prior3d  # the shipped model (a checkout)
"""

from __future__ import annotations

import argparse
import sys

from cryoprior.config import add_config_args, config_from_args
from cryoprior.workflows.calibrate_cw_red import (
    CWRedCalibrationConfig,
    markdown_table,
    run_calibration,
)


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model folder (model.pt + model.json) or model.pt")
    add_config_args(parser, CWRedCalibrationConfig)
    parser.add_argument("--table", action="store_true", help="print the per-map table (Markdown)")


def main(args: argparse.Namespace) -> int:
    config = config_from_args(CWRedCalibrationConfig, args)
    record = run_calibration(args.model, config, argv=["cryoprior", *sys.argv[1:]])
    cal = record["calibration"]
    if args.table:
        print(markdown_table(record))
    mean = cal["mean_objective"]
    print(
        f"wrote cw_red to {args.model}: λ = 0 at {record['low_a']:g} Å or worse, 1 at {record['high_a']:g} Å "
        f"or better (input resolutions {cal['input_res_range_a'][0]:g}-{cal['input_res_range_a'][1]:g} Å; "
        f"mean {cal['metric']}: λ=0 {mean['lambda_0']:.4f}, λ=1 {mean['lambda_1']:.4f}, "
        f"10/4.5 Å {mean['paper_10_4.5']:.4f}, fitted {mean['fitted']:.4f})"
    )
    return 0
