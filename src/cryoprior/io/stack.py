"""ParticleStack: images (lazy, memory-mapped, chunked) + a RELION table + a pixel size.

Image names in a STAR file (``000001@Particles/stack.mrcs``, slice numbers from 1) are resolved
against the STAR file's folder first, then against the current directory (RELION is run from
its project folder). Each stack file is memory-mapped once and read through that map; the
mapped pages are handed back to the kernel as a stream goes by, so that streaming a stack much
larger than memory keeps the resident set flat.

>>> stack = ParticleStack.from_file("particles.star")            # doctest: +SKIP
>>> for start, images in stack.chunks(1024):                     # (<=1024, d, d) float32
...     process(images, stack.column("rlnDefocusU")[start : start + len(images)])
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cryoprior.errors import InputError
from cryoprior.fileutil import atomic_path
from cryoprior.io.mrc import MappedStack, MrcsWriter, _as_numpy, read_mrc_header
from cryoprior.io.star import (
    OpticsFlags,
    build_optics,
    link_optics,
    read_star,
    resolve_image_names,
    write_star,
)

_CHUNK_BYTES = 64 << 20  # default chunk size when streaming a whole stack


class _ArraySource:
    """Images already in memory, ``(n, d, d)``."""

    def __init__(self, images: np.ndarray):
        self.images, self.path = images, None
        self.n, self.box = images.shape[0], images.shape[-1]

    def read(self, slices: np.ndarray, out: np.ndarray, rows: np.ndarray) -> None:
        out[rows] = self.images[slices]


class ParticleStack:
    """Images (lazily read, ``(n, d, d)`` float32) + a RELION metadata table + pixel size (Å).

    Build one with ``from_file`` or ``from_array``; the constructor is internal.
    """

    def __init__(
        self,
        sources: list[Any],
        file_index: np.ndarray,
        slice_index: np.ndarray,
        table: pd.DataFrame,
        optics: pd.DataFrame | None,
        pixel_size_a: float,
        path: Path | None = None,
        cache: dict[Path, MappedStack] | None = None,
    ):
        self._sources, self._file_index, self._slice_index = sources, file_index, slice_index
        self._cache = cache if cache is not None else {s.path: s for s in sources if s.path}
        self.table, self.optics = table, optics
        self.pixel_size_a, self.path = float(pixel_size_a), path
        self.box = int(sources[0].box)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path, optics: OpticsFlags | None = None) -> ParticleStack:
        """Open a ``.star`` (RELION 3.0 or 3.1+), ``.mrcs`` or ``.mrc`` file; reads no images.

        ``optics``: values from the command line (``--pixel-size``, ``--voltage-kv``, ...) that
        replace or supply the file's. Without a pixel size from the STAR, the MRC header or
        ``optics``, ``InputError`` (never a guessed 1 Å).
        """
        stack = cls._open(Path(path).absolute())
        if optics is not None:
            if optics.pixel_size_a is not None:
                stack.pixel_size_a = float(optics.pixel_size_a)
            for column, value in optics.columns().items():
                stack.table[column] = value
                if stack.optics is not None and column in stack.optics.columns:
                    stack.optics[column] = value
        if not stack.pixel_size_a > 0:
            where = "the STAR has no rlnImagePixelSize and " if stack.path.suffix.lower() == ".star" else ""
            raise InputError(f"no pixel size: {where}the MRC header says 0 Å; give --pixel-size", stack.path)
        return stack

    @classmethod
    def _open(cls, path: Path) -> ParticleStack:
        suffix = path.suffix.lower()
        if suffix == ".star":
            return cls._from_star(path)
        if suffix in (".mrcs", ".mrc"):
            source = MappedStack(read_mrc_header(path))
            names = [f"{i:06d}@{path.name}" for i in range(1, source.n + 1)]
            table = pd.DataFrame({"rlnImageName": names})
            index = np.arange(source.n, dtype=np.int64)
            return cls(
                [source], np.zeros_like(index), index, table, None, source.info.pixel_size_a, path
            )
        raise InputError(f"unknown file type {suffix!r}: expected .star, .mrcs or .mrc", path)

    @classmethod
    def _from_star(cls, path: Path) -> ParticleStack:
        table, optics = read_star(path)
        if len(table) == 0:
            raise InputError("the particle table is empty", path)
        stack_paths, file_index, slice_index = resolve_image_names(table["rlnImageName"], path)
        sources = []
        for stack_path in stack_paths:
            try:
                sources.append(MappedStack(read_mrc_header(stack_path)))
            except InputError as exc:
                raise InputError(f"referenced stack {exc}", path) from exc
        counts = np.array([s.n for s in sources])
        beyond = slice_index >= counts[file_index]
        if beyond.any():
            j = int(np.flatnonzero(beyond)[0])
            raise InputError(
                f"row {j} asks for image {slice_index[j] + 1} of {stack_paths[file_index[j]]}, "
                f"which holds {counts[file_index[j]]} images",
                path,
            )
        boxes = {s.path: s.box for s in sources}
        if len(set(boxes.values())) > 1:
            listing = ", ".join(f"{p.name}: {b}" for p, b in boxes.items())
            raise InputError(f"stacks have different box sizes ({listing})", path)
        pixel_size_a = _pixel_size(table, optics, sources[0].info.pixel_size_a, path)
        return cls(sources, file_index, slice_index, table, optics, pixel_size_a, path)

    @classmethod
    def from_array(
        cls,
        images: Any,
        pixel_size_a: float,
        table: pd.DataFrame | None = None,
        optics: pd.DataFrame | None = None,
    ) -> ParticleStack:
        """Wrap images ``(n, d, d)`` (ndarray or tensor; one ``(d, d)`` image allowed) in memory."""
        arr = _as_numpy(images)
        if arr.ndim == 2:
            arr = arr[None]  # (1, d, d)
        if arr.ndim != 3 or arr.shape[1] != arr.shape[2] or arr.shape[0] == 0:
            raise ValueError(f"images must be (n, d, d) with n >= 1, got shape {arr.shape}")
        if not pixel_size_a > 0:
            raise ValueError(f"pixel_size_a must be > 0, got {pixel_size_a}")
        arr = np.asarray(arr, dtype=np.float32)
        n = arr.shape[0]
        table = (
            pd.DataFrame(index=pd.RangeIndex(n)) if table is None else table.reset_index(drop=True)
        )
        if len(table) != n:
            raise ValueError(f"table has {len(table)} rows for {n} images")
        index = np.arange(n, dtype=np.int64)
        return cls([_ArraySource(arr)], np.zeros_like(index), index, table, optics, pixel_size_a)

    # ---- reading ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.table)

    def __repr__(self) -> str:
        return (
            f"ParticleStack(n={len(self)}, box={self.box}, "
            f"pixel_size_a={self.pixel_size_a:g}, path={self.path})"
        )

    @property
    def stack_paths(self) -> list[Path]:
        """The image files the rows of this stack read from (empty for in-memory images)."""
        used = np.unique(self._file_index)
        return [p for p in (self._sources[i].path for i in used) if p is not None]

    def images(self, indices: Any = None) -> np.ndarray:
        """Images ``(k, d, d)`` float32 (a copy) in table order.

        ``indices``: None (all), a slice, integers (any order, repeats allowed) or a boolean mask.
        """
        idx = self._indices(indices)
        return self._read(self._sources, self._file_index[idx], self._slice_index[idx], idx)

    def __getitem__(self, idx: Any) -> np.ndarray:
        if isinstance(idx, (int, np.integer)):
            return self.images([idx])[0]  # (d, d)
        return self.images(idx)

    def chunks(self, n: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, images)`` with images ``(<=n, d, d)`` float32, in table order."""
        if n < 1:
            raise ValueError(f"chunk size must be >= 1, got {n}")
        for start in range(0, len(self), n):
            yield start, self.images(slice(start, start + n))

    def read_image_column(self, name: str, indices: Any = None) -> np.ndarray:
        """Like ``images`` but for another image-name column, e.g. the truth cpCleanImageName."""
        if name not in self.table.columns:
            raise KeyError(f"no image column {name!r} in {self.path or 'the particle table'}")
        idx = self._indices(indices)
        stack_paths, file_index, slice_index = resolve_image_names(
            self.table[name].iloc[idx], self.path
        )
        sources = [self._source(p) for p in stack_paths]
        for source in sources:
            if source.box != self.box:
                raise InputError(
                    f"{name} images are {source.box} px, the stack's are {self.box}", source.path
                )
        return self._read(sources, file_index, slice_index, idx)

    def _source(self, path: Path) -> MappedStack:
        if path not in self._cache:
            self._cache[path] = MappedStack(read_mrc_header(path))
        return self._cache[path]

    def _read(
        self, sources: list[Any], file_index: np.ndarray, slice_index: np.ndarray, idx: np.ndarray
    ) -> np.ndarray:
        out = np.empty((len(idx), self.box, self.box), dtype=np.float32)  # (k, d, d)
        if len(idx) == 0:
            return out
        if len(sources) == 1:
            sources[0].read(slice_index, out, np.arange(len(idx)))
        else:
            order = np.argsort(file_index, kind="stable")
            bounds = np.flatnonzero(np.diff(file_index[order])) + 1
            for rows in np.split(order, bounds):
                sources[file_index[rows[0]]].read(slice_index[rows], out, rows)
        flat = out.reshape(len(idx), -1)  # (k, d*d)
        suspects = np.flatnonzero(~np.isfinite(flat.sum(axis=1)))  # NaN/Inf, or overflow
        bad = [j for j in suspects if not np.isfinite(flat[j]).all()]  # not just a big sum
        if bad:
            j = int(bad[0])
            source = sources[file_index[j]]
            where = f"image {slice_index[j] + 1}" if source.path else f"image {slice_index[j]}"
            raise InputError(
                f"{where} (particle {idx[j]}) contains NaN or Inf", source.path or self.path
            )
        return out

    def _indices(self, indices: Any) -> np.ndarray:
        n = len(self)
        if indices is None:
            return np.arange(n, dtype=np.int64)
        if isinstance(indices, slice):
            return np.arange(*indices.indices(n), dtype=np.int64)
        arr = np.asarray([indices] if isinstance(indices, (int, np.integer)) else indices)
        if arr.dtype == bool:
            if arr.shape != (n,):
                raise IndexError(f"boolean mask of shape {arr.shape} for {n} particles")
            return np.flatnonzero(arr)
        if arr.size == 0:
            return np.zeros(0, dtype=np.int64)
        if not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"indices must be integers, a boolean mask or a slice, got {arr.dtype}")
        arr = arr.astype(np.int64).reshape(-1)
        if arr.min() < -n or arr.max() >= n:
            raise IndexError(
                f"index {arr.min() if arr.min() < -n else arr.max()} out of range for {n} particles"
            )
        return np.where(arr < 0, arr + n, arr)

    # ---- metadata ---------------------------------------------------------------------------
    def has_column(self, name: str) -> bool:
        return name in self.table.columns or (
            self.optics is not None and name in self.optics.columns
        )

    def column(self, name: str) -> np.ndarray:
        """A particle column, else an optics column mapped to the particles through rlnOpticsGroup.

        Always a fresh, writable array (safe for ``torch.from_numpy``).
        """
        if name in self.table.columns:
            return self.table[name].to_numpy(copy=True)
        if self.optics is not None and name in self.optics.columns:
            return _optics_per_particle(self.table, self.optics, name, self.path)
        raise KeyError(f"no column {name!r} in {self.path or 'the particle table'}")

    def subset(self, indices: Any) -> ParticleStack:
        """A lazy view on some rows (any order, repeats allowed); nothing is read."""
        idx = self._indices(indices)
        table = self.table.iloc[idx].reset_index(drop=True)
        return ParticleStack(
            self._sources,
            self._file_index[idx],
            self._slice_index[idx],
            table,
            self.optics,
            self.pixel_size_a,
            self.path,
            self._cache,
        )

    def with_table(self, table: pd.DataFrame) -> ParticleStack:
        """Same images row for row, new metadata (use ``subset`` to select or reorder rows)."""
        if len(table) != len(self):
            raise ValueError(f"new table has {len(table)} rows, the stack has {len(self)}")
        return ParticleStack(
            self._sources,
            self._file_index,
            self._slice_index,
            table.reset_index(drop=True),
            self.optics,
            self.pixel_size_a,
            self.path,
            self._cache,
        )

    # ---- writing ----------------------------------------------------------------------------
    def write(
        self,
        star_path: str | Path,
        mrcs_path: str | Path | None = None,
        images: Any = None,
        pixel_size_a: float | None = None,
    ) -> ParticleStack:
        """Write images to ``mrcs_path`` and a RELION 3.1 STAR pointing at them, both atomically.

        ``images``: None (this stack's own, streamed), an ``(n, d', d')`` array/tensor, or an
        iterable of ``(start, (k, d', d') images)`` such as another stack's ``chunks``. Image names
        are written relative to the STAR's folder; other ``*ImageName`` columns are re-pointed to
        the same files from there; every other column is kept. Returns the written stack.
        """
        star_path = Path(star_path).absolute()
        mrcs_path = (
            star_path.with_suffix(".mrcs") if mrcs_path is None else Path(mrcs_path).absolute()
        )
        pixel_size_a = self.pixel_size_a if pixel_size_a is None else float(pixel_size_a)
        stream, box = self._image_stream(images)
        table = self._rebase_image_columns(self.table.copy(), star_path.parent)
        rel = Path(os.path.relpath(mrcs_path, star_path.parent)).as_posix()
        table["rlnImageName"] = [f"{i:06d}@{rel}" for i in range(1, len(self) + 1)]
        if self.optics is None:
            table, optics = build_optics(table, pixel_size_a, box)
        else:
            optics = self.optics.copy()
            optics["rlnImagePixelSize"], optics["rlnImageSize"] = pixel_size_a, box
            if "rlnImageDimensionality" not in optics.columns:
                optics["rlnImageDimensionality"] = 2
            table, optics = link_optics(table, optics)
        with contextlib.ExitStack() as stack:
            star_tmp = stack.enter_context(atomic_path(star_path))  # renamed after the images
            with MrcsWriter(mrcs_path, len(self), box, pixel_size_a) as writer:
                for start, chunk in stream:
                    writer.write(start, chunk)
                write_star(star_tmp, table, optics)
        source = MappedStack(read_mrc_header(mrcs_path))
        index = np.arange(len(self), dtype=np.int64)
        return ParticleStack(
            [source], np.zeros_like(index), index, table, optics, pixel_size_a, star_path
        )

    def _image_stream(self, images: Any) -> tuple[Iterable[tuple[int, Any]], int]:
        if images is None:
            return self.chunks(_chunk_len(self.box)), self.box
        if isinstance(images, np.ndarray) or hasattr(images, "detach"):
            arr = _as_numpy(images)
            if arr.ndim != 3 or arr.shape[0] != len(self) or arr.shape[1] != arr.shape[2]:
                raise ValueError(f"images must be ({len(self)}, d, d), got shape {arr.shape}")
            step = _chunk_len(arr.shape[-1])
            return ((s, arr[s : s + step]) for s in range(0, len(self), step)), arr.shape[-1]
        it = iter(images)
        first = next(it, None)
        if first is None:
            raise ValueError("images is an empty iterable")
        return itertools.chain([first], it), int(np.shape(first[1])[-1])

    def _rebase_image_columns(self, table: pd.DataFrame, new_dir: Path) -> pd.DataFrame:
        """Rewrite other ``*ImageName`` columns (e.g. cpCleanImageName) relative to ``new_dir``."""
        for name in table.columns:
            if name == "rlnImageName" or not name.endswith("ImageName") or self.path is None:
                continue
            stack_paths, file_index, slice_index = resolve_image_names(table[name], self.path)
            rel = [Path(os.path.relpath(p, new_dir)).as_posix() for p in stack_paths]
            table[name] = [
                f"{s + 1:06d}@{rel[f]}" for f, s in zip(file_index, slice_index, strict=True)
            ]
        return table


