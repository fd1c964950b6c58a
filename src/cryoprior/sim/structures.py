"""Structures to 3D volumes: atoms (PDB/mmCIF through gemmi), MRC maps, and the builtin set.

Conventions, written once:

- A volume is a float32 tensor ``(box, box, box)`` indexed ``[z, y, x]`` (x varies fastest, as
  mrcfile and RELION store maps).
- Voxel index ``i`` on any axis sits at coordinate ``(i - box // 2) * pixel_size_a`` Å, so the
  voxel ``box // 2`` is the origin and RELION's rotation centre. With ``center=True`` the
  potential-weighted centre of the atoms is moved there.
- Atom maps hold the electron-scattering potential density, ``sum over atoms of
  sum_i a_i (4 pi / B_i)^(3/2) exp(-4 pi^2 r^2 / B_i)`` with the 5-Gaussian electron scattering
  factors of International Tables vol. C table 4.3.2.2 (gemmi's ``c4322``) and
  ``B_i = b_i + B_atom + blur``. Its unit is Å⁻² (Å of scattering amplitude per Å³); the
  integral over space, ``volume.sum() * pixel_size_a**3``, equals ``sum f_e(0)`` over the atoms
  (about 2.5 Å for a carbon atom). Multiply by :data:`VOLT_A2_PER_A` (h²/2πm₀e = 47.878 V·Å²) to
  get the Coulomb potential in volts. Maps read from MRC files keep whatever units they have.

>>> vol = volume_from_atoms(builtin_structure_path("1ake"), 64, 1.5)  # doctest: +SKIP
>>> vol.shape, vol.dtype  # doctest: +SKIP
(torch.Size([64, 64, 64]), torch.float32)
"""

from __future__ import annotations

import math
import warnings
from importlib import resources
from pathlib import Path

import gemmi
import mrcfile
import numpy as np
import scipy.ndimage
import torch

from cryoprior.errors import InputError

__all__ = [
    "NYQUIST_AMPLITUDE",
    "VOLT_A2_PER_A",
    "builtin_structure_path",
    "list_builtin_structures",
    "load_volume",
    "max_radius_a",
    "radius_of_gyration_a",
    "read_structure",
    "recommended_pixel_size_a",
    "resolve_structure",
    "volume_from_atoms",
    "volume_from_map",
    "volume_from_structure",
]

VOLT_A2_PER_A = 47.878
"""h²/(2π m₀ e) in V·Å²: the potential in volts is this times the map value in Å⁻²."""

NYQUIST_AMPLITUDE = 0.05
"""Largest Fourier amplitude, relative to zero frequency, that any atom keeps at Nyquist.

Every atom is blurred to a total B of at least ``16 ln(1/0.05) p² ≈ 48 p²`` (p = pixel size in
Å), i.e. a real-space Gaussian of σ ≥ 0.78 pixel. Its transform ``exp(-B s²/4)`` is then ≤ 5 %
at Nyquist (s = 1/2p) and ≤ 1.3e-4 in the far corners of the cube (s = √3/2p): the map is
band-limited to Nyquist and sampling it hardly aliases. One ``blur = max(0, 48 p² - min B)`` is
added to every atom, so atoms with larger B-factors stay relatively smoother, as in the file.
A sharper choice (e.g. Fourier cropping from a finer grid) would ring; a softer one would
throw away resolution the pixel size can carry.
"""

STRUCTURE_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif")
MAP_SUFFIXES = (".mrc", ".map")
_BUILTIN_SUFFIX = ".pdb.gz"
_WATER_NAMES = {"HOH", "WAT", "H2O", "DOD", "SOL", "TIP", "TIP3", "TIP4", "TIP5", "T3P", "T4P",
                "SPC", "SPCE", "HOD", "D2O"}
