"""Atomic writes (a temporary path beside the target, then rename), safe output folders and
run-folder locks.

- :func:`atomic_path` / :func:`atomic_dir`: all of an output or nothing. ``atomic_dir`` records
  what it wrote in ``.cryoprior-files``; with ``overwrite`` it replaces only those entries of an
  existing folder, never anything it did not write.
- :func:`check_out_dir`: refuse an ``--out`` that is a file, unwritable, or that is, contains or
  lies inside an input (the input would be deleted or mixed with outputs).
- :func:`run_lock`: one run at a time per output folder (``.<name>.lock`` beside it: pid, host,
  command); a lock left by a dead process on this host is taken over with a warning.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from cryoprior.errors import InputError, OutputExistsError

log = logging.getLogger(__name__)

#: the list of top-level entries an ``atomic_dir`` wrote (what ``overwrite`` may replace)
MANIFEST = ".cryoprior-files"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary file path; on success rename it to ``path``, on error delete it.

    >>> with atomic_path("out.mrcs") as tmp:   # doctest: +SKIP
    ...     write_something(tmp)
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    tmp_path.chmod(0o666 & ~_umask())
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _manifest(path: Path) -> set[str] | None:
    """Entries listed in ``path``'s manifest; None when ``path`` has none (not ours)."""
    listing = path / MANIFEST
    if not listing.is_file():
        return None
    return {line for line in listing.read_text().splitlines() if line}


def foreign_entries(path: str | Path, allowed: Iterable[str] = ()) -> list[str]:
    """Entries of folder ``path`` that an ``atomic_dir`` did not write (nor named in ``allowed``)."""
    path = Path(path)
    if not path.is_dir():
        return []
    ours = (_manifest(path) or set()) | {MANIFEST, *allowed}
    return sorted(p.name for p in path.iterdir() if p.name not in ours)


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success rename it to ``path``; on error remove it.

    An existing ``path`` is an error unless ``overwrite``; then the entries the earlier run wrote
    (its ``.cryoprior-files``) are replaced by the new ones, and a folder holding anything else
    is refused (``InputError``) rather than deleted.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(path)
    if path.exists():
        _check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())
    try:
        yield tmp
        written = sorted(p.name for p in tmp.iterdir() if p.name != MANIFEST)
        (tmp / MANIFEST).write_text("".join(f"{name}\n" for name in written))
        if not path.exists():
            os.replace(tmp, path)
        else:
            _swap_into(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _check_replaceable(path: Path) -> None:
    if not path.is_dir():
        raise InputError("--out exists and is not a folder", path)
    foreign = foreign_entries(path)
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise InputError(
            f"--overwrite replaces only what cryoprior wrote there, and this folder holds other "
            f"files ({shown}); choose another --out", path,
        )


def _swap_into(tmp: Path, path: Path) -> None:
    """Replace the entries ``path``'s manifest lists by ``tmp``'s (then remove ``tmp``)."""
    _check_replaceable(path)
    old = (_manifest(path) or set()) | {MANIFEST}
    trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
    try:
        for name in old:
            if (path / name).exists() or (path / name).is_symlink():
                os.replace(path / name, trash / name)
        for entry in tmp.iterdir():
            os.replace(entry, path / entry.name)
    finally:
        shutil.rmtree(trash, ignore_errors=True)


# ------------------------------------------------------------------------------ output folders
def _resolved(p: str | Path) -> Path:
    return Path(p).expanduser().resolve(strict=False)


def check_out_dir(out: str | Path, inputs: Iterable[str | Path | None] = (), what: str = "--out") -> Path:
    """Check an output folder before any work; returns it resolved.

    ``InputError`` when ``out`` is an existing file, its nearest existing parent is not a
    writable folder, or it is, contains or lies inside one of ``inputs`` (files or folders:
    the input stacks, models, maps; symbolic links resolved). ``None`` and missing inputs are
    skipped.
    """
    raw = Path(out)
    target = _resolved(raw)
    if target.exists() and not target.is_dir():
        raise InputError(f"{what} is an existing file, not a folder", raw)
    for item in inputs:
        if item is None or not Path(item).expanduser().exists():
            continue
        src = _resolved(item)
        if target == src:
            raise InputError(f"{what} is the input {item}; choose another folder", raw)
        if target in src.parents:
            raise InputError(f"{what} contains the input {item}; choose another folder", raw)
        if src in target.parents:
            raise InputError(f"{what} lies inside the input {item}; choose another folder", raw)
    parent = target if target.exists() else target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{what} cannot be created: {parent} is a file", raw)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{what} cannot be written: no write permission in {parent}", raw)
    return target


def lock_path(out: str | Path) -> Path:
    """The lock file of output folder ``out``: ``.<name>.lock`` beside it."""
    target = _resolved(out)
    return target.parent / f".{target.name}.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def run_lock(out: str | Path, command: list[str] | None = None) -> Iterator[Path]:
    """Hold the lock of output folder ``out`` for the block (``InputError`` naming the holder
    when another live process holds it). A lock whose process died on this host is taken over."""
    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
          "command": " ".join(command if command is not None else sys.argv)}
    for attempt in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _read_lock(path)
            stale = holder.get("host") == me["host"] and not _pid_alive(int(holder.get("pid", -1)))
            if attempt == 0 and (stale or not holder):
                log.warning("%s: taking over the lock of a run that is gone (%s)", out, _describe(holder))
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            raise InputError(f"in use by another cryoprior run ({_describe(holder)}); wait for it "
                             f"or remove {path} if that run is gone", out) from None
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        break
    try:
        yield path
    finally:
        if _read_lock(path).get("pid") == me["pid"]:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _read_lock(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "unreadable lock"
    return f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('time')}: {holder.get('command')}"


@contextlib.contextmanager
def output_folder(
    out: str | Path, inputs: Iterable[str | Path | None] = (), overwrite: bool = False,
    command: list[str] | None = None,
) -> Iterator[Path]:
    """:func:`check_out_dir` + :func:`run_lock`, and the existence check under the lock: the
    block runs with ``out`` locked; an existing ``out`` is an error unless ``overwrite`` (and
    then only a folder cryoprior wrote may be replaced)."""
    check_out_dir(out, inputs)
    with run_lock(out, command) as lock:
        path = Path(out)
        if path.exists():
            if not overwrite:
                raise OutputExistsError(path)
            _check_replaceable(path)
        yield lock
