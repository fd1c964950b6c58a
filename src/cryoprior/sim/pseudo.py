"""Procedural pseudo-proteins: extra, endlessly varied training maps for a 3D denoiser.

A pseudo-protein is made of one or more domains (one per ~1500-4000 atoms), each an ellipsoid of
random axis ratios and orientation, packed against the domains before it; their total volume
gives protein density (0.81 Da/Å³, about 17.4 Å³ per heavy atom). Inside each domain a
self-avoiding chain of Cα beads grows, 3.80 Å apart with Cα-Cα-Cα angles of 85-150° and no two
Cα closer than 4 Å; where it gets stuck a new chain starts at the freest spot, so pseudo-proteins
are complexes of a few chains. Each Cα gets a trans-peptide backbone (N, C, O) and a side chain
whose length and elements follow a random amino-acid type drawn with natural frequencies;
side-chain atoms take 1.52 Å bonds at 105-125° angles, avoid the atoms already placed and stay
within 1.5 Å of the domains' surface. The model is rendered by
:func:`cryoprior.sim.structures.volume_from_structure`, so its map has the same units,
centring and band limit as one from a PDB file.

>>> vol = pseudo_protein(64, 2.0, n_atoms=3000, seed=1)  # doctest: +SKIP
"""

from __future__ import annotations

import math
import string

import gemmi
import numpy as np
import torch
from scipy.spatial import cKDTree

from cryoprior.errors import InputError
from cryoprior.sim.structures import volume_from_structure

__all__ = ["pseudo_protein", "pseudo_protein_structure"]

CA_STEP_A = 3.80
VOLUME_PER_ATOM_A3 = 17.4
B_FACTOR_A2 = 30.0
_MIN_CA_DISTANCE_A = 4.0
_TRIES = 64

# amino acid: (natural frequency %, side-chain elements from Cβ outwards)
_RESIDUES = {
    "GLY": (7.1, ""), "ALA": (8.3, "C"), "SER": (6.6, "CO"), "CYS": (1.4, "CS"),
    "VAL": (6.9, "CCC"), "THR": (5.3, "COC"), "PRO": (4.7, "CCC"), "ILE": (5.9, "CCCC"),
    "LEU": (9.7, "CCCC"), "ASP": (5.5, "CCOO"), "ASN": (4.1, "CCON"), "GLU": (6.8, "CCCOO"),
    "GLN": (3.9, "CCCON"), "LYS": (5.8, "CCCCN"), "MET": (2.4, "CCSC"), "HIS": (2.3, "CCNCCN"),
    "PHE": (3.9, "CCCCCCC"), "ARG": (5.5, "CCCNCNN"), "TYR": (2.9, "CCCCCCCO"),
    "TRP": (1.1, "CCCCNCCCCC"),
}
_CHAIN_IDS = string.ascii_uppercase + string.ascii_lowercase + string.digits
_SC_NAMES = ["CB", "CG", "CD", "CE", "CZ", "CH", "CI", "CJ", "CK", "CL"]


def _peptide_frame() -> dict[str, np.ndarray]:
    """C, O of residue i and N of i+1 in the frame x = Cα_i→Cα_i+1 (3.80 Å), y in-plane."""
    def turn(v: np.ndarray, deg: float) -> np.ndarray:
        c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
        return np.array([c * v[0] - s * v[1], s * v[0] + c * v[1]])

    ca1 = np.zeros(2)
    c = np.array([1.52, 0.0])
    n = c + 1.33 * turn((ca1 - c) / 1.52, -116.2)  # Cα-C-N 116.2°
    ca2 = n + 1.46 * turn((c - n) / 1.33, 121.7)  # C-N-Cα 121.7°, trans: Cα-Cα 3.80 Å
    o = c + 1.23 * turn((ca1 - c) / 1.52, 120.5)  # Cα-C-O 120.5°, on the side away from N
    x = (ca2 - ca1) / np.linalg.norm(ca2 - ca1)
    y = np.array([-x[1], x[0]])
    return {k: np.array([v @ x, v @ y]) * CA_STEP_A / np.linalg.norm(ca2 - ca1)
            for k, v in {"C": c, "O": o, "N": n}.items()}


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _cone(rng: np.random.Generator, axis: np.ndarray, lo_deg: float, hi_deg: float,
          k: int) -> np.ndarray:
    """``k`` unit vectors at angles in [lo, hi] degrees from ``axis`` ``(3,)`` → ``(k, 3)``."""
    p = _unit(np.cross(axis, rng.normal(size=(k, 3))))  # (k, 3) perpendicular to axis
    ang = np.radians(rng.uniform(lo_deg, hi_deg, size=(k, 1)))
    return np.cos(ang) * axis + np.sin(ang) * p


