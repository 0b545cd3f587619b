"""The point group of a C1 map, and the rotation that puts its axes on RELION's.

What ``relion_align_symmetry`` does for one group, and a choice among groups: for each candidate
group ``G`` (RELION's axes, :mod:`cryoday.symmetry`) find the rotation ``Q`` such that the map
is most nearly invariant under ``Q G Q^T`` (the group with its axes turned into the map's frame),
then score it.

Search, on low-passed maps Fourier-cropped to a few tens of voxels (seconds, not minutes):

1. an axis table: for every n-fold (n = 2..8) and every axis ``a`` of a hemisphere grid
   (~7 degrees apart), the correlation between the map and the map turned by 360/n about ``a``;
2. per group, its principal axis (the n-fold of Cn and Dn, T's three-fold, O's four-fold, I's
   five-fold) is put on each of the table's best few axes for that n, both ways round, and the
   angle about it is searched (3-degree steps) against the group's other generators;
3. the best orientation is refined (Powell, on the rotation vector) against all
   generators, and the chosen group's orientation polished on a larger working map (~1 degree
   to a fraction of one).

Scores of a candidate in its best orientation (``S`` the map averaged over ``Q G Q^T``):

- ``score``: the correlation between the map and ``S`` (what RELION users look at);
- ``consistency``: the lowest correlation between the map and its image under one of the
  group's non-identity elements. It does not grow with the order of the group as ``score`` does
  (an average over more copies always looks more like any one of them), and one element the map
  lacks sinks it (C8 on a C4 map: the 45-degree turn), so the choice uses it;
- with half maps, ``consistency`` is measured across halves (half 1 against half 2's images, and
  the other way round), so the noise of the halves, independent, does not count as asymmetry;
  and ``fsc_A`` is the FSC 0.143 resolution between the two half maps each symmetrised.

The rule of :func:`find_symmetry`: C1's self-consistency, ``reference``, is what an exactly
symmetric map would reach: without half maps the correlation of the map with itself after a
rotation and its inverse (interpolation loss only); with half maps the correlation between the
halves. A group is accepted when its ``consistency >= reference - tolerance`` (default
:data:`TOLERANCE`); the highest-order accepted group is chosen (ties: the more consistent), C1
when none is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage, optimize
from scipy.spatial.transform import Rotation

from cryoday import symmetry
from cryoday.errors import InputError
from cryoday.fourier import fourier_crop_3d
from cryoday.fsc import fsc, resolution_at, soft_spherical_mask
from cryoday.quadrature import fibonacci_sphere

#: The groups ``auto`` tries (issue 17), smallest first.
AUTO = tuple([f"C{n}" for n in range(2, 9)] + [f"D{n}" for n in range(2, 9)] + ["T", "O", "I"])
#: How far below C1's self-consistency a group's consistency may fall and still be accepted.
#: Measured on the tests' maps: an exactly D7 or C4 map (resampled, interpolated) reaches the
#: reference within 0.01-0.02; the best wrong two-fold of an asymmetric map stays > 0.2 below.
TOLERANCE = 0.05
COARSE_BOX = 24  # voxels of the axis table and the in-plane search
FINE_BOX = 32  # voxels of the refinement and the scores
AXIS_STEP_DEG = 7.0
INPLANE_STEP_DEG = 3.0
AXES_PER_FOLD = 3  # best table axes tried per principal axis
REFINED = 1  # orientations refined per group (the in-plane search already ranks them)


@dataclass
class Candidate:
    """One group in its best orientation: the map is ~invariant under ``Q G Q^T``.

    ``rotation`` is ``Q``; the map turned onto RELION's axes is ``V(Q x)``
    (:func:`align_to_axes`).
    """

    name: str
    order: int
    rotation: np.ndarray
    score: float
    consistency: float
    fsc_A: float | None = None

    def as_dict(self) -> dict:
        """Plain values for JSON (``validation/metrics.json``)."""
        return {"group": self.name, "order": self.order, "score": round(self.score, 4),
                "consistency": round(self.consistency, 4),
                "fsc_0.143_A": None if self.fsc_A is None else round(self.fsc_A, 2),
                "rotation": np.round(self.rotation, 6).tolist()}


@dataclass
class SymmetrySearch:
    """The outcome of :func:`find_symmetry`: every candidate's scores and the choice."""

    candidates: list[Candidate]
    chosen: Candidate
    reference: float
    tolerance: float
    shift_px: np.ndarray = field(default_factory=lambda: np.zeros(3))  # (x, y, z) recentring

    def as_dict(self) -> dict:
        """Plain values for JSON: the group found and every candidate's scores."""
        return {"group": self.chosen.name, "reference": round(self.reference, 4),
                "tolerance": self.tolerance, "shift_px": np.round(self.shift_px, 3).tolist(),
                "candidates": [c.as_dict() for c in self.candidates]}


