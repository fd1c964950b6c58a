"""Clustering of particle images: k-means++, Ward, PCA/Isomap embeddings, BSK-means++, k-means with
in-plane alignment, k-NN, averages.

>>> labels = cluster(images, k=4, method="pca-kmeans", seed=0)     # doctest: +SKIP
>>> averages = class_averages(images, labels, 4)                    # (4, d, d)

``cluster`` clusters the rows it is given as they are; callers that cluster images normalise
them first (``cryoprior.core.filters.normalize_images``: zero mean, unit variance per image),
as ``cryoprior classify`` does.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from cryoprior.classical.cluster.align import align_kmeans
from cryoprior.classical.cluster.averages import averages_from_sums, class_averages, class_sums
from cryoprior.classical.cluster.bsk import balanced_assignment, bsk_means, reliable_mask
from cryoprior.classical.cluster.embed import isomap, pca
from cryoprior.classical.cluster.hierarchical import ward
from cryoprior.classical.cluster.kmeans import as_features, check_k, kmeans, kmeans_pp
from cryoprior.classical.cluster.knn import knn


def _kmeans(x, k, seed, n_init=10, max_iter=300):
    return kmeans(x, k, seed, n_init=n_init, max_iter=max_iter)[0]


def _hc(x, k, seed, max_samples=10_000):
    return ward(x, k, seed, max_samples=max_samples)


def _pca_kmeans(x, k, seed, n_components=20, n_init=10):
    return kmeans(pca(x, n_components, seed), k, seed, n_init=n_init)[0]


def _isomap_kmeans(x, k, seed, n_components=10, n_neighbors=10, pca_components=50, n_init=10):
    emb = isomap(x, n_components, n_neighbors, pca_components, seed=seed)
    return kmeans(emb, k, seed, n_init=n_init)[0]


def _bsk(x, k, seed, n_init=3, max_iter=100):
    return bsk_means(x, k, seed, n_init=n_init, max_iter=max_iter)[0]


def _align_kmeans(x, k, seed, n_angles=36, max_shift=0, n_init=3):
    d = math.isqrt(x.shape[1])
    if d * d != x.shape[1]:
        raise ValueError(f"align-kmeans needs square images, got rows of {x.shape[1]} values")
    return align_kmeans(x.reshape(len(x), d, d), k, seed, n_angles=n_angles, max_shift=max_shift, n_init=n_init)[0]


#: method name -> function(x, k, seed, **kw) -> labels
METHODS: dict[str, Callable[..., np.ndarray]] = {
    "kmeans": _kmeans,
    "hc": _hc,
    "pca-kmeans": _pca_kmeans,
    "isomap-kmeans": _isomap_kmeans,
    "bsk": _bsk,
    "align-kmeans": _align_kmeans,
}


def cluster(x, k: int, method: str, seed: int = 0, **kw) -> np.ndarray:
    """Labels ``(n,)`` int64 in ``0..k-1`` for ``x``: ``(n, p)`` features or ``(n, d, d)`` images.

    Methods (keyword options in brackets):

    - ``"kmeans"``: k-means++ seeding, best of ``n_init`` (10) runs [n_init, max_iter];
    - ``"hc"``: agglomerative, Ward linkage [max_samples];
    - ``"pca-kmeans"``: k-means on the first ``n_components`` (20) principal components
      [n_components, n_init];
    - ``"isomap-kmeans"``: k-means on a ``n_components`` (10) Isomap embedding built on a
      ``n_neighbors`` (10) graph after PCA to ``pca_components`` (50)
      [n_components, n_neighbors, pca_components, n_init];
    - ``"bsk"``: Balanced-Size k-means++, clusters of equal size (±1) [n_init, max_iter];
    - ``"align-kmeans"``: k-means up to in-plane rotation, rows read as square images
      (``cluster.align``) [n_angles, max_shift, n_init].

    Deterministic for a given ``seed``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown clustering method {method!r}; choose from {', '.join(METHODS)}")
    x = as_features(x)
    k = check_k(k, len(x))
    return np.asarray(METHODS[method](x, k, seed, **kw), dtype=np.int64)


__all__ = [
    "METHODS",
    "align_kmeans",
    "as_features",
    "averages_from_sums",
    "balanced_assignment",
    "bsk_means",
    "check_k",
    "class_averages",
    "class_sums",
    "cluster",
    "isomap",
    "kmeans",
    "kmeans_pp",
    "knn",
    "pca",
    "reliable_mask",
    "ward",
]
