"""``report.html`` for a run folder: one self-contained page (PNG figures as base64 data URIs,
inline CSS, no scripts, nothing fetched).

The builder reads what the folder holds and shows a section per result it finds, so a partial
or interrupted run gets the part of the report it has earned:

- ``config.yaml``: the header (package version, time, command line, configuration);
- ``stages.json`` (+ the planned ``stages`` in config.yaml): each stage done (with its time), not
  available in this version (with the reason), or not run;
- ``metrics.json`` at the top: the run's summary numbers;
- ``*/dataset.json``: the simulated data, a gallery per SNR level, the source maps;
- result folders, by the ``kind`` in their ``metrics.json`` or else by the files they hold:
  ``denoise`` (``denoised.star``, ``losses.json``): a table against the baselines of the same
  run, noisy / denoised / clean galleries, training curves; ``classify``
  (``class_averages.mrcs`` + ``particles.star``): scores, class averages beside the true views;
  ``reconstruct`` (``fsc.json``, ``map.mrc``): resolutions, FSC curves, central slices and
  projections beside the true map; any other ``metrics.json``: a table of its numbers.

The figures are also saved as PNG files in ``<run>/figures/``.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import logging
import math
import re
from pathlib import Path

import numpy as np

from cryoprior import __version__
from cryoprior.classical.cluster import class_averages
from cryoprior.config import read_run_config
from cryoprior.core.metrics import match_labels
from cryoprior.fileutil import atomic_path
from cryoprior.io.mrc import read_map, read_mrc
from cryoprior.io.stack import ParticleStack
from cryoprior.report import plots
from cryoprior.report.html import CSS, Page, Raw, esc, table

log = logging.getLogger(__name__)

SKIP_DIRS = {"figures", "checkpoints", "volumes", "logs"}

#: how methods are named in tables and figures
METHOD_LABELS = {
    "cdae": "CDAE", "nlm": "non-local means", "lowpass": "Gaussian low-pass", "wiener": "Wiener filter",
    "bm3d": "BM3D", "topaz": "Topaz-Denoise (pretrained)", "kmeans": "k-means", "cdae-kmeans": "CDAE + k-means", "drvae-bsk": "DRVAE + BSK-means++", "gaussian": "MAP, Gaussian prior",
    "red": "MAP, RED prior (3D U-Net)", "cw-red": "MAP, CW-RED prior (3D U-Net)",
    "gan": "(.5,.5)-GAN+ℓ1", "l1-ae": "ℓ1-AE",
}


#: what a run of each config type did, for the top of its report
_INTROS = {
    "DemoConfig": "This run simulated particle images of a protein with known truth and put them through the "
    "stages below (denoising, 2D classification, 3D reconstruction) with each method this version has. Every "
    "number was measured in this run against the simulator's ground truth, all methods on the same particles.",
}


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def _find(run: Path, name: str, depth: int = 3) -> list[Path]:
    """Files called ``name`` in ``run`` and below (``depth`` levels), hidden and bulky folders skipped."""
    found = []
    for p in sorted(run.rglob(name)):
        rel = p.relative_to(run).parts
        if len(rel) <= depth and not any(s.startswith(".") or s in SKIP_DIRS for s in rel[:-1]):
            found.append(p)
    return found


# ---- sections -------------------------------------------------------------------------------
def _header(page: Page, cfg: dict) -> None:
    page.add(f"<h1>cryoprior run report: {esc(page.run.name)}</h1>")
    when = cfg.get("time", "unknown time")
    version = cfg.get("cryoprior_version", "unknown")
    page.add(f'<p class="meta">Run started {esc(when)} with cryoprior {esc(version)}; report '
             f"written {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')} by "
             f"cryoprior {__version__}. Folder: <code>{esc(page.run.resolve())}</code></p>")
    if cfg.get("argv"):
        page.add(f"<p>Command: <code>{esc(' '.join(map(str, cfg['argv'])))}</code></p>")
    if cfg.get("config_type") in _INTROS:
        page.add(f"<p>{_INTROS[cfg['config_type']]}</p>")
    if cfg.get("config"):
        rows = [[k, json.dumps(v) if isinstance(v, (list, dict)) else v] for k, v in cfg["config"].items()]
        page.add(f"<details><summary>Configuration ({esc(cfg.get('config_type', ''))})</summary>"
                 f"{table(['field', 'value'], rows)}</details>")


def _stages_section(page: Page, stages: dict, planned: list[str]) -> None:
    names = list(dict.fromkeys([*planned, *stages]))
    if not names:
        return
    rows = []
    for name in names:
        rec = stages.get(name)
        if rec is None:
            rows.append([name, Raw('<span class="missing">not run yet</span>'), "", "", "the run stopped before it"])
        elif rec.get("status", "done") == "done":
            rows.append([name, Raw('<span class="done">done</span>'), rec.get("seconds", ""), rec.get("cpu_seconds", ""), ""])
        else:
            status = Raw('<span class="unavailable">not available in this version</span>')
            rows.append([name, status, "", "", rec.get("reason", "")])
    page.add("<h2>Stages</h2>")
    page.add(table(["stage", "status", "wall time (s)", "CPU time (s)", "note"], rows))
    page.add("<p>CPU time adds up the time of all threads of the process; on a shared machine wall time "
             "also counts the waiting.</p>")


def _summary_section(page: Page, metrics: dict) -> None:
    rows = [[k.replace("_", " "), f"{v:.4g}" if isinstance(v, float) else v]
            for k, v in metrics.items() if isinstance(v, (int, float, str))]
    if rows:
        page.add("<h3>Run metrics</h3>" + table(["quantity", "value"], rows))


def _example_rows(stack: ParticleStack, n_max: int = 4) -> np.ndarray:
    """One particle per true view (first of each) when the table has views, else the first few."""
    if stack.has_column("cpViewLabel"):
        views = stack.column("cpViewLabel")
        if (views >= 0).all():
            firsts = [int(np.flatnonzero(views == v)[0]) for v in np.unique(views)]
            return np.array(firsts[:n_max])
    return np.arange(min(len(stack), n_max))


def _data_section(page: Page, paths: list[Path]) -> None:
    """One settings table for all simulated datasets, a gallery each, and each source map once."""
    page.add("<h2>Data</h2>")
    infos = [(p.parent, _read_json(p)) for p in paths]
    names = [esc(f.relative_to(page.run)) for f, _ in infos]
    cfgs = [i.get("config", {}) for _, i in infos]

    def row(label: str, fn) -> list:
        return [label, *(fn(c) for c in cfgs)]

    rows = [
        row("particles", lambda c: c.get("n")), row("box (pixels)", lambda c: c.get("box")),
        row("pixel size (Å)", lambda c: c.get("pixel_size_a")),
        row("structures", lambda c: ", ".join(map(str, c.get("structures", [])))),
        row("orientations", lambda c: f"{c['views']} discrete views" if c.get("views") else "uniform on SO(3)"),
        row("SNR of particles.mrcs", lambda c: c.get("snr")),
        row("extra SNR levels", lambda c: ", ".join("clean" if float(s) == math.inf else f"{float(s):g}"
                                                    for s in c.get("snr_levels", [])) or "none"),
        row("CTF", lambda c: "yes" if c.get("ctf") else "no"),
        row("max origin offset (Å)", lambda c: c.get("shift_a", 0.0)),
        row("contamination", lambda c: c.get("contamination") or "none"),
        row("seed", lambda c: c.get("seed")),
    ]
    page.add(table(["setting", *(f"<code>{n}</code>" for n in names)], rows))
    page.add("<p>SNR = variance of the clean image / variance of the added noise (one noise level per "
             "stack). The clean images carry the CTF where there is one.</p>")
    maps: dict[str, np.ndarray] = {}
    for (folder, info), cfg in zip(infos, cfgs):
        _guarded(page, folder, _dataset_gallery, page, folder, info, cfg)
        for v in info.get("volumes", []):
            if Path(v).stem not in maps and (folder / v).exists():
                maps[Path(v).stem] = read_map(folder / v)[0]
    if maps:
        px = float(cfgs[0].get("pixel_size_a", 1.0))
        page.figure(plots.map_views(maps, px), "source_maps",
                    "The source map(s) the particles were projected from (built from the atomic model): central "
                    "slices and projections (sums along the axis).", "source map views")


def _dataset_gallery(page: Page, folder: Path, info: dict, cfg: dict) -> None:
    px = float(cfg.get("pixel_size_a", 1.0))
    stack = ParticleStack.from_file(folder / "particles.star")
    idx = _example_rows(stack, 4 if cfg.get("views") else 6)
    levels = {float(k): v for k, v in info.get("levels", {}).items()}
    if math.inf not in levels and (folder / "clean.mrcs").exists():
        levels[math.inf] = "clean.mrcs"
    columns = sorted(levels.items(), key=lambda kv: -kv[0])
    if float(cfg.get("snr", math.nan)) not in levels:
        columns.append((float(cfg["snr"]), "particles.mrcs"))
    grid = [[np.asarray(read_mrc(folder / name)[0][i]) for i in idx] for _, name in columns]
    row_labels = ["clean" if math.isinf(s) else f"SNR {s:g}" for s, _ in columns]
    views = _view_labels(stack)
    col_labels = [f"view {views[i] + 1}" if views is not None else f"particle {i + 1}" for i in idx]
    rel = folder.relative_to(page.run)
    page.figure(
        plots.image_grid(grid, row_labels, col_labels, pixel_size_a=px), f"data_{rel.name}",
        f"<code>{esc(rel)}</code>: example particles, clean and at each noise level "
        f"({'one per view' if views is not None else 'uniform orientations, CTF-modulated' if cfg.get('ctf') else 'the first few'}). "
        f"Each panel is scaled to its own 1st–99th percentile; {px:g} Å per pixel.", f"particle gallery of {rel}",
    )


def _label(folder: Path, m: dict) -> str:
    return str(m.get("label") or METHOD_LABELS.get(str(m.get("method") or m.get("prior")), folder.name))


def _seconds(m: dict, stages: dict, folder: Path) -> float | str:
    rec = stages.get(folder.name, {})
    secs = rec.get("seconds") if isinstance(rec, dict) else None
    return secs if secs is not None else m.get("seconds", "")


def _view_labels(stack: ParticleStack) -> np.ndarray | None:
    """True view labels ``(n,)`` when the table has them for every particle, else None."""
    if stack.has_column("cpViewLabel"):
        views = np.asarray(stack.column("cpViewLabel"), dtype=np.int64)
        if (views >= 0).all():
            return views
    return None


def _heldout_section(page: Page, items: list[tuple[Path, dict]], stages: dict) -> None:
    _denoise_section(page, items, stages, heldout=True)


def _denoise_section(page: Page, items: list[tuple[Path, dict]], stages: dict, heldout: bool = False) -> None:
    """The denoising table, gallery and training curves; ``heldout``: of the held-out particles of
    the uniform CTF stack (the demo's ``heldout_*`` stages)."""
    tag = "heldout_" if heldout else ""
    if heldout:
        page.add("<h2>Denoising held-out particles (CTF, shifts, uniform orientations)</h2>")
        page.add("<p>The uniform stack was split with a fixed seed into training and held-out particles. The GAN "
                 "and the ℓ1-AE learned from pairs of (noisy training particle, projection of the Gaussian-prior "
                 "reconstruction of the noisy particles at that particle's pose, with its CTF): the robust-GAN "
                 "paper's protocol for real data (<code>cryoprior denoise train --method gan --reference-map</code>); "
                 "neither saw the true map or a clean image. The CDAE is the shipped generic model fine-tuned on "
                 "the training particles' noisy images; the classical filters see only the held-out images. Every "
                 "method is scored on the same held-out particles against their clean images, CTF included.</p>")
    else:
        page.add("<h2>Denoising</h2>")
    rows, refs = [], {}
    for folder, m in items:
        for key, label in (("input", "noisy input (no denoising)"),
                           ("stack_mean", "reference: the stack's mean image for every particle")):
            if key not in refs and f"{key}_psnr_db" in m:
                refs[key] = [label, m[f"{key}_psnr_db"], m.get(f"{key}_ssim"), m.get(f"{key}_psnr_fitted_db", ""),
                             m.get(f"{key}_spread_ratio", ""), "", m.get("n_images")]
        rows.append([_label(folder, m), m.get("psnr_db"), m.get("ssim"), m.get("psnr_fitted_db", ""),
                     m.get("spread_ratio", ""), _seconds(m, stages, folder), m.get("n_images")])
    rows = [refs[k] for k in ("input", "stack_mean") if k in refs] + rows
    scored = [i for i, r in enumerate(rows) if isinstance(r[1], (int, float)) and not r[0].startswith("reference")]
    best = max(scored, key=lambda i: rows[i][1]) if scored else None
    page.add(table(["method", "PSNR (dB)", "SSIM", "PSNR after a per-image affine fit (diagnostic)",
                    "spread across particles (clean = 1)", "time (s)", "images"],
                   rows, best))
    page.add("<p>PSNR and SSIM against the clean projections in the data's intensity units (every denoiser "
             "returns its estimate of the clean image in its input's units; peak = each clean image's range), "
             "mean over the images; no fit. Higher is better; the best PSNR is in bold. The diagnostic column "
             "normalises each image and its reference to zero mean and unit variance first, which forgives "
             "any error of scale or offset. The spread "
             "measures how much the images differ from one another (standard deviation across particles, mean "
             "over pixels) relative to the clean projections: near 0, a denoiser returns nearly the same image "
             "for every particle, whatever its PSNR (the reference row shows what that scores here); above 1, "
             "noise is left. All methods ran on the same particles in this run; time includes training.</p>")
    stacks = [(_label(folder, m), ParticleStack.from_file(folder / m["images"]))
              for folder, m in items if m.get("images") and (folder / m["images"]).exists()]
    if stacks:
        first = stacks[0][1]
        idx = _example_rows(first, 4)
        cols, labels = [], []
        if first.has_column("cpNoisyImageName"):
            cols.append(first.read_image_column("cpNoisyImageName", idx))
            labels.append("noisy")
        for label, st in stacks:
            cols.append(st.images(idx))
            labels.append(label)
        if first.has_column("cpCleanImageName"):
            cols.append(first.read_image_column("cpCleanImageName", idx))
            labels.append("clean")
        views = _view_labels(first)
        row_labels = [f"view {views[i] + 1}" if views is not None else f"particle {i + 1}" for i in idx]
        grid = [[col[r] for col in cols] for r in range(len(idx))]
        page.figure(plots.image_grid(grid, row_labels, labels, pixel_size_a=first.pixel_size_a),
                    f"{tag}denoise_gallery", "The same particles: noisy input, each method's output and the clean "
                    "projection. Each panel is scaled to its own 1st–99th percentile.", "denoising gallery")
    histories = {_label(folder, m): _read_json(folder / "losses.json")
                 for folder, m in items if (folder / "losses.json").exists()}
    if histories:
        gan = ("GAN and ℓ1-AE: the generator's objective (adversarial term + λ·ℓ1, or ℓ1 alone) in stack-scaled "
               "units. " if heldout else "")
        page.figure(plots.training_curves(histories), f"{tag}training_curves",
                    "Training loss per epoch of each network, from its <code>losses.json</code>. " + gan
                    + "CDAE: mean squared error in normalised image units, each block (pre-trained on simulated SNR pairs: the shipped "
                    "generic model unless the run had <code>--pretrain</code>) fine-tuned on the stack towards "
                    "the means of each image's nearest neighbours.",
                    "training curves")


def _classify_section(page: Page, items: list[tuple[Path, dict]], stages: dict, inplane: bool = False) -> None:
    page.add("<h2>2D classification, particles at random in-plane angles and shifts</h2>" if inplane
             else "<h2>2D classification</h2>")
    rows = []
    for folder, m in items:
        rows.append([_label(folder, m), m.get("accuracy"), m.get("f1"), m.get("nmi"), m.get("ari"),
                     m.get("classes"), _seconds(m, stages, folder)])
    scored = [i for i, r in enumerate(rows) if isinstance(r[2], (int, float)) and not items[i][1].get("oracle")]
    best = max(scored, key=lambda i: rows[i][2]) if scored else None
    page.add(table(["method", "accuracy", "F1 (macro)", "NMI", "ARI", "classes", "time (s)"], rows, best))
    page.add("<p>Scores against the true view labels after matching classes to views (Hungarian). 1 is "
             "perfect; NMI and ARI are 0 for a random assignment. The oracle groups the particles by their "
             "true labels: its averages show what averaging alone gives at this number of particles.</p>")
    grid, labels, px = [], [], None
    for folder, m in items:
        if not (folder / "class_averages.mrcs").exists():
            continue
        avgs, px = read_mrc(folder / "class_averages.mrcs")
        avgs = np.asarray(avgs)
        order = list(range(len(avgs)))
        star = folder / "particles.star"
        stack = ParticleStack.from_file(star) if star.exists() else None
        views = _view_labels(stack) if stack is not None else None
        if stack is not None and views is not None and stack.has_column("rlnClassNumber"):
            classes = np.asarray(stack.column("rlnClassNumber"), dtype=np.int64) - 1
            if not grid and stack.has_column("cpCleanImageName") and not inplane:  # (in-plane: a blur)
                k = int(views.max()) + 1
                clean = stack.read_image_column("cpCleanImageName")
                grid.append(list(class_averages(clean, views, k)))
                labels.append("true views (clean)")
            to_view = match_labels(views, classes)  # class -> view
            by_view = {v: c for c, v in to_view.items()}
            order = [by_view[v] for v in sorted(by_view)] + [c for c in order if c not in to_view]
        grid.append([avgs[c] for c in order])
        labels.append(_label(folder, m))
    if grid:
        cols = [f"view {j + 1}" for j in range(max(len(r) for r in grid))]
        caption = ("Class averages of the particles, each aligned to its class's average by the method's in-plane "
                   "angle and shift" if inplane else "Class averages of the raw particles for each method, beside "
                   "the mean clean projection of each true view")
        page.figure(plots.image_grid(grid, labels, cols, pixel_size_a=px), "class_averages_inplane" if inplane else "class_averages",
                    caption + "; column j holds the class matched to view j. Each panel is scaled to its "
                    "own 1st–99th percentile.", "class averages")


def _truth_map(page: Page, folder: Path) -> Path | None:
    """The true map named by the reconstruction's config.yaml (``truth``), when it is a file."""
    if not (folder / "config.yaml").exists():
        return None
    spec = read_run_config(folder / "config.yaml").get("config", {}).get("truth")
    if not spec:
        return None
    path = Path(spec)
    if path.is_file():
        return path
    moved = _find(page.run, path.name, depth=4) if path.suffix == ".mrc" else []  # the run folder moved
    return moved[0] if moved else None


def _reconstruct_section(page: Page, items: list[tuple[Path, dict]], stages: dict) -> None:
    page.add("<h2>3D reconstruction</h2>")
    rows, truth_curves, half_curves, maps, box, px = [], {}, {}, {}, None, None
    for folder, m in items:
        label = _label(folder, m)
        rows.append([label, m.get("resolution_truth_05_a"), m.get("resolution_truth_0143_a"),
                     m.get("resolution_half_0143_a"), m.get("lambda"), m.get("n_particles"), _seconds(m, stages, folder)])
        if m.get("fsc_truth"):
            truth_curves[label] = m["fsc_truth"]
        if m.get("fsc_half"):
            half_curves[label] = m["fsc_half"]
        box, px = m.get("box", box), m.get("pixel_size_a", px)
        truth = _truth_map(page, folder)
        if truth is not None and "true map" not in maps:
            maps["true map"] = read_map(truth)[0]
        if (folder / "map.mrc").exists():
            maps[label] = read_map(folder / "map.mrc")[0]
    scored = [i for i, r in enumerate(rows) if isinstance(r[2], (int, float))]
    best = min(scored, key=lambda i: rows[i][2]) if scored else None
    page.add(table(["method", "resolution vs truth, FSC 0.5 (Å)", "vs truth, FSC 0.143 (Å)",
                     "half maps, FSC 0.143 (Å)", "RED weight λ", "particles", "time (s)"], rows, best))
    page.add("<p>Resolution where the Fourier shell correlation drops below the threshold: of the full map "
             "with the true map, and between the two independently reconstructed half maps (the gold "
             "standard used on real data). Smaller is better; the best against the truth at 0.143 is in "
             "bold. Poses and CTFs are the known ones, so the methods differ only in the prior.</p>")
    if (truth_curves or half_curves) and box and px:
        panels = {k: v for k, v in (("FSC with the true map", truth_curves),
                                    ("FSC between half maps", half_curves)) if v}
        page.figure(plots.fsc_curves(panels, int(box), float(px)), "fsc",
                    "Fourier shell correlation against spatial frequency; the top axis reads the same frequency "
                    "as a resolution in Å. Dashed: FSC = 0.5, dotted: FSC = 0.143.", "FSC curves")
    if maps:
        page.figure(plots.map_views(maps, px), "maps",
                    "Central slices and projections (sums along the axis) of the true map and of each "
                    "reconstruction; each panel scaled to its own 1st–99th percentile.", "map slices")


def _other_section(page: Page, folder: Path, m: dict) -> None:
    rows = [[k.replace("_", " "), v] for k, v in m.items() if isinstance(v, (int, float, str))]
    page.add(f"<h3>{esc(_label(folder, m))} (<code>{esc(folder.relative_to(page.run))}</code>)</h3>")
    page.add(table(["quantity", "value"], rows) if rows else "<p>No numbers recorded.</p>")


_SECTIONS = {"denoise": _denoise_section, "classify": _classify_section,
             "classify_inplane": functools.partial(_classify_section, inplane=True), "reconstruct": _reconstruct_section,
             "denoise_heldout": _heldout_section}
#: files that make a folder a result, and the kind they imply when metrics.json has no ``kind``
_MARKERS = {"fsc.json": "reconstruct", "class_averages.mrcs": "classify", "denoised.star": "denoise",
            "losses.json": "denoise", "metrics.json": "other"}


def _results(run: Path, stage_order: list[str]) -> dict[str, list[tuple[Path, dict]]]:
    """Result folders below ``run`` grouped by kind, each with its metrics (fsc.json merged in),
    in the order of the run's stages (then by name)."""
    order = {name: i for i, name in enumerate(stage_order)}
    folders: dict[Path, str] = {}
    for marker, kind in _MARKERS.items():
        for path in _find(run, marker):
            top = path.parent == run and kind == "other"  # the run's own summary is not a result
            if not top and folders.get(path.parent, "other") == "other":
                folders[path.parent] = kind
    by_kind: dict[str, list[tuple[Path, dict]]] = {}
    for folder in sorted(folders, key=lambda f: (order.get(f.name, len(order)), f.name)):
        m = _read_json(folder / "metrics.json") if (folder / "metrics.json").exists() else {}
        if (folder / "fsc.json").exists():
            m = {**_read_json(folder / "fsc.json"), **m}
        by_kind.setdefault(str(m.get("kind", folders[folder])), []).append((folder, m))
    return by_kind


def _glance(items: dict[str, list[tuple[Path, dict]]]) -> list[str]:
    lines = []

    def score(m: dict, key: str = "") -> str:
        return (f"{m[f'{key}psnr_db']:.2f} dB / {m.get(f'{key}ssim', math.nan):.3f} / "
                f"{m.get(f'{key}spread_ratio', math.nan):.2f}")

    for kind, what in (("denoise", "Denoising"), ("denoise_heldout", "Denoising held-out particles of the uniform "
                                                  "CTF stack")):
        den = [(f, m) for f, m in items.get(kind, []) if isinstance(m.get("psnr_db"), (int, float))]
        if not den:
            continue
        ref = next((m for _, m in den if "input_psnr_db" in m), None)
        parts = [f"noisy input {score(ref, 'input_')}"] if ref else []
        parts += [f"{esc(_label(f, m))} {score(m)}" for f, m in den]
        if ref and "stack_mean_psnr_db" in ref:
            parts.append(f"reference, the stack's mean image for every particle {score(ref, 'stack_mean_')}")
        lines.append(f"{what}, PSNR / SSIM / spread across particles (clean = 1): " + "; ".join(parts) + ".")
    for kind, what in (("classify", "2D classification"),
                       ("classify_inplane", "2D classification at random in-plane angles and shifts")):
        cls = [(f, m) for f, m in items.get(kind, []) if isinstance(m.get("f1"), (int, float))]
        if cls:
            lines.append(f"{what}, F1: " + "; ".join(f"{esc(_label(f, m))} {m['f1']:.3f}" for f, m in cls) + ".")
    rec = [(f, m) for f, m in items.get("reconstruct", []) if isinstance(m.get("resolution_truth_0143_a"), (int, float))]
    if rec:
        lines.append("3D resolution against the true map (FSC 0.143): "
                     + "; ".join(f"{esc(_label(f, m))} {m['resolution_truth_0143_a']:.2f} Å" for f, m in rec) + ".")
    return lines


def build_report(run_dir: str | Path, out: str | Path | None = None, save_figures: bool = True) -> Path:
    """Write ``report.html`` (default ``<run_dir>/report.html``) for what ``run_dir`` holds."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: not a run folder")
    out = run / "report.html" if out is None else Path(out)
    page = Page(run, save_figures)
    cfg = read_run_config(run / "config.yaml") if (run / "config.yaml").exists() else {}
    stages = _read_json(run / "stages.json") if (run / "stages.json").exists() else {}
    metrics = _read_json(run / "metrics.json") if (run / "metrics.json").exists() else {}
    _header(page, cfg)
    glance_at = len(page.parts)
    _stages_section(page, stages, list(cfg.get("stages", [])))
    _summary_section(page, metrics)
    datasets = sorted(_find(run, "dataset.json"), key=lambda p: p.stat().st_mtime)
    if datasets:
        _guarded(page, run, _data_section, page, datasets)
    by_kind = _results(run, list(dict.fromkeys([*cfg.get("stages", []), *stages])))
    for kind, fn in _SECTIONS.items():
        if kind in by_kind:
            _guarded(page, run, fn, page, by_kind[kind], stages)
    others = [(f, m) for kind, items in by_kind.items() if kind not in _SECTIONS for f, m in items]
    if others:
        page.add("<h2>Other results</h2>")
        for folder, m in others:
            _other_section(page, folder, m)
    glance = _glance(by_kind)
    if glance:
        page.parts.insert(glance_at, "<h2>At a glance</h2><ul class=\"glance\">"
                          + "".join(f"<li>{g}</li>" for g in glance) + "</ul>")
    if len(page.parts) == glance_at:
        page.add("<p>This folder holds no results yet.</p>")
    title = f"cryoprior report: {run.name}"
    doc = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
           f"<style>{CSS}</style></head><body>\n" + "\n".join(page.parts) + "\n</body></html>\n")
    with atomic_path(out) as tmp:
        tmp.write_text(doc, encoding="utf-8")
    log.info("wrote %s", out)
    return out


def _guarded(page: Page, where: Path, fn, *args) -> None:
    """Run one section; a file it cannot read becomes a visible note, not a failed report."""
    try:
        fn(*args)
    except (OSError, ValueError, KeyError) as exc:
        log.warning("report: %s: %s", where, exc)
        msg = re.sub(r"\s+", " ", str(exc))
        page.add(f'<p class="missing">Could not show {esc(where.relative_to(page.run) if where != page.run else where.name)}: '
                 f"{esc(type(exc).__name__)}: {esc(msg)}</p>")
