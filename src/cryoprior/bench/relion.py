"""``cryoprior bench relion``: RELION 3.1's auto-refine with its own M-step vs ``--external_reconstruct``
with ``cryoprior relion-external`` (Gaussian, RED, CW-RED), on the same simulated stacks.

Each stack: a structure held out from the 3D prior's training (``bench.common.pick_structures``),
uniform SO(3) views with CTF (``bench.common.simulate_heldout``), box 48 at 2.5 Å/px, 800 particles;
the reference is the truth low-passed to 30 Å. Each arm is one full
``relion_refine_mpi --auto_refine --split_random_halves`` (3 ranks, local searches from healpix
order 3, same seed): RELION's reported final resolution, the final map's FSC to the truth at
0.5 and 0.143, the over-estimation as reported − true at 0.143 (negative: RELION claims more than the truth supports), iterations and wall time. Then,
at the simulator's poses, ``cryoprior reconstruct --prior gaussian`` vs ``relion_reconstruct
--ctf`` (unregularised), both timed in the same run, on a larger stack of the same structure and
SNR (4,000 particles at box 64; 800 with ``--quick``) so that start-up does not dominate. ``--quick``: one structure, one SNR;
full: two structures × two SNRs. The external program is configured only as the README says
(``RELION_EXTERNAL_RECONSTRUCT_EXECUTABLE="cryoprior relion-external"``, ``CRYOPRIOR_PRIOR``).
One run per arm: RELION's own seed-to-seed spread at this size is ~1.4 Å at FSC 0.5.
Writes ``bench_relion.json`` and ``bench_relion.md`` under ``out_dir``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import cryoprior
from cryoprior.bench.common import read_truth, simulate_heldout
from cryoprior.core.filters import lowpass
from cryoprior.core.fsc import fsc, resolution_at
from cryoprior.errors import CryopriorError
from cryoprior.fileutil import atomic_path
from cryoprior.io.mrc import read_map, write_map
from cryoprior.io.stack import ParticleStack

log = logging.getLogger(__name__)

ARMS = ("internal", "gaussian", "red", "cw-red")
REFINE_FLAGS = (
    "--auto_refine --split_random_halves --ini_high 30 --sym C1 --ctf --particle_diameter 100 "
    "--flatten_solvent --zero_mask --pad 2 --j 1 --pool 10 --dont_combine_weights_via_disc --dont_check_norm "
    "--healpix_order 3 --auto_local_healpix_order 3 --offset_range 3 --offset_step 1 --oversampling 1 "
    "--low_resol_join_halves 40 --norm --scale"
).split()


def relion_available() -> str | None:
    """None when RELION's programs are there, else what is missing."""
    missing = [p for p in ("relion_refine_mpi", "relion_reconstruct", "mpirun") if shutil.which(p) is None]
    return ", ".join(missing) or None


def external_command() -> str:
    """What the README tells users to set, ``cryoprior relion-external``, when the console script
    is installed; else this interpreter's ``-m cryoprior.cli.main relion-external``."""
    if shutil.which("cryoprior"):
        return "cryoprior relion-external"
    return f"{sys.executable} -m cryoprior.cli.main relion-external"


