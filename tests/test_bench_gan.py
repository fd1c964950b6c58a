"""`cryoprior bench gan` end to end at tiny sizes (slow): every section is filled, the 3D and map +
poses rows are on the right scale, and trained generators beat the raw images."""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_cpu_thread")]


# Isomap on a few images per conformation may see a disconnected neighbour graph
@pytest.mark.filterwarnings("ignore:The number of connected components")
@pytest.mark.filterwarnings("ignore::scipy.sparse.SparseEfficiencyWarning")
def test_quick_bench_at_tiny_sizes_writes_every_section(tmp_path, monkeypatch):
    import cryoprior.bench.gan as bench

    tiny = dict(bench.QUICK, n_train=120, n_test=30, n_conf=12, epochs=3, seeds=(0, 1), contamination=[("A", 0.3)],
                n_3d=120, n_map=150, n_cdae_pretrain=30)
    monkeypatch.setattr(bench, "QUICK", tiny)
    monkeypatch.setattr(bench, "inference_speed", lambda: {"gan_default_fp32": 1.0})
    result = bench.run(quick=True, out_dir=tmp_path)
    saved = json.loads((tmp_path / "bench_gan.json").read_text())
    assert saved["sizes"]["seeds"] == [0, 1]
    t1 = result["table1"]["snr0.1"]
    assert t1["l1-AE"]["psnr_db"]["mean"] > t1["raw"]["psnr_db"]["mean"] + 5
    assert t1["l1-AE"]["psnr_db"]["std"] > 0  # two seeds, two different runs
    three_d = result["three_d"]
    assert set(three_d) >= {"raw", "nlm", "wiener", "l1-AE", "(.5,.5)-GAN+l1"}
    assert all(0 < r["res_truth_0143_a"] <= r["res_truth_05_a"] for r in three_d.values())
    mp = result["map_protocol"]
    assert mp["n_test"] == 30 and mp["n_train"] == 120
    assert set(mp["metrics"]) >= {"raw", "nlm", "wiener", "lowpass", "cdae", "l1-AE", "(.5,.5)-GAN+l1"}
    assert mp["metrics"]["l1-AE"]["psnr_db"]["mean"] > mp["metrics"]["raw"]["psnr_db"]["mean"] + 5
    assert "Map + poses protocol" in result["markdown"] and "3D" in result["markdown"]
