"""CDAE models, training helpers and operations: shapes, invariants, a denoiser that denoises."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryoprior.errors import InputError, TrainingDivergedError
from cryoprior.io.stack import ParticleStack
from cryoprior.nn.cdae import (
    CDAEConfig,
    finetune_cascade,
    new_cascade,
    pretrain_cascade,
    single_dae,
)
from cryoprior.nn.cdae_ops import (
    histogram_equalize,
    knn_mean_targets,
    load_levels,
    normalize,
    psnr_normalised,
)
from cryoprior.nn.denoiser import (
    denoise_images,
    denoise_tensor,
    load_model,
    read_model_file,
    save_model,
)
from cryoprior.nn.models.cdae import CDAECascade, ConvAEBlock
from cryoprior.nn.models.dncnn import DnCNN
from cryoprior.nn.training import (
    dihedral,
    fit_pairs,
    load_checkpoint,
    resolve_device,
    rotate_images,
    save_loss_curves,
)
from cryoprior.sim.dataset import SimulationConfig, simulate_dataset

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def _templates(d: int = 32) -> torch.Tensor:
    """Four distinct smooth clean images ``(4, d, d)``: Gaussian blobs at different places."""
    yy, xx = torch.meshgrid(torch.arange(d, dtype=torch.float32), torch.arange(d, dtype=torch.float32), indexing="ij")
    centres = [(0.3, 0.3), (0.7, 0.3), (0.5, 0.75), (0.3, 0.7)]
    out = []
    for i, (cy, cx) in enumerate(centres):
        img = torch.exp(-((yy - cy * d) ** 2 + (xx - cx * d) ** 2) / (2 * (2 + i) ** 2))
        img = img + 0.6 * torch.exp(-((yy - d / 2) ** 2 + (xx - (1 - cx) * d) ** 2) / 18)
        out.append(img)
    return torch.stack(out)


def _noisy_set(n: int, snr: float, seed: int, d: int = 32) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """``n`` noisy copies of the templates: (noisy, clean, labels)."""
    gen = torch.Generator().manual_seed(seed)
    t = _templates(d)
    labels = torch.randint(len(t), (n,), generator=gen)
    clean = t[labels]  # (n, d, d)
    sigma = torch.sqrt(clean.var(dim=(-2, -1), keepdim=True) / snr)
    return clean + sigma * torch.randn(clean.shape, generator=gen), clean, labels.numpy()


# ------------------------------------------------------------------------------------- models
@pytest.mark.parametrize("size", [24, 31, 32, 33, 40, 63])
def test_block_output_shape_equals_input_for_odd_and_even_sizes(size, device):
    block = ConvAEBlock(widths=(4, 8, 8)).to(device).eval()
    x = torch.randn(2, 1, size, size, device=device)
    assert block(x).shape == x.shape
    cascade = CDAECascade(2, widths=(4, 8)).to(device).eval()
    assert cascade(x).shape == x.shape


def test_block_rejects_images_smaller_than_the_pooling_factor():
    with pytest.raises(ValueError, match=r"smaller than the pooling factor 8"):
        ConvAEBlock(widths=(4, 8, 8)).eval()(torch.zeros(1, 1, 7, 7))
    with pytest.raises(ValueError, match=r"\(b, 1, h, w\)"):
        ConvAEBlock()(torch.zeros(1, 2, 16, 16))


def test_block_is_built_from_parameters():
    block = ConvAEBlock(widths=(32, 64, 128))
    convs = [m for m in block.encoder if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 6 and [c.out_channels for c in convs] == [32, 32, 64, 64, 128, 128]
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in block.encoder) == 3
    ups = [m for m in block.decoder if isinstance(m, torch.nn.ConvTranspose2d)]
    assert len(ups) == 3 and block.head.in_channels == 32 and block.head.out_channels == 1
    drops = [m for m in block.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(drops) == 2 and all(d.p == 0.5 for d in drops)
    assert len(CDAECascade(3).blocks) == 3


def test_batched_inference_equals_looped(device):
    torch.manual_seed(0)
    model = CDAECascade(3, widths=(4, 8, 8))
    images = torch.randn(10, 33, 33) * 3 + 1
    batched = denoise_images(model, images, batch_size=4, device=device, precision="fp32")
    looped = np.concatenate([denoise_images(model, im[None], 1, device, precision="fp32") for im in images])
    np.testing.assert_allclose(batched, looped, atol=1e-4)  # the scale's finite difference: float32
    assert batched.shape == (10, 33, 33) and batched.dtype == np.float32
    bf16 = denoise_images(model, images, batch_size=4, device=device, precision="bf16")
    assert np.abs(bf16 - batched).max() < 0.05 * np.abs(batched).max() + 1e-3


def test_dncnn_shape_and_residual():
    model = DnCNN(depth=4, width=8).eval()
    x = torch.randn(3, 1, 21, 21)
    assert model(x).shape == x.shape
    torch.nn.init.zeros_(model.net[-1].weight)
    torch.nn.init.zeros_(model.net[-1].bias)
    torch.testing.assert_close(model(x), x)


# --------------------------------------------------------------------------------- operations
def test_histogram_equalisation_gives_a_uniform_cdf():
    rng = np.random.default_rng(0)
    images = rng.gamma(2.0, size=(3, 16, 17)).astype(np.float32)
    out = histogram_equalize(images)
    n = 16 * 17
    assert out.shape == images.shape and out.dtype == np.float32
    for img, eq in zip(images, out):
        np.testing.assert_allclose(np.sort(eq.ravel()), (np.arange(n) + 0.5) / n, atol=1e-6)
        assert np.array_equal(np.argsort(img.ravel()), np.argsort(eq.ravel()))  # order kept
    np.testing.assert_allclose(histogram_equalize(torch.ones(8, 8)), 0.5)


def test_knn_mean_target_is_closer_to_the_clean_image_than_the_input():
    noisy, clean, labels = _noisy_set(80, snr=0.3, seed=1)
    x = normalize(noisy)[:, 0]  # (n, d, d)
    targets = knn_mean_targets(x, k=15, pca_dims=16)
    assert targets.shape == x.shape
    ref = normalize(clean)[:, 0]
    err_in = ((x - ref) ** 2).mean(dim=(-2, -1))
    err_target = ((normalize(targets)[:, 0] - ref) ** 2).mean(dim=(-2, -1))
    assert bool((err_target < err_in).all())
    assert float(err_target.mean()) < 0.2 * float(err_in.mean())
    corr = knn_mean_targets(x, k=15, metric="correlation", pca_dims=0)
    assert float(((normalize(corr)[:, 0] - ref) ** 2).mean()) < 0.2 * float(err_in.mean())
    with pytest.raises(ValueError, match="metric"):
        knn_mean_targets(x, k=5, metric="cosine")


def test_psnr_normalised_ignores_scale_and_offset():
    noisy, clean, _ = _noisy_set(4, snr=1.0, seed=2)
    a = psnr_normalised(noisy, clean)
    np.testing.assert_allclose(psnr_normalised(3 * noisy - 7, clean), a, rtol=1e-4)
    assert (psnr_normalised(clean, 2 * clean + 1) > 100).all()


# --------------------------------------------------------------------------------- training
def test_trained_autoencoder_raises_psnr_on_held_out_images(device):
    noisy, clean, _ = _noisy_set(384, snr=0.2, seed=3)
    test_noisy, test_clean, _ = _noisy_set(64, snr=0.2, seed=4)
    torch.manual_seed(0)
    block = ConvAEBlock(widths=(8, 16, 16), dropout=0.1)
    losses = fit_pairs(block, normalize(noisy), normalize(clean), epochs=6, batch_size=32, lr=2e-3,
                       optimizer="adam", seed=0, device=device)
    assert len(losses) == 6 and losses[-1] < losses[0]
    before = psnr_normalised(test_noisy, test_clean).mean()
    after = psnr_normalised(denoise_images(block, test_noisy, 32, device, precision="fp32"), test_clean).mean()
    assert after > before + 3.0, (before, after)


def test_nan_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    x = normalize(torch.randn(20, 16, 16))
    ckpt = tmp_path / "ck.pt"
    torch.manual_seed(0)
    model = ConvAEBlock(widths=(4, 4))
    fit_pairs(model, x, x, epochs=1, batch_size=8, lr=1e-3, checkpoint=ckpt)
    good = {k: v.clone() for k, v in model.state_dict().items()}
    bad = x.clone()
    bad[3, 0, 2, 2] = float("nan")
    with pytest.raises(TrainingDivergedError, match=r"NaN.*epoch 2.*last good checkpoint.*epoch 1"):
        fit_pairs(model, x, bad, epochs=2, batch_size=8, lr=1e-3, checkpoint=ckpt)
    state = load_checkpoint(ckpt)
    assert state["epoch"] == 1 and len(state["losses"]) == 1
    fresh = ConvAEBlock(widths=(4, 4))
    fresh.load_state_dict(state["model"])
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, good[k])


@pytest.mark.parametrize("augment", ["none", "rotate"])
def test_resumed_training_equals_uninterrupted(tmp_path, augment):
    x, y = normalize(torch.randn(24, 16, 16)), normalize(torch.randn(24, 16, 16))

    def run(split: bool):
        torch.manual_seed(0)
        model = ConvAEBlock(widths=(4, 4))
        ckpt = tmp_path / f"ck_{split}.pt"
        if split:
            fit_pairs(model, x, y, epochs=1, batch_size=8, lr=1e-3, checkpoint=ckpt, augment=augment)
            torch.manual_seed(123)
            model = ConvAEBlock(widths=(4, 4))  # a new process: other weights until resumed
        losses = fit_pairs(model, x, y, epochs=2, batch_size=8, lr=1e-3, checkpoint=ckpt, augment=augment)
        return model, losses

    (a, la), (b, lb) = run(False), run(True)
    assert la == pytest.approx(lb)
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(v, w, msg=k)


def test_finetuning_and_single_dae_run_and_keep_the_pretrained_cascade():
    noisy, clean, _ = _noisy_set(96, snr=0.1, seed=5)
    config = CDAEConfig(widths=[4, 8], finetune_epochs=1, single_dae_epochs=1, knn_k=10, knn_pca_dims=8, batch_size=32)
    cascade = new_cascade(config)
    before = {k: v.clone() for k, v in cascade.state_dict().items()}
    tuned, curves = finetune_cascade(cascade, noisy, config, "cpu")
    assert set(curves) == {f"finetune block {j}" for j in (1, 2, 3)}
    for k, v in cascade.state_dict().items():  # the caller's cascade is left as it was
        torch.testing.assert_close(v, before[k])
    assert any(not torch.equal(v, before[k]) for k, v in tuned.state_dict().items())
    block, losses = single_dae(noisy, config, "cpu")
    assert isinstance(block, ConvAEBlock) and len(losses) == 1


def test_model_file_round_trip_and_bad_files(tmp_path):
    torch.manual_seed(0)
    model = CDAECascade(2, widths=[4, 8])
    save_model(tmp_path / "model.pt", "cdae", {"kind": "cdae", "n_blocks": 2, "widths": [4, 8]}, model, {"equalize": False})
    loaded = load_model(tmp_path, "cpu")
    x = torch.randn(3, 16, 16)
    np.testing.assert_array_equal(denoise_images(model, x, 8, "cpu", precision="fp32"),
                                  denoise_images(loaded, x, 8, "cpu", precision="fp32"))
    assert loaded.cryoprior_method == "cdae"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.pt").write_bytes(b"not a model")
    with pytest.raises(InputError, match="model.pt: not a readable model file"):
        read_model_file(tmp_path / "bad")
    with pytest.raises(InputError, match="no trained model"):
        load_model(tmp_path / "nothing")


def test_resolve_device_and_loss_curves(tmp_path):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(InputError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA device"):
            resolve_device("cuda")
    json_path, png_path = save_loss_curves({"a": [1.0, 0.5], "b": []}, tmp_path)
    assert json_path.read_text().startswith("{") and png_path.read_bytes()[:4] == b"\x89PNG"


def test_briefly_trained_cdae_outputs_are_not_collapsed_to_one_image(tmp_path):
    """4 similar views of 1AKE at SNR 0.1: the outputs must keep the particles apart. The old
    defaults (dropout 0.5, cascade pre-training inputs) returned the mean image for every
    particle here (spread ~2e-4 of the clean images'); the current ones keep ~0.65."""
    snrs = [0.1, 0.4, 0.6, math.inf]
    sim = simulate_dataset(
        SimulationConfig(structures=["1ake"], box=48, pixel_size_a=2.5, n=300, views=4, snr=0.1,
                         snr_levels=snrs, seed=3),
        tmp_path / "sim",
    )
    levels = load_levels(sim, snrs)  # [(n, 1, 48, 48), ...]
    config = CDAEConfig(pretrain_epochs=4, finetune_epochs=1)
    cascade, _ = pretrain_cascade(levels, config, "cpu")
    cascade, _ = finetune_cascade(cascade, levels[0][:, 0], config, "cpu")
    out = normalize(denoise_tensor(cascade, levels[0])[:, 0])  # (n, 1, 48, 48)
    clean = levels[-1]
    spread = float(out.std(dim=0).mean() / clean.std(dim=0).mean())
    assert spread > 0.3, f"outputs collapsed: spread {spread:.3g} of the clean images'"


# ------------------------------------------------------------------------------- augmentation
def test_dihedral_gives_the_eight_symmetries_of_the_square():
    img = _templates(16)[0]  # no symmetry of its own
    outs = [dihedral(img, w) for w in range(8)]
    assert torch.equal(outs[0], img)
    assert len({tuple(o.flatten().tolist()) for o in outs}) == 8  # all distinct
    for w in range(8):  # each is a pixel permutation: values and a centred blob's centre kept
        assert torch.equal(outs[w].flatten().sort().values, img.flatten().sort().values)
    assert torch.equal(dihedral(dihedral(img, 4), 4), img)  # a mirror undoes itself
    r = img
    for _ in range(4):
        r = dihedral(r, 1)
    assert torch.equal(r, img)  # four quarter turns


def test_rotate_images_turns_an_elongated_blob_about_the_centre():
    d = 33
    yy, xx = torch.meshgrid(torch.arange(d) - d // 2, torch.arange(d) - d // 2, indexing="ij")
    horiz = torch.exp(-(xx**2 / 50 + yy**2 / 4)).float()[None, None]  # (1, 1, d, d), long along x
    vert = torch.exp(-(yy**2 / 50 + xx**2 / 4)).float()[None, None]
    torch.testing.assert_close(rotate_images(horiz, torch.zeros(1)), horiz)
    torch.testing.assert_close(rotate_images(horiz, torch.tensor([math.pi / 2])), vert, atol=1e-5, rtol=0)
    half = rotate_images(horiz, torch.tensor([math.pi / 4]))[0, 0]
    diag = torch.stack([half[d // 2 + k, d // 2 + k] for k in (-5, 5)])
    anti = torch.stack([half[d // 2 + k, d // 2 - k] for k in (-5, 5)])
    assert float((diag - anti).abs().max()) > 0.3  # 45°: along one diagonal, not the other
    torch.testing.assert_close(diag[0], diag[1])  # and still centred


def test_pretraining_pairs_with_a_ctf_are_phase_flipped_as_the_target_is(tmp_path):
    """Pairs simulated with a CTF are phase-flipped when loaded, as a target with CTF columns is
    before the networks see it: the flipped clean level has the phases of the CTF-free projection
    of the same pose (same seed), which the unflipped one has not."""
    common = dict(structures=["1ake"], box=32, pixel_size_a=3.0, n=60, views=None, snr=1.0,
                  snr_levels=[math.inf], seed=2)
    with_ctf = simulate_dataset(SimulationConfig(**common, ctf=True, defocus_min_a=15000.0, defocus_max_a=25000.0),
                                tmp_path / "ctf")
    plain = simulate_dataset(SimulationConfig(**common), tmp_path / "plain")
    flipped = load_levels(with_ctf, [math.inf])[0][:, 0]  # (n, 32, 32), normalised
    reference = load_levels(plain, [math.inf])[0][:, 0]
    raw = normalize(ParticleStack.from_file(with_ctf / "particles.star").read_image_column("cpCleanImageName"))[:, 0]

    f = torch.fft.fftfreq(32, d=3.0)
    high = (f[:, None] ** 2 + f[None, :] ** 2).sqrt() > 1 / 20.0  # beyond the CTFs' first zeros, 1/Å

    def agreement(a, b):  # mean cosine of the phase difference, over the high band
        cross = torch.fft.fft2(a) * torch.fft.fft2(b).conj()
        return float((cross.real / cross.abs().clamp_min(1e-12))[:, high].mean())

    assert agreement(flipped, reference) > 0.8
    assert agreement(raw, reference) < 0.4
