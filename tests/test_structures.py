"""Structures → volumes: the [z, y, x] / box//2 convention, units, band limit, element repair."""

import math

import gemmi
import mrcfile
import numpy as np
import pytest
import torch

from cryoprior.errors import InputError
from cryoprior.sim.pseudo import pseudo_protein, pseudo_protein_structure
from cryoprior.sim.structures import (
    builtin_structure_path,
    list_builtin_structures,
    load_volume,
    max_radius_a,
    radius_of_gyration_a,
    read_structure,
    recommended_pixel_size_a,
    volume_from_atoms,
    volume_from_map,
    volume_from_structure,
)

F0_CARBON = sum(gemmi.Element("C").c4322.get_coefs()[:5])  # ∫ potential of one C atom, Å


def pdb_line(serial, name, resname, resseq, xyz, element="", chain="A", b=20.0, charmm=False,
             record="ATOM"):
    """One PDB ATOM/HETATM line; ``charmm`` left-aligns the name and omits the element."""
    if charmm:
        field, element = f"{name:<4}", ""
    else:
        field = f" {name:<3}" if len(name) < 4 and len(element.strip()) == 1 else f"{name:<4}"
    x, y, z = xyz
    return (f"{record:<6}{serial:>5} {field} {resname:<4}{chain}{resseq:>4}    "
            f"{x:8.3f}{y:8.3f}{z:8.3f}{1.0:6.2f}{b:6.2f}          {element:>2}\n")


def write_pdb(path, atoms, **kw):
    """``atoms``: (name, resname, resseq, (x, y, z), element) tuples."""
    path.write_text("".join(pdb_line(i + 1, *a, **kw) for i, a in enumerate(atoms)) + "END\n")
    return path


def centre_of_mass(vol):
    idx = [torch.arange(n, dtype=torch.float64) for n in vol.shape]
    grids = torch.meshgrid(*idx, indexing="ij")
    v = vol.double()
    return [float((v * g).sum() / v.sum()) for g in grids]  # [z, y, x]


def peak(vol):
    return tuple(int(i) for i in np.unravel_index(int(vol.argmax()), vol.shape))


# --------------------------------------------------------------------------------- convention
@pytest.mark.parametrize("box", [32, 33])
def test_atom_offsets_land_on_the_zyx_axes(tmp_path, box):
    """x offsets move along the last array axis, z along the first; file origin at box//2."""
    c = box // 2
    for shift, expected in [((10, 0, 0), (c, c, c + 10)), ((0, 6, 0), (c, c + 6, c)),
                            ((0, 0, -8), (c - 8, c, c))]:
        path = write_pdb(tmp_path / "one.pdb", [("C1", "LIG", 1, shift, "C")], record="HETATM")
        vol = volume_from_atoms(path, box, 1.0, center=False)
        assert peak(vol) == expected
        com = centre_of_mass(vol)
        assert np.allclose(com, expected, atol=0.02), com


def test_three_atoms_asymmetric_and_centred(tmp_path):
    """Three atoms at different distances on x, y, z: each peak on its own axis, centred."""
    atoms = [("C1", "LIG", 1, (9.0, 0, 0), "C"), ("C2", "LIG", 1, (0, -6.0, 0), "C"),
             ("C3", "LIG", 1, (0, 0, 4.0), "C"), ("C4", "LIG", 1, (0, 0, 0), "C")]
    path = write_pdb(tmp_path / "three.pdb", atoms, record="HETATM")
    box, c = 40, 20
    vol = volume_from_atoms(path, box, 1.0, center=False)
    for z, y, x in [(c, c, c + 9), (c, c - 6, c), (c + 4, c, c)]:
        patch = vol[z - 1: z + 2, y - 1: y + 2, x - 1: x + 2]
        assert vol[z, y, x] == patch.max() and vol[z, y, x] > 0.5 * vol.max()
    centred = volume_from_atoms(path, box, 1.0, center=True)  # centre (2.25, -1.5, 1.0) Å
    assert np.allclose(centre_of_mass(centred), [c, c, c], atol=0.02)
    assert np.allclose(centre_of_mass(vol), [c + 1.0, c - 1.5, c + 2.25], atol=0.02)


