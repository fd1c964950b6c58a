"""Write a self-contained HTML report (figures embedded) for a run folder.

Reads what the folder holds (config.yaml, stages.json, metrics.json files, simulated data,
denoised stacks, class averages, maps) and shows a section per result, so a partial run gets a
partial report. The figures are also saved as PNG files in RUN_DIR/figures/.

example:
  cryoprior report cryoprior_demo            # writes cryoprior_demo/report.html
  cryoprior report cryoprior_demo --out /tmp/demo_report.html
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cryoprior.errors import InputError
from cryoprior.report.build import build_report


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run folder (e.g. the one `cryoprior demo` wrote)")
    parser.add_argument("--out", default=None, help="HTML file to write (default: RUN_DIR/report.html)")
    parser.add_argument("--no-figure-files", action="store_true",
                        help="do not also save the figures as PNG files in RUN_DIR/figures/")


def main(args: argparse.Namespace) -> int:
    if not Path(args.run_dir).is_dir():
        raise InputError("not a folder", args.run_dir)
    out = build_report(args.run_dir, args.out, save_figures=not args.no_figure_files)
    print(f"wrote {out}")
    return 0
