"""cryoSPARC .cs files: the same particles as a STAR file, round trips, and clear refusals."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest

from cryoday import cryosparc, io
from cryoday.errors import InputError
from cryoday.geometry import euler_to_matrix

warnings.filterwarnings("ignore", module="mrcfile")

# Fields write_cs sets from the table; every other field of the source must come back as it was.
WRITTEN = {f"alignments3D/{k}" for k in ("pose", "shift", "psize_A", "class", "split")}


def rodrigues_transposed(pose: np.ndarray) -> np.ndarray:
    """Slow reference for RELION's matrix of a cryoSPARC pose, written out as pyem's ``expmap``
    does (the skew matrix of the axis with pyem's signs, which yields ``R^T``), one at a time."""
    out = np.empty((len(pose), 3, 3))
    for i, e in enumerate(np.asarray(pose, dtype=np.float64)):
        theta = np.linalg.norm(e)
        if theta < 1e-16:
            out[i] = np.eye(3)
            continue
        w = e / theta
        k = np.array([[0, w[2], -w[1]], [-w[2], 0, w[0]], [w[1], -w[0], 0]])
        out[i] = np.eye(3) + np.sin(theta) * k + (1 - np.cos(theta)) * k @ k
    return out


def table_matrices(table) -> np.ndarray:
    return euler_to_matrix(table["rlnAngleRot"], table["rlnAngleTilt"], table["rlnAnglePsi"])


@pytest.fixture
def j24(shared_data):
    return shared_data / "cryodrgn" / "cryosparc_P12_J24_001_particles.cs"


@pytest.fixture
def trpv1(shared_data, tmp_path):
    """10 real particles with poses, shifts, classes, subsets and CTF, stack where it names it."""
    folder = tmp_path / "trpv1"
    folder.mkdir()
    shutil.copy(shared_data / "cryojax" / "trpv1_small_stack.star", folder)
    shutil.copy(shared_data / "cryojax" / "trpv1_small_stack.mrcs",
                folder / "batch_0_restacked.mrc")
    return io.read_particles(folder / "trpv1_small_stack.star")


# ----------------------------------------------------------------------------- reading


def test_empiar_cs_and_star_give_the_same_particles(shared_data):
    folder = shared_data / "cryodrgn"
    cs = cryosparc.read_cs(folder / "empiar_10076_7.cs")
    star = io.read_particles(folder / "empiar_10076_7.star")
    assert len(cs) == len(star) == 7
    # The STAR file prints 5-6 significant digits, the .cs holds float32: agree to the former.
    for column, tol in (("rlnDefocusU", 0.06), ("rlnDefocusV", 0.06), ("rlnDefocusAngle", 1e-4),
                        ("rlnVoltage", 1e-4), ("rlnSphericalAberration", 1e-6),
                        ("rlnAmplitudeContrast", 1e-7)):
        np.testing.assert_allclose(cs.table[column].to_numpy(float),
                                   star.table[column].to_numpy(float), rtol=0, atol=tol,
                                   err_msg=column)
    a, b = io.ctf_params(cs), io.ctf_params(star)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=2e-6, atol=1e-6, err_msg=key)
    # STAR: 5 um / 38168x; .cs: float32 of the same number.
    assert cs.pixel_size == pytest.approx(star.pixel_size, rel=1e-7)
    assert cs.box == star.box == 320
    np.testing.assert_array_equal(cs.stack_paths, star.stack_paths)
    np.testing.assert_array_equal(cs.stack_index, star.stack_index)
    assert list(cs.table["rlnImageName"]) == [f"{i:06d}@empiar_10076_7.mrc" for i in range(1, 8)]
    assert io.poses(cs) is None and io.poses(star) is None


def test_poses_follow_pyem_and_cryodrgn(j24):
    """A = R(pose)^T and rlnOriginXAngst = shift_px * psize, as csparc2star/parse_pose_csparc."""
    particles = cryosparc.read_cs(j24, check_stacks=False)
    raw = np.load(j24)
    assert len(particles) == len(raw) == 2019
    np.testing.assert_allclose(table_matrices(particles.table),
                               rodrigues_transposed(raw["alignments3D/pose"]), atol=1e-9)
    pose = io.poses(particles)
    psize = raw["alignments3D/psize_A"].astype(float)
    np.testing.assert_allclose(pose["shift_x"], raw["alignments3D/shift"][:, 0] * psize)
    np.testing.assert_allclose(pose["shift_y"], raw["alignments3D/shift"][:, 1] * psize)
    np.testing.assert_array_equal(particles.table["rlnClassNumber"],
                                  raw["alignments3D/class"].astype(int) + 1)
    np.testing.assert_allclose(particles.table["rlnDefocusAngle"],
                               np.rad2deg(raw["ctf/df_angle_rad"].astype(float)))
    assert particles.pixel_size == pytest.approx(2.95)
    assert particles.table["rlnImageName"].iloc[1].startswith("000002@J19/extract/")


