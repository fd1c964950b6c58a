"""``cryoprior train-prior3d``: build pairs, train the 3D U-Net prior, validate on held-out maps.

Run folder ``OUT/``::

    config.yaml            the Prior3DConfig, version, time, argv
    pairs/<noise>/*.pt     cached training and validation pairs (built once; a rerun skips them)
    checkpoint.pt          the last finished epoch (a rerun resumes from it)
    model.pt, model.json   the trained denoiser, for ``load_denoiser(OUT)``
    loss.json, loss.png    mean training loss per epoch
    validation.json        FSC to truth of held-out noisy maps before and after denoising
    run.log
"""

from __future__ import annotations

import json
import logging
import re
import zlib
from dataclasses import asdict
from pathlib import Path

import torch

from cryoprior.config import config_to_dict
from cryoprior.core.fsc import fsc, resolution_at
from cryoprior.fileutil import atomic_path
from cryoprior.nn.models.unet3d import UNet3D
from cryoprior.nn.prior3d import Prior3DConfig, apply_denoiser, save_model, train
from cryoprior.nn.prior3d_data import PSEUDO_PREFIX, NoiseSettings, make_pair
from cryoprior.progress import progress
from cryoprior.workflows.runs import RunDir, run_folder

log = logging.getLogger(__name__)

VALIDATION_INDEX_OFFSET = 1_000_000  # validation pairs never share a seed with training pairs


def noise_settings(config: Prior3DConfig) -> NoiseSettings:
    return NoiseSettings(
        n_particles=(config.n_particles[0], config.n_particles[1]),
        snr=(config.snr[0], config.snr[1]),
        pose_error_deg=config.pose_error_deg,
        ctf=config.ctf,
        wiener_constant=config.wiener_constant,
        gaussian_level=(config.gaussian_level[0], config.gaussian_level[1]),
        target=config.target,
        band_limit=config.band_limit,
    )


def _pair_file(folder: Path, spec: str, box: int, index: int) -> Path:
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(spec).name)[:40]
    tag = f"{zlib.crc32(spec.encode()):08x}"
    return folder / f"{stem}-{tag}_b{box}_{index}.pt"


def build_pairs(
    specs: list[str], config: Prior3DConfig, folder: str | Path, n_per: int, index_offset: int = 0
) -> list[dict]:
    """Pairs for every ``spec`` × box × ``n_per``, cached as ``folder/*.pt`` (existing ones reused)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    settings = noise_settings(config)
    jobs = [(s, b, index_offset + i) for s in specs for b in config.box for i in range(n_per)]
    pairs = []
    for spec, box, index in progress(jobs, desc=f"pairs ({folder.name})"):
        path = _pair_file(folder, spec, box, index)
        if path.exists():
            pairs.append(torch.load(path, weights_only=True))
            continue
        pair = make_pair(spec, box, config.noise_model, index, settings, config.seed)
        with atomic_path(path) as tmp:
            torch.save(pair, tmp)
        pairs.append(pair)
    return pairs


def _fsc_summary(vol: torch.Tensor, truth: torch.Tensor, pixel_size_a: float) -> dict:
    curve = fsc(vol, truth, ndim=3)
    box = truth.shape[-1]
    return {
        "resolution_0.5_a": round(resolution_at(curve, box, pixel_size_a, 0.5), 3),
        "resolution_0.143_a": round(resolution_at(curve, box, pixel_size_a, 0.143), 3),
        "mean_fsc": round(float(curve[1:].mean()), 4),
    }


def validate(net: UNet3D, pairs: list[dict]) -> dict:
    """FSC-to-truth figures of each held-out noisy map before (input) and after denoising."""
    rows = []
    for pair in pairs:
        meta, truth = pair["meta"], pair["truth"]
        out = apply_denoiser(net, pair["input"])
        row = {k: meta[k] for k in ("structure", "box", "pixel_size_a", "index")}
        row.update({k: meta[k] for k in ("n_particles", "snr", "gaussian_level")
                    if k in meta})
        row["input"] = _fsc_summary(pair["input"], truth, meta["pixel_size_a"])
        row["output"] = _fsc_summary(out, truth, meta["pixel_size_a"])
        rows.append(row)
    mean = {
        side: {key: round(sum(r[side][key] for r in rows) / len(rows), 4) for key in rows[0][side]}
        for side in ("input", "output")
    } if rows else {}
    improved = sum(r["output"]["mean_fsc"] > r["input"]["mean_fsc"] for r in rows)
    return {"mean": mean, "n_improved_mean_fsc": improved, "n": len(rows), "maps": rows}


def plot_losses(losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.plot(range(1, len(losses) + 1), losses, marker="o", ms=3)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def run_train_prior3d(config: Prior3DConfig, out_dir: str | Path, argv: list[str] | None = None) -> dict:
    """Build (or reuse) the pairs, train (or resume), validate, write the run folder. → validation."""
    config.validate()
    with run_folder(out_dir, [*config.structures, *config.validation_structures], argv):
        return _run(config, out_dir, argv)


def _run(config: Prior3DConfig, out_dir: str | Path, argv: list[str] | None) -> dict:
    run = RunDir(out_dir)
    # a rerun resumes only the same config (more epochs, another device are fine); else: which fields
    run.check_config(config, argv, ignore=("device", "epochs"))
    run.attach_log()
    try:
        specs = list(config.structures) + [
            f"{PSEUDO_PREFIX}{i}" for i in range(config.pseudo_proteins)
        ]
        overlap = set(specs) & set(config.validation_structures)
        if overlap:
            log.warning("validation structures also used for training: %s", sorted(overlap))
        folder = run.path / "pairs" / config.noise_model
        pairs = build_pairs(specs, config, folder, config.pairs_per_structure)
        val_pairs = build_pairs(
            list(config.validation_structures), config, folder, config.validation_pairs,
            VALIDATION_INDEX_OFFSET,
        )
        log.info("%d training pairs, %d validation pairs", len(pairs), len(val_pairs))
        net, losses = train(pairs, config, run.path)
        net.eval()
        with atomic_path(run.path / "loss.json") as tmp:
            tmp.write_text(json.dumps({"loss": config.loss, "epoch_mean": losses}))
        plot_losses(losses, run.path / "loss.png")
        result = validate(net, val_pairs)
        run.write_metrics(result, "validation.json")
        summary = {
            "training": {
                "config": config_to_dict(config),
                "n_pairs": len(pairs),
                # the range of pixel sizes trained on: load_denoiser resamples other maps into it
                "pixel_size_a": [min(q["meta"]["pixel_size_a"] for q in pairs),
                                 max(q["meta"]["pixel_size_a"] for q in pairs)],
                "final_loss": losses[-1],
                "noise": asdict(noise_settings(config)),
            },
            "validation_mean": result["mean"],
        }
        save_model(net.cpu(), run.path, summary)
        log.info("validation (mean over %d maps): %s", result["n"], result["mean"])
        return result
    finally:
        run.close()
