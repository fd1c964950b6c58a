"""k-means with in-plane alignment: reference-free 2D classification of rotated particles.

Plain k-means compares images pixel by pixel, so two particles in the same view but at different
in-plane angles look as different as two views; RELION's and cryoSPARC's 2D classification align
every particle to every class average instead. ``align_kmeans`` does the hard-assignment version
of that (no CTF): the distance of an image to a class is the smallest squared distance to the
class average rotated through ``n_angles`` in-plane angles (and, with ``max_shift``, moved by every
integer shift up to that many pixels); each average is the mean of its
images moved and rotated back by their best shift and angle. Images and averages are seen
through a soft circular mask, so that rotation moves no pixel in or out of the compared region.

>>> labels, angles, shifts, averages = align_kmeans(images, k=4, max_shift=3, seed=0)   # doctest: +SKIP
"""

from __future__ import annotations

import math

import numpy as np
import torch

from cryoprior.core.rotations import rotate_images

__all__ = ["align_kmeans", "to_class_frame"]


def alignment_mask(d: int) -> torch.Tensor:
    """Soft circular mask ``(d, d)``: 1 inside radius 0.4 d, a cosine edge to 0.5 d."""
    c = (d - 1) / 2
    y, x = torch.meshgrid(torch.arange(d) - c, torch.arange(d) - c, indexing="ij")
    r = torch.hypot(y, x) / d
    edge = torch.clamp((r - 0.4) / 0.1, 0, 1)
    return 0.5 * (1 + torch.cos(math.pi * edge))


