"""Bad input, built from real particles, through the engine's preprocessing and the command line.

Each case starts from the ten real TRPV1 particles of the shared test data (48 px, 4.88 A, poses
and CTF) and breaks one thing: a unit, a value, a row, a stack's header or size, the file
itself, or a command-line argument. Refused cases must raise :class:`InputError` from
:func:`cryoday.preprocess.preprocess_particles` (the pipeline's preprocessing step) with one line
naming the file, column and row, and make ``python -m cryoday.cli reconstruct`` exit non-zero
with that line and no traceback; neither may leave an output file behind. Suspicious but
possible values must pass with a warning naming the column. (Snakemake's handling of the same
errors is tested in test_bad_input.py; cases tested there are not repeated here.)
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from conftest import SHARED_DATA

from cryoday import io, preprocess
from cryoday.errors import InputError, OutputError

REPO = Path(__file__).resolve().parents[1]
STACK = "batch_0_restacked.mrc"  # the name the TRPV1 STAR file gives its stack
STACK_BYTES = 1024 + 10 * 48 * 48 * 4
N_PARTICLES = 10


# ----------------------------------------------------------------------------- the good set


def trpv1(directory: Path, shared_data: Path) -> Path:
    """The real TRPV1 set, copied into ``directory`` as particles.star + its stack."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(shared_data / "cryojax/trpv1_small_stack.mrcs", directory / STACK)
    shutil.copy(shared_data / "cryojax/trpv1_small_stack.star", directory / "particles.star")
    for path in directory.iterdir():
        path.chmod(0o644)  # the shared copies are read-only
    return directory / "particles.star"


# Column positions (0-based) in the TRPV1 file's two tables.
PARTICLE = {"rlnImageName": 0, "rlnDefocusU": 6, "rlnDefocusV": 7, "rlnPhaseShift": 9}
OPTICS = {"rlnVoltage": 0, "rlnImagePixelSize": 1, "rlnSphericalAberration": 2,
          "rlnAmplitudeContrast": 3}


def _is_particle_row(line: str) -> bool:
    return "@" in line and not line.startswith(("_", "#"))


def set_particle(star: Path, column: str, value, rows=None) -> None:
    """Set ``column`` of the given 0-based particle rows (default all) to ``value``."""
    lines, k = star.read_text().split("\n"), 0
    for i, line in enumerate(lines):
        if _is_particle_row(line):
            if rows is None or k in rows:
                words = line.split()
                words[PARTICLE[column]] = str(value(words[PARTICLE[column]]) if callable(value)
                                              else value)
                lines[i] = " ".join(words)
            k += 1
    star.write_text("\n".join(lines))


def set_optics(star: Path, column: str, value) -> None:
    lines = star.read_text().split("\n")
    i = next(i for i, line in enumerate(lines) if line.endswith("opticsGroup7"))
    words = lines[i].split()
    words[OPTICS[column]] = str(value)
    lines[i] = " ".join(words)
    star.write_text("\n".join(lines))


def line_of_row(star: Path, row: int) -> int:
    """1-based line number of 0-based particle row ``row``."""
    rows = [i for i, line in enumerate(star.read_text().split("\n")) if _is_particle_row(line)]
    return rows[row] + 1


def set_header_word(stack: Path, word: int, value: int) -> None:
    data = bytearray(stack.read_bytes())
    data[4 * word:4 * word + 4] = np.int32(value).tobytes()
    stack.write_bytes(bytes(data))


# ----------------------------------------------------------------------------- the cases
# Each builder breaks a fresh copy in ``d`` and returns the needles the one-line message must
# hold (file, column, row, the fix); "$star" and "$stack" stand for the paths' names.


def defocus_in_micrometres(d):
    set_particle(d / "particles.star", "rlnDefocusU", lambda v: float(v) / 1e4)
    return ["particles.star", "rlnDefocusU", "particle row 1", "micrometres", "10,000"]


def negative_defocus(d):
    set_particle(d / "particles.star", "rlnDefocusV", -15222.73, rows={2})
    return ["particles.star", "rlnDefocusV", "particle row 3", "negative"]


def voltage_zero(d):
    set_optics(d / "particles.star", "rlnVoltage", 0)
    return ["particles.star", "rlnVoltage", "data_optics row 1", "optics group 7"]


def voltage_in_volts(d):
    set_optics(d / "particles.star", "rlnVoltage", 300000)
    return ["particles.star", "rlnVoltage", "volts", "divide by 1,000"]


