"""cryoprior.io: MRC/STAR round trips, RELION layouts, ParticleStack, validation, atomicity."""

import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import torch

from cryoprior.errors import InputError
from cryoprior.io import (
    MrcsWriter,
    ParticleStack,
    read_map,
    read_mrc,
    read_star,
    resolve_image_names,
    write_map,
    write_mrcs,
    write_star,
)
from cryoprior.io.star import OpticsFlags


def _images(n, d=16, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d, d)).astype(np.float32)


def _star_for(path, names, **columns):
    write_star(path, pd.DataFrame({"rlnImageName": names, **columns}), pixel_size_a=1.5, box=16)
    return path


# ---- MRC ------------------------------------------------------------------------------------
def test_mrcs_round_trip_is_exact_and_flagged_as_stack(tmp_path):
    images = _images(7)
    write_mrcs(tmp_path / "a.mrcs", torch.from_numpy(images), pixel_size_a=1.25)
    data, pixel_size_a = read_mrc(tmp_path / "a.mrcs")
    assert pixel_size_a == 1.25 and isinstance(data, np.memmap)
    np.testing.assert_array_equal(data, images)
    np.testing.assert_array_equal(read_mrc(tmp_path / "a.mrcs", mmap=False)[0], images)
    with mrcfile.open(tmp_path / "a.mrcs") as mrc:
        assert mrc.header.ispg == 0 and mrc.header.mode == 2
        assert mrc.header.dmax == images.max()
        assert mrc.header.rms == pytest.approx(images.std(), rel=1e-4)


def test_single_2d_image_reads_as_stack_of_one_and_zero_pixel_size_is_unknown(tmp_path):
    with mrcfile.new(tmp_path / "one.mrc") as mrc:
        mrc.set_data(np.arange(64, dtype=np.float32).reshape(8, 8))
    data, pixel_size_a = read_mrc(tmp_path / "one.mrc")
    assert data.shape == (1, 8, 8) and data[0, 1, 0] == 8 and pixel_size_a == 0.0
    # a particle stack needs a pixel size: never a guessed 1 Å (issue 11, item 4)
    with pytest.raises(InputError, match="pixel size"):
        ParticleStack.from_file(tmp_path / "one.mrc")
    assert ParticleStack.from_file(tmp_path / "one.mrc", OpticsFlags(pixel_size_a=2.5)).pixel_size_a == 2.5


def test_zero_machine_stamp_is_read_as_little_endian(tmp_path):
    images = _images(2)
    write_mrcs(tmp_path / "old.mrcs", images, 1.0)
    with open(tmp_path / "old.mrcs", "r+b") as f:  # as some older software writes it
        f.seek(212)
        f.write(bytes(4))
    np.testing.assert_array_equal(read_mrc(tmp_path / "old.mrcs")[0], images)


def test_map_round_trip_and_validation(tmp_path):
    volume = torch.randn(8, 8, 8, dtype=torch.float64)
    write_map(tmp_path / "v.mrc", volume, 2.5)
    got, pixel_size_a = read_map(tmp_path / "v.mrc")
    assert got.dtype == np.float32 and pixel_size_a == 2.5
    np.testing.assert_array_equal(got, volume.numpy().astype(np.float32))
    write_mrcs(tmp_path / "s.mrcs", _images(3, 8), 1.0)
    with pytest.raises(InputError, match="s.mrcs.*cubic"):
        read_map(tmp_path / "s.mrcs")
    bad = volume.numpy().copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        write_map(tmp_path / "nan.mrc", bad, 1.0)
    write_map(tmp_path / "nan.mrc", volume, 1.0)
    with mrcfile.mmap(tmp_path / "nan.mrc", mode="r+") as mrc:
        mrc.data[1, 2, 3] = np.nan
    with pytest.raises(InputError, match="nan.mrc.*NaN"):
        read_map(tmp_path / "nan.mrc")


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.uint16, np.float16])
def test_integer_and_half_modes_read_as_float32(tmp_path, dtype):
    values = (np.arange(2 * 8 * 8) % 100).astype(dtype).reshape(2, 8, 8)
    with mrcfile.new(tmp_path / "m.mrcs") as mrc:
        mrc.set_data(values)
        mrc.voxel_size = 1.0
    stack = ParticleStack.from_file(tmp_path / "m.mrcs")
    np.testing.assert_array_equal(stack.images(), values.astype(np.float32))


