"""Balanced-Size k-means++ (BSK-means++): k-means with clusters of equal size.

Seeded with k-means++, then Lloyd-like rounds in which the assignment step is a *balanced*
assignment: each of the ``k`` clusters gets ``floor(n/k)`` or ``ceil(n/k)`` samples (``n mod k``
of them the larger size), at the least total squared distance to the centres. The centre step is
the usual mean. Iterates until the labels stop changing.

``size_tolerance`` τ relaxes the sizes to the bounds ``[floor((1-τ) n/k), ceil((1+τ) n/k)]``
(:func:`size_bounds`): τ = 0 is the paper's exact balance; τ = 0.5 still keeps every class at
least half the mean size (the degenerate tiny classes BSK exists to prevent), yet lets a real
70/30 split of two classes stand instead of forcing it to 50/50.

The assignment is a transportation problem with ``k`` sinks of bounded capacity, solved exactly
by cycle cancelling on the graph of clusters plus one slack node ``s``: an edge ``a → b`` costs
the cheapest move of one sample from ``a`` to ``b`` (``cost[i, b] - cost[i, a]``); ``s → a``
(cost 0) exists while ``a`` is above its lower bound, ``b → s`` while ``b`` is below its upper
bound. A negative cycle is an improving exchange (through ``s``: a path that moves samples from
one cluster to another). Starting from a greedy "largest regret first" balanced assignment, or
from the previous round's labels, few exchanges are needed, and each costs ``O(nk + k^3)``.

:func:`reliable_mask` then keeps, within each cluster, the samples nearest to its centre.
:func:`ssnr_bsk` is the same loop on images with centres regularised by their half-set SSNR.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from cryoprior.classical.cluster.kmeans import as_features, check_k, kmeans_pp, squared_distances

log = logging.getLogger(__name__)


def balanced_sizes(n: int, k: int) -> tuple[int, int, int]:
    """``(lo, hi, r)``: ``r = n mod k`` clusters of ``hi`` samples, the others ``lo = n // k``."""
    lo, r = divmod(n, k)
    return lo, lo + (r > 0), r


def size_bounds(n: int, k: int, size_tolerance: float = 0.0) -> tuple[int, int]:
    """``(lower, upper)`` cluster sizes allowed: ``floor((1-τ) n/k)`` and ``ceil((1+τ) n/k)``
    (τ = ``size_tolerance`` in [0, 1]); τ = 0 gives ``floor(n/k)``, ``ceil(n/k)``."""
    if not 0 <= size_tolerance <= 1:
        raise ValueError(f"size_tolerance must be in [0, 1], got {size_tolerance}")
    lo, hi, _ = balanced_sizes(n, k)
    mean = n / k
    return min(lo, math.floor((1 - size_tolerance) * mean + 1e-9)), min(n, max(hi, math.ceil((1 + size_tolerance) * mean - 1e-9)))


def _within(labels: np.ndarray, k: int, bounds: tuple[int, int]) -> bool:
    if labels.min() < 0 or labels.max() >= k:
        return False
    sizes = np.bincount(labels, minlength=k)
    return bool((sizes >= bounds[0]).all() and (sizes <= bounds[1]).all())


def _greedy(cost: np.ndarray) -> np.ndarray:
    """Balanced labels: samples by decreasing regret (2nd best − best), each to its best open cluster."""
    n, k = cost.shape
    lo, hi, r = balanced_sizes(n, k)
    prefs = np.argsort(cost, axis=1)  # (n, k)
    part = np.partition(cost, 1, axis=1) if k > 1 else np.zeros((n, 2))
    order = np.argsort(-(part[:, 1] - part[:, 0]), kind="stable")
    sizes = np.zeros(k, dtype=np.int64)
    big_left = r  # how many clusters may still grow to hi
    labels = np.empty(n, dtype=np.int64)
    for i in order:
        for j in prefs[i]:
            if sizes[j] < lo or (sizes[j] == lo and big_left > 0 and hi > lo):
                if sizes[j] == lo:
                    big_left -= 1
                sizes[j] += 1
                labels[i] = j
                break
    return labels


def _move_graph(cost: np.ndarray, labels: np.ndarray, bounds: tuple[int, int]) -> np.ndarray:
    """Edge weights ``(k+1, k+1)``: the cheapest move of one sample from ``a`` to ``b``; node ``k``
    links the clusters above their lower bound (may give one away) to those below their upper
    bound (may take one)."""
    n, k = cost.shape
    lo, hi = bounds
    order = np.argsort(labels, kind="stable")
    sizes = np.bincount(labels, minlength=k)
    delta = cost[order] - cost[order, labels[order]][:, None]  # (n, k): moving i to each cluster
    weights = np.full((k + 1, k + 1), np.inf)
    present = np.flatnonzero(sizes)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])[present]
    weights[present, :k] = np.minimum.reduceat(delta, starts, axis=0)  # (clusters, k)
    weights[np.arange(k), np.arange(k)] = np.inf
    weights[k, :k] = np.where(sizes > lo, 0.0, np.inf)  # may give one away
    weights[:k, k] = np.where(sizes < hi, 0.0, np.inf)  # may take one
    return weights


