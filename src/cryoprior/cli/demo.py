"""Run the main job on the default data: simulate, denoise, classify, reconstruct, report.

On adenylate kinase (PDB 1AKE), simulated at SNR 0.1: denoise with CDAE and the classical
baselines (non-local means, low-pass), classify into the four true views (k-means on the raw
images and on each denoiser's output, and the oracle), reconstruct at known poses with the
Gaussian prior and with RED (the shipped 3D denoiser), denoise held-out particles of the
uniform CTF stack (the robust GAN and the l1-AE trained from the Gaussian-prior map and the
training particles' poses, against CDAE and the classical filters), and write OUT/report.html. About 5
minutes on a 2-core CPU, most of it CDAE training; a GPU is used when present (--device auto).

The run folder is resumable: config.yaml, run.log, stages.json, metrics.json, data/, one folder
per stage (config.yaml, checkpoints, metrics.json, outputs), logs/<stage>.log, figures/ and
report.html. Running the same command again skips finished stages; a different configuration
needs another --out.

example:
  cryoprior demo
  cryoprior demo --out small_demo --box 32 --pixel-size 3.5 --n-views 500 --n-uniform 500
  cryoprior report cryoprior_demo     # the report again, e.g. after an interrupted run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cryoprior.config import add_config_args, config_from_args
from cryoprior.workflows.demo import DemoConfig, run_demo, summary


def add_args(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser, DemoConfig)
    parser.add_argument("--out", default="cryoprior_demo", help="run folder (resumed if it exists)")
    parser.add_argument("--no-report", action="store_true", help="do not write report.html at the end")


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(DemoConfig, args)
    metrics = run_demo(args.out, cfg, argv=sys.argv, report=not args.no_report)
    print(summary(metrics))
    print(f"run folder: {args.out}")
    if not args.no_report:
        print(f"report: {Path(args.out) / 'report.html'}")
    return 0
