"""``cryoprior demo``: the main job on the default data, stage by stage, resumable, with a report.

1. simulate the default data from adenylate kinase (PDB 1AKE): a four-view stack at SNR 0.03,
   64 px of 1.25 Å (denoising, classification), and a CTF-modulated stack at uniform orientations, SNR 0.1, 48 px of 2.5 Å
   (reconstruction); measure the SNR they really have;
2. denoise the four-view stack with each denoiser: CDAE (the shipped generic model, pre-trained
   on other structures, fine-tuned on the stack; no PDB of the sample) and the classical baselines, scored against the clean projections;
3. classify it into k = 4 classes: k-means on the raw images and on each denoiser's output, and
   the oracle (the true labels), scored against the true views; and classify a second four-view
   stack whose particles sit at random in-plane angles and shifts, as real ones do (SNR 0.05):
   k-means, align-kmeans, ML2D (RELION's Class2D model) and DRVAE + BSK-means++ with ``--align``;
4. reconstruct the uniform stack at its known poses with the Gaussian prior and with RED (the
   shipped 3D denoiser), each scored by FSC against the true map;
5. denoise held-out particles of the uniform stack: the robust GAN and the ℓ1-AE trained from the
   Gaussian-prior map and the training particles' poses, the CDAE and the classical baselines,
   scored against their clean images (:mod:`cryoprior.workflows.demo_heldout`);
6. write ``report.html``.

Each stage owns a folder of the run (config.yaml, checkpoints, metrics.json, its outputs; its
log in ``logs/<stage>.log``) and is recorded in ``stages.json`` when it finishes, so re-running
the same command skips finished stages (and CDAE training resumes from its checkpoints). A stage
whose method is not in this version is recorded as not available and shown so in the report;
nothing is made up in its place.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cryoprior.classical.cluster import class_averages
from cryoprior.core.metrics import classification_scores, image_scores
from cryoprior.errors import CryopriorError, InputError
from cryoprior.io.mrc import write_mrcs
from cryoprior.io.stack import ParticleStack
from cryoprior.io.star import write_star
from cryoprior.nn.training import resolve_device
from cryoprior.progress import bar
from cryoprior.report.build import METHOD_LABELS, build_report
from cryoprior.sim.dataset import SimulationConfig, measured_snr, simulate_dataset
from cryoprior.workflows import demo_heldout
from cryoprior.workflows.demo_heldout import HELDOUT_DENOISERS
from cryoprior.workflows.runs import RunDir, run_folder

log = logging.getLogger(__name__)

K_VIEWS = 4  # discrete views of the four-view stacks = classes of the classification
DENOISERS = ("cdae", "nlm", "lowpass", "wiener", "bm3d", "topaz")  # bm3d, topaz: only with their optional packages
PRIORS = ("gaussian", "red", "cw-red")


@dataclass
class DemoConfig:
    """Sizes and choices of the demo; the defaults fit 10 minutes on a 2-core CPU."""

    structure: str = field(default="1ake", metadata={"help": "built-in id or a PDB/mmCIF/MRC file"})
    box: int = field(default=48, metadata={"help": "image size in pixels of the reconstruction stack"})
    pixel_size_a: float = field(default=2.5, metadata={"flag": "--pixel-size", "help": "Å/pixel of the reconstruction stack"})
    snr: float = field(default=0.1, metadata={"help": "SNR of the reconstruction stack"})
    # the four-view stacks: the particle fills about half the box, as in the CDAE paper (at 48 px
    # and 2.5 Å, 1AKE is ~20 px across and a receptive field of two pooling levels spans it), at
    # an SNR where raw k-means fails (at 0.1 and this pixel every method, raw included, scores 1.0)
    views_box: int = field(default=64, metadata={"help": "image size in pixels of the four-view stacks (denoise, classify)"})
    views_pixel_size_a: float = field(
        default=1.25, metadata={"flag": "--views-pixel-size", "help": "Å/pixel of the four-view stacks"}
    )
    views_snr: float = field(default=0.03, metadata={"help": "SNR of the four-view stack that is denoised and classified"})
    n_views: int = field(default=1500, metadata={"help": "particles of the four-view stack"})
    inplane_snr: float = field(default=0.05, metadata={"help": "SNR of the four-view stack at random in-plane angles and ±3 px shifts"})
    n_inplane: int = field(default=400, metadata={"help": "particles of that stack (0: no in-plane stages)"})
    n_uniform: int = field(default=2000, metadata={"help": "particles of the uniform CTF stack"})
    denoisers: list[str] = field(
        default_factory=lambda: ["cdae", "nlm", "lowpass"], metadata={"help": f"any of {', '.join(DENOISERS)}"}
    )
    priors: list[str] = field(
        default_factory=lambda: ["gaussian", "red"], metadata={"help": f"any of {', '.join(PRIORS)}"}
    )
    red_model: str | None = field(
        default=None, metadata={"metavar": "DIR", "help": "3D denoiser for RED: a train-prior3d folder (None: the shipped one)"}
    )
    # fewer than CDAE's own default (8): longer MSE training smooths the view differences away
    # (PSNR up, k-means F1 down; figures in docs/benchmarks.md, CDAE)
    cdae_finetune_epochs: int = field(default=3, metadata={"help": "CDAE fine-tuning epochs per block"})
    heldout_denoisers: list[str] = field(
        default_factory=lambda: ["gan", "l1-ae", "cdae", "nlm", "lowpass", "wiener"],
        metadata={"help": f"denoisers of the held-out uniform particles, any of {', '.join(HELDOUT_DENOISERS)} "
                  "(gan, l1-ae: trained from the Gaussian-prior map and the training particles' poses)"})
    heldout_fraction: float = field(default=0.2, metadata={"help": "fraction of the uniform stack held out of "
                                    "training and denoised (a seeded split)"})
    gan_epochs: int = field(default=6, metadata={"help": "training epochs of the GAN and the l1-AE"})
    seed: int = field(default=0, metadata={"help": "random seed of every stage"})
    device: str = field(default="auto", metadata={"choices": ["auto", "cpu", "cuda"], "help": "torch device"})

    def validate(self) -> None:
        unknown = [m for m in self.denoisers if m not in DENOISERS] + [p for p in self.priors if p not in PRIORS]
        if unknown:
            raise InputError(f"unknown denoiser or prior {', '.join(unknown)}; denoisers: {', '.join(DENOISERS)}; "
                             f"priors: {', '.join(PRIORS)}")
        unknown = [m for m in self.heldout_denoisers if m not in HELDOUT_DENOISERS]
        if unknown:
            raise InputError(f"unknown held-out denoiser {', '.join(unknown)}; choose from {', '.join(HELDOUT_DENOISERS)}")
        if min(self.n_views, self.n_uniform) < 2 * K_VIEWS or 0 < self.n_inplane < 2 * K_VIEWS:
            raise InputError(f"every stack needs at least {2 * K_VIEWS} particles")
        held = round(self.heldout_fraction * self.n_uniform)
        if self.heldout_denoisers and not (2 <= held <= self.n_uniform - 2 * K_VIEWS):
            raise InputError(f"--heldout-fraction {self.heldout_fraction:g} of {self.n_uniform} particles holds out "
                             f"{held}; need at least 2 held out and {2 * K_VIEWS} to train on")
        if self.gan_epochs < 1:
            raise InputError(f"--gan-epochs must be at least 1, got {self.gan_epochs}")


def missing(module: str, *names: str) -> str | None:
    """Why ``module`` cannot provide ``names`` (absent, fails to import, lacks them); None if it can."""
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        return f"{module} could not be imported ({exc})"
    absent = [n for n in names if not hasattr(mod, n)]
    return f"{module} has no {', '.join(absent)}" if absent else None


# ---- the configs of the stages ---------------------------------------------------------------
DATASETS = ("views", "uniform", "inplane")
#: ``cryoprior classify`` methods of the in-plane stack, with their labels
INPLANE_METHODS = {"kmeans": "k-means on raw images (not rotation-invariant)",
                   "align-kmeans": "align-kmeans (hard alignment)",
                   "ml2d": "ML2D (RELION's Class2D model, from align-kmeans)",
                   "drvae-bsk": "DRVAE + BSK-means++ --align (trained on the stack itself)"}
INPLANE_SHIFT_PX = 3


def cdae_config(cfg: DemoConfig):
    from cryoprior.nn.cdae import CDAEConfig

    return CDAEConfig(finetune_epochs=cfg.cdae_finetune_epochs, seed=cfg.seed)


def dataset_config(cfg: DemoConfig, name: str) -> SimulationConfig:
    """The config of dataset ``name``: ``views`` or ``uniform``."""
    views = dict(structures=[cfg.structure], box=cfg.views_box, pixel_size_a=cfg.views_pixel_size_a, views=K_VIEWS)
    if name == "views":
        return SimulationConfig(**views, n=cfg.n_views, snr=cfg.views_snr, seed=cfg.seed)
    if name == "inplane":
        return SimulationConfig(**views, n=max(cfg.n_inplane, 2 * K_VIEWS), snr=cfg.inplane_snr, seed=cfg.seed + 2, inplane=True,
                                shift_a=INPLANE_SHIFT_PX * cfg.views_pixel_size_a)
    # views=None: orientations uniform on SO(3) (SimulationConfig's default is 4 discrete views)
    return SimulationConfig(structures=[cfg.structure], box=cfg.box, pixel_size_a=cfg.pixel_size_a, n=cfg.n_uniform,
                            views=None, snr=cfg.snr, seed=cfg.seed + 1, ctf=True, shift_a=2 * cfg.pixel_size_a)


def check_stage_configs(cfg: DemoConfig) -> None:
    """Validate what every stage will be given, before the first one runs (a bad --box must not
    simulate hundreds of MB before it is rejected)."""
    for name in DATASETS:
        dataset_config(cfg, name).validate()
    if "cdae" in cfg.denoisers and not missing("cryoprior.nn.cdae", "CDAEConfig"):
        cdae_config(cfg).validate()
    for method in set(cfg.heldout_denoisers) & set(demo_heldout.LEARNED_FROM_MAP):
        demo_heldout.gan_config(method, cfg.gan_epochs, cfg.seed).validate()


# ---- the stages -----------------------------------------------------------------------------
class _Demo:
    """The demo's stages over one run folder (each returns the JSON-able result it records)."""

    def __init__(self, run: RunDir, cfg: DemoConfig, device: torch.device, argv: list[str] | None):
        self.run, self.cfg, self.device, self.argv = run, cfg, device, argv
        self.data = run.path / "data"
        self.views_star = self.data / "views" / "particles.star"
        self.uniform_star = self.data / "uniform" / "particles.star"
        self.inplane_star = self.data / "inplane" / "particles.star"

    def simulation(self, name: str) -> SimulationConfig:
        return dataset_config(self.cfg, name)

    def simulate(self, name: str) -> str:
        return str(simulate_dataset(self.simulation(name), self.data / name, overwrite=True))

    def measure_snr(self) -> dict:
        return {name: round(measured_snr(ParticleStack.from_file(self.data / name / "particles.star"))["snr"], 4)
                for name in DATASETS if (self.data / name / "particles.star").exists()}

    # denoising
    def _write_denoised(self, folder: Path, denoised: np.ndarray, method: str, star: Path | None = None,
                        kind: str = "denoise") -> dict:
        """Write ``denoised`` (the rows of ``star``, default the four-view stack) to
        ``folder/denoised.star`` and score it against the clean images."""
        stack = ParticleStack.from_file(star or self.views_star)
        table = stack.table.drop(columns=[c for c in stack.table.columns if c.startswith("cpImageNameSnr")])
        table["cpNoisyImageName"] = table["rlnImageName"]
        stack.with_table(table).write(folder / "denoised.star", images=denoised)
        clean, noisy = stack.read_image_column("cpCleanImageName"), stack.images()
        stack_mean = np.broadcast_to(noisy.mean(axis=0), noisy.shape)  # the trivial "denoiser"
        metrics = {
            "kind": kind, "method": method, "label": METHOD_LABELS.get(method, method), "n_images": len(stack),
            **image_scores(denoised, clean),
            **{f"input_{k}": v for k, v in image_scores(noisy, clean).items()},
            **{f"stack_mean_{k}": v for k, v in image_scores(stack_mean, clean).items()},
            "images": "denoised.star",
        }
        sub = RunDir(folder)  # keep what the trainer recorded there, e.g. its own PSNR and timing
        sub.write_metrics({**sub.read_metrics(), **metrics})
        return metrics

    def denoise_baseline(self, method: str) -> dict:
        return self._baseline(f"denoise_{method}", method, self.views_star, "denoise")

    def _baseline(self, name: str, method: str, star: Path, kind: str) -> dict:
        from cryoprior.classical import denoise

        folder = self.run.child(name, None, self.argv, method=method, seed=self.cfg.seed).path
        images = ParticleStack.from_file(star).images()
        step = len(images) if method == "wiener" else 128  # Wiener: one filter for the whole stack
        out = np.empty_like(images)
        with bar(len(images), f"denoise: {method}") as pbar:
            for start in range(0, len(images), step):
                out[start : start + step] = denoise(images[start : start + step], method)
                pbar.update(min(step, len(images) - start))
        return self._write_denoised(folder, out, method, star, kind)

    def _cdae_config(self):
        return cdae_config(self.cfg)

    def denoise_cdae(self) -> dict:
        """``cryoprior denoise train --method cdae`` without ``--pretrain``: the shipped generic CDAE
        fine-tuned on the stack (resumed from its checkpoints), then applied."""
        from cryoprior.nn import cdae
        from cryoprior.workflows.denoise import train

        config = self._cdae_config()
        folder = self.run.path / "denoise_cdae"
        train("cdae", folder, target=self.views_star, cdae=config,
              device=str(self.device), resume=True)
        model = cdae.load_model(folder, self.device)
        images = ParticleStack.from_file(self.views_star).images()
        out = cdae.denoise_images(model, images, config.batch_size_inference, self.device, precision=config.precision)
        return self._write_denoised(folder, np.asarray(out, dtype=np.float32), "cdae")

    # held-out particles of the uniform stack (demo_heldout)
    def split_uniform(self) -> dict:
        return demo_heldout.split_stack(self.uniform_star, self.cfg.heldout_fraction, self.cfg.seed)

    def heldout(self, method: str) -> dict:
        """Denoise the held-out uniform particles with ``method`` (learned ones trained first)."""
        heldout_star = self.uniform_star.parent / "heldout.star"
        name = f"heldout_{method}"
        if method not in ("cdae", *demo_heldout.LEARNED_FROM_MAP):
            return self._baseline(name, method, heldout_star, "denoise_heldout")
        folder = self.run.path / name
        demo_heldout.train_learned(method, folder, self.uniform_star.parent / "train.star",
                                   self.run.path / "reconstruct_gaussian" / "map.mrc", self._cdae_config(),
                                   self.cfg.gan_epochs, self.cfg.seed, str(self.device))
        out = demo_heldout.apply_learned(folder, heldout_star, str(self.device))
        return self._write_denoised(folder, out, method, heldout_star, "denoise_heldout")

    # classification
    def classify_raw(self) -> dict:
        return self._classify("classify_raw", "kmeans", "k-means on raw images")

    def classify_denoised(self, method: str) -> dict:
        """k-means on a denoiser's output (for CDAE, ``cryoprior classify --method cdae-kmeans``)."""
        label = f"k-means on {METHOD_LABELS.get(method, method)} output"
        if method == "cdae":
            return self._classify("classify_cdae", "cdae-kmeans", label, model=self.run.path / "denoise_cdae")
        denoised = self.run.path / f"denoise_{method}" / "denoised.star"
        return self._classify(f"classify_{method}", "kmeans", label, star=denoised)

    def _classify(self, name: str, method: str, label: str, model: Path | None = None, star: Path | None = None,
                  inplane: bool = False) -> dict:
        """``cryoprior classify`` of the four-view stack (or of a denoised copy, ``star``; or, with
        ``inplane``, of the in-plane stack, searching ±3 px shifts)."""
        from cryoprior.workflows.classify import ClassifyConfig, drvae_config, run_classify

        config = ClassifyConfig(classes=K_VIEWS, method=method, model=None if model is None else str(model),
                                device=str(self.device), seed=self.cfg.seed, max_shift_px=INPLANE_SHIFT_PX if inplane else 0)
        if inplane and method == "drvae-bsk":
            config.drvae = dataclasses.replace(drvae_config(config), align=True)
        folder = self.run.path / name
        result = run_classify(self.inplane_star if inplane else star or self.views_star, folder, config, self.argv,
                              overwrite=True)
        if star is not None:  # averages of the raw particles, as for the other methods
            self._raw_class_averages(folder)
        metrics = {"kind": "classify_inplane" if inplane else "classify", "label": label, **(result["metrics"] or {})}
        metrics.pop("seconds", None)  # timings live in stages.json, so that metrics.json is reproducible
        RunDir(folder).write_metrics(metrics)
        return metrics

    @staticmethod
    def _raw_class_averages(folder: Path) -> None:
        stack = ParticleStack.from_file(folder / "particles.star")
        labels = np.asarray(stack.column("rlnClassNumber"), dtype=np.int64) - 1
        raw = stack.read_image_column("cpNoisyImageName")
        write_mrcs(folder / "class_averages.mrcs", class_averages(raw, labels, K_VIEWS), stack.pixel_size_a)

    def classify_drvae(self) -> dict:
        """``cryoprior classify --method drvae-bsk``: DRVAE trained on the stack alone, then
        balanced clustering rounds (no simulation, no clean images)."""
        return self._classify("classify_drvae", "drvae-bsk", "DRVAE + BSK-means++ (trained on the stack itself)")

    def classify_inplane(self, method: str) -> dict:
        """``cryoprior classify --method METHOD --max-shift 3`` of the in-plane stack (drvae-bsk with
        ``--align``); the class averages are of the particles aligned to them."""
        return self._classify(f"inplane_{method}", method, INPLANE_METHODS[method], inplane=True)

    def classify_oracle(self) -> dict:
        """Class averages of the raw images grouped by the true views: the best that averaging gives."""
        from cryoprior.workflows.classify import rebased_table

        folder = self.run.child("classify_oracle", None, self.argv, method="oracle (true view labels)").path
        stack = ParticleStack.from_file(self.views_star)
        truth = np.asarray(stack.column("cpViewLabel"), dtype=np.int64)
        table = rebased_table(stack, folder.absolute())
        table["rlnClassNumber"] = truth + 1
        write_star(folder / "particles.star", table, stack.optics)
        write_mrcs(folder / "class_averages.mrcs", class_averages(stack.images(), truth, K_VIEWS), stack.pixel_size_a)
        metrics = {"kind": "classify", "label": "oracle (true labels)", "oracle": True, "method": "oracle",
                   "classes": K_VIEWS, "n": len(stack), **classification_scores(truth, truth)}
        RunDir(folder).write_metrics(metrics)
        return metrics

    # reconstruction
    def reconstruct(self, prior: str) -> dict:
        from cryoprior.recon.mstep import ReconstructionConfig
        from cryoprior.workflows.reconstruct import ReconstructJob, run_reconstruct

        manifest = json.loads((self.data / "uniform" / "dataset.json").read_text())
        truth = self.data / "uniform" / manifest["volumes"][0]
        folder = self.run.path / f"reconstruct_{prior}"
        job = ReconstructJob(denoiser=self.cfg.red_model, truth=str(truth), device=str(self.device))
        report = run_reconstruct(self.uniform_star, folder, job, ReconstructionConfig(prior=prior), None,
                                 self.argv, overwrite=True)
        keep = ("prior", "lambda", "box", "pixel_size_a", "n_particles", "resolution_truth_05_a",
                "resolution_truth_0143_a", "resolution_half_0143_a")
        metrics = {"kind": "reconstruct", "label": METHOD_LABELS.get(prior, prior), **{k: report[k] for k in keep if k in report}}
        RunDir(folder).write_metrics(metrics)
        return metrics


