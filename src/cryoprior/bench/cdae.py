"""``cryoprior bench cdae``: the CDAE paper's protocol (Lei & Yang 2021) on built-in structures.

Four structures of similar size (max. radius 31–32 Å, radius of gyration 16.5–19 Å):
pre-train CDAE (and DnCNN) on ``PRETRAIN`` (4 SNR levels × 4 views × n images), then for each
of the three others and each setting of the grid (SNR 0.1 as in the paper; the harder SNR 0.05
and 0.01; SNR 0.1 and 0.05 with random in-plane rotations; SNR 0.1 and 0.05 with a CTF, defocus
1–3 µm, at uniform orientations, 4 × n images, PSNR only as there are no views to cluster)
simulate 4 views × n noisy images and

- Table 1: PSNR (dB) of every denoiser against the clean images in the data's units (no fit;
  peak = each clean image's range), and as diagnostics after normalising both per image (an
  affine fit) and after histogram equalisation: CDAE (fine-tuned on the test images), the
  shipped generic CDAE (``cdae-generic``: no PDB, fine-tuned on the test images; also as shipped),
  single DAE, DnCNN and the classical baselines of ``cryoprior.classical``. With a CTF the
  networks see phase-flipped images and their output is flipped back (every method estimates the
  particle as recorded, CTF included); the classical filters see the images as they are;
- Table 2: macro F1 / precision / recall of clustering into the 4 views: raw images, every
  denoiser's output (k-means; CDAE also with Ward HC and after equalisation; with in-plane
  rotations also k-means up to rotation, ``align-kmeans``, on every image set), and the oracle
  ceiling (each image given the view of the most correlated clean image of its volume); as a
  diagnostic, k-means on block 1's k-NN fine-tuning targets themselves (``knn-targets-*``).

Speed: CDAE inference images/s at the test size, against DnCNN and the un-optimised model
(float32, NCHW, no inference mode, batches of 32) in the same run.
"""

from __future__ import annotations

import dataclasses
import math
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cryoprior import classical as baselines
from cryoprior.bench.common import write_result
from cryoprior.classical.cluster import cluster
from cryoprior.core.ctf import phase_flip
from cryoprior.core.metrics import classification_scores, psnr
from cryoprior.io.relion import ctf_from_star
from cryoprior.io.stack import ParticleStack
from cryoprior.nn.cdae import CDAEConfig, finetune_cascade, pretrain_cascade, single_dae, with_depth
from cryoprior.nn.cdae_generic import (
    finetune_generic,
    generic_config,
    load_shipped,
    model_box,
    shipped_record,
)
from cryoprior.nn.cdae_ops import (
    flipped_images,
    histogram_equalize,
    knn_mean_targets,
    load_levels,
    normalize,
    psnr_normalised,
)
from cryoprior.nn.denoiser import denoise_images, denoise_tensor
from cryoprior.nn.dncnn import DnCNNConfig, fit_dncnn
from cryoprior.nn.training import resolve_device
from cryoprior.progress import progress
from cryoprior.sim.dataset import SimulationConfig, simulate_dataset

PRETRAIN = "1hvr"
TESTS = ("1h4a", "1or4", "1pwc")
VIEWS = 4
PIXEL_SIZE_AT_64 = 1.25  # Å; scaled with the box so that the particle fills the same fraction
#: name -> (SNR, random in-plane rotation, CTF at uniform orientations)
SETTINGS: dict[str, tuple[float, bool, bool]] = {
    "snr0.1": (0.1, False, False),
    "snr0.05": (0.05, False, False),
    "snr0.01": (0.01, False, False),
    "snr0.1-inplane": (0.1, True, False),
    "snr0.05-inplane": (0.05, True, False),
    "snr0.1-ctf": (0.1, False, True),
    "snr0.05-ctf": (0.05, False, True),
}
DEFOCUS_UM = (1.0, 3.0)  # the CTF settings' defocus range
FULL = {"cdae": CDAEConfig(), "dncnn": DnCNNConfig()}
QUICK = {
    "cdae": CDAEConfig(pretrain_epochs=8, finetune_epochs=4, single_dae_epochs=8),
    "dncnn": DnCNNConfig(epochs=6),
}


