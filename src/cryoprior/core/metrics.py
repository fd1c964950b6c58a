"""Image-quality metrics (torch, per image) and classification metrics (numpy in, floats out).

PSNR and SSIM take the data range as the denoising papers do: ``max(ref) - min(ref)`` of each
reference image unless ``data_range`` is given. SSIM follows
``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=...)`` (Wang et al. 2004): an 11-tap Gaussian window,
mean of the SSIM map over the pixels whose window lies inside the image.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from cryoprior.core.filters import normalize_images


def _check_pair(x: torch.Tensor, ref: torch.Tensor) -> None:
    if x.shape != ref.shape or x.dim() < 2:
        raise ValueError(
            f"expected two images (..., h, w) of one shape: x.shape = {tuple(x.shape)} "
            f"vs ref.shape = {tuple(ref.shape)}"
        )


def _data_range(ref: torch.Tensor, data_range: float | torch.Tensor | None) -> torch.Tensor:
    if data_range is None:
        return ref.amax(dim=(-2, -1)) - ref.amin(dim=(-2, -1))
    return torch.as_tensor(data_range, device=ref.device, dtype=ref.dtype)


def mse(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image. ``(..., h, w)`` twice → ``(...,)``."""
    _check_pair(x, ref)
    return ((x - ref) ** 2).mean(dim=(-2, -1))


def psnr(
    x: torch.Tensor, ref: torch.Tensor, data_range: float | torch.Tensor | None = None
) -> torch.Tensor:
    """``10 log10(peak^2 / MSE)`` in dB per image; ``inf`` where ``x == ref``.

    ``peak = max(ref) - min(ref)`` per reference image unless ``data_range`` (float or ``(...,)``)
    is given. ``(..., h, w)`` twice → ``(...,)``.
    """
    err = mse(x, ref)
    peak = _data_range(ref, data_range)
    val = 10.0 * torch.log10(peak**2 / err)
    return torch.where(err == 0, math.inf, val)


