"""Point groups (cryoday.symmetry): RELION's axes, closure, symmetrising, asymmetric units."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from cryoday import simulate, symmetry
from cryoday.errors import InputError
from cryoday.fsc import soft_spherical_mask
from cryoday.quadrature import fibonacci_sphere

GROUPS = ["C1", "C2", "C4", "C7", "D2", "D3", "D7", "T", "O", "I", "I1", "I3", "I4"]
ORDERS = {"C1": 1, "C2": 2, "C4": 4, "C7": 7, "D2": 4, "D3": 6, "D7": 14, "T": 12, "O": 24,
          "I": 60, "I1": 60, "I3": 60, "I4": 60}


def _index_in(m, elements, tol=1e-6):
    hits = np.flatnonzero(np.abs(elements - m).max(axis=(1, 2)) < tol)
    return hits


@pytest.mark.parametrize("name", GROUPS)
def test_orders_orthonormal_and_closed(name):
    g = symmetry.group(name)
    assert len(g) == ORDERS[name] == symmetry.order(name)
    np.testing.assert_allclose(g[0], np.eye(3), atol=1e-12)
    np.testing.assert_allclose(np.einsum("gij,gkj->gik", g, g), np.broadcast_to(np.eye(3), g.shape),
                               atol=1e-10)
    np.testing.assert_allclose(np.linalg.det(g), 1.0, atol=1e-10)
    for a in g:
        for b in g:
            assert len(_index_in(a @ b, g)) == 1
    # No element twice.
    assert all(len(_index_in(a, g)) == 1 for a in g)


def _fold_about(elements, axis):
    """Largest n such that the rotation by 360/n about ``axis`` is in the group."""
    best = 1
    for n in range(2, 9):
        if len(_index_in(symmetry.axis_rotation(axis, 2 * np.pi / n), elements, 1e-5)):
            best = n
    return best


def test_relion_axes():
    # RELION's settings (src/symmetries.cpp): C_n about z, D_n's two-fold along x, T's three-fold
    # along z, O's four-fold along z, I (= I2) with a two-fold along z and a five-fold in x-z.
    assert _fold_about(symmetry.group("C5"), [0, 0, 1]) == 5
    assert _fold_about(symmetry.group("D6"), [1, 0, 0]) == 2
    assert _fold_about(symmetry.group("D6"), [0, 1, 0]) == 2  # 90 deg = 3 x 30 deg: a two-fold
    assert _fold_about(symmetry.group("D5"), [0, 1, 0]) == 1  # odd n: no two-fold along y
    assert _fold_about(symmetry.group("T"), [0, 0, 1]) == 3
    assert _fold_about(symmetry.group("O"), [0, 0, 1]) == 4
    assert _fold_about(symmetry.group("O"), [1, 1, 1]) == 3
    assert _fold_about(symmetry.group("I"), [0, 0, 1]) == 2
    assert _fold_about(symmetry.group("I"), [0.525731114, 0, 0.850650807]) == 5
    assert _fold_about(symmetry.group("I1"), [1, 0, 0]) == 2
    assert _fold_about(symmetry.group("I3"), [0, 0, 1]) == 5


@pytest.mark.parametrize("name", ["c4", " d7 ", "t", "o", "i", "C12", "i3"])
def test_names_are_case_insensitive(name):
    assert symmetry.canonical_name(name) == name.strip().upper()


@pytest.mark.parametrize("bad", ["C0", "D1", "X3", "", "D7h", "C", "4", "I5", None, 7])
def test_bad_names_are_input_errors_naming_the_value(bad):
    with pytest.raises(InputError, match=repr(bad).replace("(", r"\(")):
        symmetry.group(bad)


def _smooth_random_volume(n, seed):
    rng = np.random.default_rng(seed)
    v = ndimage.gaussian_filter(rng.standard_normal((n, n, n)), 2.0)
    return (v * soft_spherical_mask(n, n / 2 - 6, 3)).astype(np.float32)


@pytest.mark.parametrize("name", ["C4", "D3", "T", "O", "I"])
def test_symmetrised_volume_is_invariant_under_every_element(name):
    n = 40
    v = _smooth_random_volume(n, 1)
    s = symmetry.symmetrise(v, name).astype(np.float64)
    scale = np.linalg.norm(s)
    inside = soft_spherical_mask(n, n / 2 - 4, 1) > 0.5
    errors = [np.linalg.norm((symmetry.rotate_volume(s, g) - s)[inside]) / scale
              for g in symmetry.group(name)[1:]]
    # Interpolation of a map smooth over ~2 px costs about 1% per rotation; a map without the
    # symmetry changes by ~100% (checked on the input itself).
    assert max(errors) < 0.03
    raw = [np.linalg.norm((symmetry.rotate_volume(v, g) - v)[inside]) / np.linalg.norm(v)
           for g in symmetry.group(name)[1:]]
    assert min(raw) > 0.5


def test_symmetrise_c1_is_identity_and_c2_exact_on_grid():
    v = _smooth_random_volume(24, 2)
    np.testing.assert_array_equal(symmetry.symmetrise(v, "C1"), v)
    # A 180-degree turn about z maps voxels onto voxels about the centre n // 2.
    s = symmetry.symmetrise(v, "C2")
    c = 12
    expected = 0.5 * (v + np.roll(v[:, ::-1, ::-1], (1, 1), axis=(1, 2)))
    np.testing.assert_allclose(s[:, 1:, 1:], expected[:, 1:, 1:], atol=1e-5)
    assert s[:, c, c].std() > 0  # the axis itself keeps its values


def _lands_on_a_face(n, elements, tol=1e-6):
    """Voxels that some element sends within ``tol`` of the box's outer voxel planes, where
    scipy's ``constant`` mode switches to zero and rounding decides the side."""
    c = n // 2
    z, y, x = np.mgrid[:n, :n, :n] - c
    p = np.stack([x, y, z], axis=-1).astype(np.float64)
    q = np.einsum("gji,...j->g...i", elements, p) + c
    near = (np.abs(q) < tol) | (np.abs(q - (n - 1)) < tol)
    return near.any(axis=(0, -1))


