"""Errors raised at the project's boundaries: one line naming the file and the problem."""

from __future__ import annotations

from pathlib import Path


class CryopriorError(Exception):
    """Base class: the CLI prints the message on one line and exits non-zero."""


class InputError(CryopriorError, ValueError):
    """Bad input file or argument. ``path`` is the file at fault, when there is one."""

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = None if path is None else Path(path)
        super().__init__(f"{path}: {message}" if path is not None else message)


class OutputExistsError(CryopriorError, FileExistsError):
    """An output path already exists and overwriting was not asked for."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        super().__init__(f"{path}: output already exists (remove it or choose another --out)")


class NonFiniteError(CryopriorError, ValueError):
    """NaN or Inf where a number is needed (a map, an FSC curve): never read as zero."""


class TrainingDivergedError(CryopriorError, RuntimeError):
    """Training produced NaN/Inf; the last good checkpoint is kept."""
