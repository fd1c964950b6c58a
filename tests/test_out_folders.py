"""Output folders: --out never deletes or mixes with an input, --overwrite replaces only what
cryoprior wrote, and one run at a time holds a folder (issue 11, items 1 and 2)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cryoprior.cli import main as cli
from cryoprior.errors import InputError
from cryoprior.fileutil import MANIFEST, atomic_dir, check_out_dir, lock_path, run_lock
from cryoprior.sim.dataset import SimulationConfig, simulate_dataset


def checksums(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture()
def sim(tmp_path) -> Path:
    src = tmp_path / "IN"
    simulate_dataset(SimulationConfig(box=16, pixel_size_a=6.0, n=24, views=2, snr=1.0, seed=0), src)
    return src


def _classify(star, out, *extra) -> int:
    return cli.main(["-q", "classify", str(star), "--classes", "2", "--method", "kmeans", "--out", str(out), *extra])


@pytest.mark.parametrize("where", ["same", "parent", "inside-link"])
def test_overwrite_never_deletes_the_input(sim, tmp_path, capsys, where):
    before = checksums(sim)
    if where == "same":
        out = sim
    elif where == "parent":
        out = tmp_path
    else:  # a symbolic link to the input folder
        out = tmp_path / "link"
        out.symlink_to(sim, target_is_directory=True)
    rc = _classify(sim / "particles.star", out, "--overwrite")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "input" in err, err
    assert checksums(sim) == before


def test_out_inside_a_model_folder_is_refused(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.pt").write_bytes(b"x")
    for out in (model, model / "sub"):
        with pytest.raises(InputError):
            check_out_dir(out, [model])
    assert (model / "model.pt").read_bytes() == b"x"


def test_out_that_is_a_file_or_unwritable(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(InputError, match="file"):
        check_out_dir(f)
    with pytest.raises(InputError, match="file"):
        check_out_dir(f / "sub")
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(InputError, match="permission"):
                check_out_dir(ro / "out")
        finally:
            ro.chmod(0o700)


def test_overwrite_replaces_only_what_cryoprior_wrote(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("1")
        (tmp / "b.txt").write_text("1")
    assert (out / MANIFEST).read_text().split() == ["a.txt", "b.txt"]
    with atomic_dir(out, overwrite=True) as tmp:  # b.txt not written this time: removed
        (tmp / "a.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "a.txt"]
    assert (out / "a.txt").read_text() == "2"
    (out / "mine.txt").write_text("user's")  # a file the user put there
    with pytest.raises(InputError, match="mine.txt"):
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("3")
    assert (out / "mine.txt").read_text() == "user's" and (out / "a.txt").read_text() == "2"
    plain = tmp_path / "plain"  # a folder cryoprior did not write
    plain.mkdir()
    (plain / "data.mrcs").write_bytes(b"d")
    with pytest.raises(InputError):
        with atomic_dir(plain, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("3")
    assert (plain / "data.mrcs").read_bytes() == b"d"


def test_classify_overwrite_of_its_own_output(sim, tmp_path):
    out = tmp_path / "c"
    assert _classify(sim / "particles.star", out) == 0
    first = checksums(out)
    assert _classify(sim / "particles.star", out, "--overwrite") == 0
    assert set(checksums(out)) == set(first)


def test_second_run_into_a_locked_folder_fails_at_once(sim, tmp_path, capsys):
    out = tmp_path / "c"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock_path(out).write_text(json.dumps(
            {"pid": holder.pid, "host": socket.gethostname(), "time": "now", "command": "cryoprior classify X"}))
        rc = _classify(sim / "particles.star", out)
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1
        assert f"pid {holder.pid}" in err and "cryoprior classify X" in err
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its stale lock is taken over and released at the end
    assert _classify(sim / "particles.star", out) == 0
    assert not lock_path(out).exists()


def test_run_lock_is_exclusive_in_one_process(tmp_path):
    out = tmp_path / "x"
    with run_lock(out):
        with pytest.raises(InputError, match="in use"):
            with run_lock(out):
                pass
    with run_lock(out):
        pass
    shutil.rmtree(tmp_path)