def _working_map(volume: np.ndarray, box: int, mask: np.ndarray) -> np.ndarray:
    n = volume.shape[0]
    small = fourier_crop_3d(volume, box) if box < n else np.asarray(volume, np.float32)
    # A one-voxel Gaussian keeps linear interpolation's loss small at any rotation.
    small = ndimage.gaussian_filter(small.astype(np.float64), 0.7)
    return small * mask


def _corr(a: np.ndarray, b: np.ndarray, weight: np.ndarray) -> float:
    """Weighted Pearson correlation inside the soft mask."""
    w = weight / weight.sum()
    a = a - (a * w).sum()
    b = b - (b * w).sum()
    return float((a * b * w).sum() / np.sqrt((a * a * w).sum() * (b * b * w).sum() + 1e-300))


def _conjugate(q: np.ndarray, g: np.ndarray) -> np.ndarray:
    return q @ g @ q.T


def _mean_self_corr(v, rotations, weight, other=None) -> float:
    other = v if other is None else other
    return float(np.mean([_corr(v, symmetry.rotate_volume(other, r, 1), weight)
                          for r in rotations]))


def _hemisphere(step_deg: float) -> np.ndarray:
    n = int(np.ceil(4 * np.pi / np.radians(step_deg) ** 2))
    axes = fibonacci_sphere(2 * (n // 2))
    return axes[axes[:, 2] >= 0]


def _axis_table(v, weight, folds, axes) -> dict[int, np.ndarray]:
    return {k: np.array([_corr(v, symmetry.rotate_volume(v, symmetry.axis_rotation(a, 2 * np.pi
                                                                                    / k), 1),
                               weight) for a in axes]) for k in folds}


def _best_axes(scores, axes, count, separation_deg=12.0):
    chosen = []
    for i in np.argsort(-scores):
        if all(abs(axes[i] @ axes[j]) < np.cos(np.radians(separation_deg)) for j in chosen):
            chosen.append(i)
            if len(chosen) == count:
                break
    return chosen


def _layout(name: str):
    """(principal fold, principal axis, the other generators) in RELION's frame."""
    gens = symmetry._generators(name)
    main = max(range(len(gens)), key=lambda i: gens[i][0])
    fold, axis = gens[main]
    others = [symmetry.axis_rotation(a, 2 * np.pi / f) for i, (f, a) in enumerate(gens)
              if i != main]
    u = np.asarray(axis, dtype=np.float64)
    return fold, u / np.linalg.norm(u), others, [symmetry.axis_rotation(u, 2 * np.pi / fold)]


def _onto(u: np.ndarray, a: np.ndarray) -> np.ndarray:
    """A rotation taking unit vector ``u`` to unit vector ``a``."""
    rotation, _ = Rotation.align_vectors(a[None], u[None])
    return rotation.as_matrix()


def _orient(name, coarse, wc, table, axes) -> np.ndarray:
    """The best ``Q`` for one group."""
    fold, u, others, _ = _layout(name)
    starts = []
    for i in _best_axes(table[fold], axes, AXES_PER_FOLD):
        a = axes[i]
        for sign in ((1.0,) if not others else (1.0, -1.0)):
            q0 = _onto(u, sign * a)
            if not others:
                starts.append((table[fold][i], q0))
                continue
            for psi in np.radians(np.arange(0.0, 360.0 / fold, INPLANE_STEP_DEG)):
                q = symmetry.axis_rotation(sign * a, psi) @ q0
                score = _mean_self_corr(coarse, [_conjugate(q, g) for g in others], wc)
                starts.append((score, q))
    starts.sort(key=lambda s: -s[0])
    best, best_cost = None, np.inf
    for _, q0 in starts[:REFINED]:
        q, cost = _refine(name, coarse, wc, q0, 5e-3)
        if cost < best_cost:
            best, best_cost = q, cost
    return best


def _refine(name, v, weight, q0, xtol):
    """Local refinement of ``Q`` against all of the group's generators: ``(Q, -consistency)``."""
    _, _, others, principal = _layout(name)
    generators = principal + others

    def cost(p):
        q = Rotation.from_rotvec(p).as_matrix() @ q0
        return -_mean_self_corr(v, [_conjugate(q, g) for g in generators], weight)

    fit = optimize.minimize(cost, np.zeros(3), method="Powell",
                            options={"xtol": xtol, "ftol": 1e-5, "maxfev": 150})
    return Rotation.from_rotvec(fit.x).as_matrix() @ q0, float(fit.fun)


def _scores(v, weight, q, name, half=None):
    """(score, consistency) of ``v`` under ``Q G Q^T``; with ``half = (h1, h2)`` the
    consistency is across halves."""
    elements = [_conjugate(q, g) for g in symmetry.group(name)]
    images = [symmetry.rotate_volume(v, r, 1) for r in elements[1:]]
    average = (v + sum(images)) / len(elements)
    score = _corr(v, average, weight)
    if not images:
        return score, 1.0
    if half is None:
        per_element = [_corr(v, im, weight) for im in images]
    else:
        h1, h2 = half
        per_element = [0.5 * (_corr(h1, symmetry.rotate_volume(h2, r, 1), weight)
                              + _corr(h2, symmetry.rotate_volume(h1, r, 1), weight))
                       for r in elements[1:]]
    return score, float(min(per_element))


def _centre_of_mass_shift(volume: np.ndarray) -> np.ndarray:
    """(x, y, z) voxels from the box centre to the centre of the map's positive density."""
    n = volume.shape[0]
    positive = np.clip(volume, 0, None) * soft_spherical_mask(n, n / 2 - 3, 3)
    if positive.sum() <= 0:
        return np.zeros(3)
    com = np.array(ndimage.center_of_mass(positive))[::-1]
    return com - n // 2


def _shifted(volume: np.ndarray, shift_xyz: np.ndarray) -> np.ndarray:
    if not np.any(shift_xyz):
        return np.asarray(volume, dtype=np.float64)
    return ndimage.shift(np.asarray(volume, dtype=np.float64), -shift_xyz[::-1], order=3,
                         mode="constant")


def _groups(groups) -> list[str]:
    if isinstance(groups, str):
        if groups.strip().lower() == "auto":
            return list(AUTO)
        groups = [groups]
    names = [symmetry.canonical_name(g) for g in groups]
    return [g for g in dict.fromkeys(names) if g != "C1"]


def find_symmetry(volume: np.ndarray, pixel_size: float, groups="auto", half1=None, half2=None,
                  tolerance: float = TOLERANCE, recentre: bool = True) -> SymmetrySearch:
    """Score candidate point groups on a map and choose one (rule in the module docstring).

    Parameters
    ----------
    volume : (n, n, n) map, ``[z, y, x]``
    pixel_size : A/px (for the half maps' FSC)
    groups : ``'auto'`` (:data:`AUTO`), one group name, or a list of names
    half1, half2 : optional half maps of the same box (gold-standard halves)
    tolerance : how far below C1's self-consistency a group's consistency may fall
    recentre : first move the centre of the positive density to the box centre (symmetry axes
        pass through it); the shift is reported and applied by :func:`align_to_axes`

    Returns
    -------
    SymmetrySearch
        Candidates in the order tried (C1 first), the chosen one, the reference and the shift.
    """
    v = np.asarray(volume, dtype=np.float64)
    n = v.shape[0]
    if v.ndim != 3 or len(set(v.shape)) != 1:
        raise InputError(f"symmetry search needs a cubic map, got shape {v.shape}")
    if (half1 is None) != (half2 is None):
        raise InputError("give both half maps or neither")
    names = _groups(groups)
    shift = _centre_of_mass_shift(v) if recentre else np.zeros(3)
    v = _shifted(v, shift)
    coarse_box, fine_box = min(COARSE_BOX, n - n % 2), min(FINE_BOX, n - n % 2)
    wc = soft_spherical_mask(coarse_box, coarse_box / 2 - 2, 2).astype(np.float64)
    wf = soft_spherical_mask(fine_box, fine_box / 2 - 2, 2).astype(np.float64)
    coarse, fine = _working_map(v, coarse_box, wc), _working_map(v, fine_box, wf)
    halves = None
    if half1 is not None:
        full_halves = [_shifted(h, shift) for h in (half1, half2)]
        if any(h.shape != v.shape for h in full_halves):
            raise InputError(f"the half maps' boxes {half1.shape[0]}, {half2.shape[0]} differ "
                             f"from the map's {n}")
        halves = tuple(_working_map(h, fine_box, wf) for h in full_halves)
        reference = _corr(*halves, wf)
    else:
        turn = symmetry.axis_rotation([0.3, 0.5, 0.8], np.radians(37.0))
        back = symmetry.rotate_volume(symmetry.rotate_volume(fine, turn, 1), turn.T, 1)
        reference = _corr(fine, back, wf)
    axes = _hemisphere(AXIS_STEP_DEG)
    folds = sorted({_layout(g)[0] for g in names})
    table = _axis_table(coarse, wc, folds, axes)
    candidates = [Candidate("C1", 1, np.eye(3), 1.0, reference if halves else 1.0)]
    for name in names:
        q = _orient(name, coarse, wc, table, axes)
        score, consistency = _scores(fine, wf, q, name, halves)
        candidates.append(Candidate(name, symmetry.order(name), q, score, consistency))
    accepted = [c for c in candidates if c.consistency >= reference - tolerance]
    chosen = max(accepted, key=lambda c: (c.order, c.consistency))
    if chosen.order > 1:
        # The coarse map's orientation is good to ~1 degree; polish the chosen one's.
        chosen.rotation = _refine(chosen.name, fine, wf, chosen.rotation, 1e-3)[0]
        chosen.score, chosen.consistency = _scores(fine, wf, chosen.rotation, chosen.name,
                                                   halves)
    if halves is not None:
        for c in candidates:
            c.fsc_A = _symmetrised_fsc(full_halves, c, pixel_size)
    return SymmetrySearch(candidates, chosen, float(reference), float(tolerance), shift)


def _symmetrised_fsc(halves, candidate: Candidate, pixel_size: float) -> float:
    elements = [_conjugate(candidate.rotation, g) for g in symmetry.group(candidate.name)]
    sym = [(h + sum(symmetry.rotate_volume(h, r, 1) for r in elements[1:])) / len(elements)
           for h in halves]
    n = halves[0].shape[0]
    mask = soft_spherical_mask(n, n / 2 - 4, 3)
    freq, curve = fsc(sym[0], sym[1], pixel_size, mask=mask)
    return resolution_at(freq, curve, 0.143)


def align_to_axes(volume: np.ndarray, search: SymmetrySearch, candidate: Candidate | None = None,
                  symmetrise: bool = False) -> np.ndarray:
    """The map recentred and turned so the candidate's axes are RELION's: ``W(x) = V(Q x)``.

    With ``symmetrise`` the result is also averaged over the group. float32 out.
    """
    c = search.chosen if candidate is None else candidate
    v = _shifted(volume, search.shift_px)
    aligned = symmetry.rotate_volume(v, c.rotation.T, 3)
    if symmetrise:
        aligned = symmetry.symmetrise(aligned, c.name)
    return np.asarray(aligned, dtype=np.float32)


def align_to_recorded_axes(volume: np.ndarray, record: dict) -> np.ndarray:
    """:func:`align_to_axes` from a search's :meth:`SymmetrySearch.as_dict` (as
    ``validation/metrics.json`` keeps it): the map recentred by its ``shift_px`` and turned
    onto the chosen group's axes. ``volume`` is the map that was searched (the shift is in its
    voxels). float32 out.
    """
    chosen = next(c for c in record["candidates"] if c["group"] == record["group"])
    v = _shifted(np.asarray(volume, np.float64), np.asarray(record["shift_px"], np.float64))
    return np.asarray(symmetry.rotate_volume(v, np.asarray(chosen["rotation"]).T, 3),
                      dtype=np.float32)
