"""Clustering: views recovered at high SNR and not at very low SNR, balanced sizes, k-NN, averages."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from cryoprior.classical.cluster import (
    balanced_assignment,
    bsk_means,
    class_averages,
    cluster,
    knn,
    reliable_mask,
)
from cryoprior.classical.cluster.averages import (
    ctf_class_sums,
    half_set_labels,
    ssnr_wiener_averages,
    wiener_averages_from_sums,
)
from cryoprior.classical.cluster.bsk import balanced_sizes, size_bounds, ssnr_bsk
from cryoprior.core.filters import normalize_images
from cryoprior.core.metrics import classification_scores
from cryoprior.io.stack import ParticleStack
from cryoprior.sim.dataset import SimulationConfig, simulate_dataset


@pytest.fixture(scope="module")
def views(tmp_path_factory):
    """400 particles, 4 views, box 32: SNR 1 and the same projections at SNR 0.01."""
    out = tmp_path_factory.mktemp("views") / "sim"
    simulate_dataset(SimulationConfig(box=32, n=400, views=4, snr=1.0, snr_levels=[0.01], seed=0), out)
    stack = ParticleStack.from_file(out / "particles.star")

    def norm(x):
        return normalize_images(torch.from_numpy(x)).numpy()

    return {
        "snr1": norm(stack.images()),
        "snr001": norm(stack.read_image_column("cpImageNameSnr0p01")),
        "noisy001": stack.read_image_column("cpImageNameSnr0p01"),
        "clean": stack.read_image_column("cpCleanImageName"),
        "labels": stack.column("cpViewLabel").astype(np.int64),
    }


@pytest.mark.parametrize("method", ["kmeans", "hc", "pca-kmeans"])
def test_views_recovered_at_snr_1(views, method):
    labels = cluster(views["snr1"], 4, method, seed=0)
    assert classification_scores(views["labels"], labels)["f1"] == 1.0


def test_raw_kmeans_fails_at_snr_001(views):
    # the same projections are separated perfectly at SNR 1 (test_views_recovered_at_snr_1)
    f1_low = classification_scores(views["labels"], cluster(views["snr001"], 4, "kmeans"))["f1"]
    assert f1_low < 0.5  # chance is 0.25


def test_cluster_is_deterministic_and_checks_arguments(views):
    x = views["snr1"][:100]
    np.testing.assert_array_equal(cluster(x, 3, "kmeans", seed=3), cluster(x, 3, "kmeans", seed=3))
    with pytest.raises(ValueError, match="unknown clustering method"):
        cluster(x, 3, "dbscan")
    with pytest.raises(ValueError, match="1..100"):
        cluster(x, 101, "kmeans")
    with pytest.raises(ValueError, match="1..100"):
        cluster(x, 0, "hc")


def test_bsk_sizes_equal_and_reliable_mask_keeps_nearest(views):
    x = views["snr1"][:203].reshape(203, -1)  # 203 = 4 * 50 + 3: sizes 51, 51, 51, 50
    labels, centres = bsk_means(x, 4, seed=0)
    sizes = np.bincount(labels, minlength=4)
    assert sorted(sizes.tolist()) == [50, 51, 51, 51]
    mask = reliable_mask(x, labels, centres, 0.3)
    dist = ((x - centres[labels]) ** 2).sum(1)
    for j in range(4):
        inside = labels == j
        assert (mask & inside).sum() == math.ceil(0.3 * inside.sum())
        assert dist[mask & inside].max() <= dist[~mask & inside].min()
    assert reliable_mask(x, labels, centres, 1.0).all()


def test_bsk_agrees_with_views_where_sizes_allow(views):
    labels, _ = bsk_means(views["snr1"], 4, seed=0)
    true = views["labels"]
    assert np.bincount(labels).tolist() == [100] * 4
    # a view larger than 100 must spill its excess into a smaller view's cluster, and no more
    best = np.minimum(np.bincount(true), 100).sum() / len(true)
    assert classification_scores(true, labels)["accuracy"] >= best - 0.01


@pytest.mark.parametrize("n,k", [(12, 3), (37, 5), (60, 4), (9, 9), (20, 1)])
def test_balanced_assignment_is_optimal(n, k):
    rng = np.random.default_rng(n * 10 + k)
    cost = rng.random((n, k)) * 10
    labels = balanced_assignment(cost)
    lo, hi, r = balanced_sizes(n, k)
    sizes = np.bincount(labels, minlength=k)
    assert sizes.min() >= lo and sizes.max() <= hi
    # reference: Hungarian on lo slots per cluster + one penalised extra slot each
    penalty = cost.max() - cost.min() + 1
    slots = np.concatenate([np.repeat(cost, lo, axis=1), cost + penalty], axis=1)
    rows, cols = linear_sum_assignment(slots)
    optimum = slots[rows, cols].sum() - penalty * r
    assert cost[np.arange(n), labels].sum() == pytest.approx(optimum, abs=1e-9)


@pytest.mark.parametrize("n,k,tol", [(12, 3, 0.5), (37, 5, 0.3), (60, 4, 0.5), (50, 2, 1.0), (41, 4, 0.25)])
def test_size_bounded_assignment_is_optimal(n, k, tol):
    rng = np.random.default_rng(n * 10 + k)
    cost = rng.random((n, k)) * 10
    lo, hi = size_bounds(n, k, tol)
    labels = balanced_assignment(cost, size_tolerance=tol)
    sizes = np.bincount(labels, minlength=k)
    assert sizes.min() >= lo and sizes.max() <= hi
    # reference: Hungarian on lo mandatory slots (cost − M: all get filled) + (hi − lo) free slots per cluster
    big = 1e3
    slots = np.concatenate([np.repeat(cost - big, lo, axis=1), np.repeat(cost, hi - lo, axis=1)], axis=1)
    rows, cols = linear_sum_assignment(slots)
    optimum = slots[rows, cols].sum() + big * k * lo
    assert cost[np.arange(n), labels].sum() == pytest.approx(optimum, abs=1e-7)
    # the tolerance only ever helps, and a balanced start reaches the same optimum
    balanced = balanced_assignment(cost)
    assert cost[np.arange(n), labels].sum() <= cost[np.arange(n), balanced].sum() + 1e-9
    again = balanced_assignment(cost, labels=balanced, size_tolerance=tol)
    assert cost[np.arange(n), again].sum() == pytest.approx(optimum, abs=1e-7)


def test_bsk_size_tolerance_keeps_a_real_70_30_split():
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(0, 1, (140, 8)), rng.normal(6, 1, (60, 8))]).astype(np.float32)
    truth = np.repeat([0, 1], [140, 60])
    exact, _ = bsk_means(x, 2, seed=0)
    assert sorted(np.bincount(exact).tolist()) == [100, 100]  # the paper's BSK forces 50/50
    relaxed, _ = bsk_means(x, 2, seed=0, size_tolerance=0.5)
    assert classification_scores(truth, relaxed)["accuracy"] == 1.0
    assert size_bounds(200, 2, 0.5) == (50, 150)
    # a class may not shrink below (1 − τ)·mean even when the data would have it
    y = np.concatenate([rng.normal(0, 1, (190, 8)), rng.normal(6, 1, (10, 8))]).astype(np.float32)
    assert np.bincount(bsk_means(y, 2, seed=0, size_tolerance=0.5)[0]).min() == 50


def test_bsk_started_from_labels_refines_them_in_one_run():
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.normal(0, 1, (60, 6)), rng.normal(3, 1, (60, 6))]).astype(np.float32)
    truth = np.repeat([0, 1], 60)
    # a start with a fifth of each class swapped: the run from its means recovers the truth,
    # keeps the start's class numbers (no new seeding), and a fixed point stays where it is
    start = truth.copy()
    start[:12], start[60:72] = 1, 0
    labels, centres = bsk_means(x, 2, seed=0, init_labels=start)
    assert classification_scores(truth, labels)["accuracy"] > 0.95 and (labels == truth).mean() > 0.95
    again, _ = bsk_means(x, 2, seed=123, init_labels=labels)
    np.testing.assert_array_equal(again, labels)
    with pytest.raises(ValueError, match="every class"):
        bsk_means(x, 3, init_labels=truth)


def test_ssnr_bsk_refines_a_start_with_centres_free_of_noise_only_shells(views):
    from cryoprior.core.fft import fft2c
    from cryoprior.core.fsc import radial_average

    truth = views["labels"]
    # SNR 1: a start with 30 % of the labels redrawn is refined back to the views, sizes balanced
    rng = np.random.default_rng(0)
    start = truth.copy()
    redrawn = rng.random(len(truth)) < 0.3
    start[redrawn] = rng.integers(0, 4, int(redrawn.sum()))
    labels, _ = ssnr_bsk(views["snr1"], 4, start, size_tolerance=0.5)
    assert classification_scores(truth, labels)["accuracy"] > 0.98
    exact, _ = ssnr_bsk(views["snr1"], 4, start)
    assert np.bincount(exact, minlength=4).tolist() == [100] * 4
    # SNR 0.01: the centres are the SSNR-regularised averages, with (almost) no power in the outer
    # shells where the half sets do not agree, unlike the plain class means
    noisy = views["snr001"]
    _, centres = ssnr_bsk(noisy, 4, truth, max_iter=1)
    plain = class_averages(noisy, truth, 4)

    def outer_power(images):
        spectrum = radial_average(fft2c(torch.as_tensor(images.reshape(4, 32, 32))).abs() ** 2)  # (4, 17)
        return float(spectrum[:, 10:].sum() / spectrum.sum())

    assert outer_power(centres) < 0.1 * outer_power(plain)


def test_ssnr_wiener_averages_beat_plain_and_flat_and_keep_clean_ones(views):
    noisy, clean, labels = views["noisy001"], views["clean"], views["labels"]
    truth = class_averages(clean, labels, 4)
    ones = np.ones_like(noisy)

    def corr(a):
        return np.mean([np.corrcoef(a[j].ravel(), truth[j].ravel())[0, 1] for j in range(4)])

    num2, den2 = ctf_class_sums(noisy, ones, half_set_labels(labels, 4), 8)
    ssnr = ssnr_wiener_averages(num2, den2)
    num, den = ctf_class_sums(noisy, ones, labels, 4)
    flat = wiener_averages_from_sums(num, den, np.bincount(labels))
    plain = class_averages(noisy, labels, 4)
    assert corr(ssnr) > corr(plain) + 0.1 and corr(ssnr) > corr(flat) + 0.1 and corr(ssnr) > 0.9
    # half sets summed in chunks (global index parity) equal one pass
    a = ctf_class_sums(noisy[:150], ones[:150], half_set_labels(labels[:150], 4, 0), 8)
    b = ctf_class_sums(noisy[150:], ones[150:], half_set_labels(labels[150:], 4, 150), 8)
    np.testing.assert_allclose(a[0] + b[0], num2, atol=1e-9)
    # on noise-free images the two halves agree and the average is the plain mean
    c2 = ctf_class_sums(clean, ones, half_set_labels(labels, 4), 8)
    np.testing.assert_allclose(ssnr_wiener_averages(*c2), truth, atol=0.02 * np.abs(truth).max())


def test_knn_exact_neighbours_on_a_line():
    x = np.array([[0.0], [1.0], [3.0], [7.0], [15.0]], dtype=np.float32)
    dist, idx = knn(x, 2)
    np.testing.assert_array_equal(idx, [[1, 2], [0, 2], [1, 0], [2, 1], [3, 2]])
    np.testing.assert_allclose(dist, [[1, 3], [1, 2], [2, 3], [4, 6], [8, 12]])
    _, with_self = knn(x, 1, exclude_self=False)
    np.testing.assert_array_equal(with_self[:, 0], np.arange(5))


def test_knn_matches_brute_force():
    x = np.random.default_rng(0).normal(size=(200, 16)).astype(np.float32)
    dist, idx = knn(x, 5, batch=64)
    full = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    np.fill_diagonal(full, np.inf)
    np.testing.assert_array_equal(idx, np.argsort(full, axis=1)[:, :5])
    np.testing.assert_allclose(dist, np.sort(full, axis=1)[:, :5], rtol=1e-4)


def test_knn_correlation_ignores_scale_and_offset():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(100, 32)).astype(np.float32)
    y = x * rng.uniform(0.1, 10, size=(100, 1)).astype(np.float32) + rng.normal(size=(100, 1)).astype(np.float32)
    dx, ix = knn(x, 4, metric="correlation")
    dy, iy = knn(y, 4, metric="correlation")
    np.testing.assert_array_equal(ix, iy)
    np.testing.assert_allclose(dx, dy, atol=1e-5)
    corr = np.corrcoef(x)
    np.testing.assert_allclose(1 - dx[:, 0], corr[np.arange(100), ix[:, 0]], atol=1e-5)


def test_class_averages_approach_clean_views(views):
    noisy, clean, labels = views["noisy001"], views["clean"], views["labels"]
    templates = np.stack([clean[np.flatnonzero(labels == j)[0]] for j in range(4)])  # (4, d, d)

    def mean_corr(n_per_class):
        keep = np.concatenate([np.flatnonzero(labels == j)[:n_per_class] for j in range(4)])
        avg = class_averages(noisy[keep], labels[keep], 4)
        return np.mean([np.corrcoef(avg[j].ravel(), templates[j].ravel())[0, 1] for j in range(4)])

    c = [mean_corr(n) for n in (5, 20, 80)]
    assert c[0] < c[1] < c[2]
    assert c[2] > 0.6  # SNR 0.01 x 80 images: expected correlation ~ sqrt(0.8 / 1.8) = 0.67


def test_class_averages_match_loop_and_empty_class_is_zero():
    rng = np.random.default_rng(2)
    images = rng.normal(size=(30, 8, 8)).astype(np.float32)
    labels = rng.integers(0, 3, size=30)
    avg = class_averages(images, labels, 4)
    for j in range(3):
        np.testing.assert_allclose(avg[j], images[labels == j].mean(0), rtol=1e-5, atol=1e-6)
    assert not avg[3].any()
    with pytest.raises(ValueError, match="labels must be integers"):
        class_averages(images, labels, 2)