class _Domains:
    """A union of ellipsoids: centres ``(k, 3)``, rotations ``(k, 3, 3)``, semi-axes ``(k, 3)``."""

    def __init__(self, n_atoms: int, radius_a: float, rng: np.random.Generator,
                 max_extent_a: float = math.inf):
        k = max(1, int(round(n_atoms / rng.uniform(1500, 4000))))
        self.fractions = rng.dirichlet(np.full(k, 4.0)) if k > 1 else np.ones(1)
        radii = radius_a * self.fractions ** (1 / 3)  # equal-volume sphere radius per domain
        ratios = np.exp(rng.normal(0.0, 0.35, size=(k, 3)))
        self.semi = radii[:, None] * ratios / np.prod(ratios, axis=1, keepdims=True) ** (1 / 3)
        self.rot = np.linalg.qr(rng.normal(size=(k, 3, 3)))[0]
        self.centre = np.zeros((k, 3))
        for j in range(1, k):  # touch a random earlier domain, overlapping the others least
            a = int(rng.integers(j))
            cand = self.centre[a] + 0.85 * (radii[a] + radii[j]) * _unit(rng.normal(size=(32, 3)))
            gap = np.linalg.norm(cand[:, None] - self.centre[None, :j], axis=-1)  # (32, j)
            overlap = np.maximum(0.0, 0.85 * (radii[None, :j] + radii[j]) - gap).sum(1)
            reach = np.linalg.norm(cand, axis=1) + self.semi[j].max()  # (32,) from domain 0
            overlap += 10.0 * np.maximum(0.0, reach - max_extent_a)
            self.centre[j] = cand[int(overlap.argmin())]

    def inside(self, points: np.ndarray, j: int | None = None, margin: float = 0.0,
               ) -> np.ndarray:
        """Whether ``points`` ``(..., 3)`` lie in domain ``j`` (any if None), grown by ``margin``."""
        idx = range(len(self.semi)) if j is None else [j]
        out = np.zeros(points.shape[:-1], dtype=bool)
        for d in idx:
            local = (points - self.centre[d]) @ self.rot[d]  # (..., 3) in the domain's frame
            out |= ((local / (self.semi[d] + margin)) ** 2).sum(-1) <= 1.0
        return out

    def sample(self, j: int, n: int, rng: np.random.Generator) -> np.ndarray:
        """About ``0.52 n`` uniform points ``(m, 3)`` inside domain ``j``."""
        local = rng.uniform(-1, 1, size=(n, 3))
        local = local[(local**2).sum(1) <= 1.0] * self.semi[j]
        return local @ self.rot[j].T + self.centre[j]


def _grow_ca(domain_of: np.ndarray, domains: _Domains, rng: np.random.Generator,
             ) -> tuple[np.ndarray, np.ndarray]:
    """Cα positions ``(n_res, 3)`` inside their domains (shrunk by 1.5 Å), and chain ids."""
    n_res = len(domain_of)
    ca = np.zeros((n_res, 3))
    chain = np.zeros(n_res, dtype=int)
    direction = _unit(rng.normal(size=3))
    tree, n_tree = cKDTree(np.zeros((0, 3))), 0  # rebuilt every 128 residues
    for i in range(n_res):
        if i - n_tree > 128:
            tree, n_tree = cKDTree(ca[: i - 1]), i - 1
        d = int(domain_of[i])
        if i > 0 and domain_of[i - 1] == d:
            prev = ca[i - 1]
            lo, hi = (30.0, 95.0) if i >= 2 and chain[i - 1] == chain[i - 2] else (0.0, 180.0)
            cand = prev + CA_STEP_A * _cone(rng, direction, lo, hi, _TRIES)  # (k, 3)
            ok = domains.inside(cand, d, margin=-1.5)
            if n_tree:
                ok &= tree.query(cand, distance_upper_bound=_MIN_CA_DISTANCE_A)[0] == np.inf
            if i - 1 > n_tree:
                dist = np.linalg.norm(cand[:, None] - ca[None, n_tree: i - 1], axis=-1)  # (k, m)
                ok &= dist.min(1) >= _MIN_CA_DISTANCE_A
            if ok.any():  # of the allowed steps, the one into the emptiest neighbourhood
                cand = cand[ok]
                crowd = tree.query_ball_point(cand, 8.0, return_length=True) if n_tree else 0
                if i - 1 > n_tree:
                    near = np.linalg.norm(cand[:, None] - ca[None, n_tree: i - 1], axis=-1) < 8.0
                    crowd = crowd + near.sum(1)
                ca[i], chain[i] = cand[int(np.argmin(crowd))], chain[i - 1]
                direction = _unit(ca[i] - prev)
                continue
        # first residue of a domain, or the chain is stuck: new chain at the freest spot
        cand = domains.sample(d, 2048, rng)
        ca[i] = cand[int(cKDTree(ca[:i]).query(cand)[0].argmax())] if i else cand[0] * 0.3
        chain[i] = chain[i - 1] + 1 if i else 0
        direction = _unit(rng.normal(size=3))
    return ca, chain