# MD force-field residue names (CHARMM, AMBER) that are amino acids or caps.
_MD_POLYMER_NAMES = {"HSD", "HSE", "HSP", "HID", "HIE", "HIP", "HSC", "CYX", "CYM", "CYS2", "ASH",
                     "GLH", "LYN", "ASPP", "GLUP", "ACE", "NME", "NMA", "NH2", "CT3", "CT2"}
_UNKNOWN_NAMES = {"UNX", "UNL"}  # PDB: unknown atom or ion, unknown ligand
_DUMMY_NAMES = {"DUM"}  # OPM's membrane-boundary pseudo-atoms
_POLYMER_ELEMENTS = {"H", "D", "C", "N", "O", "S", "P", "Se"}
# Single-atom ion residues of MD force fields whose names are not element symbols.
_ION_RESIDUES = {"SOD": "Na", "POT": "K", "CLA": "Cl", "CAL": "Ca", "CES": "Cs", "LIT": "Li",
                 "RUB": "Rb", "BAR": "Ba"}


# ---------------------------------------------------------------------------- builtin structures
def _builtin_dir() -> Path:
    # The package is installed as plain files (src layout, setuptools), so this is a real path.
    return Path(str(resources.files("cryoprior").joinpath("data", "structures")))


def list_builtin_structures() -> list[str]:
    """Ids (lowercase PDB codes) of the structures shipped in ``cryoprior/data/structures``."""
    return sorted(p.name[: -len(_BUILTIN_SUFFIX)] for p in _builtin_dir().glob("*" + _BUILTIN_SUFFIX))


def builtin_structure_path(name: str) -> Path:
    """Path of a builtin structure; ``name`` is its PDB id in any case ("1ake", "1AKE")."""
    path = _builtin_dir() / f"{name.strip().lower()}{_BUILTIN_SUFFIX}"
    if not path.is_file():
        raise InputError(
            f"not a builtin structure; available: {', '.join(list_builtin_structures())}", name)
    return path


def resolve_structure(spec: str | Path) -> Path:
    """``spec`` as an existing file path, or else as a builtin structure id."""
    path = Path(spec)
    if path.is_file():
        return path
    if path.suffix or path.parent != Path("."):  # looks like a path, not an id
        raise InputError("file not found (and not a builtin structure id)", spec)
    return builtin_structure_path(str(spec))


# ------------------------------------------------------------------------------- reading atoms
def _is_polymer_residue(name: str) -> bool:
    name = name.upper()
    if name in _MD_POLYMER_NAMES:
        return True
    info = gemmi.find_tabulated_residue(name)
    if info is not None and (info.is_amino_acid() or info.is_nucleic_acid()):
        return True
    # AMBER terminal residues: NALA, CALA, ...
    return len(name) == 4 and name[0] in "NC" and _is_polymer_residue(name[1:])


def _element_or_none(symbol: str) -> gemmi.Element | None:
    element = gemmi.Element(symbol)
    return element if element.atomic_number > 0 else None


def _ion_element(residue_name: str, atom_name: str) -> gemmi.Element | None:
    """The ion of a single-atom residue ("NA+"/"NA", "CLA"/"CLA", "ZN"/"ZN"), else None."""
    residue_name = residue_name.strip().upper().rstrip("+-0123456789")
    atom_name = atom_name.strip().upper().rstrip("+-0123456789")
    if residue_name in _ION_RESIDUES:
        return gemmi.Element(_ION_RESIDUES[residue_name])
    if residue_name == atom_name and len(atom_name) <= 2:
        return _element_or_none(atom_name)
    return None


