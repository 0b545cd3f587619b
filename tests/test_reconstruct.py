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


def dense_insertion(images, rotations, shifts, ctf, weights, image, op, pixel_size):
    """Insertion by its definition, in numpy (``np.add.at``, complex128): each pose adds
    ``w CTF x e^{-2 pi i k.t / box}`` and ``w CTF^2`` at the trilinear corners of its points
    ``2 A^T (kx, ky, 0) + centre`` of the 2x cube, then the mirror images at ``-q``."""
    box, m, c = op.box, op._cube_size, op._half_cube
    centred = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(images, axes=(-2, -1)), norm="ortho"),
                              axes=(-2, -1)).reshape(len(images), -1)[:, op._flat]
    k = np.stack([op.kx, op.ky], 1).astype(np.float64)
    f = k / (box * pixel_size)
    num = np.zeros(m**3, complex)
    den = np.zeros(m**3)
    for r, i in enumerate(image):
        transfer = evaluate_ctf(f[:, 0], f[:, 1], ctf["defocus_u"][i], ctf["defocus_v"][i],
                                ctf["defocus_angle"][i], ctf["voltage"], ctf["cs"],
                                ctf["amplitude_contrast"])
        value = weights[r] * transfer * centred[i] * np.exp(-2j * np.pi * (k @ shifts[r]) / box)
        q = 2 * k @ rotations[r][:2] + c
        lower = np.floor(q).astype(int)
        frac = q - lower
        for corner in np.ndindex(2, 2, 2):  # (dx, dy, dz)
            g = np.prod(np.where(np.array(corner), frac, 1 - frac), axis=1)
            x, y, z = (lower + np.array(corner)).T
            np.add.at(num, (z * m + y) * m + x, g * value)
            np.add.at(den, (z * m + y) * m + x, g * weights[r] * transfer**2)
    num, den = num.reshape(m, m, m), den.reshape(m, m, m)
    return num + np.conj(num[::-1, ::-1, ::-1]), den + den[::-1, ::-1, ::-1]


def test_insertion_against_its_dense_definition():
    # Several weighted poses per image, in chunks that split an image's poses, against the
    # dense reference; the kernel accumulates in float32 (stated tolerance 1e-5 of the largest
    # sum; an error in a phase, a corner or a weight is of the order of the sums).
    from cryoday.reconstruct import insert

    rng = np.random.default_rng(7)
    box, psize, n_images, n_poses = 24, 3.0, 6, 17
    images = rng.standard_normal((n_images, box, box)).astype(np.float32)
    image = np.sort(rng.integers(0, n_images, n_poses))
    rotations = simulate.random_rotations(n_poses, rng)
    shifts = rng.normal(scale=2.0, size=(n_poses, 2))
    weights = rng.uniform(0.1, 1.0, n_poses)
    defocus = rng.uniform(1e4, 3e4, n_images)
    ctf = {"defocus_u": defocus, "defocus_v": defocus * 1.05,
           "defocus_angle": rng.uniform(0, 180, n_images), "voltage": 300.0, "cs": 2.7,
           "amplitude_contrast": 0.1}
    sums = insert(images.__getitem__, n_poses, rotations, shifts, ctf, psize, box,
                  chunk_size=5, weights=weights, image=image)
    num, den = dense_insertion(images, rotations, shifts, ctf, weights, image, sums.op, psize)
    assert np.abs(num).max() > 0
    assert np.abs(sums.num - num).max() < 1e-5 * np.abs(num).max()
    assert np.abs(sums.den - den).max() < 1e-5 * den.max()