def rotated_copies(images: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """``(k, d, d)`` images → ``(k, R, d, d)``: each rotated by every one of ``angles`` ``(R,)``."""
    k, d, _ = images.shape
    r = len(angles)
    rep = images[:, None].expand(k, r, d, d).reshape(k * r, 1, d, d)
    return rotate_images(rep, angles.repeat(k)).reshape(k, r, d, d)


def aligned_costs(x: torch.Tensor, centres: torch.Tensor, angles: torch.Tensor, mask: torch.Tensor, max_shift: int = 0,
           chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Aligned squared distances of masked images ``x`` ``(n, d, d)`` to every centre.

    Returns ``(cost (n, k), angle index (n, k), shift (n, k, 2) = (dx, dy) px)``: the smallest
    ``|x - roll(rotate(centre, angle), shift)|²`` over the angles and the integer shifts up to
    ``max_shift`` pixels per axis. One matrix product per shift (images rolled by it against all
    rotated centres): for a window of a few pixels this beats a full FFT cross-correlation, which
    computes every one of the d² shifts (docs/benchmarks.md, align-kmeans).
    """
    n, d, _ = x.shape
    t = rotated_copies(centres, angles) * mask  # (k, R, d, d)
    k, r = t.shape[:2]
    tt = t.reshape(k * r, d * d)
    tn = (tt * tt).sum(1)  # (k R,); a circular shift keeps it
    best = torch.full((n, k), math.inf)
    rot = torch.zeros((n, k), dtype=torch.long)
    shift = torch.zeros((n, k, 2), dtype=torch.long)
    for s in range(0, n, chunk):
        xc = x[s : s + chunk]
        xn = (xc * xc).sum((1, 2))[:, None]
        for dy in range(-max_shift, max_shift + 1):
            for dx in range(-max_shift, max_shift + 1):
                rolled = torch.roll(xc, (-dy, -dx), dims=(1, 2)).reshape(len(xc), -1)  # x(q + shift)
                cost = (xn + tn - 2 * rolled @ tt.T).reshape(len(xc), k, r)
                value, arg = cost.min(dim=2)
                better = value < best[s : s + chunk]
                best[s : s + chunk] = torch.where(better, value, best[s : s + chunk])
                rot[s : s + chunk][better] = arg[better]
                shift[s : s + chunk][better] = torch.tensor([dx, dy])
    return best, rot, shift


def to_class_frame(images, angles, shifts) -> torch.Tensor:
    """Images ``(n, d, d)`` moved back by their ``shifts`` ``(n, 2)`` (dx, dy px) and rotated back
    by their ``angles`` ``(n,)`` (radians): the inverse of the poses :func:`align_kmeans` returns,
    which bring each image into the frame of its class average."""
    images = torch.as_tensor(images, dtype=torch.float32)
    angles = torch.as_tensor(angles, dtype=torch.float32)
    moved = [torch.roll(im, (-int(dy), -int(dx)), dims=(0, 1)) for im, (dx, dy) in zip(images, torch.as_tensor(shifts).tolist())]
    return rotate_images(torch.stack(moved)[:, None], -angles)[:, 0]


def aligned_averages(images: torch.Tensor, labels: torch.Tensor, angle: torch.Tensor, shift: torch.Tensor, k: int,
            centre: bool) -> torch.Tensor:
    """Class averages ``(k, d, d)`` of the images in their class's frame (then re-centred when
    ``centre``)."""
    back = to_class_frame(images, angle, shift)
    sums = torch.zeros((k, *images.shape[1:]), dtype=images.dtype).index_add_(0, labels, back)
    counts = torch.bincount(labels, minlength=k).clamp(min=1).to(images.dtype)
    averages = sums / counts[:, None, None]
    return centred_averages(averages) if centre else averages


def centred_averages(averages: torch.Tensor) -> torch.Tensor:
    """Each average rolled so that the centre of mass of its positive part is at the box centre
    (as RELION's ``--center_classes``): with a shift search the references could drift out of
    the mask otherwise."""
    d = averages.shape[-1]
    grid = torch.arange(d, dtype=averages.dtype) - d // 2
    out = []
    for a in averages:
        w = a.clamp(min=0)
        total = float(w.sum())
        if total <= 0:
            out.append(a)
            continue
        cy, cx = float((w.sum(1) * grid).sum()) / total, float((w.sum(0) * grid).sum()) / total
        out.append(torch.roll(a, (-round(cy), -round(cx)), dims=(0, 1)))
    return torch.stack(out)


def _seed_centres(images, x, k, angles, mask, max_shift, gen) -> torch.Tensor:
    """k-means++ seeding under the aligned distance."""
    n = len(images)
    chosen = [int(torch.randint(n, (1,), generator=gen))]
    for _ in range(1, k):
        d2 = aligned_costs(x, images[chosen], angles, mask, max_shift)[0].amin(dim=1).clamp(min=0).double()
        if float(d2.sum()) <= 0:
            chosen.append(int(torch.randint(n, (1,), generator=gen)))
        else:
            chosen.append(int(torch.multinomial(d2 / d2.sum(), 1, generator=gen)))
    return images[chosen].clone()


def _run(images, x, k, angles, mask, max_shift, gen, max_iter, tol):
    centres = _seed_centres(images, x, k, angles, mask, max_shift, gen)
    labels = None
    for it in range(max_iter + 1):
        cost, rot, shift = aligned_costs(x, centres, angles, mask, max_shift)
        new = cost.argmin(dim=1)
        for c in torch.nonzero(torch.bincount(new, minlength=k) == 0).flatten().tolist():  # empty: worst-fitting image
            new[int(cost.gather(1, new[:, None])[:, 0].argmax())] = c
        pick = new[:, None]
        new_rot, new_shift = rot.gather(1, pick)[:, 0], shift[torch.arange(len(new)), new]
        # converged when (nearly) no particle changes class; poses keep trading integer shifts
        # and neighbouring angles between near-equal costs, so they are not waited for
        done = it == max_iter or (labels is not None and int((new != labels).sum()) <= tol * len(new))
        labels, best_rot, best_shift = new, new_rot, new_shift
        if done:
            break
        centres = aligned_averages(images, labels, angles[best_rot], best_shift, k, centre=max_shift > 0)
    total = float(cost.gather(1, labels[:, None]).sum())  # of the poses against the returned centres
    return total, labels, angles[best_rot], best_shift, centres


def align_kmeans(
    images, k: int, seed: int = 0, n_angles: int = 36, max_shift: int = 0, n_init: int = 3, max_iter: int = 30,
    tol: float = 0.002,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cluster images ``(n, d, d)`` into ``k`` classes up to in-plane rotation (and, with
    ``max_shift`` > 0, integer translations of up to that many pixels per axis).

    Returns ``(labels (n,) int64, angles (n,) radians, shifts (n, 2) int (dx, dy) px,
    averages (k, d, d))``: image ``i`` is ``averages[labels[i]]`` rotated by ``angles[i]``
    (``core.rotations.rotate_images``) then moved by ``shifts[i]``. Best (lowest total aligned
    distance) of ``n_init`` k-means++-seeded runs, each stopped when at most a fraction ``tol`` of
    the particles changes class (or after ``max_iter`` iterations); deterministic for a given
    ``seed``.
    """
    images = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"align_kmeans needs square images (n, d, d), got {tuple(images.shape)}")
    if not 1 <= k <= len(images):
        raise ValueError(f"k must be in 1..{len(images)}, got {k}")
    if not 0 <= max_shift < images.shape[-1] // 2:
        raise ValueError(f"max_shift must be in 0..{images.shape[-1] // 2 - 1} px, got {max_shift}")
    mask = alignment_mask(images.shape[-1])
    x = images * mask
    angles = torch.arange(n_angles, dtype=torch.float32) * (2 * math.pi / n_angles)
    gen = torch.Generator().manual_seed(seed)
    runs = (_run(images, x, k, angles, mask, max_shift, gen, max_iter, tol) for _ in range(n_init))
    _, labels, rot, shift, centres = min(runs, key=lambda r: r[0])
    return labels.numpy().astype(np.int64), rot.numpy().astype(np.float64), shift.numpy(), centres.numpy()