def _backbone(ca: np.ndarray, chain_of: np.ndarray, rng: np.random.Generator,
              ) -> tuple[np.ndarray, np.ndarray]:
    """N, Cα, C, O positions ``(n_res, 4, 3)`` and Cβ directions ``(n_res, 3)``.

    Each peptide plane (C, O of residue i; N of i+1) contains Cα_i→Cα_i+1 and is turned about
    it, among 8 random choices, to put O farthest from the other Cα atoms.
    """
    frame = _peptide_frame()
    ca_tree = cKDTree(ca)
    n_res = len(ca)
    bb = np.zeros((n_res, 4, 3))
    out = np.zeros((n_res, 3))
    next_n = np.zeros(3)  # N of residue i, on the peptide plane of residue i-1
    for i in range(n_res):
        nxt = i + 1 < n_res and chain_of[i + 1] == chain_of[i]
        bwd = i > 0 and chain_of[i - 1] == chain_of[i]
        u = _unit(ca[i + 1] - ca[i]) if nxt else _unit(rng.normal(size=3))  # (3,) chain axis
        w = _unit(np.cross(u, rng.normal(size=(8, 3))))  # (8, 3) trial plane normals
        v = np.cross(w, u)  # (8, 3) in-plane perpendiculars
        o = ca[i] + frame["O"][0] * u + frame["O"][1] * v  # (8, 3)
        best = int(ca_tree.query(o, k=3)[0][:, -1].argmax())
        w, v = w[best], v[best]
        n_this = ca[i] + frame["N"][0] * u + frame["N"][1] * v  # N of residue i+1
        n_i = next_n if bwd else n_this - CA_STEP_A * u
        c_i = ca[i] + frame["C"][0] * u + frame["C"][1] * v
        bb[i] = [n_i, ca[i], c_i, o[best]]
        out[i] = _unit(2 * ca[i] - n_i - c_i + 0.8 * w * rng.choice([-1.0, 1.0]))
        next_n = n_this
    return bb, out


