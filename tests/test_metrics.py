"""Image-quality and classification metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryoprior.core.filters import gaussian_lowpass
from cryoprior.core.metrics import classification_scores, match_labels, mse, psnr, ssim


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _clean(n=4, box=48, seed=0):
    x = gaussian_lowpass(_randn(n, box, box, seed=seed), sigma_px=2.0, ndim=2)
    return x / x.std(dim=(-2, -1), keepdim=True)  # unit std per image


def test_mse_and_psnr_values():
    ref = torch.zeros(2, 16, 16, dtype=torch.float64)
    ref[:, 0, 0] = 1.0  # range 1 per image
    x = ref + 0.1
    torch.testing.assert_close(mse(x, ref), torch.full((2,), 0.01, dtype=torch.float64))
    torch.testing.assert_close(psnr(x, ref), torch.full((2,), 20.0, dtype=torch.float64))
    torch.testing.assert_close(psnr(x, ref, data_range=10.0), torch.full((2,), 40.0, dtype=torch.float64))


def test_psnr_identical_is_inf():
    ref = _clean()
    assert bool(torch.isinf(psnr(ref, ref)).all())
    assert bool(torch.isinf(psnr(torch.zeros(8, 8), torch.zeros(8, 8))))  # flat ref too


def test_ssim_identical_is_one():
    ref = _clean()
    torch.testing.assert_close(ssim(ref, ref), torch.ones(4, dtype=torch.float64))


def test_psnr_ssim_improve_as_noise_decreases():
    ref = _clean(n=3, box=64, seed=1)
    noise = _randn(3, 64, 64, seed=2)
    scales = [2.0, 1.0, 0.5, 0.2, 0.02]
    p = torch.stack([psnr(ref + s * noise, ref) for s in scales])  # (5, 3)
    q = torch.stack([ssim(ref + s * noise, ref) for s in scales])
    assert bool((p[1:] > p[:-1]).all()) and bool((q[1:] > q[:-1]).all())
    assert bool((q < 1).all()) and bool((q[-1] > 0.9).all())


def test_batched_equals_looped_and_shapes():
    ref, x = _clean(n=6, seed=3).reshape(2, 3, 48, 48), _clean(n=6, seed=4).reshape(2, 3, 48, 48)
    for fn in (mse, psnr, ssim):
        out = fn(x, ref)
        assert out.shape == (2, 3)
        for i in range(2):
            for j in range(3):
                torch.testing.assert_close(out[i, j], fn(x[i, j], ref[i, j]))
    with pytest.raises(ValueError, match=r"\(2, 3, 48, 48\).*\(3, 48, 48\)"):
        psnr(x, ref[0])
    with pytest.raises(ValueError, match="window"):
        ssim(torch.zeros(8, 8), torch.zeros(8, 8))


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"gaussian_weights": False, "win_size": 7, "use_sample_covariance": True},
     {"sigma": 1.0}],
)
def test_ssim_matches_skimage(kwargs):
    metrics = pytest.importorskip("skimage.metrics")
    ref = _clean(n=1, box=40, seed=5)[0]
    x = ref + 0.3 * _randn(40, 40, seed=6)
    rng = float(ref.max() - ref.min())
    sk_args = {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False}
    sk_args.update(kwargs)
    expected = metrics.structural_similarity(x.numpy(), ref.numpy(), data_range=rng, **sk_args)
    ours = ssim(x, ref, **kwargs)  # data range defaults to max(ref) - min(ref)
    assert float(ours) == pytest.approx(expected, abs=1e-3)
    assert float(ssim(x.float(), ref.float(), **kwargs)) == pytest.approx(expected, abs=1e-3)


def test_permuted_labels_score_perfectly():
    rng = np.random.default_rng(0)
    true = rng.integers(0, 5, size=200)
    perm = np.array([3, 0, 4, 1, 2])
    pred = perm[true] + 10  # other names, same partition
    assert match_labels(true, pred) == {int(perm[c]) + 10: c for c in range(5)}
    scores = classification_scores(true, pred)
    assert set(scores) == {"accuracy", "precision", "recall", "f1", "nmi", "ari"}
    for key, value in scores.items():
        assert isinstance(value, float)
        assert value == pytest.approx(1.0), key


def test_hand_worked_contingency():
    # true 0: pred 7 x3, 5 x1 | true 1: pred 5 x3 | true 2: pred 9 x2, 7 x1
    true = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    pred = np.array([7, 7, 7, 5, 5, 5, 5, 9, 9, 7])
    assert match_labels(true, pred) == {7: 0, 5: 1, 9: 2}
    s = classification_scores(true, pred)
    assert s["accuracy"] == pytest.approx(0.8)
    # class 0: P 3/4 R 3/4 F1 3/4; class 1: P 3/4 R 1 F1 6/7; class 2: P 1 R 2/3 F1 4/5
    assert s["precision"] == pytest.approx((0.75 + 0.75 + 1.0) / 3)
    assert s["recall"] == pytest.approx((0.75 + 1.0 + 2 / 3) / 3)
    assert s["f1"] == pytest.approx((0.75 + 6 / 7 + 0.8) / 3)
    assert 0 < s["nmi"] < 1 and -1 < s["ari"] < 1


def test_more_clusters_than_classes():
    true = np.array([0, 0, 0, 1, 1, 1])
    pred = np.array([0, 0, 2, 1, 1, 1])  # cluster 2 is left unmatched and counts as an error
    assert match_labels(true, pred) == {0: 0, 1: 1}
    s = classification_scores(true, pred)
    assert s["accuracy"] == pytest.approx(5 / 6)
    assert s["precision"] == pytest.approx(1.0) and s["recall"] == pytest.approx((2 / 3 + 1) / 2)
    with pytest.raises(ValueError):
        classification_scores(true, pred[:4])
    assert math.isfinite(s["nmi"])
