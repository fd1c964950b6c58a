"""k-means with in-plane alignment: reference-free 2D classification of rotated particles.

Plain k-means compares images pixel by pixel, so two particles in the same view but at different
in-plane angles look as different as two views; RELION's and cryoSPARC's 2D classification align
every particle to every class average instead. ``align_kmeans`` does the hard-assignment version
of that (no shifts, no CTF): the distance of an image to a class is the smallest squared distance
to the class average rotated through ``n_angles`` in-plane angles; each average is the mean of its
images rotated back by their best angle. Images and averages are seen through a soft circular
mask, so that rotation moves no pixel in or out of the compared region.

>>> labels, angles, averages = align_kmeans(images, k=4, seed=0)   # doctest: +SKIP
"""

from __future__ import annotations

import math

import numpy as np
import torch

from cryoprior.core.rotations import rotate_images

__all__ = ["align_kmeans"]


def _mask(d: int) -> torch.Tensor:
    """Soft circular mask ``(d, d)``: 1 inside radius 0.4 d, a cosine edge to 0.5 d."""
    c = (d - 1) / 2
    y, x = torch.meshgrid(torch.arange(d) - c, torch.arange(d) - c, indexing="ij")
    r = torch.hypot(y, x) / d
    edge = torch.clamp((r - 0.4) / 0.1, 0, 1)
    return 0.5 * (1 + torch.cos(math.pi * edge))


def _rotations(images: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """``(k, d, d)`` images → ``(k, R, d, d)``: each rotated by every one of ``angles`` ``(R,)``."""
    k, d, _ = images.shape
    r = len(angles)
    rep = images[:, None].expand(k, r, d, d).reshape(k * r, 1, d, d)
    return rotate_images(rep, angles.repeat(k)).reshape(k, r, d, d)


def _costs(x: torch.Tensor, centres: torch.Tensor, angles: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Squared distances ``(n, k, R)`` of masked images ``x`` ``(n, d*d)`` to every rotated centre."""
    t = (_rotations(centres, angles) * mask).flatten(2)  # (k, R, d*d)
    cross = torch.einsum("np,krp->nkr", x, t)
    return (x * x).sum(1)[:, None, None] + (t * t).sum(2)[None] - 2 * cross


def _update(images: torch.Tensor, labels: torch.Tensor, best: torch.Tensor, k: int) -> torch.Tensor:
    """Class averages ``(k, d, d)`` of the images rotated back by their best angles."""
    back = rotate_images(images[:, None], -best)[:, 0]
    sums = torch.zeros((k, *images.shape[1:]), dtype=images.dtype).index_add_(0, labels, back)
    counts = torch.bincount(labels, minlength=k).clamp(min=1).to(images.dtype)
    return sums / counts[:, None, None]


def _seed_centres(images, x, k, angles, mask, gen) -> torch.Tensor:
    """k-means++ seeding under the aligned distance."""
    n = len(images)
    chosen = [int(torch.randint(n, (1,), generator=gen))]
    for _ in range(1, k):
        d2 = _costs(x, images[chosen], angles, mask).amin(dim=(1, 2)).clamp(min=0).double()
        if float(d2.sum()) <= 0:
            chosen.append(int(torch.randint(n, (1,), generator=gen)))
        else:
            chosen.append(int(torch.multinomial(d2 / d2.sum(), 1, generator=gen)))
    return images[chosen].clone()


def _run(images, x, k, angles, mask, gen, max_iter):
    centres = _seed_centres(images, x, k, angles, mask, gen)
    labels = best = None
    for _ in range(max_iter):
        cost = _costs(x, centres, angles, mask)  # (n, k, R)
        per_class, arg = cost.min(dim=2)  # (n, k)
        new = per_class.argmin(dim=1)
        new_best = angles[arg.gather(1, new[:, None])[:, 0]]
        counts = torch.bincount(new, minlength=k)
        for c in torch.nonzero(counts == 0).flatten().tolist():  # empty class: the worst-fitting image
            far = int(per_class.gather(1, new[:, None])[:, 0].argmax())
            new[far], new_best[far] = c, 0.0
        if labels is not None and torch.equal(new, labels) and torch.equal(new_best, best):
            break
        labels, best = new, new_best
        centres = _update(images, labels, best, k)
    total = float(_costs(x, centres, angles, mask).amin(dim=2).gather(1, labels[:, None]).sum())
    return total, labels, best, centres


def align_kmeans(
    images, k: int, seed: int = 0, n_angles: int = 36, n_init: int = 3, max_iter: int = 30
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cluster images ``(n, d, d)`` into ``k`` classes up to in-plane rotation.

    Returns ``(labels (n,) int64, angles (n,) radians, averages (k, d, d))``: rotating image
    ``i`` by ``-angles[i]`` aligns it with ``averages[labels[i]]``. Best (lowest total aligned
    distance) of ``n_init`` k-means++-seeded runs; deterministic for a given ``seed``.
    """
    images = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"align_kmeans needs square images (n, d, d), got {tuple(images.shape)}")
    if not 1 <= k <= len(images):
        raise ValueError(f"k must be in 1..{len(images)}, got {k}")
    mask = _mask(images.shape[-1])
    x = (images * mask).flatten(1)
    angles = torch.arange(n_angles, dtype=torch.float32) * (2 * math.pi / n_angles)
    gen = torch.Generator().manual_seed(seed)
    best = min((_run(images, x, k, angles, mask, gen, max_iter) for _ in range(n_init)), key=lambda r: r[0])
    _, labels, rot, centres = best
    return labels.numpy().astype(np.int64), rot.numpy().astype(np.float64), centres.numpy()