def _side_chains(bb: np.ndarray, out: np.ndarray, lengths: np.ndarray, domains: _Domains,
                 rng: np.random.Generator) -> np.ndarray:
    """Side-chain atoms ``(n_res, max(lengths), 3)`` (NaN past each length), grown from Cα.

    Atom k of every residue is placed at once, choosing among 12 candidates (1.52 Å bonds, Cβ
    within 25° of ``out``, then bond angles of 105-125°) the first that is within 1.5 Å of the
    domains and 3.2 Å clear of the backbone and of the side-chain atoms already placed (its own
    1-2 and 1-3 partners excepted), or else the clearest.
    """
    n_res, depth = len(lengths), int(lengths.max(initial=0))
    sc = np.full((n_res, depth, 3), np.nan)
    bb_tree = cKDTree(bb.reshape(-1, 3))  # (4 n_res, 3); atom j belongs to residue j // 4
    cur, axis = bb[:, 1].copy(), out.copy()  # (n_res, 3)
    for k in range(depth):
        act = np.flatnonzero(lengths > k)  # (m,) residues that have atom k
        lo, hi = (0.0, 25.0) if k == 0 else (55.0, 75.0)
        perp = _unit(np.cross(axis[act, None], rng.normal(size=(len(act), 12, 3))))  # (m, 12, 3)
        ang = np.radians(rng.uniform(lo, hi, size=(len(act), 12, 1)))
        cand = cur[act, None] + 1.52 * (np.cos(ang) * axis[act, None] + np.sin(ang) * perp)
        flat = cand.reshape(-1, 3)  # (m * 12, 3)
        owner = np.repeat(act, 12)[:, None]  # (m * 12, 1)
        dist, idx = bb_tree.query(flat, k=6)
        dist = np.where(idx // 4 == owner, np.inf, dist).min(1)  # own backbone is bonded
        if k:
            done = sc[:, :k][lengths[:, None] > np.arange(k)]  # (p, 3) atoms of levels < k
            res_of = np.nonzero(lengths[:, None] > np.arange(k))  # (residue, level) of each
            d2, j2 = cKDTree(done).query(flat, k=min(4, len(done)))
            d2, j2 = d2.reshape(len(flat), -1), j2.reshape(len(flat), -1)
            partner = (res_of[0][j2] == owner) & (res_of[1][j2] >= k - 2)
            dist = np.minimum(dist, np.where(partner, np.inf, d2).min(1))
        score = np.minimum(dist, 3.2) - 10.0 * ~domains.inside(flat, margin=1.5)
        best = score.reshape(len(act), 12).argmax(1)  # (m,) first of the best
        chosen = cand[np.arange(len(act)), best]  # (m, 3)
        axis[act] = _unit(chosen - cur[act])
        cur[act] = chosen
        sc[act, k] = chosen
    return sc


def pseudo_protein_structure(n_atoms: int, seed: int, radius_a: float | None = None,
                             max_extent_a: float = math.inf) -> gemmi.Structure:
    """A pseudo-protein of exactly ``n_atoms`` heavy atoms (C, N, O, S), deterministic in ``seed``.

    ``radius_a`` is the radius of the sphere with the volume of all domains together; by
    default the one that gives protein density, ``(3 · 17.4 Å³ · n_atoms / 4π)^(1/3)``.
    Domains are laid out, where they can be, within ``max_extent_a`` Å of the first one.
    """
    if int(n_atoms) < 1:
        raise InputError(f"n_atoms must be >= 1, got {n_atoms!r}")
    if radius_a is not None and not radius_a > 0:
        raise InputError(f"radius_a must be > 0, got {radius_a!r}")
    rng = np.random.default_rng(seed)
    names = list(_RESIDUES)
    freq = np.array([_RESIDUES[r][0] for r in names])
    residues: list[str] = []
    count = 0
    while count < n_atoms:
        residues.append(names[rng.choice(len(names), p=freq / freq.sum())])
        count += 4 + len(_RESIDUES[residues[-1]][1])

    radius = radius_a or (3 * VOLUME_PER_ATOM_A3 * n_atoms / (4 * math.pi)) ** (1 / 3)
    domains = _Domains(int(n_atoms), radius, rng, max_extent_a)
    bounds = np.cumsum(domains.fractions)[:-1] * len(residues)
    domain_of = np.searchsorted(bounds, np.arange(len(residues)), side="right")  # (n_res,)
    ca, chain_of = _grow_ca(domain_of, domains, rng)
    bb, out = _backbone(ca, chain_of, rng)
    lengths = np.array([len(_RESIDUES[r][1]) for r in residues])
    sides = _side_chains(bb, out, lengths, domains, rng)

    structure = gemmi.Structure()
    structure.add_model(gemmi.Model(1))  # gemmi >= 0.7: models are numbered
    model = structure[0]
    atoms_left = int(n_atoms)
    for i, resname in enumerate(residues):
        if i == 0 or chain_of[i] != chain_of[i - 1]:
            model.add_chain(gemmi.Chain(_CHAIN_IDS[int(chain_of[i]) % len(_CHAIN_IDS)]))
        residue = gemmi.Residue()
        residue.name = resname
        residue.seqid = gemmi.SeqId(i + 1, " ")
        entries = list(zip(["N", "CA", "C", "O"], "NCCO", bb[i]))
        entries += list(zip(_SC_NAMES, _RESIDUES[resname][1], sides[i]))
        for name, element, xyz in entries[:atoms_left]:
            atom = gemmi.Atom()
            atom.name, atom.element = name, gemmi.Element(element)
            atom.pos = gemmi.Position(*xyz.tolist())
            atom.occ, atom.b_iso = 1.0, B_FACTOR_A2
            residue.add_atom(atom)
        atoms_left -= min(atoms_left, len(entries))
        model[len(model) - 1].add_residue(residue)
    structure.setup_entities()
    return structure


def pseudo_protein(box: int, pixel_size_a: float, n_atoms: int, seed: int,
                   radius_a: float | None = None) -> torch.Tensor:
    """Potential map ``(box, box, box)`` [z, y, x] of :func:`pseudo_protein_structure`.

    Same units (Å⁻²), centring (potential-weighted centre at voxel box//2) and Nyquist band
    limit as :func:`cryoprior.sim.structures.volume_from_atoms`; deterministic for a seed. The
    domains are kept, where possible, within about 0.4·box·pixel of the centre; a molecule too
    big for the box raises :class:`InputError`.
    """
    structure = pseudo_protein_structure(n_atoms, seed, radius_a,
                                         max_extent_a=0.8 * 0.4 * box * pixel_size_a)
    return volume_from_structure(structure, box, pixel_size_a,
                                 source=f"pseudo-protein(n_atoms={n_atoms}, seed={seed})")