@pytest.mark.parametrize("box", [63, 64])
def test_builtin_centre_of_mass_at_box_half(box):
    vol = volume_from_atoms(builtin_structure_path("1hvr"), box, 1.5)
    assert np.allclose(centre_of_mass(vol), [box // 2] * 3, atol=0.5)


# ---------------------------------------------------------------------------------- units
def test_integral_is_sum_of_scattering_factors_and_linear_in_atoms(tmp_path):
    line = [(f"C{i}", "LIG", 1, (3.0 * (i % 4) - 4.5, 3.0 * (i // 4) - 4.5, 0.0), "C")
            for i in range(16)]
    one = volume_from_atoms(write_pdb(tmp_path / "a.pdb", line[:8], record="HETATM"), 32, 1.0)
    two = volume_from_atoms(write_pdb(tmp_path / "b.pdb", line, record="HETATM"), 32, 1.0)
    assert float(one.sum()) == pytest.approx(8 * F0_CARBON, rel=2e-3)
    assert float(two.sum()) / float(one.sum()) == pytest.approx(2.0, rel=2e-3)
    per_atom = []
    for name in ["1hvr", "3enl", "7pbl"]:
        path = builtin_structure_path(name)
        p = recommended_pixel_size_a(name, 64)
        n = read_structure(path)[0].count_atom_sites()
        per_atom.append(float(volume_from_atoms(path, 64, p).sum()) * p**3 / n)
    assert max(per_atom) / min(per_atom) < 1.05  # ∝ atom count, ~2.4 Å per protein atom
    assert 2.2 < per_atom[0] < 2.7


def test_doubling_pixel_size_keeps_the_integral():
    path = builtin_structure_path("1ake")
    fine = float(volume_from_atoms(path, 64, 1.5).sum()) * 1.5**3
    coarse = float(volume_from_atoms(path, 32, 3.0).sum()) * 3.0**3
    assert coarse == pytest.approx(fine, rel=0.02)


def test_band_limited_to_nyquist():
    """Each atom keeps ≤ 5 % amplitude at Nyquist, so the cube's corners are nearly empty."""
    vol = volume_from_atoms(builtin_structure_path("1ake"), 64, 1.5).double()
    power = torch.fft.fftn(vol).abs() ** 2
    f = torch.fft.fftfreq(64, dtype=torch.float64)  # cycles/pixel
    k = torch.sqrt(f[:, None, None] ** 2 + f[None, :, None] ** 2 + f[None, None, :] ** 2)
    power[0, 0, 0] = 0.0
    corner = k > 0.5  # beyond Nyquist: 48 % of the voxels of the cube
    assert power[corner].sum() / power.sum() < 1e-3
    assert power[corner].mean() / power[k < 0.05].mean() < 1e-6


# --------------------------------------------------------------------------- element repair
def builtin_atoms(name="1hvr"):
    structure = read_structure(builtin_structure_path(name))
    return [(a.atom.name, a.residue.name, a.residue.seqid.num, a.atom.pos.tolist(),
             a.atom.element.name.upper(), a.chain.name) for a in structure[0].all()]


def write_atoms(path, atoms, charmm=False, ca_only=False):
    lines = []
    for i, (name, res, num, xyz, element, chain) in enumerate(atoms):
        if ca_only and name != "CA":
            continue
        if charmm:
            res = "HSD" if res == "HIS" else res
            name = "CD" if (res, name) == ("ILE", "CD1") else name
        lines.append(pdb_line(i + 1, name, res, num, xyz, element, chain=chain, charmm=charmm))
        if charmm and name == "N":  # CHARMM amide hydrogen, no element column
            lines.append(pdb_line(i + 1, "HN", res, num, [v + 1.0 for v in xyz], chain=chain,
                                  charmm=True))
    path.write_text("".join(lines) + "END\n")
    return path


@pytest.mark.parametrize("ca_only", [False, True])
def test_missing_elements_and_charmm_names_give_the_same_volume(tmp_path, ca_only):
    atoms = builtin_atoms()
    proper = volume_from_atoms(write_atoms(tmp_path / "p.pdb", atoms, ca_only=ca_only), 48, 1.5)
    charmm = volume_from_atoms(write_atoms(tmp_path / "c.pdb", atoms, charmm=True,
                                           ca_only=ca_only), 48, 1.5)
    assert torch.allclose(charmm, proper, rtol=1e-5, atol=1e-6 * float(proper.max()))
    structure = read_structure(tmp_path / "c.pdb")
    elements = {a.atom.element.name for a in structure[0].all()}
    assert elements <= {"C", "N", "O", "S"}


def test_ions_and_ligands_without_element_column(tmp_path):
    path = write_pdb(tmp_path / "ion.pdb", [("CA", "CA", 1, (0, 0, 0), "")], charmm=True,
                     record="HETATM")
    assert [a.atom.element.name for a in read_structure(path)[0].all()] == ["Ca"]
    f0_calcium = sum(gemmi.Element("Ca").c4322.get_coefs()[:5])
    assert float(volume_from_atoms(path, 24, 1.0).sum()) == pytest.approx(f0_calcium, rel=2e-3)
    # an MD-style file: left-aligned names everywhere, no element column
    atoms = [("CA", "ALA", 1, (0, 0, 0), ""), ("FE", "HEM", 2, (3, 0, 0), ""),
             ("CAA", "HEM", 2, (4, 0, 0), ""), ("HG1", "LIG", 3, (0, 3, 0), ""),
             ("CL1", "LIG", 3, (0, 4, 0), ""), ("SOD", "SOD", 4, (0, 0, 3), "")]
    path = write_pdb(tmp_path / "md.pdb", atoms, charmm=True)
    found = [a.atom.element.name for a in read_structure(path, hydrogens=True)[0].all()]
    assert found == ["C", "Fe", "C", "H", "Cl", "Na"]
    # MD tools write sodium/chloride ions with element N/C; a 1-atom "NA"/"CL" residue is the ion
    path = write_pdb(tmp_path / "ions.pdb", [("NA", "NA+", 1, (0, 0, 0), "N"),
                                             ("CL", "CL", 2, (4, 0, 0), "C")], record="HETATM")
    assert [a.atom.element.name for a in read_structure(path)[0].all()] == ["Na", "Cl"]


def test_hydrogens_and_waters_do_not_change_the_volume(tmp_path):
    atoms = builtin_atoms("1h4a")
    base = volume_from_atoms(write_atoms(tmp_path / "a.pdb", atoms), 48, 1.5)
    extra = "".join(
        pdb_line(90000 + i, name, res, num, [v + 0.9 for v in xyz], el, chain=ch)
        for i, (name, res, num, xyz, _, ch) in enumerate(atoms[:200])
        for name, el in [("H", "H"), ("1HD1", "")])
    water = pdb_line(99999, "O", "HOH", 900, [1.0, 2.0, 3.0], "O", record="HETATM")
    text = (tmp_path / "a.pdb").read_text().replace("END\n", extra + water + "END\n")
    (tmp_path / "h.pdb").write_text(text)
    with_h = volume_from_atoms(tmp_path / "h.pdb", 48, 1.5)
    assert torch.equal(with_h, base)
    kept = volume_from_atoms(tmp_path / "h.pdb", 48, 1.5, hydrogens=True)
    assert float(kept.sum()) > float(base.sum()) * 1.02


def test_mmcif_and_pdb_agree(tmp_path):
    structure = gemmi.read_structure(str(builtin_structure_path("3enl")))
    structure.setup_entities()
    structure.make_mmcif_document().write_file(str(tmp_path / "3enl.cif"))
    from_cif = volume_from_atoms(tmp_path / "3enl.cif", 48, 2.0)
    from_pdb = volume_from_atoms(builtin_structure_path("3enl"), 48, 2.0)
    assert torch.allclose(from_cif, from_pdb, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------ errors
def test_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.pdb"
    with pytest.raises(InputError, match="missing.pdb") as err:
        volume_from_atoms(missing, 32, 1.0)
    assert err.value.path == missing
    only_water = write_pdb(tmp_path / "water.pdb", [("O", "HOH", 1, (0, 0, 0), "O"),
                                                    ("H1", "HOH", 1, (0.9, 0, 0), "H")])
    with pytest.raises(InputError, match="water.pdb.*no atoms"):
        volume_from_atoms(only_water, 32, 1.0)
    only_h = write_pdb(tmp_path / "hydrogen.pdb", [("H", "ALA", 1, (0, 0, 0), "H")])
    with pytest.raises(InputError, match="hydrogen.pdb"):
        volume_from_atoms(only_h, 32, 1.0)
    (tmp_path / "junk.cif").write_text("this is not a structure\n")
    with pytest.raises(InputError, match="junk.cif"):
        volume_from_atoms(tmp_path / "junk.cif", 32, 1.0)
    with pytest.raises(InputError, match="1ake"):
        builtin_structure_path("9zzz")
    with pytest.raises(InputError, match="outside the 32\\^3 box"):
        volume_from_atoms(builtin_structure_path("7pbl"), 32, 1.0)
    (tmp_path / "x.xyz").write_text("1\n")
    with pytest.raises(InputError, match="x.xyz"):
        load_volume(str(tmp_path / "x.xyz"), 32, 1.0)


# ------------------------------------------------------------------------- builtins and maps
def test_builtin_set():
    names = list_builtin_structures()
    assert len(names) >= 20 and {"1ake", "4ake"} <= set(names)
    assert builtin_structure_path("1AKE") == builtin_structure_path("1ake")
    # the open conformation is the larger one
    assert radius_of_gyration_a("4ake") > radius_of_gyration_a("1ake") + 2.0


def test_all_builtins_fit_64_at_recommended_pixel_size():
    for name in list_builtin_structures():
        p = recommended_pixel_size_a(name, 64)
        r = max_radius_a(name)
        assert r <= 0.4 * 64 * p and (p == 0.25 or r > 0.4 * 64 * (p - 0.25))
        assert p <= 3.0
        vol = load_volume(name, 64, p)  # warnings are errors: no wrap-around either
        assert vol.shape == (64, 64, 64) and vol.dtype == torch.float32
        assert float(vol.min()) >= 0 and torch.isfinite(vol).all()


def write_mrc(path, vol, pixel, axis_order=(1, 2, 3)):
    """``axis_order`` = (mapc, mapr, maps); data stored accordingly from a [z, y, x] array."""
    stored = vol.numpy()
    if axis_order == (3, 2, 1):
        stored = stored.transpose(2, 1, 0)
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.ascontiguousarray(stored, dtype=np.float32))
        mrc.voxel_size = pixel
        mrc.header.mapc, mrc.header.mapr, mrc.header.maps = axis_order
    return path


def test_map_round_trip_axis_order_and_resampling(tmp_path):
    path = builtin_structure_path("1ake")
    vol = volume_from_atoms(path, 64, 1.0, b_factor=250.0)  # B above both Nyquist limits
    same, p = volume_from_map(write_mrc(tmp_path / "a.mrc", vol, 1.0))
    assert p == 1.0 and torch.equal(same, vol)
    swapped, _ = volume_from_map(write_mrc(tmp_path / "b.mrc", vol, 1.0, (3, 2, 1)))
    assert torch.equal(swapped, vol)
    padded, _ = volume_from_map(tmp_path / "a.mrc", box=71)
    assert centre_of_mass(padded) == pytest.approx([35.0] * 3, abs=0.5)
    coarse, p2 = volume_from_map(tmp_path / "a.mrc", box=40, pixel_size_a=2.0)
    direct = volume_from_atoms(path, 40, 2.0, b_factor=250.0)
    assert p2 == 2.0
    assert float(coarse.sum()) * 8 == pytest.approx(float(vol.sum()), rel=0.01)
    corr = torch.corrcoef(torch.stack([coarse.flatten(), direct.flatten()]))[0, 1]
    assert corr > 0.999 and torch.allclose(coarse, direct, atol=0.05 * float(direct.max()))
    fine, _ = volume_from_map(tmp_path / "a.mrc", box=80, pixel_size_a=0.8)
    assert torch.allclose(fine, volume_from_atoms(path, 80, 0.8, b_factor=250.0),
                          atol=0.01 * float(direct.max()))
    assert torch.equal(load_volume(str(tmp_path / "a.mrc"), 64, 1.0), vol)


# ----------------------------------------------------------------------------- pseudo-proteins
def test_pseudo_protein_is_deterministic_centred_and_protein_like():
    vol = pseudo_protein(48, 2.0, n_atoms=2000, seed=3)
    assert torch.equal(vol, pseudo_protein(48, 2.0, n_atoms=2000, seed=3))
    assert not torch.equal(vol, pseudo_protein(48, 2.0, n_atoms=2000, seed=4))
    assert np.allclose(centre_of_mass(vol), [24, 24, 24], atol=0.5)
    assert float(vol.sum()) * 8 / 2000 == pytest.approx(2.4, rel=0.1)  # like real proteins

    model = pseudo_protein_structure(2000, seed=3)[0]
    assert model.count_atom_sites() == 2000
    xyz = np.array([a.atom.pos.tolist() for a in model.all()])
    ca = [[np.array(r["CA"][0].pos.tolist()) for r in chain] for chain in model]
    steps = np.concatenate([np.linalg.norm(np.diff(c, axis=0), axis=1) for c in ca if len(c) > 1])
    assert np.allclose(steps, 3.80, atol=0.01)
    all_ca = np.concatenate(ca)
    d = np.linalg.norm(all_ca[:, None] - all_ca[None], axis=-1) + np.eye(len(all_ca)) * 99
    assert d.min() >= 3.79  # self-avoiding
    rg = math.sqrt(((xyz - xyz.mean(0)) ** 2).sum(1).mean())
    n_res = len(all_ca)
    assert 0.75 < rg / (2.2 * n_res**0.38) < 1.3  # globular proteins: Rg ≈ 2.2 N^0.38 Å


def test_large_pseudo_protein_has_domains_and_fits_its_box():
    structure = pseudo_protein_structure(9000, seed=5, max_extent_a=0.32 * 64 * 2.5)
    assert len(structure[0]) > 1 and structure[0].count_atom_sites() == 9000
    vol = volume_from_structure(structure, 64, 2.5)  # no wrap-around warning either
    assert float(vol.sum()) * 2.5**3 / 9000 == pytest.approx(2.4, rel=0.1)
    with pytest.raises(InputError, match="pseudo-protein"):
        pseudo_protein(16, 1.0, n_atoms=2000, seed=5)
