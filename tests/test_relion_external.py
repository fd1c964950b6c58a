"""relion-external on files written exactly as RELION writes them, checked against numpy."""

import os
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch
from relion_reference import relion_round, soft_mask_outside_map

from cryoprior.cli.main import main
from cryoprior.io.relion import halfcomplex_to_centred, read_job
from cryoprior.workflows.relion_external import RelionExternalConfig, run_external

D, PAD = 16, 2
P = D * PAD


def relion_halfcomplex(volume: np.ndarray) -> np.ndarray:
    """RELION's data layout for a real ``(d, d, d)`` volume: zero-padded about the centre to
    ``P``, ``torch.fft.rfftn`` of the ifftshifted grid (origin at index 0), divided by ``d²``
    (RELION's forward FFTs are normalised by the 2D image size). ``(P, P, P // 2 + 1)``."""
    padded = np.zeros((P, P, P))
    lo = P // 2 - D // 2
    padded[lo : lo + D, lo : lo + D, lo : lo + D] = volume
    h = torch.fft.rfftn(torch.fft.ifftshift(torch.from_numpy(padded)))
    return h.numpy() / D**2


def _freqs():
    k = np.fft.fftfreq(P) * P
    kz, ky, kx = np.meshgrid(k, k, np.arange(P // 2 + 1), indexing="ij")
    r = np.sqrt(kx**2 + ky**2 + kz**2)
    return r, relion_round(r / PAD)


def symmetric_weight(seed: int, radial: bool = False) -> np.ndarray:
    """A positive K with K(−k) = K(k) in the half-complex layout (constant per shell if radial)."""
    rng = np.random.default_rng(seed)
    if radial:
        _, ires = _freqs()
        return (0.5 + rng.random(ires.max() + 1))[ires]
    full = 0.5 + 2 * rng.random((P, P, P))
    mirror = np.roll(np.flip(full), 1, axis=(0, 1, 2))  # full[-k]
    return ((full + mirror) / 2)[..., : P // 2 + 1]


def write_relion_job(folder: Path, volume, weight, tau2, fsc, root="run_it003_half1_class001",
                     fudge=1.0, current_size=D, pixel_size=2.0) -> Path:
    """The STAR text and three MRCs of ``BackProjector::externalReconstruct`` for data
    ``B = K · FT(volume)`` (zero beyond the current size, as RELION's decenter leaves them)."""
    r, _ = _freqs()
    inside = r**2 < round(current_size / 2 * PAD) ** 2
    k = np.where(inside, weight, 0.0)
    b = k * relion_halfcomplex(volume)
    names = {s: f"{root}_external_reconstruct_{s}.mrc" for s in ("data_real", "data_imag", "weight")}
    for key, arr in (("data_real", b.real), ("data_imag", b.imag), ("weight", k)):
        with mrcfile.new(folder / names[key], overwrite=True) as m:
            m.set_data(arr.astype(np.float32))
    general = [
        ("rlnExtReconsDataReal", names["data_real"]), ("rlnExtReconsDataImag", names["data_imag"]),
        ("rlnExtReconsWeight", names["weight"]), ("rlnExtReconsResult", f"{root}_external_reconstruct.mrc"),
        ("rlnExtReconsResultStarfile", f"{root}_external_reconstruct_out.star"),
        ("rlnTau2FudgeFactor", f"{fudge:12.6f}"), ("rlnPaddingFactor", f"{PAD:12.6f}"),
        ("rlnReferenceDimensionality", f"{3:12d}"), ("rlnOriginalImageSize", f"{D:12d}"),
        ("rlnCurrentImageSize", f"{current_size:12d}"),
    ]
    if pixel_size is not None:
        general.append(("rlnPixelSize", f"{pixel_size:12.6f}"))
    text = "\n# version 30001\n\ndata_external_reconstruct_general\n\n"
    text += "".join(f"_{key:<40} {value}\n" for key, value in general)
    text += "\n\n# version 30001\n\ndata_external_reconstruct_tau2\n\nloop_ \n"
    text += "_rlnSpectralIndex #1 \n_rlnReferenceTau2 #2 \n_rlnGoldStandardFsc #3 \n"
    text += "".join(f"{i:12d} {t:12.6e} {f:12.6f} \n" for i, (t, f) in enumerate(zip(tau2, fsc)))
    text += " \n"
    star = folder / f"{root}_external_reconstruct.star"
    star.write_text(text)
    return star


def numpy_reference(star: Path, invtau2_shell: np.ndarray, current_size=D, minres_map=5, soft_mask=True) -> np.ndarray:
    """Independent: ``d² · irfftn(B / (K + τ⁻²))`` (no τ⁻² below ``minres_map``), centred,
    cropped, RELION's corner soft mask (tests/relion_reference.py), ÷ sinc² gridding kernel."""
    job = read_job(star)
    b = mrcfile.read(job.data_real).astype(np.float64) + 1j * mrcfile.read(job.data_imag)
    k = mrcfile.read(job.weight).astype(np.float64)
    r, ires = _freqs()
    inside = (r**2 < round(current_size / 2 * PAD) ** 2) & (ires <= D // 2)
    invtau2 = np.where(ires >= minres_map, invtau2_shell[np.minimum(ires, D // 2)], 0.0)
    denom = k + invtau2
    x = np.where(inside, b / np.where(inside, denom, 1.0), 0.0)
    vol = np.fft.fftshift(np.fft.irfftn(x, s=(P, P, P), axes=(0, 1, 2))) * D**2
    lo = P // 2 - D // 2
    vol = vol[lo : lo + D, lo : lo + D, lo : lo + D]
    if soft_mask:
        vol = soft_mask_outside_map(vol)
    s = np.sinc((np.arange(D) - D // 2) / P) ** 2
    return vol / (s[:, None, None] * s[None, :, None] * s[None, None, :])


def _volume(seed=0):
    g = torch.Generator().manual_seed(seed)
    vol = torch.randn(D, D, D, generator=g, dtype=torch.float64)
    c = torch.arange(D) - D // 2
    r = torch.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    return (vol * (r < D // 2 - 2)).numpy()


def _smooth_volume():
    """Gaussian blobs (σ ≥ 1.5 px): nearly band-limited, so masking at Nyquist barely alters them."""
    c = np.arange(D) - D // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    blobs = [((3, -2, 1), 1.5), ((-3, 2, 0), 2.0), ((0, 1, -3), 1.7)]
    return sum(np.exp(-((x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2) / (2 * s * s)) for p, s in blobs)


def _result(star: Path) -> np.ndarray:
    return mrcfile.read(read_job(star).result).astype(np.float64)


@pytest.mark.parametrize("p", [6, 7])
def test_halfcomplex_to_centred_matches_fft3c(p):
    from cryoprior.core.fft import fft3c

    x = torch.randn(p, p, p, dtype=torch.float64)
    h = torch.fft.rfftn(torch.fft.ifftshift(x))
    assert torch.allclose(halfcomplex_to_centred(h), fft3c(x))
    k = torch.rand(p, p, p, dtype=torch.float64)
    k = (k + torch.roll(torch.flip(k, (0, 1, 2)), (1, 1, 1), (0, 1, 2))) / 2
    sym = torch.fft.fftshift(k)
    assert torch.allclose(halfcomplex_to_centred(k[..., : p // 2 + 1]), sym)


def test_huge_tau2_equals_numpy_b_over_k(tmp_path):
    star = write_relion_job(tmp_path, _volume(), symmetric_weight(1), np.full(D // 2 + 1, 1e12), np.zeros(D // 2 + 1))
    run_external(star, RelionExternalConfig(prior="gaussian", tau2_source="star"))
    ref = numpy_reference(star, np.zeros(D // 2 + 1))
    out = _result(star)
    assert out.shape == (D, D, D)
    assert np.abs(out - ref).max() < 1e-4 * np.abs(ref).max()
    with mrcfile.open(read_job(star).result) as m:
        assert float(m.voxel_size.x) == pytest.approx(2.0)


def test_gaussian_star_tau2_equals_numpy(tmp_path):
    tau2 = np.linspace(2.0, 0.05, D // 2 + 1)
    star = write_relion_job(tmp_path, _volume(2), symmetric_weight(3), tau2, np.zeros(D // 2 + 1), fudge=2.0,
                            current_size=12)
    run_external(star, RelionExternalConfig(prior="gaussian", tau2_source="star"))
    ref = numpy_reference(star, 1.0 / (PAD**3 * 2.0 * tau2), current_size=12)  # RELION's 1/(pad³ T τ²)
    assert np.abs(_result(star) - ref).max() < 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("root, full", [("run_it002_half2_class001", False), ("run_class001", True)])
def test_gaussian_fsc_tau2_equals_numpy(tmp_path, root, full):
    """Eq. (12) with K constant per shell: τ² = T² f / (1 − f) / K (RELION applies T twice), f
    RELION's full-set FSC sqrt(2f / (1 + f)) for a map without _half in its name."""
    weight = symmetric_weight(4, radial=True)
    fsc = np.clip(np.linspace(1.0, -0.1, D // 2 + 1), 0, None)
    star = write_relion_job(tmp_path, _volume(5), weight, np.ones(D // 2 + 1), fsc, root=root, fudge=1.5)
    run_external(star, RelionExternalConfig(prior="gaussian"))  # auto: the FSC is there
    f = np.maximum(fsc, 0.001)
    f = np.clip(np.sqrt(2 * f / (1 + f)) if full else f, 0.001, 0.999)
    _, ires = _freqs()
    k_shell = np.array([weight[ires == i][0] for i in range(D // 2 + 1)])
    tau2 = 1.5**2 * f / (1 - f) / k_shell
    ref = numpy_reference(star, 1.0 / tau2)
    assert np.abs(_result(star) - ref).max() < 1e-4 * np.abs(ref).max()


def test_recovers_volume_and_red_identity(tmp_path, monkeypatch):
    """B = K · FT(V · g) gives V back; RED with an identity denoiser and λ = 1 gives x̃ itself
    for any τ² (up to the box support; see tests/test_red.py for the closed form)."""
    from cryoprior.core.projection import gridding_kernel

    vol = _smooth_volume()
    g = gridding_kernel(D, P, 3, dtype=torch.float64).numpy()
    fsc = np.full(D // 2 + 1, 0.3)
    star = write_relion_job(tmp_path, vol * g, symmetric_weight(7), np.ones(D // 2 + 1), fsc)
    import cryoprior.workflows.relion_external as rx

    monkeypatch.setattr(rx, "load_prior_denoiser", lambda path, device: (lambda v: v))
    run_external(star, RelionExternalConfig(prior="red", red_lambda=1.0))
    assert np.abs(_result(star) - vol).max() < 0.01 * np.abs(vol).max()


def test_env_selects_prior(tmp_path, monkeypatch):
    star = write_relion_job(tmp_path, _volume(), symmetric_weight(1), np.ones(D // 2 + 1), np.full(D // 2 + 1, 0.5))
    monkeypatch.setenv("CRYOPRIOR_PRIOR", "cw-red")
    assert RelionExternalConfig().resolved().prior == "cw-red"
    monkeypatch.setenv("CRYOPRIOR_PRIOR", "nonsense")
    assert main(["-q", "relion-external", str(star)]) == 2


def test_concurrent_halves(tmp_path):
    """RELION runs half 1 and half 2 at once in one folder: two processes, both right, no debris."""
    stars = [
        write_relion_job(tmp_path, _volume(i), symmetric_weight(i), np.full(D // 2 + 1, 1e12),
                         np.zeros(D // 2 + 1), root=f"run_it001_half{i}_class001")
        for i in (1, 2)
    ]
    before = set(os.listdir(tmp_path))
    env = dict(os.environ, CRYOPRIOR_TAU2="star", OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen([sys.executable, "-m", "cryoprior.cli.main", "-q", "relion-external", s.name],
                         cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
        for s in stars
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    for s in stars:
        ref = numpy_reference(s, np.zeros(D // 2 + 1))
        assert np.abs(_result(s) - ref).max() < 1e-4 * np.abs(ref).max()
    # the map and the τ² STAR that the general block names (rlnExtReconsResultStarfile), no debris
    assert set(os.listdir(tmp_path)) - before == {
        f"run_it001_half{i}_class001_external_reconstruct{end}" for i in (1, 2) for end in (".mrc", "_out.star")
    }


def _good_job(tmp_path):
    return write_relion_job(tmp_path, _volume(), symmetric_weight(1), np.ones(D // 2 + 1), np.full(D // 2 + 1, 0.5))


@pytest.mark.parametrize(
    "breakage, needle",
    [
        ("no_tau2_block", "data_external_reconstruct_tau2"),
        ("no_fsc_column", "rlnGoldStandardFsc"),
        ("no_weight_key", "rlnExtReconsWeight"),
        ("bad_shape", "weight.mrc"),
        ("missing_mrc", "data_imag.mrc"),
        ("missing_star", "nothere.star"),
    ],
)
def test_malformed_input_one_line_error(tmp_path, capsys, breakage, needle):
    star = _good_job(tmp_path)
    text = star.read_text()
    if breakage == "no_tau2_block":
        star.write_text(text.split("\n# version 30001\n\ndata_external_reconstruct_tau2")[0])
    elif breakage == "no_fsc_column":
        lines = [ln.rsplit(None, 1)[0] if ln.strip()[:1].isdigit() else ln for ln in text.splitlines()]
        star.write_text("\n".join(ln for ln in lines if "rlnGoldStandardFsc" not in ln) + "\n")
    elif breakage == "no_weight_key":
        star.write_text("\n".join(ln for ln in text.splitlines() if "rlnExtReconsWeight" not in ln) + "\n")
    elif breakage == "bad_shape":
        path = read_job(star).weight
        with mrcfile.new(path, overwrite=True) as m:
            m.set_data(np.ones((P, P, P), dtype=np.float32))
    elif breakage == "missing_mrc":
        read_job(star).data_imag.unlink()
    elif breakage == "missing_star":
        star = tmp_path / "nothere.star"
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        rc = main(["-q", "relion-external", str(star)])
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / read_job_result_name(star)).exists()


def read_job_result_name(star: Path) -> str:
    return star.name.replace(".star", ".mrc")


def _tau2_table(path: Path):
    import starfile

    table = starfile.read(path, always_dict=True)["external_reconstruct_tau2"]
    assert list(table.columns) == ["rlnSpectralIndex", "rlnReferenceTau2", "rlnGoldStandardFsc"]
    return table


def test_result_starfile_tau2_is_relions_ssnr_formula(tmp_path):
    """The τ² handed back equals RELION's own FSC-based τ² (updateSSNRarrays, T once):
    ``T · f / (1 − f) · σ²`` with ``σ² = 1 / (pad³ ⟨K⟩)`` per shell, here T = 2, for the shells
    with weight only (inside the current size 12: a 0 row would become RELION's
    data_vs_prior = 0/0 = NaN); the FSC goes back unchanged."""
    weight = symmetric_weight(11, radial=True)
    fsc = np.clip(np.linspace(1.0, -0.2, D // 2 + 1), 0, None)
    star = write_relion_job(tmp_path, _volume(12), weight, np.ones(D // 2 + 1), fsc, root="run_it004_half1_class001",
                            fudge=2.0, current_size=12)
    run_external(star, RelionExternalConfig(prior="gaussian"))
    job = read_job(star)
    assert job.result_star == tmp_path / "run_it004_half1_class001_external_reconstruct_out.star"
    table = _tau2_table(job.result_star)
    _, ires = _freqs()
    k_shell = np.array([weight[ires == i][0] for i in range(D // 2 + 1)])
    f = np.clip(fsc, 0.001, 0.999)[:7]
    expected = 2.0 * f / (1 - f) / (PAD**3 * k_shell[:7])
    assert table["rlnSpectralIndex"].tolist() == list(range(7))  # |k| < 12 padded px: shells 0..6
    np.testing.assert_allclose(table["rlnReferenceTau2"].to_numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(table["rlnGoldStandardFsc"].to_numpy(), fsc[:7], atol=1e-6)


def test_result_starfile_tau2_fed_back_reproduces_map(tmp_path):
    """RELION regularises its next reconstruction with the τ² we hand back (1 / (pad³ T τ²)):
    fed back as RELION's τ² (no FSC, so tau2 = star) it gives the same map as the FSC path,
    here for a full-set map (full-set FSC) with T = 1.5, and no temporary files are left."""
    weight = symmetric_weight(13)
    fsc = np.clip(np.linspace(0.99, -0.1, D // 2 + 1), 0, None)
    vol = _volume(14)
    first = write_relion_job(tmp_path, vol, weight, np.ones(D // 2 + 1), fsc, root="run_class001", fudge=1.5)
    run_external(first, RelionExternalConfig(prior="gaussian"))
    tau2_back = _tau2_table(read_job(first).result_star)["rlnReferenceTau2"].to_numpy()
    again = tmp_path / "again"
    again.mkdir()
    second = write_relion_job(again, vol, weight, tau2_back, np.zeros(D // 2 + 1), root="run_class001", fudge=1.5)
    run_external(second, RelionExternalConfig(prior="gaussian"))
    ref = _result(first)
    assert np.abs(_result(second) - ref).max() < 1e-4 * np.abs(ref).max()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp.star") or p.endswith(".tmp.mrc")]


def test_no_result_starfile_key_writes_only_the_map(tmp_path):
    star = _good_job(tmp_path)
    star.write_text("\n".join(ln for ln in star.read_text().splitlines() if "rlnExtReconsResultStarfile" not in ln) + "\n")
    before = set(os.listdir(tmp_path))
    run_external(star, RelionExternalConfig(prior="gaussian"))
    assert read_job(star).result_star is None
    assert set(os.listdir(tmp_path)) - before == {read_job_result_name(star)}


def _strip_pixel(star: Path) -> Path:
    """RELION 3.1.3's STAR: no rlnPixelSize."""
    star.write_text("\n".join(ln for ln in star.read_text().splitlines() if "rlnPixelSize" not in ln) + "\n")
    return star


def _write_model_star(folder: Path, name: str, pixel: float) -> None:
    (folder / name).write_text(
        "\n# version 30001\n\ndata_model_general\n\n_rlnReferenceDimensionality 3\n"
        f"_rlnOriginalImageSize {D}\n_rlnPixelSize {pixel:.6f}\n\n"
    )


def _write_data_star(folder: Path, name: str, pixel: float) -> None:
    (folder / name).write_text(
        "\n# version 30001\n\ndata_optics\n\nloop_\n_rlnOpticsGroup #1\n_rlnImagePixelSize #2\n"
        f"1 {pixel:.6f}\n\n# version 30001\n\ndata_particles\n\nloop_\n_rlnImageName #1\n1@a.mrcs\n"
    )


def _voxel(path: Path) -> float:
    with mrcfile.open(path) as m:
        return float(m.voxel_size.x)


def test_pixel_size_found_in_the_run(tmp_path, caplog):
    """RELION 3.1 writes no rlnPixelSize: take the newest model STAR of the run, else the data
    STAR's optics; the result map carries it, and CW-RED gets its λ from it."""
    import logging

    star = _strip_pixel(write_relion_job(tmp_path, _volume(), symmetric_weight(1), np.ones(D // 2 + 1),
                                         np.full(D // 2 + 1, 0.9), root="run_it003_half1_class001"))
    _write_data_star(tmp_path, "run_it002_data.star", 3.3)
    run_external(star, RelionExternalConfig(prior="gaussian"))
    assert _voxel(read_job(star).result) == pytest.approx(3.3)
    _write_model_star(tmp_path, "run_it000_half1_model.star", 1.7)
    _write_model_star(tmp_path, "run_it002_half1_model.star", 2.5)
    (tmp_path / "run_it003_half1_model.star").write_text("data_model_general\n_rlnPixelSize")  # half-written
    with caplog.at_level(logging.INFO, logger="cryoprior"):
        run_external(star, RelionExternalConfig(prior="gaussian"))
    assert _voxel(read_job(star).result) == pytest.approx(2.5)
    assert "run_it002_half1_model.star" in caplog.text
    run_external(star, RelionExternalConfig(prior="gaussian", pixel_size_a=4.0))  # the flag before the run
    assert _voxel(read_job(star).result) == pytest.approx(4.0)
    # the STAR's own rlnPixelSize (RELION >= 4.0.1) first
    star2 = write_relion_job(tmp_path, _volume(), symmetric_weight(1), np.ones(D // 2 + 1), np.full(D // 2 + 1, 0.9),
                             root="run_it003_half2_class001", pixel_size=2.0)
    run_external(star2, RelionExternalConfig(prior="gaussian", pixel_size_a=4.0))
    assert _voxel(read_job(star2).result) == pytest.approx(2.0)


def test_cw_red_without_pixel_size_exits_zero_with_lambda_zero(tmp_path, monkeypatch, caplog):
    """No pixel size anywhere: a warning, CW-RED with λ = 0 (the Gaussian map), exit 0, since
    RELION aborts the whole MPI job on a non-zero exit; the map's header says voxel 0."""
    import logging

    import cryoprior.workflows.relion_external as rx

    fsc = np.clip(np.linspace(1.0, 0.2, D // 2 + 1), 0, None)
    star = _strip_pixel(write_relion_job(tmp_path, _volume(3), symmetric_weight(2), np.ones(D // 2 + 1), fsc))
    monkeypatch.setattr(rx, "load_prior_denoiser", lambda path, device: pytest.fail("λ = 0 needs no denoiser"))
    monkeypatch.setenv("CRYOPRIOR_PRIOR", "cw-red")
    monkeypatch.delenv("CRYOPRIOR_PIXEL_SIZE", raising=False)
    with caplog.at_level(logging.WARNING, logger="cryoprior"):
        assert main(["-q", "relion-external", str(star)]) == 0
    assert "pixel size unknown" in caplog.text
    cw = _result(star)
    assert _voxel(read_job(star).result) == 0.0
    monkeypatch.setenv("CRYOPRIOR_PRIOR", "gaussian")
    assert main(["-q", "relion-external", str(star)]) == 0
    np.testing.assert_allclose(cw, _result(star), atol=1e-6 * np.abs(cw).max())


@pytest.mark.parametrize("cut", ["short", "gap", "repeat"])
def test_incomplete_tau2_table_is_an_error_and_removes_stale_results(tmp_path, capsys, cut):
    """Issue 11 item 6: a τ²/FSC table without every shell 0..d/2 (cut short at a row boundary,
    a row missing, a row repeated) is corrupt: exit 2, one line, and neither the result map nor
    the τ² STAR of an earlier call survives (RELION must not read them as this call's)."""
    star = _good_job(tmp_path)
    assert main(["-q", "relion-external", str(star)]) == 0  # an earlier, good call
    job = read_job(star)
    assert job.result.exists() and job.result_star.exists()
    lines = star.read_text().splitlines()
    rows = [i for i, ln in enumerate(lines) if ln.strip()[:1].isdigit() and len(ln.split()) == 3]
    assert len(rows) == D // 2 + 1
    if cut == "short":
        lines = lines[: rows[-3]]  # the last three shells gone, file ends at a row boundary
    elif cut == "gap":
        del lines[rows[4]]
    else:
        lines[rows[4]] = lines[rows[3]]
    star.write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert main(["-q", "relion-external", str(star)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "external_reconstruct_tau2" in err, err
    assert not job.result.exists() and not job.result_star.exists()


def test_cw_red_takes_the_models_thresholds_unless_set(tmp_path, caplog):
    """The denoiser's model.json `cw_red` thresholds set λ when --cw-low-a/--cw-high-a are unset:
    at 10 Å/px the FSC never crosses 0.143 (resolution 20 Å, Nyquist): the paper's 10 Å gives
    λ = 0, a model calibrated to trust itself from 40 Å gives λ = 1."""
    import logging

    from cryoprior.nn.models.unet3d import UNet3D, UNet3DConfig
    from cryoprior.nn.prior3d import save_model

    torch.manual_seed(0)
    model = tmp_path / "model"
    save_model(UNet3D(UNet3DConfig(levels=2, base_channels=2)), model, {"cw_red": {"low_a": 50.0, "high_a": 40.0}})
    fsc = np.clip(np.linspace(1.0, 0.2, D // 2 + 1), 0, None)
    star = write_relion_job(tmp_path, _volume(3), symmetric_weight(2), np.ones(D // 2 + 1), fsc, pixel_size=10.0)
    for flags, lam in (({}, "λ = 1,"), ({"cw_low_a": 10.0, "cw_high_a": 4.5}, "λ = 0,")):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="cryoprior"):
            run_external(star, RelionExternalConfig(prior="cw-red", denoiser=str(model), **flags))
        assert lam in caplog.text, caplog.text
