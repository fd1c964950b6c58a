"""RELION's metadata as our tensors: STAR columns → poses, shifts, CTFs and half sets, and the
files of RELION's ``--external_reconstruct`` protocol (read the request, write the τ² table).

The protocol: RELION writes ``<root>_external_reconstruct.star`` and three MRCs, and runs
``$RELION_EXTERNAL_RECONSTRUCT_EXECUTABLE <root>_external_reconstruct.star`` from its project
folder (half 1 and half 2 at the same time). The STAR holds ``data_external_reconstruct_general``
(key-value: the data/weight/result file names, ``rlnTau2FudgeFactor``, ``rlnPaddingFactor``,
``rlnOriginalImageSize``, ``rlnCurrentImageSize``, optionally ``rlnPixelSize`` and
``rlnExtReconsResultStarfile``) and ``data_external_reconstruct_tau2`` (loop: ``rlnSpectralIndex``,
``rlnReferenceTau2``, ``rlnGoldStandardFsc``). The MRCs are FFTW half-complex grids
``(P, P, P // 2 + 1)`` [z, y, x], ``P = pad · d`` (:func:`halfcomplex_to_centred`).
"""

from __future__ import annotations

import glob
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import torch

from cryoprior.core.ctf import ctf_2d
from cryoprior.core.rotations import euler_to_matrix
from cryoprior.errors import InputError
from cryoprior.fileutil import atomic_path
from cryoprior.io.stack import ParticleStack
from cryoprior.io.star import read_blocks

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------ particles: poses and CTF
def half_sets(stack: ParticleStack) -> np.ndarray:
    """Half-set label 1 or 2 per particle: ``rlnRandomSubset``, else alternating rows."""
    if stack.has_column("rlnRandomSubset"):
        subset = np.asarray(stack.column("rlnRandomSubset"), dtype=np.int64)
        if set(np.unique(subset)) <= {1, 2} and len(np.unique(subset)) == 2:
            return subset
        raise InputError(f"rlnRandomSubset must hold 1 and 2, found {sorted(set(subset.tolist()))}", stack.path)
    log.warning("%s: no rlnRandomSubset; alternating particles go to half 1 and 2", stack.path)
    return np.arange(len(stack)) % 2 + 1