def _simulate(structure: str, n: int, box: int, snr: float, inplane: bool, seed: int, out: Path,
              levels: list[float] | None = None, ctf: bool = False) -> ParticleStack:
    config = SimulationConfig(
        structures=[structure], box=box, pixel_size_a=PIXEL_SIZE_AT_64 * 64 / box, n=n, views=None if ctf else VIEWS,
        inplane=inplane, snr=snr, snr_levels=levels or [], seed=seed, ctf=ctf,
        defocus_min_a=DEFOCUS_UM[0] * 1e4, defocus_max_a=DEFOCUS_UM[1] * 1e4,
    )
    simulate_dataset(config, out)
    return ParticleStack.from_file(out / "particles.star")


def _oracle(noisy: np.ndarray, clean: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """View of the clean image (of the same volume) most correlated with each noisy image."""
    x = normalize(noisy)[:, 0].reshape(len(noisy), -1)  # (n, d*d)
    c = normalize(clean)[:, 0].reshape(len(clean), -1)
    best = torch.cat([(x[s : s + 512] @ c.T).argmax(1) for s in range(0, len(x), 512)])
    return labels[best.numpy()]


def _scores(labels: np.ndarray, pred: np.ndarray) -> dict:
    s = classification_scores(labels, pred)
    return {k: round(s[k], 4) for k in ("f1", "precision", "recall", "accuracy")}


def _cluster(images: np.ndarray, method: str, seed: int) -> np.ndarray:
    return cluster(normalize(images)[:, 0].numpy(), VIEWS, method, seed=seed)


def _block1_targets(cascade, images: np.ndarray, cfg: CDAEConfig, device) -> np.ndarray:
    """The k-NN mean targets that fine-tuning gives block 1 of ``cascade`` on ``images`` ``(n, d, d)``
    (neighbours among the pre-trained block's outputs, values as ``cfg.knn_values``) → ``(n, d, d)``.
    k-means on them bounds what the fine-tuned CDAE can add to clustering: it is trained towards them."""
    x = normalize(images)  # (n, 1, d, d)
    out = denoise_tensor(cascade.blocks[0], x, 256, device)
    values = {"output": out, "input": x, "raw": x}[cfg.knn_values]
    features = out if cfg.knn_features == "output" else x
    return knn_mean_targets(features, values, cfg.knn_k, cfg.knn_metric, cfg.knn_pca_dims, cfg.seed)[:, 0].numpy()


def inference_speed(models: dict, box: int, device: torch.device, n: int = 2048, repeats: int = 3) -> dict:
    """Best-of-``repeats`` images/s of each model through ``denoise_images`` with the network's
    normalised output (``"<name>-unoptimised"`` entries: float32, NCHW, ``torch.no_grad`` only,
    batches of 32; ``"<name>-input-units"``: the default output, whose scale estimate costs two
    more float32 passes)."""
    x = torch.randn(n, box, box)
    out = {}
    for name, model in models.items():
        if name.endswith("-unoptimised"):
            def run(model=model):
                with torch.no_grad():
                    xn = normalize(x)
                    for s in range(0, n, 32):
                        model.eval()(xn[s : s + 32].to(device))
        elif name.endswith("-input-units"):
            def run(model=model):
                denoise_images(model, x, 256, device)
        else:
            def run(model=model):
                denoise_images(model, x, 256, device, units="normalised")
        run()  # warm-up
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - t0)
        out[name] = round(n / best, 1)
    return out


