"""DRVAE + BSK-means++: the VAE's KL term and reparameterisation, reliable samples, the rounds'
stop and resume, CTF phase flipping and Wiener averages, the CLI and its refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cryoprior.classical.cluster.averages import (
    class_averages,
    ctf_class_sums,
    wiener_averages_from_sums,
)
from cryoprior.classical.cluster.bsk import bsk_means
from cryoprior.cli.main import main
from cryoprior.core.ctf import apply_ctf, ctf_2d, phase_flip
from cryoprior.core.fft import fft2c
from cryoprior.core.metrics import classification_scores
from cryoprior.io.mrc import read_mrc
from cryoprior.io.stack import ParticleStack
from cryoprior.nn import drvae
from cryoprior.nn.drvae import DRVAEConfig, encode_all, train_drvae, train_phase
from cryoprior.nn.models.drvae import DRVAE, kl_divergence, reparameterize
from cryoprior.nn.training import load_checkpoint
from cryoprior.sim.dataset import SimulationConfig, simulate_dataset

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

TINY = dict(classes=4, latent_dim=4, vae_widths=[8, 16], net_box=16, vae_batch_size=32, warmup_steps=150,
            round_steps=8)
TINY_FLAGS = ["--latent-dim", "4", "--vae-widths", "8", "16", "--net-box", "16", "--vae-batch-size", "32",
              "--warmup-steps", "150", "--round-steps", "8", "--max-rounds", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    out = tmp_path_factory.mktemp("drvae") / "sim"
    simulate_dataset(SimulationConfig(structures=["1ake"], box=32, pixel_size_a=2.0, n=160, views=4, snr=1.0,
                                      seed=3), out)
    return out / "particles.star"


def _run(argv, capsys):
    rc = main(["--quiet", *map(str, argv)])
    return rc, capsys.readouterr().err.strip()


# ----------------------------------------------------------------------------- the VAE itself
def test_kl_and_reparameterisation():
    mu, logvar = torch.zeros(3, 5), torch.zeros(3, 5)
    torch.testing.assert_close(kl_divergence(mu, logvar), torch.zeros(3))
    # KL(N(m, s²) || N(0, 1)) = (m² + s² - 1 - log s²) / 2 per dimension
    m, v = 0.7, 2.0
    kl = kl_divergence(torch.full((1, 2), m), torch.full((1, 2), np.log(v)))
    assert float(kl) == pytest.approx(2 * 0.5 * (m * m + v - 1 - np.log(v)), rel=1e-5)
    torch.manual_seed(0)
    z = reparameterize(torch.full((20000, 1), 3.0), torch.full((20000, 1), np.log(4.0)))
    assert float(z.mean()) == pytest.approx(3.0, abs=0.05) and float(z.std()) == pytest.approx(2.0, abs=0.05)
    mu_g, lv_g = torch.ones(4, 2, requires_grad=True), torch.zeros(4, 2, requires_grad=True)
    reparameterize(mu_g, lv_g).sum().backward()
    assert mu_g.grad is not None and lv_g.grad is not None and float(lv_g.grad.abs().sum()) > 0


def _blobs(n=128, d=16, seed=0):
    """Images of 4 Gaussian blobs at different places plus a little noise: ``(n, 1, d, d)``."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(d) - d / 2, torch.arange(d) - d / 2, indexing="ij")
    centres = torch.tensor([[-3, -3], [3, 3], [-3, 3], [3, -3]], dtype=torch.float32)
    c = centres[torch.arange(n) % 4]
    x = torch.exp(-((yy - c[:, 0, None, None]) ** 2 + (xx - c[:, 1, None, None]) ** 2) / 6)
    x = x + 0.05 * torch.randn(x.shape, generator=g)
    return ((x - x.mean((1, 2), keepdim=True)) / x.std((1, 2), keepdim=True))[:, None]