def _chunk_len(box: int) -> int:
    return max(1, _CHUNK_BYTES // (box * box * 4))


def _optics_per_particle(
    table: pd.DataFrame, optics: pd.DataFrame, name: str, path: Path | None
) -> np.ndarray:
    if "rlnOpticsGroup" not in table.columns or "rlnOpticsGroup" not in optics.columns:
        if len(optics) == 1:
            return np.repeat(optics[name].to_numpy(), len(table))
        raise InputError(f"cannot map optics column {name} to particles: no rlnOpticsGroup", path)
    by_group = optics.set_index("rlnOpticsGroup")[name]
    missing = set(table["rlnOpticsGroup"].unique()) - set(by_group.index)
    if missing:
        raise InputError(
            f"particles refer to optics groups {sorted(missing)} missing from data_optics", path
        )
    return by_group.reindex(table["rlnOpticsGroup"]).to_numpy()


def _pixel_size(
    table: pd.DataFrame, optics: pd.DataFrame | None, header_a: float, path: Path
) -> float:
    """Pixel size (Å) from optics rlnImagePixelSize (3.1), else the particles' rlnImagePixelSize,
    else rlnDetectorPixelSize (µm) * 1e4 / rlnMagnification (3.0), else the MRC header.
    """
    if optics is not None and "rlnImagePixelSize" in optics.columns:
        values = _optics_per_particle(table, optics, "rlnImagePixelSize", path)
    elif "rlnImagePixelSize" in table.columns:
        values = table["rlnImagePixelSize"].to_numpy()
    elif {"rlnDetectorPixelSize", "rlnMagnification"} <= set(table.columns):
        values = (
            table["rlnDetectorPixelSize"].to_numpy() * 1e4 / table["rlnMagnification"].to_numpy()
        )
    else:
        return header_a
    values = np.unique(np.asarray(values, dtype=np.float64))
    if not (np.isfinite(values).all() and (values > 0).all()):
        raise InputError(f"invalid pixel size(s) {values.tolist()}", path)
    if values.max() - values.min() > 1e-6 * values.max():
        raise InputError(
            f"particles have different pixel sizes {values.tolist()} Å; not supported", path
        )
    return float(values[0])
