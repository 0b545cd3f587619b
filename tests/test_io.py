"""Reading real RELION files of every dialect, and refusing broken ones clearly."""

from __future__ import annotations

import errno
import os
import shutil
import tracemalloc
import warnings

import mrcfile
import numpy as np
import pandas as pd
import pytest

from cryoday import io
from cryoday.errors import InputError, OutputError

warnings.filterwarnings("ignore", module="mrcfile")

# STAR files of ../shared/data that hold particles: (path, count, pixel size in A or None).
PARTICLE_FILES = [
    ("aspire/sample_particles_relion30.star", 17, 1.338),
    ("aspire/sample_particles_relion31.star", 17, 1.4),
    ("aspire/sample_relion_data.star", 17, 1.338),
    ("aspire/sample_relion_symmetry_group_D4.star", 17, 1.338),
    ("aspire/rln_proj_65_centered.star", 4, 1.0),
    ("aspire/rln_proj_65_shifted.star", 4, 1.0),
    ("cryodrgn/relion31.star", 5, 2.806),
    ("cryodrgn/relion31.v2.star", 5, 2.806),
    ("cryodrgn/relion31.6opticsgroups.star", 139, None),
    ("cryodrgn/empiar_10076_7.star", 7, 1.31),
    ("cryodrgn/FinalRefinement-OriginalParticles-PfCRT.star", 5, 1.035),
    ("cryojax/trpv1_small_stack.star", 10, 4.88),
    ("relion/ref_it002_data.star", 9, 3.54),
    ("relion/ap_s_c2d.star", 8915, 3.54),
    ("simplecryoem/particles.star", 4501, 1.2445),
    ("simplecryoem/pyem.star", 24, 3.54),
    ("scipion-em-esrf/input_particles.star", 2021, 3.0),
    ("aspire/rln_proj_64_centered.star", 4, 1.0),
    ("aspire/rln_proj_64_shifted.star", 4, 1.0),
    ("cryodrgn/sta_testing_bin8.star", 219, 1.96),
    ("cryojax/example_particles.star", 4, 4.4),
    ("cryojax/ribosome_4ug0_particles.star", 5, 4.0),
    ("cryojax/test_starfile.star", 3, 12.0),
]

# Particle files (test fixtures of other projects) that name an image twice: (path, count, pixel
# size, the 1-based rows of the first repeat). Refused by row; read once the repeats are dropped.
DUPLICATED = [("cryodrgn/relion5.star", 17, 0.89, (1, 12)),
              ("starfile/rln3.1_data_style.star", 2, 1.04, (1, 2)),
              ("cryodrgn/toy_projections_13.star", 13, 1.035, (10, 13))]

# Particle files whose pixel size is nowhere (STAR nor stack header): refused by name unless the
# config gives one.
NO_PIXEL_SIZE = [("aspire/rln_proj_64.star", 5), ("aspire/rln_proj_65.star", 5)]
# Particle files whose stacks the shared folder does not hold: refused, naming the stack.
STACKS_ABSENT = [("cryodrgn/toy.star", "toy_projections.mrcs"),
                 ("cryodrgn/toy_projections_dir.star", "toy_images_a.mrcs")]


@pytest.mark.parametrize(("name", "count", "pixel_size"), PARTICLE_FILES)
def test_every_dialect_is_read(shared_data, name, count, pixel_size):
    particles = io.read_particles(shared_data / name, require_ctf=False, check_stacks=False)
    assert len(particles) == count
    if pixel_size is not None:
        assert particles.pixel_size == pytest.approx(pixel_size, rel=2e-3)
    assert (particles.stack_index >= 0).all()
    assert all(p.startswith(str(shared_data)) or p.startswith("/") for p in particles.stack_paths)


@pytest.mark.parametrize(("name", "count", "pixel_size", "rows"), DUPLICATED)
def test_a_file_naming_an_image_twice_is_refused_by_row(shared_data, tmp_path, name, count,
                                                        pixel_size, rows):
    with pytest.raises(InputError, match=f"particle rows {rows[0]} and {rows[1]} name the same"):
        io.read_particles(shared_data / name, require_ctf=False, check_stacks=False)
    # Without the repeated rows the dialect reads like the others.
    seen, kept = set(), []
    for line in (shared_data / name).read_text().splitlines():
        image = next((w for w in line.split() if "@" in w), None)
        if image is None or image not in seen:
            kept.append(line)
            seen.add(image)
    (tmp_path / "once.star").write_text("\n".join(kept) + "\n")
    particles = io.read_particles(tmp_path / "once.star", require_ctf=False, check_stacks=False)
    assert 0 < len(particles) < count
    assert particles.pixel_size == pytest.approx(pixel_size, rel=2e-3)


