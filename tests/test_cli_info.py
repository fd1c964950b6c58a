"""`cryoprior info`: summary of a stack, measured SNR against the truth, one-line errors."""

import json

import mrcfile
import numpy as np
import pandas as pd
import pytest

from cryoprior.cli.main import main
from cryoprior.io import write_mrcs, write_star


@pytest.fixture
def simulated(tmp_path):
    """A small dataset the way the simulator writes one: noisy + clean stacks, truth columns.

    Clean images have variance 4 and the noise variance 1, so the SNR is 4; particle 3 is
    contaminated (pure noise), which the SNR must leave out.
    """
    rng = np.random.default_rng(0)
    n, box = 40, 24
    clean = 2.0 * rng.standard_normal((n, box, box)).astype(np.float32)
    noisy = clean + rng.standard_normal((n, box, box)).astype(np.float32)
    noisy[3] = 5 * rng.standard_normal((box, box))
    write_mrcs(tmp_path / "clean.mrcs", clean, 1.5)
    write_mrcs(tmp_path / "particles.mrcs", noisy, 1.5)
    table = pd.DataFrame({
        "rlnImageName": [f"{i:06d}@particles.mrcs" for i in range(1, n + 1)],
        "cpCleanImageName": [f"{i:06d}@clean.mrcs" for i in range(1, n + 1)],
        "cpViewLabel": np.arange(n) % 3,
        "cpContaminated": (np.arange(n) == 3).astype(int),
    })
    write_star(tmp_path / "particles.star", table, pixel_size_a=1.5, box=box)
    return tmp_path / "particles.star"


def test_info_json_reports_counts_and_measured_snr(simulated, capsys, monkeypatch):
    monkeypatch.chdir(simulated.parent.parent)  # names resolve from the STAR's folder
    assert main(["info", str(simulated), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["n_particles"], info["box"], info["pixel_size_a"]) == (40, 24, 1.5)
    assert (info["n_stacks"], info["n_optics_groups"]) == (1, 1)
    assert info["optics_groups"] == ["opticsGroup1"]
    assert info["snr_n_images"] == 39
    assert info["snr"] == pytest.approx(4.0, rel=0.05)
    assert info["cpViewLabel"] == {"0": 14, "1": 13, "2": 13}
    assert info["cpContaminated"] == {"0": 39, "1": 1}


def test_info_snr_uses_at_most_max_images(simulated, capsys):
    assert main(["info", str(simulated), "--json", "--max-images", "5"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["snr_n_images"] == 5 and info["snr"] == pytest.approx(4.0, rel=0.15)


def test_info_text_for_a_plain_stack(tmp_path, capsys):
    write_mrcs(tmp_path / "s.mrcs", np.zeros((7, 32, 32), np.float32), 2.0)
    assert main(["info", str(tmp_path / "s.mrcs")]) == 0
    out = capsys.readouterr().out
    assert "particles        7" in out and "box              32 px" in out
    assert "pixel size       2 Å" in out and "optics groups    none" in out
    assert "SNR" not in out


def _non_square(path):
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.zeros((2, 8, 10), dtype=np.float32))


def _nan_truth(path):
    write_mrcs(path.parent / "clean.mrcs", np.full((2, 8, 8), np.nan, np.float32), 1.0)
    write_mrcs(path.parent / "noisy.mrcs", np.zeros((2, 8, 8), np.float32), 1.0)
    table = pd.DataFrame({"rlnImageName": ["1@noisy.mrcs", "2@noisy.mrcs"],
                          "cpCleanImageName": ["1@clean.mrcs", "2@clean.mrcs"]})
    write_star(path, table, pixel_size_a=1.0, box=8)


@pytest.mark.parametrize(
    "name, make, message",
    [
        ("gone.star", lambda p: None, "gone.star: file not found"),
        ("bad.mrcs", _non_square, "bad.mrcs: images are not square"),
        ("bad.star", lambda p: p.write_text("data_\nloop_\n_rlnImageName\n1@gone.mrcs\n"), "gone"),
        ("junk.star", lambda p: p.write_bytes(b"\x00\xff" * 100), "junk.star"),
        ("nan.star", _nan_truth, "clean.mrcs: image 1 (particle 0) contains NaN"),
    ],
)
def test_info_bad_input_exits_nonzero_with_one_line(tmp_path, capsys, name, make, message):
    make(tmp_path / name)
    assert main(["info", str(tmp_path / name)]) != 0
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("cryoprior info: error:")
    assert captured.out == ""
