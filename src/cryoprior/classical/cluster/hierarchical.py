"""Agglomerative clustering with Ward linkage (scikit-learn).

Ward merges, at each step, the two clusters whose union least increases the within-cluster sum
of squares. Its memory and time grow as ``n^2``; above ``max_samples`` rows it is fitted on a
random subset of that size and every row is then assigned to the nearest subset-class mean
(documented approximation; exact Ward on the subset).
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import AgglomerativeClustering

from cryoprior.classical.cluster.kmeans import as_features, check_k, squared_distances


def ward(x, k: int, seed: int = 0, max_samples: int = 10_000) -> np.ndarray:
    """Ward-linkage labels ``(n,)`` int64 in ``0..k-1`` for ``x`` ``(n, p)`` or ``(n, d, d)``.

    Deterministic; ``seed`` only picks the subset when ``n > max_samples``.
    """
    x = as_features(x)
    n = len(x)
    k = check_k(k, n)
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    if n <= max_samples:
        return AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(x).astype(np.int64)
    if max_samples < k:
        raise ValueError(f"max_samples ({max_samples}) must be >= k ({k})")
    rng = np.random.default_rng(seed)
    sub = np.sort(rng.choice(n, size=max_samples, replace=False))
    sub_labels = AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(x[sub])
    centres = np.stack([x[sub][sub_labels == j].mean(axis=0) for j in range(k)])  # (k, p)
    labels = np.empty(n, dtype=np.int64)
    step = max(1, (1 << 26) // (8 * k + 8 * x.shape[1]))
    for start in range(0, n, step):
        labels[start : start + step] = squared_distances(x[start : start + step], centres).argmin(1)
    labels[sub] = sub_labels  # the fitted rows keep their Ward labels
    return labels
