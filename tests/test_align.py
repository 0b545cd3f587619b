"""Map alignment: the Numba kernels against scipy.ndimage, their gradient against finite
differences, and known transforms (both hands, 64 and 128 px) recovered by find_alignment."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from cryoday import _align_kernels, molecule
from cryoday.align import Alignment, _affine, _transform, apply_alignment, find_alignment
from cryoday.fsc import soft_spherical_mask


def _smooth(rng, n, radius=None):
    v = ndimage.gaussian_filter(rng.standard_normal((n, n, n)), 1.5)
    if radius is not None:
        v = v * soft_spherical_mask(n, radius, 2.0)
    return np.ascontiguousarray(v, dtype=np.float32)


def test_turn_batch_matches_ndimage_linear_interpolation(rng):
    # Random values up to the box's faces: the edge rule (0 outside [0, n - 1]) is exercised.
    n = 18
    v = rng.standard_normal((n, n, n)).astype(np.float32)
    rotations = Rotation.random(4, random_state=5).as_matrix()
    shifts = rng.uniform(-2, 2, (4, 3))
    rts, offsets = zip(*(_affine(r, t, n) for r, t in zip(rotations, shifts)))
    out = np.empty((4, n, n, n), dtype=np.float32)
    _align_kernels.turn_batch(v, np.array(rts), np.array(offsets), out)
    for k in range(4):
        expected = _transform(v.astype(np.float64), rotations[k], shifts[k], order=1)
        assert np.abs(out[k] - expected).max() < 1e-5


@pytest.mark.parametrize("kernel", ["turned_dot", "turned_dot_serial"])
def test_turned_dot_is_the_sum_of_the_turned_map_times_the_reference(rng, kernel):
    n = 20
    v, ref = rng.standard_normal((2, n, n, n)).astype(np.float32)
    ref[3] = 0.0  # skipped voxels must not change the sum
    rotation = Rotation.random(random_state=2).as_matrix()
    rt, offset = _affine(rotation, np.array([0.4, -1.3, 0.9]), n)
    sums = getattr(_align_kernels, kernel)(v, ref, rt, offset, float(n // 2), np.empty((n, 13)))
    expected = np.sum(_transform(v.astype(np.float64), rotation, [0.4, -1.3, 0.9]) * ref)
    assert sums[0] == pytest.approx(expected, rel=1e-6)


def test_turned_dot_gradient_sums_match_finite_differences(rng):
    # q = rt x + offset: d/d offset = G and d/d rt_ij = M_ij + G_i c (M is taken about c). The
    # moving map vanishes at the box's faces, where sampling 0 outside is a jump, not a slope.
    n = 20
    v, ref = _smooth(rng, n, 6.0), _smooth(rng, n)
    rt, offset = _affine(Rotation.random(random_state=3).as_matrix(), [0.3, -0.7, 1.2], n)
    c = float(n // 2)
    partial = np.empty((n, 13))

    def value(rt_, offset_):
        return _align_kernels.turned_dot(v, ref, rt_, offset_, c, partial)[0]

    sums = _align_kernels.turned_dot(v, ref, rt, offset, c, partial)
    g, m = sums[1:4], sums[4:].reshape(3, 3)
    # Trilinear slopes jump where a sample crosses a voxel's face: a step small enough that
    # (almost surely) none does, so the finite differences see one polynomial piece.
    h = 1e-6
    scale = np.abs(m + np.outer(g, np.full(3, c))).max()
    for i in range(3):
        e = np.zeros(3)
        e[i] = h
        fd = (value(rt, offset + e) - value(rt, offset - e)) / (2 * h)
        assert fd == pytest.approx(g[i], abs=1e-4 * np.abs(g).max())
        for j in range(3):
            d = np.zeros((3, 3))
            d[i, j] = h
            fd = (value(rt + d, offset) - value(rt - d, offset)) / (2 * h)
            assert fd == pytest.approx(m[i, j] + g[i] * c, abs=1e-4 * scale)


def _known(volume, flipped, rotation, shift):
    """``volume`` (mirrored with ``[::-1]`` if ``flipped``) turned by ``rotation`` and shifted
    by ``shift`` (x, y, z px), and the alignment that undoes it.

    ``moved(x) = src(R^T (x - c - t) + c)`` is undone by ``R^T`` and ``-R^T t``. The mirror
    ``v[::-1]`` takes z to n - 1 - z: J about the centre voxel (J = diag(1, 1, -1)), then one
    voxel down (e = (0, 0, 1)); it is undone by ``J R^T J`` and ``-J R^T (e + t) - e``.
    """
    src = volume[::-1] if flipped else volume
    moved = _transform(np.ascontiguousarray(src, np.float64), rotation, shift, order=3)
    r, t = rotation.T, -rotation.T @ shift
    if flipped:
        j, e = np.diag([1.0, 1.0, -1.0]), np.array([0.0, 0.0, 1.0])
        r, t = j @ rotation.T @ j, -j @ rotation.T @ (e + shift) - e
    return moved.astype(np.float32), r, t


@pytest.mark.parametrize("box", [64, 128])
@pytest.mark.parametrize("flipped", [False, True])
def test_find_alignment_recovers_a_known_transform(box, flipped):
    pixel_size = 3.0 * 64 / box
    v = molecule.synthetic_molecule(box, pixel_size)
    # A rotation far from any point of the search grid and a sub-voxel shift.
    rotation = Rotation.from_rotvec([0.9, -1.7, 0.6]).as_matrix()
    shift = np.array([2.3, -1.6, 0.8]) * box / 64
    moved, r, t = _known(v, flipped, rotation, shift)
    a = find_alignment(moved, v, pixel_size)
    assert a.flipped == flipped
    assert np.degrees(Rotation.from_matrix(a.rotation @ r.T).magnitude()) < 0.5
    assert np.linalg.norm(a.shift_px - t) < 0.5
    # The transform found brings the map back: the only loss is the two resamplings'.
    back = apply_alignment(moved, a)
    assert np.corrcoef(back.ravel(), v.ravel())[0, 1] > 0.97


def test_the_mirror_formula_of_the_known_transforms():
    # The expected alignment of _known, applied, must give the original back (else the tests
    # above would compare against a wrong answer).
    v = molecule.synthetic_molecule(32, 5.0)
    rotation = Rotation.from_rotvec([0.2, 1.1, -0.4]).as_matrix()
    for flipped in (False, True):
        moved, r, t = _known(v, flipped, rotation, np.array([1.2, -0.6, 0.9]))
        back = apply_alignment(moved, Alignment(r, t, flipped, 0.0))
        assert np.corrcoef(back.ravel(), v.ravel())[0, 1] > 0.99
        off = apply_alignment(moved, Alignment(r, t + [0, 0, 1.0], flipped, 0.0))
        assert np.corrcoef(off.ravel(), v.ravel())[0, 1] < 0.98
