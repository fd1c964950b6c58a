"""The simulator: SNR as requested, poses that reconstruct the source, truth columns, contamination."""

import json
import math

import numpy as np
import pytest
import torch

from cryoprior.cli.main import main as cli
from cryoprior.core.ctf import ctf_2d
from cryoprior.core.fsc import fsc, resolution_at
from cryoprior.core.noise import measure_snr
from cryoprior.core.projection import project, reconstruct
from cryoprior.core.rotations import euler_to_matrix, viewing_direction_distance_deg
from cryoprior.io.mrc import read_map, write_mrcs
from cryoprior.io.stack import ParticleStack
from cryoprior.sim.dataset import SimulationConfig, discrete_view_rotations, simulate_dataset


def poses_from_star(stack):
    cols = [torch.from_numpy(stack.column(c)) for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")]
    return euler_to_matrix(*cols).float()


@pytest.fixture(scope="module")
def ctf_dataset(tmp_path_factory):
    """Uniform orientations, CTF, shifts, high SNR, box 32."""
    out = tmp_path_factory.mktemp("sim") / "ctf"
    cfg = SimulationConfig(structures=["1ake"], box=32, pixel_size_a=3.0, n=3000, views=None,
                           snr=100.0, snr_levels=[0.1, math.inf], ctf=True, shift_a=6.0, seed=3)
    simulate_dataset(cfg, out)
    return out


def test_measured_snr_matches_request(tmp_path):
    for snr in (0.1, 0.01):
        out = tmp_path / f"s{snr}"
        simulate_dataset(SimulationConfig(n=600, box=32, pixel_size_a=3.0, views=4, snr=snr, seed=1), out)
        stack = ParticleStack.from_file(out / "particles.star")
        clean = torch.from_numpy(stack.read_image_column("cpCleanImageName"))
        noisy = torch.from_numpy(stack.images())
        # the papers' SNR: variance of the clean image over the variance of the added noise
        measured = clean.var(dim=(-2, -1)).mean() / (noisy - clean).var(dim=(-2, -1)).mean()
        assert abs(measured.item() / snr - 1) < 0.05


def test_star_poses_ctf_and_origins_reconstruct_the_source(ctf_dataset):
    stack = ParticleStack.from_file(ctf_dataset / "particles.star")
    px = stack.pixel_size_a
    ctf = ctf_2d(stack.box, px, *(torch.from_numpy(stack.column(c)).float()
                                  for c in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle")),
                 voltage_kv=float(stack.column("rlnVoltage")[0]),
                 cs_mm=float(stack.column("rlnSphericalAberration")[0]),
                 amplitude_contrast=float(stack.column("rlnAmplitudeContrast")[0]))
    origins = torch.from_numpy(np.stack([stack.column("rlnOriginXAngst"),
                                         stack.column("rlnOriginYAngst")], 1) / px).float()
    vol = reconstruct(torch.from_numpy(stack.images()), poses_from_star(stack), ctf=ctf, shifts_px=origins,
                      wiener_constant=0.01)
    truth, _ = read_map(ctf_dataset / "volumes" / "1ake.mrc")
    curve = fsc(vol, torch.from_numpy(np.asarray(truth)), ndim=3)
    assert curve[1 : stack.box // 4 + 1].min() > 0.9  # up to half Nyquist
    # ignoring the origins ruins it: the sign convention matters
    wrong = reconstruct(torch.from_numpy(stack.images()), poses_from_star(stack), ctf=ctf, shifts_px=-origins,
                        wiener_constant=0.01)
    assert fsc(wrong, torch.from_numpy(np.asarray(truth)), ndim=3)[stack.box // 4] < 0.5
    assert resolution_at(curve, stack.box, px, 0.5) < 4 * px


def test_snr_levels_share_projections(ctf_dataset):
    stack = ParticleStack.from_file(ctf_dataset / "particles.star")
    clean = torch.from_numpy(stack.read_image_column("cpCleanImageName", np.arange(500)))
    low = torch.from_numpy(stack.read_image_column("cpImageNameSnr0p1", np.arange(500)))
    high = torch.from_numpy(stack.images(np.arange(500)))
    assert abs(measure_snr(clean, low).mean().item() / 0.1 - 1) < 0.1
    # same signal under both noise draws: the two residuals are uncorrelated noise
    r = torch.corrcoef(torch.stack([(low - clean).flatten(), (high - clean).flatten()]))[0, 1]
    assert abs(r.item()) < 0.02
    manifest = json.loads((ctf_dataset / "dataset.json").read_text())
    assert manifest["levels"] == {"0.1": "snr_0.1.mrcs", "inf": "clean.mrcs"}


def test_relion_written_star_angles(tmp_path):
    """A STAR as RELION writes it, with angles whose matrices are known, reconstructs the source:
    the images are made with the known matrices, not with our Euler conversion."""
    d = 24
    g = torch.Generator().manual_seed(0)
    vol = torch.randn(d, d, d, generator=g)
    from cryoprior.core.fft import fft3c, ifft3c, radius_grid

    r = radius_grid(d, 3)
    vol = ifft3c(fft3c(vol) * (r < d // 2 - 1)).real * (r < d // 2 - 2)
    # generated from the closed-form RELION matrices Rz(psi) Ry(tilt) Rz(rot)
    rng = np.random.default_rng(0)
    n = 1500
    rot, tilt, psi = rng.uniform(-180, 180, n), np.degrees(np.arccos(rng.uniform(-1, 1, n))), rng.uniform(-180, 180, n)

    def rz(a):  # RELION's Rz, one matrix per angle
        c, s = np.cos(np.radians(a)), np.sin(np.radians(a))
        zero, one = np.zeros_like(a), np.ones_like(a)
        return np.stack([np.stack([c, s, zero], -1), np.stack([-s, c, zero], -1),
                         np.stack([zero, zero, one], -1)], -2)

    def ry(b):
        c, s = np.cos(np.radians(b)), np.sin(np.radians(b))
        zero, one = np.zeros_like(b), np.ones_like(b)
        return np.stack([np.stack([c, zero, -s], -1), np.stack([zero, one, zero], -1),
                         np.stack([s, zero, c], -1)], -2)

    mats = torch.from_numpy(rz(psi) @ ry(tilt) @ rz(rot)).float()
    write_mrcs(tmp_path / "stack.mrcs", project(vol, mats), 2.0)
    rows = "\n".join(f"{i + 1:06d}@stack.mrcs {rot[i]:.6f} {tilt[i]:.6f} {psi[i]:.6f} 0.000000 0.000000 1"
                     for i in range(n))
    (tmp_path / "run_data.star").write_text(
        "\n# version 30001\n\ndata_optics\n\nloop_ \n_rlnOpticsGroupName #1 \n_rlnOpticsGroup #2 \n"
        "_rlnImagePixelSize #3 \n_rlnImageSize #4 \n_rlnImageDimensionality #5 \n"
        f"opticsGroup1            1     2.000000           {d}            2 \n \n\n# version 30001\n\n"
        "data_particles\n\nloop_ \n_rlnImageName #1 \n_rlnAngleRot #2 \n_rlnAngleTilt #3 \n"
        "_rlnAnglePsi #4 \n_rlnOriginXAngst #5 \n_rlnOriginYAngst #6 \n_rlnOpticsGroup #7 \n" + rows + "\n \n"
    )
    stack = ParticleStack.from_file(tmp_path / "run_data.star")
    torch.testing.assert_close(poses_from_star(stack), mats, atol=1e-5, rtol=0)
    rec = reconstruct(torch.from_numpy(stack.images()), poses_from_star(stack))
    assert fsc(rec, vol, ndim=3)[1 : d // 2 - 1].min() > 0.95


def test_discrete_views_inplane_and_labels(tmp_path):
    cfg = SimulationConfig(n=400, box=32, pixel_size_a=3.0, views=4, inplane=True, snr=1.0, seed=2)
    simulate_dataset(cfg, tmp_path / "v")
    stack = ParticleStack.from_file(tmp_path / "v" / "particles.star")
    views = stack.column("cpViewLabel")
    assert set(views) == {0, 1, 2, 3}
    base = discrete_view_rotations(4, seed=2).float()
    rots = poses_from_star(stack)
    # every particle looks along its view's direction; psi varies
    assert viewing_direction_distance_deg(rots, base[views]).max() < 1e-2
    assert np.ptp(stack.column("rlnAnglePsi")) > 180
    # the views are well separated
    dists = viewing_direction_distance_deg(base[:, None], base[None])
    assert dists[~torch.eye(4, dtype=bool)].min() > 60


def test_view_spread_fills_a_cap_around_each_view(tmp_path):
    """--view-spread 15: each viewing direction (read back from the STAR's angles) lies within 15°
    of its view's, spread uniformly over the cap (median angle arccos(1 − (1 − cos 15°)/2) = 10.6°)."""
    cfg = SimulationConfig(n=1000, box=32, pixel_size_a=3.0, views=4, inplane=True, view_spread_deg=15, snr=1.0, seed=3)
    simulate_dataset(cfg, tmp_path / "v")
    stack = ParticleStack.from_file(tmp_path / "v" / "particles.star")
    views = stack.column("cpViewLabel")
    tilt = viewing_direction_distance_deg(poses_from_star(stack), discrete_view_rotations(4, seed=3).float()[views]).numpy()
    assert tilt.max() < 15.01 and tilt.min() < 2
    assert np.median(tilt) == pytest.approx(math.degrees(math.acos(1 - (1 - math.cos(math.radians(15))) / 2)), abs=0.6)
    with pytest.raises(Exception, match="view-spread"):
        SimulationConfig(views=4, view_spread_deg=-1).validate()


@pytest.mark.parametrize("kind", ["A", "B", "C"])
def test_huber_contamination(tmp_path, kind):
    cfg = SimulationConfig(n=400, box=32, pixel_size_a=3.0, views=4, snr=1.0, contamination=kind,
                           epsilon=0.2, seed=4)
    simulate_dataset(cfg, tmp_path / kind)
    stack = ParticleStack.from_file(tmp_path / kind / "particles.star")
    flag = stack.column("cpContaminated").astype(bool)
    assert flag.sum() == 80
    clean = torch.from_numpy(stack.read_image_column("cpCleanImageName"))
    noisy = torch.from_numpy(stack.images())
    # correlation between the reference and the observed image: ~0 where either is pure noise
    corr = torch.nn.functional.cosine_similarity(
        (clean - clean.mean((-2, -1), keepdim=True)).flatten(1),
        (noisy - noisy.mean((-2, -1), keepdim=True)).flatten(1))
    assert corr[~flag].min() > 0.4
    assert corr[flag].abs().max() < 0.2
    # type A keeps the observed particle real: its SNR against a fresh render stays ~1
    if kind == "A":
        assert noisy[flag].var(dim=(-2, -1)).mean() / noisy[~flag].var(dim=(-2, -1)).mean() == pytest.approx(1, abs=0.2)


def test_simulate_cli_and_bad_input(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = cli(["-q", "simulate", "--structure", "1ake", "--box", "32", "--pixel-size", "3", "--n", "50",
              "--views", "2", "--snr", "0.5", "--seed", "0", "--out", str(out)])
    assert rc == 0 and (out / "particles.star").exists()
    # the folder exists now: refuse, one line, nothing changed
    rc = cli(["-q", "simulate", "--structure", "1ake", "--box", "32", "--n", "50", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and str(out) in err[0]
    # a structure with no atoms: error names the file, and no output folder is left behind
    empty = tmp_path / "empty.pdb"
    empty.write_text("REMARK nothing here\nEND\n")
    rc = cli(["-q", "simulate", "--structure", str(empty), "--box", "32", "--n", "10", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "empty.pdb" in err[0]
    assert not (tmp_path / "x").exists()
    assert not any(p.name.startswith(".x.") for p in tmp_path.iterdir())
    rc = cli(["-q", "simulate", "--structure", "1ake", "--snr", "-1", "--n", "10", "--out", str(tmp_path / "y")])
    assert rc != 0 and "SNR" in capsys.readouterr().err


def test_ctf_from_draws_the_targets_defoci_and_microscope(tmp_path):
    """`--ctf-from STAR`: every particle's defocus is one of the target's, and the microscope is
    the target's (not the config's defaults)."""
    target = tmp_path / "target"
    simulate_dataset(SimulationConfig(n=40, box=32, pixel_size_a=3.0, views=None, ctf=True, voltage_kv=200.0,
                                      cs_mm=1.4, defocus_min_a=5000.0, defocus_max_a=6000.0, seed=4), target)
    t = ParticleStack.from_file(target / "particles.star")
    out = tmp_path / "pairs"
    simulate_dataset(SimulationConfig(n=300, box=32, pixel_size_a=3.0, views=None, snr_levels=[math.inf], seed=5,
                                      ctf_from=str(target / "particles.star")), out)
    s = ParticleStack.from_file(out / "particles.star")
    pairs = {tuple(r) for r in np.stack([t.column("rlnDefocusU"), t.column("rlnDefocusV")], 1).round(3)}
    drawn = [tuple(r) for r in np.stack([s.column("rlnDefocusU"), s.column("rlnDefocusV")], 1).round(3)]
    assert set(drawn) <= pairs and len(set(drawn)) > 30  # the target's (U, V) pairs, most of them
    assert float(s.column("rlnVoltage")[0]) == 200.0 and float(s.column("rlnSphericalAberration")[0]) == 1.4
    # the clean images carry that CTF: 200 kV at 5,000 Å has its first zero where 300 kV at 5,000 Å does not
    clean = torch.from_numpy(s.read_image_column("cpCleanImageName"))
    ctf = ctf_2d(32, 3.0, *(torch.from_numpy(s.column(c)).float() for c in ("rlnDefocusU", "rlnDefocusV",
                                                                         "rlnDefocusAngle")),
                 voltage_kv=200.0, cs_mm=1.4, amplitude_contrast=0.1)
    power = torch.fft.fftshift(torch.fft.fft2(clean), dim=(-2, -1)).abs() ** 2
    assert float((power * (ctf.abs() < 0.1)).sum() / (power * (ctf.abs() > 0.9)).sum()) < 0.02
    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["config"]["ctf"] and manifest["config"]["voltage_kv"] == 200.0


def test_ctf_from_a_star_without_ctf_is_a_clear_error(tmp_path, capsys):
    target = tmp_path / "noctf"
    simulate_dataset(SimulationConfig(n=8, box=24, pixel_size_a=3.0, views=2, seed=1), target)
    out = tmp_path / "pairs"
    assert cli(["simulate", "--n", "8", "--box", "24", "--pixel-size", "3", "--ctf-from", str(target / "particles.star"),
                "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "particles.star" in err and "rlnDefocusU" in err and not out.exists()
    assert cli(["simulate", "--n", "8", "--box", "24", "--pixel-size", "3", "--ctf-from", str(tmp_path / "none.star"),
                "--out", str(out)]) == 2
    assert "not found" in capsys.readouterr().err and not out.exists()
