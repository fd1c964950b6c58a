"""``cryoprior bench drvae``: DRVAE + BSK-means++ against the classification baselines and RELION.

One grid for every classification method. Settings (``SETTINGS``): four discrete views at SNR
0.1/0.05/0.01; the same with random in-plane angles and ±3 px shifts; four views with CTF
(defocus as the simulator draws it); uniform orientations with CTF, the truth being the nearest
of K=4 reference viewing directions (it cannot rank methods: the oracle scores 0.30–0.42); four
views with CTF, random in-plane angles and shifts, each particle within ``CONE_DEG`` of its view
(``cones-ctf``, the realistic setting); a conformational mix
(1ake/4ake, one view, SNR 0.05), balanced and 70/30. Structures: ``TESTS`` (1h4a, 1or4, 1pwc);
DRVAE's defaults were chosen on ``DEV_STRUCTURE`` (3q4o), which the grid does not use.

Rows: ``drvae-bsk`` (its defaults; with in-plane angles ``--align --max-shift 3``), low-pass +
k-means, PCA + k-means, ``align-kmeans`` (±3 px) and, with in-plane angles, align-kmeans refined
by ML2D as drvae-bsk's last step is (``align-kmeans-ml2d``), BSK-means++ on the raw images,
``relion-class2d`` (when ``relion_refine`` is on the PATH) and the oracle (k-means, or
align-kmeans with in-plane angles, on the clean images). CDAE rows are in ``bench cdae``, on a
grid of its own (its pre-training would double the time); they are not repeated here.
Columns: F1, accuracy, NMI, smallest/largest class size ratio, seconds; for drvae-bsk and RELION
also the correlation of each class average with its matched true view (best over in-plane angles):
RELION's own (regularised) averages, and for drvae-bsk both the plain mean of the raw images and
the mean regularised per shell by its half-set SSNR as RELION's 2D references are.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cryoprior import classical
from cryoprior.bench.common import write_result
from cryoprior.classical.cluster import align_kmeans, class_averages, cluster
from cryoprior.classical.cluster.averages import ssnr_averages
from cryoprior.classical.cluster.ml2d import annealing_of, ml2d
from cryoprior.core.filters import normalize_images
from cryoprior.core.metrics import classification_scores, match_labels
from cryoprior.core.rotations import rotate_images
from cryoprior.errors import InputError
from cryoprior.fileutil import atomic_path
from cryoprior.io.stack import ParticleStack
from cryoprior.nn.cdae_ops import flip_by_star, flipped_images
from cryoprior.nn.drvae import DRVAEConfig, train_drvae
from cryoprior.progress import progress
from cryoprior.sim.dataset import SimulationConfig, discrete_view_rotations, simulate_dataset
from cryoprior.sim.structures import recommended_pixel_size_a

from . import relion_class2d

DEV_STRUCTURE = "3q4o"
TESTS = ("1h4a", "1or4", "1pwc")
CONFORMATIONS = ("1ake", "4ake")
K_VIEWS = 4
MAX_SHIFT_PX = 3
#: name -> (SNR, kind); kind: views | inplane | ctf | conf | conf-70-30
SETTINGS: dict[str, tuple[float, str]] = {
    "views-snr0.1": (0.1, "views"),
    "views-snr0.05": (0.05, "views"),
    "views-snr0.01": (0.01, "views"),
    "inplane-snr0.1": (0.1, "inplane"),
    "inplane-snr0.05": (0.05, "inplane"),
    "inplane-snr0.01": (0.01, "inplane"),
    "ctf-uniform-snr0.05": (0.05, "ctf"),
    "views-ctf-snr0.05": (0.05, "views-ctf"),
    "conformations-snr0.05": (0.05, "conf"),
    "conformations-70-30-snr0.05": (0.05, "conf-70-30"),
    "cones-ctf-snr0.05": (0.05, "cones-ctf"),
}
ROTATED = ("inplane", "cones-ctf")  # random in-plane angles and shifts
ALIGNED = (*ROTATED, "ctf")  # settings whose rows align (uniform orientations carry in-plane angles too)
#: cones-ctf: each particle within this many degrees of one of the K views (uniform on the cap)
CONE_DEG = 15.0
ORACLE_SEEDINGS = 10
#: how stacks are seeded (``_stack_seed``); runs before it seeded them by their place in the run
STACK_SEEDING = "by-setting-and-structure"
QUICK_SETTINGS = ("views-snr0.05", "views-snr0.01", "inplane-snr0.05", "conformations-70-30-snr0.05")


def _simulate(setting: str, structure: str, n: int, box: int, seed: int, out: Path) -> tuple[ParticleStack, np.ndarray, int]:
    """The stack, its truth labels and K."""
    snr, kind = SETTINGS[setting]
    structures = list(CONFORMATIONS) if kind.startswith("conf") else [structure]
    pixel = max(recommended_pixel_size_a(s, 64) for s in structures) * 64 / box
    cfg = SimulationConfig(structures=structures, box=box, pixel_size_a=pixel, n=n, snr=snr, seed=seed,
                           views=1 if kind.startswith("conf") else (None if kind == "ctf" else K_VIEWS),
                           inplane=kind in ROTATED, shift_a=MAX_SHIFT_PX * pixel if kind in ROTATED else 0.0,
                           ctf=kind in ("ctf", "views-ctf", "cones-ctf"),
                           view_spread_deg=CONE_DEG if kind == "cones-ctf" else 0.0)
    simulate_dataset(cfg, out)
    stack = ParticleStack.from_file(out / "particles.star")
    if kind.startswith("conf"):
        labels = stack.column("cpConformationLabel").astype(np.int64)
        if kind == "conf-70-30":  # keep all of conformation 0 and 3/7 as many of conformation 1
            first, second = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
            keep = np.sort(np.concatenate([first, second[: int(len(first) * 3 / 7)]]))
            stack, labels = stack.subset(keep), labels[keep]
        return stack, labels, 2
    if kind == "ctf":  # the nearest of K reference viewing directions
        from cryoprior.io.relion import poses_from_star

        rots, _ = poses_from_star(stack, np.arange(len(stack)))
        dirs = rots[:, 2, :].double()  # (n, 3) viewing directions
        ref = discrete_view_rotations(K_VIEWS, seed)[:, 2, :]
        return stack, (dirs @ ref.T).argmax(1).numpy().astype(np.int64), K_VIEWS
    return stack, stack.column("cpViewLabel").astype(np.int64), K_VIEWS


def _rot_corr(a: np.ndarray, b: np.ndarray, n_angles: int = 36) -> float:
    """Largest correlation of image ``b`` with ``a`` over in-plane rotations of ``b``."""
    angles = torch.arange(n_angles, dtype=torch.float32) * (2 * math.pi / n_angles)
    rb = rotate_images(torch.as_tensor(b)[None, None].expand(n_angles, 1, *b.shape).contiguous(), angles)[:, 0]
    return max(float(np.corrcoef(a.ravel(), r.numpy().ravel())[0, 1]) for r in rb)


def _average_corr(true_views: np.ndarray, averages: np.ndarray, truth: np.ndarray, labels: np.ndarray) -> float:
    """Mean over true classes of the rotation-invariant correlation of the matched class average."""
    mapping = match_labels(truth, labels)  # pred -> true
    return round(float(np.mean([_rot_corr(true_views[t], averages[p]) for p, t in mapping.items()])), 4)


def _row(truth: np.ndarray, labels: np.ndarray, k: int, seconds: float, **extra) -> dict:
    s = classification_scores(truth, labels)
    sizes = np.bincount(labels, minlength=k)
    return {"f1": round(s["f1"], 4), "accuracy": round(s["accuracy"], 4), "nmi": round(s["nmi"], 4),
            "size_ratio": round(float(sizes.min() / max(sizes.max(), 1)), 3), "seconds": round(seconds, 1), **extra}


def clean_images(stack: ParticleStack) -> np.ndarray:
    """The stack's clean images ``(n, d, d)``, normalised per image and, with CTF columns,
    phase-flipped as every row's input is (the simulator's clean images carry the CTF: unflipped,
    k-means splits them by defocus, not by view)."""
    clean = torch.as_tensor(stack.read_image_column("cpCleanImageName"))
    if stack.has_column("rlnDefocusU"):
        clean = flip_by_star(stack, clean)
    return normalize_images(clean).numpy()


def oracle_row(clean: np.ndarray, truth: np.ndarray, k: int, aligned: bool, seed: int) -> dict:
    """The ceiling: k-means (with in-plane angles: align-kmeans, ``ORACLE_SEEDINGS`` seedings,
    since with 3 aligned k-means of clean images can stop in a local minimum) on the clean images."""
    t0 = time.perf_counter()
    if aligned:
        labels = align_kmeans(clean, k, seed, max_shift=MAX_SHIFT_PX, n_init=ORACLE_SEEDINGS)[0]
    else:
        labels = cluster(clean, k, "kmeans", seed)
    return _row(truth, labels, k, time.perf_counter() - t0)


def evaluate(stack: ParticleStack, truth: np.ndarray, k: int, kind: str, work: Path, seed: int, drvae: DRVAEConfig,
             relion_iterations: int, relion_row: dict | None = None) -> dict:
    """Every row of the grid on one stack (``relion_row``: RELION's row from an earlier run on the
    same stack, taken instead of running it again)."""
    raw, _ = flipped_images(stack)  # every row sees phase-flipped images (with CTF), as classify gives them
    x = normalize_images(raw).numpy()
    clean = clean_images(stack)
    aligned = kind in ALIGNED
    true_views = class_averages(clean, truth, k)
    rows: dict = {"oracle": oracle_row(clean, truth, k, aligned, seed)}

    def timed(fn):
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0

    cfg = dataclasses.replace(drvae, classes=k, seed=seed, align=aligned, max_shift_px=MAX_SHIFT_PX if aligned else 0)
    result, s = timed(lambda: train_drvae(stack, cfg, work / "drvae", "cpu"))
    rows["drvae-bsk"] = _row(truth, result.labels, k, s, rounds=len(result.curves["rounds"]),
                             average_corr=_average_corr(true_views, class_averages(x, result.labels, k), truth, result.labels),
                             average_corr_ssnr=_average_corr(true_views, ssnr_averages(x, result.labels, k), truth,
                                                             result.labels))
    labels, s = timed(lambda: cluster(normalize_images(torch.as_tensor(classical.denoise(x, "lowpass"))).numpy(), k, "kmeans", seed))
    rows["lowpass-kmeans"] = _row(truth, labels, k, s)
    labels, s = timed(lambda: cluster(x, k, "pca-kmeans", seed))
    rows["pca-kmeans"] = _row(truth, labels, k, s)
    (labels, _, _, averages), s = timed(lambda: align_kmeans(x, k, seed, max_shift=MAX_SHIFT_PX))
    rows["align-kmeans"] = _row(truth, labels, k, s)
    if aligned:  # what ML2D gives without the network: drvae-bsk's last step after align-kmeans
        labels, s_ml = timed(lambda: ml2d(x, averages, max_shift=MAX_SHIFT_PX, iterations=drvae.ml2d_iterations,
                                          **annealing_of(drvae))[0])
        rows["align-kmeans-ml2d"] = _row(truth, labels, k, s + s_ml)
    labels, s = timed(lambda: cluster(x, k, "bsk", seed))
    rows["bsk-raw"] = _row(truth, labels, k, s)
    reason = relion_class2d.available()
    if relion_row is not None:
        rows["relion-class2d"] = relion_row
    elif reason is None:
        try:
            rel = relion_class2d.run_class2d(stack, k, work / "relion", iterations=relion_iterations, seed=seed)
            rows["relion-class2d"] = _row(truth, rel["labels"], k, rel["seconds"],
                                          average_corr=_average_corr(true_views, rel["averages"], truth, rel["labels"]))
        except RuntimeError as exc:
            rows["relion-class2d"] = {"skipped": str(exc)}
    else:
        rows["relion-class2d"] = {"skipped": reason}
    return rows


def markdown(result: dict) -> str:
    cols = ("f1", "accuracy", "nmi", "size_ratio", "seconds", "average_corr", "average_corr_ssnr")
    lines = []
    for setting, per_structure in result["grid"].items():
        for structure, rows in per_structure.items():
            lines += [f"### {setting} / {structure} (n = {rows['n']}, K = {rows['k']})", "",
                      "| method | F1 | accuracy | NMI | min/max size | s | avg corr | avg corr, SSNR-regularised |",
                      "|---|---|---|---|---|---|---|---|"]
            for name, row in rows["rows"].items():
                if "skipped" in row:
                    lines.append(f"| {name} | skipped: {row['skipped']} ||||||| ")
                    continue
                lines.append(f"| {name} | " + " | ".join(str(row.get(c, "")) for c in cols) + " |")
            lines.append("")
    return "\n".join(lines)


def _earlier_relion_rows(path: str | Path | None, n: int, box: int, seed: int, relion_iterations: int) -> dict:
    """``{(setting, structure): row}`` of RELION from an earlier ``bench_drvae.json`` run with the
    same ``n``, ``box``, ``seed``, RELION iterations and stack seeding (the simulated stacks are
    then the same); an InputError when they differ."""
    if path is None:
        return {}
    old = json.loads(Path(path).read_text())
    same = {"n": n, "box": box, "seed": seed, "relion_iterations": relion_iterations, "stack_seeding": STACK_SEEDING}
    differ = [key for key, value in same.items() if old.get(key) != value]
    if differ:
        raise InputError(f"was run with other {', '.join(differ)}; its RELION rows are not for these stacks", path)
    return {(s, t): {**rows["rows"]["relion-class2d"], "reused_from": str(path)}
            for s, per in old["grid"].items() for t, rows in per.items() if "f1" in rows["rows"].get("relion-class2d", {})}


def _stack_seed(seed: int, setting: str, structure: str) -> int:
    """The simulation seed of a stack: fixed by the setting and structure (``STACK_SEEDING``)."""
    return seed + 10 + 100 * list(SETTINGS).index(setting) + TESTS.index(structure)


def _job_file(out_dir: Path, setting: str, structure: str, key: dict) -> Path:
    """Where a finished (setting, structure) job's rows are kept, so that a rerun resumes."""
    tag = "_".join(f"{k}{v}" for k, v in key.items())
    return out_dir / "jobs" / f"{setting}_{structure}_{tag}.json"