def _guess_element(atom_name: str, residue_name: str, polymer: bool) -> gemmi.Element | None:
    """Element from an atom name, for files whose element column is missing or not to be trusted.

    Polymer residues hold only H, C, N, O, S, P (and Se in MSE/SEC), so the first letter of the
    name after any leading digits is the element: "CA" is carbon, "SG" sulfur, and "HN", "HT1",
    "1HD1", "HG21" are hydrogens (a 4-character name always has its element first). Elsewhere atoms
    named exactly FE, ZN, MG, MN, CU or NI are those metals, names shorter than 4 starting with
    "CL"/"BR" are halogens, and otherwise the first letter is the element. (Single-atom ions are
    handled by :func:`_ion_element`.)
    """
    raw = atom_name.strip().upper()
    name = raw.lstrip("0123456789")
    residue_name = residue_name.strip().upper()
    if not name:
        return None
    if polymer:
        if name.startswith("SE") and residue_name in {"MSE", "SEC"}:
            return gemmi.Element("Se")
        return _element_or_none(name[0])
    if raw in {"FE", "ZN", "MG", "MN", "CU", "NI"}:
        return gemmi.Element(raw)
    if len(raw) < 4 and name[:2] in {"CL", "BR"}:
        return gemmi.Element(name[:2])
    return _element_or_none(name[0])


def _repair_elements(model: gemmi.Model, path: str | Path) -> None:
    """Fix elements that gemmi guessed from misaligned names (MD, CHARMM) or could not guess.

    If any amino-acid/nucleotide atom has an element such a residue cannot contain (calcium for
    a left-aligned "CA", seaborgium for "SG", none for "HN"), the file's names are not in PDB
    alignment and every element is taken from the names by :func:`_guess_element`; otherwise
    only the atoms with no element are.
    """
    residues = [(residue, _is_polymer_residue(residue.name)) for chain in model
                for residue in chain]
    misaligned = any(polymer and atom.element.name not in _POLYMER_ELEMENTS
                     for residue, polymer in residues for atom in residue)
    for residue, polymer in residues:
        ion = None if polymer or len(residue) != 1 else _ion_element(residue.name, residue[0].name)
        for atom in residue:
            if ion is not None:  # MD tools write "NA"/"CL" ions with element N/C: overrule
                atom.element = ion
                continue
            if not misaligned and atom.element.atomic_number > 0:
                continue
            element = _guess_element(atom.name, residue.name, polymer)
            if element is None:
                raise InputError(
                    f"cannot tell the element of atom {atom.name!r} in residue "
                    f"{residue.name} {residue.seqid}; add the element column (77-78)", path)
            atom.element = element


def read_structure(path: str | Path, *, hydrogens: bool = False, ligands: bool = True,
                   ) -> gemmi.Structure:
    """Read a PDB/mmCIF file (gzipped too): first model, elements repaired, waters removed.

    Hydrogens are removed unless ``hydrogens``; ligands and ions (anything that is not an amino
    acid or nucleotide) are kept unless ``ligands`` is False. Atoms of unknown element (UNX,
    UNL) are dropped with a warning, OPM's membrane pseudo-atoms (DUM) without one. Raises
    :class:`InputError` naming the file when it is missing, unreadable, or has no atoms left.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", path)
    try:
        structure = gemmi.read_structure(str(path))
    except (RuntimeError, ValueError, OSError) as exc:
        raise InputError(f"cannot read as PDB/mmCIF ({exc})", path) from exc
    if len(structure) == 0:
        raise InputError("no atoms (no model) in the structure", path)
    while len(structure) > 1:
        del structure[len(structure) - 1]
    model = structure[0]
    unknown = 0
    for chain in model:
        for i in reversed(range(len(chain))):
            name = chain[i].name.upper()
            water = chain[i].is_water() or name in _WATER_NAMES
            if name in _UNKNOWN_NAMES:
                unknown += len(chain[i])
            dropped = water or name in _UNKNOWN_NAMES or name in _DUMMY_NAMES
            if dropped or (not ligands and not _is_polymer_residue(name)):
                del chain[i]
    if unknown:
        warnings.warn(f"{path}: {unknown} atoms of unknown element (residues UNX/UNL) ignored",
                      stacklevel=2)
    _repair_elements(model, path)
    if not hydrogens:
        structure.remove_hydrogens()
    structure.remove_empty_chains()
    if model.count_atom_sites() == 0 or model.count_occupancies() <= 0:
        raise InputError("no atoms found (after removing hydrogens and waters)", path)
    return structure


def _atom_arrays(model: gemmi.Model) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions ``(n, 3)`` in Å, scattering weights f_e(0)·occ ``(n,)`` and masses ``(n,)``."""
    xyz, occ, symbols = [], [], []
    for cra in model.all():
        xyz.append(cra.atom.pos.tolist())
        occ.append(cra.atom.occ)
        symbols.append(cra.atom.element.name)
    f0 = {e: sum(gemmi.Element(e).c4322.get_coefs()[:5]) for e in set(symbols)}  # f_e(0), Å
    weight = np.array([f0[e] for e in symbols]) * occ
    mass = np.array([gemmi.Element(e).weight for e in symbols]) * occ
    return np.asarray(xyz, dtype=np.float64).reshape(-1, 3), weight, mass


