"""Quadrature grids over 3D poses and 2D shifts (docs/method.md, section 1).

A rotation is a viewing direction times an in-plane angle. Directions come from a Fibonacci
(golden-angle) spiral, the Saff-Kuijlaars construction the paper's code uses: near-uniform
(equal-area cells, so equal weights 4 pi / n), any size (HEALPix only comes in 12 * 4^k), and
nested refinement is not needed because importance sampling carries posteriors across grids as
coordinates, not indices. In-plane angles are evenly spaced. Sizes follow the resolution: the
angular step is ``a = us * atan(1 / r)`` for Fourier radius ``r`` (px), so that neighbouring
poses move the outermost used coefficient by about ``us`` pixels.

Shifts are a square grid in a disc with a Gaussian prior in the weights; their spacing is
``us * resolution / 2`` (a shift of half the resolution changes the phase of the outermost
coefficient by pi).

With a point group, the directions are those of the spiral inside one asymmetric unit
(``cryoday.symmetry.reduce_directions``): a symmetric map gives the same image at a pose and at
its ``|G|`` equivalents, so the rest of the sphere adds nothing but cost. The spiral is not
thinned: the grid keeps the sphere's spacing, about ``n_dir / |G|`` directions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp

from cryoday.geometry import euler_to_matrix
from cryoday.symmetry import canonical_name, reduce_directions

UNDERSAMPLING_BY_LEVEL = (1.5, 1.5, 1.25, 1.25)


@dataclass(frozen=True)
class PoseGrid:
    """A product quadrature over viewing directions x in-plane angles x shifts.

    Rotation index ``r = d * n_inp + j``; ``rotations[r] = euler_to_matrix(rot_d, tilt_d, psi_j)``,
    which factors as ``inplane_rotation(psi_j) @ direction_rotations[d]`` (RELION's ZYZ applies
    psi last): the likelihood slices the model once per direction and turns the image instead.
    Shifts are RELION origins in pixels of the stage box. Log weights are normalised so that
    ``logsumexp`` over each dimension is 0. ``symmetry`` is the point group whose asymmetric
    unit the directions cover (``'C1'``: the whole sphere).
    """

    directions: np.ndarray
    inplane: np.ndarray
    rotations: np.ndarray
    rot_log_weights: np.ndarray
    shifts: np.ndarray
    shift_log_weights: np.ndarray
    angular_step: float
    shift_step_px: float
    pixel_size: float
    direction_rotations: np.ndarray | None = None
    inplane_matrices: np.ndarray | None = None
    symmetry: str = "C1"

    @property
    def dir_log_weights(self) -> np.ndarray:
        return np.full(self.n_dir, -np.log(self.n_dir))

    @property
    def inp_log_weights(self) -> np.ndarray:
        return np.full(self.n_inp, -np.log(self.n_inp))

    @property
    def n_dir(self) -> int:
        return len(self.directions)

    @property
    def n_inp(self) -> int:
        return len(self.inplane)

    @property
    def n_rot(self) -> int:
        return len(self.rotations)

    @property
    def n_shift(self) -> int:
        return len(self.shifts)

    @property
    def size(self) -> int:
        """Points of the full grid per image."""
        return self.n_rot * self.n_shift


def undersampling_for_level(level: int) -> float:
    """The undersampling factor of the ``level``-th stage (0-based; docs/method.md, section 1)."""
    return UNDERSAMPLING_BY_LEVEL[level] if level < len(UNDERSAMPLING_BY_LEVEL) else 1.0


def fibonacci_sphere(n: int) -> np.ndarray:
    """``n`` near-uniform unit vectors on the sphere (golden-angle spiral), ``(n, 3)``."""
    i = np.arange(n) + 0.5
    z = 1.0 - 2.0 * i / n
    phi = np.pi * (3.0 - np.sqrt(5.0)) * i
    rho = np.sqrt(1.0 - z * z)
    return np.stack([rho * np.cos(phi), rho * np.sin(phi), z], axis=1)


def directions_to_euler(directions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RELION (rot, tilt) in degrees whose viewing direction (third row of A) is each vector."""
    d = np.asarray(directions, dtype=np.float64)
    tilt = np.degrees(np.arccos(np.clip(d[..., 2], -1.0, 1.0)))
    rot = np.degrees(np.arctan2(d[..., 1], d[..., 0]))
    return rot, tilt


