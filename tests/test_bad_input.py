"""Bad input, tried as a new user would: through Snakemake, each case must fail with a clear
message that names the problem, a non-zero exit, and no half-written outputs."""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import starfile
from workflow_helpers import run_snakemake, write_config

TARGET = "results/bad/preprocess/particles.star"


def good_particles(directory: Path, n: int = 12, box: int = 24) -> Path:
    """A small valid RELION 3.1 particle set with its stack."""
    rng = np.random.default_rng(0)
    with mrcfile.new(directory / "stack.mrcs") as mrc:
        mrc.set_data(rng.standard_normal((n, box, box)).astype(np.float32))
        mrc.set_image_stack()
        mrc.voxel_size = 2.0
    optics = {
        "rlnOpticsGroup": [1],
        "rlnOpticsGroupName": ["opticsGroup1"],
        "rlnImagePixelSize": [2.0],
        "rlnImageSize": [box],
        "rlnVoltage": [300.0],
        "rlnSphericalAberration": [2.7],
        "rlnAmplitudeContrast": [0.1],
    }
    particles = {
        "rlnImageName": [f"{i + 1:06d}@stack.mrcs" for i in range(n)],
        "rlnDefocusU": [15000.0] * n,
        "rlnDefocusV": [14000.0] * n,
        "rlnDefocusAngle": [10.0] * n,
        "rlnOpticsGroup": [1] * n,
    }
    import pandas as pd

    path = directory / "particles.star"
    starfile.write(
        {"optics": pd.DataFrame(optics), "particles": pd.DataFrame(particles)}, path
    )
    return path


def run_preprocess(directory: Path, star: str = "particles.star", **dataset):
    write_config(
        directory,
        {"datasets": {"bad": {"particles": star, **dataset}}, "preprocess": {"n_heldout": 2}},
    )
    return run_snakemake(directory, "--cores", "1", TARGET, timeout=300)


def assert_refused(proc, directory: Path, *needles: str):
    output = proc.stdout + proc.stderr
    logs = "".join(p.read_text() for p in (directory / "logs").rglob("*.log")) if (
        directory / "logs"
    ).exists() else ""
    assert proc.returncode != 0, output[-2000:]
    for needle in needles:
        assert needle in output + logs, f"{needle!r} not in the error output:\n{logs[-3000:]}"
    leftovers = list((directory / "results").rglob("*")) if (directory / "results").exists() else []
    assert not [p for p in leftovers if p.is_file()], f"half-written outputs left: {leftovers}"


def edit_star(path: Path, old: str, new: str):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def test_the_good_set_passes(tmp_path):
    good_particles(tmp_path)
    proc = run_preprocess(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / TARGET).is_file()


def test_missing_star_file(tmp_path):
    assert_refused(run_preprocess(tmp_path, star="nowhere.star"), tmp_path, "nowhere.star")


def test_missing_ctf_column(tmp_path):
    star = good_particles(tmp_path)
    text = star.read_text().replace("_rlnDefocusU", "_rlnSomethingElse")
    star.write_text(text)
    assert_refused(run_preprocess(tmp_path), tmp_path, "rlnDefocusU")


def test_bad_number(tmp_path):
    star = good_particles(tmp_path)
    edit_star(star, "15000.0", "15OOO.0")
    assert_refused(run_preprocess(tmp_path), tmp_path, "rlnDefocusU")


def test_unknown_optics_group(tmp_path):
    star = good_particles(tmp_path)
    text = star.read_text()
    # The last particle row names optics group 7, which the optics table lacks.
    lines = text.rstrip("\n").split("\n")
    lines[-1] = lines[-1][: lines[-1].rstrip().rfind(" ")] + " 7"
    star.write_text("\n".join(lines) + "\n")
    assert_refused(run_preprocess(tmp_path), tmp_path, "optics group")


def test_index_past_the_end_of_the_stack(tmp_path):
    star = good_particles(tmp_path)
    edit_star(star, "000012@stack.mrcs", "000099@stack.mrcs")
    assert_refused(run_preprocess(tmp_path), tmp_path, "stack.mrcs", "99")


def test_missing_stack(tmp_path):
    good_particles(tmp_path)
    (tmp_path / "stack.mrcs").unlink()
    assert_refused(run_preprocess(tmp_path), tmp_path, "stack.mrcs")


