"""CW-RED's λ thresholds: read from the model, calibrated by `cryoprior calibrate-cw-red`."""

from __future__ import annotations

import json

import pytest
import torch

from cryoprior.cli.main import main
from cryoprior.core.filters import gaussian_lowpass
from cryoprior.nn.models.unet3d import UNet3D, UNet3DConfig
from cryoprior.nn.prior3d import cw_red_thresholds, load_denoiser, save_model
from cryoprior.nn.prior3d_data import load_truth
from cryoprior.recon.mstep import (
    PAPER_CW_THRESHOLDS_A,
    ReconstructionConfig,
    cw_red_lambda,
    cw_thresholds,
    reconstruct_halves,
)
from cryoprior.workflows import calibrate_cw_red as cal

BOX = 20
SPECS = ["pseudo:2000000", "pseudo:2000001"]


def _config(**kw) -> cal.CWRedCalibrationConfig:
    base = {"maps": len(SPECS), "box": BOX, "n_particles": [300, 600], "snr": [0.03, 0.3], "band_limit_shells": [],
            "lambda_steps": 4}
    return cal.CWRedCalibrationConfig(**{**base, **kw})


def _tiny_model(folder, summary=None):
    torch.manual_seed(0)
    save_model(UNet3D(UNet3DConfig(levels=2, base_channels=2)), folder, summary)
    return folder


@pytest.fixture(scope="module")
def case():
    from cryoprior.nn.prior3d import Prior3DConfig

    base = Prior3DConfig(n_particles=[400, 400], snr=[0.1, 0.1])
    return cal.simulate_halves(SPECS[0], BOX, 0, base, seed=0)


def _oracle(wrong: bool = False):
    """The truth of the matching calibration structure (``wrong``: of the other one), scaled to
    the input's standard deviation."""
    truths = [load_truth(s, BOX)[0] for s in SPECS]

    def denoise(v):
        ranked = sorted(truths, key=lambda t: float((v * t).sum() / t.norm()))
        t = ranked[0] if wrong else ranked[-1]
        return t * (v * t).sum().sign() * v.std() / t.std() if wrong else t * (v * t).sum() / (t * t).sum()

    return denoise


def test_model_thresholds_set_cw_red_lambda_and_explicit_flags_win(tmp_path, case):
    model = _tiny_model(tmp_path / "m", {"cw_red": {"low_a": 40.0, "high_a": 30.0}})
    den = load_denoiser(model)
    assert den.cw_red_a == (40.0, 30.0) == cw_red_thresholds(model)
    assert load_denoiser(_tiny_model(tmp_path / "plain")).cw_red_a is None
    px = case["pixel_size_a"]
    # the map's half-map resolution lies between 12 and 30 Å: the paper's 10 Å gives λ = 0, the model's 30 Å λ = 1
    res = reconstruct_halves(case["acc1"], case["acc2"], px, ReconstructionConfig(prior="red", red_lambda=0.0),
                             None).resolution_a(px, regularised=False)
    assert 12 < res < 30
    model_run = reconstruct_halves(case["acc1"], case["acc2"], px, ReconstructionConfig(prior="cw-red"), den)
    assert model_run.full.lam == 1.0
    explicit = reconstruct_halves(case["acc1"], case["acc2"], px,
                                  ReconstructionConfig(prior="cw-red", cw_low_a=10.0, cw_high_a=4.5), den)
    assert explicit.full.lam == 0.0
    half_set = ReconstructionConfig(prior="cw-red", cw_high_a=20.0)  # low from the model (40), high from the flag
    assert cw_thresholds(half_set, den) == (40.0, 20.0)
    assert cw_thresholds(ReconstructionConfig(prior="cw-red"), lambda v: v) == PAPER_CW_THRESHOLDS_A
    with pytest.raises(ValueError, match="cw_high_a"):
        cw_thresholds(ReconstructionConfig(prior="cw-red", cw_high_a=50.0), den)