def _reason_red(model: str | None, device: torch.device) -> str | None:
    """Why RED cannot run here (no methods.red, or no 3D denoiser ``model``), or None."""
    why = missing("cryoprior.recon.mstep", "load_prior_denoiser")
    if why:
        return why
    from cryoprior.recon.mstep import load_prior_denoiser

    try:
        load_prior_denoiser(model, device)
    except CryopriorError as exc:
        return f"no learned 3D prior: {exc}"
    return None


#: (stage name, method of _Demo that does it, its arguments, why it is unavailable or None)
Stage = tuple[str, str, tuple, str | None]


def plan(cfg: DemoConfig, device: torch.device) -> list[Stage]:
    """The demo's stages in order, each with the reason it cannot run in this version (or None)."""
    cdae_why = (missing("cryoprior.nn.cdae", "load_model", "denoise_images", "CDAEConfig")
                or missing("cryoprior.workflows.denoise", "train"))
    classify_why = missing("cryoprior.workflows.classify", "run_classify", "ClassifyConfig", "rebased_table")
    recon_why = missing("cryoprior.workflows.reconstruct", "run_reconstruct", "ReconstructJob")
    base_why = missing("cryoprior.classical", "denoise", "available")
    here: list[str] = []
    if base_why is None:
        from cryoprior.classical import available

        here = available()
    denoise_why = {}
    for m in cfg.denoisers:
        if m == "cdae":
            denoise_why[m] = cdae_why
        else:
            denoise_why[m] = base_why or (None if m in here else f"baseline {m!r} is not available here "
                                          f"({', '.join(here)} are)")
    stages: list[Stage] = [("simulate_views", "simulate", ("views",), None)]
    if cfg.n_inplane:
        stages.append(("simulate_inplane", "simulate", ("inplane",), None))
    stages += [("simulate_uniform", "simulate", ("uniform",), None), ("measure_snr", "measure_snr", (), None)]
    stages += [(f"denoise_{m}", "denoise_cdae", (), denoise_why[m]) if m == "cdae"
               else (f"denoise_{m}", "denoise_baseline", (m,), denoise_why[m]) for m in cfg.denoisers]
    stages.append(("classify_raw", "classify_raw", (), classify_why))
    stages += [(f"classify_{m}", "classify_denoised", (m,), classify_why or denoise_why[m]) for m in cfg.denoisers]
    drvae_why = classify_why or missing("cryoprior.nn.drvae", "train_drvae", "DRVAEConfig")
    stages.append(("classify_drvae", "classify_drvae", (), drvae_why))
    stages.append(("classify_oracle", "classify_oracle", (), classify_why))
    if cfg.n_inplane:
        stages += [(f"inplane_{m}", "classify_inplane", (m,), drvae_why if m == "drvae-bsk" else classify_why)
                   for m in INPLANE_METHODS]
    for p in cfg.priors:
        why = recon_why or (_reason_red(cfg.red_model, device) if p in ("red", "cw-red") else None)
        stages.append((f"reconstruct_{p}", "reconstruct", (p,), why))
    if cfg.heldout_denoisers:
        stages.append(("split_uniform", "split_uniform", (), None))
    no_map = recon_why or (None if "gaussian" in cfg.priors else
                           "needs the reconstruct_gaussian stage's map (add gaussian to --priors)")
    gan_why = missing("cryoprior.workflows.denoise_gan", "train_run") or no_map
    for m in cfg.heldout_denoisers:
        learned = {"cdae": cdae_why, "gan": gan_why, "l1-ae": gan_why}
        why = learned[m] if m in learned else (
            base_why or (None if m in here else f"baseline {m!r} is not available here ({', '.join(here)} are)"))
        stages.append((f"heldout_{m}", "heldout", (m,), why))
    return stages


