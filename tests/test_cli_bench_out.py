"""`cryoprior bench NAME --out FILE`: the JSON at FILE, the tables in a folder beside it."""

import json

import cryoprior.bench.cdae as bench_cdae
from cryoprior.cli.main import main as cli


def test_tables_go_next_to_the_json_not_into_the_working_folder(tmp_path, monkeypatch):
    seen = {}

    def fake_run(**kwargs):
        seen.update(kwargs)
        return {"grid": {}}

    monkeypatch.setattr(bench_cdae, "run", fake_run)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    out = tmp_path / "results" / "bench_cdae.json"
    out.parent.mkdir()
    assert cli(["bench", "cdae", "--quick", "--out", str(out)]) == 0
    assert seen["out_dir"] == str(out.parent / "bench_cdae_quick") and seen["quick"] is True
    assert json.loads(out.read_text())["bench"] == "cdae"
    assert cli(["bench", "cdae", "--quick"]) == 0  # without --out: the working folder, as before
    assert seen["out_dir"] == "bench_cdae_quick"


def test_model_flag_reaches_red_and_relion_and_nothing_else(tmp_path, monkeypatch, capsys):
    import cryoprior.bench.red as bench_red
    from cryoprior.bench.relion import _env

    seen = {}
    monkeypatch.setattr(bench_red, "run", lambda **kw: seen.update(kw) or {})
    model = tmp_path / "prior_run"
    model.mkdir()
    assert cli(["bench", "red", "--quick", "--model", str(model)]) == 0
    assert seen["model"] == str(model)
    assert cli(["bench", "cdae", "--quick", "--model", str(model)]) == 2  # a bench without a 3D prior
    assert cli(["bench", "red", "--quick", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "--model applies to bench red and relion" in err and "missing: no such folder" in err
    # the external arms of bench relion hand the model to `cryoprior relion-external`
    assert _env("red", str(model))["CRYOPRIOR_DENOISER"] == str(model.resolve())
    monkeypatch.delenv("CRYOPRIOR_DENOISER", raising=False)
    assert "CRYOPRIOR_DENOISER" not in _env("red")  # default: the shipped model


def test_bench_red_loads_the_given_model(tmp_path):
    import torch

    from cryoprior.bench.red import _denoiser
    from cryoprior.nn.models.unet3d import UNet3D, UNet3DConfig
    from cryoprior.nn.prior3d import load_denoiser, save_model

    torch.manual_seed(0)
    net = UNet3D(UNet3DConfig(levels=2, base_channels=2))
    for p in net.parameters():  # a model unlike the shipped one
        torch.nn.init.normal_(p, std=0.3)
    save_model(net, tmp_path / "m")
    vol = torch.randn(16, 16, 16)
    denoise, note = _denoiser("cpu", str(tmp_path / "m"))
    assert note == f"prior3d model {tmp_path / 'm'}"
    assert torch.allclose(denoise(vol), load_denoiser(tmp_path / "m")(vol))
    shipped, _ = _denoiser("cpu")
    assert not torch.allclose(denoise(vol), shipped(vol), atol=1e-3)
