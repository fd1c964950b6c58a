"""Class averages: the mean image of each class, streamed over chunks if need be.

>>> sums, counts = class_sums(images, labels, k)          # doctest: +SKIP
>>> averages = averages_from_sums(sums, counts)           # (k, d, d); empty classes are zeros
"""

from __future__ import annotations

import numpy as np
from scipy import sparse


def _check(images: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise ValueError(
            f"expected images (n, d, d) and labels (n,): images.shape = {images.shape} "
            f"vs labels.shape = {labels.shape}"
        )
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if labels.size and (labels.min() < 0 or labels.max() >= k or not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(f"labels must be integers in 0..{k - 1}, got {labels.min()}..{labels.max()}")
    return images, labels


def class_sums(images, labels, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class sums ``(k, d, d)`` float64 and counts ``(k,)`` int64 of images ``(n, d, d)``."""
    images, labels = _check(images, labels, k)
    n, h, w = images.shape
    onehot = sparse.csr_matrix((np.ones(n), (labels, np.arange(n))), shape=(k, n))  # (k, n)
    sums = onehot @ images.reshape(n, h * w).astype(np.float64)  # (k, d*d)
    counts = np.bincount(labels, minlength=k).astype(np.int64)
    return np.asarray(sums).reshape(k, h, w), counts


def averages_from_sums(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Means ``(k, d, d)`` float32 from :func:`class_sums` (accumulated); zeros where a count is 0."""
    c = np.maximum(counts, 1).astype(np.float64)[:, None, None]
    return (sums / c).astype(np.float32)


def class_averages(images, labels, k: int) -> np.ndarray:
    """Mean image of each class ``0..k-1``: images ``(n, d, d)``, labels ``(n,)`` → ``(k, d, d)``.

    An empty class gives a zero image.
    """
    return averages_from_sums(*class_sums(images, labels, k))