def test_job_blob_paths_are_relative_to_the_project(j24, tmp_path):
    """A job's .cs sits in P12/J24/ and names its stacks J19/extract/... from P12/."""
    job = tmp_path / "P12" / "J24"
    job.mkdir(parents=True)
    shutil.copy(j24, job / "J24_particles.cs")
    stacks = {p.decode() for p in np.load(j24)["blob/path"]}
    for stack in stacks:
        (tmp_path / "P12" / stack).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "P12" / stack).touch()
    particles = cryosparc.read_cs(job / "J24_particles.cs", check_stacks=False)
    name = particles.table["rlnImageName"].iloc[0].partition("@")[2]
    assert particles.stack_paths[0] == str(tmp_path / "P12" / name)
    # Even before the stacks are there, a job folder's parent is the first guess.
    shutil.rmtree(tmp_path / "P12" / "J19")
    again = cryosparc.read_cs(job / "J24_particles.cs", check_stacks=False)
    np.testing.assert_array_equal(again.stack_paths, particles.stack_paths)


def test_star_with_poses_and_its_cs_agree(trpv1, tmp_path):
    """A STAR set with poses and CTF, written as .cs and read back, is the same set."""
    star = trpv1
    table = star.table.copy()
    table["rlnImageName"] = star.image_names_from(tmp_path)
    table["rlnImageSize"] = star.box
    cryosparc.write_cs(tmp_path / "particles.cs", table)
    cs = cryosparc.read_cs(tmp_path / "particles.cs")
    assert cs.box == star.box and cs.pixel_size == pytest.approx(star.pixel_size, rel=1e-7)
    np.testing.assert_array_equal(cs.stack_paths, star.stack_paths)
    np.testing.assert_array_equal(cs.stack_index, star.stack_index)
    np.testing.assert_allclose(table_matrices(cs.table), table_matrices(star.table), atol=1e-6)
    a, b = io.poses(cs), io.poses(star)
    for key in ("shift_x", "shift_y"):
        np.testing.assert_allclose(a[key], b[key], atol=1e-5)
    a, b = io.ctf_params(cs), io.ctf_params(star)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-6, atol=1e-6, err_msg=key)


def test_exported_and_empty_real_files(shared_data):
    exported = shared_data / "cryodrgn" / "cryosparc_J2_particles_exported.cs"
    particles = cryosparc.read_cs(exported, check_stacks=False)
    assert len(particles) == 22 and particles.pixel_size == pytest.approx(1.345)
    # The ">" cryoSPARC puts before imported paths is not part of the path.
    assert particles.table["rlnImageName"].iloc[0] == \
        "000001@J1/imported/000090334788266266069_18jam15b_0345_ali_DW.mrcs"
    assert io.poses(particles) is None  # 2D alignments only
    assert cryosparc.contrast_sign(particles) == -1
    with pytest.raises(InputError, match="blob/path stack J1/imported/.*not found"):
        cryosparc.read_cs(exported)
    with pytest.raises(InputError, match="4k_dataset.cs: the .cs file has no particles"):
        cryosparc.read_cs(shared_data / "cryosparc-tools" / "4k_dataset.cs")


def _split_job(j24, folder, shuffle_rng=None):
    """J24_particles.cs (uid, blob, alignments3D) + P12_J24_passthrough_particles.cs (uid, ctf),
    as a cryoSPARC job writes them."""
    raw = np.load(j24)
    own = [n for n in raw.dtype.names if not n.startswith("ctf/")]
    passed = ["uid"] + [n for n in raw.dtype.names if n.startswith("ctf/")]
    main = folder / "J24_particles.cs"
    with open(main, "wb") as f:
        np.save(f, raw[own])
    other = raw[passed]
    if shuffle_rng is not None:
        other = other[shuffle_rng.permutation(len(other))]
    with open(folder / "P12_J24_passthrough_particles.cs", "wb") as f:
        np.save(f, other)
    return main


def test_passthrough_found_beside_and_matched_by_uid(j24, tmp_path, rng):
    main = _split_job(j24, tmp_path, shuffle_rng=rng)
    merged = cryosparc.read_cs(main, check_stacks=False)
    whole = cryosparc.read_cs(j24, check_stacks=False)
    for column in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnVoltage",
                   "rlnAngleRot", "rlnOriginXAngst", "cryosparcUid"):
        np.testing.assert_array_equal(merged.table[column], whole.table[column], err_msg=column)


