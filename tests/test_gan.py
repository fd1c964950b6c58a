"""Robust-GAN training and the `denoise --method gan` commands: denoising, resume, references from a
map and poses, output units, bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from cryoprior.cli.main import main
from cryoprior.errors import InputError
from cryoprior.io.mrc import write_map, write_mrcs
from cryoprior.io.stack import ParticleStack
from cryoprior.io.star import read_star, write_star
from cryoprior.nn.gan import GANConfig, stack_scale, train_gan
from cryoprior.nn.gan_data import map_pairs, sim_pairs
from cryoprior.nn.training import load_checkpoint
from cryoprior.sim.dataset import SimulationConfig, simulate_dataset

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

SMALL = ["--g-widths", "8", "16", "--d-widths", "8", "16", "--gan-batch-size", "10", "--device", "cpu"]


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """Training pairs and a separate target, 1hvr, 4 views, SNR 0.1, 32 px; and a CTF + shift +
    uniform-orientation stack of 1ake for the map protocol."""
    root = tmp_path_factory.mktemp("gan")
    base = dict(structures=["1hvr"], box=32, pixel_size_a=2.5, views=4, snr=0.1)
    simulate_dataset(SimulationConfig(**base, n=240, seed=1), root / "pairs")
    simulate_dataset(SimulationConfig(**base, n=60, seed=2), root / "target")
    simulate_dataset(SimulationConfig(structures=["1ake"], box=32, pixel_size_a=2.5, n=40, views=None, ctf=True,
                                      shift_a=4.0, snr=0.1, seed=3), root / "ctf")
    return root


def _run(argv, capsys):
    rc = main(["--quiet", *argv])
    return rc, capsys.readouterr().err


def test_reference_projection_equals_the_simulators_clean_image(sim):
    _, clean, _ = sim_pairs(sim / "ctf")
    _, refs, stack = map_pairs(sim / "ctf" / "particles.star", sim / "ctf" / "volumes" / "1ake.mrc")
    assert stack.has_column("rlnDefocusU") and np.abs(stack.column("rlnOriginXAngst")).max() > 1
    assert np.abs(clean).max() > 0.1
    np.testing.assert_allclose(refs, clean, atol=1e-4 * np.abs(clean).max())


def _tensor_pairs(sim, n=120):
    noisy, clean, _ = sim_pairs(sim / "pairs")
    m1, s1 = stack_scale(noisy[:n])
    m2, s2 = stack_scale(clean[:n])
    y = torch.from_numpy((noisy[:n] - m1) / s1)[:, None]
    x = torch.from_numpy((clean[:n] - m2) / s2)[:, None]
    return y, x


@pytest.mark.parametrize("gan,extra", [("beta", {}), ("wgan-gp", {}),
                                       ("beta", {"ema_epochs": 0.5, "lambda_start": 100.0, "lambda_epochs": 2})])
def test_resume_equals_an_uninterrupted_run(sim, tmp_path, gan, extra):
    """Also with the generator's weight average (the returned G; its state is in the checkpoint)
    and a lambda schedule that spans the interruption."""
    y, x = _tensor_pairs(sim, 60)
    cfg = GANConfig(gan=gan, gan_epochs=2, gan_batch_size=10, g_widths=[8, 16], d_widths=[8, 16], seed=3, **extra)
    g_full, d_full, _ = train_gan(y, x, cfg)
    ckpt = tmp_path / "ck.pt"
    train_gan(y, x, GANConfig(**{**cfg.__dict__, "gan_epochs": 1}), checkpoint=ckpt)
    assert load_checkpoint(ckpt)["epoch"] == 1
    g_res, d_res, _ = train_gan(y, x, cfg, checkpoint=ckpt)
    for a, b in [(g_full, g_res), (d_full, d_res)]:
        for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(va, vb, rtol=0, atol=0, msg=k)
    # the two runs did train: weights moved away from the initialisation
    g_init, _, _ = train_gan(y, x, GANConfig(**{**cfg.__dict__, "gan_epochs": 0}))
    assert not torch.equal(next(iter(g_init.parameters())), next(iter(g_full.parameters())))


def test_warmup_epochs_are_reconstruction_only_training(sim):
    """During --warmup-epochs the generator trains on the l1 term alone (the same weights as the
    l1-AE after as many epochs); adversarial epochs after it change them."""
    y, x = _tensor_pairs(sim, 40)
    small = dict(gan_batch_size=10, g_widths=[8, 16], d_widths=[8, 16], seed=5)
    ae, _, _ = train_gan(y, x, GANConfig(gan="none", gan_epochs=1, **small))
    warm, disc, curves = train_gan(y, x, GANConfig(gan="beta", warmup_epochs=1, gan_epochs=1, **small))
    for (k, va), vb in zip(ae.state_dict().items(), warm.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=0, atol=0, msg=k)
    assert curves["discriminator"] == [0.0]  # the discriminator did not train
    after, _, curves = train_gan(y, x, GANConfig(gan="beta", warmup_epochs=1, gan_epochs=2, **small))
    assert curves["discriminator"][1] != 0.0
    assert not torch.equal(next(iter(ae.parameters())), next(iter(after.parameters())))


def test_weight_average_is_the_bias_corrected_mean_of_every_generator_step(sim, monkeypatch):
    """--ema-epochs: the returned generator is Σ d^(t−s) θ_s / Σ d^(t−s) over the weights (and
    batch-norm statistics) after each generator step s = 1..t, d = 1 − 1/(ema_epochs · steps/epoch
    · k_g); not the raw weights."""
    from cryoprior.nn import gan as gan_module

    y, x = _tensor_pairs(sim, 40)
    small = dict(gan_batch_size=10, g_widths=[8, 16], d_widths=[8, 16], seed=2, gan_epochs=2)
    snapshots = []
    update = gan_module.WeightAverage.update

    def record(self, model):
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        update(self, model)

    monkeypatch.setattr(gan_module.WeightAverage, "update", record)
    avg, _, _ = train_gan(y, x, GANConfig(ema_epochs=1.5, **small))
    raw, _, _ = train_gan(y, x, GANConfig(ema_epochs=0, **small))
    assert len(snapshots) == 2 * 4 * 2  # epochs × minibatches × k_g
    decay = 1 - 1 / (1.5 * 4 * 2)
    weights = torch.tensor([decay ** (len(snapshots) - 1 - s) for s in range(len(snapshots))], dtype=torch.float64)
    for k, v in avg.state_dict().items():
        if not v.is_floating_point():
            continue
        manual = sum(w * snap[k].double() for w, snap in zip(weights, snapshots)) / weights.sum()
        torch.testing.assert_close(v.double(), manual, rtol=1e-4, atol=1e-6, msg=k)
    for k, v in raw.state_dict().items():  # the raw run is the same trajectory's last step
        torch.testing.assert_close(v, snapshots[-1][k], rtol=0, atol=0, msg=k)
    gap = max(float((avg.state_dict()[k] - v).abs().max()) for k, v in raw.state_dict().items() if v.is_floating_point())
    assert gap > 1e-3


def test_lambda_schedule(sim):
    """--lambda-start: λ moves geometrically (linearly from 0) to --lambda; training uses it."""
    y, x = _tensor_pairs(sim, 20)
    small = dict(gan_batch_size=10, g_widths=[8, 16], d_widths=[8, 16], seed=4, gan_epochs=1)
    plain, _, _ = train_gan(y, x, GANConfig(**small))
    same, _, _ = train_gan(y, x, GANConfig(lambda_start=10.0, lambda_epochs=1, **small))
    scheduled, _, _ = train_gan(y, x, GANConfig(lambda_start=1000.0, lambda_epochs=1, **small))
    for (k, va), vb in zip(plain.state_dict().items(), same.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=0, atol=0, msg=k)
    assert not torch.equal(next(iter(plain.parameters())), next(iter(scheduled.parameters())))
    cfg = GANConfig(recon_weight=10.0, lambda_start=1000.0, lambda_epochs=2)
    assert [round(cfg.lambda_at(e), 6) for e in (0, 1, 2, 5)] == [1000.0, 100.0, 10.0, 10.0]  # geometric
    assert GANConfig(recon_weight=10.0, lambda_start=0.0, lambda_epochs=4).lambda_at(1) == 2.5  # linear from 0
    assert GANConfig(recon_weight=10.0).lambda_at(0) == 10.0
    with pytest.raises(InputError):
        GANConfig(lambda_start=float("inf"), lambda_epochs=1).validate()
    with pytest.raises(InputError):
        GANConfig(ema_epochs=-1).validate()


def test_spectral_norm_bounds_every_discriminator_layer():
    from cryoprior.nn.gan import build_networks

    def norms(disc):
        return [float(torch.linalg.matrix_norm(m.weight.detach().flatten(1), 2)) for m in disc.modules()
                if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]

    small = dict(g_widths=[8, 16], d_widths=[8, 16], seed=1)
    _, plain = build_networks(GANConfig(**small))
    _, disc = build_networks(GANConfig(**small, d_spectral_norm=True))
    with torch.no_grad():
        for _ in range(30):  # power iterations run in training-mode forward passes
            disc.train()(torch.randn(4, 1, 32, 32))
    assert max(abs(n - 1) for n in norms(disc)) < 0.05
    assert max(abs(n - 1) for n in norms(plain)) > 0.2


def test_train_apply_denoises_in_reference_units(sim, tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "den"
    target = sim / "target" / "particles.star"
    rc, err = _run(["denoise", "train", "--method", "gan", "--pairs", str(sim / "pairs"), "--target", str(target),
                    "--out", str(run), "--gan-epochs", "6", *SMALL], capsys)
    assert rc == 0, err
    metrics = json.loads((run / "metrics.json").read_text())
    curves = json.loads((run / "losses.json").read_text())
    assert set(curves) == {"generator", "recon", "discriminator"} and len(curves["generator"]) == 6
    assert metrics["held_out"]["psnr_db"] > metrics["held_out"]["psnr_input_db"] + 10
    assert metrics["target"]["psnr_db"] > metrics["target"]["psnr_input_db"] + 10
    rc, err = _run(["denoise", "apply", "--model", str(run), str(target), "--out", str(out), "--device", "cpu"], capsys)
    assert rc == 0, err
    stack = ParticleStack.from_file(out / "particles.star")
    den, clean = stack.images(), stack.read_image_column("cpCleanImageName")
    # the references' intensity units (not per-image normalised): same scale as the clean images
    ratio = den.std(axis=(1, 2)).mean() / clean.std(axis=(1, 2)).mean()
    assert 0.6 < ratio < 1.4, ratio
    assert abs(den.mean() - clean.mean()) < 0.2 * clean.std()
    assert ((den - clean) ** 2).mean() < 0.3 * clean.var()


def test_ae_baseline_and_map_protocol(sim, tmp_path, capsys):
    run = tmp_path / "ae"
    rc, err = _run(["denoise", "train", "--method", "gan", "--gan", "none", "--recon-loss", "l2",
                    "--reference-map", str(sim / "ctf" / "volumes" / "1ake.mrc"),
                    "--target", str(sim / "ctf" / "particles.star"), "--out", str(run), "--gan-epochs", "1",
                    "--val-fraction", "0.25", "--ema-epochs", "0.5", *SMALL], capsys)
    assert rc == 0, err
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["label"] == "l2-AE" and metrics["held_out"]["n_images"] == 10
    assert "discriminator" not in json.loads((run / "losses.json").read_text())
    # --ema-epochs: model.pt (what `denoise apply` loads) holds the weight average, not the raw weights
    saved = torch.load(run / "model.pt", weights_only=True)["state_dict"]
    ckpt = load_checkpoint(run / "checkpoints" / "gan.pt")
    assert int(ckpt["generator_ema"]["steps"]) > 0
    for k, v in saved.items():
        torch.testing.assert_close(v, ckpt["generator_ema"][f"module.{k}"], rtol=0, atol=0, msg=k)
    assert any(not torch.equal(v, ckpt["generator"][k]) for k, v in saved.items())


def _broken_star(src, dst, drop=(), nan=False):
    table, optics = read_star(src / "particles.star")
    table = table.drop(columns=list(drop))
    if nan:
        images = ParticleStack.from_file(src / "particles.star").images()
        images[3, 5, 5] = np.nan
        dst.mkdir()
        write_mrcs(dst / "p.mrcs", images, 2.5)
        table["rlnImageName"] = [f"{i + 1:06d}@p.mrcs" for i in range(len(table))]
        table = table.drop(columns=["cpCleanImageName"])
    else:
        dst.mkdir()
        table["rlnImageName"] = [f"{n.split('@')[0]}@{src / n.split('@')[1]}" for n in table["rlnImageName"]]
    write_star(dst / "particles.star", pd.DataFrame(table), optics)
    return dst / "particles.star"


def test_bad_inputs_one_line_errors_and_no_output(sim, tmp_path, capsys):
    vol = sim / "ctf" / "volumes" / "1ake.mrc"
    star = sim / "ctf" / "particles.star"
    cases = {
        "poses": (["--reference-map", str(vol), "--target", str(_broken_star(sim / "ctf", tmp_path / "np", drop=["rlnAngleTilt"]))], "rlnAngleTilt"),
        "ctf": (["--reference-map", str(vol), "--target", str(_broken_star(sim / "ctf", tmp_path / "nc", drop=["rlnDefocusU"]))], "rlnDefocusU"),
        "nan": (["--reference-map", str(vol), "--target", str(_broken_star(sim / "ctf", tmp_path / "nan", nan=True))], "NaN"),
        "both": (["--reference-map", str(vol), "--pairs", str(sim / "pairs"), "--target", str(star)], "exactly one"),
    }
    small = torch.zeros(16, 16, 16).numpy()
    write_map(tmp_path / "box16.mrc", small, 2.5)
    write_map(tmp_path / "px3.mrc", torch.zeros(32, 32, 32).numpy(), 3.0)
    cases["box"] = (["--reference-map", str(tmp_path / "box16.mrc"), "--target", str(star)], "box 16")
    cases["pixel"] = (["--reference-map", str(tmp_path / "px3.mrc"), "--target", str(star)], "pixel size 3")
    for name, (args, needle) in cases.items():
        out = tmp_path / f"out_{name}"
        rc, err = _run(["denoise", "train", "--method", "gan", *args, "--out", str(out), *SMALL], capsys)
        lines = [ln for ln in err.strip().splitlines() if ln]
        assert rc == 2 and len(lines) == 1 and needle in lines[0], (name, err)
        assert not out.exists(), name


def test_bench_reconstruction_uses_the_poses(sim):
    """bench gan's 3D part: clean images reconstructed at their own poses (with CTF and origins)
    match the truth far better than the same images at shuffled poses."""
    from cryoprior.bench.common import map_scores
    from cryoprior.bench.gan_map import reconstruct
    from cryoprior.io.mrc import read_map

    _, clean, stack = sim_pairs(sim / "ctf")
    truth = torch.from_numpy(read_map(sim / "ctf" / "volumes" / "1ake.mrc")[0]).float()
    right = map_scores(reconstruct(stack, clean), truth, stack.pixel_size_a)
    wrong = map_scores(reconstruct(stack, clean[::-1].copy()), truth, stack.pixel_size_a)
    assert right["res_truth_05_a"] < 0.8 * wrong["res_truth_05_a"]


def test_models_saved_before_the_stem_load_as_full_resolution_generators():
    from cryoprior.nn.denoiser import build_model
    from cryoprior.nn.models.resnet import ResNetAutoencoder, ResNetConfig

    old = ResNetAutoencoder(ResNetConfig(widths=[4, 8]))
    arch = {"kind": "resnet-ae", **old.config.to_dict()}
    del arch["stem"]  # the record of a model file written before the field existed
    new = build_model(arch)
    new.load_state_dict(old.state_dict())
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(new.eval()(x), old.eval()(x))