def test_lambda_curve_equals_the_m_step_at_intermediate_lambda(case):
    den = lambda v: gaussian_lowpass(v, 1.0, ndim=3)  # noqa: E731
    curve = cal.lambda_curve(case, den, [0.0, 0.5, 1.0])
    direct = reconstruct_halves(case["acc1"], case["acc2"], case["pixel_size_a"],
                                ReconstructionConfig(prior="red", red_lambda=0.5), den)
    got = torch.tensor(curve["rows"][1]["full"]["mean_fsc"])
    want = torch.tensor(cal._score(direct.full.volume, case["truth"], case["pixel_size_a"], BOX // 2)["mean_fsc"])
    assert got == pytest.approx(float(want), abs=1e-5)


@pytest.mark.parametrize("name", ["oracle", "negated", "wrong", "zeros"])
def test_calibration_finds_lambda_one_for_an_oracle_and_zero_for_a_harmful_denoiser(name):
    # negated: harmful at every shell; wrong: another structure, confidently; zeros: the Gaussian
    # prior's own pull, so every λ gives the same map and the calibration keeps λ = 0 (a prior
    # must help measurably to be trusted). (A heavily blurred map is not harmful at these noisy
    # 20-Å maps: it pulls the shells the prior acts on, >= 5, to zero as the Gaussian does.)
    denoiser = {"oracle": _oracle(), "negated": lambda v: -v, "wrong": _oracle(wrong=True),
                "zeros": torch.zeros_like}[name]
    result = cal.calibrate(denoiser, _config(band_limit_shells=[2]), specs=SPECS)
    stars = {r["lambda_star"] for r in result["table"]}
    res = [r["input_res_a"] for r in result["table"]]
    ramp = [cw_red_lambda(x, result["low_a"], result["high_a"]) for x in res]
    assert len(result["table"]) >= len(SPECS)
    if name == "oracle":
        assert stars == {1.0} and all(v == 1.0 for v in ramp)
        assert result["mean_objective"]["fitted"] > result["mean_objective"]["lambda_0"] + 0.05
    else:
        assert stars == {0.0} and all(v == 0.0 for v in ramp)
        if name != "zeros":
            assert result["mean_objective"]["fitted"] > result["mean_objective"]["lambda_1"] + 0.01


def test_fit_ramp_follows_where_the_prior_stops_helping():
    lambdas = [0.0, 0.5, 1.0]
    # the prior helps finer than 12 Å, harms coarser: the best ramp gives 1 below and 0 above
    curves = [{"input_res_a": r, "lambda_star": 1.0 if r < 12 else 0.0,
               "objective": [0.0, 0.05, 0.1] if r < 12 else [0.1, 0.05, 0.0]} for r in (6, 8, 10, 11, 13, 15, 20)]
    fit = cal.fit_ramp(curves, lambdas)
    assert 11 <= fit["high_a"] < fit["low_a"] <= 13
    assert fit["score"] == pytest.approx(0.1)


def test_command_writes_model_json_atomically_and_rejects_a_bad_model(tmp_path, capsys, monkeypatch):
    model = _tiny_model(tmp_path / "m", {"training": {"note": "kept"}})
    before = (model / "model.json").read_text()
    args = ["-q", "calibrate-cw-red", "--model", str(model), "--maps", "1", "--box", str(BOX), "--n-particles",
            "300", "300", "--snr", "0.1", "0.1", "--lambda-steps", "2", "--band-limit-shells"]

    def broken(*a, **k):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(cal, "calibrate", broken)
    with pytest.raises(RuntimeError):
        main(args)
    assert (model / "model.json").read_text() == before  # a failure leaves the model as it was
    monkeypatch.undo()
    assert main(args) == 0
    record = json.loads((model / "model.json").read_text())
    assert record["training"] == {"note": "kept"} and record["unet"]["levels"] == 2
    cw = record["cw_red"]
    assert 0 < cw["high_a"] < cw["low_a"] and cw["calibration"]["table"]
    assert cw_red_thresholds(model) == (cw["low_a"], cw["high_a"])
    assert sorted(p.name for p in model.iterdir()) == ["model.json", "model.pt"]  # no temporary left behind
    capsys.readouterr()
    assert main(["-q", "calibrate-cw-red", "--model", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "calibrate-cw-red: error:" in err and "not found" in err


def test_shipped_model_carries_thresholds_calibrated_on_pseudo_proteins():
    """The shipped model.json records CW-RED thresholds, set on procedural pseudo-proteins only
    (never the benchmarks' held-out structures), spanning ~25 Å to Nyquist at box 32."""
    from cryoprior.nn.prior3d import HELD_OUT_STRUCTURES, model_record

    low, high = cw_red_thresholds(None)
    assert (low, high) != PAPER_CW_THRESHOLDS_A and load_denoiser(None).cw_red_a == (low, high)
    record = model_record(None)["cw_red"]["calibration"]
    assert all(r["structure"].startswith("pseudo:") for r in record["table"])
    assert not {r["structure"] for r in record["table"]} & set(HELD_OUT_STRUCTURES)
    lo_res, hi_res = record["input_res_range_a"]
    assert lo_res < 7.0 and hi_res > 25.0 and record["config"]["box"] == 32
    # the fitted ramp is at least as good on its calibration set as the paper's 10 / 4.5 Å
    assert record["mean_objective"]["fitted"] >= record["mean_objective"]["paper_10_4.5"]
