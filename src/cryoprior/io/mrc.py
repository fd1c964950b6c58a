"""MRC images, stacks and maps on top of ``mrcfile``: validated reads, atomic float32 writes.

Conventions: arrays are ``(n, d, d)`` for image stacks (a single 2D image reads as ``(1, d, d)``)
and ``(d, d, d)`` for maps, indexed ``[z, y, x]`` as ``mrcfile`` does; pixel sizes are in Å and
come from the header's ``voxel_size.x``; a header value of 0 (unset) reads as 0.0 (unknown),
which ``ParticleStack`` refuses unless the STAR or ``--pixel-size`` gives one.

>>> write_mrcs("p.mrcs", np.zeros((10, 64, 64)), pixel_size_a=1.5)   # doctest: +SKIP
>>> images, pixel_size_a = read_mrc("p.mrcs")                        # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import mrcfile
import numpy as np

from cryoprior.errors import InputError
from cryoprior.fileutil import atomic_path

log = logging.getLogger(__name__)

_RELEASE_BYTES = 64 << 20  # hand mapped pages back after this many bytes were read

#: MRC modes we read: int8, int16, float32, uint16, float16.
SUPPORTED_MODES: dict[int, str] = {0: "int8", 1: "int16", 2: "float32", 6: "uint16", 12: "float16"}
_HEADER_BYTES = 1024


@dataclass(frozen=True)
class MrcInfo:
    """What the header of one MRC file says, checked against the file's size."""

    path: Path
    shape: tuple[int, int, int]  # (n, d, d) for stacks and 2D images, (nz, ny, nx) for maps
    dtype: np.dtype  # on-disk dtype, with the file's byte order
    mode: int
    data_offset: int  # bytes before the data block: 1024 + extended header
    pixel_size_a: float
    is_image_stack: bool  # ispg == 0 (stacks and single 2D images)

    @property
    def n(self) -> int:
        return self.shape[0]

    @property
    def box(self) -> int:
        return self.shape[-1]