def _negative_cycle(weights: np.ndarray, tol: float) -> list[int] | None:
    """Nodes ``[c0, c1, ...]`` of a cycle ``c0 → c1 → ... → c0`` of weight < −tol (Bellman-Ford)."""
    m = len(weights)
    dist = np.zeros(m)
    pred = np.full(m, -1, dtype=np.int64)
    last = -1
    for _ in range(m):
        cand = dist[:, None] + weights  # (m, m): via u to v
        u = cand.argmin(axis=0)
        best = cand[u, np.arange(m)]
        better = best < dist - tol
        if not better.any():
            return None
        dist[better], pred[better] = best[better], u[better]
        last = int(np.flatnonzero(better)[0])
    v = last
    for _ in range(m):
        v = int(pred[v])
    cycle = [v]
    while (u := int(pred[cycle[-1]])) != v:
        cycle.append(u)
    cycle.reverse()  # pred points backwards along the edges
    total = sum(weights[a, b] for a, b in zip(cycle, cycle[1:] + cycle[:1]))
    return cycle if total < -tol else None


def _cancel(cost: np.ndarray, labels: np.ndarray, cycle: list[int], tol: float, bounds: tuple[int, int]) -> None:
    """Move samples along ``cycle`` in place: the t-th cheapest mover of every edge together,
    for every t whose exchange (the sum of the t-th moves' costs) is still negative. A path
    through node ``k`` changes two cluster sizes, so it moves no more than their bounds allow."""
    k = cost.shape[1]
    edges = [(a, b) for a, b in zip(cycle, cycle[1:] + cycle[:1]) if a < k and b < k]
    movers, gains = [], []
    for a, b in edges:
        members = np.flatnonzero(labels == a)
        delta = cost[members, b] - cost[members, a]
        order = np.argsort(delta, kind="stable")
        movers.append(members[order])
        gains.append(delta[order])
    t = min(len(g) for g in gains)
    total = np.sum([g[:t] for g in gains], axis=0)  # (t,) non-decreasing
    count = max(1, int(np.searchsorted(total, -tol)))  # the first is negative by construction
    if k in cycle:  # s -> giver -> ... -> taker -> s
        i = cycle.index(k)
        giver, taker = cycle[(i + 1) % len(cycle)], cycle[i - 1]
        sizes = np.bincount(labels, minlength=k)
        count = max(1, min(count, int(sizes[giver] - bounds[0]), int(bounds[1] - sizes[taker])))
    for (_, b), m in zip(edges, movers):
        labels[m[:count]] = b


def balanced_assignment(cost, labels=None, max_exchanges: int | None = None, size_tolerance: float = 0.0) -> np.ndarray:
    """Labels ``(n,)`` minimising ``sum(cost[i, labels[i]])`` with cluster sizes within
    :func:`size_bounds` (``size_tolerance`` 0: balanced, ``floor(n/k)`` or ``ceil(n/k)``).

    ``cost`` ``(n, k)``; ``labels``: a starting assignment within the bounds (e.g. the previous
    round's), else a greedy balanced one is built. Exact unless ``max_exchanges`` (default
    ``10 n``) runs out, which is logged.
    """
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2 or not np.isfinite(cost).all():
        raise ValueError(f"cost must be a finite (n, k) array, got shape {cost.shape}")
    n, k = cost.shape
    check_k(k, n)
    bounds = size_bounds(n, k, size_tolerance)
    if labels is None or not _within(np.asarray(labels), k, bounds):
        labels = _greedy(cost)
    labels = np.array(labels, dtype=np.int64)
    if k == 1:
        return labels
    tol = 1e-9 * max(1.0, float(np.abs(cost).max()))
    limit = 10 * n if max_exchanges is None else max_exchanges
    for _ in range(limit):
        weights = _move_graph(cost, labels, bounds)
        cycle = _negative_cycle(weights, tol)
        if cycle is None:
            return labels
        _cancel(cost, labels, cycle, tol, bounds)
    log.warning("balanced assignment stopped after %d exchanges before reaching the optimum", limit)
    return labels


