"""RELION STAR tables: read 3.0 and 3.1+ layouts with ``starfile``, write the 3.1 layout.

RELION 3.0 keeps everything in one table (block ``data_``, ``data_images`` or
``data_particles``); 3.1+ moves the optics (pixel size, voltage, Cs, amplitude contrast, box)
into ``data_optics`` and links particles to it through ``rlnOpticsGroup``. We always write 3.1,
floats with the shortest repr that reads back to the same value.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from cryoprior.errors import InputError
from cryoprior.fileutil import atomic_path

#: Particle columns that belong in the optics table of a 3.1 STAR, in RELION's order.
OPTICS_COLUMNS = (
    "rlnMicrographOriginalPixelSize",
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
    "rlnImagePixelSize",
    "rlnImageSize",
    "rlnImageDimensionality",
    "rlnBeamTiltX",
    "rlnBeamTiltY",
    "rlnMtfFileName",
)
_PARTICLE_BLOCKS = ("particles", "images", "")
_VERSION = re.compile(r"^#\s*version\s+(\d+)", re.MULTILINE)


@dataclass
class OpticsFlags:
    """Optics the user gives on the command line, for STAR files that lack them (never guessed)."""

    pixel_size_a: float | None = field(
        default=None, metadata={"flag": "--pixel-size", "metavar": "Å", "help": "Å/pixel, over the STAR's and the MRC header's"})
    voltage_kv: float | None = field(default=None, metadata={"metavar": "KV", "help": "acceleration voltage (kV), over rlnVoltage"})
    cs_mm: float | None = field(default=None, metadata={"metavar": "MM", "help": "spherical aberration (mm), over rlnSphericalAberration"})
    amplitude_contrast: float | None = field(
        default=None, metadata={"metavar": "FRACTION", "help": "amplitude contrast, over rlnAmplitudeContrast"})

    def validate(self) -> None:
        for flag, value, ok in (("--pixel-size", self.pixel_size_a, lambda v: v > 0),
                                ("--voltage-kv", self.voltage_kv, lambda v: v > 0),
                                ("--cs-mm", self.cs_mm, lambda v: v >= 0),
                                ("--amplitude-contrast", self.amplitude_contrast, lambda v: 0 <= v < 1)):
            if value is not None and not (math.isfinite(value) and ok(value)):
                raise InputError(f"{flag} {value} is out of range")

    def columns(self) -> dict[str, float]:
        """The RELION optics columns these flags set."""
        named = {"rlnVoltage": self.voltage_kv, "rlnSphericalAberration": self.cs_mm,
                 "rlnAmplitudeContrast": self.amplitude_contrast}
        return {k: float(v) for k, v in named.items() if v is not None}


def star_version(path: str | Path) -> int | None:
    """The RELION version comment of the first block (``# version 30001`` → 30001), or None."""
    with open(path, "rb") as fh:
        head = fh.read(1 << 16).decode("utf-8", "replace")
    match = _VERSION.search(head)
    return int(match.group(1)) if match else None


def read_star(path: str | Path) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Read a particle STAR file; returns ``(particles, optics)``, ``optics`` None for RELION 3.0.

    Raises ``InputError`` naming ``path`` when the file is missing or unreadable, has no particle
    table, or the table has no ``rlnImageName`` column.
    """
    path = Path(path)
    tables = {name: _as_frame(block) for name, block in read_blocks(path).items()}
    particles = next((tables[b] for b in _PARTICLE_BLOCKS if b in tables), None)
    if particles is None:
        particles = next(
            (t for n, t in tables.items() if n != "optics" and "rlnImageName" in t.columns), None
        )
    if particles is None:
        found = ", ".join(f"data_{n}" for n in tables) or "none"
        raise InputError(
            f"no particle table (data_particles or data_); blocks found: {found}", path
        )
    if "rlnImageName" not in particles.columns:
        raise InputError("the particle table has no rlnImageName column", path)
    optics = tables.get("optics")
    if optics is None:
        version = star_version(path)
        if version is not None and version >= 30001:
            raise InputError(f"a RELION 3.1 STAR (# version {version}) without a data_optics table: "
                             "pixel size, voltage, Cs and amplitude contrast are missing", path)
        if "rlnOpticsGroup" in particles.columns:
            raise InputError("the particles name optics groups (rlnOpticsGroup) but there is no "
                             "data_optics table", path)
    particles = particles.reset_index(drop=True)
    particles.name = None  # starfile attaches the block name; keep the frame plain
    return particles, None if optics is None else optics.reset_index(drop=True)


def read_blocks(path: str | Path) -> dict:
    """Every data block of a STAR file, by name (``starfile.read``: a DataFrame per loop, a dict
    per key-value block); ``InputError`` naming ``path`` when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", path)
    try:
        return starfile.read(path, always_dict=True)
    except Exception as exc:  # starfile/pandas raise many types on malformed text
        raise InputError(f"not a readable STAR file ({type(exc).__name__}: {exc})", path) from exc


def _as_frame(block: pd.DataFrame | dict) -> pd.DataFrame:
    """starfile returns single-row blocks written without ``loop_`` as dicts."""
    return block if isinstance(block, pd.DataFrame) else pd.DataFrame([block])


def write_star(
    path: str | Path,
    particles: pd.DataFrame,
    optics: pd.DataFrame | None = None,
    pixel_size_a: float | None = None,
    box: int | None = None,
) -> None:
    """Write a RELION 3.1 particle STAR (``data_optics`` then ``data_particles``), atomically.

    Without ``optics``, one is built from the optics columns the particles carry (moved out of the
    particle table; one group per distinct combination), ``pixel_size_a`` and ``box`` (which take
    precedence over such columns). Optics the particles do not carry (voltage, Cs, amplitude
    contrast) are left out, never invented.
    """
    if optics is None:
        particles, optics = build_optics(particles, pixel_size_a, box)
    else:
        particles, optics = link_optics(particles.copy(), optics.copy())
    text = "".join(
        _block_text(name, df) for name, df in (("optics", optics), ("particles", particles))
    )
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def build_optics(
    particles: pd.DataFrame, pixel_size_a: float | None = None, box: int | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split optics columns off ``particles``; returns ``(particles, optics)`` linked by group."""
    particles = particles.copy()
    if pixel_size_a is not None:
        particles["rlnImagePixelSize"] = float(pixel_size_a)
    elif "rlnImagePixelSize" not in particles.columns:
        if {"rlnDetectorPixelSize", "rlnMagnification"} <= set(particles.columns):
            particles["rlnImagePixelSize"] = (
                particles["rlnDetectorPixelSize"] * 1e4 / particles["rlnMagnification"]
            )
        else:
            raise ValueError(
                "write_star needs optics, a pixel_size_a, or an rlnImagePixelSize column"
            )
    if box is not None:
        particles["rlnImageSize"] = int(box)
    elif "rlnImageSize" not in particles.columns:
        raise ValueError("write_star needs optics, a box, or an rlnImageSize column")
    if "rlnImageDimensionality" not in particles.columns:
        particles["rlnImageDimensionality"] = 2
    keys = [c for c in OPTICS_COLUMNS if c in particles.columns]
    if "rlnOpticsGroup" in particles.columns:
        keys = ["rlnOpticsGroup", *keys]
    codes, uniques = pd.MultiIndex.from_frame(particles[keys]).factorize()
    optics = uniques.to_frame(index=False, name=keys).drop(
        columns="rlnOpticsGroup", errors="ignore"
    )
    groups = np.arange(1, len(optics) + 1)
    optics.insert(0, "rlnOpticsGroup", groups)
    optics.insert(0, "rlnOpticsGroupName", [f"opticsGroup{g}" for g in groups])
    particles = particles.drop(columns=[k for k in keys if k != "rlnOpticsGroup"])
    particles["rlnOpticsGroup"] = groups[codes]
    return particles, optics


def link_optics(particles: pd.DataFrame, optics: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Check that every particle's ``rlnOpticsGroup`` is in ``optics`` (filling it if obvious)."""
    if "rlnOpticsGroup" not in optics.columns:
        if len(optics) != 1:
            raise ValueError("optics has several rows but no rlnOpticsGroup column")
        optics.insert(0, "rlnOpticsGroup", 1)
    if "rlnOpticsGroup" not in particles.columns:
        if len(optics) != 1:
            raise ValueError(
                "particles have no rlnOpticsGroup column but optics has several groups"
            )
        particles["rlnOpticsGroup"] = int(optics["rlnOpticsGroup"].iloc[0])
    unknown = set(particles["rlnOpticsGroup"].unique()) - set(optics["rlnOpticsGroup"])
    if unknown:
        raise ValueError(f"particles refer to optics groups missing from optics: {sorted(unknown)}")
    if "rlnOpticsGroupName" not in optics.columns:
        optics.insert(
            0, "rlnOpticsGroupName", [f"opticsGroup{g}" for g in optics["rlnOpticsGroup"]]
        )
    return particles, optics


def _block_text(name: str, df: pd.DataFrame) -> str:
    """One ``data_<name>`` loop block as RELION writes it (tab separated, repr floats)."""
    header = [f"\n# version 30001\n\ndata_{name}\n\nloop_ \n"]
    header += [f"_{column} #{i} \n" for i, column in enumerate(df.columns, 1)]
    out = df.copy()
    for column in out.columns:
        col = out[column]
        if pd.api.types.is_bool_dtype(col):
            out[column] = col.astype(np.int64)
        elif not pd.api.types.is_numeric_dtype(col):
            text = col.astype(str)
            needs_quotes = text.str.contains(r"\s", regex=True) | (text == "")
            out[column] = text.where(~needs_quotes, '"' + text + '"')
    body = out.to_csv(
        sep="\t",
        header=False,
        index=False,
        na_rep="nan",
        quoting=csv.QUOTE_NONE,
        lineterminator="\n",
    )
    return "".join(header) + body + "\n"


def resolve_image_names(
    names: pd.Series, star_path: str | Path | None
) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """Parse RELION image names ``NNNNNN@path`` into files and 0-based slice numbers.

    Relative paths are looked up beside ``star_path`` first, then in the current directory; a name
    without ``@`` is the first image of that file. Returns ``(stack_paths, file_index,
    slice_index0)``: ``stack_paths[file_index[i]]`` holds image ``slice_index0[i]`` of row ``i``.
    Raises ``InputError`` naming ``star_path`` for malformed names and missing stacks.
    """
    anchor = Path(star_path) if star_path is not None else None
    text = names.astype(str).str.strip()
    parts = text.str.partition("@")  # columns 0 (slice), 1 ("@" or ""), 2 (file)
    has_at = (parts[1] == "@").to_numpy()
    files = parts[2].where(has_at, parts[0])
    numbers = pd.to_numeric(parts[0].where(has_at, "1"), errors="coerce").to_numpy(dtype=np.float64)
    bad = (
        ~np.isfinite(numbers)
        | (numbers < 1)
        | (numbers != np.round(numbers))
        | (files == "").to_numpy()
    )
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        raise InputError(
            f"malformed image name {text.iloc[j]!r} (expected NNNNNN@stack.mrcs)", anchor
        )
    codes, uniques = pd.factorize(files)
    base = anchor.parent if anchor is not None else Path.cwd()
    stack_paths = [_find_stack(str(u), base, anchor) for u in uniques]
    return stack_paths, codes.astype(np.int64), numbers.astype(np.int64) - 1


def _find_stack(name: str, base: Path, anchor: Path | None) -> Path:
    candidates = [Path(name)] if Path(name).is_absolute() else [base / name, Path.cwd() / name]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.absolute()
    looked = " or ".join(str(c) for c in dict.fromkeys(candidates))
    raise InputError(f"image stack {name!r} not found (looked for {looked})", anchor)