def _complex_file(path):
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.zeros((2, 8, 8), dtype=np.complex64))


def _non_square_file(path):
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.zeros((2, 8, 10), dtype=np.float32))


def _truncated_file(path):
    write_mrcs(path, _images(4), 1.0)
    with open(path, "r+b") as f:
        f.truncate(1024 + 3 * 16 * 16 * 4)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "not found"),
        (lambda p: p.write_text("hello, not an MRC\n" * 100), "not a readable MRC"),
        (_complex_file, "unsupported MRC mode 4"),
        (_non_square_file, "not square"),
        (_truncated_file, "truncated"),
    ],
)
def test_bad_mrc_inputs_raise_input_error_naming_the_file(tmp_path, make, message):
    path = tmp_path / "bad.mrcs"
    make(path)
    with pytest.raises(InputError, match=message) as info:
        ParticleStack.from_file(path)
    assert "bad.mrcs" in str(info.value)


def test_mrcs_writer_is_atomic_and_requires_every_image(tmp_path):
    target = tmp_path / "w.mrcs"
    with pytest.raises(RuntimeError, match="boom"), MrcsWriter(target, 4, 16, 1.0) as writer:
        writer.write(0, _images(2))
        raise RuntimeError("boom")
    with pytest.raises(ValueError, match="2 of 4 images were never written"):
        with MrcsWriter(target, 4, 16, 1.0) as writer:
            writer.write(0, _images(2))
    with pytest.raises(ValueError, match="outside the stack"):
        with MrcsWriter(target, 4, 16, 1.0) as writer:
            writer.write(3, _images(2))
    assert list(tmp_path.iterdir()) == []


# ---- STAR -----------------------------------------------------------------------------------
def test_star_31_round_trip_is_exact(tmp_path):
    particles = pd.DataFrame({
        "rlnImageName": ["000001@a b.mrcs", "000002@s.mrcs", "000003@s.mrcs"],
        "rlnDefocusU": [1 / 3, 1e-10, 12345.678901234567],
        "rlnAngleRot": [-179.99999999, 0.0, 2.0**-30],
        "rlnClassNumber": [1, 2, 3],
        "rlnMicrographName": ["mics/m1.mrc", "", "m 3"],
        "rlnOpticsGroup": [1, 2, 1],
    })
    optics = pd.DataFrame({
        "rlnOpticsGroupName": ["opticsGroup1", "opticsGroup2"], "rlnOpticsGroup": [1, 2],
        "rlnVoltage": [300.0, 200.0], "rlnImagePixelSize": [1.0 / 3, 0.885],
        "rlnImageSize": [16, 16],
    })
    write_star(tmp_path / "p.star", particles, optics)
    text = (tmp_path / "p.star").read_text()
    assert "# version 30001" in text and text.index("data_optics") < text.index("data_particles")
    got_particles, got_optics = read_star(tmp_path / "p.star")
    pd.testing.assert_frame_equal(got_particles, particles)
    pd.testing.assert_frame_equal(got_optics, optics)


def test_write_star_builds_optics_and_moves_optics_columns(tmp_path):
    particles = pd.DataFrame({"rlnImageName": ["000001@s.mrcs", "000002@s.mrcs"],
                              "rlnVoltage": [200.0, 200.0], "rlnDefocusU": [1e4, 2e4]})
    write_star(tmp_path / "p.star", particles, pixel_size_a=1.1, box=64)
    got, optics = read_star(tmp_path / "p.star")
    assert list(got.columns) == ["rlnImageName", "rlnDefocusU", "rlnOpticsGroup"]
    row = optics.iloc[0]
    assert (row.rlnOpticsGroup, row.rlnOpticsGroupName, row.rlnImageSize) == (1, "opticsGroup1", 64)
    assert row.rlnVoltage == 200.0
    # optics the particles do not carry are left out, never invented (issue 11, item 4)
    assert "rlnSphericalAberration" not in optics.columns and "rlnAmplitudeContrast" not in optics.columns
    assert (row.rlnImagePixelSize, row.rlnImageDimensionality) == (1.1, 2)
    with pytest.raises(ValueError, match="pixel_size_a"):
        write_star(tmp_path / "q.star", particles)