def _env(prior: str | None, model: str | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if model is not None:  # the external program's denoiser (relion_external.ENV["denoiser"])
        env["CRYOPRIOR_DENOISER"] = str(Path(model).resolve())
    src = str(Path(cryoprior.__file__).resolve().parents[1])  # this source tree wins in the subprocess
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if prior is not None:
        env["RELION_EXTERNAL_RECONSTRUCT_EXECUTABLE"] = external_command()
        env["CRYOPRIOR_PRIOR"] = prior
    return env


def prepare_stack(folder: Path, structure: str, snr: float, n: int = 800, box: int = 48, pixel: float = 2.5,
                  seed: int = 0) -> Path:
    """Simulated stack (``particles.star``, ``volumes/``) plus ``ref30.mrc``, the truth low-passed to
    30 Å. RELION resolves image names from its working directory: run it in the returned folder."""
    project = simulate_heldout(folder, structure, box, pixel, n, snr, seed)
    truth, pixel = read_truth(project)
    write_map(project / "ref30.mrc", lowpass(truth.double(), 30.0, pixel_size_a=pixel, ndim=3).float(), pixel)
    return project


def run_auto_refine(project: Path, arm: str, ranks: int = 3, seed: int = 0, timeout_s: float | None = None,
                    model: str | None = None) -> dict:
    """One auto-refine of ``project/particles.star`` into ``project/Refine_<arm>/run``: RELION's M-step
    (``internal``) or ``--external_reconstruct`` with ``CRYOPRIOR_PRIOR=<arm>`` (and
    ``CRYOPRIOR_DENOISER=<model>`` when given). Returns rc and wall time."""
    out = project / f"Refine_{arm}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", str(ranks), "relion_refine_mpi",
           "--o", f"{out.name}/run", "--i", "particles.star", "--ref", "ref30.mrc", "--random_seed", str(seed),
           *REFINE_FLAGS]
    if arm != "internal":
        cmd.append("--external_reconstruct")
    start = time.perf_counter()
    with open(out / "run.log", "w") as logf:
        try:
            rc = subprocess.run(cmd, cwd=project, env=_env(None if arm == "internal" else arm, model), stdout=logf,
                                stderr=subprocess.STDOUT, timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = -9
    return {"arm": arm, "rc": rc, "wall_s": round(time.perf_counter() - start, 1), "folder": str(out)}


def _general(path: Path, key: str) -> str | None:
    m = re.search(rf"_{key}\s+(\S+)", path.read_text())
    return m[1] if m else None


def refine_summary(folder: Path, pixel: float) -> dict:
    """Per-iteration current resolution / image size (half-1 model STARs), NaN in any model STAR's
    rlnSsnrMap, convergence, RELION's final resolution."""
    models = sorted(folder.glob("run_it[0-9][0-9][0-9]_half1_model.star"))
    history = [{"iteration": int(re.search(r"_it(\d{3})_", p.name)[1]),
                "resolution_a": float(_general(p, "rlnCurrentResolution")),
                "image_size": int(_general(p, "rlnCurrentImageSize"))} for p in models]
    nan_files = []
    for p in sorted(folder.glob("*_model.star")):
        text = p.read_text()
        if "rlnSsnrMap" in text and re.search(r"(?<![\w.])[-+]?nan\b", text, re.IGNORECASE):
            nan_files.append(p.name)
    log_text = (folder / "run.log").read_text() if (folder / "run.log").exists() else ""
    m = re.search(r"Final resolution \(without masking\) is:\s*(\S+)", log_text)
    final_model = folder / "run_model.star"
    return {
        "converged": (folder / "run_class001.mrc").exists() and final_model.exists() and m is not None,
        "reported_a": float(m[1]) if m else float("nan"),
        "iterations": len(history) - 1 if history else 0,  # it000 is the start
        "history": history,
        "nyquist_a": 2 * pixel,
        "reached_nyquist": any(h["resolution_a"] <= 2 * pixel * (1 + 1e-6) for h in history),
        "nan_ssnr_files": nan_files,
    }


def truth_scores(map_path: Path, truth: torch.Tensor, pixel: float) -> dict:
    vol, _ = read_map(map_path)
    curve = fsc(torch.from_numpy(np.asarray(vol, dtype=np.float64)), truth.double(), ndim=3)
    box = truth.shape[-1]
    return {"truth_05_a": round(resolution_at(curve, box, pixel, 0.5), 2),
            "truth_0143_a": round(resolution_at(curve, box, pixel, 0.143), 2)}


def _timed(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """Run ``cmd`` (it must succeed); its wall time and CPU time (user + system, children), s."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=_env(None), capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise CryopriorError(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr.strip()[-400:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def known_pose_comparison(project: Path, truth: torch.Tensor, pixel: float, repeats: int = 2) -> dict:
    """``cryoprior reconstruct --prior gaussian`` vs ``relion_reconstruct --ctf`` at the simulator's
    poses on the same stack, each a subprocess (start-up included), run alternately ``repeats``
    times in this run; the fastest wall and CPU time of each (a shared machine's load comes and
    goes). Then ``relion_reconstruct --fsc`` (regularised) with our half-map FSC. Also gives the
    stack size (``n_particles``, ``box``)."""
    jobs = {
        "relion_reconstruct": (["relion_reconstruct", "--i", "particles.star", "--o", "relion_rec.mrc", "--ctf",
                                "--angpix", str(pixel)], project / "relion_rec.mrc"),
        "cryoprior_reconstruct": ([sys.executable, "-m", "cryoprior.cli.main", "-q", "reconstruct", "particles.star",
                                   "--prior", "gaussian", "--out", "cp_rec", "--overwrite"], project / "cp_rec" / "map.mrc"),
    }
    times: dict = {name: [] for name in jobs}
    for _ in range(repeats):
        for name, (cmd, _out) in jobs.items():
            times[name].append(_timed(cmd, project))
    rows: dict = {}
    for name, (_cmd, out) in jobs.items():
        rows[name] = {"wall_s": round(min(t[0] for t in times[name]), 2),
                      "cpu_s": round(min(t[1] for t in times[name]), 2), **truth_scores(out, truth, pixel)}
    for key in ("wall", "cpu"):
        rows[f"{key}_ratio_cryoprior_over_relion"] = round(
            rows["cryoprior_reconstruct"][f"{key}_s"] / rows["relion_reconstruct"][f"{key}_s"], 2)
    # RELION's regularised counterpart: relion_reconstruct --fsc (τ² from a gold-standard FSC,
    # reconstructor.cpp:691-704, 768) given the half-map FSC our run measured
    curve = json.loads((project / "cp_rec" / "fsc.json").read_text())["fsc_half_unregularised"]
    lines = ["data_fsc", "loop_", "_rlnSpectralIndex #1", "_rlnGoldStandardFsc #2"]
    (project / "fsc_half.star").write_text("\n".join(lines + [f"{i} {v:.6f}" for i, v in enumerate(curve)]) + "\n")
    wall, cpu = _timed(["relion_reconstruct", "--i", "particles.star", "--o", "relion_rec_fsc.mrc", "--ctf",
                        "--angpix", str(pixel), "--fsc", "fsc_half.star"], project)
    rows["relion_reconstruct_fsc"] = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                                      **truth_scores(project / "relion_rec_fsc.mrc", truth, pixel)}
    rows["n_particles"] = len(ParticleStack.from_file(project / "particles.star"))
    rows["box"] = truth.shape[-1]
    return rows


def _write(result: dict, out: Path) -> None:
    with atomic_path(out / "bench_relion.json") as p:
        p.write_text(json.dumps(result, indent=2))
    with atomic_path(out / "bench_relion.md") as p:
        p.write_text(markdown(result))


def run(quick: bool = False, out_dir: str = "bench_relion", n: int = 800, box: int = 48,
        arms: tuple[str, ...] = ARMS, known_pose_n: int | None = None, known_pose_box: int = 64,
        known_poses: bool = True, work_dir: str | None = None, structures: list[str] | None = None,
        snrs: list[float] | None = None, model: str | None = None) -> dict:
    """Every case (structure × SNR) runs ``arms`` then the known-pose comparison, on its own stack of
    ``known_pose_n`` particles at ``known_pose_box`` (default 4,000 at box 64, 800 with ``quick``),
    so that start-up does not dominate the timing (``known_poses=False``: skipped). Cases run SNR by
    SNR, so a cut-short run still covers every structure. The JSON and Markdown are rewritten after each
    arm (``"complete": false`` until the end). Stacks and RELION runs stay in ``work_dir`` when
    given (else a temporary folder). ``structures`` / ``snrs`` override the grid (a shorter run);
    ``model`` is the external arms' trained prior (default: the shipped one)."""
    missing = relion_available()
    if missing:
        raise CryopriorError(f"bench relion needs RELION 3.1 on PATH (missing: {missing})")
    from cryoprior.bench.common import pick_structures

    picked, source = pick_structures(1 if quick else 2)
    structures = structures or picked
    snrs = snrs or ([0.05] if quick else [0.05, 0.02])
    known_pose_n = known_pose_n or (800 if quick else 4000)
    pixel = 2.5
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {"quick": quick, "complete": False, "relion": "3.1 (relion_refine_mpi, 3 ranks)", "model": model or "shipped",
              "external": external_command(), "structures_from": source, "cases": []}
    with tempfile.TemporaryDirectory(prefix="bench_relion_") as tmp:
        root = Path(work_dir) if work_dir else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        for snr in snrs:
            for structure in structures:
                case = {"structure": structure, "snr": snr, "n": n, "box": box, "pixel_size_a": pixel, "arms": {}}
                result["cases"].append(case)
                if arms:
                    project = prepare_stack(root, structure, snr, n, box, pixel)
                    truth, _ = read_truth(project)
                for arm in arms:
                    log.info("bench relion: %s SNR %g, %s", structure, snr, arm)
                    row = run_auto_refine(project, arm, model=model)
                    folder = Path(row.pop("folder"))
                    row.update(refine_summary(folder, pixel))
                    row.pop("history")
                    if row["rc"] == 0 and (folder / "run_class001.mrc").exists():
                        row.update(truth_scores(folder / "run_class001.mrc", truth, pixel))
                        row["reported_minus_true_a"] = round(row["reported_a"] - row["truth_0143_a"], 2)  # < 0: over-estimated
                    case["arms"][arm] = row
                    _write(result, out)
                if not known_poses:
                    continue
                kp = prepare_stack(root / "known_poses", structure, snr, known_pose_n, known_pose_box, pixel)
                kp_truth, _ = read_truth(kp)
                case["known_poses"] = known_pose_comparison(kp, kp_truth, pixel)
                _write(result, out)
    result["complete"] = True
    _write(result, out)
    return result


def markdown(result: dict) -> str:
    lines = ["| structure | SNR | arm | rc | iterations | RELION reported (Å) | truth FSC 0.5 (Å) | truth FSC 0.143 (Å) "
             "| reported − true 0.143 (Å; < 0: over-estimated) | wall (s) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in result["cases"]:
        for arm, r in c["arms"].items():
            v = {k: r.get(k, float("nan")) for k in ("reported_a", "truth_05_a", "truth_0143_a", "reported_minus_true_a")}
            lines.append(f"| {c['structure']} | {c['snr']:g} | {arm} | {r['rc']} | {r['iterations']} | {v['reported_a']:.2f} "
                         f"| {v['truth_05_a']:.2f} | {v['truth_0143_a']:.2f} | {v['reported_minus_true_a']:.2f} | {r['wall_s']:.0f} |")
    lines += ["", "| structure | SNR | known poses (particles × box) | truth FSC 0.5 (Å) | truth FSC 0.143 (Å) | wall (s) "
              "| CPU (s) | wall / relion_reconstruct | CPU / relion_reconstruct |", "|---|---|---|---|---|---|---|---|---|"]
    for c in result["cases"]:
        kp = c.get("known_poses")
        if not kp:
            continue
        for name in ("relion_reconstruct", "relion_reconstruct_fsc", "cryoprior_reconstruct"):
            if name not in kp:
                continue
            r = kp[name]
            base = kp["relion_reconstruct"]
            cpu = r.get("cpu_s", float("nan"))
            lines.append(f"| {c['structure']} | {c['snr']:g} | {name} ({kp['n_particles']} × {kp['box']}) "
                         f"| {r['truth_05_a']:.2f} | {r['truth_0143_a']:.2f} | {r['wall_s']:.1f} | {cpu:.1f} "
                         f"| {r['wall_s'] / base['wall_s']:.2f} | {cpu / base.get('cpu_s', float('nan')):.2f} |")
    return "\n".join(lines) + "\n"

