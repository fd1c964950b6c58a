"""The learned 3D prior: U-Net, cube rotations, training pairs, training, the shipped model."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from cryoprior.cli.main import main
from cryoprior.core.fsc import fsc, radial_average, resolution_at
from cryoprior.errors import InputError, TrainingDivergedError
from cryoprior.nn.models.unet3d import UNet3D, UNet3DConfig
from cryoprior.nn.prior3d import (
    HELD_OUT_STRUCTURES,
    Prior3DConfig,
    load_denoiser,
    make_batch,
    save_model,
    train,
    training_structures,
)
from cryoprior.nn.prior3d_data import (
    NoiseSettings,
    band_limit_shell,
    cube_rotation_matrices,
    cube_rotations,
    make_pair,
    reconstruction_input,
    sphere_std,
)
from cryoprior.sim.structures import list_builtin_structures, load_volume, recommended_pixel_size_a


# ------------------------------------------------------------------------------------ U-Net
@pytest.mark.parametrize("size", [32, 48])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unet_keeps_shape_and_dtype_and_starts_as_identity(size, dtype):
    net = UNet3D(UNet3DConfig(levels=5, base_channels=2, channel_growth=2.0)).to(dtype)
    x = torch.randn(2, 1, size, size, size, dtype=dtype)
    y = net(x)
    assert y.shape == x.shape and y.dtype == dtype
    assert torch.equal(y, x)  # zero-initialised head: output = input + 0


def test_unet_is_built_from_parameters_and_learns_a_residual():
    cfg = UNet3DConfig(levels=3, base_channels=3, channel_growth=2.0, convs_per_level=1)
    net = UNet3D(cfg)
    assert len(net.encoders) == 3 and len(net.decoders) == 2 and net.size_multiple == 4
    assert [blk[0].out_channels for blk in net.encoders] == [3, 6, 12]
    torch.nn.init.normal_(net.head.weight, std=0.1)
    x = torch.randn(1, 1, 8, 8, 8)
    assert not torch.equal(net(x), x)
    with pytest.raises(ValueError, match=r"multiple of 4.*\(10, 10, 10\)"):
        net(torch.randn(1, 1, 10, 10, 10))


# --------------------------------------------------------------------------- cube rotations
@pytest.mark.parametrize("d", [5, 6])
def test_cube_rotations_are_the_24_proper_rotations_about_the_centre(d):
    mats = cube_rotation_matrices()
    assert mats.shape == (24, 3, 3)
    assert torch.allclose(torch.linalg.det(mats), torch.ones(24, dtype=mats.dtype))  # no reflections
    assert torch.allclose(mats @ mats.transpose(1, 2), torch.eye(3, dtype=mats.dtype).expand(24, 3, 3))
    assert len({tuple(m.flatten().tolist()) for m in mats}) == 24
    assert torch.equal(mats[0], torch.eye(3, dtype=mats.dtype))

    vol = torch.randn(d, d, d, generator=torch.Generator().manual_seed(0))
    rots = cube_rotations(vol)
    assert rots.shape == (24, d, d, d)
    assert len({tuple(r.flatten().tolist()) for r in rots}) == 24  # 24 distinct volumes
    c = d // 2
    grid = torch.stack(torch.meshgrid(*[torch.arange(d)] * 3, indexing="ij"), -1).reshape(-1, 3)
    for k in range(24):
        moved = (grid - c) @ mats[k].long().T + c  # R p for every voxel offset p
        expected = torch.zeros_like(vol)
        expected[tuple((moved % d).T)] = vol[tuple(grid.T)]  # out[c + R p] = vol[c + p]
        assert torch.equal(rots[k], expected), k
    centre = torch.zeros(d, d, d)
    centre[c, c, c] = 1
    assert all(torch.equal(r, centre) for r in cube_rotations(centre))  # the centre stays put


# -------------------------------------------------------------------------------- pairs
FAST = NoiseSettings(n_particles=(300, 300), snr=(0.02, 0.02), pose_error_deg=1.0)
HALF = dataclasses.replace(FAST, target="half-map")


def test_reconstruction_pair_input_is_worse_than_target():
    pair = make_pair("1ake", 32, "reconstruction", 0, FAST, seed=0)
    truth, inp, target = pair["truth"], pair["input"], pair["target"]
    assert inp.shape == target.shape == truth.shape == (32, 32, 32)
    assert torch.isclose(sphere_std(inp), torch.tensor(1.0), atol=1e-4)
    f_in, f_target = fsc(inp, truth, ndim=3), fsc(target, truth, ndim=3)
    assert f_in[1:].mean() < f_target[1:].mean() - 0.2
    # shells 1 .. d/2 - 1: at the Nyquist shell both are noise about 0 (-0.017 vs -0.020 here)
    assert (f_in[1:-1] <= f_target[1:-1] + 1e-4).all()
    assert pair["meta"]["n_particles"] == 300 and pair["meta"]["structure"] == "1ake"


def _shell_amplitude(vol: torch.Tensor) -> torch.Tensor:
    return radial_average(torch.fft.fftshift(torch.fft.fftn(vol.double())).abs() ** 2, ndim=3).sqrt()


def test_half_map_target_is_the_truth_times_the_half_map_fsc():
    """The paper's target: per shell, the truth's amplitude × clamp(FSC(half 1, half 2), 0, 1); far less
    amplitude near the resolution limit than sqrt(2f / (1 + f)) of the same data's FSC to the truth."""
    pair = make_pair("1ake", 32, "reconstruction", 0, HALF, seed=0)
    half = torch.tensor(pair["meta"]["fsc_half"], dtype=torch.float64)
    ratio = _shell_amplitude(pair["target"]) / _shell_amplitude(pair["truth"])  # (17,)
    assert torch.allclose(ratio[:16], half.clamp(0, 1)[:16], atol=2e-3)
    old = make_pair("1ake", 32, "reconstruction", 0, FAST, seed=0)
    old_ratio = _shell_amplitude(old["target"]) / _shell_amplitude(old["truth"])
    mid = slice(3, 10)  # where the data hold signal but not all of it
    assert (ratio[mid] < old_ratio[mid] - 0.1).all()
    # the input is one half map (150 particles): it agrees with the truth less than the full map
    assert fsc(pair["input"], pair["truth"], ndim=3)[1:10].mean() < fsc(old["input"], old["truth"], ndim=3)[1:10].mean()


