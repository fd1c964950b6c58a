"""Low-dimensional embeddings to cluster in: PCA and Isomap (scikit-learn).

The learned embedding (the latent code of a convolutional autoencoder, "CAE + k-means") trains a
network, so it lives with the training loops in :mod:`cryoprior.nn.cae`.
"""

from __future__ import annotations

import numpy as np
from sklearn.decomposition import PCA
from sklearn.manifold import Isomap

from cryoprior.classical.cluster.kmeans import as_features


def pca(x, n_components: int = 20, seed: int = 0, whiten: bool = False) -> np.ndarray:
    """Project ``x`` ``(n, p)`` or ``(n, d, d)`` on its first principal components.

    ``n_components`` is capped at ``min(n, p)``; randomised SVD (fixed by ``seed``) when that is
    much smaller than the data. Returns ``(n, c)`` float32 scores, centred.
    """
    x = as_features(x)
    c = min(int(n_components), *x.shape)
    if c < 1:
        raise ValueError(f"n_components must be >= 1, got {n_components}")
    solver = "randomized" if c < 0.5 * min(x.shape) else "full"
    model = PCA(n_components=c, svd_solver=solver, whiten=whiten, random_state=seed)
    return model.fit_transform(x).astype(np.float32)


def isomap(
    x,
    n_components: int = 10,
    n_neighbors: int = 10,
    pca_components: int | None = 50,
    max_samples: int = 5000,
    seed: int = 0,
) -> np.ndarray:
    """Isomap (Tenenbaum et al. 2000) coordinates ``(n, c)`` float32 of ``x`` ``(n, p)``/``(n, d, d)``.

    Geodesic distances along a ``n_neighbors`` graph, embedded by classical MDS. The data are
    first reduced to ``pca_components`` principal components (None: not reduced), which removes
    most of the noise the neighbour graph would otherwise follow. Isomap costs ``n^2`` memory:
    above ``max_samples`` rows it is fitted on a random subset (``seed``) and the rest are placed
    with Isomap's out-of-sample ``transform``.
    """
    x = as_features(x)
    n = len(x)
    if pca_components is not None and pca_components < x.shape[1]:
        x = pca(x, pca_components, seed)
    n_neighbors = min(int(n_neighbors), n - 1)
    c = min(int(n_components), n - 1, x.shape[1])
    if n_neighbors < 1 or c < 1:
        raise ValueError(f"isomap needs at least 2 samples and n_components >= 1, got n = {n}")
    model = Isomap(n_neighbors=n_neighbors, n_components=c)
    if n <= max_samples:
        return model.fit_transform(x).astype(np.float32)
    sub = np.random.default_rng(seed).choice(n, size=max_samples, replace=False)
    model.fit(x[sub])
    return model.transform(x).astype(np.float32)
