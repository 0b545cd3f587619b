"""Known-pose reconstruction and the ``cryoday`` command."""

from __future__ import annotations

import shutil

import mrcfile
import numpy as np
import pandas as pd
import pytest

from cryoday import io, molecule, simulate
from cryoday.cli import main
from cryoday.ctf import evaluate_ctf
from cryoday.fourier import ft2, ift2
from cryoday.fsc import fsc, resolution_at
from cryoday.geometry import matrix_to_euler
from cryoday.reconstruct import half_sets, reconstruct

BOX, PSIZE, N = 32, 4.0, 1500


@pytest.fixture(scope="module")
def noise_free():
    rng = np.random.default_rng(0)
    truth = molecule.synthetic_molecule(BOX, PSIZE)
    rotations = simulate.random_rotations(N, rng)
    shifts = rng.normal(scale=1.5, size=(N, 2))
    defocus = rng.uniform(1e4, 3e4, N)
    k = (np.arange(BOX) - BOX // 2) / (BOX * PSIZE)
    fy, fx = np.meshgrid(k, k, indexing="ij")
    ctf = evaluate_ctf(fx, fy, defocus, defocus, 0.0, 300.0, 2.7, 0.1)
    images = ift2(ctf * ft2(simulate.project(truth, rotations, shifts))).astype(np.float32)
    params = {"defocus_u": defocus, "defocus_v": defocus, "defocus_angle": np.zeros(N),
              "voltage": 300.0, "cs": 2.7, "amplitude_contrast": 0.1}
    return truth, rotations, shifts, params, images


def test_noise_free_reconstruction_beats_two_and_a_half_times_nyquist(noise_free):
    truth, rotations, shifts, params, images = noise_free
    volume = reconstruct(lambda r: images[r], N, rotations, shifts, params, PSIZE, BOX,
                         chunk_size=400)
    freq, curve = fsc(volume, truth, PSIZE)
    # Acceptance criterion of the engine: better than 2.5 x Nyquist (= 5 pixel sizes).
    assert resolution_at(freq, curve) < 2.5 * 2 * PSIZE
    assert (volume * truth).sum() / (truth * truth).sum() == pytest.approx(1.0, abs=0.1)


def test_wrong_shift_sign_is_worse(noise_free):
    truth, rotations, shifts, params, images = noise_free
    right = reconstruct(lambda r: images[r], N, rotations, shifts, params, PSIZE, BOX)
    wrong = reconstruct(lambda r: images[r], N, rotations, -shifts, params, PSIZE, BOX)
    assert np.corrcoef(right.ravel(), truth.ravel())[0, 1] > np.corrcoef(
        wrong.ravel(), truth.ravel())[0, 1] + 0.05


def test_half_sets_are_disjoint_and_cover():
    a, b = half_sets(11, seed=2)
    assert len(np.intersect1d(a, b)) == 0 and len(a) + len(b) == 11


def write_star(tmp_path, noise_free):
    truth, rotations, shifts, params, images = noise_free
    with io.StackWriter(tmp_path / "p.mrcs", N, BOX, PSIZE) as writer:
        writer.data[:] = images
    rot, tilt, psi = matrix_to_euler(rotations)
    table = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@p.mrcs" for i in range(N)],
        "rlnAngleRot": rot, "rlnAngleTilt": tilt, "rlnAnglePsi": psi,
        "rlnOriginXAngst": shifts[:, 0] * PSIZE, "rlnOriginYAngst": shifts[:, 1] * PSIZE,
        "rlnDefocusU": params["defocus_u"], "rlnDefocusV": params["defocus_v"],
        "rlnDefocusAngle": 0.0, "rlnOpticsGroup": 1})
    optics = simulate.optics_table(PSIZE, BOX, 300.0, 2.7, 0.1)
    io.write_particles(tmp_path / "p.star", table, optics)
    return tmp_path / "p.star", truth


def test_cli_reconstruct_and_fsc(tmp_path, noise_free, capsys):
    star, truth = write_star(tmp_path, noise_free)
    assert main(["reconstruct", str(star), "-o", str(tmp_path / "m.mrc")]) == 0
    with mrcfile.open(tmp_path / "m.mrc") as mrc:
        assert mrc.data.shape == (BOX,) * 3
        assert float(mrc.voxel_size.x) == pytest.approx(PSIZE)
        freq, curve = fsc(mrc.data.copy(), truth, PSIZE)
    assert resolution_at(freq, curve) < 5 * PSIZE
    assert main(["reconstruct", str(star), "-o", str(tmp_path / "h.mrc"), "--half", "1",
                 "--box", "16"]) == 0
    with mrcfile.open(tmp_path / "h.mrc") as mrc:
        assert mrc.data.shape == (16,) * 3 and float(mrc.voxel_size.x) == pytest.approx(8.0)
    io.write_map(tmp_path / "t.mrc", truth, PSIZE)
    assert main(["fsc", str(tmp_path / "m.mrc"), str(tmp_path / "t.mrc")]) == 0
    assert "FSC 0.143" in capsys.readouterr().out


def test_cli_refuses_bad_input_in_one_line(tmp_path, capsys):
    assert main(["reconstruct", str(tmp_path / "none.star"), "-o", str(tmp_path / "m.mrc")]) == 2
    err = capsys.readouterr().err
    assert "none.star" in err and "Traceback" not in err
    assert not (tmp_path / "m.mrc").exists()


def test_cli_on_real_trpv1_particles(shared_data, tmp_path):
    shutil.copy(shared_data / "cryojax/trpv1_small_stack.mrcs", tmp_path / "batch_0_restacked.mrc")
    shutil.copy(shared_data / "cryojax/trpv1_small_stack.star", tmp_path / "p.star")
    assert main(["reconstruct", str(tmp_path / "p.star"), "-o", str(tmp_path / "m.mrc")]) == 0
    with mrcfile.open(tmp_path / "m.mrc") as mrc:
        assert mrc.data.shape == (48, 48, 48)
        assert float(mrc.voxel_size.x) == pytest.approx(4.88, abs=1e-3)
        assert np.isfinite(mrc.data).all()