def test_missing_ctf_names_the_passthrough_looked_for(j24, tmp_path):
    main = _split_job(j24, tmp_path)
    (tmp_path / "P12_J24_passthrough_particles.cs").unlink()
    with pytest.raises(InputError, match=r"J24_particles.cs: missing CTF field\(s\) ctf/df1_A.*"
                                         r"looked for .*J24_passthrough_particles"):
        cryosparc.read_cs(main, check_stacks=False)
    particles = cryosparc.read_cs(main, require_ctf=False, check_stacks=False)
    assert "rlnDefocusU" not in particles.table


# ----------------------------------------------------------------------------- writing


def test_round_trip_keeps_every_field_it_does_not_change(j24, tmp_path, rng):
    source = np.load(j24)
    particles = cryosparc.read_cs(j24, check_stacks=False)
    table = particles.table.copy()
    # New poses and classes, as a cryoday run gives them; a subset in another order.
    table["rlnAngleRot"] = rng.uniform(-180, 180, len(table))
    table["rlnAngleTilt"] = rng.uniform(0, 180, len(table))
    table["rlnAnglePsi"] = rng.uniform(-180, 180, len(table))
    table["rlnOriginXAngst"] = rng.normal(0, 5, len(table))
    table["rlnOriginYAngst"] = rng.normal(0, 5, len(table))
    table["rlnClassNumber"] = rng.integers(1, 4, len(table))
    keep = rng.permutation(len(table))[:1500]
    table = table.iloc[keep]
    out = tmp_path / "particles.cs"
    cryosparc.write_cs(out, table, source_cs=j24)

    written = np.load(out)
    assert written.dtype == source.dtype  # same fields, order and dtypes
    expected = source[keep]
    for name in source.dtype.names:
        if name not in WRITTEN:
            np.testing.assert_array_equal(written[name], expected[name], err_msg=name)
    np.testing.assert_array_equal(written["uid"], table["cryosparcUid"].to_numpy(np.uint64))
    np.testing.assert_allclose(rodrigues_transposed(written["alignments3D/pose"]),
                               table_matrices(table), atol=1e-6)
    np.testing.assert_allclose(written["alignments3D/shift"] * 2.95,
                               table[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(),
                               atol=1e-5)
    np.testing.assert_array_equal(written["alignments3D/class"],
                                  table["rlnClassNumber"].to_numpy() - 1)

    back = cryosparc.read_cs(out, check_stacks=False)
    np.testing.assert_allclose(table_matrices(back.table), table_matrices(table), atol=1e-6)


def test_unchanged_round_trip_reproduces_the_file(j24, tmp_path):
    source = np.load(j24)
    cryosparc.write_cs(tmp_path / "same.cs", cryosparc.read_cs(j24, check_stacks=False).table,
                       source_cs=j24)
    written = np.load(tmp_path / "same.cs")
    for name in source.dtype.names:
        if name == "alignments3D/pose":
            continue
        if source[name].dtype.kind == "f":  # float32 through float64 and back
            np.testing.assert_allclose(written[name], source[name], rtol=1e-6, atol=1e-5,
                                       err_msg=name)
        else:
            np.testing.assert_array_equal(written[name], source[name], err_msg=name)
    # The same rotation, though an angle near pi may come back as the opposite vector.
    np.testing.assert_allclose(rodrigues_transposed(written["alignments3D/pose"]),
                               rodrigues_transposed(source["alignments3D/pose"]), atol=1e-6)


def test_source_without_alignments_gains_the_whole_slot(shared_data, tmp_path):
    source_path = shared_data / "cryodrgn" / "empiar_10076_7.cs"
    source = np.load(source_path)
    table = cryosparc.read_cs(source_path).table.copy()
    table["rlnAngleRot"], table["rlnAngleTilt"], table["rlnAnglePsi"] = 10.0, 20.0, 30.0
    table["rlnOriginXAngst"], table["rlnOriginYAngst"] = 1.31, -2.62
    cryosparc.write_cs(tmp_path / "out.cs", table, source_cs=source_path)
    written = np.load(tmp_path / "out.cs")
    assert written.dtype.names[:len(source.dtype.names)] == source.dtype.names
    # cryosparc-tools' test file has every alignments3D field cryoSPARC writes.
    reference = np.load(shared_data / "cryosparc-tools" / "4k_dataset.cs")
    assert {n for n in written.dtype.names if n.startswith("alignments3D/")} == \
        {n for n in reference.dtype.names if n.startswith("alignments3D/")}
    for name in written.dtype.names:
        if name.startswith("alignments3D/"):
            assert written.dtype[name] == reference.dtype[name], name
        else:
            np.testing.assert_array_equal(written[name], source[name], err_msg=name)
    np.testing.assert_allclose(written["alignments3D/shift"], [[1.0, -2.0]] * 7, atol=1e-5)
    assert (written["alignments3D/class"] == 0).all()
    assert (written["alignments3D/class_posterior"] == 1).all()


def test_fresh_file_has_cryosparc_dtypes(shared_data, trpv1, tmp_path):
    star = trpv1
    table = star.table.copy()
    table["rlnImageName"] = star.image_names_from(tmp_path)
    cryosparc.write_cs(tmp_path / "fresh.cs", table, box=star.box)
    written = np.load(tmp_path / "fresh.cs")
    reference = np.load(shared_data / "cryodrgn" / "cryosparc_P12_J24_001_particles.cs")
    common = [n for n in written.dtype.names if n in reference.dtype.names and n != "blob/path"]
    assert len(common) >= 25
    for name in common:
        assert written.dtype[name] == reference.dtype[name], name
    assert written["blob/path"].dtype.kind == "S"
    assert len(np.unique(written["uid"])) == len(written)
    # Same names, same uids: a rerun writes the same file.
    cryosparc.write_cs(tmp_path / "again.cs", table, box=star.box)
    np.testing.assert_array_equal(np.load(tmp_path / "again.cs")["uid"], written["uid"])


def test_cryosparc_tools_reads_what_we_write(j24, tmp_path):
    dataset = pytest.importorskip("cryosparc.dataset")
    table = cryosparc.read_cs(j24, check_stacks=False).table
    cryosparc.write_cs(tmp_path / "out.cs", table.iloc[:100], source_cs=j24)
    loaded = dataset.Dataset.load(tmp_path / "out.cs")
    assert len(loaded) == 100
    np.testing.assert_array_equal(loaded["uid"], table["cryosparcUid"].to_numpy()[:100])


def test_write_is_atomic_and_refuses_unmatched_rows(j24, tmp_path):
    table = cryosparc.read_cs(j24, check_stacks=False).table
    bad = table.drop(columns="cryosparcUid").iloc[:10]
    with pytest.raises(InputError, match="10 particles but .* has 2019 rows"):
        cryosparc.write_cs(tmp_path / "out.cs", bad, source_cs=j24)
    alien = table.iloc[:3].copy()
    alien["cryosparcUid"] = np.uint64(12345)
    with pytest.raises(InputError, match="particle row 1 has uid 12345"):
        cryosparc.write_cs(tmp_path / "out.cs", alien, source_cs=j24)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- refusals


def _save(path, array):
    with open(path, "wb") as f:
        np.save(f, array)
    return path


@pytest.mark.parametrize("field, value, message", [
    ("ctf/df_angle_rad", 45.0, r"ctf/df_angle_rad is 45 at particle row 1, beyond 2 pi: degrees"),
    ("ctf/phase_shift_rad", 90.0, r"ctf/phase_shift_rad is 90 .*degrees"),
    ("blob/psize_A", 0.0, r"blob/psize_A is 0 A at particle row 1; a pixel size must be "),
    ("ctf/df1_A", np.nan, r"ctf/df1_A has a non-finite value at particle row 1"),
    ("ctf/accel_kv", 300000.0, r"ctf/accel_kv is 300000 .*volts"),
])
def test_wrong_units_and_values(shared_data, tmp_path, field, value, message):
    data = np.load(shared_data / "cryodrgn" / "empiar_10076_7.cs")
    data[field][0] = value
    path = _save(tmp_path / "bad.cs", data)
    shutil.copy(shared_data / "cryodrgn" / "empiar_10076_7.mrc", tmp_path)
    with pytest.raises(InputError, match=message):
        cryosparc.read_cs(path)


def test_missing_stack_names_the_file_and_field(shared_data, tmp_path):
    path = tmp_path / "empiar_10076_7.cs"
    shutil.copy(shared_data / "cryodrgn" / "empiar_10076_7.cs", path)
    with pytest.raises(InputError, match=r"empiar_10076_7.cs: blob/path stack "
                                         r"empiar_10076_7.mrc not found \(looked for"):
        cryosparc.read_cs(path)
    # With the project folder given, the stacks are found there.
    particles = cryosparc.read_cs(path, project_dir=shared_data / "cryodrgn")
    assert particles.box == 320


def test_stack_too_short_or_wrong_size(shared_data, tmp_path):
    data = np.load(shared_data / "cryodrgn" / "empiar_10076_7.cs")
    shutil.copy(shared_data / "cryodrgn" / "empiar_10076_7.mrc", tmp_path)
    short = data.copy()
    short["blob/idx"][3] = 7
    with pytest.raises(InputError, match="particle row 4 asks for image 8 of .* holds 7 images"):
        cryosparc.read_cs(_save(tmp_path / "short.cs", short))
    small = data.copy()
    small["blob/shape"][:] = 160
    with pytest.raises(InputError, match="blob/shape says 160 px at particle row 1 but the "
                                         "stacks hold 320 px"):
        cryosparc.read_cs(_save(tmp_path / "small.cs", small))


def test_not_a_particle_cs(shared_data, tmp_path):
    data = np.load(shared_data / "cryodrgn" / "empiar_10076_7.cs")
    fields = [n for n in data.dtype.names if n != "blob/idx"]
    with pytest.raises(InputError, match=r"missing field\(s\) blob/idx"):
        cryosparc.read_cs(_save(tmp_path / "noidx.cs", data[fields]), check_stacks=False)
    (tmp_path / "text.cs").write_text("uid,blob/path\n")
    with pytest.raises(InputError, match="text.cs: not a cryoSPARC .cs file"):
        cryosparc.read_cs(tmp_path / "text.cs")
    (tmp_path / "new.cs").write_bytes(b"\x95CSDAT" + bytes(64))
    with pytest.raises(InputError, match="compressed CSDAT format"):
        cryosparc.read_cs(tmp_path / "new.cs")
    with pytest.raises(InputError, match="missing.cs: cryoSPARC .cs file not found"):
        cryosparc.read_cs(tmp_path / "missing.cs")
    _save(tmp_path / "plain.cs", np.zeros(3))
    with pytest.raises(InputError, match="plain.cs: a .cs file holds a table of fields"):
        cryosparc.read_cs(tmp_path / "plain.cs")


def test_passthrough_of_another_job(j24, tmp_path):
    main = _split_job(j24, tmp_path)
    other = np.load(tmp_path / "P12_J24_passthrough_particles.cs")[:100]
    _save(tmp_path / "P12_J24_passthrough_particles.cs", other)
    with pytest.raises(InputError, match=r"passthrough_particles.cs: has no row for 1919 "
                                         r"particle\(s\) of .*J24_particles.cs"):
        cryosparc.read_cs(main, check_stacks=False)


def test_pose_conversion_inverts(rng):
    pose = rng.normal(size=(500, 3))
    pose *= (rng.uniform(0, np.pi, 500) / np.linalg.norm(pose, axis=1))[:, None]
    matrices = cryosparc.pose_to_matrix(pose)
    np.testing.assert_allclose(matrices, rodrigues_transposed(pose), atol=1e-12)
    np.testing.assert_allclose(cryosparc.matrix_to_pose(matrices), pose, atol=1e-9)


def _known_pose_map(particles: io.Particles) -> np.ndarray:
    """What ``cryoday reconstruct`` computes from a particle set with poses."""
    from cryoday.reconstruct import reconstruct

    pose = io.poses(particles)
    rotations = euler_to_matrix(pose["rot"], pose["tilt"], pose["psi"])
    shifts = np.stack([pose["shift_x"], pose["shift_y"]], axis=1) / particles.pixel_size
    with io.ImageSource(particles) as source:
        return reconstruct(source.read, len(particles), rotations, shifts,
                           io.ctf_params(particles), particles.pixel_size, particles.box)


def test_same_map_from_star_and_cs(trpv1, tmp_path):
    table = trpv1.table.copy()
    table["rlnImageName"] = trpv1.image_names_from(tmp_path)
    cryosparc.write_cs(tmp_path / "particles.cs", table, box=trpv1.box)
    from_star = _known_pose_map(trpv1)
    from_cs = _known_pose_map(cryosparc.read_cs(tmp_path / "particles.cs"))
    assert np.abs(from_star).max() > 0
    # The .cs stores poses and shifts as float32 (angles to ~6e-6 degrees): the maps of 10
    # particles agree to ~1.5e-5 of their norm; a wrong convention would differ by order one.
    assert np.linalg.norm(from_cs - from_star) < 1e-4 * np.linalg.norm(from_star)
    np.testing.assert_allclose(from_cs, from_star, rtol=0, atol=1e-4 * np.abs(from_star).max())