def amplitude_contrast_percent(d):
    set_optics(d / "particles.star", "rlnAmplitudeContrast", 10)
    return ["particles.star", "rlnAmplitudeContrast", "data_optics row 1", "percentage",
            "divide by 100"]


def cs_in_micrometres(d):
    set_optics(d / "particles.star", "rlnSphericalAberration", 2000)
    return ["particles.star", "rlnSphericalAberration", "micrometres", "divide by 1,000"]


def pixel_size_in_nm(d):
    set_optics(d / "particles.star", "rlnImagePixelSize", 0.1)  # 1 A in nm
    return ["particles.star", "rlnImagePixelSize", "data_optics row 1", "nm", "multiply by 10"]


def pixel_size_zero(d):
    set_optics(d / "particles.star", "rlnImagePixelSize", 0)
    return ["particles.star", "rlnImagePixelSize", "data_optics row 1", "not a pixel size"]


def nan_in_a_ctf_column(d):
    set_particle(d / "particles.star", "rlnDefocusU", "nan", rows={3})
    return ["particles.star", "rlnDefocusU", "particle row 4", "nan"]


def every_row_duplicated(d):
    star = d / "particles.star"
    text = star.read_text().rstrip("\n")
    rows = [line for line in text.split("\n") if _is_particle_row(line)]
    star.write_text(text + "\n" + "\n".join(rows) + "\n")
    return ["particles.star", "particle rows 1 and 11", "same image", "10 repeated rows among 20"]


def one_row_duplicated(d):
    set_particle(d / "particles.star", "rlnImageName", f"000002@./{STACK}", rows={6})
    return ["particles.star", "particle rows 2 and 7", f"2@{STACK}"]


def image_index_zero(d):
    set_particle(d / "particles.star", "rlnImageName", f"000000@./{STACK}", rows={4})
    return ["particles.star", "particle row 5", "count from 1"]


def no_image_name_column(d):
    star = d / "particles.star"
    star.write_text(star.read_text().replace("_rlnImageName #1", "_rlnImageLabel #1"))
    return ["particles.star", "rlnImageName"]


def empty_star_file(d):
    (d / "particles.star").write_text("")
    return ["particles.star", "is empty (0 bytes)"]


def star_truncated_mid_row(d):
    star = d / "particles.star"
    text = star.read_text().rstrip("\n")
    last = line_of_row(star, N_PARTICLES - 1)
    star.write_text(text[: text.rindex("\n") + 40])  # the last row cut after 40 characters
    return ["particles.star", f"truncated at line {last}", "of the 14 values"]


def star_row_missing_a_value(d):
    star = d / "particles.star"
    set_particle(star, "rlnDefocusV", "", rows={2})
    return ["particles.star", f"line {line_of_row(star, 2)}", "13 values", "14 columns"]


def stack_given_as_particles(d):
    return {"star": d / STACK, "needles": [STACK, "binary file, not a STAR file"]}


def directory_as_particles(d):
    (d / "particles").mkdir()
    shutil.move(d / "particles.star", d / "particles" / "particles.star")
    return {"star": d / "particles", "needles": ["particles", "is a directory",
                                                  "particles.star"]}


def mode_byte_says_int16(d):
    set_header_word(d / STACK, 3, 1)  # mode 1: the file is twice what the header describes
    return [STACK, "mode 1", "fits mode 2", "mode byte"]


def mode_byte_says_complex(d):
    set_header_word(d / STACK, 3, 4)  # mode 4: half what the header describes
    return [STACK, "mode 4", "fits mode 2", "mode byte"]