def _evaluate(stack: ParticleStack, cascade, dncnn, cfg: CDAEConfig, device, seed: int, inplane: bool = False) -> dict:
    noisy = stack.images()
    clean = stack.read_image_column("cpCleanImageName")
    labels = stack.column("cpViewLabel").astype(np.int64)
    flipped, has_ctf = flipped_images(stack)  # what the networks see
    ctf = ctf_from_star(stack, np.arange(len(stack))) if has_ctf else None

    normalised: dict[str, np.ndarray] = {}  # networks' own output, what clustering sees (as in classify)

    def net(model, name: str, images=flipped):  # a network's clean estimate, flipped back with a CTF
        out = denoise_images(model, images, 256, device)
        normalised[name] = denoise_images(model, images, 256, device, units="normalised")
        return out if ctf is None else phase_flip(torch.from_numpy(out), ctf).numpy()

    t0 = time.perf_counter()
    tuned, _ = finetune_cascade(cascade, flipped, cfg, device)
    finetune_s = time.perf_counter() - t0
    gcfg = generic_config(dataclasses.replace(cfg, widths=None))
    t0 = time.perf_counter()
    generic, _, _ = finetune_generic(flipped, stack.pixel_size_a, gcfg, device)
    generic_s = time.perf_counter() - t0
    shipped = load_shipped()
    dae, _ = single_dae(flipped, cfg, device)
    outputs = {"raw": noisy}
    outputs["cdae"] = net(tuned, "cdae")
    outputs["cdae-pretrained-only"] = net(cascade, "cdae-pretrained-only")
    outputs["cdae-generic"] = net(generic, "cdae-generic")
    knn_targets = {}  # the fine-tuning targets of block 1 (diagnostic: what fine-tuning pulls towards)
    if model_box(stack.box, stack.pixel_size_a) == stack.box:
        outputs["cdae-generic-shipped"] = net(shipped, "cdae-generic-shipped")
        knn_targets["knn-targets-generic"] = _block1_targets(shipped, flipped, gcfg, device)
    knn_targets["knn-targets-cdae"] = _block1_targets(cascade, flipped, cfg, device)
    outputs["single-dae"] = net(dae, "single-dae")
    outputs["dncnn"] = net(dncnn, "dncnn")
    for name in baselines.available():
        outputs[name] = baselines.denoise(noisy, name)
    table1 = {}
    for name, img in outputs.items():
        table1[name] = {
            "psnr_db": round(float(psnr(torch.as_tensor(img), torch.as_tensor(clean)).mean()), 2),
            "psnr_fitted_db": round(float(psnr_normalised(img, clean).mean()), 2),
            "psnr_equalized_db": round(float(psnr_normalised(histogram_equalize(img), clean).mean()), 2),
        }
    timing = {"finetune_seconds": round(finetune_s, 1), "generic_finetune_seconds": round(generic_s, 1)}
    if (labels < 0).any():  # uniform orientations: no views to cluster
        return {"n": len(noisy), **timing, "psnr": table1, "clustering": {}}
    table2 = {"oracle": _scores(labels, _oracle(noisy, clean, labels))}
    runs = [("raw", "kmeans"), ("raw", "hc"), ("raw", "pca-kmeans"), ("cdae", "kmeans"), ("cdae", "hc"),
            ("cdae+he", "kmeans"), ("cdae+he", "hc"), ("cdae-pretrained-only", "kmeans"),
            ("cdae-generic", "kmeans"), ("cdae-generic-shipped", "kmeans"),
            ("single-dae", "kmeans"), ("single-dae+he", "kmeans"), ("dncnn", "kmeans"), ("dncnn+he", "kmeans")]
    runs += [(name, "kmeans") for name in baselines.available()]
    if inplane:  # rotated views: also k-means up to in-plane rotation, on every image set
        runs += [(name, "align-kmeans") for name in ("raw", "cdae", "cdae-generic", "single-dae", "dncnn",
                                                     *baselines.available())]
    runs += [(name, "kmeans") for name in knn_targets]
    for name, method in runs:
        if name in knn_targets:
            table2[f"{name} + {method}"] = _scores(labels, _cluster(knn_targets[name], method, seed))
            continue
        base, he = name.removesuffix("+he"), name.endswith("+he")
        # k-means normalises each image: the networks' normalised output (in the input's units a
        # Stein scale clamped at 0 leaves constant images at SNR 0.01)
        img = normalised.get(base, outputs[base])
        img = histogram_equalize(img) if he else img
        table2[f"{name} + {method}"] = _scores(labels, _cluster(img, method, seed))
    return {"n": len(noisy), **timing, "psnr": table1, "clustering": table2}


