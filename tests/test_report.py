"""The run report: generic over what a run folder holds, self-contained, and it renders.

One small demo run (no CDAE, box 24) is shared by the module; the Chromium checks are skipped
where Chromium is absent (CI installs it in .ci/run).
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from cryoprior.cli.main import main as cli_main
from cryoprior.report.build import build_report
from cryoprior.workflows import demo as demo_mod
from cryoprior.workflows.demo import DemoConfig, run_demo

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SMALL = dict(box=24, pixel_size_a=4.0, views_box=24, views_pixel_size_a=4.0, n_views=120, n_uniform=120, denoisers=["lowpass"],
             priors=["gaussian"], heldout_denoisers=[], seed=0, device="cpu", n_inplane=40)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "run"
    run_demo(out, DemoConfig(**SMALL), argv=["test"])
    return out


def _data_uris(text: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)]


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def test_report_is_self_contained_with_a_section_per_result(small_run):
    text = (small_run / "report.html").read_text(encoding="utf-8")
    for heading in ("Stages", "Data", "Denoising", "2D classification", "3D reconstruction", "At a glance"):
        assert f"<h2>{heading}</h2>" in text
    assert "Gaussian low-pass" in text and "MAP, Gaussian prior" in text and "oracle (true labels)" in text
    assert "<script" not in text and "<link" not in text
    assert not re.search(r'(src|href)="(https?:)?//', text), "the report must not fetch anything"
    # numbers come from the run's own metrics files
    metrics = json.loads((small_run / "reconstruct_gaussian" / "metrics.json").read_text())
    assert f"{metrics['resolution_truth_0143_a']:.2f}".rstrip("0").rstrip(".") in text
    # every figure is a decodable PNG, also saved beside the report
    pngs = _data_uris(text)
    assert len(pngs) >= 6
    for png in pngs:
        assert png.startswith(PNG_SIGNATURE)
        img = mpimg.imread(io.BytesIO(png), format="png")
        assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
        assert float(img[..., :3].std()) > 0.01  # not a blank canvas
    assert len(list((small_run / "figures").glob("*.png"))) == len(pngs)


def test_report_of_a_partial_run_shows_what_is_there(tmp_path, monkeypatch):
    def fail(self, *a, **k):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(demo_mod._Demo, "denoise_baseline", fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        run_demo(tmp_path / "run", DemoConfig(**SMALL), argv=["test"])
    out = build_report(tmp_path / "run")
    text = out.read_text(encoding="utf-8")
    assert "<h2>Data</h2>" in text and "<h2>Denoising</h2>" not in text
    assert "<h2>3D reconstruction</h2>" not in text
    # denoise, classify ×4 (raw, oracle, CDAE, DRVAE), in-plane ×4, reconstruct
    assert text.count("not run yet") == 10
    assert "Could not show" not in text


def test_report_of_an_empty_folder(tmp_path):
    text = build_report(tmp_path).read_text(encoding="utf-8")
    assert "holds no results yet" in text


def test_unavailable_stage_is_listed_as_such(tmp_path, monkeypatch):
    real = demo_mod.missing
    monkeypatch.setattr(demo_mod, "missing", lambda module, *names: "not installed (test)"
                        if module == "cryoprior.workflows.classify" else real(module, *names))
    cfg = DemoConfig(**{**SMALL, "priors": []})
    metrics = run_demo(tmp_path / "run", cfg, argv=["test"])
    assert set(metrics["not_available"]) == {"classify_raw", "classify_lowpass", "classify_drvae", "classify_oracle",
                                             "inplane_kmeans", "inplane_align-kmeans", "inplane_ml2d", "inplane_drvae-bsk"}
    text = (tmp_path / "run" / "report.html").read_text(encoding="utf-8")
    assert text.count("not available in this version") == 8
    assert "<h2>2D classification</h2>" not in text


def test_report_of_a_single_pipeline_folder(small_run, tmp_path):
    """A `cryoprior reconstruct` output on its own (no stages.json) is recognised by its files."""
    folder = shutil.copytree(small_run / "reconstruct_gaussian", tmp_path / "rec")
    (folder / "metrics.json").unlink()  # only what `cryoprior reconstruct` itself writes
    text = build_report(folder).read_text(encoding="utf-8")
    assert "<h2>3D reconstruction</h2>" in text and "FSC with the true map" not in text  # figures are PNG
    assert "MAP, Gaussian prior" in text and "Could not show" not in text
    assert len(_data_uris(text)) == 2  # FSC curves, map slices


def test_report_command(small_run, tmp_path, capsys):
    out = tmp_path / "copy.html"
    assert cli_main(["--quiet", "report", str(small_run), "--out", str(out), "--no-figure-files"]) == 0
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert str(out) in capsys.readouterr().out
    assert cli_main(["report", str(tmp_path / "absent")]) == 2


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (CI installs it in .ci/run)")
def test_report_renders_in_headless_chromium(small_run, tmp_path):
    shot = tmp_path / "shot.png"
    done = _chromium(f"--screenshot={shot}", "--window-size=1200,3000",
                     (small_run / "report.html").absolute().as_uri(), profile=tmp_path / "profile")
    assert shot.exists(), done.stderr[-2000:]
    img = mpimg.imread(shot)[..., :3]
    assert img.shape[:2] == (3000, 1200)
    not_white = (img < 0.9).any(axis=-1).mean()
    assert not_white > 0.05 and float(img.std()) > 0.05, "the screenshot is blank"


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (CI installs it in .ci/run)")
def test_every_image_loads_in_chromium(small_run, tmp_path):
    probe = ('<script>window.addEventListener("load", () => { const imgs = [...document.images]; '
             'const bad = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length; '
             'document.body.setAttribute("data-images", imgs.length + "/" + bad); });</script></body>')
    text = (small_run / "report.html").read_text(encoding="utf-8")
    n_images = len(_data_uris(text))
    broken = '<img src="data:image/png;base64,AAAA" alt="broken on purpose">'
    for name, html, expect in (("ok.html", text, f"{n_images}/0"),
                               ("broken.html", text.replace("</body>", broken + "</body>"), f"{n_images + 1}/1")):
        page = tmp_path / name  # a test-only copy with the probe
        page.write_text(html.replace("</body>", probe), encoding="utf-8")
        done = _chromium("--virtual-time-budget=10000", "--dump-dom", page.as_uri(), profile=tmp_path / "profile")
        found = re.search(r'data-images="(\d+/\d+)"', done.stdout)
        assert found is not None, done.stderr[-2000:]
        assert found.group(1) == expect


def test_figures_do_not_touch_global_matplotlib_state():
    import matplotlib

    from cryoprior.report import plots as report_plots

    backend = matplotlib.get_backend()
    png = report_plots.image_grid([[np.random.default_rng(0).normal(size=(16, 16))]], ["a"], ["b"], pixel_size_a=2.0)
    assert png.startswith(PNG_SIGNATURE)
    assert matplotlib.get_backend() == backend
