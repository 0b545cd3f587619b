"""Point groups C_n, D_n, T, O and I in RELION's orientation convention.

The axes are those of RELION's ``SymList::fill_symmetry_class`` (``src/symmetries.cpp`` of
github:3dem/relion, read at commit 445e1c8e), which ``relion_refine --sym`` uses:

- ``Cn``: an n-fold axis along z;
- ``Dn``: the n-fold along z and a two-fold along x;
- ``T``: a three-fold along z and a two-fold along (0, 0.816496, 0.577350);
- ``O``: a three-fold along (1, 1, 1)/sqrt(3) and a four-fold along z;
- ``I`` (RELION's default icosahedral setting, ``I2``): a two-fold along z, a five-fold along
  (0.525731, 0, 0.850651) and a three-fold along (0, 0.356822, 0.934172); ``I1``, ``I3`` and
  ``I4`` are RELION's other settings.

RELION closes the set of generators under multiplication (``compute_subgroup``); so does
:func:`group`. A group is closed under inverses, so which of ``R`` or ``R^T`` one stores for an
axis does not change the set. Matrices act on (x, y, z) coordinates about the box centre voxel
``n // 2`` (RELION's ``setXmippOrigin``); arrays are indexed ``[z, y, x]``.

Poses: a volume seen at pose ``A`` projects as ``sum_z V(A^T r)`` (``cryoday.geometry``). When
``V(g r) = V(r)`` for every ``g`` of the group, ``A`` and ``A g`` give the same image for every
``g``: the pose ``A``'s equivalents are ``A g`` (the group multiplies on the right), and its
viewing direction ``A^T e_z`` moves to ``g^T A^T e_z``.
"""

from __future__ import annotations

import re
from functools import cache

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from cryoday import _rotate_kernels
from cryoday.errors import InputError

# RELION's generators per group: (fold, axis) pairs, from fill_symmetry_class.
_TETRA = ((3, (0.0, 0.0, 1.0)), (2, (0.0, 0.816496, 0.577350)))
_OCTA = ((3, (0.5773502, 0.5773502, 0.5773502)), (4, (0.0, 0.0, 1.0)))
_ICOSA = {
    "I1": ((2, (1.0, 0.0, 0.0)), (5, (0.85065080702670, 0.0, -0.5257311142635)),
           (3, (0.9341723640, 0.3568220765, 0.0))),
    "I2": ((2, (0.0, 0.0, 1.0)), (5, (0.525731114, 0.0, 0.850650807)),
           (3, (0.0, 0.356822076, 0.934172364))),
    "I3": ((2, (-0.5257311143, 0.0, 0.8506508070)), (5, (0.0, 0.0, 1.0)),
           (3, (-0.4911234778630044, 0.3568220764705179, 0.7946544753759428))),
    "I4": ((2, (0.5257311143, 0.0, 0.8506508070)), (5, (0.8944271932547096, 0.0,
                                                        0.4472135909903704)),
           (3, (0.4911234778630044, 0.3568220764705179, 0.7946544753759428))),
}
_ICOSA["I"] = _ICOSA["I2"]

_NAME = re.compile(r"^\s*([CD])(\d{1,3})\s*$|^\s*(T|O|I[1-4]?)\s*$", re.IGNORECASE)


def canonical_name(name) -> str:
    """RELION's spelling of a group name (``'c4'`` -> ``'C4'``); ``InputError`` if unknown.

    Accepted: ``Cn`` (n >= 1), ``Dn`` (n >= 2), ``T``, ``O``, ``I`` (= ``I2``), ``I1``-``I4``,
    in any case. Groups with mirrors (``Cnv``, ``Dnh``, ...) do not apply to a chiral molecule and
    are refused.
    """
    match = _NAME.match(str(name)) if isinstance(name, str) else None
    if match is None:
        raise InputError(f"symmetry {name!r} is not a point group: use Cn, Dn, T, O or I "
                         "(RELION's names, e.g. C1, C4, D7)")
    if match.group(3):
        return match.group(3).upper()
    kind, n = match.group(1).upper(), int(match.group(2))
    if n < (1 if kind == "C" else 2):
        raise InputError(f"symmetry {name!r}: {kind}n needs n >= {1 if kind == 'C' else 2}")
    return f"{kind}{n}"


def _generators(name: str):
    if name[0] == "C":
        return ((int(name[1:]), (0.0, 0.0, 1.0)),)
    if name[0] == "D":
        return ((int(name[1:]), (0.0, 0.0, 1.0)), (2, (1.0, 0.0, 0.0)))
    if name == "T":
        return _TETRA
    if name == "O":
        return _OCTA
    return _ICOSA[name]


