"""``cryoprior reconstruct`` end to end on a tiny simulated stack."""

import json

import pytest
import yaml

from cryoprior.cli.main import COMMANDS, main
from cryoprior.core.filters import gaussian_lowpass
from cryoprior.io.mrc import read_map
from cryoprior.sim.dataset import SimulationConfig, simulate_dataset


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "sim"
    config = SimulationConfig(
        structures=["1ake"], box=20, pixel_size_a=4.0, n=240, views=None, snr=2.0, ctf=True, shift_a=4.0, seed=1
    )
    simulate_dataset(config, out)
    return out


@pytest.fixture
def stand_in_denoiser(monkeypatch):
    import cryoprior.workflows.reconstruct as rec

    monkeypatch.setattr(rec, "load_prior_denoiser", lambda path, device: lambda v: gaussian_lowpass(v, 0.5, ndim=3))


def test_registered():
    assert COMMANDS["reconstruct"] == "reconstruct" and COMMANDS["relion-external"] == "relion_external"


def test_known_poses_end_to_end(sim, tmp_path, capsys):
    out = tmp_path / "rec"
    truth = sim / "volumes" / "1ake.mrc"
    rc = main(["-q", "reconstruct", str(sim / "particles.star"), "--truth", str(truth), "--out", str(out)])
    assert rc == 0
    assert "half-map resolution" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"map.mrc", "half1.mrc", "half2.mrc", "fsc.json", "config.yaml", ".cryoprior-files"}
    report = json.loads((out / "fsc.json").read_text())
    assert len(report["fsc_half"]) == len(report["fsc_truth"]) == 11
    # Nyquist is 8 Å and the box 80 Å: the range used to admit every value (issue 11, item 11).
    # At SNR 2 with 240 particles at known poses: ~10.6 Å to the truth at 0.5, ~10.6 Å half-map at 0.143
    assert 8.0 < report["resolution_truth_05_a"] < 13.0
    assert 8.0 < report["resolution_half_0143_a"] < 13.0
    assert report["resolution_truth_0143_a"] < report["resolution_truth_05_a"]
    assert report["resolution_half_0143_a"] < report["resolution_half_05_a"]
    assert report["fsc_truth"][2] > 0.8
    vol, pixel = read_map(out / "map.mrc")
    assert vol.shape == (20, 20, 20) and pixel == pytest.approx(4.0)
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["config"]["truth"] == str(truth) and config["reconstruction"]["prior"] == "gaussian"
    assert "argv" in config and "cryoprior_version" in config
    # an existing output folder is refused with a one-line error
    assert main(["-q", "reconstruct", str(sim / "particles.star"), "--out", str(out)]) == 2


def test_cw_red_and_refine_end_to_end(sim, tmp_path, stand_in_denoiser):
    out = tmp_path / "refine"
    args = [
        "-q", "reconstruct", str(sim / "particles.star"), "--prior", "cw-red", "--refine",
        "--truth", str(sim / "volumes" / "1ake.mrc"), "--start-lowpass-a", "16", "--iterations", "2",
        "--global-step-deg", "30", "--out", str(out),
    ]
    assert main(args) == 0
    report = json.loads((out / "fsc.json").read_text())
    assert report["prior"] == "cw-red"
    history = report["refine_history"]
    assert [h["iteration"] for h in history] == [1, 2]
    assert history[0]["search"] == "global"
    # CW-RED's rule: λ = 0 at cw_low_a (10 Å) or worse, and this run stays worse than 10 Å
    assert history[-1]["resolution_unregularised_a"] > 10.0 and report["lambda"] == 0.0
    # refinement converges: the poses and the resolution improve from the global search on
    assert history[1]["angular_error_median_deg"] < history[0]["angular_error_median_deg"]
    assert history[1]["resolution_unregularised_a"] < history[0]["resolution_unregularised_a"]
    assert report["angular_error_median_deg"] < 20.0


def test_refine_without_start_map_fails(sim, tmp_path, capsys):
    rc = main(["-q", "reconstruct", str(sim / "particles.star"), "--refine", "--out", str(tmp_path / "x")])
    assert rc == 2 and "--start" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cw_red_uses_the_models_thresholds_unless_flags_are_given(sim, tmp_path):
    """A model whose model.json calibrates λ = 1 from 40 Å: CW-RED trusts it on this ~10.6 Å
    stack; --cw-low-a/--cw-high-a 10/4.5 (the paper's) give λ = 0 on the same data."""
    import torch

    from cryoprior.nn.models.unet3d import UNet3D, UNet3DConfig
    from cryoprior.nn.prior3d import save_model

    torch.manual_seed(0)
    model = tmp_path / "model"
    save_model(UNet3D(UNet3DConfig(levels=2, base_channels=2)), model, {"cw_red": {"low_a": 50.0, "high_a": 40.0}})
    base = ["-q", "reconstruct", str(sim / "particles.star"), "--prior", "cw-red", "--denoiser", str(model)]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a" / "fsc.json").read_text())["lambda"] == 1.0
    recorded = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())["reconstruction"]
    assert (recorded["cw_low_a"], recorded["cw_high_a"]) == (50.0, 40.0)
    assert main([*base, "--cw-low-a", "10", "--cw-high-a", "4.5", "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "fsc.json").read_text())["lambda"] == 0.0
    # one flag against the model's other threshold: a one-line error before any output
    assert main([*base, "--cw-high-a", "60", "--out", str(tmp_path / "c")]) == 2
    assert not (tmp_path / "c").exists()
