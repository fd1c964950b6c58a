"""Typed dataclass configs ↔ command-line flags ↔ YAML run records.

Each method has one dataclass config; its command's flags are built from the fields (name →
``--name-with-dashes``; ``field(metadata={"flag": ..., "help": ..., "choices": ...})`` refines
them), so defaults live in one place. ``write_run_config`` saves the config beside the outputs
with the package version, the time and argv.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from cryoprior import __version__
from cryoprior.errors import InputError
from cryoprior.fileutil import atomic_path


def _unwrap(tp) -> tuple[Any, bool]:
    """(inner type, optional?) for ``X | None`` / ``Optional[X]``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def add_config_args(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per field of dataclass ``cls`` (except ``skip``)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get("cli") is False:
            continue
        tp, _ = _unwrap(hints[f.name])
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else f.default_factory()  # type: ignore[misc]
        )
        kw: dict[str, Any] = {"dest": f.name, "help": f.metadata.get("help", "")}
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
            kw["default"] = default
        elif typing.get_origin(tp) is list:
            kw.update(nargs=f.metadata.get("nargs", "+"), type=typing.get_args(tp)[0], default=default)
        else:
            kw.update(type=tp, default=default)
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
            if "metavar" in f.metadata:
                kw["metavar"] = f.metadata["metavar"]
        if kw.get("help") is not None and "action" not in kw:
            kw["help"] = f"{kw['help']} (default: {default})".strip()
        parser.add_argument(flag, **kw)


def config_from_args(cls, args: argparse.Namespace, validate: bool = True, **overrides):
    """Build a ``cls`` instance from parsed flags (fields absent from ``args`` keep defaults).

    With ``validate`` (the default), the instance's ``validate()`` runs at once, before any work;
    a ``ValueError`` it raises becomes an :class:`InputError` (one line on the command line, exit 2).
    """
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in overrides:
            values[f.name] = overrides[f.name]
        elif hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    config = cls(**values)
    if validate and callable(getattr(config, "validate", None)):
        validated(config)
    return config


def validated(config):
    """``config.validate()``, its ``ValueError`` turned into an ``InputError``; returns ``config``."""
    try:
        config.validate()
    except InputError:
        raise
    except ValueError as exc:
        raise InputError(f"invalid option: {exc}") from exc
    return config


def config_to_dict(config) -> dict:
    def clean(v):
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, float) and v == float("inf"):
            return "inf"
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return v

    return {k: clean(v) for k, v in dataclasses.asdict(config).items()}


def write_run_config(path: str | Path, config=None, argv: list[str] | None = None, **extra) -> None:
    """Write ``config.yaml``: package version, UTC time, argv, the config's fields, extras."""
    record = {
        "cryoprior_version": __version__,
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": list(sys.argv if argv is None else argv),
    }
    if config is not None:
        record["config_type"] = type(config).__name__
        record["config"] = config_to_dict(config)
    record.update(extra)
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(record, sort_keys=False))


def read_run_config(path: str | Path) -> dict:
    return yaml.safe_load(Path(path).read_text())
