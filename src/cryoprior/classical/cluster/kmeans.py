"""k-means with k-means++ seeding (scikit-learn's Lloyd iterations, several restarts).

Features are rows of ``x`` ``(n, p)``; the objective is the sum of squared Euclidean distances to
the assigned centres. Deterministic for a given ``seed``.
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans, kmeans_plusplus


def as_features(x) -> np.ndarray:
    """``(n, p)`` features or ``(n, d, d)`` images → C-contiguous float32 ``(n, p)``."""
    arr = np.asarray(x)
    if arr.ndim == 3:
        arr = arr.reshape(arr.shape[0], -1)  # (n, d*d)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"x must be (n, p) features or (n, d, d) images, got shape {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ValueError("x contains NaN or Inf")
    return arr


def check_k(k: int, n: int) -> int:
    """``k`` as an int in ``1..n`` (a ValueError that shows both otherwise)."""
    if int(k) != k or not 1 <= k <= n:
        raise ValueError(f"number of classes must be in 1..n = 1..{n}, got {k}")
    return int(k)


def squared_distances(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """``|x_i - c_j|^2`` for ``x`` ``(n, p)`` and ``centres`` ``(k, p)`` → ``(n, k)`` float64."""
    x64 = x.astype(np.float64, copy=False)
    c64 = centres.astype(np.float64, copy=False)
    d = (x64**2).sum(1)[:, None] - 2.0 * x64 @ c64.T + (c64**2).sum(1)[None, :]  # (n, k)
    return np.maximum(d, 0.0)


def kmeans_pp(x: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): ``k`` rows of ``x`` as ``(k, p)`` centres."""
    x = as_features(x)
    centres, _ = kmeans_plusplus(x, check_k(k, len(x)), random_state=seed)
    return centres


def kmeans(
    x, k: int, seed: int = 0, n_init: int = 10, max_iter: int = 300
) -> tuple[np.ndarray, np.ndarray]:
    """k-means++ initialised k-means, best of ``n_init`` restarts.

    ``x`` ``(n, p)`` or ``(n, d, d)``. Returns ``(labels (n,) int64 in 0..k-1, centres (k, p))``.
    """
    x = as_features(x)
    k = check_k(k, len(x))
    if n_init < 1:
        raise ValueError(f"n_init must be >= 1, got {n_init}")
    model = KMeans(k, init="k-means++", n_init=n_init, max_iter=max_iter, random_state=seed)
    labels = model.fit_predict(x)
    return labels.astype(np.int64), model.cluster_centers_.astype(np.float32)