def stack_data_truncated(d):
    stack = d / STACK
    stack.write_bytes(stack.read_bytes()[: STACK_BYTES - 48 * 48 * 4 * 3 // 2])
    return [STACK, "truncated", f"{STACK_BYTES:,} bytes", f"{STACK_BYTES - 13824:,} bytes",
            "8 of 10"]


def stack_header_says_more_images(d):
    set_header_word(d / STACK, 2, 12)  # nz = 12 images, 10 in the file
    return [STACK, "truncated", "12 x 48 x 48", f"{STACK_BYTES:,} bytes"]


def empty_stack_file(d):
    (d / STACK).write_bytes(b"")
    return [STACK, "0 bytes", "empty or truncated"]


def stack_of_volumes(d):
    with mrcfile.new(d / STACK, overwrite=True) as mrc:
        mrc.set_data(np.zeros((2, 5, 48, 48), np.float32))  # two 5 x 48 x 48 volumes
    return [STACK, "stack of 3D volumes"]


def stack_is_a_directory(d):
    (d / STACK).unlink()
    (d / STACK).mkdir()
    return [STACK, "is a directory"]


def reference_map_with_nans(d):
    volume = mrcfile.read(SHARED_DATA / "cryojax/trpv1_volume.mrc").copy()
    volume[10:12, 20, 20] = np.nan
    with warnings.catch_warnings(), mrcfile.new(d / "reference.mrc") as mrc:
        warnings.simplefilter("ignore")  # mrcfile's own note that the data holds NaN
        mrc.set_data(volume)
        mrc.voxel_size = 4.88
    return {"references": [d / "reference.mrc"], "needles": ["reference.mrc", "2 NaN"],
            "cli": False}


REFUSED = [defocus_in_micrometres, negative_defocus, voltage_zero, voltage_in_volts,
           amplitude_contrast_percent, cs_in_micrometres, pixel_size_in_nm, pixel_size_zero,
           nan_in_a_ctf_column, every_row_duplicated, one_row_duplicated, image_index_zero,
           no_image_name_column, empty_star_file, star_truncated_mid_row,
           star_row_missing_a_value, stack_given_as_particles, directory_as_particles,
           mode_byte_says_int16, mode_byte_says_complex, stack_data_truncated,
           stack_header_says_more_images, empty_stack_file, stack_of_volumes,
           stack_is_a_directory, reference_map_with_nans]

# Command-line arguments, on the good set: (arguments after ``reconstruct``, needles of the one
# line). Most break one argument of GOOD_ARGS.
GOOD_ARGS = ["particles.star", "-o", "out/map.mrc"]
BAD_ARGUMENTS = {
    "box_zero": (GOOD_ARGS + ["--box", "0"], ["--box", "at least 8"]),
    "box_larger_than_the_images": (GOOD_ARGS + ["--box", "64"], ["--box 64", "48 px"]),
    "box_not_a_number": (GOOD_ARGS + ["--box", "big"], ["--box", "'big' is not an integer"]),
    "negative_pixel_size": (GOOD_ARGS + ["--pixel-size", "-1.2"], ["--pixel-size", "above 0"]),
    "max_resolution_zero": (GOOD_ARGS + ["--max-resolution", "0"],
                            ["--max-resolution", "above 0"]),
    "subset_not_a_range": (GOOD_ARGS + ["--subset", "a:b"], ["--subset", "FIRST:LAST"]),
    "subset_past_the_end": (GOOD_ARGS + ["--subset", "20:30"], ["--subset 20:30",
                                                                "10 particles"]),
    "chunk_size_zero": (GOOD_ARGS + ["--chunk-size", "0"], ["--chunk-size", "at least 1"]),
    "wiener_negative": (GOOD_ARGS + ["--wiener", "-1"], ["--wiener", "above 0"]),
    "half_three": (GOOD_ARGS + ["--half", "3"], ["--half", "invalid choice"]),
    "no_output_given": (["particles.star"], ["-o/--output", "required"]),
    "missing_particles_file": (["nowhere.star", "-o", "out/map.mrc"],
                               ["nowhere.star", "not found"]),
    "output_is_a_directory": (["particles.star", "-o", "out"], ["out", "is a directory"]),
    "output_under_a_file": (["particles.star", "-o", "particles.star/map.mrc"],
                            ["particles.star/map.mrc", "particles.star is a file"]),
}


def case_id(builder) -> str:
    return builder.__name__


def build(builder, directory: Path, shared_data: Path) -> dict:
    star = trpv1(directory, shared_data)
    spec = builder(directory)
    spec = {"needles": spec} if isinstance(spec, list) else spec
    return {"star": star, "references": [], "cli": True, **spec}


def outputs(directory: Path) -> list[Path]:
    out = directory / "out"
    return [p for p in out.rglob("*") if p.is_file()] if out.is_dir() else []


def assert_one_line_naming(message: str, needles, directory: Path) -> None:
    text = message.replace(str(directory) + "/", "")
    assert "\n" not in message.strip(), f"not one line:\n{message}"
    for needle in needles:
        assert needle in text, f"{needle!r} not in: {message}"


# ----------------------------------------------------------------------------- the engine


@pytest.fixture(scope="module")
def volume_file(shared_data, tmp_path_factory):
    """A folder for every case, with the TRPV1 map (a good map for the fsc command)."""
    root = tmp_path_factory.mktemp("fuzz")
    shutil.copy(shared_data / "cryojax/trpv1_volume.mrc", root / "shared_volume.mrc")
    return root


def run_engine(spec: dict, directory: Path) -> dict:
    out = directory / "out"
    return preprocess.preprocess_particles(
        spec["star"], out / "particles.mrcs", out / "particles.star", out / "info.json",
        references=spec["references"], n_heldout=2, chunk_size=4)


def test_the_good_set_passes_preprocessing(shared_data, volume_file):
    directory = volume_file / "good"
    info = run_engine(build(lambda d: [], directory, shared_data), directory)
    assert info["n_particles"] == N_PARTICLES and info["box"] == 48
    assert sorted(p.name for p in outputs(directory)) == ["info.json", "particles.mrcs",
                                                          "particles.star"]


@pytest.mark.parametrize("builder", REFUSED, ids=case_id)
def test_preprocessing_refuses(shared_data, volume_file, builder):
    directory = volume_file / f"engine-{builder.__name__}"
    spec = build(builder, directory, shared_data)
    with pytest.raises(InputError) as caught:
        run_engine(spec, directory)
    assert_one_line_naming(str(caught.value), spec["needles"], directory)
    assert outputs(directory) == [], "half-written outputs left"


# Suspicious but possible: preprocessing goes on, with a warning naming the column and row.
WARNED = {
    "defocus_far_from_focus": (lambda s: set_particle(s, "rlnDefocusU", 150000.0, rows={1}),
                               ["rlnDefocusU", "particle row 2", "far from focus"]),
    "amplitude_contrast_high": (lambda s: set_optics(s, "rlnAmplitudeContrast", 0.7),
                                ["rlnAmplitudeContrast", "data_optics row 1", "unusual"]),
    "heavily_binned": (lambda s: set_optics(s, "rlnImagePixelSize", 25.0),
                       ["rlnImagePixelSize", "above 20 A/px", "binned"]),
    "low_voltage": (lambda s: set_optics(s, "rlnVoltage", 40.0), ["rlnVoltage", "below 60 kV"]),
    "negative_cs": (lambda s: set_optics(s, "rlnSphericalAberration", -0.2),
                    ["rlnSphericalAberration", "Cs corrector"]),
    "near_focus_with_a_phase_plate": (
        lambda s: (set_particle(s, "rlnDefocusU", 500.0), set_particle(s, "rlnDefocusV", 500.0),
                   set_particle(s, "rlnPhaseShift", 90.0)),
        ["rlnDefocusU", "phase plate"]),
}


@pytest.mark.parametrize("name", WARNED)
def test_suspicious_values_pass_with_a_warning(shared_data, volume_file, caplog, name):
    edit, needles = WARNED[name]
    directory = volume_file / f"warned-{name}"
    star = trpv1(directory, shared_data)
    edit(star)
    info = run_engine({"star": star, "references": []}, directory)
    assert info["n_particles"] == N_PARTICLES
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(all(n in w for n in needles) for w in warnings), warnings


def test_a_full_disk_names_the_output_and_leaves_nothing(shared_data, volume_file, monkeypatch):
    directory = volume_file / "full-disk"
    spec = build(lambda d: [], directory, shared_data)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(io.starfile, "write", no_space)  # the STAR file, after the stack
    with pytest.raises(OutputError) as caught:
        run_engine(spec, directory)
    assert_one_line_naming(str(caught.value), ["out/particles.star", "No space left",
                                               "free some space"], directory)
    assert outputs(directory) == [], "the stack was left without its STAR file"


def test_held_out_images_are_never_trained_on():
    keys = [("a.mrcs", i) for i in range(20)]
    heldout = preprocess.choose_heldout(20, 5, seed=1)
    preprocess.check_heldout_disjoint(keys, heldout)  # distinct images: fine
    twin = int(np.flatnonzero(~heldout)[0])
    first_heldout = int(np.flatnonzero(heldout)[0])
    keys[twin] = keys[first_heldout]  # a training row names a held-out image
    with pytest.raises(InputError, match=f"particle rows {first_heldout + 1} \\(held out\\) and "
                                         f"{twin + 1} \\(training\\)"):
        preprocess.check_heldout_disjoint(keys, heldout)


# ----------------------------------------------------------------------------- the command line


def command_line_cases(shared_data: Path, root: Path) -> dict:
    """name -> (folder, needles, argv) for every refused case and bad argument."""
    cases = {}
    for builder in REFUSED:
        directory = root / builder.__name__
        spec = build(builder, directory, shared_data)
        if spec["cli"]:
            star = os.path.relpath(spec["star"], directory)
            cases[builder.__name__] = (directory, spec["needles"],
                                       ["reconstruct", star, "-o", "out/map.mrc"])
    for name, (args, needles) in BAD_ARGUMENTS.items():
        directory = root / name
        trpv1(directory, shared_data)
        (directory / "out").mkdir()
        cases[name] = (directory, needles, ["reconstruct", *args])
    directory = root / "fsc"
    directory.mkdir()
    cases["fsc_missing_map"] = (directory, ["nowhere.mrc", "not found"],
                                ["fsc", str(root.parent / "shared_volume.mrc"), "nowhere.mrc"])
    cases["fsc_pixel_size_zero"] = (directory, ["--pixel-size", "above 0"],
                                    ["fsc", "a.mrc", "b.mrc", "--pixel-size", "0"])
    return cases


CLI_CASES = [b.__name__ for b in REFUSED if b is not reference_map_with_nans]
CLI_CASES += list(BAD_ARGUMENTS) + ["fsc_missing_map", "fsc_pixel_size_zero"]
# Run as a user runs them, each in a fresh Python (about a second each on a loaded machine,
# mostly importing pandas); the others call the same main() in this process.
IN_A_SUBPROCESS = ["defocus_in_micrometres", "every_row_duplicated", "star_truncated_mid_row",
                   "directory_as_particles", "mode_byte_says_int16", "stack_data_truncated",
                   "box_zero", "negative_pixel_size", "output_under_a_file", "fsc_missing_map"]


@pytest.fixture(scope="module")
def cases(shared_data, volume_file):
    return command_line_cases(shared_data, volume_file / "cli")


def assert_refused_in_one_line(stderr: str, needles, directory: Path) -> None:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and errors[0].startswith("cryoday"), stderr
    assert_one_line_naming(errors[0], needles, directory)
    assert outputs(directory) == [], "half-written outputs left"


@pytest.mark.parametrize("name", CLI_CASES)
def test_the_command_line_refuses_in_one_line(cases, name, capsys, monkeypatch):
    from cryoday import cli as command_line

    directory, needles, argv = cases[name]
    monkeypatch.chdir(directory)
    try:
        status = command_line.main(argv)
    except SystemExit as exit:  # argparse's refusals
        status = exit.code
    finally:
        logging.captureWarnings(False)
    assert status == 2
    assert_refused_in_one_line(capsys.readouterr().err, needles, directory)


def cli(directory: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "cryoday.cli", *args], cwd=directory, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def subprocess_runs(shared_data, volume_file):
    """The IN_A_SUBPROCESS cases, run at once on fresh copies (startup dominates each)."""
    cases = command_line_cases(shared_data, volume_file / "subprocess")
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(cli, cases[name][0], *cases[name][2])
                   for name in IN_A_SUBPROCESS}
        return {name: (cases[name][0], cases[name][1], f.result())
                for name, f in futures.items()}


@pytest.mark.parametrize("name", IN_A_SUBPROCESS)
def test_the_cryoday_command_refuses_without_a_traceback(subprocess_runs, name):
    directory, needles, proc = subprocess_runs[name]
    assert proc.returncode == 2, proc.stderr
    assert_refused_in_one_line(proc.stderr, needles, directory)


def test_the_command_line_warns_and_clamps_a_resolution_beyond_nyquist(shared_data, volume_file):
    """The good set through the command line: it reconstructs (so the refusals above are the
    cases', not the command's), and a finer --max-resolution than Nyquist is said, not fatal."""
    directory = volume_file / "cli-good"
    trpv1(directory, shared_data)
    proc = cli(directory, "reconstruct", "particles.star", "-o", "out/map.mrc", "--box", "32",
               "--max-resolution", "5")
    assert proc.returncode == 0, proc.stderr
    assert "Nyquist" in proc.stderr and "Traceback" not in proc.stderr
    volume, voxel = io.read_map(directory / "out/map.mrc")
    assert volume.shape == (32, 32, 32) and voxel == pytest.approx(4.88 * 48 / 32, rel=1e-4)
