"""Run the main job on the default data: simulate, measure, reconstruct (and more as it lands).

Writes a resumable run folder (config.yaml, run.log, stages.json, metrics.json, data/, maps).
Re-running the same command skips finished stages.

example:
  cryoprior demo --out cryoprior_demo
"""

from __future__ import annotations

import argparse
import sys

from cryoprior.config import add_config_args, config_from_args
from cryoprior.pipelines.demo import DemoConfig, run_demo, summary


def add_args(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser, DemoConfig)
    parser.add_argument("--out", default="cryoprior_demo", help="run folder (resumed if it exists)")


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(DemoConfig, args)
    metrics = run_demo(args.out, cfg, argv=sys.argv)
    print(summary(metrics))
    print(f"run folder: {args.out}")
    return 0
