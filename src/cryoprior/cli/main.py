"""The one entry point: ``cryoprior <command> [args]``.

Each command is a module in ``cryoprior.cli`` exposing ``add_args(parser)`` and ``main(args)``;
its docstring becomes the ``--help`` text. Logging is configured here and nowhere else.
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
    "classify": "classify",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cryoprior", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"cryoprior {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"cryoprior.cli.{module_name}")
        doc = (module.__doc__ or "").strip()
        p = sub.add_parser(
            name,
            help=doc.splitlines()[0] if doc else None,
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_args(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
    except CryopriorError as exc:
        print(f"cryoprior {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cryoprior {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        root.removeHandler(console)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
