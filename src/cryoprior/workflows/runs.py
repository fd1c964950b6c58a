"""Run folders: config.yaml, a log file, metrics.json, and resumable stages.

A stage is a named step whose completion is recorded in ``stages.json``; re-running the same
command skips finished stages, so an interrupted run resumes where it stopped. A stage whose
method is not installed is recorded as ``unavailable`` with the reason (it is tried again on
the next run). Each stage may own a sub-folder (``RunDir.child``) with its own config.yaml,
log, checkpoints, metrics.json and pictures.

>>> run = RunDir("out")                                           # doctest: +SKIP
>>> run.stage("simulate", lambda: simulate(...))                  # runs once, then skipped
>>> run.unavailable("denoise_gan", "cryoprior.nn.gan is not installed")   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

from cryoprior.config import config_to_dict, read_run_config, write_run_config
from cryoprior.errors import InputError
from cryoprior.fileutil import atomic_path, check_out_dir, run_lock

log = logging.getLogger(__name__)

DONE, UNAVAILABLE = "done", "unavailable"


def _file_handler(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    return handler


@contextlib.contextmanager
def _log_to(path: Path) -> Iterator[None]:
    """Send the package's log records to ``path`` as well, for the duration of the block."""
    handler = _file_handler(path)
    logging.getLogger("cryoprior").addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger("cryoprior").removeHandler(handler)
        handler.close()


#: what a run folder holds before its first result: removed again when the run fails then
_BOOKKEEPING = {"config.yaml", "run.log", "stages.json"}


def _unstarted(path: Path) -> bool:
    """Whether ``path`` holds nothing but bookkeeping files, empty folders and an empty stage record."""
    for p in path.rglob("*"):
        if p.is_dir():
            continue
        rel = p.relative_to(path).as_posix()
        if rel == "stages.json" and json.loads(p.read_text() or "{}"):
            return False
        if rel not in _BOOKKEEPING and not (rel.startswith("logs/") and p.stat().st_size == 0):
            return False
    return True


@contextlib.contextmanager
def run_folder(out: str | Path, inputs: Iterable[str | Path | None] = (), argv: list[str] | None = None) -> Iterator[bool]:
    """Hold run folder ``out`` for a (resumable) run: checked against ``inputs`` and locked
    (:mod:`cryoprior.fileutil`). Yields whether the folder is new; a new folder that the run
    leaves without any result (it failed before its first stage or epoch) is removed again, so
    that it neither blocks nor misleads the next run."""
    check_out_dir(out, inputs)
    with run_lock(out, argv):
        path = Path(out)
        created = not path.exists()
        try:
            yield created
        except BaseException:
            if created and path.is_dir() and _unstarted(path):
                shutil.rmtree(path, ignore_errors=True)
                log.info("removed %s: the run failed before its first result", path)
            raise


class RunDir:
    """A run folder. ``stage(name, fn)`` runs ``fn()`` once and records its JSON-able result."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._stages_file = self.path / "stages.json"
        self.stages: dict[str, Any] = (
            json.loads(self._stages_file.read_text()) if self._stages_file.exists() else {}
        )
        self._handler: logging.Handler | None = None

    def attach_log(self, name: str = "run.log") -> None:
        """Also send the package's log records to ``<run>/<name>`` (the CLI configured logging)."""
        if self._handler is not None:
            return
        handler = _file_handler(self.path / name)
        logging.getLogger("cryoprior").addHandler(handler)
        self._handler = handler

    def close(self) -> None:
        if self._handler is not None:
            logging.getLogger("cryoprior").removeHandler(self._handler)
            self._handler.close()
            self._handler = None

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def done(self, name: str) -> bool:
        """Whether stage ``name`` finished (an ``unavailable`` record does not count)."""
        return name in self.stages and self.stages[name].get("status", DONE) == DONE

    def stage(self, name: str, fn: Callable[[], Any], log_file: bool = False) -> Any:
        """Run ``fn`` unless stage ``name`` finished before; return its recorded result.

        With ``log_file``, the stage's log records also go to ``<run>/logs/<name>.log``.
        """
        if self.done(name):
            log.info("stage %s: done before, skipped", name)
            return self.stages[name]["result"]
        log.info("stage %s: running", name)
        t0, c0 = time.perf_counter(), time.process_time()
        if log_file:
            (self.path / "logs").mkdir(exist_ok=True)
            with _log_to(self.path / "logs" / f"{name}.log"):
                result = fn()
        else:
            result = fn()
        self.stages[name] = {
            "status": DONE, "seconds": round(time.perf_counter() - t0, 2),
            "cpu_seconds": round(time.process_time() - c0, 2), "result": result,
        }
        self._save()
        return result

    def unavailable(self, name: str, reason: str) -> None:
        """Record that stage ``name`` could not run in this version (its method is missing)."""
        log.warning("stage %s: not available in this version (%s)", name, reason)
        self.stages[name] = {"status": UNAVAILABLE, "reason": reason}
        self._save()

    def child(self, name: str, config: Any = None, argv: list[str] | None = None, **extra: Any) -> RunDir:
        """The sub-folder ``<run>/<name>`` as a RunDir, with ``config.yaml`` written there.

        ``config``: the stage's dataclass config (saved with the package version, time, argv
        and ``extra``, e.g. ``seed=``). An existing config.yaml is kept (a resumed stage).
        """
        sub = RunDir(self.path / name)
        if not (sub.path / "config.yaml").exists():
            write_run_config(sub.path / "config.yaml", config, argv, **extra)
        return sub

    def _save(self) -> None:
        with atomic_path(self._stages_file) as tmp:
            tmp.write_text(json.dumps(self.stages, indent=2, default=str))

    def write_metrics(self, metrics: dict, name: str = "metrics.json") -> Path:
        path = self.path / name
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(metrics, indent=2, default=str))
        return path

    def read_metrics(self, name: str = "metrics.json") -> dict:
        path = self.path / name
        return json.loads(path.read_text()) if path.exists() else {}

    def check_config(self, config: Any, argv: list[str] | None = None, ignore: tuple[str, ...] = (), **extra: Any) -> None:
        """Write ``config.yaml`` on a first run; on a resumed run, insist the config is the same.

        Fields named in ``ignore`` (e.g. the device, the epochs) may differ between runs (the record
        then takes the new values); ``extra`` entries
        (e.g. the list of planned stages) are written on the first run and updated on resumed
        ones. Raises ``InputError`` naming the differing fields, so results of two configs
        never mix in one folder.
        """
        path = self.path / "config.yaml"
        if not path.exists():
            write_run_config(path, config, argv, **extra)
            return
        record = read_run_config(path)
        old, new = record.get("config", {}), config_to_dict(config)
        diff = sorted(k for k in set(old) | set(new) if k not in ignore and old.get(k) != new.get(k))
        if diff:
            listing = ", ".join(f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in diff)
            raise InputError(
                f"this run folder was started with another config ({listing}); "
                "choose another --out or remove the folder", self.path,
            )
        log.info("resuming the run in %s (started %s)", self.path, record.get("time"))
        changed = [k for k in ignore if k in new and old.get(k) != new.get(k)]
        if changed:  # e.g. more epochs, another device: the record says what this run used
            log.info("resumed with %s", ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in changed))
            record["config"] = new
        if changed or any(record.get(k) != v for k, v in extra.items()):
            record.update(extra)
            with atomic_path(path) as tmp:
                tmp.write_text(yaml.safe_dump(record, sort_keys=False))