def run(n: int = 2000, box: int = 64, quick: bool = False, out_dir: str | Path | None = None, seed: int = 0,
        settings: list[str] | None = None, relion_iterations: int | None = None,
        relion_from: str | Path | None = None, structures: list[str] | None = None) -> dict:
    """The grid with ``n`` particles per stack (``quick``: ``QUICK_SETTINGS`` on the first test
    structure, RELION with 10 iterations instead of 25; ``structures``: a subset of ``TESTS``).
    Writes ``bench_drvae.json``/``.md`` to ``out_dir`` when given, and each finished job to
    ``out_dir/jobs/``: a rerun with the same arguments and DRVAE defaults takes those instead of
    running them again.
    ``relion_from``: an earlier ``bench_drvae.json`` of the same ``n``, ``box``, ``seed`` and RELION
    iterations whose RELION rows are taken instead of running RELION again on the settings it
    holds (the stacks are simulated from the same seeds)."""
    settings = list(settings or (QUICK_SETTINGS if quick else SETTINGS))
    unknown = sorted(set(settings) - set(SETTINGS)) + sorted(set(structures or ()) - set(TESTS))
    if unknown:
        raise InputError(f"bench drvae: unknown setting or test structure {', '.join(unknown)}")
    relion_iterations = relion_iterations or (10 if quick else 25)
    earlier = _earlier_relion_rows(relion_from, n, box, seed, relion_iterations)
    drvae = DRVAEConfig()
    config_tag = hashlib.sha1(json.dumps(dataclasses.asdict(drvae), sort_keys=True).encode()).hexdigest()[:8]
    tests = list(structures or (TESTS[:1] if quick else TESTS))
    jobs = [(s, t) for s in settings for t in tests if not SETTINGS[s][1].startswith("conf") or t == tests[0]]
    t_start = time.perf_counter()
    grid: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench_drvae_") as tmp:
        for setting, structure in progress(jobs, "bench drvae"):
            # the stack's seed follows the setting and structure, not the job's place in the run
            stack_seed = _stack_seed(seed, setting, structure)
            name = "+".join(CONFORMATIONS) if SETTINGS[setting][1].startswith("conf") else structure
            key = {"n": n, "box": box, "seed": stack_seed, "relion": relion_iterations, "drvae": config_tag}
            done = _job_file(Path(out_dir), setting, name, key) if out_dir is not None else None
            if done is not None and done.exists():
                grid.setdefault(setting, {})[name] = json.loads(done.read_text())
                continue
            work = Path(tmp) / f"{setting}_{structure}"
            stack, truth, k = _simulate(setting, structure, n, box, stack_seed, work / "sim")
            rows = evaluate(stack, truth, k, SETTINGS[setting][1], work, seed, drvae, relion_iterations,
                            earlier.get((setting, name)))
            grid.setdefault(setting, {})[name] = {"n": len(stack), "k": k, "stack_seed": stack_seed, "rows": rows}
            if done is not None:
                done.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(done) as tmp_file:
                    tmp_file.write_text(json.dumps(grid[setting][name], indent=1))
    result = {
        "n": n, "box": box, "seed": seed, "stack_seeding": STACK_SEEDING, "quick": quick, "settings": settings, "structures": tests,
        "threads": torch.get_num_threads(), "machine": platform.machine(),
        "dev_structure": DEV_STRUCTURE, "test_structures": list(TESTS), "relion_iterations": relion_iterations,
        "drvae_config": dataclasses.asdict(drvae), "grid": grid, "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    result["markdown"] = markdown(result)
    write_result(out_dir, "bench_drvae", result)
    return result