def radius_of_gyration_a(path: str | Path) -> float:
    """Mass-weighted radius of gyration (Å) of the non-hydrogen, non-water atoms."""
    xyz, _, mass = _atom_arrays(read_structure(resolve_structure(path))[0])
    centre = (xyz * mass[:, None]).sum(0) / mass.sum()
    return float(np.sqrt((mass * ((xyz - centre) ** 2).sum(1)).sum() / mass.sum()))


def max_radius_a(path: str | Path) -> float:
    """Largest distance (Å) of an atom from the centre that ``volume_from_atoms`` puts at box//2."""
    xyz, weight, _ = _atom_arrays(read_structure(resolve_structure(path))[0])
    centre = (xyz * weight[:, None]).sum(0) / weight.sum()
    return float(np.sqrt(((xyz - centre) ** 2).sum(1)).max())


def recommended_pixel_size_a(name_or_path: str | Path, box: int) -> float:
    """Smallest pixel size on a 0.25-Å step at which the molecule's max radius is ≤ 0.4·box·pixel."""
    needed = max_radius_a(name_or_path) / (0.4 * box)
    return max(0.25, math.ceil(needed / 0.25 - 1e-9) * 0.25)


# ---------------------------------------------------------------------------- rendering atoms
def _check_grid(box: int, pixel_size_a: float) -> None:
    if not isinstance(box, int | np.integer) or box < 2:
        raise InputError(f"box must be an integer >= 2, got {box!r}")
    if not pixel_size_a > 0:
        raise InputError(f"pixel_size_a must be > 0, got {pixel_size_a!r}")


