"""2D classification of particles that carry a CTF: phase flipping before clustering, and
Wiener CTF-corrected class averages (issue 14, item 2)."""

import mrcfile
import numpy as np
import pytest

from cryoprior.classical.cluster import class_averages
from cryoprior.io import ParticleStack
from cryoprior.sim.dataset import SimulationConfig, simulate_dataset
from cryoprior.workflows.classify import ClassifyConfig, run_classify

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def _sim(tmp_path, ctf: bool):
    cfg = SimulationConfig(structures=["1hvr"], box=48, pixel_size_a=1.7, n=400, views=4, snr=0.05, ctf=ctf,
                           defocus_min_a=5_000.0, defocus_max_a=40_000.0, seed=7)
    return simulate_dataset(cfg, tmp_path / ("ctf" if ctf else "plain"))


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def test_stack_with_ctf_classifies_as_well_as_without_and_averages_are_corrected(tmp_path):
    plain, with_ctf = _sim(tmp_path, False), _sim(tmp_path, True)
    config = ClassifyConfig(classes=4, method="pca-kmeans", seed=0)
    f1 = {}
    for name, folder in (("plain", plain), ("ctf", with_ctf)):
        result = run_classify(folder / "particles.star", tmp_path / f"out_{name}", config)
        f1[name] = result["metrics"]["f1"]
    assert f1["plain"] > 0.8, f1
    assert f1["ctf"] >= f1["plain"] - 0.05, f1

    # the true views: the CTF-free clean projections (same poses: same seed), one mean per view
    clean_stack = ParticleStack.from_file(plain / "particles.star")
    views = clean_stack.column("cpViewLabel").astype(np.int64)
    truth = class_averages(clean_stack.read_image_column("cpCleanImageName"), views, 4)  # (4, d, d)
    out = ParticleStack.from_file(tmp_path / "out_ctf" / "particles.star")
    labels = out.column("rlnClassNumber").astype(np.int64) - 1
    corrected = mrcfile.read(tmp_path / "out_ctf" / "class_averages.mrcs")
    plain_means = class_averages(ParticleStack.from_file(with_ctf / "particles.star").images(), labels, 4)
    match = [np.bincount(views[labels == j], minlength=4).argmax() for j in range(4)]  # class -> view
    r_corrected = np.mean([_corr(corrected[j], truth[match[j]]) for j in range(4)])
    r_plain = np.mean([_corr(plain_means[j], truth[match[j]]) for j in range(4)])
    assert r_corrected > r_plain + 0.1, (r_corrected, r_plain)