@pytest.mark.parametrize(("name", "count"), NO_PIXEL_SIZE)
def test_a_file_without_pixel_size_needs_the_config(shared_data, name, count):
    with pytest.raises(InputError, match="pixel size found nowhere"):
        io.read_particles(shared_data / name, require_ctf=False)
    particles = io.read_particles(shared_data / name, pixel_size=1.5, require_ctf=False)
    assert len(particles) == count and particles.pixel_size == 1.5


@pytest.mark.parametrize(("name", "stack"), STACKS_ABSENT)
def test_a_file_whose_stack_is_absent_is_refused_by_name(shared_data, name, stack):
    with pytest.raises(InputError, match=stack):
        io.read_particles(shared_data / name, require_ctf=False)


def test_optics_groups_are_merged_per_particle(shared_data):
    particles = io.read_particles(shared_data / "cryodrgn/relion31.6opticsgroups.star",
                                  require_ctf=False, check_stacks=False)
    optics = particles.optics.set_index("rlnOpticsGroup")
    table = particles.table
    for column in ("rlnVoltage", "rlnSphericalAberration", "rlnImagePixelSize"):
        expected = optics.loc[table["rlnOpticsGroup"], column].to_numpy()
        assert np.allclose(table[column].to_numpy(), expected)
    assert table["rlnOpticsGroup"].nunique() == 6


def test_block_order_does_not_matter(shared_data):
    a = io.read_particles(shared_data / "cryodrgn/relion31.star", check_stacks=False)
    b = io.read_particles(shared_data / "cryodrgn/relion31.v2.star", check_stacks=False)
    assert np.allclose(io.ctf_params(a)["defocus_u"], io.ctf_params(b)["defocus_u"])
    assert a.pixel_size == b.pixel_size


def test_incomplete_ctf_is_refused_by_name(shared_data):
    with pytest.raises(InputError, match="rlnDefocusU|rlnVoltage|rlnSpherical|rlnAmplitude"):
        io.read_particles(shared_data / "aspire/sample_incomplete_ctf_params.star",
                          check_stacks=False)


def test_image_reading_from_a_stack_whose_header_says_volume(shared_data):
    particles = io.read_particles(shared_data / "aspire/sample_particles_relion31.star")
    assert particles.box == 200
    with io.ImageSource(particles) as source:
        images = source.read([0, 16, 3])
    direct = mrcfile.read(shared_data / "aspire/sample.mrcs")
    idx = particles.stack_index[[0, 16, 3]]
    assert np.array_equal(images, direct[idx])
    assert images.dtype == np.float32


def test_relion_31_real_particles(shared_data):
    particles = io.read_particles(shared_data / "cryodrgn/relion31.star")
    assert particles.box == 256 and particles.pixel_size == pytest.approx(2.806)
    ctf = io.ctf_params(particles)
    assert set(ctf) == {"defocus_u", "defocus_v", "defocus_angle", "voltage", "cs",
                        "amplitude_contrast", "bfactor", "phase_shift"}
    assert (ctf["voltage"] == 300).all()
    with io.ImageSource(particles) as source:
        assert source.read(np.arange(5)).shape == (5, 256, 256)


def trpv1_copy(shared_data, tmp_path):
    """The TRPV1 STAR file names its stack batch_0_restacked.mrc; ship it under that name."""
    shutil.copy(shared_data / "cryojax/trpv1_small_stack.mrcs", tmp_path / "batch_0_restacked.mrc")
    shutil.copy(shared_data / "cryojax/trpv1_small_stack.star", tmp_path / "particles.star")
    return tmp_path / "particles.star"


def test_poses_and_old_origin_columns(shared_data, tmp_path):
    particles = io.read_particles(trpv1_copy(shared_data, tmp_path))
    pose = io.poses(particles)
    table = particles.table
    assert np.allclose(pose["rot"], table["rlnAngleRot"])
    assert np.allclose(pose["shift_x"], table["rlnOriginXAngst"])
    shifted = io.read_particles(shared_data / "aspire/rln_proj_65_shifted.star", require_ctf=False)
    # Old-style rlnOriginX is in pixels: converted to A with the pixel size (1 A here).
    assert np.allclose(io.poses(shifted)["shift_x"], shifted.table["rlnOriginX"] * 1.0)