RELION_31 = """
# version 30001

data_optics

loop_
_rlnOpticsGroupName #1
_rlnOpticsGroup #2
_rlnMicrographOriginalPixelSize #3
_rlnVoltage #4
_rlnSphericalAberration #5
_rlnAmplitudeContrast #6
_rlnImagePixelSize #7
_rlnImageSize #8
_rlnImageDimensionality #9
opticsGroup1            1     0.885000   300.000000     2.700000     0.100000     1.770000           16            2
opticsGroup2            2     0.885000   300.000000     2.700000     0.100000     1.770000           16            2


# version 30001

data_particles

loop_
_rlnCoordinateX #1
_rlnCoordinateY #2
_rlnImageName #3
_rlnMicrographName #4
_rlnOpticsGroup #5
_rlnDefocusU #6
  1012.000000   842.000000 000002@Extract/job007/a.mrcs MotionCorr/job002/m1.mrc            1 10864.146484
   300.000000   112.000000 000001@Extract/job007/b.mrcs MotionCorr/job002/m2.mrc            2 11500.000000
   410.000000   220.000000 000001@Extract/job007/a.mrcs MotionCorr/job002/m1.mrc            1 10864.146484
"""

RELION_30 = """
data_{block}

loop_
_rlnImageName #1
_rlnDetectorPixelSize #2
_rlnMagnification #3
_rlnVoltage #4
000003@Particles/a.mrcs 14.000000 100000.000000 300.000000
000001@Particles/a.mrcs 14.000000 100000.000000 300.000000
"""
LOOP = "data_particles\n\nloop_\n_rlnImageName #1\n"


def test_relion_31_star_several_stacks_relative_to_star_folder(tmp_path, monkeypatch):
    a, b = _images(3, seed=1), _images(2, seed=2)
    (tmp_path / "proj" / "Extract" / "job007").mkdir(parents=True)
    write_mrcs(tmp_path / "proj/Extract/job007/a.mrcs", a, 1.77)
    write_mrcs(tmp_path / "proj/Extract/job007/b.mrcs", b, 1.77)
    (tmp_path / "proj" / "particles.star").write_text(RELION_31)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    stack = ParticleStack.from_file(tmp_path / "proj" / "particles.star")
    assert (len(stack), stack.box, stack.pixel_size_a, len(stack.stack_paths)) == (3, 16, 1.77, 2)
    np.testing.assert_array_equal(stack.images(), np.stack([a[1], b[0], a[0]]))
    np.testing.assert_array_equal(stack.column("rlnVoltage"), [300.0] * 3)
    np.testing.assert_array_equal(stack.column("rlnCoordinateX"), [1012.0, 300.0, 410.0])
    with pytest.raises(KeyError, match="rlnNope.*particles.star"):
        stack.column("rlnNope")


@pytest.mark.parametrize("block", ["", "images", "particles"])
def test_relion_30_star_resolves_from_the_working_directory(tmp_path, monkeypatch, block):
    (tmp_path / "Particles").mkdir()
    (tmp_path / "Select").mkdir()
    images = _images(3)
    write_mrcs(tmp_path / "Particles/a.mrcs", images, 9.0)
    star = tmp_path / "Select" / "particles.star"
    star.write_text(RELION_30.format(block=block))
    particles, optics = read_star(star)
    assert optics is None
    assert list(particles["rlnImageName"]) == ["000003@Particles/a.mrcs", "000001@Particles/a.mrcs"]
    monkeypatch.chdir(tmp_path)  # RELION run from its project folder
    stack = ParticleStack.from_file("Select/particles.star")
    assert stack.pixel_size_a == pytest.approx(1.4)  # 14 um * 1e4 / 100000
    np.testing.assert_array_equal(stack.images(), images[[2, 0]])
    files, file_index, slice0 = resolve_image_names(particles["rlnImageName"], star)
    assert files == [tmp_path / "Particles/a.mrcs"]
    assert list(slice0) == [2, 0] and list(file_index) == [0, 0]


