"""Development runs of the robust-GAN's training schedule on structures no benchmark scores on.

``python3 -m cryoprior.bench.gan_dev [--out DIR]``: the quick Table-1 setting of ``bench gan``
(32 px, 500 training pairs, 100 test images, 6 epochs, SNR 0.1 and 0.05, uniform orientations,
white noise) on the development structures :data:`DEV_STRUCTURES` (builtins that neither the
shipped CDAE's exclusions nor any bench test on: ``nn.cdae_generic.training_structures`` minus
bench cdae's pre-training structure), for the ℓ1-AE and the (.5,.5)- and (1,1)-GAN+ℓ1 under each
training variant of :data:`VARIANTS`. Writes ``gan_dev.json`` and ``gan_dev.md``: PSNR (dB, peak
= each clean image's range) mean (std) over structures × seeds, and each variant's mean gap to
the ℓ1-AE of the same structure and seed ("fair gap": to the ℓ1-AE with the same weight average).
Every method starts from :data:`BASE` (no weight average: the defaults these variants were measured
against), so ``default`` here is ``--ema-epochs 0``. Every finished (structure, SNR, seed) is
appended to ``rows.jsonl`` and skipped when run again (seeds outermost: a cut run has every
structure and SNR).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from cryoprior.bench.gan_map import apply_generator, image_metrics
from cryoprior.nn.gan import GANConfig, fit_scaled
from cryoprior.nn.gan_data import sim_pairs
from cryoprior.progress import progress
from cryoprior.sim.dataset import SimulationConfig, simulate_dataset
from cryoprior.sim.structures import recommended_pixel_size_a

#: development structures (radius 37 Å, as the bench's adenylate kinase morph at 3 Å per pixel)
DEV_STRUCTURES = ("3enl", "3iey")
SIZE = dict(box=32, n_train=500, n_test=100, epochs=6, seeds=(0, 1, 2), snrs=(0.1, 0.05))
GANS = {"(.5,.5)-GAN+l1": {"gan": "beta", "alpha": 0.5, "beta": 0.5},
        "(1,1)-GAN+l1": {"gan": "beta", "alpha": 1.0, "beta": 1.0}}
#: what every method of the study starts from: no weight average (the default before the fourth pass)
BASE = {"ema_epochs": 0.0}
#: training variants (GANConfig overrides of BASE) tried on the GANs
VARIANTS: dict[str, dict] = {
    "default": {},
    "lr_d/4": {"lr_d": 5e-5},
    "l1 warm-up 3": {"warmup_epochs": 3},
    "l1 warm-up 3, lr_d/4": {"warmup_epochs": 3, "lr_d": 5e-5},
    "spectral-norm D": {"d_spectral_norm": True},
    "EMA 0.5": {"ema_epochs": 0.5},
    "EMA 1": {"ema_epochs": 1.0},
    "EMA 2": {"ema_epochs": 2.0},
    "lambda 100->10 in 3": {"lambda_start": 100.0, "lambda_epochs": 3},
    "lambda 1->10 in 3": {"lambda_start": 1.0, "lambda_epochs": 3},
    "lambda 100->10 in 3, EMA 1": {"lambda_start": 100.0, "lambda_epochs": 3, "ema_epochs": 1.0},
}


def _ae_methods(variants: dict[str, dict]) -> dict[str, dict]:
    """The ℓ1-AE, plain and with every weight average a GAN variant uses (the fair reference)."""
    out = {"l1-AE": {**BASE, "gan": "none", "recon_loss": "l1"}}
    for e in sorted({v["ema_epochs"] for v in variants.values() if v.get("ema_epochs")}):
        out[f"l1-AE EMA {e:g}"] = {**BASE, "gan": "none", "recon_loss": "l1", "ema_epochs": e}
    return out


def _data(work: Path, structure: str, n: int, snr: float, seed: int):
    out = work / f"{structure}_{n}_{snr:g}_{seed}"
    if not out.exists():
        simulate_dataset(SimulationConfig(structures=[structure], box=SIZE["box"], n=n, snr=snr, seed=seed,
                                          pixel_size_a=recommended_pixel_size_a(structure, SIZE["box"])), out)
    noisy, clean, _ = sim_pairs(out)
    return noisy, clean


def run(out_dir: str | Path = "gan_dev", variants: dict[str, dict] | None = None,
        structures=DEV_STRUCTURES, seeds=None) -> dict:
    torch.set_num_threads(1)
    variants = VARIANTS if variants is None else variants
    out_dir = Path(out_dir)
    work = out_dir / "data"
    out_dir.mkdir(parents=True, exist_ok=True)
    done_file = out_dir / "rows.jsonl"
    rows: list[dict] = [json.loads(line) for line in done_file.read_text().splitlines()] if done_file.exists() else []
    done = {(r["structure"], r["snr"], r["seed"]) for r in rows}
    jobs = [(s, snr, seed) for seed in (seeds or SIZE["seeds"]) for s in structures for snr in SIZE["snrs"]
            if (s, snr, seed) not in done]
    methods = _ae_methods(variants)
    methods |= {f"{g} {v}": {**BASE, **kw, **over} for g, kw in GANS.items() for v, over in variants.items()}
    fair = {f"{g} {v}": (f"l1-AE EMA {over['ema_epochs']:g}" if over.get("ema_epochs") else "l1-AE")
            for g in GANS for v, over in variants.items()}
    for structure, snr, seed in progress(jobs, "gan dev"):
        noisy, clean = _data(work, structure, SIZE["n_train"], snr, 100 + seed)
        test_noisy, test_clean = _data(work, structure, SIZE["n_test"], snr, 200 + seed)
        new = []
        for name, kw in methods.items():
            gen, _, scale = fit_scaled(noisy, clean, GANConfig(**kw, gan_epochs=SIZE["epochs"], seed=seed), "cpu",
                                       desc=f"{name} {structure} {snr:g} {seed}")
            new.append({"structure": structure, "snr": snr, "seed": seed, "method": name,
                        **image_metrics(apply_generator(gen, scale, test_noisy), test_clean)})
        rows += new
        with done_file.open("a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in new))
    result = {"size": {**SIZE, "seeds": tuple(seeds or SIZE["seeds"])}, "structures": list(structures), "rows": rows,
              "summary": summarise(rows),
              "summary_fair": summarise(rows, fair)}
    (out_dir / "gan_dev.json").write_text(json.dumps(result, indent=1))
    (out_dir / "gan_dev.md").write_text(markdown(result))
    return result


def summarise(rows: list[dict], reference: dict[str, str] | None = None) -> dict:
    """Per SNR and method: PSNR mean/std and the mean gap to the ℓ1-AE of the same structure and
    seed (to ``reference[method]``, e.g. the ℓ1-AE with the same weight average, where given)."""
    psnr = {(r["structure"], r["snr"], r["seed"], r["method"]): r["psnr_db"] for r in rows}
    out: dict = {}
    for r in rows:
        key = (r["structure"], r["snr"], r["seed"], (reference or {}).get(r["method"], "l1-AE"))
        if key not in psnr:
            continue
        cell = out.setdefault(f"{r['snr']:g}", {}).setdefault(r["method"], {"psnr": [], "gap": []})
        cell["psnr"].append(r["psnr_db"])
        cell["gap"].append(r["psnr_db"] - psnr[key])
    def std(v):
        return float(np.std(v, ddof=1)) if len(v) > 1 else 0.0

    return {snr: {m: {"psnr_mean": float(np.mean(c["psnr"])), "psnr_std": std(c["psnr"]), "n": len(c["psnr"]),
                      "gap_mean": float(np.mean(c["gap"])), "gap_std": std(c["gap"])}
                  for m, c in methods.items()} for snr, methods in out.items()}


def markdown(result: dict) -> str:
    snrs = list(result["summary"])
    fair = result.get("summary_fair", result["summary"])
    lines = [f"Development structures {', '.join(result['structures'])}; {result['size']}; "
             "fair gap: to the ℓ1-AE with the same weight average (EMA)", "",
             "| method | " + " | ".join(f"PSNR SNR {s} | − ℓ1-AE | fair gap" for s in snrs) + " |",
             "|---|" + "---|---|---|" * len(snrs)]
    for m in result["summary"][snrs[0]]:
        cells = []
        for s in snrs:
            c, f = result["summary"][s][m], fair[s][m]
            cells.append(f"{c['psnr_mean']:.2f} ({c['psnr_std']:.2f}) | {c['gap_mean']:+.2f} ({c['gap_std']:.2f}) | "
                         f"{f['gap_mean']:+.2f} ({f['gap_std']:.2f})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gan_dev")
    parser.add_argument("--variants", nargs="*", help=f"subset of {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", nargs="*", type=int, help=f"default {SIZE['seeds']}")
    args = parser.parse_args()
    print(markdown(run(args.out, None if not args.variants else {v: VARIANTS[v] for v in args.variants},
                       seeds=args.seeds)))
