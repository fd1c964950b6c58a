"""RELION 2D classification (``relion_refine``, Class2D) as a baseline: a blind run on a stack.

:func:`run_class2d` writes the stack as RELION expects it (images normalised per image, only the
``rln*`` columns, one optics group), runs ``relion_refine`` the way the RELION GUI's Class2D job
does (K classes, no input angles; ``--tau2_fudge 2 --psi_step 10 --offset_range R --offset_step 1
--zero_mask --flatten_solvent --norm --scale``, ``--ctf`` when the STAR has CTF columns) and reads
back ``rlnClassNumber`` of the last iteration's ``run_itNNN_data.star`` and its class averages.
When ``relion_refine`` is not on the PATH, :func:`available` says why and the benches skip it.

>>> result = run_class2d(stack, k=4, work_dir="rel", iterations=25)   # doctest: +SKIP
>>> result["labels"]  # (n,) 0..K-1, in the stack's order
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from cryoprior.core.filters import normalize_images
from cryoprior.errors import InputError
from cryoprior.io.mrc import read_mrc
from cryoprior.io.stack import ParticleStack
from cryoprior.io.star import read_star

EXECUTABLE = "relion_refine"


def available() -> str | None:
    """None when ``relion_refine`` can be run, else the reason it cannot."""
    return None if shutil.which(EXECUTABLE) else f"{EXECUTABLE} is not on the PATH (install RELION to compare)"


def _relion_stack(stack: ParticleStack, work: Path) -> Path:
    """``work/particles.star`` + ``particles.mrcs``: normalised images, RELION columns only."""
    table = stack.table[[c for c in stack.table.columns if c.startswith("rln")]].copy()
    table = table.drop(columns=["rlnClassNumber"], errors="ignore")

    def normalised():
        for start, images in stack.chunks(4096):
            yield start, normalize_images(torch.as_tensor(images)).numpy()

    stack.with_table(table).write(work / "particles.star", work / "particles.mrcs", images=normalised())
    return work / "particles.star"


def class2d_command(star: Path, out_prefix: Path, k: int, iterations: int, diameter_a: float, ctf: bool,
                    offset_range_px: int, threads: int = 1, mpi: int = 0, seed: int = 0) -> list[str]:
    """The ``relion_refine`` command line of a Class2D run (``mpi`` > 1: ``relion_refine_mpi`` under mpirun)."""
    cmd = [
        EXECUTABLE, "--i", str(star), "--o", str(out_prefix), "--K", str(k), "--iter", str(iterations),
        "--tau2_fudge", "2", "--particle_diameter", f"{diameter_a:.1f}", "--psi_step", "10",
        "--offset_range", str(offset_range_px), "--offset_step", "1", "--zero_mask", "--flatten_solvent",
        "--norm", "--scale", "--dont_check_norm", "--oversampling", "1", "--j", str(threads),
        "--dont_combine_weights_via_disc", "--pool", "30", "--random_seed", str(seed),
    ]
    if ctf:
        cmd.append("--ctf")
    if mpi > 1:
        cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", str(mpi), EXECUTABLE + "_mpi", *cmd[1:]]
    return cmd


def run_class2d(stack: ParticleStack, k: int, work_dir: str | Path, iterations: int = 25,
                diameter_a: float | None = None, offset_range_px: int = 3, threads: int = 1, mpi: int = 0,
                seed: int = 0, timeout_s: float | None = None) -> dict:
    """Run Class2D on ``stack`` in ``work_dir``; returns ``{"labels" (n,) 0..K-1 in the stack's
    order, "averages" (K, d, d), "seconds", "command"}``. ``diameter_a`` defaults to 80 % of the box."""
    reason = available()
    if reason is not None:
        raise InputError(reason)
    if not 1 <= k <= len(stack):
        raise InputError(f"K must be in 1..{len(stack)}, got {k}")
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    star = _relion_stack(stack, work)
    diameter = 0.8 * stack.box * stack.pixel_size_a if diameter_a is None else diameter_a
    ctf = stack.has_column("rlnDefocusU")
    (work / "out").mkdir(exist_ok=True)
    cmd = class2d_command(star.name, Path("out/run"), k, iterations, diameter, ctf, offset_range_px, threads, mpi, seed)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=timeout_s)
    seconds = time.perf_counter() - t0
    (work / "relion.log").write_text(proc.stdout + proc.stderr)
    data = work / "out" / f"run_it{iterations:03d}_data.star"
    if proc.returncode != 0 or not data.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"relion_refine failed (exit {proc.returncode}): {' | '.join(tail)}")
    table, _ = read_star(data)
    slices = table["rlnImageName"].astype(str).map(lambda s: int(s.split("@")[0]) - 1).to_numpy()
    labels = np.full(len(stack), -1, dtype=np.int64)  # particles.mrcs holds the stack's rows in order
    labels[slices] = table["rlnClassNumber"].astype(int).to_numpy() - 1
    if (labels < 0).any():
        raise RuntimeError(f"relion_refine dropped {(labels < 0).sum()} particles from {data}")
    averages, _ = read_mrc(work / "out" / f"run_it{iterations:03d}_classes.mrcs", mmap=False)
    return {"labels": labels, "averages": np.asarray(averages, dtype=np.float32), "seconds": seconds,
            "command": " ".join(cmd)}
