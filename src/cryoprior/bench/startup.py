"""Start-up benchmark: how long the command line takes before it does any work.

RELION starts ``cryoprior relion-external`` twice per iteration, so its start-up is paid on every
M-step. Each command runs in a fresh process, ``repeats`` times; the figure is the median wall
time, next to the same for ``python -c "import torch"`` (the floor for any command that computes)
and for a bare ``python -c pass``.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from typing import Any

COMMANDS = {
    "python": [sys.executable, "-c", "pass"],
    "import torch (baseline)": [sys.executable, "-c", "import torch"],
    "cryoprior --version": [sys.executable, "-m", "cryoprior.cli.main", "--version"],
    "cryoprior --help": [sys.executable, "-m", "cryoprior.cli.main", "--help"],
    "cryoprior relion-external --help": [sys.executable, "-m", "cryoprior.cli.main", "relion-external", "--help"],
}


def _wall(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    return time.perf_counter() - t0


def run(repeats: int = 5, **_: Any) -> dict[str, Any]:
    """Median seconds per command, and each as a ratio to ``import torch`` in the same run."""
    seconds = {name: statistics.median(_wall(argv) for _ in range(repeats)) for name, argv in COMMANDS.items()}
    base = seconds["import torch (baseline)"]
    return {
        "repeats": repeats,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "ratio_to_import_torch": {k: round(v / base, 3) for k, v in seconds.items()},
    }
