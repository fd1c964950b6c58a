"""I/O benchmark: stream a synthetic particle stack through ``ParticleStack.chunks``.

Writes ``n`` random ``box``² images with ``MrcsWriter`` plus a RELION 3.1 STAR, then reads them
back chunk by chunk twice, each time in a fresh process so that peak resident memory (VmHWM) is
that reader's own: once through ``ParticleStack.from_file(star).chunks(chunk)`` and once with the
baseline ``mrcfile.mmap`` plus an ``np.array`` copy per chunk. Both reads find the file in the
page cache (it was just written), so the figures compare the readers, not the disk.

>>> result = run(n=20_000)                                      # doctest: +SKIP
>>> result["ratio"]["throughput"], result["cryoprior"]["rss_growth_mb"]  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cryoprior.io import MrcsWriter, ParticleStack, write_star


def run(
    n: int = 100_000,
    box: int = 128,
    chunk: int = 1024,
    workdir: str | Path | None = None,
    repeats: int = 2,
) -> dict[str, Any]:
    """Run the benchmark; returns a JSON-serialisable dict of figures.

    ``workdir``: where the synthetic stack goes (kept); default: a temporary folder, removed after.
    Each reader runs ``repeats`` times, alternating; the fastest run is reported, with the
    highest peak RSS of all runs.
    """
    if n < 1 or box < 2 or chunk < 1 or repeats < 1:
        raise ValueError(f"need n, chunk, repeats >= 1 and box >= 2; got {n}, {chunk}, {repeats}, {box}")
    holder = tempfile.TemporaryDirectory(prefix="cryoprior-bench-io-") if workdir is None else None
    with holder or contextlib.nullcontext():
        folder = Path(holder.name if holder else workdir)  # type: ignore[arg-type]
        folder.mkdir(parents=True, exist_ok=True)
        star, mrcs, write_s = _write_dataset(folder, n, box, chunk)
        runs: dict[str, list[dict[str, Any]]] = {"ours": [], "baseline": []}
        for _ in range(repeats):  # alternate, so that neither reader always goes first
            runs["ours"].append(_in_child(_stream_cryoprior, str(star), chunk))
            runs["baseline"].append(_in_child(_stream_mrcfile_mmap, str(mrcs), chunk))
        ours, baseline = _best(runs["ours"]), _best(runs["baseline"])
    file_mb = n * box * box * 4 / 1e6
    return {
        "benchmark": "io",
        "n": n,
        "box": box,
        "chunk": chunk,
        "repeats": repeats,
        "file_mb": round(file_mb, 1),
        "write_s": round(write_s, 3),
        "write_mb_per_s": round(file_mb / write_s, 1),
        "cryoprior": ours,
        "baseline_mrcfile_mmap": baseline,
        "ratio": {
            "throughput": round(ours["images_per_s"] / baseline["images_per_s"], 3),
            "peak_rss": round(ours["peak_rss_mb"] / baseline["peak_rss_mb"], 3),
            "rss_growth": round(ours["rss_growth_mb"] / max(baseline["rss_growth_mb"], 1e-9), 3),
        },
        "checksums_match": bool(
            np.isclose(ours["checksum"], baseline["checksum"], rtol=1e-9, atol=1e-6)
        ),
        "page_cache": "warm (the stack was just written and synced to disk)",
        "workdir": None if holder else str(folder),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }


def _write_dataset(folder: Path, n: int, box: int, chunk: int) -> tuple[Path, Path, float]:
    """A random stack (one random block, shifted per chunk so chunks differ) and its STAR."""
    mrcs, star = folder / "bench.mrcs", folder / "bench.star"
    block = np.random.default_rng(0).standard_normal((min(chunk, n), box, box), dtype=np.float32)
    start_time = time.perf_counter()
    with MrcsWriter(mrcs, n, box, pixel_size_a=1.0) as writer:
        for i, start in enumerate(range(0, n, chunk)):
            writer.write(start, block[: min(chunk, n - start)] + np.float32(i * 1e-3))
    with open(mrcs, "rb") as f:  # include write-back in the time; reads then do not compete
        os.fsync(f.fileno())
    names = [f"{i:06d}@{mrcs.name}" for i in range(1, n + 1)]
    write_star(star, pd.DataFrame({"rlnImageName": names}), pixel_size_a=1.0, box=box)
    return star, mrcs, time.perf_counter() - start_time


def _in_child(fn: Any, path: str, chunk: int) -> dict[str, Any]:
    """Run ``fn(path, chunk)`` in a fresh interpreter, so its peak RSS is its own."""
    code = (
        "import json, sys\n"
        f"from {__name__} import {fn.__name__} as fn\n"
        "print(json.dumps(fn(sys.argv[1], int(sys.argv[2]))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, path, str(chunk)], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"benchmark child {fn.__name__} failed:\n{done.stderr.strip()}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    best = dict(min(runs, key=lambda r: r["seconds"]))
    best["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    best["rss_growth_mb"] = max(r["rss_growth_mb"] for r in runs)
    best["seconds_all"] = [r["seconds"] for r in runs]
    return best


def _memory_mb() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MB, from /proc (Linux) or getrusage."""
    status = Path("/proc/self/status")
    if status.exists():
        fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # bytes on macOS
    return peak, peak


def _measure(chunks: Any, open_s: float, box: int) -> dict[str, Any]:
    rss_before, _ = _memory_mb()
    count, checksum = 0, 0.0
    start = time.perf_counter()
    for images in chunks:
        count += len(images)
        checksum += float(images[:, box // 2, box // 2].sum(dtype=np.float64))
    seconds = time.perf_counter() - start
    _, peak = _memory_mb()
    return {
        "open_s": round(open_s, 4),
        "seconds": round(seconds, 4),
        "images_per_s": round(count / seconds, 1),
        "mb_per_s": round(count * box * box * 4 / 1e6 / seconds, 1),
        "rss_before_mb": round(rss_before, 1),
        "peak_rss_mb": round(peak, 1),
        "rss_growth_mb": round(peak - rss_before, 1),
        "images": count,
        "checksum": checksum,
    }


def _stream_cryoprior(star: str, chunk: int) -> dict[str, Any]:
    start = time.perf_counter()
    stack = ParticleStack.from_file(star)
    open_s = time.perf_counter() - start
    return _measure((images for _, images in stack.chunks(chunk)), open_s, stack.box)


def _stream_mrcfile_mmap(mrcs: str, chunk: int) -> dict[str, Any]:
    import mrcfile

    start = time.perf_counter()
    with mrcfile.mmap(mrcs, mode="r") as mrc:
        data = mrc.data  # (n, d, d) np.memmap
        open_s = time.perf_counter() - start
        stream = (np.array(data[s : s + chunk]) for s in range(0, data.shape[0], chunk))
        return _measure(stream, open_s, data.shape[-1])