def poses_from_star(stack: ParticleStack, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation matrices ``(n, 3, 3)`` (RELION ZYZ, see ``core``) and origin shifts ``(n, 2)`` in
    pixels for ``rows``; ``rlnOrigin{X,Y}Angst`` (3.1) or ``rlnOrigin{X,Y}`` (3.0, pixels)."""
    names = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
    missing = [c for c in names if not stack.has_column(c)]
    if missing:
        raise InputError(f"no poses: missing {', '.join(missing)} (use --refine)", stack.path)
    rot, tilt, psi = (torch.as_tensor(stack.column(c)[rows].astype(np.float64)) for c in names)
    shifts = torch.zeros(len(rows), 2, dtype=torch.float64)
    for axis, c in enumerate(("X", "Y")):
        if stack.has_column(f"rlnOrigin{c}Angst"):
            shifts[:, axis] = torch.as_tensor(stack.column(f"rlnOrigin{c}Angst")[rows].astype(np.float64)) / stack.pixel_size_a
        elif stack.has_column(f"rlnOrigin{c}"):  # RELION 3.0, pixels
            shifts[:, axis] = torch.as_tensor(stack.column(f"rlnOrigin{c}")[rows].astype(np.float64))
    return euler_to_matrix(rot, tilt, psi).float(), shifts.float()


def ctf_from_star(stack: ParticleStack, rows: np.ndarray, device=None) -> torch.Tensor | None:
    """Centred CTFs ``(n, d, d)`` of ``rows`` from the RELION CTF columns, None without them."""
    if not stack.has_column("rlnDefocusU"):
        return None

    required = {"rlnVoltage": "--voltage-kv", "rlnSphericalAberration": "--cs-mm",
                "rlnAmplitudeContrast": "--amplitude-contrast"}
    missing = [c for c in required if not stack.has_column(c)]
    if missing:  # never a default microscope: 120 kV data read as 300 kV loses half the resolution
        flags = ", ".join(required[c] for c in missing)
        raise InputError(f"CTF parameters missing: {', '.join(missing)} (not in the STAR's particles or "
                         f"data_optics); give {flags}", stack.path)

    def col(name: str, default: float | None = None) -> torch.Tensor:
        values = stack.column(name)[rows] if stack.has_column(name) else np.full(len(rows), default)
        values = np.asarray(values, dtype=np.float64)
        if not np.isfinite(values).all():
            raise InputError(f"column {name} holds non-finite values", stack.path)
        return torch.as_tensor(values)

    u = col("rlnDefocusU")
    v = col("rlnDefocusV") if stack.has_column("rlnDefocusV") else u
    return ctf_2d(
        stack.box, stack.pixel_size_a, u, v, col("rlnDefocusAngle", 0.0), col("rlnVoltage"),
        col("rlnSphericalAberration"), col("rlnAmplitudeContrast"), col("rlnPhaseShift", 0.0),
        col("rlnCtfBfactor", 0.0), device=device, dtype=torch.float32,
    )


def ctf_parameters(stack: ParticleStack) -> dict:
    """The CTF of every particle of ``stack`` as a simulator draws it: ``defocus`` ``(n, 3)``
    (U, V Å, astigmatism angle deg) and the microscope (``voltage_kv``, ``cs_mm``,
    ``amplitude_contrast``), which must be one for the whole stack."""
    if not stack.has_column("rlnDefocusU"):
        raise InputError("no CTF: the STAR has no rlnDefocusU column", stack.path)
    rows = np.arange(len(stack))
    u = np.asarray(stack.column("rlnDefocusU"), dtype=np.float64)
    v = np.asarray(stack.column("rlnDefocusV"), dtype=np.float64) if stack.has_column("rlnDefocusV") else u
    angle = (np.asarray(stack.column("rlnDefocusAngle"), dtype=np.float64) if stack.has_column("rlnDefocusAngle")
             else np.zeros_like(u))
    defocus = np.stack([u, v, angle], axis=1)
    if not np.isfinite(defocus).all() or (defocus[:, :2] <= 0).any():
        raise InputError("defocus columns hold non-finite or non-positive values", stack.path)
    scope = {}
    for key, column in (("voltage_kv", "rlnVoltage"), ("cs_mm", "rlnSphericalAberration"),
                        ("amplitude_contrast", "rlnAmplitudeContrast")):
        if not stack.has_column(column):
            raise InputError(f"CTF parameter {column} missing (not in the particles or data_optics)", stack.path)
        values = np.unique(np.asarray(stack.column(column), dtype=np.float64)[rows])
        if len(values) != 1:
            raise InputError(f"{column} differs between particles ({', '.join(f'{x:g}' for x in values)}): "
                             "split the stack by optics group", stack.path)
        scope[key] = float(values[0])
    return {"defocus": defocus, **scope}


# -------------------------------------------------------------- external reconstruction
GENERAL, TAU2 = "external_reconstruct_general", "external_reconstruct_tau2"
_GENERAL_KEYS = (
    "rlnExtReconsDataReal", "rlnExtReconsDataImag", "rlnExtReconsWeight", "rlnExtReconsResult",
    "rlnTau2FudgeFactor", "rlnPaddingFactor", "rlnReferenceDimensionality", "rlnOriginalImageSize",
    "rlnCurrentImageSize",
)
_TAU2_KEYS = ("rlnSpectralIndex", "rlnReferenceTau2", "rlnGoldStandardFsc")
RESULT_STAR_KEY = "rlnExtReconsResultStarfile"


class IncompleteTableError(InputError):
    """The τ²/FSC table does not cover every shell ``0..ori // 2``; ``outputs`` are the files
    the request names (result map, result STAR), which must not survive from an earlier call."""

    def __init__(self, message: str, path: Path, outputs: list[Path]):
        super().__init__(message, path)
        self.outputs = outputs


def halfcomplex_to_centred(h: torch.Tensor) -> torch.Tensor:
    """FFTW half-complex ``(P, P, P // 2 + 1)`` (origin at 0) → centred full grid ``(P, P, P)``.

    Negative x frequencies come from Hermitian symmetry, ``F(−k) = conj F(k)`` (for a real K
    this mirrors it). The recipe, checked against our centred FFT (``core.fft``)::

        >>> import torch
        >>> from cryoprior.core.fft import fft3c
        >>> x = torch.randn(6, 6, 6, dtype=torch.float64)
        >>> h = torch.fft.rfftn(torch.fft.ifftshift(x))        # what RELION writes (× scale)
        >>> torch.allclose(halfcomplex_to_centred(h), fft3c(x))
        True
    """
    p = h.shape[0]
    if h.dim() != 3 or h.shape != (p, p, p // 2 + 1):
        raise ValueError(f"expected a half-complex grid (P, P, P // 2 + 1), got {tuple(h.shape)}")
    mirrored = torch.roll(torch.flip(h, dims=(0, 1)), shifts=(1, 1), dims=(0, 1))  # h[-z, -y, :]
    n_neg = p - (p // 2 + 1)  # x indices p//2+1 .. p-1 hold kx = -(p - j)
    neg = mirrored[..., 1 : n_neg + 1].flip(-1)
    full = torch.cat([h, neg.conj() if neg.is_complex() else neg], dim=-1)  # (p, p, p), FFTW order
    return torch.fft.fftshift(full)


@dataclass
class ExternalJob:
    """One RELION external-reconstruction request, read and checked."""

    star: Path
    data_real: Path
    data_imag: Path
    weight: Path
    result: Path
    fudge: float
    pad: int
    ori_size: int
    current_size: int
    pixel_size_a: float | None
    tau2: np.ndarray  # (ori // 2 + 1,) RELION's τ²
    fsc: np.ndarray  # (ori // 2 + 1,)
    result_star: Path | None = None  # rlnExtReconsResultStarfile, when RELION names one

    @property
    def is_half(self) -> bool:
        return any(f"_half{i}" in self.star.name for i in (1, 2))


def _resolve(name: str, star: Path) -> Path:
    """RELION's paths are relative to its project folder (our cwd); else try beside the STAR."""
    p = Path(name)
    if p.is_absolute() or p.exists() or not (star.parent / p).exists():
        return p
    return star.parent / p


def read_job(star: str | Path) -> ExternalJob:
    """Parse ``<root>_external_reconstruct.star``; ``InputError`` naming the file when malformed."""
    star = Path(star)
    blocks = read_blocks(star)
    if GENERAL not in blocks or TAU2 not in blocks:
        found = ", ".join(f"data_{b}" for b in blocks) or "none"
        raise InputError(f"need blocks data_{GENERAL} and data_{TAU2}; found {found}", star)
    general = blocks[GENERAL]
    general = general.iloc[0].to_dict() if isinstance(general, pd.DataFrame) else dict(general)
    missing = [k for k in _GENERAL_KEYS if k not in general]
    if missing:
        raise InputError(f"data_{GENERAL} lacks {', '.join(missing)}", star)
    tau = blocks[TAU2] if isinstance(blocks[TAU2], pd.DataFrame) else pd.DataFrame([blocks[TAU2]])
    missing = [k for k in _TAU2_KEYS if k not in tau.columns]
    if missing:
        raise InputError(f"data_{TAU2} lacks column(s) {', '.join(missing)}", star)
    try:
        ori, cur = int(general["rlnOriginalImageSize"]), int(general["rlnCurrentImageSize"])
        pad_f, fudge = float(general["rlnPaddingFactor"]), float(general["rlnTau2FudgeFactor"])
        dim = int(general["rlnReferenceDimensionality"])
        pixel = float(general["rlnPixelSize"]) if "rlnPixelSize" in general else None
        idx = tau["rlnSpectralIndex"].to_numpy(dtype=np.int64)
        tau2_col = tau["rlnReferenceTau2"].to_numpy(dtype=np.float64)
        fsc_col = tau["rlnGoldStandardFsc"].to_numpy(dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"non-numeric value in the STAR ({exc})", star) from exc
    if dim != 3:
        raise InputError(f"only 3D references are supported, rlnReferenceDimensionality = {dim}", star)
    if ori < 2 or pad_f < 1 or round(pad_f) != pad_f or not 0 < cur <= ori:
        raise InputError(f"bad sizes: original {ori}, current {cur}, padding {pad_f:g} (integer >= 1)", star)
    if idx.size and (idx.min() < 0 or idx.max() > ori // 2):
        raise InputError(f"rlnSpectralIndex outside 0..{ori // 2}", star)
    if not (np.isfinite(tau2_col).all() and np.isfinite(fsc_col).all()):
        raise InputError(f"data_{TAU2} holds NaN or Inf", star)
    tau2, fsc = np.zeros(ori // 2 + 1), np.zeros(ori // 2 + 1)
    tau2[idx], fsc[idx] = tau2_col, fsc_col
    real, imag, weight = (_resolve(str(general[k]), star) for k in _GENERAL_KEYS[:3])
    beside = real == star.parent / str(general["rlnExtReconsDataReal"])  # inputs found beside the STAR

    def output(key: str) -> Path | None:
        value = general.get(key)
        if value is None or not str(value).strip():
            return None
        path = Path(str(value))
        return star.parent / path if beside and not path.is_absolute() else path  # write there too

    result = output("rlnExtReconsResult")
    if result is None:
        raise InputError("rlnExtReconsResult is empty", star)
    # RELION writes one row per shell 0..ori/2 (backprojector.cpp:1255-1261); fewer rows (a file
    # cut short at a row boundary) or repeated ones are a corrupted request, not zeros to assume
    missing = sorted(set(range(ori // 2 + 1)) - set(idx.tolist()))
    if missing or len(idx) != ori // 2 + 1:
        what = f"lacks shell(s) {_ranges(missing)}" if missing else "repeats shells"
        outputs = [p for p in (result, output(RESULT_STAR_KEY)) if p is not None]
        raise IncompleteTableError(
            f"data_{TAU2} {what}; RELION writes one row per shell 0..{ori // 2} (rlnOriginalImageSize {ori})",
            star, outputs,
        )
    return ExternalJob(
        star, real, imag, weight, result,
        fudge=fudge, pad=int(pad_f), ori_size=ori, current_size=cur, pixel_size_a=pixel, tau2=tau2, fsc=fsc,
        result_star=output(RESULT_STAR_KEY),
    )


def _ranges(values: list[int]) -> str:
    """``[3, 4, 5, 8]`` → ``"3-5, 8"``."""
    parts, start = [], None
    for i, v in enumerate(values):
        start = v if start is None else start
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(f"{start}-{v}" if v != start else f"{v}")
            start = None
    return ", ".join(parts)


_RUN_STAR = re.compile(r"(.*?)(_it\d{3})?(_half[12])?_(class|body)\d{3}_external_reconstruct\.star$")


def find_run_pixel_size(star: Path) -> tuple[float | None, str]:
    """Å/pixel from the RELION run that wrote ``star``, and where it was found.

    RELION 3.1 (and 4.0.0) write no ``rlnPixelSize`` in the external STAR and leave the cell of
    the data/weight MRCs at 0, but the run's ``<out>_it<NNN>[_half1]_model.star`` holds it
    (``data_model_general``, ``rlnPixelSize``; ``it000`` exists before iteration 1), as does the
    optics table of ``<out>_it<NNN>_data.star`` (``rlnImagePixelSize``). Newest first; files that
    cannot be read (half-written) are skipped. ``<out>`` is the STAR's name without
    ``[_it<NNN>][_half<k>]_(class|body)<NNN>_external_reconstruct.star``. (None, reason) if absent.
    """
    m = _RUN_STAR.match(star.name)
    if m is None:
        return None, f"{star.name} is not named <out>_it<NNN>[_half<k>]_class<NNN>_external_reconstruct.star"
    root = glob.escape(m.group(1))
    for pattern, block, key in (
        (f"{root}_it[0-9][0-9][0-9]*_model.star", "model_general", "rlnPixelSize"),
        (f"{root}_it[0-9][0-9][0-9]_data.star", "optics", "rlnImagePixelSize"),
    ):
        for path in sorted(star.parent.glob(pattern), reverse=True):
            try:
                table = read_blocks(path).get(block)
                value = table[key].iloc[0] if isinstance(table, pd.DataFrame) else (table or {}).get(key)
                value = float(value) if value is not None else None
            except Exception as exc:  # noqa: BLE001 - a file RELION is still writing: try the next
                log.debug("%s: unreadable (%s)", path, exc)
                continue
            if value is not None and np.isfinite(value) and value > 0:
                return value, str(path)
    return None, f"no {m.group(1)}_it<NNN>[_half1]_model.star or _data.star with a pixel size beside {star}"


def read_grid(path: Path, shape: tuple[int, int, int]) -> np.ndarray:
    if not path.is_file():
        raise InputError("file not found", path)
    try:
        with mrcfile.open(path, mode="r", permissive=True) as mrc:
            if mrc.data is None:
                raise ValueError("no data block")
            data = np.asarray(mrc.data, dtype=np.float32).copy()
    except (ValueError, OSError) as exc:
        raise InputError(f"not a readable MRC file ({exc})", path) from exc
    if data.shape != shape:
        raise InputError(f"shape (z, y, x) = {data.shape}, expected (P, P, P/2+1) = {shape}", path)
    if not np.isfinite(data).all():
        raise InputError("contains NaN or Inf", path)
    return data


def write_tau2_star(path: Path, tau2_relion: np.ndarray, fsc: np.ndarray, index: np.ndarray | None = None) -> Path:
    """Write ``data_external_reconstruct_tau2`` (rlnSpectralIndex, rlnReferenceTau2 in RELION's
    units, rlnGoldStandardFsc), one row per entry, for shells ``index`` (default ``0..len - 1``),
    atomically. Returns ``path``."""
    if tau2_relion.shape != fsc.shape or tau2_relion.ndim != 1:
        raise ValueError(f"τ² {tau2_relion.shape} and FSC {fsc.shape} must be 1D of the same length")
    index = np.arange(len(tau2_relion)) if index is None else np.asarray(index)
    if index.shape != tau2_relion.shape:
        raise ValueError(f"index {index.shape} and τ² {tau2_relion.shape} differ")
    text = f"\n# version 30001\n\ndata_{TAU2}\n\nloop_ \n"
    text += "".join(f"_{key} #{i + 1} \n" for i, key in enumerate(_TAU2_KEYS))
    text += "".join(f"{i:12d} {t:15.8e} {f:12.6f} \n" for i, t, f in zip(index, tau2_relion, fsc))
    with atomic_path(path) as tmp:
        tmp.write_text(text + " \n")
    return path
