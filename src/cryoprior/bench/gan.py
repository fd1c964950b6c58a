"""``cryoprior bench gan``: the robust-GAN paper's experiments on a five-conformation set.

Data: adenylate kinase morphed from closed (1AKE) to open (4AKE) in five steps (``sim.morph``;
neither structure chose any default). Training pairs (noisy, clean) and test images are separate
simulations at uniform orientations; the learned methods train on pairs of the same molecule (the
paper's protocol), the classical baselines see only the test images.

- Table 1: MSE / PSNR / SSIM against the clean test images, at SNR 0.1 and 0.05: NLM, low-pass,
  Wiener, (BM3D when installed), ℓ2-AE, ℓ1-AE, (0,0)-GAN+ℓ1, WGAN-GP+ℓ1, (1,1)-GAN+ℓ1,
  (.5,.5)-GAN+ℓ1; mean (std) over seeds. PSNR = 10 log10(peak² / MSE) and SSIM with
  ``data_range`` = peak, where peak = max − min of each clean reference image (the paper's
  definition); all in the clean images' intensity units.
- Contamination (Huber, types A/B/C × ε): test MSE on clean held-out pairs of models trained
  on contaminated pairs (``sim.contamination``).
- Conformations: Isomap + k-means on the denoised images of a one-view test set of the five
  conformations: accuracy for closed vs open (k = 2) and for all five (k = 5).
- 3D: reconstructions (known poses, uniform orientations) of a new test set's raw, classically
  and learned-denoised images, FSC to truth (``bench.gan_map``).
- Map + poses protocol: the GAN and ℓ1-AE trained with references projected from a map
  reconstructed from the noisy particles, against NLM, Wiener, low-pass and CDAE on held-out
  particles of a held-out structure with CTF, shifts and uniform orientations (``bench.gan_map``).
- Speed: generator images/s at 64² with 2 torch threads, against the previous default generator
  and NLM timed in the same run. Tables 2 and 4 alone: :func:`tables_2_4`.
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

from cryoprior import classical
from cryoprior.bench.common import write_result
from cryoprior.bench.gan_map import (
    MAP_STRUCTURE,
    apply_generator,
    fsc_rows,
    image_metrics,
    map_protocol,
    mixture_truth,
    width_overrides,
)
from cryoprior.classical.cluster import cluster
from cryoprior.core.metrics import classification_scores
from cryoprior.nn.cdae_ops import normalize
from cryoprior.nn.denoiser import denoise_images_stack_scaled
from cryoprior.nn.gan import GANConfig, build_networks, fit_scaled
from cryoprior.nn.gan_data import sim_pairs
from cryoprior.nn.training import resolve_device
from cryoprior.progress import progress
from cryoprior.sim.contamination import contaminate_pairs
from cryoprior.sim.dataset import SimulationConfig, simulate_dataset

MORPH = ("1ake", "4ake")
STEPS = 5
PIXEL_SIZE_AT_32 = 3.0  # Å; 4AKE reaches ~37 Å from the centre
METHODS: dict[str, dict] = {
    "l2-AE": {"gan": "none", "recon_loss": "l2"},
    "l1-AE": {"gan": "none", "recon_loss": "l1"},
    "(0,0)-GAN+l1": {"gan": "beta", "alpha": 0.0, "beta": 0.0},
    "WGAN-GP+l1": {"gan": "wgan-gp"},
    "(1,1)-GAN+l1": {"gan": "beta", "alpha": 1.0, "beta": 1.0},
    "(.5,.5)-GAN+l1": {"gan": "beta", "alpha": 0.5, "beta": 0.5},
}
CONTAMINATION_METHODS = ("l2-AE", "l1-AE", "WGAN-GP+l1", "(1,1)-GAN+l1", "(.5,.5)-GAN+l1")

FULL = dict(box=64, n_train=4000, n_test=500, n_conf=60, epochs=30, seeds=(0, 1, 2), snrs=(0.1, 0.05),
            contamination=[(k, e) for k in "ABC" for e in (0.1, 0.2, 0.3)], contamination_seeds=(0, 1, 2),
            widths=None, n_3d=4000, n_map=5000, n_cdae_pretrain=1000, map_seeds=(0, 1, 2), table2=True)
#: Table 2: (alpha, beta) pairs of the (alpha,beta)-GAN + l1; Table 4: lambda of (.5,.5)-GAN + l1
ALPHA_BETA = [(0, 0), (1, 1), (0.5, 0.5), (-0.5, -0.5), (1, -1), (-1, 1), (0.5, -0.5), (-0.5, 0.5)]
LAMBDAS = [0.1, 1.0, 10.0, 100.0, 1e4]
QUICK = dict(box=32, n_train=500, n_test=100, n_conf=30, epochs=6, seeds=(0, 1, 2), snrs=(0.1, 0.05),
             contamination=[("A", 0.1), ("A", 0.3)], contamination_seeds=(0,),
             widths=None, n_3d=600, n_map=600, n_cdae_pretrain=150, map_seeds=(0,), table2=False)
#: the methods trained from a map and poses (``--reference-map``)
MAP_METHODS = ("l1-AE", "(.5,.5)-GAN+l1", "(1,1)-GAN+l1")
#: a generator without residual blocks and one more level, for speed (--g-widths 8 16 32 64 --blocks-per-level 0 --stem 1)
FAST_GENERATOR = dict(g_widths=[8, 16, 32, 64], blocks_per_level=0, stem=1)
#: the previous default generator (widths 16-32-64, first level at full resolution), the speed baseline
FULL_RES_GENERATOR = dict(stem=1, g_widths=[16, 32, 64])


def _simulate(work: Path, name: str, box: int, n: int, snr: float, seed: int, views: int | None):
    out = work / name
    if not out.exists():
        cfg = SimulationConfig(morph=list(MORPH), steps=STEPS, box=box, pixel_size_a=PIXEL_SIZE_AT_32 * 32 / box,
                               n=n, views=views, snr=snr, seed=seed)
        simulate_dataset(cfg, out)
    return sim_pairs(out)


def _train(noisy, clean, method: str | dict, cfg: dict, seed: int, contamination=None):
    kw = METHODS[method] if isinstance(method, str) else method
    config = GANConfig(**kw, gan_epochs=cfg["epochs"], seed=seed, **width_overrides(cfg))
    y, x, _ = contaminate_pairs(noisy, clean, *(contamination or (None, 0.0)), seed=seed)
    gen, curves, scale = fit_scaled(y, x, config, "cpu", desc=f"{method} seed {seed}")
    return gen, scale


def _summary(values: list[dict]) -> dict:
    out = {}
    for key in values[0]:
        arr = np.array([v[key] for v in values], dtype=np.float64)
        out[key] = {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0}
    return out


def _conformations(images: np.ndarray, labels: np.ndarray, seed: int) -> dict:
    x = normalize(images)[:, 0].reshape(len(images), -1).numpy()
    ends = np.isin(labels, (0, STEPS - 1))
    two = cluster(x[ends], 2, "isomap-kmeans", seed=seed, n_neighbors=min(10, int(ends.sum()) - 1))
    five = cluster(x, STEPS, "isomap-kmeans", seed=seed, n_neighbors=min(10, len(x) - 1))
    a2 = classification_scores(labels[ends], two)["accuracy"]
    a5 = classification_scores(labels, five)["accuracy"]
    return {"open_closed_correct": int(round(a2 * ends.sum())), "open_closed_n": int(ends.sum()),
            "open_closed_accuracy": a2, "five_accuracy": a5}


def _timed(fn, repeats: int = 3) -> tuple[float, float]:
    """Best wall seconds and best process CPU seconds (all threads) of ``fn()`` over ``repeats``."""
    wall = cpu = math.inf
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
    return wall, cpu


def inference_speed(box: int = 64, n: int = 1024, n_nlm: int = 128, threads: int = 2) -> dict:
    """Images/s at ``box``² of the default generator (``GANConfig()``), of the previous default
    (:data:`FULL_RES_GENERATOR`, the baseline of the ratio) and of :data:`FAST_GENERATOR` (fp32;
    the default also with ``precision="auto"``), and of NLM, each timed in this run with
    ``threads`` torch threads. ``*_per_cpu_s`` = images per process CPU-second × threads: the rate
    on that many idle cores (wall times on a shared machine are inflated by other jobs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _inference_speed(box, n, n_nlm, threads)
    finally:
        torch.set_num_threads(before)


def _inference_speed(box: int, n: int, n_nlm: int, threads: int) -> dict:
    x = np.random.default_rng(0).standard_normal((n, box, box)).astype(np.float32)
    out = {"threads": threads}
    runs = [("default_fp32", {}, "fp32"), ("default_auto", {}, "auto"), ("full_res_fp32", FULL_RES_GENERATOR, "fp32"),
            ("fast_fp32", FAST_GENERATOR, "fp32")]
    for name, kw, precision in runs:
        gen, _ = build_networks(GANConfig(**kw))
        denoise_images_stack_scaled(gen.eval(), x[:64], (0, 1), (0, 1), precision=precision)  # warm-up
        wall, cpu = _timed(lambda gen=gen, p=precision: denoise_images_stack_scaled(gen, x, (0, 1), (0, 1), precision=p))
        out[f"gan_{name}"] = n / wall
        out[f"gan_{name}_per_cpu_s"] = n * threads / cpu
    wall, cpu = _timed(lambda: classical.denoise(x[:n_nlm], "nlm"), 1)
    out["nlm"], out["nlm_per_cpu_s"] = n_nlm / wall, n_nlm * threads / cpu
    out["ratio_default_to_full_res"] = out["gan_default_fp32_per_cpu_s"] / out["gan_full_res_fp32_per_cpu_s"]
    out["ratio_default_to_nlm"] = out["gan_default_fp32_per_cpu_s"] / out["nlm_per_cpu_s"]
    return {k: round(v, 2 if k.startswith("ratio") else 1) for k, v in out.items()}


def _three_d(work: Path, cfg: dict, models: dict) -> dict:
    """FSC to truth of reconstructions (known poses, uniform orientations, all five conformations,
    SNR ``snrs[0]``) of the raw, classically denoised and learned-denoised images of a new test set;
    the truth is the conformations' volumes weighted by their frequency in that set."""
    noisy, _, stack = _simulate(work, "three_d", cfg["box"], cfg["n_3d"], cfg["snrs"][0], 300, None)
    spec = SimulationConfig(morph=list(MORPH), steps=STEPS, box=cfg["box"], pixel_size_a=stack.pixel_size_a)
    truth = mixture_truth(stack, spec.load_volumes())
    outputs = {"raw": noisy, **{name: classical.denoise(noisy, name) for name in ("nlm", "wiener")}}
    outputs |= {name: apply_generator(gen, scale, noisy) for name, (gen, scale) in models.items()}
    return fsc_rows(stack, outputs, truth)


def run(quick: bool = False, out_dir: str | Path | None = None, box: int | None = None, n: int | None = None,
        device: str = "auto") -> dict:
    """Run the bench (``quick``: small sizes); ``n`` overrides the number of training pairs."""
    cfg = dict(QUICK if quick else FULL, quick=quick)
    if box is not None:
        cfg["box"] = box
    if n is not None:
        cfg["n_train"] = n
    resolve_device(device)
    t_start, c_start = time.perf_counter(), time.process_time()
    table1: dict = {}
    contamination: dict = {}
    conformations: dict = {}
    first_models: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench_gan_") as tmp:
        work = Path(tmp)
        conf_noisy, conf_clean, conf_stack = _simulate(work, "conf", cfg["box"], cfg["n_conf"] * STEPS, 0.1, 999, 1)
        conf_labels = conf_stack.column("cpConformationLabel").astype(np.int64)
        conformations["clean (oracle)"] = _conformations(conf_clean, conf_labels, 0)
        conformations["raw"] = _conformations(conf_noisy, conf_labels, 0)
        for snr in cfg["snrs"]:
            key = f"snr{snr:g}"
            per_method: dict[str, list[dict]] = {}
            for seed in progress(cfg["seeds"], f"bench gan {key}"):
                tr_noisy, tr_clean, _ = _simulate(work, f"train_{key}_{seed}", cfg["box"], cfg["n_train"], snr, 10 + seed, None)
                te_noisy, te_clean, _ = _simulate(work, f"test_{key}_{seed}", cfg["box"], cfg["n_test"], snr, 100 + seed, None)
                per_method.setdefault("raw", []).append(image_metrics(te_noisy, te_clean))
                for name in classical.available():
                    per_method.setdefault(name, []).append(image_metrics(classical.denoise(te_noisy, name), te_clean))
                first = snr == cfg["snrs"][0] and seed == cfg["seeds"][0]
                for method in METHODS:
                    gen, scale = _train(tr_noisy, tr_clean, method, cfg, seed)
                    per_method.setdefault(method, []).append(image_metrics(apply_generator(gen, scale, te_noisy), te_clean))
                    if first:
                        conformations[method] = _conformations(apply_generator(gen, scale, conf_noisy), conf_labels, 0)
                        first_models[method] = (gen, scale)
                if first:
                    for name in ("nlm", "wiener"):
                        conformations[name] = _conformations(classical.denoise(conf_noisy, name), conf_labels, 0)
            table1[key] = {m: _summary(v) for m, v in per_method.items()}
        three_d = _three_d(work, cfg, first_models)
        snr = cfg["snrs"][0]
        for kind, eps in progress(cfg["contamination"], "bench gan contamination"):
            rows: dict[str, list[dict]] = {}
            for seed in cfg["contamination_seeds"]:
                tr_noisy, tr_clean, _ = _simulate(work, f"train_snr{snr:g}_{seed}", cfg["box"], cfg["n_train"], snr, 10 + seed, None)
                te_noisy, te_clean, _ = _simulate(work, f"test_snr{snr:g}_{seed}", cfg["box"], cfg["n_test"], snr, 100 + seed, None)
                for method in CONTAMINATION_METHODS:
                    gen, scale = _train(tr_noisy, tr_clean, method, cfg, seed, (kind, eps))
                    rows.setdefault(method, []).append(image_metrics(apply_generator(gen, scale, te_noisy), te_clean))
            contamination[f"{kind} eps={eps:g}"] = {m: _summary(v) for m, v in rows.items()}
        map_runs = [map_protocol(work, cfg, {m: METHODS[m] for m in MAP_METHODS}, seed)
                    for seed in progress(cfg["map_seeds"], "bench gan map + poses")]
        ablations = _tables_2_4(work, cfg) if cfg.get("table2") else {}
    result = {
        "quick": quick, "sizes": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
        "structures": f"morph {MORPH[0]} -> {MORPH[1]}, {STEPS} conformations", "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "metric_definition": "PSNR = 10 log10(peak^2 / MSE), SSIM with data_range = peak; peak = max - min of each "
                             "clean reference image; MSE in the clean images' units; mean (std) over seeds",
        "gan_config": dataclasses.asdict(GANConfig(gan_epochs=cfg["epochs"], **width_overrides(cfg))),
        "table1": table1, "contamination": contamination, **ablations, "conformations": conformations,
        "three_d": three_d, "map_protocol": _map_summary(map_runs),
        "inference_images_per_s_64px": inference_speed(),
    }
    result["total_seconds"] = round(time.perf_counter() - t_start, 1)
    result["cpu_seconds"] = round(time.process_time() - c_start, 1)
    result["markdown"] = markdown(result)
    write_result(out_dir, "bench_gan", result)
    return result


def _map_summary(runs: list[dict]) -> dict:
    return {"structure": MAP_STRUCTURE, "n_train": runs[0]["n_train"], "n_test": runs[0]["n_test"], "seeds": len(runs),
            "metrics": {m: _summary([r["metrics"][m] for r in runs]) for m in runs[0]["metrics"]},
            "fsc": {m: _summary([r["fsc"][m] for r in runs]) for m in runs[0]["fsc"]}}


def tables_2_4(quick: bool = True, out_dir: str | Path | None = None, seeds: tuple[int, ...] | None = None) -> dict:
    """Tables 2 and 4 alone at the quick (or full) sizes: ``bench_gan_tables.json``/``.md``."""
    cfg = dict(QUICK if quick else FULL, quick=quick)
    if seeds is not None:
        cfg["seeds"] = tuple(seeds)
    t_start, c_start = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory(prefix="bench_gan_") as tmp:
        tables = _tables_2_4(Path(tmp), cfg)
    result = {"quick": quick, "sizes": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
              "threads": torch.get_num_threads(), **tables, "total_seconds": round(time.perf_counter() - t_start, 1),
              "cpu_seconds": round(time.process_time() - c_start, 1)}
    result["markdown"] = _ablation_markdown(result)
    write_result(out_dir, "bench_gan_tables", result)
    return result


def _tables_2_4(work: Path, cfg: dict) -> dict:
    """Table 2 (the (alpha,beta) pairs) and Table 4 (lambda), SNR 0.1, over ``cfg["seeds"]``."""
    snr = cfg["snrs"][0]
    runs = {f"({a:g},{b:g})-GAN+l1": {"gan": "beta", "alpha": a, "beta": b} for a, b in ALPHA_BETA}
    runs |= {f"lambda={lam:g}": {"gan": "beta", "alpha": 0.5, "beta": 0.5, "recon_weight": lam} for lam in LAMBDAS}
    rows: dict[str, list[dict]] = {}
    for seed in cfg["seeds"]:
        tr_noisy, tr_clean, _ = _simulate(work, f"train_snr{snr:g}_{seed}", cfg["box"], cfg["n_train"], snr, 10 + seed, None)
        te_noisy, te_clean, _ = _simulate(work, f"test_snr{snr:g}_{seed}", cfg["box"], cfg["n_test"], snr, 100 + seed, None)
        for name, kw in progress(runs.items(), "bench gan tables 2/4"):
            gen, scale = _train(tr_noisy, tr_clean, kw, cfg, seed)
            rows.setdefault(name, []).append(image_metrics(apply_generator(gen, scale, te_noisy), te_clean))
    summary = {k: _summary(v) for k, v in rows.items()}
    return {"table2": {k: v for k, v in summary.items() if k.endswith("GAN+l1")},
            "table4": {k: v for k, v in summary.items() if k.startswith("lambda")}}


def _cell(s: dict, key: str, fmt: str) -> str:
    return f"{s[key]['mean']:{fmt}} ({s[key]['std']:{fmt}})"


def _ablation_markdown(result: dict) -> str:
    lines = []
    for name in ("table2", "table4"):
        if name in result:
            lines += ["", f"{name.title().replace('e', 'e ', 1)} — MSE / PSNR dB / SSIM at SNR {result['sizes']['snrs'][0]}", "",
                      "| setting | MSE | PSNR | SSIM |", "|---|---|---|---|"]
            for k, v in result[name].items():
                lines.append(f"| {k} | {_cell(v, 'mse', '.4f')} | {_cell(v, 'psnr_db', '.2f')} | {_cell(v, 'ssim', '.3f')} |")
    return "\n".join(lines)


def _fsc_table(rows: dict, title: str) -> list[str]:
    lines = ["", title, "", "| images | FSC 0.5 Å | FSC 0.143 Å | masked 0.5 Å | masked 0.143 Å |", "|---|---|---|---|---|"]
    keys = ("res_truth_05_a", "res_truth_0143_a", "res_truth_masked_05_a", "res_truth_masked_0143_a")
    for m, r in rows.items():
        cells = [_cell(r, k, ".2f") if isinstance(r[k], dict) else f"{r[k]:.2f}" for k in keys]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def markdown(result: dict) -> str:
    sizes = result["sizes"]
    lines = [f"Robust GAN bench ({'quick' if result['quick'] else 'full'}): {result['structures']}; "
             f"{result['metric_definition']}.", "",
             f"Sizes: box {sizes['box']} px, {sizes['n_train']} training pairs, {sizes['n_test']} test images, "
             f"{sizes['epochs']} epochs, widths {sizes['widths'] or 'default'}, seeds {list(sizes['seeds'])} (Table 1), "
             f"contamination seeds {list(sizes['contamination_seeds'])}, 3D set {sizes['n_3d']} images, map + poses "
             f"stack {sizes['n_map']} particles × seeds {list(sizes['map_seeds'])}.", ""]
    snrs = list(result["table1"])
    lines += ["Table 1 — MSE / PSNR dB / SSIM", "", "| method | " + " | ".join(snrs) + " |", "|---|" + "---|" * len(snrs)]
    for m in result["table1"][snrs[0]]:
        cells = [" / ".join([_cell(result["table1"][s][m], "mse", ".4f"), _cell(result["table1"][s][m], "psnr_db", ".2f"),
                             _cell(result["table1"][s][m], "ssim", ".3f")]) for s in snrs]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append(_ablation_markdown(result))
    settings = list(result["contamination"])
    if settings:
        lines += ["", "Contamination — test MSE on clean pairs (mean (std))", "",
                  "| method | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings)]
        for m in result["contamination"][settings[0]]:
            lines.append(f"| {m} | " + " | ".join(_cell(result["contamination"][s][m], "mse", ".4f") for s in settings) + " |")
    lines += ["", "Conformations — Isomap + k-means", "", "| images | open/closed correct | five-state accuracy |", "|---|---|---|"]
    for m, c in result["conformations"].items():
        lines.append(f"| {m} | {c['open_closed_correct']}/{c['open_closed_n']} | {c['five_accuracy']:.3f} |")
    if "three_d" in result:
        lines += _fsc_table(result["three_d"], "3D — FSC to truth of the reconstruction at known poses (resolution, Å; "
                            "lower is better; the models of the first seed at the first SNR)")
    if "map_protocol" in result:
        mp = result["map_protocol"]
        lines += ["", f"Map + poses protocol — {mp['structure']} with CTF, shifts, uniform orientations; reference map "
                  f"reconstructed from the {mp['n_train']} noisy training particles; {mp['n_test']} held-out particles; "
                  f"{mp['seeds']} seed(s); MSE / PSNR dB / SSIM against the clean (CTF-applied) images", "",
                  "| method | MSE | PSNR | SSIM |", "|---|---|---|---|"]
        for m, v in mp["metrics"].items():
            lines.append(f"| {m} | {_cell(v, 'mse', '.4f')} | {_cell(v, 'psnr_db', '.2f')} | {_cell(v, 'ssim', '.3f')} |")
        lines += _fsc_table(mp["fsc"], "Map + poses protocol — FSC to truth of the held-out particles' reconstruction")
    speed = result["inference_images_per_s_64px"]
    lines += ["", "Inference at 64² (images/s; *_per_cpu_s: per process CPU-second × threads): "
              + ", ".join(f"{k} {v}" for k, v in speed.items()),
              "", f"total {result['total_seconds']} s wall, {result.get('cpu_seconds', '?')} CPU-s, {result['threads']} threads"]
    return "\n".join(lines)