@pytest.mark.parametrize("order", [1, 3])
@pytest.mark.parametrize(("name", "n"), [("C4", 24), ("D7", 17), ("O", 20), ("I", 15)])
def test_symmetrise_matches_scipy_rotation_by_rotation(name, n, order):
    """The one-pass kernel against scipy's affine_transform per element, over the whole box:
    the mirrored spline taps at the faces and the zero outside included."""
    v = np.random.default_rng(n).standard_normal((n, n, n))
    elements = symmetry.group(name)
    reference = (v + sum(symmetry.rotate_volume(v, g, order) for g in elements[1:])) \
        / len(elements)
    got = symmetry.symmetrise(v, name, order)
    assert got.dtype == np.float32
    keep = ~_lands_on_a_face(n, elements)
    assert keep.mean() > 0.6
    # float32 out: 1e-6 of the values' scale (~1).
    np.testing.assert_allclose(got[keep], reference[keep], atol=2e-6, rtol=0)
    with pytest.raises(ValueError, match="order 1 or 3"):
        symmetry.symmetrise(v, name, 2)


@pytest.mark.parametrize("name", ["C1", "C3", "C7", "D2", "D7", "T", "O", "I"])
def test_asymmetric_unit_covers_the_sphere_once(name):
    directions = fibonacci_sphere(60000)
    kept = symmetry.in_asymmetric_unit(directions, name)
    g = symmetry.order(name)
    assert kept.mean() * g == pytest.approx(1.0, abs=0.02)
    # Every random direction has exactly one equivalent in the unit...
    rng = np.random.default_rng(3)
    d = rng.standard_normal((500, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    images = np.einsum("gij,nj->ngi", symmetry.group(name), d)
    counts = symmetry.in_asymmetric_unit(images, name).sum(axis=1)
    assert np.all(counts == 1)
    # ... and on the grid, every direction's orbit comes within the grid spacing of a kept point.
    grid = fibonacci_sphere(3000)
    keep = symmetry.reduce_directions(grid, name)
    spacing = np.sqrt(4 * np.pi / len(grid))
    orbit = np.einsum("gij,nj->ngi", symmetry.group(name), grid)
    nearest = (orbit @ grid[keep].T).max(axis=(1, 2))
    assert np.arccos(np.clip(nearest, -1, 1)).max() < 1.2 * spacing
    reduced, element = symmetry.to_asymmetric_unit(grid, name)
    assert symmetry.in_asymmetric_unit(reduced, name).all()
    assert np.all(element[keep] == 0)


def test_cyclic_and_dihedral_units_are_relion_wedges():
    grid = fibonacci_sphere(5000)
    rot = np.degrees(np.arctan2(grid[:, 1], grid[:, 0])) % 360
    tilt = np.degrees(np.arccos(grid[:, 2]))
    np.testing.assert_array_equal(symmetry.in_asymmetric_unit(grid, "C5"), rot < 72)
    np.testing.assert_array_equal(symmetry.in_asymmetric_unit(grid, "D4"),
                                  (rot < 90) & (tilt < 90))


def test_expanded_poses_and_pose_errors_up_to_symmetry():
    rng = np.random.default_rng(4)
    a = simulate.random_rotations(20, rng)
    g = symmetry.group("D7")
    expanded = symmetry.expand_poses(a, "D7")
    assert expanded.shape == (20 * 14, 3, 3)
    np.testing.assert_allclose(expanded[5 * 14 + 3], a[5] @ g[3])
    # A pose off by a group element is no error under the group, a large one without it.
    which = rng.integers(1, 14, 20)
    equivalent = np.einsum("nij,njk->nik", a, g[which])
    assert symmetry.pose_errors(equivalent, a, "D7").max() < 1e-5
    assert symmetry.pose_errors(equivalent, a, "C1").min() > 20
    small = symmetry.axis_rotation([0.3, -0.2, 0.9], np.radians(4.0))
    off = np.einsum("nij,jk->nik", equivalent, small)
    np.testing.assert_allclose(symmetry.pose_errors(off, a, "D7"), 4.0, atol=1e-6)