def axis_rotation(axis, angle_rad: float) -> np.ndarray:
    """The right-handed rotation by ``angle_rad`` about ``axis`` (normalised here), ``(3, 3)``."""
    a = np.asarray(axis, dtype=np.float64)
    return Rotation.from_rotvec(a / np.linalg.norm(a) * angle_rad).as_matrix()


@cache
def _group(name: str) -> np.ndarray:
    gens = [axis_rotation(axis, 2 * np.pi / fold) for fold, axis in _generators(name)]
    elements = [np.eye(3)]
    frontier = [np.eye(3)]
    # RELION's axes are given to 6-10 digits: products match up to ~1e-6, far from any other
    # element (the closest distinct elements of I differ by 2 sin(36 deg / 2) in norm).
    while frontier:
        new = []
        for m in frontier:
            for g in gens:
                p = g @ m
                if not any(np.abs(p - e).max() < 1e-4 for e in elements):
                    elements.append(p)
                    new.append(p)
        frontier = new
        if len(elements) > 60:
            raise AssertionError(f"{name}: generators do not close into a point group")
    out = np.array(elements)
    # Re-orthonormalise (the axes' rounding leaves ~1e-7 errors that products accumulate).
    u, _, vt = np.linalg.svd(out)
    out = u @ vt
    out.setflags(write=False)
    return out


def group(name) -> np.ndarray:
    """The rotations of a point group in RELION's axes, identity first.

    Parameters
    ----------
    name : str
        ``'C1'``, ``'c4'``, ``'D7'``, ``'T'``, ``'O'``, ``'I'`` ... (see :func:`canonical_name`).

    Returns
    -------
    numpy.ndarray
        ``(|G|, 3, 3)`` float64 rotation matrices (read-only), acting on (x, y, z).
    """
    return _group(canonical_name(name))


def order(name) -> int:
    """``|G|``: n for ``Cn``, 2n for ``Dn``, 12, 24, 60 for T, O, I."""
    return len(group(name))