@pytest.mark.parametrize("beta", [0.0, 5000.0])
def test_beta_large_collapses_to_prior_and_zero_reconstructs(beta, tmp_path):
    x = _blobs()
    cfg = DRVAEConfig(**{**TINY, "beta": beta, "vae_lr": 3e-3})
    torch.manual_seed(0)
    vae = DRVAE(16, 4, [8, 16])
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.vae_lr)
    train_phase(vae, opt, x, cfg, 150, 0, "cpu", tmp_path / "ck.pt", "test")
    vae.eval()
    with torch.no_grad():
        recon, mu, logvar = vae(x)
    mse = float(((recon - x) ** 2).mean())
    kl = float(kl_divergence(mu, logvar).mean())
    if beta == 0:  # an autoencoder: reconstructs the images (variance 1) closely, the latent is informative
        assert mse < 0.15 and kl > 1.0
    else:  # the latent carries (almost) nothing: the output is about the mean image
        assert kl < 0.1
        mean_image_mse = float(((x - x.mean(0)) ** 2).mean())
        assert mse > 0.8 * mean_image_mse


# ---------------------------------------------------------------------------------- the rounds
def test_reliable_samples_are_nearest_their_class_and_targets_are_averages(sim, tmp_path):
    stack = ParticleStack.from_file(sim)
    cfg = DRVAEConfig(**TINY, max_rounds=1, reliable_fraction=0.25, cluster_on="denoised",
                      first_clustering="network")  # round 1 on the warm-up network's images
    train_drvae(stack, cfg, tmp_path / "run", "cpu")
    z = np.load(tmp_path / "run" / "rounds" / "round_01.npz")
    labels, reliable, targets = z["labels"], z["reliable"], z["targets"][:, 0]
    # the round was clustered with the warm-up model
    vae = drvae.new_vae(cfg, 16)
    vae.load_state_dict(load_checkpoint(tmp_path / "run" / "checkpoints" / "round_00.pt")["vae"])
    _, den = encode_all(vae, drvae.prepare(stack, 16).x, 64, "cpu")
    den = den[:, 0].numpy()
    averages = class_averages(den, labels, 4)
    np.testing.assert_allclose(targets, averages[labels], atol=1e-5)
    dist = ((den - averages[labels]) ** 2).sum((1, 2))
    for j in range(4):
        members = labels == j
        assert reliable[members].sum() == int(np.ceil(0.25 * members.sum()))
        assert dist[members & reliable].max() <= dist[members & ~reliable].min() + 1e-4


def test_convergence_stops_the_rounds(sim, tmp_path):
    stack = ParticleStack.from_file(sim)
    stop = train_drvae(stack, DRVAEConfig(**TINY, max_rounds=4, stop_fraction=1.0), tmp_path / "a", "cpu")
    assert stop.curves["converged"] and len(stop.curves["rounds"]) == 2  # the 2nd clustering changed < 100 %
    never = train_drvae(stack, DRVAEConfig(**TINY, max_rounds=3, stop_fraction=0.0), tmp_path / "b", "cpu")
    assert not never.curves["converged"] and len(never.curves["rounds"]) == 3
    assert [len(r["loss"]) > 0 for r in never.curves["rounds"]] == [True, True, False]


