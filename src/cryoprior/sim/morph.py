"""Conformations between two models of one protein: matched atoms, superposed, linearly interpolated.

``morph_structures(A, B, steps)`` returns ``steps`` models: atoms present in both files (same
chain, residue number, insertion code, residue name and atom name; first alternate location)
are kept, B is superposed onto A (Kabsch, least squares over the matched atoms), and model ``i``
has coordinates ``(1 − f) · A + f · B'`` with ``f = i / (steps − 1)``. Model 0 is A, the last is
B moved rigidly onto A. All models are centred on A's matched-atom centroid, so that the
conformations share one frame and ``volume_from_structure(..., center=False)`` puts that point
at the box centre. The built-in 1ake/4ake pair is adenylate kinase closed (with the inhibitor
Ap5A, which has no partner and is dropped) and open.

>>> models = morph_structures("1ake", "4ake", 5)          # doctest: +SKIP
>>> vols = morph_volumes("1ake", "4ake", 5, box=64, pixel_size_a=2.0)   # (5, 64, 64, 64)  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import gemmi
import numpy as np
import torch

from cryoprior.errors import InputError
from cryoprior.sim.structures import read_structure, resolve_structure, volume_from_structure

AtomKey = tuple[str, int, str, str, str]


def _atoms(structure: gemmi.Structure) -> dict[AtomKey, np.ndarray]:
    out: dict[AtomKey, np.ndarray] = {}
    for chain in structure[0]:
        for res in chain:
            for atom in res:
                if atom.altloc not in ("\0", "A"):
                    continue
                key = (chain.name, res.seqid.num, res.seqid.icode, res.name, atom.name)
                out.setdefault(key, np.array(atom.pos.tolist()))
    return out


def kabsch(moving: np.ndarray, fixed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rotation ``R`` (3, 3) and translation ``t`` (3,) minimising Σ ‖R·moving_i + t − fixed_i‖²."""
    mc, fc = moving.mean(0), fixed.mean(0)
    h = (moving - mc).T @ (fixed - fc)
    u, _, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(vt.T @ u.T))
    r = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    return r, fc - r @ mc


def rmsd(a: np.ndarray, b: np.ndarray) -> float:
    """Root-mean-square distance of two ``(m, 3)`` coordinate sets (no superposition)."""
    return float(np.sqrt(((a - b) ** 2).sum(1).mean()))


def matched_coordinates(spec_a: str | Path, spec_b: str | Path):
    """``(structure A with only the matched atoms, keys, xyz_a (m, 3), xyz_b (m, 3) superposed)``."""
    sa = read_structure(resolve_structure(spec_a), ligands=True)
    sb = read_structure(resolve_structure(spec_b), ligands=True)
    atoms_a, atoms_b = _atoms(sa), _atoms(sb)
    keys = [k for k in atoms_a if k in atoms_b]
    if len(keys) < 3:
        raise InputError(f"only {len(keys)} atoms match between {spec_a} and {spec_b} (same chain, residue, atom name)", spec_b)
    xa = np.stack([atoms_a[k] for k in keys])
    xb = np.stack([atoms_b[k] for k in keys])
    r, t = kabsch(xb, xa)
    keep = set(keys)
    for chain in sa[0]:
        for res in chain:
            for i in reversed(range(len(res))):
                atom = res[i]
                if (chain.name, res.seqid.num, res.seqid.icode, res.name, atom.name) not in keep or atom.altloc not in ("\0", "A"):
                    del res[i]
    sa.remove_empty_chains()
    return sa, keys, xa, xb @ r.T + t


def morph_structures(spec_a: str | Path, spec_b: str | Path, steps: int = 5) -> list[gemmi.Structure]:
    """``steps`` (≥ 2) models from A to B (see the module docstring), centred on A's centroid."""
    if steps < 2:
        raise InputError(f"a morph needs at least 2 steps, got {steps}")
    base, keys, xa, xb = matched_coordinates(spec_a, spec_b)
    centre = xa.mean(0)
    index = {k: i for i, k in enumerate(keys)}
    models = []
    for i in range(steps):
        f = i / (steps - 1)
        xyz = (1 - f) * xa + f * xb - centre
        model = base.clone()
        for chain in model[0]:
            for res in chain:
                for atom in res:
                    p = xyz[index[(chain.name, res.seqid.num, res.seqid.icode, res.name, atom.name)]]
                    atom.pos = gemmi.Position(*p.tolist())
        models.append(model)
    return models


def model_coordinates(model: gemmi.Structure) -> np.ndarray:
    """All atom positions ``(m, 3)`` of the first model, in file order."""
    return np.array([cra.atom.pos.tolist() for cra in model[0].all()])


def morph_volumes(spec_a, spec_b, steps: int, box: int, pixel_size_a: float) -> list[torch.Tensor]:
    """One potential map ``(box, box, box)`` per morph step, in A's frame (centroid at the centre)."""
    return [volume_from_structure(m, box, pixel_size_a, center=False, source=f"morph {spec_a}->{spec_b}")
            for m in morph_structures(spec_a, spec_b, steps)]
