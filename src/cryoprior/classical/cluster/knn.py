"""Exact k-nearest neighbours with faiss (flat indexes, CPU).

Metrics:

- ``"euclidean"``: distances are Euclidean ``|x_i - x_j|`` (faiss works on their squares);
- ``"correlation"``: each row is centred and scaled to unit norm, so the inner product is the
  Pearson correlation ``r``; distances are ``1 - r`` in ``[0, 2]``. Invariant to a positive
  scale and an offset of each vector.

Ties between equal distances are broken by faiss (usually by index).
"""

from __future__ import annotations

import faiss
import numpy as np

METRICS = ("euclidean", "correlation")


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norm, np.finfo(np.float32).tiny), dtype=np.float32)


def knn(
    x,
    k: int,
    metric: str = "euclidean",
    exclude_self: bool = True,
    batch: int = 65536,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest rows of ``x`` ``(n, p)`` to each row, nearest first.

    ``exclude_self``: a row is not its own neighbour (its exact duplicates still can be).
    Queries run in batches of ``batch`` rows. Returns ``(distances (n, k) float32,
    indices (n, k) int64)``.
    """
    arr = np.asarray(x)
    if arr.ndim == 3:
        arr = arr.reshape(arr.shape[0], -1)  # (n, d*d)
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError(f"x must be (n, p), got shape {arr.shape}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    n = arr.shape[0]
    limit = n - 1 if exclude_self else n
    if not 1 <= k <= limit:
        raise ValueError(f"k must be in 1..{limit} for {n} rows (exclude_self={exclude_self}), got {k}")
    if metric == "correlation":
        data = _unit_rows(arr.astype(np.float32, copy=False))
        index = faiss.IndexFlatIP(data.shape[1])
    else:
        data = np.ascontiguousarray(arr, dtype=np.float32)
        index = faiss.IndexFlatL2(data.shape[1])
    index.add(data)
    extra = 1 if exclude_self else 0
    dist = np.empty((n, k), dtype=np.float32)
    idx = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, batch):
        stop = min(start + batch, n)
        d, i = index.search(data[start:stop], k + extra)  # (b, k + extra)
        if exclude_self:
            d, i = _drop_self(d, i, np.arange(start, stop))
        dist[start:stop], idx[start:stop] = d, i
    if metric == "correlation":
        dist = np.clip(1.0 - dist, 0.0, 2.0)
    else:
        dist = np.sqrt(np.maximum(dist, 0.0))
    return dist, idx


def _drop_self(d: np.ndarray, i: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own index from its ``k + 1`` hits (else the farthest hit)."""
    is_self = i == rows[:, None]  # (b, k + 1)
    drop = np.where(is_self.any(1), is_self.argmax(1), i.shape[1] - 1)  # (b,)
    keep = np.ones_like(is_self)
    keep[np.arange(len(rows)), drop] = False
    b, k1 = i.shape
    return d[keep].reshape(b, k1 - 1), i[keep].reshape(b, k1 - 1)
