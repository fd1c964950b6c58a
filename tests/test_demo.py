"""``cryoprior demo``: every stage on a tiny config, resumable, honest about what is missing."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import yaml

from cryoprior import progress
from cryoprior.cli.main import main as cli_main
from cryoprior.errors import InputError
from cryoprior.io.stack import ParticleStack
from cryoprior.workflows import demo as demo_mod
from cryoprior.workflows.demo import DemoConfig, run_demo

TINY = dict(box=32, pixel_size_a=3.5, views_box=32, views_pixel_size_a=3.5, n_views=300, n_uniform=200,
            cdae_finetune_epochs=1, denoisers=["cdae", "lowpass"], device="cpu",
            heldout_denoisers=["gan", "lowpass"], gan_epochs=4, n_inplane=160)


def _config(**kw) -> DemoConfig:
    return DemoConfig(**{**TINY, **kw})


def _flags(**kw) -> list[str]:
    """The command-line flags of ``cryoprior demo`` that give ``DemoConfig(**kw)``."""
    flags = {f.name: f.metadata.get("flag", "--" + f.name.replace("_", "-")) for f in dataclasses.fields(DemoConfig)}
    args: list[str] = []
    for name, value in kw.items():
        args += [flags[name], *map(str, value if isinstance(value, list) else [value])]
    return args


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The tiny demo run in one go through the command line, with --quiet."""
    out = tmp_path_factory.mktemp("demo") / "run"
    try:
        assert cli_main(["--quiet", "demo", "--out", str(out), *_flags(**TINY)]) == 0
    finally:
        progress.set_enabled(True)  # --quiet switched the bars off for the whole process
    return out


def test_demo_writes_a_run_folder_per_stage(uninterrupted):
    out = uninterrupted
    stages = json.loads((out / "stages.json").read_text())
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["config"]["box"] == 32 and config["config"]["seed"] == 0
    assert {"cryoprior_version", "time", "argv"} <= set(config)
    assert config["stages"] == list(stages)
    done = {k for k, v in stages.items() if v["status"] == "done"}
    # every planned stage ran: CDAE and RED must not silently become "not available"
    assert done == set(stages), {k: v for k, v in stages.items() if k not in done}
    assert {"simulate_views", "simulate_uniform", "measure_snr", "denoise_cdae", "denoise_lowpass", "classify_raw",
            "classify_cdae", "classify_lowpass", "classify_drvae", "classify_oracle", "reconstruct_gaussian", "reconstruct_red",
            "split_uniform", "heldout_gan", "heldout_lowpass", "simulate_inplane", "inplane_kmeans", "inplane_align-kmeans", "inplane_ml2d",
            "inplane_drvae-bsk"} <= done
    for name in done - {"measure_snr", "split_uniform"} - {s for s in done if s.startswith("simulate_")}:
        folder = out / name
        assert (folder / "config.yaml").exists() and (folder / "metrics.json").exists(), name
        assert (out / "logs" / f"{name}.log").exists()
    assert (out / "denoise_cdae" / "model.pt").exists() and (out / "denoise_cdae" / "checkpoints").is_dir()
    assert (out / "run.log").exists() and (out / "report.html").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert abs(metrics["snr_measured_views"] - 0.03) < 0.003
    assert abs(metrics["snr_measured_uniform"] - 0.1) < 0.01
    assert "not_available" not in metrics
    # the oracle's F1 is 1 by construction; what can fail is the file it writes: true views as classes
    oracle = ParticleStack.from_file(out / "classify_oracle" / "particles.star")
    np.testing.assert_array_equal(oracle.column("rlnClassNumber"), oracle.column("cpViewLabel") + 1)
    assert metrics["reconstruct"]["gaussian"]["resolution_truth_0143_a"] < 20
    # CDAE (one epoch per block here) brings the images closer to the clean projections (+1.9 dB)
    assert metrics["denoise"]["cdae"]["psnr_db"] > metrics["denoise"]["noisy input"]["psnr_db"] + 1.0
    # RED with the shipped 3D prior beats the Gaussian prior at FSC 0.5 to the truth (18.1 vs 20.9 Å)
    red, gauss = metrics["reconstruct"]["red"], metrics["reconstruct"]["gaussian"]
    assert red["resolution_truth_05_a"] < gauss["resolution_truth_05_a"] - 1.0
    # denoising helps: the low-pass output is closer to the clean projections than the input
    assert metrics["denoise"]["lowpass"]["psnr_db"] > metrics["denoise"]["noisy input"]["psnr_db"]
    # the in-plane stack: its own SNR, the aligning methods write each particle's pose, and the
    # report has its section (the tiny particle is too small to classify; test_classify_cli and
    # test_drvae check what the methods achieve)
    assert abs(metrics["snr_measured_inplane"] - 0.05) < 0.005
    assert set(metrics["classify_inplane"]) == {"kmeans", "align-kmeans", "ml2d", "drvae-bsk"}
    for method in ("align-kmeans", "ml2d", "drvae-bsk"):
        posed = ParticleStack.from_file(out / f"inplane_{method}" / "particles.star")
        assert posed.has_column("cpInplaneAngleDeg") and len(np.unique(posed.column("rlnClassNumber"))) == 4, method
    assert "particles at random in-plane angles and shifts</h2>" in (out / "report.html").read_text(encoding="utf-8")
    # noise makes particles differ more than the clean projections do; low-pass removes part of it
    assert metrics["denoise"]["noisy input"]["spread_ratio"] > metrics["denoise"]["lowpass"]["spread_ratio"] > 1