def run_demo(out: str | Path, cfg: DemoConfig | None = None, argv: list[str] | None = None,
             report: bool = True) -> dict:
    """Run (or resume) the demo into ``out``; returns the metrics it wrote to metrics.json."""
    cfg = cfg or DemoConfig()
    cfg.validate()
    check_stage_configs(cfg)
    device = resolve_device(cfg.device)
    with run_folder(out, [cfg.structure, cfg.red_model], argv), RunDir(out) as run:
        run.attach_log()
        stages = plan(cfg, device)
        run.check_config(cfg, argv, ignore=("device",), stages=[name for name, *_ in stages])
        log.info("cryoprior demo in %s on %s: %d stages; the same command again resumes it", run.path, device, len(stages))
        demo = _Demo(run, cfg, device, argv)
        results: dict = {}
        with bar(len(stages), "cryoprior demo", unit="stage") as pbar:
            for i, (name, method, args, why) in enumerate(stages, 1):
                log.info("demo stage %d/%d: %s", i, len(stages), name)
                pbar.set_postfix_str(name)
                if why is not None:
                    run.unavailable(name, why)
                else:
                    fn = getattr(demo, method)
                    results[name] = run.stage(name, lambda fn=fn, args=args: fn(*args), log_file=True)
                pbar.update(1)
        metrics = collect_metrics(cfg, results)
        unavailable = {name: why for name, _, _, why in stages if why is not None}
        if unavailable:
            metrics["not_available"] = unavailable
        run.write_metrics(metrics)
        if report:
            build_report(run.path)
    return metrics