def test_truncated_stack(tmp_path):
    good_particles(tmp_path)
    stack = tmp_path / "stack.mrcs"
    data = stack.read_bytes()
    stack.write_bytes(data[: len(data) - 24 * 24 * 4 * 3])
    # Named as truncated with both sizes, not as a bad header.
    assert_refused(run_preprocess(tmp_path), tmp_path, "stack.mrcs", "truncated",
                   f"{len(data):,}", f"{len(data) - 24 * 24 * 4 * 3:,}")


def test_nan_image(tmp_path):
    good_particles(tmp_path)
    with mrcfile.open(tmp_path / "stack.mrcs", "r+") as mrc:
        mrc.data[5, 3, 3] = np.nan
    assert_refused(run_preprocess(tmp_path), tmp_path, "stack.mrcs", "6")


def test_no_pixel_size_anywhere(tmp_path):
    star = good_particles(tmp_path)
    text = star.read_text().replace("_rlnImagePixelSize", "_rlnSomethingElse")
    star.write_text(text)
    with mrcfile.open(tmp_path / "stack.mrcs", "r+") as mrc:
        mrc.voxel_size = 0.0
    assert_refused(run_preprocess(tmp_path), tmp_path, "pixel size")


def test_empty_particle_table(tmp_path):
    star = good_particles(tmp_path)
    text = star.read_text()
    head = text[: text.index("000001@stack.mrcs")]
    star.write_text(head.rstrip() + "\n")
    assert_refused(run_preprocess(tmp_path), tmp_path, "particles.star")


def test_pure_noise_particles_do_not_crash_preprocessing(tmp_path):
    # good_particles *is* pure noise: preprocessing must take it (contrast undecided, kept).
    good_particles(tmp_path)
    proc = run_preprocess(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_wrong_config_type_names_the_key(tmp_path):
    good_particles(tmp_path)
    proc = run_preprocess(tmp_path, pixel_size="two")
    assert_refused(proc, tmp_path, "pixel_size")


def test_duplicated_star_block(tmp_path):
    star = good_particles(tmp_path)
    text = star.read_text()
    star.write_text(text + "\n" + text[text.index("data_particles"):])
    assert_refused(run_preprocess(tmp_path), tmp_path, "particles.star", "data_particles",
                   "twice")


def test_complex_mode_stack(tmp_path):
    star = good_particles(tmp_path)
    with mrcfile.new(tmp_path / "fourier.mrcs") as mrc:
        mrc.set_data(np.ones((12, 24, 24), np.complex64))
        mrc.set_image_stack()
    edit_star(star, "000001@stack.mrcs", "000001@fourier.mrcs")
    assert_refused(run_preprocess(tmp_path), tmp_path, "fourier.mrcs", "complex")


def test_optics_groups_with_other_pixel_sizes(tmp_path):
    star = good_particles(tmp_path)
    blocks = starfile.read(star, always_dict=True)
    optics = blocks["optics"]
    second = optics.copy()
    second["rlnOpticsGroup"] = 2
    second["rlnOpticsGroupName"] = "opticsGroup2"
    second["rlnImagePixelSize"] = 2.5
    import pandas as pd

    blocks["optics"] = pd.concat([optics, second], ignore_index=True)
    blocks["particles"].loc[6:, "rlnOpticsGroup"] = 2
    starfile.write(blocks, star, overwrite=True)
    assert_refused(run_preprocess(tmp_path), tmp_path, "particles.star", "pixel sizes",
                   "2.5")


def test_reference_in_another_box_without_voxel_size(tmp_path):
    good_particles(tmp_path)
    with mrcfile.new(tmp_path / "reference.mrc") as mrc:
        mrc.set_data(np.zeros((40, 40, 40), np.float32))
    proc = run_preprocess(tmp_path, reference="reference.mrc")
    assert_refused(proc, tmp_path, "reference.mrc", "40 px", "voxel size")


def test_reference_in_another_box_with_its_voxel_size_is_resampled(tmp_path):
    good_particles(tmp_path)
    with mrcfile.new(tmp_path / "reference.mrc") as mrc:
        mrc.set_data(np.zeros((16, 16, 16), np.float32))
        mrc.voxel_size = 3.0
    proc = run_preprocess(tmp_path, reference="reference.mrc")
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "logs/preprocess/bad.log").read_text()
    assert "resampled to 24 px at 2.0000 A/px" in log


def test_missing_reference_map(tmp_path):
    good_particles(tmp_path)
    assert_refused(run_preprocess(tmp_path, reference="nowhere.mrc"), tmp_path, "nowhere.mrc")