def test_heldout_gan_learns_from_the_noisy_map_alone(uninterrupted):
    """The GAN trained from the Gaussian-prior map and the training particles' poses denoises
    particles it never saw (4 epochs on 160 pairs: 23.6 dB; noisy input 8.3, low-pass 21.4; an
    identity generator, which only rescales the input to the references' units, scored 16.7 on
    the 4-view stack the demo simulated before, 9.0 dB above its input)."""
    out = uninterrupted
    metrics = json.loads((out / "metrics.json").read_text())
    held = metrics["denoise_heldout"]
    assert held["gan"]["psnr_db"] > held["noisy input"]["psnr_db"] + 12.0
    assert held["gan"]["psnr_db"] > held["lowpass"]["psnr_db"] + 0.5
    assert metrics["heldout_split"]["n_heldout"] == 40 and metrics["heldout_split"]["n_train"] == 160
    train = ParticleStack.from_file(out / "data" / "uniform" / "train.star")
    heldout = ParticleStack.from_file(out / "data" / "uniform" / "heldout.star")
    assert not train.has_column("cpCleanImageName")  # no clean image reaches training
    def poses(stack):
        return {tuple(r) for r in stack.table[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy().round(4)}

    assert len(poses(train)) == 160 and not poses(train) & poses(heldout)  # uniform orientations, disjoint
    rec = yaml.safe_load((out / "heldout_gan" / "config.yaml").read_text())
    assert rec["reference_map"].endswith("reconstruct_gaussian/map.mrc") and rec["target"].endswith("train.star")
    assert "(.5,.5)-GAN" in (out / "report.html").read_text(encoding="utf-8")


def test_resumed_run_gives_the_same_metrics(uninterrupted, tmp_path, monkeypatch):
    out = tmp_path / "run"

    def interrupted(self):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:  # stop the run between classification stages
        m.setattr(demo_mod._Demo, "classify_oracle", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run_demo(out, _config(), argv=["test"])
    stages = json.loads((out / "stages.json").read_text())
    assert "classify_raw" in stages and "classify_oracle" not in stages
    assert not (out / "metrics.json").exists()

    def no_rerun(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(demo_mod, "simulate_dataset", no_rerun)
    monkeypatch.setattr(demo_mod._Demo, "denoise_baseline", no_rerun)
    resumed = run_demo(out, _config(), argv=["test"])
    assert resumed == json.loads((uninterrupted / "metrics.json").read_text())
    assert json.loads((out / "metrics.json").read_text()) == resumed


def test_another_config_in_the_same_folder_is_refused(uninterrupted):
    with pytest.raises(InputError, match="box: 32 then, 48 now"):
        run_demo(uninterrupted, DemoConfig(box=48, device="cpu"), argv=["test"])


def test_quiet_demo_prints_no_progress_bars(uninterrupted, capfd):
    # the run is complete: everything is skipped, the summary and the report are written again
    try:
        assert cli_main(["--quiet", "demo", "--out", str(uninterrupted), *_flags(**TINY)]) == 0
    finally:
        progress.set_enabled(True)
    captured = capfd.readouterr()
    assert "it/s" not in captured.err and "%|" not in captured.err
    assert "run folder:" in captured.out and "reconstruct gaussian" in captured.out


def test_unknown_method_is_an_error_before_anything_is_written(tmp_path):
    with pytest.raises(InputError, match="unknown denoiser or prior gan"):
        run_demo(tmp_path / "run", _config(denoisers=["cdae", "gan"]))
    assert not (tmp_path / "run").exists()


def test_red_runs_with_a_trained_3d_prior(tmp_path):
    """RED through `cryoprior reconstruct`, with a (barely) trained prior from `train-prior3d`."""
    prior = tmp_path / "prior3d"
    try:
        assert cli_main(["--quiet", "train-prior3d", "--structures", "4ake", "--validation-structures", "1ake",
                         "--box", "32", "--pairs-per-structure", "2", "--validation-pairs", "1", "--noise-model",
                         "gaussian", "--epochs", "1", "--levels", "3", "--base-channels", "4", "--device", "cpu",
                         "--out", str(prior)]) == 0
    finally:
        progress.set_enabled(True)
    cfg = _config(n_views=40, denoisers=[], priors=["gaussian", "red"], red_model=str(prior))
    metrics = run_demo(tmp_path / "run", cfg, argv=["test"])
    assert "not_available" not in metrics
    red = json.loads((tmp_path / "run" / "reconstruct_red" / "metrics.json").read_text())
    assert red["kind"] == "reconstruct" and red["lambda"] == 1.0 and red["resolution_truth_0143_a"] > 0
    assert "MAP, RED prior" in (tmp_path / "run" / "report.html").read_text(encoding="utf-8")