def markdown(result: dict) -> str:
    """Tables 1 and 2 of a result, as Markdown."""
    lines = []
    grid = result["grid"]
    for setting, per_structure in grid.items():
        names = list(per_structure)
        lines += [f"### {setting}", "", "Table 1 — PSNR dB in the data's units (after a per-image affine fit / "
                  "after histogram equalisation: diagnostics)", ""]
        lines += ["| denoiser | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for den in next(iter(per_structure.values()))["psnr"]:
            cells = [f"{per_structure[s]['psnr'][den]['psnr_db']:.2f} "
                     f"({per_structure[s]['psnr'][den].get('psnr_fitted_db', math.nan):.2f} / "
                     f"{per_structure[s]['psnr'][den]['psnr_equalized_db']:.2f})" for s in names]
            lines.append(f"| {den} | " + " | ".join(cells) + " |")
        if not next(iter(per_structure.values()))["clustering"]:
            lines += ["", "(uniform orientations: no views to cluster)", ""]
            continue
        lines += ["", "Table 2 — clustering F1 (precision / recall)", ""]
        lines += ["| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for method in next(iter(per_structure.values()))["clustering"]:
            cells = []
            for s in names:
                c = per_structure[s]["clustering"][method]
                cells.append(f"{c['f1']:.3f} ({c['precision']:.2f} / {c['recall']:.2f})")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def run(
    n: int = 1000,
    box: int = 64,
    quick: bool = False,
    device: str = "auto",
    out_dir: str | Path | None = None,
    n_pretrain: int | None = None,
    jobs: list[tuple[str, str]] | None = None,
    seed: int = 0,
) -> dict:
    """Run the grid with ``n`` test images per view (``n_pretrain``, default ``max(n, 250)``, per
    view and SNR level for pre-training); ``jobs``: (setting, structure) pairs, by default all
    of them (``quick``: every structure at SNR 0.1, the first for the harder settings).
    Returns the result (also written as ``bench_cdae.json``/``.md`` in ``out_dir`` when given)."""
    dev = resolve_device(device)
    configs = QUICK if quick else FULL
    cfg = dataclasses.replace(configs["cdae"], seed=seed)
    dcfg = dataclasses.replace(configs["dncnn"], seed=seed)
    if jobs is None:
        jobs = [(s, t) for s in SETTINGS for t in TESTS if not quick or s == "snr0.1" or t == TESTS[0]]
    n_pretrain = max(n, 250) if n_pretrain is None else n_pretrain
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_cdae_") as tmp:
        work = Path(tmp)
        pre = work / "pretrain"
        _simulate(PRETRAIN, VIEWS * n_pretrain, box, 0.1, False, seed + 1, pre, levels=cfg.pretrain_snrs)
        levels = load_levels(pre, cfg.pretrain_snrs)
        # depth from the pre-training structure's size (the test structures are of similar size)
        cfg = with_depth(cfg, levels[0][:, 0])
        t0 = time.perf_counter()
        cascade, curves = pretrain_cascade(levels, cfg, dev)
        pretrain_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        dncnn, _ = fit_dncnn(load_levels(pre, [dcfg.snr_in, math.inf]), dcfg, dev)
        dncnn_s = time.perf_counter() - t0
        speed = inference_speed(
            {"cdae": cascade, "cdae-input-units": cascade, "cdae-unoptimised": cascade, "dncnn": dncnn}, box, dev
        )
        grid: dict = {}
        for i, (setting, structure) in enumerate(progress(jobs, "bench cdae")):
            snr, inplane, ctf = SETTINGS[setting]
            stack = _simulate(structure, VIEWS * n, box, snr, inplane, seed + 10 + i, work / f"{setting}_{structure}",
                              ctf=ctf)
            grid.setdefault(setting, {})[structure] = _evaluate(stack, cascade, dncnn, cfg, dev, seed, inplane)
    result = {
        "n_per_view": n, "n_pretrain_per_view": n_pretrain, "box": box, "views": VIEWS, "quick": quick, "device": str(dev),
        "threads": torch.get_num_threads(), "machine": platform.machine(),
        "pretrain_structure": PRETRAIN, "test_structures": list(TESTS),
        "generic_model": {k: shipped_record()[k] for k in ("reference_pixel_size_a", "arch", "structures")},
        "topaz": "not run: Topaz-Denoise is an optional extra, not installed here",
        "pretrain_seconds": round(pretrain_s, 1), "dncnn_train_seconds": round(dncnn_s, 1),
        "pretrain_losses": {k: [round(v, 4) for v in c] for k, c in curves.items()},
        "inference_images_per_s": speed,
        "cdae_config": dataclasses.asdict(cfg) | {"pretrain_snrs": [str(s) for s in cfg.pretrain_snrs]},
        "grid": grid,
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    result["markdown"] = markdown(result)
    write_result(out_dir, "bench_cdae", result)
    return result
