"""Radial shells, FSC, resolution and the FSC-weighted filter."""

from __future__ import annotations

import pytest
import torch

from cryoprior.core.filters import gaussian_lowpass, lowpass
from cryoprior.core.fsc import (
    fsc,
    fsc_weighted_lowpass,
    radial_average,
    radial_shell_index,
    resolution_at,
    shell_counts,
    shell_frequencies_a,
    spatial_ndim,
)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("box", [8, 9])
def test_shell_index_centred(box):
    idx = radial_shell_index(box, 2)
    c = box // 2
    assert idx.dtype == torch.long and idx.shape == (box, box)
    assert int(idx[c, c]) == 0 and int(idx[c, c + 1]) == 1 and int(idx[c + 1, c + 1]) == 1
    assert int(idx[c, 0]) == c  # the axis reaches shell box // 2 (Nyquist for even boxes)
    assert shell_counts(box, 2).tolist()[:2] == [1.0, 8.0]
    idx3 = radial_shell_index(box, 3)
    assert idx3.shape == (box,) * 3 and int(idx3[c, c, c]) == 0 and int(idx3[c, c, 0]) == c


@pytest.mark.parametrize("box, ndim", [(16, 2), (17, 2), (12, 3), (13, 3)])
def test_radial_average(box, ndim):
    x = torch.full((2,) + (box,) * ndim, 3.0)
    avg = radial_average(x, ndim=ndim)
    assert avg.shape == (2, box // 2 + 1)
    torch.testing.assert_close(avg, torch.full_like(avg, 3.0))
    r = radial_shell_index(box, ndim).double()
    torch.testing.assert_close(radial_average(r, ndim=ndim), torch.arange(box // 2 + 1).double())


@pytest.mark.parametrize("shape, ndim", [((3, 32, 32), 2), ((33, 33), 2), ((16, 16, 16), 3),
                                         ((2, 17, 17, 17), 3)])
def test_fsc_with_itself_is_one(shape, ndim):
    x = _randn(*shape)
    curve = fsc(x, x, ndim=ndim)
    assert curve.shape == shape[: len(shape) - ndim] + (shape[-1] // 2 + 1,)
    torch.testing.assert_close(curve, torch.ones_like(curve))
    torch.testing.assert_close(fsc(x, 2.5 * x, ndim=ndim), torch.ones_like(curve))  # scale-free
    torch.testing.assert_close(fsc(x, -x, ndim=ndim), -torch.ones_like(curve))


def test_fsc_of_independent_noise_is_near_zero():
    a, b = _randn(32, 32, 32, seed=1), _randn(32, 32, 32, seed=2)
    curve = fsc(a, b, ndim=3)[5:]  # shells with >= 300 voxels: std ~ 1 / sqrt(150)
    assert float(curve.abs().max()) < 0.3 and float(curve.abs().mean()) < 0.1
    imgs = fsc(_randn(100, 64, 64, seed=3), _randn(100, 64, 64, seed=4)).mean(dim=0)[8:]
    assert float(imgs.abs().max()) < 0.1


def test_fsc_of_signal_plus_noise_decreases():
    signal = gaussian_lowpass(_randn(200, 48, 48, seed=5), sigma_px=1.5)
    noisy = signal + 0.05 * _randn(200, 48, 48, seed=6)
    curve = fsc(signal, noisy).mean(dim=0)
    assert float(curve[1]) > 0.95 and float(curve[-1]) < 0.2
    assert bool((curve[2:] <= curve[1:-1] + 0.01).all())


@pytest.mark.parametrize("box", [48, 49])
def test_resolution_of_lowpassed_volume(box):
    """Half maps = a volume hard-low-passed between shells 12 and 13 + independent weak noise."""
    pixel = 2.0
    vol = lowpass(_randn(box, box, box, seed=7), cutoff_freq=12.5 / box, width_px=0.0, ndim=3)
    half1 = vol + 0.01 * _randn(box, box, box, seed=8)
    half2 = vol + 0.01 * _randn(box, box, box, seed=9)
    curve = fsc(half1, half2, ndim=3)
    assert float(curve[12]) > 0.99 and float(curve[13]) < 0.1
    res = resolution_at(curve, box, pixel)
    assert box * pixel / 13 < res < box * pixel / 12  # 8 Å at box 48, within one shell


def test_resolution_interpolation_hand_computed():
    curve = torch.tensor([1.0, 0.9, 0.8, 0.5, 0.2, 0.1, 0.05, 0.0, 0.0])  # box 16 or 17
    # 0.143 between shell 4 (0.2) and 5 (0.1): shell 4.57 → 16 * 1.5 / 4.57 Å
    assert resolution_at(curve, 16, 1.5) == pytest.approx(24.0 / 4.57)
    assert resolution_at(curve, 17, 1.5) == pytest.approx(25.5 / 4.57)
    # exactly on a shell: 0.5 is reached at shell 3, not below it → crossing at 3
    assert resolution_at(curve, 16, 1.5, threshold=0.5) == pytest.approx(8.0)
    assert resolution_at(torch.ones(9), 16, 1.5) == pytest.approx(3.0)  # never crosses: Nyquist
    low = torch.tensor([1.0, 0.1, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert resolution_at(low, 16, 1.5) == pytest.approx(24.0)  # below at shell 1
    odd_start = torch.tensor([-1.0, 0.9, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # shell 0 ignored
    assert resolution_at(odd_start, 16, 1.0) == pytest.approx(16.0 / (1 + 0.757 / 0.8))
    with pytest.raises(ValueError, match=r"\(9,\).*\(5,\)"):
        resolution_at(torch.ones(5), 16, 1.0)


def test_shell_frequencies():
    f = shell_frequencies_a(16, 2.0)
    assert f.shape == (9,)
    assert float(f[1]) == pytest.approx(1 / 32) and float(f[-1]) == pytest.approx(0.25)
    assert float(shell_frequencies_a(17, 1.0)[-1]) == pytest.approx(8 / 17)


def test_fsc_batched_equals_looped():
    a, b = _randn(2, 3, 20, 20, seed=10), _randn(2, 3, 20, 20, seed=11)
    batched = fsc(a, b)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(batched[i, j], fsc(a[i, j], b[i, j]))


def test_fsc_errors_show_shapes():
    with pytest.raises(ValueError, match=r"\(4, 16, 16\).*\(4, 16, 15\)"):
        fsc(torch.zeros(4, 16, 16), torch.zeros(4, 16, 15))
    with pytest.raises(ValueError, match="ndim"):
        fsc(torch.zeros(16, 16, 16), torch.zeros(16, 16, 16))  # volume or 16 images?
    assert spatial_ndim(torch.zeros(5, 16, 16), None) == 2
    with pytest.raises(ValueError, match=r"\(16, 15\)"):
        spatial_ndim(torch.zeros(16, 15), 2)


def test_fsc_empty_shells_give_zero():
    x = torch.zeros(16, 16)
    x[8, 8] = 1.0  # flat spectrum
    y = torch.zeros(16, 16)
    curve = fsc(x, y)
    assert torch.equal(curve, torch.zeros(9))


@pytest.mark.parametrize("box", [16, 17])
def test_fsc_weighted_lowpass(box):
    vol = lowpass(_randn(2, box, box, box, seed=12), cutoff_freq=0.3, ndim=3)  # no corner power
    ones = torch.ones(box // 2 + 1, dtype=torch.float64)
    torch.testing.assert_close(fsc_weighted_lowpass(vol, ones, ndim=3), vol)
    half = fsc_weighted_lowpass(vol, 0.5 * ones, ndim=3)
    torch.testing.assert_close(half, vol * (2 * 0.5 / 1.5) ** 0.5)
    neg = fsc_weighted_lowpass(vol, -0.3 * ones, ndim=3)
    torch.testing.assert_close(neg, torch.zeros_like(vol))
    per_map = torch.stack([ones, 0.0 * ones])  # (2, n_shells) broadcast over the 2 maps
    out = fsc_weighted_lowpass(vol, per_map, ndim=3)
    torch.testing.assert_close(out[0], vol[0])
    torch.testing.assert_close(out[1], torch.zeros_like(vol[1]))
    with pytest.raises(ValueError, match="shells"):
        fsc_weighted_lowpass(vol, torch.ones(3), ndim=3)


def test_nan_in_a_map_or_curve_is_an_error_not_zero():
    """One NaN voxel used to give FSC 0 everywhere, and resolution_at then reported Nyquist
    (issue 11, item 7)."""
    from cryoprior.errors import NonFiniteError

    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 16, 16, generator=g)
    b = a.clone()
    b[3, 4, 5] = float("nan")
    with pytest.raises(NonFiniteError):
        fsc(a, b, ndim=3)
    with pytest.raises(NonFiniteError):
        fsc(a.masked_fill(a > 2.5, float("inf")), a, ndim=3)
    curve = fsc(a, a, ndim=3)
    curve[4] = float("nan")
    with pytest.raises(NonFiniteError):
        resolution_at(curve, 16, 1.0)
