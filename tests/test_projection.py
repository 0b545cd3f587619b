"""The Fourier slice operator: exact adjoint, and accuracy against real-space projection."""

from __future__ import annotations

import numpy as np
import pytest
from test_simulate import real_space_projection

from cryoday import molecule, simulate
from cryoday.fourier import ft2
from cryoday.projection import SliceOperator


@pytest.mark.parametrize("radius", [9.5, 11.8])  # 11.8: the sub-cube overhangs the spectrum
def test_adjoint_identity(rng, radius):
    op = SliceOperator(24, radius)
    volume = rng.standard_normal((24, 24, 24)).astype(np.float32)
    rotations = simulate.random_rotations(9, rng)
    y = (rng.standard_normal((9, op.n_coef)) + 1j * rng.standard_normal((9, op.n_coef)))
    lhs = np.sum(np.real(np.conj(op.forward(volume, rotations).astype(np.complex128))
                         * op.weights * y))
    rhs = np.sum(volume.astype(np.float64) * op.adjoint(y, rotations))
    # float32 slices: agreement to ~1e-6 relative.
    assert lhs == pytest.approx(rhs, rel=1e-5)


def test_coefficients_cover_the_disc_once():
    op = SliceOperator(32, 10.0)
    k = np.arange(32) - 16
    full = (np.hypot(*np.meshgrid(k, k)) < 10.0).sum()
    assert op.weights.sum() == full
    assert np.all(np.hypot(op.kx, op.ky) < 10.0)


@pytest.mark.parametrize("box,radius", [(32, 16.0), (31, 12.0), (60, 27.0)])
def test_coefficients_from_the_half_real_fft_are_the_centred_transforms(box, radius):
    # Reference: the plain centred FFT (ifftshift, fft2, fftshift), as numpy writes it; odd
    # boxes too, where ifftshift is not a shift by half the box.
    rng = np.random.default_rng(box)
    images = rng.standard_normal((5, box, box)).astype(np.float32)
    centred = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(images, axes=(-2, -1)),
                                          norm="ortho"), axes=(-2, -1))
    op = SliceOperator(box, radius)
    reference = centred.reshape(5, -1)[:, op._flat]
    got = op.coefficients(images)
    assert got.dtype == np.complex64
    assert np.abs(got - reference).max() < 1e-5 * np.abs(reference).max()


def test_fourier_slice_theorem_against_real_space_projection():
    box, psize = 40, 4.0
    volume = molecule.synthetic_molecule(box, psize)
    op = SliceOperator(box, box * psize / 12.0)
    rotations = simulate.random_rotations(4, np.random.default_rng(3))
    reference = op.extract(ft2(np.array([real_space_projection(volume, a) for a in rotations])))
    slices = op.forward(volume, rotations)
    error = np.linalg.norm(slices - reference) / np.linalg.norm(reference)
    # Measured ~2% with the gridding correction (trilinear on a 2x padded transform).
    assert error < 0.04


def test_slices_at_rotations_about_the_viewing_axis_are_rotated_images():
    # A 90-degree in-plane rotation maps the coefficient grid onto itself: the slice values must
    # be the same numbers at rotated coefficient positions.
    box = 24
    volume = molecule.synthetic_molecule(box, 5.0)
    op = SliceOperator(box, 8.0)
    from cryoday.geometry import euler_to_matrix

    a = op.forward(volume, euler_to_matrix(20.0, 50.0, 0.0))[0]
    b = op.forward(volume, euler_to_matrix(20.0, 50.0, 90.0))[0]
    lookup = {(x, y): v for x, y, v in zip(op.kx, op.ky, b)}
    matched = 0
    for x, y, v in zip(op.kx, op.ky, a):
        # Rz(psi=90) passive: image frequency (kx, ky) of the first equals (ky, -kx) of the second.
        key = (y, -x)
        if key in lookup:
            assert lookup[key] == pytest.approx(v, rel=1e-3, abs=float(1e-4 * np.abs(a).max()))
            matched += 1
        elif (-y, x) in lookup:
            assert np.conj(lookup[(-y, x)]) == pytest.approx(v, rel=1e-3, abs=float(1e-4 * np.abs(a).max()))
            matched += 1
    assert matched == op.n_coef


@pytest.mark.parametrize("new_box", [20, 30, 44])
def test_a_map_resampled_for_a_stage_projects_at_the_cropped_images_scale(new_box):
    # Clean 64-px projections of a map, Fourier-cropped as a stage's images are, against the
    # engine's slices of the map resampled for that stage: the least-squares scale must be 1.
    from scipy.ndimage import gaussian_filter

    from cryoday import molecule, simulate
    from cryoday.fourier import fourier_crop_2d
    from cryoday.initial import resample_for_stage
    from cryoday.batch import make_batch

    # A stage only ever resamples maps already limited to the previous stage's resolution; a
    # sharp map cropped hard in Fourier space rings far outside its box, which no interpolating
    # slicer can follow (scale 0.89 at 20 px). So the map is blurred to about the new sampling.
    volume = gaussian_filter(molecule.synthetic_molecule(64, 3.0), 0.5 * 64 / new_box)
    rotations = simulate.random_rotations(20, np.random.default_rng(1))
    images = fourier_crop_2d(simulate.project(volume, rotations), new_box)
    op = SliceOperator(new_box, new_box / 2 - 2)
    no_ctf = {"defocus_u": np.zeros(20), "defocus_v": np.zeros(20), "defocus_angle": np.zeros(20),
              "voltage": 300.0, "cs": 0.0, "amplitude_contrast": 1.0}
    batch = make_batch(op, images, no_ctf, 64 * 3.0 / new_box, 1.0)
    model = op.forward(resample_for_stage(volume, new_box), rotations)
    w = op.weights
    scale = (w * (np.conj(model) * batch.data).real).sum() / (w * np.abs(model) ** 2).sum()
    assert scale == pytest.approx(1.0, abs=0.03)


def test_slices_match_the_numpy_twin(rng):
    """``forward`` against :func:`reference.slice_trilinear` (the same interpolation written
    with numpy's FFT and scipy's ``map_coordinates``), the sub-cube reaching the spectrum's
    edge in the second case."""
    from reference import slice_trilinear

    for box, radius in ((16, 5.5), (17, 7.9)):
        op = SliceOperator(box, radius)
        volume = rng.standard_normal((box,) * 3).astype(np.float32)
        rotations = simulate.random_rotations(7, rng)
        expected = slice_trilinear(volume.astype(np.float64), rotations, op.kx, op.ky)
        # float32 transform and slices: 1e-5 of the largest coefficient.
        error = np.abs(op.forward(volume, rotations) - expected).max()
        assert error < 1e-5 * np.abs(expected).max()


def test_adjoint_matches_the_numpy_twin(rng):
    """``adjoint`` against :func:`reference.slice_adjoint`, the transpose of the twin's slicing
    formed as a dense matrix."""
    from reference import slice_adjoint

    box = 8
    op = SliceOperator(box, 3.7)
    rotations = simulate.random_rotations(3, rng)
    y = rng.standard_normal((3, op.n_coef)) + 1j * rng.standard_normal((3, op.n_coef))
    expected = slice_adjoint(y, (box,) * 3, rotations, op.kx, op.ky, op.weights)
    # float32 accumulators: 1e-5 of the largest voxel.
    assert np.abs(op.adjoint(y, rotations) - expected).max() < 1e-5 * np.abs(expected).max()
