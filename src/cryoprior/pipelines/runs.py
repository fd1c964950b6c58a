"""Run folders: config.yaml, a log file, metrics.json, and resumable stages.

A stage is a named step whose completion is recorded in ``stages.json``; re-running the same
command skips finished stages, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryoprior.fileutil import atomic_path

log = logging.getLogger(__name__)


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
        handler = logging.FileHandler(self.path / name)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.setLevel(logging.INFO)
        logging.getLogger("cryoprior").addHandler(handler)
        self._handler = handler

    def close(self) -> None:
        if self._handler is not None:
            logging.getLogger("cryoprior").removeHandler(self._handler)
            self._handler.close()
            self._handler = None

    def done(self, name: str) -> bool:
        return name in self.stages

    def stage(self, name: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` unless stage ``name`` finished before; return its recorded result."""
        if name in self.stages:
            log.info("stage %s: done before, skipped", name)
            return self.stages[name]["result"]
        log.info("stage %s: running", name)
        t0 = time.perf_counter()
        result = fn()
        self.stages[name] = {"seconds": round(time.perf_counter() - t0, 2), "result": result}
        self._save()
        return result

    def _save(self) -> None:
        with atomic_path(self._stages_file) as tmp:
            tmp.write_text(json.dumps(self.stages, indent=2, default=str))

    def write_metrics(self, metrics: dict, name: str = "metrics.json") -> Path:
        path = self.path / name
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(metrics, indent=2, default=str))
        return path