def read_mrc_header(path: str | Path) -> MrcInfo:
    """Read and validate an MRC header without touching the data.

    Raises ``InputError`` naming ``path`` for a missing file, a file that is not MRC, an
    unsupported mode, non-square images, a volume stack, or a file shorter than its header says.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", path)
    header, voxel_x = _open_header(path)

    mode = int(header.mode)
    if mode not in SUPPORTED_MODES:
        supported = ", ".join(f"{m} ({t})" for m, t in SUPPORTED_MODES.items())
        raise InputError(f"unsupported MRC mode {mode}; supported modes: {supported}", path)
    dtype = mrcfile.utils.data_dtype_from_header(header)
    if mrcfile.utils.spacegroup_is_volume_stack(header.ispg):
        raise InputError(f"volume stacks (space group {int(header.ispg)}) are not supported", path)
    nx, ny, nz = int(header.nx), int(header.ny), int(header.nz)
    if min(nx, ny, nz) < 1:
        raise InputError(f"empty or invalid dimensions nx={nx} ny={ny} nz={nz}", path)
    if ny != nx:
        raise InputError(f"images are not square: ny={ny} != nx={nx}", path)
    offset = _HEADER_BYTES + int(header.nsymbt)
    need = offset + nx * ny * nz * dtype.itemsize
    size = path.stat().st_size
    if size < need:
        raise InputError(f"file is truncated: header says {need} bytes, file has {size}", path)
    if size > need:  # e.g. a float32 file whose header claims a 2-byte mode: data would be garbage
        raise InputError(
            f"file is larger than its header says (mode {mode}, {nx}x{ny}x{nz} {dtype.name}: {need} bytes, "
            f"file has {size}); the header's mode or dimensions are wrong", path)
    return MrcInfo(
        path=path,
        shape=(nz, ny, nx),
        dtype=dtype,
        mode=mode,
        data_offset=offset,
        pixel_size_a=voxel_x if voxel_x > 0 and np.isfinite(voxel_x) else 0.0,
        is_image_stack=int(header.ispg) == 0,
    )


def _open_header(path: Path) -> tuple[np.recarray, float]:
    """mrcfile's strict reader; for files with the MAP id that it rejects (e.g. the bad machine
    stamp of some older software), its permissive reader with the warnings logged."""
    try:
        return _header_fields(path, permissive=False)
    except (ValueError, OSError) as exc:
        strict_error = exc
    if "Map ID" not in str(strict_error):
        with contextlib.suppress(ValueError, OSError):
            return _header_fields(path, permissive=True)
    raise InputError(f"not a readable MRC file ({strict_error})", path) from strict_error


def _header_fields(path: Path, permissive: bool) -> tuple[np.recarray, float]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with mrcfile.open(path, mode="r", permissive=permissive, header_only=True) as mrc:
            header, voxel_x = mrc.header.copy(), float(mrc.voxel_size.x)
    for w in caught:
        log.warning("%s: %s", path, w.message)
    return header, voxel_x


def read_mrc(path: str | Path, mmap: bool = True) -> tuple[np.ndarray, float]:
    """Read an MRC file's data and pixel size (Å).

    Returns ``(data, pixel_size_a)`` with data ``(n, d, d)`` for stacks, ``(d, d, d)`` for maps and
    ``(1, d, d)`` for a single 2D image, in the file's dtype; a read-only ``np.memmap`` when
    ``mmap`` (nothing is read until used), else an array in memory.
    """
    info = read_mrc_header(path)
    if mmap:
        data = np.memmap(
            info.path, dtype=info.dtype, mode="r", offset=info.data_offset, shape=info.shape
        )
    else:
        count = int(np.prod(info.shape))
        data = np.fromfile(info.path, dtype=info.dtype, count=count, offset=info.data_offset)
        data = data.reshape(info.shape)  # (n, d, d)
    return data, info.pixel_size_a


def read_map(path: str | Path) -> tuple[np.ndarray, float]:
    """Read a cubic 3D map as float32 ``(d, d, d)`` and its pixel size (Å); rejects NaN/Inf."""
    info = read_mrc_header(path)
    if len(set(info.shape)) != 1 or info.shape[0] == 1:
        raise InputError(f"expected a cubic 3D map, got shape (nz, ny, nx) = {info.shape}", path)
    data, pixel_size_a = read_mrc(path, mmap=False)
    volume = np.asarray(data, dtype=np.float32)
    if not np.isfinite(volume).all():
        raise InputError(f"map contains {int((~np.isfinite(volume)).sum())} NaN/Inf voxels", path)
    return volume, pixel_size_a


class MappedStack:
    """One image stack file, memory-mapped read-only on first use, read as float32.

    Pages mapped while reading are handed back to the kernel (``madvise(MADV_DONTNEED)``; they
    stay in the page cache) after every 64 MiB, so streaming a file larger than memory keeps the
    process's resident set flat. Pickles without its map (reopened on first read).
    """

    def __init__(self, info: MrcInfo):
        self.info = info
        self.path: Path | None = info.path
        self.n, self.box = info.n, info.box
        self._image_bytes = info.box * info.box * info.dtype.itemsize
        self._reset()

    def _reset(self) -> None:
        self._mm: mmap.mmap | None = None
        self._view: np.ndarray | None = None
        self._lo, self._hi, self._since = np.inf, 0, 0

    def __getstate__(self) -> dict[str, Any]:  # maps do not pickle; reopen after unpickling
        return {"info": self.info}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["info"])  # type: ignore[misc]

    def _array(self) -> np.ndarray:
        if self._view is None:
            with open(self.info.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            count = int(np.prod(self.info.shape))
            view = np.frombuffer(self._mm, self.info.dtype, count, self.info.data_offset)
            self._view = view.reshape(self.info.shape)  # (n, d, d)
        return self._view

    def read(self, slices: np.ndarray, out: np.ndarray, rows: np.ndarray) -> None:
        """``out[rows] = stack[slices]`` as float32."""
        lo, hi = int(slices.min()), int(slices.max())
        if lo < 0 or hi >= self.n:
            bad = hi + 1 if hi >= self.n else lo + 1
            raise InputError(
                f"image {bad} requested but the stack holds {self.n} images", self.path
            )
        view = self._array()
        k = len(rows)
        if _is_run(rows) and _is_run(slices):
            out[rows[0] : rows[0] + k] = view[lo : lo + k]
        else:
            order = np.argsort(slices, kind="stable")  # read the file front to back
            out[rows[order]] = view[slices[order]]
        self._release(lo, hi, k)

    def _release(self, lo: int, hi: int, k: int) -> None:
        """Drop mapped pages (they stay in the page cache) once enough has been read."""
        offset = self.info.data_offset
        self._lo = min(self._lo, offset + lo * self._image_bytes)
        self._hi = max(self._hi, offset + (hi + 1) * self._image_bytes)
        self._since += k * self._image_bytes
        if self._since >= _RELEASE_BYTES and self._mm is not None and hasattr(self._mm, "madvise"):
            start = int(self._lo) - int(self._lo) % mmap.PAGESIZE
            self._mm.madvise(mmap.MADV_DONTNEED, start, self._hi - start)
            self._lo, self._hi, self._since = np.inf, 0, 0


def _is_run(a: np.ndarray) -> bool:
    """True when ``a`` is ``a[0], a[0] + 1, …``."""
    return len(a) == 1 or (int(a[-1]) - int(a[0]) == len(a) - 1 and bool((np.diff(a) == 1).all()))


def _as_numpy(x: Any) -> np.ndarray:
    """ndarray or torch.Tensor (any device) to ndarray, without importing torch."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def write_mrcs(path: str | Path, images: Any, pixel_size_a: float) -> None:
    """Write ``images`` ``(n, d, d)`` (or one ``(d, d)``) as a float32 image stack, atomically."""
    images = _as_numpy(images)
    if images.ndim == 2:
        images = images[None]  # (1, d, d)
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"images must be (n, d, d) with square images, got shape {images.shape}")
    step = max(1, (64 << 20) // max(1, images[0].nbytes))
    with MrcsWriter(path, images.shape[0], images.shape[-1], pixel_size_a) as writer:
        for start in range(0, images.shape[0], step):
            writer.write(start, images[start : start + step])


def write_map(path: str | Path, volume: Any, pixel_size_a: float) -> None:
    """Write a 3D ``volume`` ``(d, d, d)`` as a float32 MRC map, atomically."""
    volume = _as_numpy(volume)
    if volume.ndim != 3:
        raise ValueError(f"volume must be 3D (d, d, d), got shape {volume.shape}")
    if not np.isfinite(volume).all():
        raise ValueError(f"{path}: refusing to write a map with NaN/Inf values")
    with atomic_path(path) as tmp, mrcfile.new(tmp, overwrite=True) as mrc:
        mrc.set_data(np.ascontiguousarray(volume, dtype=np.float32))
        mrc.set_volume()
        mrc.voxel_size = float(pixel_size_a)


class MrcsWriter:
    """Stream a large float32 image stack to disk without holding it in memory.

    The stack is written to a temporary file beside ``path`` and renamed into place when the
    ``with`` block ends cleanly after every image was written; on error the temporary file is
    removed and ``path`` is left as it was. Header statistics are accumulated on the way.

    >>> with MrcsWriter("out.mrcs", n=1000, box=128, pixel_size_a=1.2) as w:  # doctest: +SKIP
    ...     for start, chunk in stack.chunks(256):
    ...         w.write(start, denoise(chunk))
    """

    def __init__(self, path: str | Path, n: int, box: int, pixel_size_a: float):
        if n < 1 or box < 1:
            raise ValueError(f"need n >= 1 and box >= 1, got n={n}, box={box}")
        self.path = Path(path)
        self.n, self.box, self.pixel_size_a = int(n), int(box), float(pixel_size_a)
        self._atomic: Any = None
        self._tmp: Path | None = None
        self._fd: int | None = None
        self._offset = _HEADER_BYTES  # new files have no extended header
        self._written = np.zeros(self.n, dtype=bool)
        self._min, self._max, self._sum, self._sumsq = np.inf, -np.inf, 0.0, 0.0

    def __enter__(self) -> MrcsWriter:
        self._atomic = atomic_path(self.path)
        self._tmp = self._atomic.__enter__()
        try:
            # a sparse file of the final size with a complete header; data go in with pwrite
            with mrcfile.new_mmap(
                self._tmp, (self.n, self.box, self.box), mrc_mode=2, overwrite=True
            ) as mrc:
                mrc.set_image_stack()
                mrc.voxel_size = self.pixel_size_a
            self._fd = os.open(self._tmp, os.O_RDWR)
        except BaseException:
            self._atomic.__exit__(*sys.exc_info())
            raise
        return self

    def write(self, start: int, images: Any) -> None:
        """Write ``images`` ``(k, box, box)`` (or one ``(box, box)``) at positions ``start …``."""
        if self._fd is None:
            raise RuntimeError("MrcsWriter.write called outside its with block")
        arr = _as_numpy(images)
        if arr.ndim == 2:
            arr = arr[None]  # (1, d, d)
        if arr.ndim != 3 or arr.shape[1:] != (self.box, self.box):
            raise ValueError(f"images must be (k, {self.box}, {self.box}), got shape {arr.shape}")
        stop = start + arr.shape[0]
        if start < 0 or stop > self.n:
            raise ValueError(f"images [{start}, {stop}) fall outside the stack of {self.n}")
        arr = np.ascontiguousarray(arr, dtype="<f4")
        if arr.size:
            self._min = min(self._min, float(arr.min()))
            self._max = max(self._max, float(arr.max()))
            flat = arr.reshape(arr.shape[0], -1)  # (k, d*d); per-image sums, then float64
            self._sum += float(flat.sum(axis=1).sum(dtype=np.float64))
            self._sumsq += float(np.einsum("ij,ij->i", flat, flat).sum(dtype=np.float64))
        view = memoryview(arr).cast("B")
        pos = self._offset + start * self.box * self.box * 4
        while view:
            done = os.pwrite(self._fd, view, pos)
            view, pos = view[done:], pos + done
        self._written[start:stop] = True

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            if exc_type is None:
                missing = np.flatnonzero(~self._written)
                if missing.size:
                    raise ValueError(
                        f"{self.path}: {missing.size} of {self.n} images were never written "
                        f"(first: index {int(missing[0])})"
                    )
                self._write_stats()
        except BaseException:
            self._atomic.__exit__(*sys.exc_info())
            raise
        self._atomic.__exit__(exc_type, exc, tb)

    def _write_stats(self) -> None:
        count = self.n * self.box * self.box
        mean = self._sum / count
        rms = np.sqrt(max(self._sumsq / count - mean * mean, 0.0))
        with mrcfile.mmap(self._tmp, mode="r+") as mrc:
            mrc.header.dmin, mrc.header.dmax = self._min, self._max
            mrc.header.dmean, mrc.header.rms = mean, rms
