"""Progress bars (tqdm), silenced globally by ``cryoprior --quiet``."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
_ENABLED = True


def set_enabled(enabled: bool) -> None:
    global _ENABLED
    _ENABLED = enabled


def progress(iterable: Iterable[T], desc: str = "", total: int | None = None, **kw) -> Iterator[T]:
    """Wrap an iterable in a tqdm bar unless progress is disabled (``--quiet``)."""
    return iter(tqdm(iterable, desc=desc, total=total, disable=not _ENABLED, leave=False, **kw))


def bar(total: int, desc: str = "", **kw) -> tqdm:
    """A manual tqdm bar (call ``.update(n)``), disabled under ``--quiet``."""
    return tqdm(total=total, desc=desc, disable=not _ENABLED, leave=False, **kw)