def angular_step(resolution_A: float, box: int, pixel_size: float, undersampling: float) -> float:
    """Angular spacing in radians for a stage: ``us * atan(1 / r)``, ``r = box * psize / res``."""
    radius = box * pixel_size / resolution_A
    return undersampling * np.arctan(1.0 / radius)


def shift_grid(resolution_A: float, pixel_size: float, undersampling: float,
               shift_sigma_A: float, shift_max_A: float, radius_A: float | None = None
               ) -> tuple[np.ndarray, np.ndarray, float]:
    """Shifts (px) in a disc and their log prior weights, and the spacing (px).

    The disc's radius is ``radius_A`` when given (the stage driver's choice, which follows the
    data: ``cryoday.shift_range``), else ``min(shift_max_A, 2.5 * shift_sigma_A)``.
    """
    step_A = undersampling * resolution_A / 2.0
    extent_A = min(shift_max_A, 2.5 * shift_sigma_A) if radius_A is None else float(radius_A)
    half = int(np.floor(extent_A / step_A + 1e-9))
    axis = np.arange(-half, half + 1) * step_A
    sx, sy = np.meshgrid(axis, axis, indexing="xy")
    keep = np.hypot(sx, sy) <= extent_A + 1e-9
    shifts_A = np.stack([sx[keep], sy[keep]], axis=1)
    logw = -(shifts_A**2).sum(axis=1) / (2.0 * shift_sigma_A**2)
    logw -= logsumexp(logw)
    return shifts_A / pixel_size, logw, step_A / pixel_size


def pose_grid(resolution_A: float, box: int, pixel_size: float, undersampling: float = 1.0,
              shift_sigma_A: float = 10.0, shift_max_A: float = 60.0,
              shift_radius_A: float | None = None, symmetry: str = "C1") -> PoseGrid:
    """The quadrature grid of a stage at ``resolution_A`` on ``box``-px images of ``pixel_size``.

    Sizes (docs/method.md, section 1): ``n_dir = ceil((3.6 / a)^2)`` on the sphere,
    ``n_inp = ceil(2 pi / a)``; shifts as :func:`shift_grid` (``shift_radius_A`` its
    ``radius_A``). With a ``symmetry`` other than C1 only the sphere's directions inside the
    group's asymmetric unit are kept (about ``n_dir / |G|``), with equal weights again summing
    to one; the in-plane angles and shifts are the same as in C1.
    """
    a = angular_step(resolution_A, box, pixel_size, undersampling)
    n_dir = int(np.ceil((3.6 / a) ** 2))
    n_inp = int(np.ceil(2 * np.pi / a))
    directions = fibonacci_sphere(n_dir)
    symmetry = canonical_name(symmetry)
    if symmetry != "C1":
        directions = directions[reduce_directions(directions, symmetry)]
        n_dir = len(directions)
    inplane = (np.arange(n_inp) + 0.5) * 2 * np.pi / n_inp
    rot, tilt = directions_to_euler(directions)
    rotations = euler_to_matrix(np.repeat(rot, n_inp), np.repeat(tilt, n_inp),
                                np.tile(np.degrees(inplane), n_dir))
    n_rot = n_dir * n_inp
    shifts, shift_logw, shift_step = shift_grid(resolution_A, pixel_size, undersampling,
                                                shift_sigma_A, shift_max_A, shift_radius_A)
    return PoseGrid(
        directions=directions,
        inplane=inplane,
        rotations=np.ascontiguousarray(rotations),
        rot_log_weights=np.full(n_rot, -np.log(n_rot)),
        shifts=shifts,
        shift_log_weights=shift_logw,
        angular_step=float(a),
        shift_step_px=float(shift_step),
        pixel_size=float(pixel_size),
        direction_rotations=np.ascontiguousarray(euler_to_matrix(rot, tilt, 0.0)),
        inplane_matrices=inplane_matrices(inplane),
        symmetry=symmetry,
    )


def inplane_matrices(angles_rad: np.ndarray) -> np.ndarray:
    """The in-plane parts ``P[:2, :2]`` of ``P = euler_to_matrix(0, 0, psi)``, ``(n, 2, 2)``.

    With ``A = P A_d``, the slice at ``A`` and frequency ``k`` is the slice at ``A_d`` and
    ``P^T k``: turning the image by ``P`` stands in for slicing at every in-plane angle.
    """
    full = euler_to_matrix(0.0, 0.0, np.degrees(np.asarray(angles_rad, dtype=np.float64)))
    return np.ascontiguousarray(full.reshape(-1, 3, 3)[:, :2, :2])