def bsk_means(
    x, k: int, seed: int = 0, n_init: int = 3, max_iter: int = 100, size_tolerance: float = 0.0,
    init_labels=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Balanced-Size k-means++ on ``x`` ``(n, p)`` or ``(n, d, d)``, best of ``n_init`` seedings.

    Returns ``(labels (n,) int64 in 0..k-1, centres (k, p) float32)``; every cluster holds
    ``floor(n/k)`` or ``ceil(n/k)`` samples (``size_tolerance`` τ: between ``floor((1-τ) n/k)``
    and ``ceil((1+τ) n/k)``, :func:`size_bounds`). ``init_labels`` ``(n,)`` (every class present):
    one run started from the means of ``x`` under these labels instead of the k-means++ seedings.
    """
    x = as_features(x)
    k = check_k(k, len(x))
    if n_init < 1:
        raise ValueError(f"n_init must be >= 1, got {n_init}")
    if init_labels is not None:
        init_labels = np.asarray(init_labels)
        if init_labels.shape != (len(x),) or np.bincount(init_labels, minlength=k)[:k].min() == 0 or init_labels.max() >= k:
            raise ValueError("init_labels must be (n,) labels in 0..k-1 with every class present")
        n_init = 1
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for run in range(n_init):
        if init_labels is None:
            centres = kmeans_pp(x, k, seed + run)
        else:
            centres = np.stack([x[init_labels == j].mean(axis=0) for j in range(k)])
        labels = None
        for _ in range(max_iter):
            cost = squared_distances(x, centres)  # (n, k)
            new = balanced_assignment(cost, labels, size_tolerance=size_tolerance)
            converged = labels is not None and np.array_equal(new, labels)
            labels = new
            centres = np.stack([x[labels == j].mean(axis=0) for j in range(k)])  # (k, p)
            if converged:
                break
        objective = float(squared_distances(x, centres)[np.arange(len(x)), labels].sum())
        if best is None or objective < best[0]:
            best = (objective, labels, centres.astype(np.float32))
    assert best is not None
    return best[1], best[2]


def ssnr_bsk(images, k: int, labels, size_tolerance: float = 0.0, max_iter: int = 30
             ) -> tuple[np.ndarray, np.ndarray]:
    """BSK-means on images ``(n, d, d)`` started from ``labels`` ``(n,)``, whose centres are the class
    averages regularised per shell by their half-set spectral SNR (``averages.ssnr_wiener_averages``
    with ctf ≡ 1, as RELION regularises its 2D references): the distance to a centre then weighs
    each frequency by that class's SSNR (a matched filter), where a fixed low-pass weighs all alike.

    Returns ``(labels (n,) int64, centres (k, d*d) float32)``; sizes within :func:`size_bounds`.
    """
    from cryoprior.classical.cluster.averages import ssnr_averages

    images = np.asarray(images, dtype=np.float32)
    x = images.reshape(len(images), -1).astype(np.float64)
    k = check_k(k, len(x))
    labels = np.asarray(labels, dtype=np.int64)
    for _ in range(max_iter):
        centres = ssnr_averages(images, labels, k).reshape(k, -1)
        new = balanced_assignment(squared_distances(x, centres), labels, size_tolerance=size_tolerance)
        done = np.array_equal(new, labels)
        labels = new
        if done:
            break
    return labels, centres.astype(np.float32)


def reliable_mask(x, labels, centres, fraction: float) -> np.ndarray:
    """Within each cluster, the ``ceil(fraction * size)`` samples nearest its centre. → bool ``(n,)``.

    ``x`` ``(n, p)``/``(n, d, d)``, ``labels`` ``(n,)`` in ``0..k-1``, ``centres`` ``(k, p)``,
    ``fraction`` in ``(0, 1]``. Ties at the cut are broken by index.
    """
    x = as_features(x)
    labels = np.asarray(labels)
    centres = np.asarray(centres, dtype=np.float32).reshape(len(centres), -1)
    if labels.shape != (len(x),) or centres.shape[1] != x.shape[1]:
        raise ValueError(
            f"shapes disagree: x {x.shape}, labels {labels.shape}, centres {centres.shape}"
        )
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if labels.min() < 0 or labels.max() >= len(centres):
        raise ValueError(f"labels must be in 0..{len(centres) - 1}")
    diff = x - centres[labels]  # (n, p)
    dist = np.einsum("ij,ij->i", diff, diff)
    mask = np.zeros(len(x), dtype=bool)
    for j in range(len(centres)):
        members = np.flatnonzero(labels == j)
        keep = math.ceil(fraction * members.size)
        mask[members[np.argsort(dist[members], kind="stable")[:keep]]] = True
    return mask