@pytest.mark.parametrize(
    "text, message",
    [
        ("data_optics\n\nloop_\n_rlnOpticsGroup #1\n1\n", "no particle table"),
        ("data_particles\n\nloop_\n_rlnDefocusU #1\n1.0\n", "no rlnImageName"),
        (LOOP + "000001@gone.mrcs\n", "gone.mrcs.*not found"),
        (LOOP + "abc@s.mrcs\n", "malformed image name"),
        (LOOP + "000009@s.mrcs\n", "image 9 of .*s.mrcs.*holds 3"),
        (LOOP + "000001@s.mrcs\n000001@big.mrcs\n", "different box"),
        (LOOP + "000001@sq.mrcs\n", "sq.mrcs: images are not square"),
    ],
)
def test_bad_star_inputs_raise_input_error_naming_the_star(tmp_path, text, message):
    write_mrcs(tmp_path / "s.mrcs", _images(3), 1.0)
    write_mrcs(tmp_path / "big.mrcs", _images(1, 32), 1.0)
    _non_square_file(tmp_path / "sq.mrcs")
    (tmp_path / "bad.star").write_text(text)
    with pytest.raises(InputError, match=message) as info:
        ParticleStack.from_file(tmp_path / "bad.star")
    assert "bad.star" in str(info.value)


def test_missing_star_and_unknown_extension(tmp_path):
    with pytest.raises(InputError, match="gone.star: file not found"):
        read_star(tmp_path / "gone.star")
    with pytest.raises(InputError, match="x.tif.*unknown file type"):
        ParticleStack.from_file(tmp_path / "x.tif")


# ---- ParticleStack --------------------------------------------------------------------------
def test_chunks_subset_indexing_and_pickle(tmp_path):
    images = _images(23)
    write_mrcs(tmp_path / "s.mrcs", images, 1.0)
    stack = ParticleStack.from_file(tmp_path / "s.mrcs")
    assert stack.table["rlnImageName"].iloc[4] == "000005@s.mrcs"
    starts, parts = zip(*stack.chunks(5), strict=True)
    assert starts == (0, 5, 10, 15, 20)
    np.testing.assert_array_equal(np.concatenate(parts), stack.images())
    np.testing.assert_array_equal(stack.images(), images)
    np.testing.assert_array_equal(stack[-1], images[-1])
    np.testing.assert_array_equal(stack[3:9:2], images[3:9:2])
    sub = stack.subset([20, 3, 3, 7]).subset(np.array([True, False, True, True]))
    np.testing.assert_array_equal(sub.images(), images[[20, 3, 7]])
    assert list(sub.table["rlnImageName"]) == ["000021@s.mrcs", "000004@s.mrcs", "000008@s.mrcs"]
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(sub)).images(), images[[20, 3, 7]])
    with pytest.raises(IndexError):
        stack.images([23])


def test_nan_is_reported_when_read_with_file_and_index(tmp_path):
    images = _images(10)
    images[6, 2, 2] = np.inf
    write_mrcs(tmp_path / "s.mrcs", images, 1.0)
    _star_for(tmp_path / "p.star", [f"{i:06d}@s.mrcs" for i in range(1, 11)])
    stack = ParticleStack.from_file(tmp_path / "p.star")  # cheap open: no full read
    np.testing.assert_array_equal(stack.images(slice(0, 6)), images[:6])
    with pytest.raises(InputError, match=r"s.mrcs: image 7 \(particle 6\) contains NaN or Inf"):
        list(stack.chunks(4))


def test_write_relative_names_keeps_columns_and_rebases_truth(tmp_path):
    clean, noisy = _images(6, seed=1), _images(6, seed=2)
    write_mrcs(tmp_path / "clean.mrcs", clean, 1.5)
    write_mrcs(tmp_path / "noisy.mrcs", noisy, 1.5)
    names = [f"{i:06d}@noisy.mrcs" for i in range(1, 7)]
    truth = [f"{i:06d}@clean.mrcs" for i in range(1, 7)]
    _star_for(tmp_path / "p.star", names, cpCleanImageName=truth,
              rlnDefocusU=np.linspace(1e4, 2e4, 6), cpViewLabel=[0, 1, 0, 1, 2, 2])
    stack = ParticleStack.from_file(tmp_path / "p.star").subset([5, 0, 2])
    out = stack.write(tmp_path / "out/sub.star", tmp_path / "stacks/sub.mrcs", stack.images() * 2)
    particles, optics = read_star(tmp_path / "out" / "sub.star")
    assert list(particles["rlnImageName"]) == [f"{i:06d}@../stacks/sub.mrcs" for i in (1, 2, 3)]
    assert list(particles["cpCleanImageName"]) == [f"{i:06d}@../clean.mrcs" for i in (6, 1, 3)]
    np.testing.assert_array_equal(particles["cpViewLabel"], [2, 0, 0])
    np.testing.assert_array_equal(particles["rlnDefocusU"], stack.column("rlnDefocusU"))
    assert optics["rlnImagePixelSize"].tolist() == [1.5]
    for again in (out, ParticleStack.from_file(tmp_path / "out" / "sub.star")):
        np.testing.assert_array_equal(again.images(), noisy[[5, 0, 2]] * 2)
        truth_images = again.read_image_column("cpCleanImageName", [2, 0])
        np.testing.assert_array_equal(truth_images, clean[[2, 5]])


