"""Describe a particle stack: count, box, pixel size, stacks, optics groups, truth labels and SNR.

Reads a RELION .star (3.0 or 3.1+) or an .mrcs stack. When the table carries the simulated truth
column cpCleanImageName, the measured SNR is reported: mean over images of var(clean) divided by
the mean over images of var(noisy - clean), computed streaming over up to --max-images
uncontaminated particles spread evenly through the stack.

example:
  cryoprior info data/particles.star
  cryoprior info sim/particles.star --json --max-images 500
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np

from cryoprior.config import add_config_args, config_from_args
from cryoprior.errors import InputError
from cryoprior.io import ParticleStack
from cryoprior.io.star import OpticsFlags
from cryoprior.sim.dataset import TRUTH_COLUMN, measured_snr

LABEL_COLUMNS = ("cpViewLabel", "cpConformationLabel", "cpContaminated")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "input", metavar="IN.star|IN.mrcs", help="particle STAR file or image stack"
    )
    add_config_args(parser.add_argument_group("optics the file lacks"), OpticsFlags)
    parser.add_argument("--json", action="store_true", help="print a JSON dict instead of text")
    parser.add_argument(
        "--max-images",
        type=int,
        default=2000,
        metavar="N",
        help="particles used to measure the SNR when the truth is present (default: 2000)",
    )


def main(args: argparse.Namespace) -> int:
    if args.max_images < 1:
        raise InputError(f"--max-images must be >= 1, got {args.max_images}")
    stack = ParticleStack.from_file(args.input, config_from_args(OpticsFlags, args))
    info = describe(stack, max_images=args.max_images)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(_as_text(info))
    return 0


def describe(stack: ParticleStack, max_images: int = 2000) -> dict[str, Any]:
    """A JSON-serialisable summary of ``stack``; measures the SNR when the truth is present."""
    optics = stack.optics
    info: dict[str, Any] = {
        "path": str(stack.path),
        "n_particles": len(stack),
        "box": stack.box,
        "pixel_size_a": stack.pixel_size_a,
        "n_stacks": len(stack.stack_paths),
        "n_optics_groups": 0 if optics is None else len(optics),
        "optics_groups": [],
    }
    if optics is not None and "rlnOpticsGroupName" in optics.columns:
        info["optics_groups"] = [str(name) for name in optics["rlnOpticsGroupName"]]
    if stack.has_column(TRUTH_COLUMN):
        info.update(measured_snr(stack, max_images))
    for column in LABEL_COLUMNS:
        if stack.has_column(column):
            values, counts = np.unique(stack.column(column), return_counts=True)
            info[column] = {str(v): int(c) for v, c in zip(values, counts, strict=True)}
    return info


def _as_text(info: dict[str, Any]) -> str:
    lines = [
        f"file             {info['path']}",
        f"particles        {info['n_particles']}",
        f"box              {info['box']} px",
        f"pixel size       {info['pixel_size_a']:g} Å",
        f"image stacks     {info['n_stacks']}",
        f"optics groups    {info['n_optics_groups'] or 'none (RELION 3.0 table or plain stack)'}"
        + (f" ({', '.join(info['optics_groups'])})" if info["optics_groups"] else ""),
    ]
    if info.get("snr") is not None:
        db = "" if info["snr_db"] is None else f" ({info['snr_db']:.2f} dB)"
        n = info["snr_n_images"]
        lines.append(f"measured SNR     {info['snr']:.4g}{db} over {n} uncontaminated images")
    for column in LABEL_COLUMNS:
        if column in info:
            counts = ", ".join(f"{k}: {v}" for k, v in info[column].items())
            lines.append(f"{column:<16} {counts}")
    return "\n".join(lines)