def test_reading_one_image_does_not_load_the_stack(tmp_path):
    n, box = 2000, 64
    with io.StackWriter(tmp_path / "big.mrcs", n, box, 1.5) as writer:
        writer.data[:] = 1.0
    table = pd.DataFrame({"rlnImageName": [f"{i + 1}@big.mrcs" for i in range(n)]})
    optics = None
    import starfile

    starfile.write({"particles": table}, tmp_path / "p.star")
    particles = io.read_particles(tmp_path / "p.star", require_ctf=False)
    assert particles.pixel_size == pytest.approx(1.5)  # from the stack header
    tracemalloc.start()
    with io.ImageSource(particles) as source:
        image = source.read([1234])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert image.shape == (1, box, box) and optics is None
    assert peak < 5 * box * box * 4 + 200_000, f"read one image but allocated {peak} bytes"


def test_round_trips(tmp_path, rng):
    volume = rng.random((12, 12, 12)).astype(np.float32)
    io.write_map(tmp_path / "m.mrc", volume, 2.5)
    back, voxel = io.read_map(tmp_path / "m.mrc")
    assert np.array_equal(back, volume) and voxel == pytest.approx(2.5)
    images = rng.random((7, 10, 10)).astype(np.float32)
    with io.StackWriter(tmp_path / "s.mrcs", 7, 10, 3.0) as writer:
        writer.data[:] = images
    assert np.array_equal(io.open_stack(tmp_path / "s.mrcs"), images)
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnImagePixelSize": [3.0],
                           "rlnVoltage": [300.0], "rlnSphericalAberration": [2.7],
                           "rlnAmplitudeContrast": [0.1], "rlnImageSize": [10]})
    table = pd.DataFrame({"rlnImageName": [f"{i + 1:06d}@s.mrcs" for i in range(7)],
                          "rlnDefocusU": np.linspace(1e4, 2e4, 7), "rlnOpticsGroup": 1})
    io.write_particles(tmp_path / "p.star", table, optics)
    particles = io.read_particles(tmp_path / "p.star")
    assert particles.box == 10 and particles.pixel_size == 3.0
    assert np.allclose(io.ctf_params(particles)["defocus_u"], table["rlnDefocusU"])
    assert list(particles.original_table().columns) == list(table.columns)


def test_failed_writers_leave_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with io.StackWriter(tmp_path / "s.mrcs", 3, 8, 1.0) as writer:
            writer.data[0] = 1.0
            raise RuntimeError("killed")
    with pytest.raises(RuntimeError):
        with io.atomic_path(tmp_path / "x.json") as tmp:
            tmp.write_text("{")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def write_set(tmp_path, n=4, box=8, psize=2.0, names=None):
    with io.StackWriter(tmp_path / "s.mrcs", n, box, psize) as writer:
        writer.data[:] = np.random.default_rng(0).random((n, box, box))
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnImagePixelSize": [psize],
                           "rlnVoltage": [300.0], "rlnSphericalAberration": [2.7],
                           "rlnAmplitudeContrast": [0.1]})
    table = pd.DataFrame({"rlnImageName": names or [f"{i + 1}@s.mrcs" for i in range(n)],
                          "rlnDefocusU": [1e4] * n, "rlnOpticsGroup": [1] * n})
    io.write_particles(tmp_path / "p.star", table, optics)
    return tmp_path / "p.star"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("_rlnVoltage", "_rlnVoltag"), "rlnVoltage"),
        (lambda t: t.replace("10000.0", "1e4x", 1), "rlnDefocusU"),
        (lambda t: t.replace("4@s.mrcs", "9@s.mrcs"), "holds 4 images"),
        (lambda t: t.replace("4@s.mrcs", "4@missing.mrcs"), "missing.mrcs"),
        (lambda t: t.replace("4@s.mrcs", "4@s.mrcs 10000.0 3\n#"), "optics group"),
        (lambda t: t.replace("_rlnImagePixelSize", "_rlnSomething"), None),
    ],
)
def test_bad_files_are_refused_with_the_culprit_named(tmp_path, edit, message):
    star = write_set(tmp_path)
    star.write_text(edit(star.read_text()))
    if message is None:  # no pixel size in the table: the stack header still has it
        assert io.read_particles(star).pixel_size == 2.0
        return
    with pytest.raises(InputError, match=message):
        io.read_particles(star)


def test_nan_image_names_the_particle(tmp_path):
    star = write_set(tmp_path)
    with mrcfile.open(tmp_path / "s.mrcs", "r+") as mrc:
        mrc.data[2, 1, 1] = np.nan
    with io.ImageSource(io.read_particles(star)) as source:
        with pytest.raises(InputError, match="particle row 3"):
            source.read(np.arange(4))