def collect_metrics(cfg: DemoConfig, results: dict) -> dict:
    """The run's summary: measured SNRs and the headline numbers of each finished stage."""
    metrics: dict = {"snr_requested_views": cfg.views_snr, "snr_requested_uniform": cfg.snr}
    if cfg.n_inplane:
        metrics["snr_requested_inplane"] = cfg.inplane_snr
    for name, value in results.get("measure_snr", {}).items():
        metrics[f"snr_measured_{name}"] = value
    for prefix, key in (("denoise_", "denoise"), ("heldout_", "denoise_heldout")):
        den = {n.removeprefix(prefix): r for n, r in results.items() if n.startswith(prefix)}
        if den:
            first = next(iter(den.values()))
            keys = ("psnr_db", "ssim", "spread_ratio")
            metrics[key] = {"noisy input": {k: first[f"input_{k}"] for k in keys}}
            metrics[key].update({m: {k: r[k] for k in keys} for m, r in den.items()})
    if "split_uniform" in results:
        metrics["heldout_split"] = results["split_uniform"]
    for prefix, key in (("classify_", "classify"), ("inplane_", "classify_inplane")):
        cls = {n.removeprefix(prefix): r for n, r in results.items() if n.startswith(prefix)}
        if cls:
            metrics[key] = {m: {k: round(r[k], 4) for k in ("accuracy", "f1", "nmi", "ari")} for m, r in cls.items()}
    rec = {n.removeprefix("reconstruct_"): r for n, r in results.items() if n.startswith("reconstruct_")}
    if rec:
        metrics["reconstruct"] = {p: {k: v for k, v in r.items() if k.startswith("resolution")} for p, r in rec.items()}
    return metrics


