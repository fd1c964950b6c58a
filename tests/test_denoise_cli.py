"""`cryoprior denoise train|apply`: round trips on a tiny simulated dataset, resume, bad inputs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml

from cryoprior.cli.main import main
from cryoprior.io.stack import ParticleStack
from cryoprior.io.star import read_star
from cryoprior.nn.denoiser import save_model
from cryoprior.nn.models.cdae import CDAECascade
from cryoprior.sim.dataset import SimulationConfig, simulate_dataset

FAST = ["--pretrain-epochs", "5", "--batch-size", "16", "--finetune-epochs", "1", "--single-dae-epochs", "1", "--dncnn-epochs", "1",
        "--knn-k", "10", "--widths", "8", "16", "16", "--dncnn-depth", "3", "--dncnn-width", "4", "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """A pre-training folder with SNR levels and a target stack with truth, 200 images of 32 px."""
    root = tmp_path_factory.mktemp("denoise")
    base = dict(structures=["1ake"], box=32, pixel_size_a=2.0, n=200, views=4, snr=0.1)
    simulate_dataset(SimulationConfig(**base, snr_levels=[0.1, 0.4, 0.6, math.inf], seed=1), root / "pre")
    simulate_dataset(SimulationConfig(**base, seed=2), root / "target")
    return root


def _run(argv, capsys):
    rc = main(["--quiet", *argv])
    captured = capsys.readouterr()
    return rc, captured.err


def test_train_apply_round_trip(sim, tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "denoised"
    rc, err = _run(["denoise", "train", "--method", "cdae", "--pretrain", str(sim / "pre"),
                    "--target", str(sim / "target" / "particles.star"), "--out", str(run), *FAST], capsys)
    assert rc == 0, err
    for name in ("model.pt", "config.yaml", "losses.json", "losses.png", "metrics.json", "run.log"):
        assert (run / name).is_file(), name
    curves = json.loads((run / "losses.json").read_text())
    assert len(curves) == 6 and all(len(v) in (1, 5) and np.isfinite(v).all() for v in curves.values())
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n_images"] == 200
    assert metrics["psnr_denoised_db"] > metrics["psnr_input_db"]

    target = sim / "target" / "particles.star"
    rc, err = _run(["denoise", "apply", "--model", str(run), str(target), "--out", str(out), "--device", "cpu"], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == [".cryoprior-files", "config.yaml", "denoised.mrcs", "particles.star"]
    table, _ = read_star(out / "particles.star")
    assert all(name.endswith("@denoised.mrcs") for name in table["rlnImageName"])
    original, _ = read_star(target)
    np.testing.assert_array_equal(table["cpViewLabel"], original["cpViewLabel"])
    stack = ParticleStack.from_file(out / "particles.star")
    images = stack.images()
    assert images.shape == (200, 32, 32) and np.isfinite(images).all()
    assert stack.read_image_column("cpCleanImageName").shape == (200, 32, 32)  # truth still found
    # the written images are the model's output, equalised or not as asked
    out_he = tmp_path / "denoised_he"
    rc, err = _run(["denoise", "apply", "--model", str(run), str(target), "--out", str(out_he), "--equalize",
                    "--device", "cpu"], capsys)
    assert rc == 0, err
    eq = ParticleStack.from_file(out_he / "particles.star").images()
    assert eq.min() > 0 and eq.max() < 1


def test_single_dae_and_dncnn_train_and_resume(sim, tmp_path, capsys):
    target = str(sim / "target" / "particles.star")
    run = tmp_path / "dae"
    rc, err = _run(["denoise", "train", "--method", "single-dae", "--target", target, "--out", str(run), *FAST], capsys)
    assert rc == 0, err
    assert (run / "model.pt").is_file()
    rc, err = _run(["denoise", "train", "--method", "single-dae", "--target", target, "--out", str(run), *FAST], capsys)
    assert rc == 2 and "already exists" in err
    rc, err = _run(["denoise", "train", "--method", "single-dae", "--target", target, "--out", str(run),
                    "--resume", *FAST], capsys)
    assert rc == 0, err
    # --resume with other widths: refused, naming the field, and config.yaml is kept (issue 11, item 3)
    before = (run / "config.yaml").read_text()
    other = [a if a != "16" else "32" for a in FAST]
    rc, err = _run(["denoise", "train", "--method", "single-dae", "--target", target, "--out", str(run),
                    "--resume", *other], capsys)
    assert rc == 2 and "widths" in err and len(err.strip().splitlines()) == 1, err
    assert (run / "config.yaml").read_text() == before
    rc, err = _run(["denoise", "train", "--method", "dncnn", "--target", target, "--out", str(run), "--resume",
                    "--pretrain", str(sim / "pre"), *FAST], capsys)
    assert rc == 2 and "cannot resume" in err

    run = tmp_path / "dncnn"
    rc, err = _run(["denoise", "train", "--method", "dncnn", "--pretrain", str(sim / "pre"), "--out", str(run), *FAST],
                   capsys)
    assert rc == 0, err
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["method"] == "dncnn" and "psnr_input_db" not in metrics


@pytest.mark.parametrize(
    "case",
    ["missing_target", "missing_pretrain", "no_levels", "widths_without_pretrain", "bad_star"],
)
def test_train_bad_inputs_fail_cleanly(sim, tmp_path, capsys, case):
    target = str(sim / "target" / "particles.star")
    pre = str(sim / "pre")
    bad_star = tmp_path / "bad.star"
    bad_star.write_text("data_particles\n\nloop_\n_rlnImageName #1\n000001@missing.mrcs\n")
    argv, culprit = {
        "missing_target": (["--pretrain", pre, "--target", str(tmp_path / "nope.star")], "nope.star"),
        "missing_pretrain": (["--pretrain", str(tmp_path / "nodir"), "--target", target], "nodir"),
        "no_levels": (["--pretrain", str(sim / "target"), "--target", target], "particles.star"),
        "widths_without_pretrain": (["--target", target], "--pretrain"),
        "bad_star": (["--pretrain", pre, "--target", str(bad_star)], "bad.star"),
    }[case]
    run = tmp_path / "run"
    rc, err = _run(["denoise", "train", "--out", str(run), *argv, *FAST], capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cryoprior denoise: error:") and culprit in lines[0]
    assert not run.exists()


def test_apply_bad_inputs_fail_cleanly(sim, tmp_path, capsys):
    target = str(sim / "target" / "particles.star")
    out = tmp_path / "out"
    rc, err = _run(["denoise", "apply", "--model", str(tmp_path / "norun"), target, "--out", str(out)], capsys)
    assert rc == 2 and "norun" in err and "no trained model" in err and not out.exists()
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "model.pt").write_text("garbage")
    rc, err = _run(["denoise", "apply", "--model", str(tmp_path / "fake"), target, "--out", str(out)], capsys)
    assert rc == 2 and "model.pt" in err and not out.exists()
    model = CDAECascade(1, widths=[4, 8])
    save_model(tmp_path / "tiny" / "model.pt", "cdae", {"kind": "cdae", "n_blocks": 1, "widths": [4, 8]}, model, {})
    rc, err = _run(["denoise", "apply", "--model", str(tmp_path / "tiny"), str(tmp_path / "x.star"), "--out",
                    str(out)], capsys)
    assert rc == 2 and "x.star" in err and len(err.strip().splitlines()) == 1 and not out.exists()
    rc, err = _run(["denoise", "apply", "--model", str(tmp_path / "tiny"), target, "--out", str(out)], capsys)
    assert rc == 0, err
    assert (out / "denoised.mrcs").is_file()
    # the precision the network ran at is recorded; the default is float32 on every machine
    record = yaml.safe_load((out / "config.yaml").read_text())
    assert record["precision"] == "fp32" and record["inference_precision"] == "fp32"
    rc, err = _run(["denoise", "apply", "--model", str(tmp_path / "tiny"), target, "--out", str(out)], capsys)
    assert rc == 2 and "already exists" in err
    # --out the model folder (or inside it) is refused; the model is kept (issue 11, item 1)
    for bad in (tmp_path / "tiny", tmp_path / "tiny" / "sub"):
        rc, err = _run(["denoise", "apply", "--model", str(tmp_path / "tiny"), target, "--out", str(bad),
                        "--overwrite"], capsys)
        assert rc == 2 and "input" in err and (tmp_path / "tiny" / "model.pt").is_file()
