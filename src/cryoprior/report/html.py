"""HTML pieces of the run report: the page (figures inline as PNG data URIs), tables, escaping."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

from cryoprior.fileutil import atomic_path

CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;max-width:1150px;margin:24px auto;
padding:0 16px;color:#1d2329;line-height:1.45}
h1{font-size:1.6em;margin-bottom:4px}h2{border-bottom:2px solid #d0d7de;padding-bottom:4px;margin-top:36px}
h3{margin-bottom:6px}.meta{color:#57606a;font-size:.9em}
table{border-collapse:collapse;margin:8px 0 14px;font-size:.92em}
th,td{border:1px solid #d0d7de;padding:4px 10px;text-align:left}th{background:#f6f8fa}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.done{color:#1a7f37;font-weight:600}.unavailable{color:#6e7781}.missing{color:#bc4c00;font-weight:600}
figure{margin:10px 0 22px}figure img{max-width:100%;border:1px solid #eaeef2}
figcaption{font-size:.88em;color:#3d444d;max-width:900px}
.best{font-weight:700}code{background:#f6f8fa;padding:1px 4px;border-radius:3px}
ul.glance li{margin:3px 0}details{margin:6px 0 12px}
"""


class Page:
    """Accumulates HTML and figures; figures go inline as data URIs and to ``figures/``."""

    def __init__(self, run: Path, save_figures: bool):
        self.run, self.parts = run, list[str]()
        self.fig_dir = run / "figures" if save_figures else None
        self._n_fig = 0
        if self.fig_dir is not None and self.fig_dir.is_dir():  # the figures of an earlier report
            for old in self.fig_dir.glob("[0-9][0-9]_*.png"):
                old.unlink()

    def add(self, text: str) -> None:
        self.parts.append(text)

    def figure(self, png: bytes, name: str, caption: str, alt: str) -> None:
        self._n_fig += 1
        if self.fig_dir is not None:
            self.fig_dir.mkdir(exist_ok=True)
            with atomic_path(self.fig_dir / f"{self._n_fig:02d}_{name}.png") as tmp:
                tmp.write_bytes(png)
        uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        self.add(f'<figure><img src="{uri}" alt="{html.escape(alt)}">'
                 f"<figcaption><b>Figure {self._n_fig}.</b> {caption}</figcaption></figure>")


def esc(x: Any) -> str:
    """``x`` as text safe inside HTML."""
    return html.escape(str(x))


def fmt(v: Any, digits: int = 3) -> str:
    """A table cell's text: ``digits`` decimals (trailing zeros dropped), scientific when tiny or huge."""
    if isinstance(v, bool) or v is None:
        return esc(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isinf(v) or math.isnan(v):
            return str(v)
        return f"{v:.{digits}g}" if abs(v) < 1e-3 or abs(v) >= 1e5 else f"{v:.{digits}f}".rstrip("0").rstrip(".")
    return esc(v)


def table(header: list[str], rows: list[list[Any]], bold_row: int | None = None) -> str:
    """An HTML table; numbers right-aligned, ``Raw`` cells unescaped, row ``bold_row`` in bold."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = ' class="best"' if i == bold_row else ""
        cells = "".join(
            f'<td class="num">{fmt(c)}</td>' if isinstance(c, (int, float)) and not isinstance(c, bool)
            else f"<td>{c if isinstance(c, Raw) else esc(c)}</td>" for c in row
        )
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


class Raw(str):
    """Already-escaped HTML for a table cell."""