def summary(metrics: dict) -> str:
    """A few lines for the terminal."""
    lines = [f"SNR of the {name} stack: requested {metrics[f'snr_requested_{name}']:g}, measured "
             + (f"{metrics[f'snr_measured_{name}']:.3f}" if f"snr_measured_{name}" in metrics else "-")
             for name in DATASETS if f"snr_requested_{name}" in metrics]
    for m, s in metrics.get("denoise", {}).items():
        lines.append(f"denoise {m:<12} PSNR {s['psnr_db']:6.2f} dB  SSIM {s['ssim']:.3f}  "
                     f"spread across particles {s['spread_ratio']:.2f} (clean 1)")
    for key, what in (("classify", "classify"), ("classify_inplane", "classify in-plane stack,")):
        for m, s in metrics.get(key, {}).items():
            lines.append(f"{what} {m:<12} F1 {s['f1']:.3f}  accuracy {s['accuracy']:.3f}  NMI {s['nmi']:.3f}")
    for p, s in metrics.get("reconstruct", {}).items():
        if "resolution_truth_0143_a" in s:
            lines.append(f"reconstruct {p:<8} {s['resolution_truth_0143_a']:.2f} Å at FSC 0.143 with the truth "
                         f"({s.get('resolution_truth_05_a', float('nan')):.2f} Å at 0.5)")
    if "denoise_heldout" in metrics:
        split = metrics.get("heldout_split", {})
        lines.append(f"held-out uniform particles ({split.get('n_heldout', '?')}; GAN and l1-AE trained on "
                     f"{split.get('n_train', '?')} with the Gaussian-prior map's projections):")
    for m, s in metrics.get("denoise_heldout", {}).items():
        lines.append(f"  held-out {m:<11} PSNR {s['psnr_db']:6.2f} dB  SSIM {s['ssim']:.3f}")
    for stage, why in metrics.get("not_available", {}).items():
        lines.append(f"{stage}: not available in this version ({why})")
    return "\n".join(lines)
