"""k-means with in-plane alignment: rotated views recovered where plain k-means cannot, angles right."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cryoprior.classical.cluster import align_kmeans, cluster
from cryoprior.classical.cluster.align import aligned_costs, alignment_mask, rotated_copies
from cryoprior.cli import main as cli
from cryoprior.core.filters import normalize_images
from cryoprior.core.metrics import classification_scores
from cryoprior.core.rotations import rotate_images
from cryoprior.io.mrc import read_mrc
from cryoprior.io.stack import ParticleStack
from cryoprior.sim.dataset import SimulationConfig, simulate_dataset

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def rotated(tmp_path_factory):
    """400 particles of 4 views at random in-plane angles, box 32, SNR 1."""
    out = tmp_path_factory.mktemp("rotated") / "sim"
    simulate_dataset(SimulationConfig(box=32, n=400, views=4, inplane=True, snr=1.0, seed=0), out)
    return out / "particles.star"


@pytest.fixture(scope="module")
def rotated_shifted(tmp_path_factory):
    """As ``rotated``, each particle also off centre by up to 3 px per axis."""
    out = tmp_path_factory.mktemp("shifted") / "sim"
    simulate_dataset(SimulationConfig(box=32, pixel_size_a=2.0, n=400, views=4, inplane=True, shift_a=6.0, snr=1.0,
                                      seed=1), out)
    return out / "particles.star"


def _blob(d: int = 32) -> torch.Tensor:
    """An asymmetric test image: an off-centre blob and a half bar."""
    y, x = torch.meshgrid(torch.arange(d) - 15.5, torch.arange(d) - 15.5, indexing="ij")
    return torch.exp(-((x - 6) ** 2 + (y - 2) ** 2) / 8) + torch.exp(-(x**2) / 4 - (y / 6) ** 2) * (y > -2)


def _circular_error_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs((np.rad2deg(a - b) + 180) % 360 - 180)


def test_rotated_views_are_recovered_where_plain_kmeans_fails(rotated):
    stack = ParticleStack.from_file(rotated)
    x = normalize_images(torch.from_numpy(stack.images())).numpy()
    truth = stack.column("cpViewLabel").astype(np.int64)
    aligned = classification_scores(truth, cluster(x, 4, "align-kmeans", seed=0))["f1"]
    plain = classification_scores(truth, cluster(x, 4, "kmeans", seed=0))["f1"]
    assert aligned > 0.95 and plain < 0.7


def test_angles_are_the_rotations_up_to_one_offset():
    # one asymmetric image (an off-centre blob and a bar) at known angles: one class whose
    # recovered angles are the true ones plus a common offset, within the 10-degree sampling
    d = 32
    image = _blob(d)
    true = torch.rand(60, generator=torch.Generator().manual_seed(0)) * 2 * math.pi
    images = rotate_images(image.expand(60, 1, d, d).contiguous(), true)[:, 0]
    labels, angles, _, averages = align_kmeans(images.numpy(), 1, seed=0)
    assert (labels == 0).all()
    offset = np.angle(np.exp(1j * (angles - true.numpy())).mean())
    assert _circular_error_deg(angles - offset, true.numpy()).max() < 5 + 1e-6
    back = rotate_images(images[:, None], -torch.from_numpy(angles).float())[:, 0]
    corr = [np.corrcoef(b.ravel(), averages[0].ravel())[0, 1] for b in back.numpy()]
    assert min(corr) > 0.95


def test_align_kmeans_is_deterministic_and_checks_its_input(rotated):
    images = ParticleStack.from_file(rotated).images()[:80]
    a, b = align_kmeans(images, 3, seed=1), align_kmeans(images, 3, seed=1)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    with pytest.raises(ValueError, match="square"):
        align_kmeans(images[:, :, :20], 3)
    with pytest.raises(ValueError, match="1..80"):
        align_kmeans(images, 81)


def test_classify_align_kmeans_writes_poses_and_aligned_averages(rotated_shifted, tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", {"classify": "classify"})
    out = tmp_path / "run"
    argv = [str(rotated_shifted), "--classes", "4", "--method", "align-kmeans", "--max-shift", "3", "--out", str(out)]
    assert cli.main(["-q", "classify", *argv]) == 0
    assert json.loads((out / "metrics.json").read_text())["f1"] > 0.95
    res = ParticleStack.from_file(out / "particles.star")
    labels = res.column("rlnClassNumber") - 1
    angles = np.deg2rad(res.column("cpInplaneAngleDeg").astype(np.float64))
    dx, dy = res.column("cpAlignShiftXPx").astype(int), res.column("cpAlignShiftYPx").astype(int)
    clean = res.read_image_column("cpCleanImageName")
    centred = np.stack([np.roll(im, (-b, -a), axis=(0, 1)) for im, a, b in zip(clean, dx, dy)])
    back = rotate_images(torch.from_numpy(centred)[:, None], -torch.from_numpy(angles).float())[:, 0].numpy()
    averages, _ = read_mrc(out / "class_averages.mrcs")
    for j in range(4):  # each average is its members rotated into one frame, not a rotational blur
        members = labels == j
        aligned = np.corrcoef(averages[j].ravel(), back[members].mean(0).ravel())[0, 1]
        blurred = np.corrcoef(averages[j].ravel(), clean[members].mean(0).ravel())[0, 1]
        assert aligned > 0.99 and 1 - aligned < (1 - blurred) / 5


def test_aligned_costs_equal_explicit_shifts():
    # batched, chunked shifts == the distance to each rolled, rotated centre computed one by one
    gen = torch.Generator().manual_seed(0)
    x, centres = torch.randn(5, 16, 16, generator=gen), torch.randn(2, 16, 16, generator=gen)
    angles = torch.tensor([0.0, 1.0, 2.5])
    mask = alignment_mask(16)
    cost, rot, shift = aligned_costs(x, centres, angles, mask, max_shift=2, chunk=2)
    t = rotated_copies(centres, angles) * mask
    for i in range(5):
        for c in range(2):
            d2 = {(r, dx, dy): float(((x[i] - torch.roll(t[c, r], (dy, dx), dims=(0, 1))) ** 2).sum())
                  for r in range(3) for dx in range(-2, 3) for dy in range(-2, 3)}
            (r, dx, dy), best = min(d2.items(), key=lambda kv: kv[1])
            assert cost[i, c].item() == pytest.approx(best, rel=1e-4)
            assert (rot[i, c].item(), *shift[i, c].tolist()) == (r, dx, dy)


def test_shifts_are_recovered_up_to_one_offset():
    true = torch.randint(-3, 4, (40, 2), generator=torch.Generator().manual_seed(1))
    images = torch.stack([torch.roll(_blob(), (int(dy), int(dx)), dims=(0, 1)) for dx, dy in true.tolist()])
    labels, _, shifts, _ = align_kmeans(images.numpy(), 1, n_angles=1, max_shift=6, seed=0)
    offset = shifts - true.numpy()
    assert (labels == 0).all() and (offset == offset[0]).all()


def test_shifted_rotated_views_need_the_shift_search(rotated_shifted):
    stack = ParticleStack.from_file(rotated_shifted)
    x = normalize_images(torch.from_numpy(stack.images())).numpy()
    truth = stack.column("cpViewLabel").astype(np.int64)
    f1 = {m: classification_scores(truth, cluster(x, 4, "align-kmeans", seed=0, max_shift=m))["f1"] for m in (0, 3)}
    assert f1[3] > 0.95 and f1[3] > f1[0] + 0.1
