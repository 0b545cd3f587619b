"""Known-pose reconstruction with a point group (``reconstruct(..., symmetry=)``, ``--sym``)
and the ``cryoday symmetry`` command."""

from __future__ import annotations

import mrcfile
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from cryoday import io, molecule, simulate, symmetry
from cryoday.cli import main
from cryoday.ctf import evaluate_ctf
from cryoday.fourier import ft2, ift2
from cryoday.fsc import fsc, resolution_at
from cryoday.geometry import matrix_to_euler
from cryoday.reconstruct import insert, reconstruct, solve

BOX, PSIZE, GROUP = 32, 4.0, "D3"


def ctf_images(truth, rotations, rng):
    """Noise-free CTF-modulated projections of ``truth`` at ``rotations`` (random shifts and
    defoci), and their shifts and CTF parameters."""
    n = len(rotations)
    shifts = rng.normal(scale=1.0, size=(n, 2))
    defocus = rng.uniform(1e4, 3e4, n)
    k = (np.arange(BOX) - BOX // 2) / (BOX * PSIZE)
    fy, fx = np.meshgrid(k, k, indexing="ij")
    ctf = evaluate_ctf(fx, fy, defocus, defocus, 0.0, 300.0, 2.7, 0.1)
    images = ift2(ctf * ft2(simulate.project(truth, rotations, shifts))).astype(np.float32)
    params = {"defocus_u": defocus, "defocus_v": defocus, "defocus_angle": np.zeros(n),
              "voltage": 300.0, "cs": 2.7, "amplitude_contrast": 0.1}
    return images, shifts, params


@pytest.fixture(scope="module")
def d3_truth():
    m = molecule.synthetic_molecule(BOX, PSIZE)
    m = ndimage.shift(m, (2.0, 0.0, 4.0), order=1)
    return symmetry.symmetrise(m, GROUP)


def _fsc_res(a, b):
    freq, curve = fsc(a, b, PSIZE)
    return resolution_at(freq, curve)


def test_symmetric_map_at_random_poses_same_with_and_without_sym(d3_truth):
    rng = np.random.default_rng(1)
    rotations = simulate.random_rotations(800, rng)
    images, shifts, params = ctf_images(d3_truth, rotations, rng)
    plain = reconstruct(lambda r: images[r], 800, rotations, shifts, params, PSIZE, BOX)
    sym = reconstruct(lambda r: images[r], 800, rotations, shifts, params, PSIZE, BOX,
                      symmetry=GROUP, chunk_size=700)
    assert np.corrcoef(plain.ravel(), sym.ravel())[0, 1] > 0.98
    assert _fsc_res(sym, d3_truth) <= _fsc_res(plain, d3_truth) + 0.5


def test_one_asymmetric_unit_of_views_recovers_the_map_only_with_sym(d3_truth):
    rng = np.random.default_rng(2)
    candidates = simulate.random_rotations(6000, rng)
    # Views from one asymmetric unit only (the direction is the pose's third row).
    rotations = candidates[symmetry.in_asymmetric_unit(candidates[:, 2], GROUP)][:400]
    n = len(rotations)
    images, shifts, params = ctf_images(d3_truth, rotations, rng)
    read = images.__getitem__
    plain = reconstruct(read, n, rotations, shifts, params, PSIZE, BOX)
    right = reconstruct(read, n, rotations, shifts, params, PSIZE, BOX, symmetry=GROUP)
    # The other side, g A, is not an equivalent pose: it must do worse than A g.
    g = symmetry.group(GROUP)
    left = np.einsum("gij,njk->ngik", g, rotations).reshape(-1, 3, 3)
    image = np.repeat(np.arange(n), len(g))
    wrong = solve(insert(read, n * len(g), left, np.repeat(shifts, len(g), axis=0), params,
                         PSIZE, BOX, image=image))

    def misfit(v):
        return 1 - np.corrcoef(v.ravel(), d3_truth.ravel())[0, 1]

    # A sixth of the sphere leaves gaps (misfit ~0.03); the expansion fills them (~1e-3).
    assert misfit(right) < 0.01
    assert misfit(right) < 0.2 * misfit(plain)
    assert misfit(right) < 0.2 * misfit(wrong)
    # Noise-free, both reach Nyquist at 0.143; the shells' mean FSC shows the gaps.
    assert fsc(right, d3_truth, PSIZE)[1].mean() > fsc(plain, d3_truth, PSIZE)[1].mean()


def _status(argv) -> int:
    """The exit status of ``cryoday argv``: argparse's refusals exit, the rest return."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def _write_star(tmp_path, truth, n=300, seed=3):
    rng = np.random.default_rng(seed)
    rotations = simulate.random_rotations(n, rng)
    images, shifts, params = ctf_images(truth, rotations, rng)
    with io.StackWriter(tmp_path / "p.mrcs", n, BOX, PSIZE) as writer:
        writer.data[:] = images
    rot, tilt, psi = matrix_to_euler(rotations)
    table = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@p.mrcs" for i in range(n)],
        "rlnAngleRot": rot, "rlnAngleTilt": tilt, "rlnAnglePsi": psi,
        "rlnOriginXAngst": shifts[:, 0] * PSIZE, "rlnOriginYAngst": shifts[:, 1] * PSIZE,
        "rlnDefocusU": params["defocus_u"], "rlnDefocusV": params["defocus_v"],
        "rlnDefocusAngle": 0.0, "rlnOpticsGroup": 1})
    io.write_particles(tmp_path / "p.star", table, simulate.optics_table(PSIZE, BOX, 300.0, 2.7,
                                                                        0.1))
    return tmp_path / "p.star"


def test_cli_reconstruct_sym(tmp_path, d3_truth, capsys):
    star = _write_star(tmp_path, d3_truth)
    assert main(["reconstruct", str(star), "-o", str(tmp_path / "s.mrc"), "--sym", "d3"]) == 0
    with mrcfile.open(tmp_path / "s.mrc") as mrc:
        volume = mrc.data.copy()
    # The output is D3 about RELION's axes: the symmetrised copy changes it little.
    assert np.corrcoef(volume.ravel(), symmetry.symmetrise(volume, GROUP).ravel())[0, 1] > 0.99
    assert np.corrcoef(volume.ravel(), d3_truth.ravel())[0, 1] > 0.9
    assert _status(["reconstruct", str(star), "-o", str(tmp_path / "x.mrc"), "--sym", "D3h"]) == 2
    err = capsys.readouterr().err
    assert "'D3h'" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.mrc").exists()


def test_cli_symmetry_finds_c4_and_writes_the_aligned_map(tmp_path, shared_data, capsys):
    volume, voxel = io.read_map(shared_data / "cryojax" / "trpv1_volume.mrc")
    r = symmetry.axis_rotation([0.4, -0.3, 0.87], np.radians(50.0))
    io.write_map(tmp_path / "c1.mrc", symmetry.rotate_volume(volume, r, 3), voxel)
    out = tmp_path / "aligned.mrc"
    assert main(["symmetry", str(tmp_path / "c1.mrc"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "symmetry: C4" in text and "D8" in text
    aligned, voxel_out = io.read_map(out)
    assert voxel_out == pytest.approx(voxel, rel=1e-5)
    quarter_turn = symmetry.axis_rotation([0, 0, 1], np.pi / 2)

    def c4_corr(v):
        return np.corrcoef(symmetry.rotate_volume(v, quarter_turn, 1).ravel(), v.ravel())[0, 1]

    # Two spline resamplings (the test's turn, the alignment) cost ~2% of the correlation.
    assert c4_corr(aligned) > 0.95
    assert c4_corr(io.read_map(tmp_path / "c1.mrc")[0]) < 0.8


@pytest.mark.parametrize("argv, message", [
    (["--group", "Q3"], "'Q3'"),
    (["--half1", "h.mrc"], "--half2"),
    (["--symmetrise"], "--out"),
    (["--tolerance", "-1"], "above 0"),
])
def test_cli_symmetry_refuses_bad_arguments_in_one_line(tmp_path, capsys, argv, message):
    io.write_map(tmp_path / "m.mrc", np.zeros((16, 16, 16), np.float32), 2.0)
    assert _status(["symmetry", str(tmp_path / "m.mrc"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_symmetry_missing_map(tmp_path, capsys):
    assert main(["symmetry", str(tmp_path / "none.mrc")]) == 2
    assert "none.mrc" in capsys.readouterr().err