def test_non_square_and_mismatched_stacks(tmp_path):
    with mrcfile.new(tmp_path / "r.mrcs") as mrc:
        mrc.set_data(np.zeros((2, 8, 10), dtype=np.float32))
        mrc.set_image_stack()
    star = write_set(tmp_path, names=["1@r.mrcs", "2@r.mrcs", "1@s.mrcs", "2@s.mrcs"])
    with pytest.raises(InputError, match="not square"):
        io.read_particles(star)
    with mrcfile.new(tmp_path / "r.mrcs", overwrite=True) as mrc:
        mrc.set_data(np.zeros((2, 10, 10), dtype=np.float32))
        mrc.set_image_stack()
    with pytest.raises(InputError, match="10 px but other stacks have 8|8 px but other stacks"):
        io.read_particles(star)


def test_empty_and_missing(tmp_path):
    with pytest.raises(InputError, match="not found"):
        io.read_particles(tmp_path / "nothing.star")
    (tmp_path / "e.star").write_text("data_particles\n\nloop_\n_rlnImageName #1\n")
    with pytest.raises(InputError, match="empty|no particle table"):
        io.read_particles(tmp_path / "e.star")


def test_written_results_are_readable_as_the_umask_allows(tmp_path):
    old = os.umask(0o022)
    try:
        with io.StackWriter(tmp_path / "s.mrcs", 2, 8, 1.0) as writer:
            writer.data[:] = 1.0
        with io.atomic_path(tmp_path / "x.json") as tmp:
            tmp.write_text("{}")
    finally:
        os.umask(old)
    for name in ("s.mrcs", "x.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


def test_stack_header_statistics_are_those_of_the_images(tmp_path, rng):
    images = rng.standard_normal((30, 16, 16)).astype(np.float32) * 2 + 5
    with io.StackWriter(tmp_path / "s.mrcs", 30, 16, 1.0) as writer:
        writer.data[0:10] = images[:10]
        writer.data[10:] = images[10:]
    with mrcfile.open(tmp_path / "s.mrcs", header_only=True) as mrc:
        header = mrc.header
        assert float(header.dmin) == pytest.approx(images.min())
        assert float(header.dmax) == pytest.approx(images.max())
        assert float(header.dmean) == pytest.approx(images.mean(), abs=1e-5)
        assert float(header.rms) == pytest.approx(images.std(), rel=1e-5)


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class FullDisk:
    """A file object whose writes fail as on a full disk."""

    def __init__(self, file):
        self._file = file
        self.name = file.name

    def seek(self, *args):
        return self._file.seek(*args)

    def write(self, data):
        no_space()

    def close(self):
        self._file.close()


def test_a_full_disk_names_the_output_not_the_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "results" / "x.json"
    with (pytest.raises(OutputError, match=f"{target}: cannot write it \\(No space left"),
          io.atomic_path(target) as tmp):
        no_space(tmp)
    with (pytest.raises(OutputError, match="s.mrcs: cannot write it"),
          io.StackWriter(tmp_path / "s.mrcs", 4, 8, 1.0) as writer):
        writer._file = FullDisk(writer._file)
        writer.data._file = writer._file
        writer.data[0:2] = 1.0
    monkeypatch.setattr(io.starfile, "write", no_space)
    with pytest.raises(OutputError, match="p.star: cannot write it"):
        io.write_particles(tmp_path / "p.star", pd.DataFrame({"rlnImageName": ["1@s.mrcs"]}))
    monkeypatch.setattr(io.mrcfile, "new", no_space)
    with pytest.raises(OutputError, match="m.mrc: cannot write it"):
        io.write_map(tmp_path / "m.mrc", np.zeros((4, 4, 4), np.float32), 1.0)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_an_error_that_is_not_the_writers_keeps_its_type(tmp_path):
    with pytest.raises(FileNotFoundError), io.atomic_path(tmp_path / "x.json"):
        (tmp_path / "some input that is not there").read_text()
    assert list(tmp_path.iterdir()) == []


def test_outputs_that_could_never_be_written_are_refused_first(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(OutputError, match="is a directory"):
        io.check_writable(tmp_path)
    with pytest.raises(OutputError, match="a_file is a file, not a directory"):
        io.check_writable(tmp_path / "a_file" / "map.mrc")
    with pytest.raises(OutputError, match="a_file"), io.atomic_path(tmp_path / "a_file/map.mrc"):
        pass
    assert io.check_writable(tmp_path / "new" / "folder" / "map.mrc").name == "map.mrc"


def test_a_real_map_cut_short_is_called_truncated(shared_data, tmp_path):
    data = (shared_data / "mrcfile/EMD-3197.map").read_bytes()
    (tmp_path / "cut.map").write_bytes(data[:-4000])
    with pytest.raises(InputError, match=f"cut.map: truncated: .* {len(data):,} bytes, but the "
                                         f"file has {len(data) - 4000:,} bytes"):
        io.read_map(tmp_path / "cut.map")
    volume, _ = io.read_map(shared_data / "mrcfile/EMD-3197.map")  # whole, with its header
    assert volume.shape == (20, 20, 20)


def test_every_shared_stack_and_map_agrees_with_its_header(shared_data):
    files = sorted(shared_data.glob("*/*.mrc*")) + sorted(shared_data.glob("*/*.map"))
    for path in files:
        if path.suffix in (".mrc", ".mrcs", ".map"):
            nx, ny, nz, mode, _, _ = io.mrc_header(path)
            assert min(nx, ny, nz) > 0 and mode in io.MRC_MODE_BYTES


def test_a_file_fixed_in_place_is_read_afresh(tmp_path):
    # starfile reads through linecache; a failed parse left the file's lines cached, so the
    # fixed file (same size, same time stamp) was parsed from the broken lines again.
    star = write_set(tmp_path)
    good = star.read_text()
    bad = "data_particles\n"
    star.write_text(bad + "#" * (len(good) - len(bad) - 1) + "\n")
    with pytest.raises(InputError, match="not a readable STAR file"):
        io.read_particles(star)
    stamp = star.stat()
    star.write_text(good)
    os.utime(star, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert len(io.read_particles(star)) == 4


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("4@s.mrcs\t10000.000000\t1", "4@s.mrcs\t10000.0"),
         "truncated at line"),
        (lambda t: t.replace("2@s.mrcs\t10000.000000", "2@s.mrcs"), "line .* has 2 values"),
        (lambda t: t.replace("10000.000000", "1.5"),
         "rlnDefocusU 1.5 at particle row 1 .*multiply by 10,000"),
        (lambda t: t.replace("10000.000000\t1\n", "-5000\t1\n", 1), "negative"),
        (lambda t: t.replace("3@s.mrcs", "1@s.mrcs"), "particle rows 1 and 3"),
        (lambda t: t.replace("300.000000", "0.000000"), "rlnVoltage 0 at data_optics row 1"),
        (lambda t: t.replace("0.100000", "10.000000"), "percentage"),
        (lambda t: t.replace("2.700000", "2700.000000"), "micrometres"),
        (lambda t: t.replace("\t2.000000", "\t0.000000", 1), "rlnImagePixelSize 0"),
    ],
)
def test_structure_units_and_repeats_are_refused_by_line_column_and_row(tmp_path, edit, message):
    star = write_set(tmp_path)
    text = star.read_text()
    edited = edit(text)
    assert edited != text
    star.write_text(edited.rstrip("\n") if "truncated" in message else edited)
    with pytest.raises(InputError, match=message):
        io.read_particles(star)


