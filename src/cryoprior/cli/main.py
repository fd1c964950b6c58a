"""The one entry point: ``cryoprior <command> [args]``.

Each command is a module in ``cryoprior.cli`` exposing ``add_args(parser)`` and ``main(args)``;
its docstring becomes the ``--help`` text. Only the module of the command being run is imported
(``cryoprior --help`` imports no command, so no torch): RELION calls ``relion-external`` once
per half and iteration and should not pay for the others. Logging is configured here only.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from cryoprior import __version__, progress
from cryoprior.errors import CryopriorError

# command name -> module under cryoprior.cli
COMMANDS: dict[str, str] = {
    "simulate": "simulate",
    "info": "info",
    "demo": "demo",
    "bench": "bench",
    "denoise": "denoise",
    "reconstruct": "reconstruct",
    "relion-external": "relion_external",
    "report": "report",
    "train-prior3d": "train_prior3d",
    "calibrate-cw-red": "calibrate_cw_red",
    "classify": "classify",
}


#: each command's one-line help for ``cryoprior --help``: its module docstring's first line
#: (tests/test_cli_startup.py keeps the two equal)
SUMMARIES: dict[str, str] = {
    "simulate": "Simulate a particle stack with known truth from atomic models or maps.",
    "info": "Describe a particle stack: count, box, pixel size, stacks, optics groups, truth labels and SNR.",
    "demo": "Run the main job on the default data: simulate, denoise, classify, reconstruct, report.",
    "bench": "Benchmarks (JSON out): speed and memory figures as ratios against a baseline in the same run.",
    "denoise": "Train a particle-image denoiser (CDAE, single DAE, DnCNN, robust GAN, DRVAE) or apply a trained one.",
    "reconstruct": "Gold-standard 3D reconstruction with a Gaussian, RED or CW-RED prior (Kimanius et al. 2020).",
    "relion-external": "Reconstruct for RELION (``--external_reconstruct``) with a Gaussian, RED or CW-RED prior.",
    "report": "Write a self-contained HTML report (figures embedded) for a run folder.",
    "train-prior3d": "Train the learned 3D prior (a residual 3D U-Net) for RED reconstruction.",
    "calibrate-cw-red": "Calibrate CW-RED's λ thresholds (λ = 0 / λ = 1 resolutions) for a trained 3D prior.",
    "classify": "Classify particle images into K classes without references (2D, unsupervised).",
}


#: errors the user can act on: one line, exit 2 (anything else is a bug and keeps its traceback).
#: Beyond the package's own errors: the file system refusing (permissions, a file where a folder
#: is needed, a full disk) and memory running out.
EXPECTED = (CryopriorError, PermissionError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
            FileExistsError, MemoryError)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, MemoryError):
        return f"out of memory ({text})"
    if isinstance(exc, OSError) and not isinstance(exc, CryopriorError):
        return f"{exc.strerror or type(exc).__name__}: {exc.filename}" if exc.filename else text
    return text


def _selected(argv: list[str]) -> str | None:
    """The command named on the command line (the first word that is one), if any."""
    return next((a for a in argv if a in COMMANDS), None)


def build_parser(command: str | None = None, *, all_commands: bool = False) -> argparse.ArgumentParser:
    """The parser; the arguments of ``command`` (or of every command with ``all_commands``)."""
    parser = argparse.ArgumentParser(prog="cryoprior", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"cryoprior {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module_name in COMMANDS.items():
        if not (all_commands or name == command):
            sub.add_parser(name, help=SUMMARIES.get(name), add_help=False)
            continue
        module = importlib.import_module(f"cryoprior.cli.{module_name}")
        doc = (module.__doc__ or "").strip()
        p = sub.add_parser(
            name,
            help=SUMMARIES.get(name) or (doc.splitlines()[0] if doc else None),
            description=getattr(module, "HELP", doc).strip(),  # a longer --help text where a module has one
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_args(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_selected(argv))
    args = parser.parse_args(argv)
    # the console shows INFO (WARNING with --quiet); run-folder log files still get INFO records
    console = logging.StreamHandler()
    console.setLevel(logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO)
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(console)
    root.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    progress.set_enabled(not args.quiet)
    try:
        rc = args._module.main(args)
    except EXPECTED as exc:
        if args.verbose:
            logging.getLogger(__name__).debug("traceback", exc_info=True)
        print(f"cryoprior {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cryoprior {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        root.removeHandler(console)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