def _gaussian_window(sigma: float, truncate: float, device, dtype) -> torch.Tensor:
    """scipy.ndimage's Gaussian: radius ``int(truncate * sigma + 0.5)``, weights summing to 1."""
    radius = int(truncate * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    w = torch.exp(-0.5 * (t / sigma) ** 2)
    return w / w.sum()


def _filter_valid(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' filtering of ``x`` ``(n, 1, h, w)`` with 1D window ``w`` ``(k,)``."""
    k = w.numel()
    x = F.conv2d(x, w.reshape(1, 1, k, 1))
    return F.conv2d(x, w.reshape(1, 1, 1, k))


def ssim(
    x: torch.Tensor,
    ref: torch.Tensor,
    data_range: float | torch.Tensor | None = None,
    gaussian_weights: bool = True,
    sigma: float = 1.5,
    win_size: int = 7,
    use_sample_covariance: bool = False,
) -> torch.Tensor:
    """Mean structural similarity per image. ``(..., h, w)`` twice → ``(...,)``.

    Gaussian window (``sigma``, truncated at 3.5 sigma: 11 taps at 1.5) by default; with
    ``gaussian_weights=False`` a uniform ``win_size`` window (then ``use_sample_covariance``
    applies skimage's ``NP / (NP - 1)`` factor). Matches skimage with the same arguments and
    ``data_range`` (default here: ``max(ref) - min(ref)`` per image).
    """
    _check_pair(x, ref)
    if gaussian_weights:
        w = _gaussian_window(sigma, 3.5, x.device, x.dtype)
    else:
        if win_size < 1 or win_size % 2 == 0:
            raise ValueError(f"win_size must be odd and positive, got {win_size}")
        w = torch.full((win_size,), 1.0 / win_size, device=x.device, dtype=x.dtype)
    k = w.numel()
    h, wd = x.shape[-2:]
    if h < k or wd < k:
        raise ValueError(f"images {tuple(x.shape[-2:])} are smaller than the {k}-pixel window")
    cov_norm = k * k / (k * k - 1) if use_sample_covariance else 1.0
    batch = x.shape[:-2]
    a = x.reshape(-1, 1, h, wd)  # (n, 1, h, w)
    b = ref.reshape(-1, 1, h, wd)
    ux, uy = _filter_valid(a, w), _filter_valid(b, w)
    vx = cov_norm * (_filter_valid(a * a, w) - ux * ux)
    vy = cov_norm * (_filter_valid(b * b, w) - uy * uy)
    vxy = cov_norm * (_filter_valid(a * b, w) - ux * uy)
    r = _data_range(ref, data_range).expand(batch).reshape(-1, 1, 1, 1)  # (n, 1, 1, 1)
    c1, c2 = (0.01 * r) ** 2, (0.03 * r) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    return s.mean(dim=(-3, -2, -1)).reshape(batch)


def _contingency(true: np.ndarray, pred: np.ndarray):
    true, pred = np.asarray(true).ravel(), np.asarray(pred).ravel()
    if true.shape != pred.shape:
        raise ValueError(f"label arrays differ in length: true {true.shape} vs pred {pred.shape}")
    if true.size == 0:
        raise ValueError("no labels given")
    t_lab, t_idx = np.unique(true, return_inverse=True)
    p_lab, p_idx = np.unique(pred, return_inverse=True)
    table = np.zeros((t_lab.size, p_lab.size), dtype=np.int64)  # (true classes, pred clusters)
    np.add.at(table, (t_idx, p_idx), 1)
    return table, t_lab, p_lab


def match_labels(true: np.ndarray, pred: np.ndarray) -> dict:
    """Map predicted labels to true labels maximising agreement (Hungarian on the contingency table).

    Returns ``{pred_label: true_label}``; when there are more predicted clusters than true
    classes, the unmatched predicted labels are absent from the mapping (they count as errors).
    """
    table, t_lab, p_lab = _contingency(true, pred)
    rows, cols = linear_sum_assignment(-table)
    return {p_lab[c].item(): t_lab[r].item() for r, c in zip(rows, cols, strict=True)}


def classification_scores(true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Accuracy, macro precision/recall/F1 after optimal label matching, NMI and ARI.

    Predictions are first relabelled with :func:`match_labels`. Precision, recall and F1 are
    computed per true class (0 when a class gets no prediction) and averaged over the true
    classes (macro). NMI (arithmetic normalisation) and ARI do not need the matching.
    """
    table, _, _ = _contingency(true, pred)
    rows, cols = linear_sum_assignment(-table)
    n = table.sum()
    tp = np.zeros(table.shape[0])
    n_pred = np.zeros(table.shape[0])  # items predicted as each true class after matching
    tp[rows] = table[rows, cols]
    n_pred[rows] = table[:, cols].sum(axis=0)
    n_true = table.sum(axis=1)
    precision = np.divide(tp, n_pred, out=np.zeros_like(tp), where=n_pred > 0)
    recall = tp / n_true
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    true_a, pred_a = np.asarray(true).ravel(), np.asarray(pred).ravel()
    return {
        "accuracy": float(tp.sum() / n),
        "precision": float(precision.mean()),
        "recall": float(recall.mean()),
        "f1": float(f1.mean()),
        "nmi": float(normalized_mutual_info_score(true_a, pred_a)),
        "ari": float(adjusted_rand_score(true_a, pred_a)),
    }


def image_scores(images: np.ndarray, clean: np.ndarray, chunk: int = 512) -> dict[str, float]:
    """Scores of ``images`` ``(n, d, d)`` against ``clean`` in the data's intensity units (every
    denoiser returns a clean-image estimate in its input's units): mean PSNR (dB, peak = each clean
    image's range) and SSIM; ``psnr_fitted_db``, the PSNR after normalising both per image (an
    affine fit, a diagnostic only); and ``spread_ratio``, how much the images differ from one
    another relative to the clean ones (mean over pixels of the standard deviation across images;
    0 when every output is the same image, which PSNR alone does not reveal)."""
    total_psnr = total_ssim = total_fitted = 0.0
    moments = np.zeros((2, 2) + images.shape[-2:])  # (images | clean, sum | sum of squares, d, d)
    for start in range(0, len(images), chunk):
        x = torch.tensor(images[start : start + chunk], dtype=torch.float32)  # (b, d, d), a copy
        ref = torch.tensor(clean[start : start + chunk], dtype=torch.float32)
        total_psnr += float(psnr(x, ref).sum())
        total_ssim += float(ssim(x, ref).sum())
        xn, refn = normalize_images(x), normalize_images(ref)
        total_fitted += float(psnr(xn, refn).sum())
        for i, t in enumerate((xn, refn)):
            moments[i] += np.stack([t.sum(0).double().numpy(), (t.double() ** 2).sum(0).numpy()])
    mean, mean_sq = moments[:, 0] / len(images), moments[:, 1] / len(images)  # (2, d, d) each
    spread = np.sqrt(np.clip(mean_sq - mean**2, 0, None)).mean(axis=(-2, -1))  # (2,)
    n = len(images)
    return {"psnr_db": round(total_psnr / n, 3), "ssim": round(total_ssim / n, 4),
            "psnr_fitted_db": round(total_fitted / n, 3), "spread_ratio": round(float(spread[0] / spread[1]), 4)}