def test_band_limit_shell_follows_relion_current_size():
    curve = torch.tensor([1.0, 0.95, 0.6, 0.3, 0.1, 0.2, 0.05, 0.0, 0.0])
    assert band_limit_shell(curve, 4) == 7  # first below 0.143 at shell 4: resolution shell 3, + 4
    assert band_limit_shell(curve, 10) == 8  # at most d // 2
    assert band_limit_shell(torch.ones(9), 4) == 8


@pytest.mark.parametrize("base", [HALF, FAST], ids=["half-map", "fsc-truth"])
def test_band_limited_pair_has_nothing_beyond_the_current_size(base):
    settings = dataclasses.replace(base, band_limit=1.0, band_limit_extra_shells=(4, 4))
    pair = make_pair("1ake", 32, "reconstruction", 0, settings, seed=0)
    r_max = pair["meta"]["band_limit_shell"]
    assert r_max < 16
    if base is HALF:
        assert r_max == band_limit_shell(torch.tensor(pair["meta"]["fsc_half"]), 4)
    for key in ("input", "target"):
        amp = _shell_amplitude(pair[key])
        assert amp[r_max + 1 :].max() < 1e-6 * amp[1 : r_max + 1].max(), key  # float32 round-off
    free = make_pair("1ake", 32, "reconstruction", 0, base, seed=0)  # same draw, not cut
    assert "band_limit_shell" not in free["meta"] and _shell_amplitude(free["input"])[r_max + 2 :].min() > 0.01