def test_from_array_write_round_trip(tmp_path):
    images = torch.randn(5, 12, 12)
    table = pd.DataFrame({"rlnAngleRot": [1.5, 2.5, 3.5, 4.5, 5.5]})
    stack = ParticleStack.from_array(images, 0.9, table)
    np.testing.assert_array_equal(stack.images([1, 3]), images.numpy()[[1, 3]])
    stack.write(tmp_path / "a.star")  # images default to its own, mrcs beside the STAR
    back = ParticleStack.from_file(tmp_path / "a.star")
    assert (back.pixel_size_a, back.box) == (0.9, 12)
    assert back.table["rlnImageName"].iloc[0] == "000001@a.mrcs"
    np.testing.assert_array_equal(back.column("rlnAngleRot"), table["rlnAngleRot"])
    np.testing.assert_array_equal(back.images(), images.numpy())


def test_write_is_atomic(tmp_path, monkeypatch):
    write_mrcs(tmp_path / "s.mrcs", _images(8), 1.0)
    stack = ParticleStack.from_file(tmp_path / "s.mrcs")
    out = tmp_path / "out"

    def failing_chunks():
        yield 0, stack.images(slice(0, 4))
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        stack.write(out / "p.star", images=failing_chunks())
    assert list(out.iterdir()) == []
    (out / "p.star").write_text("old")
    monkeypatch.setattr("cryoprior.io.star._block_text", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        stack.write(out / "p.star")
    assert sorted(p.name for p in out.iterdir()) == ["p.star"]
    assert (out / "p.star").read_text() == "old"


def test_streaming_keeps_resident_memory_flat(tmp_path):
    """10k x 128^2 (655 MB, sparse): streaming through chunks() grows peak RSS < 300 MB (it stays
    flat at ~3 chunks whatever the size), where copying chunks out of a plain memory map grows it
    by the file size."""
    n, box = 10_000, 128
    with mrcfile.new_mmap(tmp_path / "big.mrcs", (n, box, box), mrc_mode=2) as mrc:
        mrc.set_image_stack()
        mrc.voxel_size = 1.0
    script = textwrap.dedent("""
        import sys, numpy as np
        from cryoprior.io import ParticleStack, read_mrc
        def kb(key):
            return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key))
        if sys.argv[2] == "stack":
            chunks = (c for _, c in ParticleStack.from_file(sys.argv[1]).chunks(1024))
        else:
            data = read_mrc(sys.argv[1])[0]
            chunks = (np.array(data[s : s + 1024]) for s in range(0, len(data), 1024))
        before = kb("VmRSS")
        count = sum(len(c) for c in chunks)
        print(count, (kb("VmHWM") - before) / 1024)
    """)
    growth = {}
    for mode in ("stack", "mmap"):
        result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "big.mrcs"), mode],
                                capture_output=True, text=True, check=True, env={**os.environ})
        count, growth[mode] = result.stdout.split()
        assert int(count) == n
    assert float(growth["stack"]) < 300, growth
    assert float(growth["mmap"]) > 550, growth  # the measurement does see mapped pages


def test_resolve_prefers_star_folder_then_cwd(tmp_path, monkeypatch):
    (tmp_path / "star").mkdir()
    write_mrcs(tmp_path / "s.mrcs", _images(1), 1.0)
    write_mrcs(tmp_path / "star" / "s.mrcs", _images(1), 1.0)
    monkeypatch.chdir(tmp_path)
    names = pd.Series(["1@s.mrcs", Path(tmp_path / "s.mrcs").as_posix()])
    files, file_index, slice0 = resolve_image_names(names, tmp_path / "star" / "p.star")
    assert files == [tmp_path / "star" / "s.mrcs", tmp_path / "s.mrcs"]
    assert list(file_index) == [0, 1] and list(slice0) == [0, 0]