def rotate_volume(volume: np.ndarray, rotation: np.ndarray, order: int = 3) -> np.ndarray:
    """The volume turned by ``rotation`` about its centre voxel: ``out(x) = V(R^T x)``.

    Coordinates are (x, y, z) from voxel ``n // 2``; the array is ``[z, y, x]``. Spline
    interpolation of ``order`` (scipy.ndimage), zero outside the box. float64 out.
    """
    v = np.asarray(volume, dtype=np.float64)
    n = v.shape[0]
    c = np.full(3, n // 2, dtype=np.float64)
    # affine_transform samples V at M @ i + offset in array (z, y, x) order: permute R^T so.
    rt = np.asarray(rotation, dtype=np.float64).T[::-1, ::-1]
    return ndimage.affine_transform(v, rt, offset=c - rt @ c, order=order, mode="constant",
                                    prefilter=order > 1)


def symmetrise(volume: np.ndarray, name, order: int = 3) -> np.ndarray:
    """The average of the volume over the group: ``mean_g V(g^T x)``, about the centre voxel.

    This is RELION's ``symmetriseMap`` (the average over the group does not depend on whether
    ``g`` or ``g^T`` is applied). Cubic B-spline (``order=3``) or trilinear (``order=1``)
    interpolation with scipy's boundary rules (:func:`rotate_volume`), all rotations in one
    Numba pass (:mod:`cryoday._rotate_kernels`); float32 out.
    """
    if order not in (1, 3):
        raise ValueError(f"symmetrise interpolates with order 1 or 3, not {order}")
    v = np.asarray(volume, dtype=np.float64)
    total = v.copy()
    others = group(name)[1:]
    if len(others):
        ops = np.ascontiguousarray(np.transpose(others, (0, 2, 1)))
        # C_n and D_n keep voxel planes (z -> +-z): a 2D spline per plane is the 3D one there.
        planar = order == 3 and bool(np.allclose(np.abs(ops[:, 2, 2]), 1.0, atol=1e-12))
        if planar:
            samples = ndimage.spline_filter1d(v, 3, axis=2, mode="mirror")
            samples = ndimage.spline_filter1d(samples, 3, axis=1, mode="mirror")
        else:
            samples = ndimage.spline_filter(v, 3, mode="mirror") if order == 3 else v
        _rotate_kernels.sum_rotated(np.ascontiguousarray(samples), ops, order == 3, planar,
                                    total)
    return (total / (len(others) + 1)).astype(np.float32)


# A direction with no symmetry of its own in any of the groups: the seed of the asymmetric unit.
# For Cn and Dn it sits at rot = 180/n deg, so the unit is RELION's wedge 0 <= rot < 360/n (and,
# for Dn, the upper hemisphere tilt <= 90 deg).
def _seed(name: str) -> np.ndarray:
    if name[0] in "CD":
        n = int(name[1:])
        phi, tilt = np.pi / n, np.radians(40.0)
    else:
        phi, tilt = np.radians(17.0), np.radians(11.0)
    return np.array([np.sin(tilt) * np.cos(phi), np.sin(tilt) * np.sin(phi), np.cos(tilt)])


def asymmetric_unit_seed(name) -> np.ndarray:
    """The unit direction the asymmetric unit is built around (see :func:`in_asymmetric_unit`)."""
    return _seed(canonical_name(name))


def to_asymmetric_unit(directions: np.ndarray, name) -> tuple[np.ndarray, np.ndarray]:
    """Each direction's equivalent in the asymmetric unit, and the group element that takes it
    there.

    The asymmetric unit is the Dirichlet domain of the seed direction ``p``
    (:func:`asymmetric_unit_seed`): the directions ``d`` closer to ``p`` than any ``g d`` is. It
    tiles the sphere exactly ``|G|`` times; for ``Cn`` it is the wedge ``0 <= rot < 360/n`` and
    for ``Dn`` that wedge's upper half.

    Parameters
    ----------
    directions : (..., 3) unit vectors (viewing directions, the third rows of pose matrices)
    name : group name

    Returns
    -------
    reduced : (..., 3) ``g_k d`` for the chosen element of each direction
    element : (...,) int index ``k`` into :func:`group`; ties go to the lowest index, so the
        identity wins on the boundary.
    """
    d = np.asarray(directions, dtype=np.float64)
    elements = group(name)
    p = _seed(canonical_name(name))
    # (g d) . p = d . (g^T p): one dot product per element with the seed's orbit.
    orbit = np.einsum("gji,j->gi", elements, p)
    score = d @ orbit.T
    best = score.max(axis=-1, keepdims=True)
    element = np.argmax(score >= best - 1e-12, axis=-1)
    reduced = np.einsum("...ij,...j->...i", elements[element], d)
    return reduced, element


def in_asymmetric_unit(directions: np.ndarray, name) -> np.ndarray:
    """Whether each direction lies in the group's asymmetric unit (see
    :func:`to_asymmetric_unit`); on a dense grid about ``1/|G|`` of the directions do.

    Parameters
    ----------
    directions : (..., 3) unit vectors
    name : group name

    Returns
    -------
    numpy.ndarray
        (...,) bool.
    """
    return to_asymmetric_unit(directions, name)[1] == 0


def reduce_directions(directions: np.ndarray, name) -> np.ndarray:
    """The indices of a direction grid's points inside the asymmetric unit (one representative
    per orbit for a grid fine enough): the pose grid's viewing directions under symmetry."""
    return np.flatnonzero(in_asymmetric_unit(directions, name))


def expand_poses(rotations: np.ndarray, name) -> np.ndarray:
    """Every pose's ``|G|`` equivalents ``A g``, pose-major: ``(n * |G|, 3, 3)``.

    Row ``i * |G| + k`` is ``rotations[i] @ group(name)[k]``; a symmetric volume projects to the
    same image at all of them (module docstring), so known-pose reconstruction inserts each
    image at every one.
    """
    r = np.asarray(rotations, dtype=np.float64)
    return np.einsum("nij,gjk->ngik", r, group(name)).reshape(-1, 3, 3)


def pose_errors(estimated: np.ndarray, truth: np.ndarray, symmetry="C1") -> np.ndarray:
    """Angle (degrees) between each estimated and true pose, minimised over the group:
    ``min_g angle(A_est, A_true g)``, as a symmetric molecule's pose is only known up to ``g``.

    Both poses must already be in one frame (the map aligned to the truth); with ``C1`` this is
    the plain geodesic distance.

    Parameters
    ----------
    estimated, truth : (n, 3, 3) rotation matrices
    symmetry : group name

    Returns
    -------
    numpy.ndarray
        (n,) angles in degrees.
    """
    est = np.asarray(estimated, dtype=np.float64)
    true = np.asarray(truth, dtype=np.float64)
    # trace(A_est^T A_true g) = sum_ij (A_true^T A_est)_ji g_ij ... formed once per element.
    rel = np.einsum("nki,nkj->nij", true, est)  # A_true^T A_est
    traces = np.einsum("nij,gij->ng", rel, group(symmetry))  # trace(g^T A_true^T A_est)
    cos = np.clip((traces.max(axis=1) - 1) / 2, -1.0, 1.0)
    return np.degrees(np.arccos(cos))