def test_gaussian_pair_is_deterministic_and_noisier_than_its_target():
    a = make_pair("2a2l", 24, "gaussian", 3, FAST, seed=1)
    b = make_pair("2a2l", 24, "gaussian", 3, FAST, seed=1)
    assert torch.equal(a["input"], b["input"]) and torch.equal(a["target"], b["target"])
    f_in = fsc(a["input"], a["truth"], ndim=3)
    f_target = fsc(a["target"], a["truth"], ndim=3)
    assert f_in[1:].mean() < f_target[1:].mean()
    pseudo = make_pair("pseudo:2", 24, "gaussian", 0, FAST)
    assert pseudo["input"].shape == (24, 24, 24) and pseudo["meta"]["pixel_size_a"] == 4.0
    with pytest.raises(InputError, match="noise_model"):
        make_pair("2a2l", 24, "poisson", 0, FAST)


# ----------------------------------------------------------------------------- training
def _toy_pairs(n: int = 4, d: int = 16) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    r = torch.linspace(-1, 1, d)
    zz, yy, xx = torch.meshgrid(r, r, r, indexing="ij")
    pairs = []
    for _ in range(n):
        centre = torch.rand(3, generator=g) * 0.6 - 0.3
        blob = torch.exp(-((zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2) / 0.1)
        pairs.append({"input": blob + 0.5 * torch.randn(d, d, d, generator=g), "target": blob})
    return pairs


def _toy_config(**kw) -> Prior3DConfig:
    base = dict(box=[16], levels=2, base_channels=4, epochs=3, batch_size=2, lr=3e-3, device="cpu")
    return Prior3DConfig(**{**base, **kw})


def test_a_few_epochs_lower_the_loss_and_training_resumes(tmp_path):
    pairs = _toy_pairs()
    net, losses = train(pairs, _toy_config(), tmp_path)
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert (tmp_path / "checkpoint.pt").exists()
    _, resumed = train(pairs, _toy_config(epochs=4), tmp_path)
    assert resumed[:3] == losses and len(resumed) == 4


def test_batches_rotate_and_crop_input_and_target_together():
    g = torch.Generator().manual_seed(0)
    pairs = []
    for _ in range(3):
        x = torch.randn(24, 24, 24, generator=g)
        pairs.append({"input": x, "target": 2 * x})
    x, y = make_batch(pairs, [0, 2, 1], 16, torch.Generator().manual_seed(1))
    assert x.shape == y.shape == (3, 1, 16, 16, 16)
    assert torch.equal(y, 2 * x)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    pairs = _toy_pairs()
    train(pairs, _toy_config(epochs=1), tmp_path)
    bad = [{"input": p["input"] * float("nan"), "target": p["target"]} for p in pairs]
    with pytest.raises(TrainingDivergedError, match="epoch 2"):
        train(bad, _toy_config(epochs=2), tmp_path)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert len(ckpt["losses"]) == 1


def test_saved_model_round_trips_through_load_denoiser(tmp_path):
    net = UNet3D(UNet3DConfig(levels=2, base_channels=2))
    torch.nn.init.normal_(net.head.weight, std=0.1)
    save_model(net, tmp_path, {"note": "toy"})
    assert json.loads((tmp_path / "model.json").read_text())["note"] == "toy"
    vol = torch.randn(10, 10, 10)
    expected = net(vol[None, None] / sphere_std(vol))[0, 0] * sphere_std(vol)
    for path in (tmp_path, tmp_path / "model.pt"):
        assert torch.allclose(load_denoiser(path)(vol), expected.detach(), atol=1e-5)


def test_train_prior3d_command_writes_a_loadable_run_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"

    def argv(epochs: int) -> list[str]:
        return ["-q", "train-prior3d", "--out", str(out), "--structures", "3fhk",
                "--validation-structures", "3mht", "--box", "16", "--pseudo-proteins", "0", "--pairs-per-structure", "2",
                "--validation-pairs", "1", "--noise-model", "gaussian", "--levels", "2",
                "--base-channels", "2", "--epochs", str(epochs), "--batch-size", "2",
                "--device", "cpu"]

    assert main(argv(1)) == 0
    assert "held-out FSC 0.5 resolution" in capsys.readouterr().out
    for name in ("config.yaml", "model.pt", "model.json", "loss.json", "loss.png",
                 "validation.json", "checkpoint.pt"):
        assert (out / name).is_file(), name
    validation = json.loads((out / "validation.json").read_text())
    assert validation["n"] == 1 and validation["maps"][0]["structure"] == "3mht"
    assert set(validation["mean"]["output"]) == {"resolution_0.5_a", "resolution_0.143_a", "mean_fsc"}
    pairs = sorted((out / "pairs" / "gaussian").glob("*.pt"))
    assert len(pairs) == 3
    stamps = [p.stat().st_mtime_ns for p in pairs]
    assert main(argv(2)) == 0  # resumes from the checkpoint: one more epoch
    assert [p.stat().st_mtime_ns for p in pairs] == stamps  # cached pairs reused
    assert len(json.loads((out / "loss.json").read_text())["epoch_mean"]) == 2
    assert load_denoiser(out)(torch.randn(16, 16, 16)).shape == (16, 16, 16)


# ----------------------------------------------------------------------- the shipped model
def test_training_structures_leave_benchmarks_out():
    train_ids = training_structures()
    assert len(HELD_OUT_STRUCTURES) >= 4
    assert not set(train_ids) & set(HELD_OUT_STRUCTURES)
    assert set(train_ids) | set(HELD_OUT_STRUCTURES) == set(list_builtin_structures())


def test_shipped_model_improves_a_held_out_noisy_reconstruction():
    box = 32
    pixel_size_a = recommended_pixel_size_a("4ake", box)
    truth = load_volume("4ake", box, pixel_size_a)
    g = torch.Generator().manual_seed(7)
    noisy = reconstruction_input(truth, pixel_size_a, 600, 0.02, 1.0, NoiseSettings(), g)
    denoised = load_denoiser(None)(noisy)
    f_in, f_out = fsc(noisy, truth, ndim=3), fsc(denoised, truth, ndim=3)
    assert f_out[1:].mean() > f_in[1:].mean() + 0.05
    assert resolution_at(f_out, box, pixel_size_a, 0.5) < resolution_at(f_in, box, pixel_size_a, 0.5)


@pytest.mark.parametrize("size", [32, 27])
def test_load_denoiser_keeps_device_dtype_and_shape(device, size):
    denoise = load_denoiser(None, device=device)
    vol = torch.randn(size, size, size, dtype=torch.float64, device=device)
    out = denoise(vol)
    assert out.shape == vol.shape and out.dtype == vol.dtype and out.device == vol.device
    assert torch.isfinite(out).all()
    # scale-equivariant (up to the float32 network's rounding)
    assert torch.allclose(denoise(vol * 5.0), out * 5.0, rtol=1e-4, atol=1e-5 * float(out.abs().max()))


def test_bad_input_raises_input_error_naming_the_file_or_shape(tmp_path):
    missing = tmp_path / "nope" / "model.pt"
    with pytest.raises(InputError, match="nope.*model.pt.*not found"):
        load_denoiser(missing)
    lonely = tmp_path / "lonely.pt"
    torch.save({}, lonely)
    with pytest.raises(InputError, match="lonely.json"):
        load_denoiser(lonely)
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    (tmp_path / "junk.json").write_text(json.dumps({"unet": {"levels": 2}}))
    with pytest.raises(InputError, match="junk.pt.*not a prior3d model"):
        load_denoiser(tmp_path / "junk.pt")
    denoise = load_denoiser(None)
    with pytest.raises(InputError, match=r"\(32, 32\)"):
        denoise(torch.zeros(32, 32))
    with pytest.raises(InputError, match=r"\(8, 8, 9\)"):
        denoise(torch.zeros(8, 8, 9))
    with pytest.raises(InputError, match=r"\(5, 6, 6\)"):
        cube_rotations(torch.zeros(5, 6, 6))


@pytest.mark.slow
def test_training_on_reconstructions_improves_held_out_maps(tmp_path):
    """The whole recipe, small: 4 structures × 3 noisy reconstructions, 150 steps (minutes)."""
    from cryoprior.workflows.train_prior3d import run_train_prior3d

    config = Prior3DConfig(
        structures=["1bd2", "3o21", "1pwc", "3enl"], validation_structures=["4ake", "2a2l"],
        pseudo_proteins=0, box=[32], pairs_per_structure=3, validation_pairs=1, n_particles=[300, 1000],
        epochs=50, device="cpu",
    )
    result = run_train_prior3d(config, tmp_path / "run", argv=["test"])
    assert result["n_improved_mean_fsc"] == result["n"] == 2
    mean = result["mean"]
    assert mean["output"]["resolution_0.5_a"] < mean["input"]["resolution_0.5_a"]


def test_rerun_with_another_config_is_refused_and_names_the_field(tmp_path, capsys):
    """A rerun resumes only the same config: another --noise-model used to resume the old
    checkpoint (issue 11). The stored config.yaml is kept."""
    from cryoprior.cli.main import main as cli_main
    from cryoprior.config import write_run_config
    from cryoprior.nn.prior3d import Prior3DConfig

    out = tmp_path / "prior"
    out.mkdir()
    args = ["--structures", "4ake", "--validation-structures", "1ake", "--box", "32", "--epochs", "1"]
    write_run_config(out / "config.yaml", Prior3DConfig(structures=["4ake"], validation_structures=["1ake"],
                                                        box=[32], epochs=1, noise_model="reconstruction"))
    before = (out / "config.yaml").read_text()
    rc = cli_main(["-q", "train-prior3d", *args, "--noise-model", "gaussian", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "noise_model" in err and len(err.splitlines()) == 1, err
    assert (out / "config.yaml").read_text() == before
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]


# ------------------------------------------------------------------- pixel size of the prior's input
def test_shipped_model_records_its_training_pixel_sizes():
    from cryoprior.nn.prior3d import model_record, training_pixel_size_a
    from cryoprior.nn.prior3d_data import PSEUDO_BOX_EDGE_A

    lo, hi = training_pixel_size_a(None)
    boxes = model_record(None)["training"]["config"]["box"]
    assert boxes == [32, 64]
    pixels = [recommended_pixel_size_a(s, b) for s in training_structures() for b in boxes]
    pixels += [PSEUDO_BOX_EDGE_A / b for b in boxes]  # the pseudo-proteins
    assert (lo, hi) == (min(pixels), max(pixels)) == (1.25, 5.75)
    assert load_denoiser(None).pixel_size_a == (lo, hi)


def test_prior_step_at_half_the_pixel_size_equals_the_step_at_the_model_pixel_size():
    """A map given at half the pixel size with twice the box (the same map, Fourier-padded)
    gets the same prior step as at the model's pixel size (1.25 Å, the finest it was trained
    at): the M-step resamples the denoiser's input into the training range and back. Applied
    directly at 0.625 Å/px the step differs by over ten per cent."""
    from cryoprior.core.filters import resample
    from cryoprior.recon.mstep import apply_denoiser, apply_denoiser_at_pixel_size, denoiser_box

    den = load_denoiser(None)
    pixel, coarsest = den.pixel_size_a
    truth = load_volume("1ake", 64, pixel).float()  # held out from the training
    noisy = truth + truth.std() * torch.randn(truth.shape, generator=torch.Generator().manual_seed(0))
    fine = resample(noisy, 128, ndim=3)  # pixel / 2, box 128
    assert denoiser_box(den, 128, pixel / 2) == 64 and denoiser_box(den, 64, pixel) == 64
    assert denoiser_box(den, 64, 1.0) == round(64 / pixel) and denoiser_box(den, 16, 2 * coarsest) == 32
    assert denoiser_box(den, 64, None) == 64 and denoiser_box(lambda v: v, 64, 1.0) == 64
    step = apply_denoiser_at_pixel_size(den, noisy, pixel)
    assert float((step - noisy).norm() / noisy.norm()) > 0.5  # the prior does something here

    def rel(a):
        return float((resample(a, 64, ndim=3) - step).norm() / step.norm())

    assert rel(apply_denoiser_at_pixel_size(den, fine, pixel / 2)) < 1e-3
    assert rel(apply_denoiser(den, fine)) > 0.1  # what the resampling removes (0.15 here)