def volume_from_structure(structure: gemmi.Structure, box: int, pixel_size_a: float, *,
                          center: bool = True, b_factor: float | None = None,
                          source: str | Path | None = None) -> torch.Tensor:
    """Electron-scattering potential of ``structure``'s first model, ``(box, box, box)`` [z, y, x].

    The structure is rendered as is (no atoms removed; see :func:`read_structure`). ``b_factor``
    replaces every atom's B (Å²); None keeps the file's. Anisotropic ADPs are replaced by their
    isotropic B. ``source`` names the structure in errors. An atom outside the box raises
    :class:`InputError` (it would wrap around); one whose density reaches the box's faces warns.
    """
    _check_grid(box, pixel_size_a)
    if b_factor is not None and not b_factor >= 0:
        raise InputError(f"b_factor must be >= 0, got {b_factor!r}", source)
    structure = structure.clone()
    model = structure[0]
    xyz, weight, _ = _atom_arrays(model)
    if len(xyz) == 0 or weight.sum() <= 0:
        raise InputError("no atoms to render", source)
    b_min = math.inf
    for cra in model.all():
        cra.atom.aniso = gemmi.SMat33f(0, 0, 0, 0, 0, 0)
        if b_factor is not None:
            cra.atom.b_iso = b_factor
        b_min = min(b_min, cra.atom.b_iso)
    b_nyquist = 16.0 * math.log(1.0 / NYQUIST_AMPLITUDE) * pixel_size_a**2
    blur = max(0.0, b_nyquist - b_min)

    centre = (xyz * weight[:, None]).sum(0) / weight.sum() if center else np.zeros(3)
    lo, hi = -(box // 2) * pixel_size_a, (box - 1 - box // 2) * pixel_size_a
    rel = xyz - centre  # (n, 3) coordinates in the box convention, Å
    outside = int(((rel < lo - 0.5 * pixel_size_a) | (rel > hi + 0.5 * pixel_size_a)).any(1).sum())
    if outside:
        extent = float(np.abs(rel).max())
        raise InputError(
            f"{outside} atoms lie outside the {box}^3 box at {pixel_size_a} Å/pixel (atoms reach "
            f"{extent:.1f} Å from the centre, the box half-width is {box * pixel_size_a / 2:.1f} Å);"
            " use a larger box or pixel size", source)
    tail_a = 3.0 * math.sqrt((b_min + blur) / (8 * math.pi**2))
    near = int(((rel < lo + tail_a) | (rel > hi - tail_a)).any(1).sum())
    if near:
        warnings.warn(
            f"{source or 'structure'}: {near} atoms lie within {tail_a:.1f} Å of the box faces; "
            "their density wraps around to the opposite face", stacklevel=2)

    shift = (box // 2) * pixel_size_a - centre
    model.transform_pos_and_adp(gemmi.Transform(gemmi.Mat33(), gemmi.Vec3(*shift.tolist())))
    calc = gemmi.DensityCalculatorE()
    edge = box * pixel_size_a
    calc.grid.unit_cell = gemmi.UnitCell(edge, edge, edge, 90, 90, 90)
    calc.grid.spacegroup = gemmi.find_spacegroup_by_name("P1")
    calc.grid.set_size(box, box, box)
    calc.blur = blur
    calc.cutoff = 1e-7  # density below which a Gaussian is cut; keeps the integral to ~1e-4
    calc.put_model_density_on_grid(model)
    density = np.array(calc.grid, copy=True)  # (x, y, z)
    return torch.from_numpy(np.ascontiguousarray(density.transpose(2, 1, 0), dtype=np.float32))


def volume_from_atoms(path: str | Path, box: int, pixel_size_a: float, *, center: bool = True,
                      b_factor: float | None = None, hydrogens: bool = False,
                      ligands: bool = True) -> torch.Tensor:
    """Potential map ``(box, box, box)`` [z, y, x] of a PDB/mmCIF file (see the module docstring).

    Hydrogens and waters are removed (``hydrogens=True`` keeps hydrogens), ligands kept unless
    ``ligands=False``. ``center=False`` puts the file's origin at voxel ``box // 2``.
    """
    structure = read_structure(path, hydrogens=hydrogens, ligands=ligands)
    return volume_from_structure(structure, box, pixel_size_a, center=center,
                                 b_factor=b_factor, source=path)


# ---------------------------------------------------------------------------------- MRC maps
def _center_crop_pad(data: np.ndarray, box: int) -> np.ndarray:
    """Crop or zero-pad every axis to ``box`` keeping index ``n // 2`` at ``box // 2``."""
    out = np.zeros((box, box, box), dtype=np.float32)
    src, dst = [], []
    for n in data.shape:
        start = box // 2 - n // 2  # where input index 0 lands
        lo, hi = max(0, start), min(box, start + n)
        dst.append(slice(lo, hi))
        src.append(slice(lo - start, hi - start))
    out[tuple(dst)] = data[tuple(src)]
    return out


def _lowpass(data: np.ndarray, cutoff_per_a: float, pixel_size_a: float) -> np.ndarray:
    """Raised-cosine low-pass: 1 below 0.85·cutoff, 0 above cutoff (spatial frequency in 1/Å)."""
    freqs = np.meshgrid(*[np.fft.fftfreq(n, d=pixel_size_a) for n in data.shape], indexing="ij",
                        sparse=True)
    s = np.sqrt(sum(f**2 for f in freqs))
    ramp = np.clip((s - 0.85 * cutoff_per_a) / (0.15 * cutoff_per_a), 0.0, 1.0)
    return np.fft.ifftn(np.fft.fftn(data) * 0.5 * (1 + np.cos(np.pi * ramp))).real


def volume_from_map(path: str | Path, box: int | None = None,
                    pixel_size_a: float | None = None) -> tuple[torch.Tensor, float]:
    """Read an MRC map as ``(box, box, box)`` [z, y, x] float32 and its pixel size (Å).

    Without arguments the map keeps its pixel size and is zero-padded to a cube. A different
    ``pixel_size_a`` resamples it (low-pass to the new Nyquist when coarsening, then cubic-spline
    interpolation) about the voxel ``n // 2`` → ``box // 2``; values keep their units, so
    ``sum * pixel**3`` is preserved. ``box`` defaults to the map's largest edge in the new pixels.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", path)
    try:
        with mrcfile.open(path, mode="r") as mrc:
            data = np.asarray(mrc.data, dtype=np.float32)
            header = mrc.header
            order = [int(header.maps), int(header.mapr), int(header.mapc)]
            voxel = [float(mrc.voxel_size.x), float(mrc.voxel_size.y), float(mrc.voxel_size.z)]
    except (ValueError, OSError) as exc:
        raise InputError(f"cannot read as an MRC map ({exc})", path) from exc
    if data.ndim != 3 or sorted(order) != [1, 2, 3]:
        raise InputError(f"not a 3D map (shape {data.shape}, axis order {order})", path)
    data = data.transpose([order.index(3), order.index(2), order.index(1)])  # (z, y, x)
    if min(voxel) <= 0 or max(voxel) - min(voxel) > 1e-3 * max(voxel):
        raise InputError(f"needs an isotropic voxel size in its header, got {voxel} Å", path)
    p0 = voxel[0]
    p1 = p0 if pixel_size_a is None else float(pixel_size_a)
    if box is None:
        box = int(round(max(data.shape) * p0 / p1))
    _check_grid(box, p1)
    if abs(p1 / p0 - 1.0) < 1e-4:
        return torch.from_numpy(_center_crop_pad(data, box)), p0
    if p1 > p0:
        data = _lowpass(data, 0.5 / p1, p0)
    scale = p1 / p0
    offset = [n // 2 - (box // 2) * scale for n in data.shape]
    out = scipy.ndimage.affine_transform(data.astype(np.float64), [scale] * 3, offset=offset,
                                         output_shape=(box, box, box), order=3,
                                         mode="grid-constant", cval=0.0)
    return torch.from_numpy(out.astype(np.float32)), p1


# -------------------------------------------------------------------------------- dispatching
def _suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def load_volume(spec: str | Path, box: int, pixel_size_a: float) -> torch.Tensor:
    """Volume ``(box, box, box)`` [z, y, x] from an atom file, an MRC map or a builtin id.

    Dispatches on the extension: .pdb/.ent/.cif/.mmcif (optionally .gz) are rendered as the
    electron-scattering potential (Å⁻², see the module docstring), .mrc/.map are read and
    resampled with their own units. Nothing is normalised.
    """
    path = Path(spec)
    suffix = _suffix(path)
    if path.is_file() and suffix in MAP_SUFFIXES:
        return volume_from_map(path, box, pixel_size_a)[0]
    if path.is_file() and suffix not in STRUCTURE_SUFFIXES:
        raise InputError(
            f"unknown extension {suffix!r}; expected one of "
            f"{', '.join(STRUCTURE_SUFFIXES + MAP_SUFFIXES)} (optionally .gz)", path)
    return volume_from_atoms(resolve_structure(spec), box, pixel_size_a)
