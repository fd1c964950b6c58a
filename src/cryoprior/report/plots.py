"""Figures for the run report: matplotlib on its Agg canvas, PNG bytes out.

Only this module touches matplotlib, and it never selects a global backend: every figure is a
``matplotlib.figure.Figure`` drawn on its own ``FigureCanvasAgg``, so importing cryoprior (or
this module) changes no matplotlib state. Images are ``[y, x]`` arrays shown with the origin at
the top left, as RELION and mrcfile index them; each image is scaled to its own 1st–99th
percentile (stated in the report's captions).
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_PANEL_IN = 1.15  # inches per image panel
_DPI = 100
_NICE_A = (5, 10, 20, 25, 50, 100, 200, 250, 500, 1000)


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    return buf.getvalue()


def _contrast(img: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(img, [1, 99])
    if not hi > lo:
        lo, hi = float(img.min()), float(img.max()) + 1e-12
    return float(lo), float(hi)


def _scale_bar(ax, box: int, pixel_size_a: float) -> None:
    """A white bar of a round length near a third of the box, labelled in Å, bottom left."""
    target = box * pixel_size_a / 3
    length_a = max((v for v in _NICE_A if v <= target), default=_NICE_A[0])
    length_px = length_a / pixel_size_a
    y = box - 0.08 * box
    x0 = 0.06 * box
    ax.plot([x0, x0 + length_px], [y, y], color="white", lw=3, solid_capstyle="butt")
    ax.text(x0, y - 0.05 * box, f"{length_a:g} Å", color="white", fontsize=7, va="bottom")


def image_grid(
    rows: Sequence[Sequence[np.ndarray | None]],
    row_labels: Sequence[str],
    col_labels: Sequence[str] | None = None,
    title: str | None = None,
    pixel_size_a: float | None = None,
) -> bytes:
    """A gallery: ``rows[i][j]`` is a ``(d, d)`` image (or None: an empty panel).

    Row labels on the left, column labels on top, a scale bar on the bottom-left image when
    ``pixel_size_a`` (Å) is given.
    """
    n_rows = len(rows)
    n_cols = max((len(r) for r in rows), default=0)
    if n_rows == 0 or n_cols == 0:
        raise ValueError("image_grid needs at least one image")
    label_w = 1.3
    fig = Figure(figsize=(label_w + _PANEL_IN * n_cols, 0.35 + (0.3 if title else 0) + _PANEL_IN * n_rows))
    top = 1 - (0.35 + (0.3 if title else 0)) / fig.get_figheight()
    left = label_w / fig.get_figwidth()
    fig.subplots_adjust(left=left, right=0.99, bottom=0.01, top=top, wspace=0.04, hspace=0.04)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for i, row in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            img = row[j] if j < len(row) else None
            if img is None:
                ax.axis("off")
                continue
            img = np.asarray(img, dtype=np.float32)
            lo, hi = _contrast(img)
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            if i == 0 and col_labels is not None and j < len(col_labels):
                ax.set_title(col_labels[j], fontsize=8)
            if j == 0:
                label = textwrap.fill(row_labels[i], 18)
                ax.set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center")
    if pixel_size_a is not None:
        first = next(np.asarray(img) for img in rows[-1] if img is not None)
        _scale_bar(axes[-1, 0], first.shape[-1], pixel_size_a)
    if title:
        fig.suptitle(title, fontsize=10, y=0.995)
    return _png(fig)


def _records_to_series(history) -> dict[str, list[float]]:
    """``{"loss": [...]}`` or ``[{"epoch": 1, "loss": ...}, ...]`` → ``{name: values}``."""
    if isinstance(history, Mapping):
        return {k: list(v) for k, v in history.items() if isinstance(v, Sequence) and not isinstance(v, str)}
    series: dict[str, list[float]] = {}
    for rec in history:
        for k, v in rec.items():
            if isinstance(v, (int, float)):
                series.setdefault(k, []).append(float(v))
    return series


def training_curves(histories: Mapping[str, object], title: str = "Training curves") -> bytes:
    """One panel per training run: every numeric series against epoch (or step, or index).

    ``histories``: ``{run label: history}``, each history a dict of lists or a list of
    per-epoch records. Series whose name holds "loss" share a log y-axis when all positive.
    """
    n = len(histories)
    if n == 0:
        raise ValueError("no training histories")
    fig = Figure(figsize=(min(12.0, 4.8 * n), 3.3))
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, (label, history) in zip(axes, histories.items()):
        series = _records_to_series(history)
        x_name = next((k for k in ("epoch", "step", "iteration") if k in series), None)
        x = series.pop(x_name) if x_name else None
        losses = {k: v for k, v in series.items() if "loss" in k.lower()} or series
        for name, values in losses.items():
            xs = x if x is not None and len(x) == len(values) else list(range(1, len(values) + 1))
            ax.plot(xs, values, marker="o" if len(values) < 30 else None, ms=3, label=name)
        all_v = [v for vals in losses.values() for v in vals if v is not None and math.isfinite(v)]
        if all_v and min(all_v) > 0 and max(all_v) / min(all_v) > 20:
            ax.set_yscale("log")
        ax.set_xlabel(x_name or "epoch")
        ax.set_ylabel("loss")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _png(fig)


def fsc_curves(panels: Mapping[str, Mapping[str, Sequence[float]]], box: int, pixel_size_a: float) -> bytes:
    """FSC against spatial frequency (1/Å), one panel per ``{title: {label: curve}}``, with the
    0.5 and 0.143 thresholds and a top axis in Å."""
    if not panels:
        raise ValueError("no FSC curves")
    fig = Figure(figsize=(5.6 * len(panels), 3.9))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    freqs = np.arange(box // 2 + 1) / (box * pixel_size_a)  # cycles/Å, shells 0..d/2
    for ax, (title, curves) in zip(axes, panels.items()):
        for label, curve in curves.items():
            c = np.asarray(curve, dtype=float)
            ax.plot(freqs[: len(c)], c, label=label, lw=1.6)
        for thr, style in ((0.5, "--"), (0.143, ":")):
            ax.axhline(thr, color="grey", ls=style, lw=1)
        ax.set_xlim(0, freqs[-1])
        ax.set_ylim(-0.1, 1.02)
        ax.set_xlabel("spatial frequency (1/Å)")
        ax.set_ylabel("FSC")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
        sec = ax.secondary_xaxis(
            "top", functions=(lambda f: 1 / np.maximum(f, 1e-6), lambda r: 1 / np.maximum(r, 1e-6))
        )
        sec.set_xticks([t for t in (50, 30, 20, 15, 10, 8, 6, 5, 4, 3) if t >= 2 * pixel_size_a])
        sec.set_xlabel("resolution (Å)")
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _png(fig)


_VIEW_LABELS = ("slice z = centre", "slice y = centre", "slice x = centre",
                "projection along z", "projection along y", "projection along x")


def map_views(maps: Mapping[str, np.ndarray], pixel_size_a: float | None = None,
              title: str | None = None) -> bytes:
    """Rows: maps ``(d, d, d)`` ``[z, y, x]``; columns: three central slices, three projections."""
    rows, labels = [], []
    for label, vol in maps.items():
        v = np.asarray(vol, dtype=np.float32)
        if v.ndim != 3:
            raise ValueError(f"map {label!r} must be (d, d, d), got shape {v.shape}")
        c = v.shape[0] // 2
        rows.append([v[c], v[:, c], v[:, :, c], v.sum(0), v.sum(1), v.sum(2)])  # [y,x], [z,x], [z,y]
        labels.append(label)
    return image_grid(rows, labels, _VIEW_LABELS, title=title, pixel_size_a=pixel_size_a)
