"""Known-pose reconstruction timing of ``cryoprior bench red`` against cryoDRGN.

:func:`time_known_pose` simulates one held-out structure at 64² (10,000 particles, 2,000 with
``quick``; CTF, shifts, known poses) and times, each with FSC to the truth: ours (``cryoprior
reconstruct``: halves, τ², Gaussian MAP), ``core.projection.reconstruct`` and cryoDRGN's
``backproject_voxel`` on the same STAR when the ``cryodrgn`` command is on PATH. Resolution is
compared like for like, as RELION and cryoSPARC report it: on *unregularised* maps (ours: B / K
of both halves' accumulators, RELION's ``_unfil``; cryoDRGN's map is B / K too), and ours counts
as "FSC to truth at least as good" when its FSC with a soft sphere mask on map and truth crosses
0.5 and 0.143 at resolutions no worse than cryoDRGN's; the unmasked FSC and our regularised MAP
map are reported beside it. cryoDRGN (GPL-3) is an optional comparison only: ``pip install
cryodrgn`` (or the ``cryodrgn`` extra) enables it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch

from cryoprior.bench.common import (
    align_to_truth,
    map_scores,
    pick_structures,
    read_truth,
    simulate_heldout,
)
from cryoprior.core.fsc import fsc
from cryoprior.core.projection import reconstruct
from cryoprior.errors import CryopriorError
from cryoprior.io.mrc import read_map
from cryoprior.io.relion import ctf_from_star, half_sets, poses_from_star
from cryoprior.io.stack import ParticleStack
from cryoprior.recon.mstep import ReconstructionConfig, reconstruct_halves, unregularised_volume
from cryoprior.sim.structures import (
    recommended_pixel_size_a,
)
from cryoprior.workflows.reconstruct import known_pose_accumulators

log = logging.getLogger(__name__)

CRYODRGN_OWN_TIME = re.compile(r"Backprojected ([\d,]+) images in ([\d.]+)s")


def _command(argv: list[str], env: dict) -> str:
    """Run ``argv``; its stdout + stderr, or ``CryopriorError`` with the last line of its output."""
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise CryopriorError(f"{Path(argv[0]).name} {argv[1]} exited with {proc.returncode}: {tail[0]}")
    return proc.stdout + proc.stderr


def cryodrgn_inputs(exe: str, star: Path, out: Path, env: dict) -> tuple[Path, Path]:
    """``pose.pkl`` and ``ctf.pkl`` for ``star``, written by cryoDRGN's own ``parse_pose_star`` and
    ``parse_ctf_star`` (so the conventions are cryoDRGN's; shifts from ``rlnOriginX/YAngst``
    and the optics table's pixel size)."""
    poses, ctf = out / "pose.pkl", out / "ctf.pkl"
    _command([exe, "parse_pose_star", str(star), "-o", str(poses)], env)
    _command([exe, "parse_ctf_star", str(star), "-o", str(ctf)], env)
    return poses, ctf


def _time_cryodrgn(exe: str, star: Path, truth: torch.Tensor, pixel: float, tmp: Path, env: dict) -> dict:
    """``cryodrgn backproject_voxel`` on ``star`` with its defaults (``--invert-data`` on, which
    undoes its CTF's sign, opposite to RELION's; ``--reg-weight 1``; half maps and FSC): wall-clock
    (interpreter start and file loading included), its own logged time (loading to the end of
    back-projection), and the scores of its map aligned to the truth."""
    t0 = time.perf_counter()
    poses, ctf = cryodrgn_inputs(exe, star, tmp, env)
    prep = time.perf_counter() - t0
    out = tmp / "cryodrgn"
    t0 = time.perf_counter()
    text = _command([exe, "backproject_voxel", str(star), "--datadir", str(star.parent), "--poses", str(poses),
                     "--ctf", str(ctf), "-o", str(out)], env)
    wall = time.perf_counter() - t0
    own = CRYODRGN_OWN_TIME.search(text)
    maps = [torch.from_numpy(read_map(out / name)[0]) for name in ("backproject.mrc", "half_map_a.mrc", "half_map_b.mrc")]
    aligned, how = align_to_truth(maps[0], truth)
    return {
        "key": "cryodrgn", "method": "cryodrgn backproject_voxel (B / K)", "seconds": round(wall, 2),
        "own_s": float(own.group(2)) if own else None, "prep_s": round(prep, 2), "alignment": how,
        **map_scores(aligned, truth, pixel, fsc(maps[1], maps[2], ndim=3)),
    }


FSC_RULE = (
    "FSC to truth at least as good: ours' unregularised map (B / K of both halves) crosses 0.5 and "
    "0.143 of its masked FSC to the truth at resolutions no worse than cryoDRGN's (also B / K), as "
    "RELION and cryoSPARC report resolution from unregularised maps and judge a map against a "
    "reference with a mask; the unmasked FSC is reported beside it"
)


def timing_summary(methods: list[dict]) -> dict:
    """Times, ratios and the FSC verdicts of :func:`time_known_pose`'s ``methods`` (each with a
    ``key``: "ours" (our unregularised map, the resolution map), "ours_map", "core" and, when it
    ran, "cryodrgn"): ``ours_fsc_masked_at_least_as_good`` is the target (:data:`FSC_RULE`),
    ``ours_fsc_at_least_as_good`` the same test unmasked."""
    by = {m["key"]: m for m in methods}
    ours = by["ours"]
    out = {"ours_s": ours["seconds"], "ours_own_s": ours["own_s"], "core_reconstruct_s": by["core"]["own_s"]}
    drgn = by.get("cryodrgn")
    if drgn is None:
        return out
    out["cryodrgn_s"], out["cryodrgn_own_s"] = drgn["seconds"], drgn["own_s"]
    out["ratio_cryodrgn_over_ours"] = round(drgn["seconds"] / ours["seconds"], 2)
    if drgn["own_s"]:
        out["ratio_cryodrgn_own_over_ours_own"] = round(drgn["own_s"] / ours["own_s"], 2)
    out["ours_faster"] = ours["seconds"] < drgn["seconds"]
    out["fsc_rule"] = FSC_RULE
    for tag in ("", "masked_"):
        keys = (f"res_truth_{tag}05_a", f"res_truth_{tag}0143_a")
        out[f"ours_fsc_{tag}at_least_as_good"] = all(ours[k] <= drgn[k] for k in keys)
    return out


def time_known_pose(
    n: int, box: int = 64, device: str = "cpu", snr: float = 0.1, structure: str | None = None, seed: int = 0,
) -> dict:
    """Known-pose reconstruction of ``n`` simulated ``box²`` particles of ``structure`` (default:
    the first held-out one; CTF, shifts, uniform SO(3), ``snr``), timed and scored (FSC to the
    truth at 0.5 / 0.143, unmasked and masked, half maps at 0.143) for three methods on the same
    STAR, one row (``key``) per map:

    - ours: ``cryoprior reconstruct`` (two half sets, τ², Gaussian MAP) — ``seconds`` the
      command's wall-clock, ``own_s`` the same work in process (read, CTF, insert, τ², MAP), each
      plus ``extra_s``, the B / K of the summed half accumulators that the pipeline does not keep
      (gridding-corrected as its unregularised half maps). That unregularised map is ours'
      resolution map (row "ours", halves: the pipeline's ``fsc_unregularised``); the command's
      MAP map and its halves are row "ours_map" (secondary; a Wiener-filtered map's FSC to a
      reference drops near 0.143 after the crop or a mask, see ``methods.red``);
    - ``core.projection.reconstruct`` in process (one map, Wiener constant; reading included);
    - ``cryodrgn backproject_voxel`` when the ``cryodrgn`` command is on PATH — ``seconds``
      wall-clock, ``own_s`` its logged time; inputs from its own STAR parsers (``prep_s``, not
      counted); its map (B / K) aligned to the truth first (:func:`align_to_truth`, reported).

    The verdicts (:func:`timing_summary`): times as cryoDRGN / ours, and FSC to truth judged on
    the masked FSC of the unregularised maps, ours against cryoDRGN (:data:`FSC_RULE`).
    Subprocesses get ``OMP_NUM_THREADS`` = our thread count (and no GPU when ``device`` is cpu).
    """
    structure = structure or pick_structures(1)[0][0]
    pixel = recommended_pixel_size_a(structure, box)
    threads = torch.get_num_threads()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if torch.device(device).type == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    out: dict = {"n": n, "box": box, "structure": structure, "pixel_size_a": pixel, "snr": snr,
                 "threads": threads, "device": device}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        star = simulate_heldout(tmp, structure, box, pixel, n, snr, seed) / "particles.star"
        truth, _ = read_truth(star.parent)
        t0 = time.perf_counter()
        _command([sys.executable, "-m", "cryoprior.cli.main", "-q", "reconstruct", str(star), "--prior", "gaussian",
                  "--device", device, "--out", str(tmp / "ours")], env)
        wall = time.perf_counter() - t0
        cfg = ReconstructionConfig()
        t0 = time.perf_counter()
        stack = ParticleStack.from_file(star)
        acc1, acc2 = known_pose_accumulators(stack, half_sets(stack), cfg.pad, device)
        maps = reconstruct_halves(acc1, acc2, pixel, cfg)
        t1 = time.perf_counter()
        unregularised = unregularised_volume(acc1 + acc2, cfg.weight_floor).cpu()
        extra = time.perf_counter() - t1
        own = time.perf_counter() - t0
        del acc1, acc2
        ours = [torch.from_numpy(read_map(tmp / "ours" / f"{m}.mrc")[0]) for m in ("map", "half1", "half2")]
        methods = [
            {"key": "ours", "method": "ours: unregularised B / K of both halves (resolution map)",
             "seconds": round(wall + extra, 2), "own_s": round(own, 2), "extra_s": round(extra, 3),
             **map_scores(unregularised, truth, pixel, maps.fsc_unregularised.cpu())},
            {"key": "ours_map", "method": "ours: Gaussian MAP map, same run (cryoprior reconstruct's map.mrc)",
             "seconds": None, "own_s": None, **map_scores(ours[0], truth, pixel, fsc(ours[1], ours[2], ndim=3))},
        ]
        t0 = time.perf_counter()
        rows = np.arange(len(stack))
        rots, shifts = poses_from_star(stack, rows)
        images = torch.from_numpy(stack.images(rows)).to(device)
        direct = reconstruct(images, rots.to(device), ctf_from_star(stack, rows, device), shifts.to(device)).cpu()
        methods.append({"key": "core", "method": "core.projection.reconstruct", "seconds": None,
                        "own_s": round(time.perf_counter() - t0, 2), **map_scores(direct, truth, pixel)})
        del images
        exe = shutil.which("cryodrgn")
        if exe is None:
            out["cryodrgn"] = "not installed (pip install cryodrgn enables the comparison; GPL-3, optional)"
        else:
            try:
                out["cryodrgn"] = f"cryodrgn {version('cryodrgn')}"
            except PackageNotFoundError:
                out["cryodrgn"] = f"cryodrgn at {exe}"
            try:
                methods.append(_time_cryodrgn(exe, star, truth, pixel, tmp, env))
            except (CryopriorError, OSError) as exc:
                log.warning("bench red: the cryoDRGN comparison failed: %s", exc)
                out["cryodrgn"] += f": FAILED ({exc})"
    out["methods"] = methods
    out.update(timing_summary(methods))
    return out


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:g}"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def timing_markdown(t: dict) -> list[str]:
    lines = ["", f"## Timing, known poses: {t['n']} particles of {t['box']}² ({t['structure']}, "
             f"{t['pixel_size_a']:g} Å/px, SNR {t['snr']:g}, CTF), {t['threads']} threads, {t['device']}", "",
             "wall = the command's wall-clock (interpreter start, reading and writing included); own = "
             "in process (ours: read + CTF + insert + τ² + MAP) or the program's own log (cryoDRGN: "
             "loading + back-projection); ours' both include the B / K of the summed halves "
             f"({_fmt(next(m for m in t['methods'] if m['key'] == 'ours')['extra_s'])} s), which the "
             "pipeline does not keep. masked = FSC with one soft sphere (radius 0.4·box) on map and "
             "truth alike; cryoDRGN applies no gridding correction, which apodises its box like a mask. "
             "Resolution is compared on unregularised maps (RELION's `_unfil`, cryoDRGN's B / K); our "
             "MAP map (regularised, same run) is the secondary row.", "",
             "| method | wall s | own s | truth 0.5 Å | truth 0.143 Å | masked truth 0.5 Å | masked truth 0.143 Å | "
             "half 0.143 Å |", "|---|---|---|---|---|---|---|---|"]
    for m in t["methods"]:
        lines.append(f"| {m['method']} | {_fmt(m['seconds'])} | {_fmt(m['own_s'])} | {m['res_truth_05_a']:.2f} | "
                     f"{m['res_truth_0143_a']:.2f} | {m['res_truth_masked_05_a']:.2f} | "
                     f"{m['res_truth_masked_0143_a']:.2f} | {_fmt(m.get('res_half_0143_a'))} |")
    lines.append("")
    if "ratio_cryodrgn_over_ours" in t:
        drgn = next(m for m in t["methods"] if m["key"] == "cryodrgn")
        a = drgn["alignment"]
        lines.append(
            f"{t['cryodrgn']}: cryoDRGN / ours = {t['ratio_cryodrgn_over_ours']:.2f}× wall-clock, "
            f"{t.get('ratio_cryodrgn_own_over_ours_own', float('nan')):.2f}× own timers; its STAR parsing "
            f"took {drgn['prep_s']:g} s more (not counted). Ours faster: {_yes(t['ours_faster'])}. "
            f"Rule: {t['fsc_rule']}. Target met (masked): {_yes(t['ours_fsc_masked_at_least_as_good'])}; "
            f"unmasked: {_yes(t['ours_fsc_at_least_as_good'])}. cryoDRGN map "
            f"vs truth: sign {a['sign']:+d}, hand {'mirrored' if a['hand_flip'] else 'as is'}, shift "
            f"{a['shift_px']} px (applied before its FSC).")
    else:
        lines.append(f"cryoDRGN: {t['cryodrgn']}.")
    return lines + [""]