def test_a_pixel_size_given_in_nm_by_the_config_is_refused(tmp_path):
    star = write_set(tmp_path)
    star.write_text(star.read_text().replace("_rlnImagePixelSize", "_rlnSomething"))
    with mrcfile.open(tmp_path / "s.mrcs", "r+") as mrc:
        mrc.voxel_size = 0.0
    with pytest.raises(InputError, match="pixel size 0.15 A/px \\(from the pixel size given"):
        io.read_particles(star, pixel_size=0.15)


def test_read_rows_in_chunks_equals_indexing(tmp_path, monkeypatch):
    """read_rows reads a few rows at a time into one float32 array: the same images as plain
    indexing, in the order asked for (unsorted, repeated, a slice)."""
    from cryoday import io as cio

    stack_path = tmp_path / "s.mrcs"
    data = np.random.default_rng(2).standard_normal((23, 6, 6)).astype(np.float32)
    with cio.StackWriter(stack_path, 23, 6, 2.0) as writer:
        writer.data[:] = data
    stack = cio.open_stack(stack_path)
    monkeypatch.setattr(cio, "READ_CHUNK_BYTES", 5 * 6 * 6 * 4)  # five images a chunk
    rows = np.array([22, 0, 7, 7, 13, 1, 2, 3, 4, 5, 6, 19])
    got = cio.read_rows(stack, rows)
    assert got.dtype == np.float32 and got.shape == (12, 6, 6)
    np.testing.assert_array_equal(got, data[rows])
    np.testing.assert_array_equal(cio.read_rows(stack, slice(3, 20, 4)), data[3:20:4])
    assert cio.read_rows(stack, np.zeros(0, np.int64)).shape == (0, 6, 6)
    got[:] = 0  # a copy, not a view of the file
    np.testing.assert_array_equal(cio.open_stack(stack_path), data)