def test_resume_equals_uninterrupted(sim, tmp_path, monkeypatch):
    stack = ParticleStack.from_file(sim)
    cfg = DRVAEConfig(**TINY, max_rounds=3, stop_fraction=0.0)
    full = train_drvae(stack, cfg, tmp_path / "full", "cpu")
    real = drvae.cluster_round
    calls = []

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(drvae, "cluster_round", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_drvae(stack, cfg, tmp_path / "resumed", "cpu")
    monkeypatch.setattr(drvae, "cluster_round", real)
    resumed = train_drvae(stack, cfg, tmp_path / "resumed", "cpu")
    np.testing.assert_array_equal(resumed.labels, full.labels)
    for (name, a), b in zip(full.vae.state_dict().items(), resumed.vae.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    with pytest.raises(Exception, match="other settings"):
        train_drvae(stack, DRVAEConfig(**{**TINY, "beta": 0.5}, max_rounds=3), tmp_path / "full", "cpu")


def test_lowpass_first_clustering_and_warm_start(sim, tmp_path):
    stack = ParticleStack.from_file(sim)
    # no training at all: the first clustering is BSK-means++ on the low-passed inputs
    cfg = DRVAEConfig(**{**TINY, "warmup_steps": 0, "round_steps": 0}, max_rounds=2, stop_fraction=0.0,
                      first_clustering="lowpass", lowpass_sigma_px=2.0, warm_start=True, cluster_on="latent")
    train_drvae(stack, cfg, tmp_path / "run", "cpu")
    first = np.load(tmp_path / "run" / "rounds" / "round_01.npz")["labels"]
    prep = drvae.prepare(stack, 16)
    seen = drvae.lowpass_inputs(prep.x, 2.0 * 16 / 32).reshape(len(first), -1).numpy()
    expected, _ = bsk_means(seen, 4, cfg.seed + 1, n_init=cfg.bsk_restarts, size_tolerance=cfg.size_tolerance)
    np.testing.assert_array_equal(first, expected)
    truth = stack.column("cpViewLabel").astype(np.int64)
    assert classification_scores(truth, first)["f1"] > 0.9  # SNR 1: the low-pass sees the views
    # warm start: the second clustering is BSK on the latent started from the first's classes
    torch.manual_seed(cfg.seed)
    mu, _ = encode_all(drvae.new_vae(cfg, 16), prep.x, 64, "cpu")  # untrained, as in the run
    second = np.load(tmp_path / "run" / "rounds" / "round_02.npz")["labels"]
    warm, _ = bsk_means(mu.numpy(), 4, 0, size_tolerance=cfg.size_tolerance, init_labels=first)
    np.testing.assert_array_equal(second, warm)


def test_ssnr_first_clustering_and_later_clusterings_on_both(sim, tmp_path, monkeypatch):
    from cryoprior.nn.drvae_features import joint_features, ssnr_first

    stack = ParticleStack.from_file(sim)
    cfg = DRVAEConfig(**{**TINY, "warmup_steps": 0, "round_steps": 0}, max_rounds=2, stop_fraction=0.0,
                      first_clustering="ssnr", cluster_on="both", warm_start=True, lowpass_sigma_px=2.0)
    calls = []
    monkeypatch.setattr(drvae, "ssnr_first", lambda *a: calls.append(a) or ssnr_first(*a))
    train_drvae(stack, cfg, tmp_path / "run", "cpu")
    assert len(calls) == 1  # the first clustering only
    rounds = tmp_path / "run" / "rounds"
    first, second = (np.load(rounds / f"round_0{r}.npz")["labels"] for r in (1, 2))
    prep = drvae.prepare(stack, 16)
    lowpassed = drvae.lowpass_inputs(prep.x, 2.0 * 16 / 32)
    # the first clustering: k-means of the low-passed inputs refined with SSNR-regularised centres
    np.testing.assert_array_equal(first, ssnr_first(prep.x, lowpassed, 4, cfg.seed + 1, cfg.size_tolerance)[0])
    assert classification_scores(stack.column("cpViewLabel").astype(np.int64), first)["f1"] > 0.9
    # the second: BSK (from the first's classes) on the low-passed inputs next to the denoised images
    torch.manual_seed(cfg.seed)
    _, den = encode_all(drvae.new_vae(cfg, 16), prep.x, 64, "cpu")  # untrained, as in the run
    joint = joint_features(lowpassed, den, cfg.denoised_weight)
    half = joint.shape[1] // 2
    assert (joint[:, :half] ** 2).sum(1).mean() == pytest.approx(1.0, rel=1e-4)
    assert (joint[:, half:] ** 2).sum(1).mean() == pytest.approx(cfg.denoised_weight**2, rel=1e-4)
    summed = joint_features(lowpassed, den, cfg.denoised_weight, summed=True)  # what --align aligns
    np.testing.assert_allclose(summed.reshape(len(joint), -1), joint[:, :half] + joint[:, half:], atol=1e-5)
    warm, _ = bsk_means(joint, 4, 0, size_tolerance=cfg.size_tolerance, init_labels=first)
    np.testing.assert_array_equal(second, warm)


# ------------------------------------------------------------------------------------- CTF
def _ctfs(n, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = 10_000 + 15_000 * torch.rand(n, generator=g, dtype=torch.float64)
    return ctf_2d(d, 2.0, u, u - 300, torch.full((n,), 30.0, dtype=torch.float64)).float()


def test_phase_flip_is_its_own_inverse_on_the_flipped_bands():
    x = torch.randn(5, 32, 32)
    ctf = _ctfs(5)
    twice = phase_flip(phase_flip(x, ctf), ctf)
    nonzero = ctf != 0
    nonzero[:, 0, :] = nonzero[:, :, 0] = False  # the unpaired Nyquist line of an even box
    torch.testing.assert_close(fft2c(twice)[nonzero], fft2c(x)[nonzero], atol=1e-3, rtol=1e-4)
    # and flipping a CTF-modulated image leaves |CTF|: no sign changes left
    once = fft2c(phase_flip(apply_ctf(x, ctf), ctf)) / fft2c(x)
    assert float(once.real.min()) > -1e-3


def test_wiener_average_undoes_the_ctf_better_than_the_mean():
    d = 32
    yy, xx = torch.meshgrid(torch.arange(d) - d / 2, torch.arange(d) - d / 2, indexing="ij")
    clean = torch.exp(-((yy - 3) ** 2 + xx**2) / 8) - 0.6 * torch.exp(-((yy + 4) ** 2 + (xx - 4) ** 2) / 5)
    ctf = _ctfs(40, d, seed=1)
    images = apply_ctf(clean.expand(40, d, d), ctf).numpy()
    labels = np.zeros(40, dtype=np.int64)
    num, den = ctf_class_sums(images, ctf.numpy(), labels, 1)
    wiener = wiener_averages_from_sums(num, den, np.array([40]), wiener_constant=0.01)[0]
    plain = images.mean(0)

    def corr(a):
        return float(np.corrcoef(np.ravel(a), clean.numpy().ravel())[0, 1])

    assert corr(wiener) > 0.9 and corr(wiener) > corr(plain) + 0.2
    flipped = phase_flip(torch.as_tensor(images), ctf).numpy()  # the flipped form gives the same
    num_f, den_f = ctf_class_sums(flipped, ctf.numpy(), labels, 1, flipped=True)
    np.testing.assert_allclose(num_f, num, atol=1e-3)


# -------------------------------------------------------------------------------- the CLI
def test_classify_drvae_bsk_end_to_end(sim, tmp_path, capsys):
    out = tmp_path / "c"
    rc, err = _run(["classify", sim, "--classes", 4, "--method", "drvae-bsk", "--out", out, *TINY_FLAGS], capsys)
    assert rc == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["f1"] > 0.9
    assert min(metrics["class_sizes"]) >= 20 and max(metrics["class_sizes"]) <= 60  # within (1 ± 0.5)·n/K
    rounds = json.loads((out / "rounds.json").read_text())
    assert len(rounds["rounds"]) == 2 and rounds["warmup_loss"]
    den, _ = read_mrc(out / "class_averages_denoised.mrcs")
    raw, _ = read_mrc(out / "class_averages.mrcs")
    assert den.shape == raw.shape == (4, 32, 32)
    assert np.corrcoef(den.ravel(), raw.ravel())[0, 1] > 0.8
    assert (out / "drvae" / "model.pt").is_file() and (out / "drvae" / "denoised.mrcs").is_file()


def test_denoise_train_apply_in_input_units(sim, tmp_path, capsys):
    run = tmp_path / "run"
    rc, err = _run(["denoise", "train", "--method", "drvae", "--target", sim, "--classes", 4, "--out", run,
                    *TINY_FLAGS], capsys)
    assert rc == 0, err
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["psnr_denoised_db"] > metrics["psnr_input_db"] + 3
    stack = ParticleStack.from_file(sim)
    scaled = tmp_path / "scaled.star"
    stack.write(scaled, tmp_path / "scaled.mrcs", images=stack.images() * 250.0 + 40.0)
    for src, out in [(sim, tmp_path / "a"), (scaled, tmp_path / "b")]:
        rc, err = _run(["denoise", "apply", "--model", run, src, "--out", out, "--device", "cpu"], capsys)
        assert rc == 0, err
    a = ParticleStack.from_file(tmp_path / "a" / "particles.star").images()
    b = ParticleStack.from_file(tmp_path / "b" / "particles.star").images()
    np.testing.assert_allclose(b, a * 250.0 + 40.0, rtol=1e-3, atol=1e-2 * 250)
    clean = stack.read_image_column("cpCleanImageName")
    err_in, err_out = ((stack.images() - clean) ** 2).mean(), ((a - clean) ** 2).mean()
    assert err_out < 0.5 * err_in  # the same units as the input and closer to the clean images


@pytest.mark.parametrize("case", ["k_too_large", "nan"])
def test_bad_inputs_one_line_no_output(sim, tmp_path, capsys, case):
    src = sim
    k = 4
    if case == "k_too_large":
        k = 1000
    else:
        stack = ParticleStack.from_file(sim)
        images = stack.images()
        images[7, 3, 3] = np.nan
        src = tmp_path / "nan.star"
        stack.write(src, tmp_path / "nan.mrcs", images=images)
    out = tmp_path / "out"
    rc, err = _run(["classify", src, "--classes", k, "--method", "drvae-bsk", "--out", out, *TINY_FLAGS], capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and ("NaN" in err or "more than" in err)
    assert not out.exists()
    run = tmp_path / "run"
    rc, err = _run(["denoise", "train", "--method", "drvae", "--target", src, "--classes", k, "--out", run,
                    *TINY_FLAGS], capsys)
    assert rc == 2 and len(err.splitlines()) == 1
    assert not run.exists()
    assert not list(tmp_path.glob(".out*"))


def test_relion_class2d_command_and_skip(monkeypatch):
    from cryoprior.bench import relion_class2d

    cmd = relion_class2d.class2d_command("p.star", "out/run", 4, 25, 120.0, True, 3)
    joined = " ".join(cmd)
    assert cmd[0] == "relion_refine" and "--K 4" in joined and "--iter 25" in joined and "--ctf" in cmd
    assert "--offset_range 3" in joined and "--psi_step 10" in joined
    assert "--ctf" not in relion_class2d.class2d_command("p.star", "out/run", 4, 25, 120.0, False, 3)
    assert relion_class2d.class2d_command("p.star", "o/r", 2, 5, 90.0, False, 3, mpi=3)[:6] == [
        "mpirun", "--allow-run-as-root", "--oversubscribe", "-n", "3", "relion_refine_mpi"]
    monkeypatch.setattr(relion_class2d.shutil, "which", lambda name: None)
    assert "not on the PATH" in relion_class2d.available()
    with pytest.raises(Exception, match="not on the PATH"):
        relion_class2d.run_class2d(None, 2, "unused")


def test_bench_reuses_relion_rows_only_for_the_same_stacks(tmp_path):
    from cryoprior.bench import drvae as bench
    from cryoprior.errors import InputError

    row = {"f1": 0.5, "accuracy": 0.5, "nmi": 0.1, "size_ratio": 0.4, "seconds": 80.0}
    old = {"n": 400, "box": 64, "seed": 0, "relion_iterations": 10, "stack_seeding": bench.STACK_SEEDING,
           "grid": {"views-snr0.05": {"1h4a": {"rows": {"relion-class2d": row}}},
                    "views-snr0.01": {"1h4a": {"rows": {"relion-class2d": {"skipped": "no relion"}}}}}}
    path = tmp_path / "bench_drvae.json"
    path.write_text(json.dumps(old))
    rows = bench._earlier_relion_rows(path, 400, 64, 0, 10)
    assert rows == {("views-snr0.05", "1h4a"): {**row, "reused_from": str(path)}}  # a skipped row is not reused
    assert bench._earlier_relion_rows(None, 400, 64, 0, 10) == {}
    # other stacks (n, seed) or another RELION run: refused
    for args in [(200, 64, 0, 10), (400, 64, 1, 10), (400, 64, 0, 25)]:
        with pytest.raises(InputError, match="other"):
            bench._earlier_relion_rows(path, *args)
    # a run from before the stacks were seeded by setting and structure (seeded by their order): refused
    path.write_text(json.dumps({k: v for k, v in old.items() if k != "stack_seeding"}))
    with pytest.raises(InputError, match="stack_seeding"):
        bench._earlier_relion_rows(path, 400, 64, 0, 10)


def test_bench_resumes_finished_jobs_and_seeds_stacks_by_setting(tmp_path, monkeypatch):
    """A rerun with the same arguments takes the finished jobs from ``out_dir/jobs`` (nothing is
    simulated or scored again), and a setting's stack is the same whichever other settings and
    structures run with it, so a partial grid scores the particles of the full one."""
    from cryoprior.bench import drvae as bench

    simulated = []

    def fake_simulate(setting, structure, n, box, seed, out):
        simulated.append((setting, structure, seed))
        return [None] * n, np.zeros(n, dtype=np.int64), 4

    def fake_evaluate(stack, truth, k, kind, work, seed, drvae, relion_iterations, relion_row=None):
        return {"oracle": {"f1": 1.0, "accuracy": 1.0, "nmi": 1.0, "size_ratio": 1.0, "seconds": 0.0}}

    monkeypatch.setattr(bench, "_simulate", fake_simulate)
    monkeypatch.setattr(bench, "evaluate", fake_evaluate)
    settings = ["views-snr0.05", "inplane-snr0.01", "conformations-snr0.05"]
    full = bench.run(n=10, settings=settings, out_dir=tmp_path / "a")
    assert len(simulated) == 2 * 3 + 1  # conformations: one job (1ake+4ake), not one per structure
    assert len({seed for *_, seed in simulated}) == len(simulated)
    again = bench.run(n=10, settings=settings, out_dir=tmp_path / "a")
    assert len(simulated) == 7 and again["grid"] == full["grid"]  # resumed: nothing ran again
    part = bench.run(n=10, settings=["inplane-snr0.01"], structures=["1pwc"], out_dir=tmp_path / "b")
    assert simulated[-1] == ("inplane-snr0.01", "1pwc", full["grid"]["inplane-snr0.01"]["1pwc"]["stack_seed"])
    assert part["grid"]["inplane-snr0.01"]["1pwc"] == full["grid"]["inplane-snr0.01"]["1pwc"]
    with pytest.raises(Exception, match="unknown setting or test structure 3q4o"):
        bench.run(n=10, settings=["views-snr0.05"], structures=["3q4o"])


def test_align_path_ends_with_ml2d_within_the_size_bounds(tmp_path):
    """With --align the last clustering's classes are refined by ML2D (``ml2d_refine`` of the last
    round's assignment, on the network inputs), the sizes stay within BSK's bounds, and 0
    iterations leave the last round's labels."""
    from cryoprior.classical.cluster.bsk import size_bounds
    from cryoprior.nn.drvae_features import ml2d_refine

    out = tmp_path / "sim"
    simulate_dataset(SimulationConfig(structures=["1ake"], box=32, pixel_size_a=2.0, n=160, views=4, inplane=True,
                                      snr=0.3, seed=4), out)
    stack = ParticleStack.from_file(out / "particles.star")
    truth = stack.column("cpViewLabel").astype(np.int64)
    cfg = DRVAEConfig(**{**TINY, "warmup_steps": 0, "round_steps": 0}, max_rounds=1, align=True, ml2d_iterations=5)
    result = train_drvae(stack, cfg, tmp_path / "run", "cpu")
    last = drvae._load_assignment(tmp_path / "run" / "rounds" / "round_01.npz")
    expected = ml2d_refine(drvae.prepare(stack, 16).x[:, 0], last, 4, 0, 5, cfg.size_tolerance,
                           temperature=cfg.ml2d_temperature, anneal_iterations=cfg.ml2d_anneal, start_shell=cfg.ml2d_start_shell)
    np.testing.assert_array_equal(result.labels, expected.labels)
    np.testing.assert_allclose(result.angles, expected.angles)
    curves = json.loads((tmp_path / "run" / "curves.json").read_text())
    assert curves["ml2d"]["changed_fraction"] == pytest.approx(float((expected.labels != last.labels).mean()), abs=1e-5)
    low, high = size_bounds(len(truth), 4, cfg.size_tolerance)
    assert low <= np.bincount(result.labels, minlength=4).min() and np.bincount(result.labels).max() <= high
    assert classification_scores(truth, result.labels)["f1"] >= classification_scores(truth, last.labels)["f1"] - 0.02
    off = train_drvae(stack, DRVAEConfig(**{**TINY, "warmup_steps": 0, "round_steps": 0}, max_rounds=1, align=True,
                                         ml2d_iterations=0), tmp_path / "off", "cpu")
    np.testing.assert_array_equal(off.labels, last.labels)
