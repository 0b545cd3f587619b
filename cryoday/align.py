"""Alignment of two maps (rotation, translation and hand) and FSC after alignment.

Ab initio reconstruction cannot know the absolute orientation, position or handedness of the
molecule, so a map is compared with a reference only after finding them: a global search over a
rotation grid on low-passed, downsampled maps (for the map and its mirror image), the translation
for each rotation from an FFT cross-correlation, then a local refinement of the best candidates.

The cost does not grow with the box beyond its last step: the search runs on ~24-px maps (the
rotations turned a batch at a time by a Numba kernel, their translations from one batched FFT
against the reference's shared transform), the refinement on 24-px then 48-px crops, and only a
short polish at the full box, each step an L-BFGS on the correlation with its exact gradient
(``cryoday._align_kernels``: one pass over the box gives both).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numba
import numpy as np
from scipy import fft as sfft
from scipy import ndimage, optimize
from scipy.spatial.transform import Rotation
from threadpoolctl import ThreadpoolController

from cryoday import _align_kernels
from cryoday.fourier import fourier_crop_3d
from cryoday.fsc import fsc, resolution_at
from cryoday.geometry import euler_to_matrix
from cryoday.quadrature import directions_to_euler, fibonacci_sphere

# Box (px) of the global search's maps: enough for ~12-degree steps at the particle's edge.
SEARCH_BOX = 24
# L-BFGS iterations of the polish at the full box.
POLISH_ITERATIONS = 10
# Box (px) of the middle level of the local refinement, between the search box and the full
# box: what a map at the stages' resolutions holds, at an eighth of a 96-px box's cost.
REFINE_BOX = 48
# Per level of the local refinement (search box, REFINE_BOX, full box): L-BFGS's iterations
# (each about one pass over the level's box; at most twice as many passes) and relative
# tolerance on the correlation, and the correlation margin within which a candidate goes on to
# the next level. The full box only polishes: it starts within a fraction of a degree.
REFINE_LEVELS = ((100, 1e-9, 0.05), (100, 1e-9, 0.01), (POLISH_ITERATIONS, 1e-9, 0.0))
# Boxes larger than this get a level at this box between REFINE_BOX and the full box, which
# settles the candidates' near-ties (REFINE_BOX's margin) so that only the best one is polished
# at the full box: at 128 px a full-box pass costs ~140 ms on 2 cores, and polishing three
# candidates there took 13 of a validation's 18 s of alignment.
SETTLE_BOX = 64
SETTLE_LEVEL = (100, 1e-9, 0.0)
# Passes of one L-BFGS line search. The objective's gradient jumps where samples cross voxel
# faces, so a line search may not satisfy its conditions: with scipy's default of 20 the
# full-box polish made 51 passes for its 10 iterations (maxfun is checked between them only).
MAX_LINE_SEARCH = 5
# Boxes (px) from which a pass is split over threads: below, waking them costs more.
PARALLEL_BOX = 80
# Turned maps transformed at once in the global search (the batch's FFT intermediates raise
# the peak memory by about ten times this).
ALIGN_BATCH_BYTES = 16 << 20


@dataclass
class Alignment:
    """``apply_alignment(moving, a)`` ~ reference: ``R`` rotates the (possibly mirrored) map about
    its centre voxel, then it is shifted by ``shift_px`` (x, y, z)."""

    rotation: np.ndarray
    shift_px: np.ndarray
    flipped: bool
    correlation: float


def _transform(volume, rotation, shift_px, order=1):
    """``out(x) = volume(R^T (x - c - t) + c)``, coordinates (x, y, z), arrays [z, y, x]."""
    n = volume.shape[0]
    c = np.full(3, n // 2, dtype=np.float64)
    # map_coordinates works on array axes (z, y, x): permute the rotation accordingly.
    perm = [2, 1, 0]
    rt = rotation.T[np.ix_(perm, perm)]
    t = np.asarray(shift_px, dtype=np.float64)[perm]
    offset = c - rt @ (c + t)
    return ndimage.affine_transform(volume, rt, offset=offset, order=order, mode="constant")


def apply_alignment(volume: np.ndarray, alignment: Alignment, order: int = 3) -> np.ndarray:
    """The moving map brought onto the reference's frame."""
    v = volume[::-1] if alignment.flipped else volume
    return _transform(np.ascontiguousarray(v, dtype=np.float64), alignment.rotation,
                      alignment.shift_px, order=order).astype(np.float32)


def _normalise(v):
    v = v - v.mean()
    return v / (np.linalg.norm(v) + 1e-30)


def _affine(rotation, shift_px, n):
    """``_transform``'s array-axis matrix and offset: sample at ``rt @ (z, y, x) + offset``."""
    c = np.full(3, n // 2, dtype=np.float64)
    perm = [2, 1, 0]
    rt = rotation.T[np.ix_(perm, perm)]
    t = np.asarray(shift_px, dtype=np.float64)[perm]
    return np.ascontiguousarray(rt), c - rt @ (c + t)


def search_rotations(step_deg: float) -> np.ndarray:
    """Rotations covering SO(3) at about ``step_deg``: spiral directions x in-plane angles."""
    step = np.radians(step_deg)
    directions = fibonacci_sphere(int(np.ceil((3.6 / step) ** 2)))
    rot, tilt = directions_to_euler(directions)
    n_inp = int(np.ceil(2 * np.pi / step))
    psi = np.arange(n_inp) * 360.0 / n_inp
    return euler_to_matrix(np.repeat(rot, n_inp), np.repeat(tilt, n_inp), np.tile(psi, len(rot)))


def _global_search(moving, reference_ft, rotations, max_shift):
    """Every rotation's best integer shift (x, y, z) and score (the cross-correlation peak).

    ``irfft(F_m conj(F_r))(s) = sum_x m(x + s) r(x)``: a peak at ``s`` means moving by ``-s``.
    The maps are turned and transformed a batch at a time (the reference's transform is shared).
    """
    n = moving.shape[0]
    wrap = np.arange(-max_shift, max_shift + 1) % n
    width = len(wrap)
    scores = np.empty(len(rotations))
    shifts = np.empty((len(rotations), 3))
    batch = max(1, ALIGN_BATCH_BYTES // (4 * n**3))
    out = np.empty((min(batch, len(rotations)), n, n, n), dtype=np.float32)
    # The rule's thread count (set on Numba by the scripts), not every core of the node.
    workers = numba.get_num_threads()
    for lo in range(0, len(rotations), batch):
        chunk = rotations[lo:lo + batch]
        # _affine's matrices and offsets (no shift) for the whole chunk.
        rts = np.ascontiguousarray(chunk.transpose(0, 2, 1)[:, ::-1, ::-1])
        offsets = n // 2 - rts.sum(axis=2) * (n // 2)
        turned = out[:len(chunk)]
        _align_kernels.turn_batch(moving, rts, offsets, turned)
        spectra = sfft.rfftn(turned, axes=(1, 2, 3), workers=workers)
        cc = sfft.irfftn(spectra * reference_ft, s=(n, n, n), axes=(1, 2, 3), workers=workers)
        window = cc[:, wrap][:, :, wrap][:, :, :, wrap].reshape(len(chunk), -1)
        best = np.argmax(window, axis=1)
        scores[lo:lo + len(chunk)] = window[np.arange(len(chunk)), best]
        z, y, x = np.unravel_index(best, (width,) * 3)
        shifts[lo:lo + len(chunk)] = -(np.stack([x, y, z], axis=1) - max_shift)
    return scores, shifts


def _distinct(order, flipped, rotations, count, separation_deg):
    """The first ``count`` of ``order`` (candidate indices, best first) that are not within
    ``separation_deg`` of a better one of the same hand: the search grid's neighbours of one
    peak would otherwise take every refinement."""
    chosen = []
    for i in order:
        if all(flipped[i] != flipped[j]
               or np.degrees(Rotation.from_matrix(rotations[i] @ rotations[j].T).magnitude())
               > separation_deg for j in chosen):
            chosen.append(i)
            if len(chosen) == count:
                break
    return chosen


def _refine(moving, reference, rotation, shift_px, maxiter, ftol):
    """Local maximum of ``sum(turned moving * reference)`` from ``(rotation, shift_px)``.

    L-BFGS on the six parameters with the exact gradient of the trilinear sum (one pass over
    the box gives both). The rotation is a rotation vector composed with the start's, in units
    of the motion (px) it gives at a quarter of the box from the centre, so that rotations and
    shifts share a scale. Returns ``(rotation, shift_px, correlation)``.
    """
    n = reference.shape[0]
    arm = n / 4
    perm = [2, 1, 0]
    partial = np.empty((n, 13))
    kernel = (_align_kernels.turned_dot if n >= PARALLEL_BOX
              else _align_kernels.turned_dot_serial)

    def turned(p):
        return Rotation.from_rotvec(p[:3] / arm).as_matrix() @ rotation

    def rt_of(p):
        return turned(p).T[np.ix_(perm, perm)]

    def cost(p):
        rt, offset = _affine(turned(p), p[3:], n)
        sums = kernel(moving, reference, rt, offset, float(n // 2), partial)
        g, m = sums[1:4], sums[4:].reshape(3, 3)
        t = p[3:][perm]
        d_rt = m - np.outer(g, t)
        grad = np.empty(6)
        grad[3:] = (-rt.T @ g)[perm]
        h = 1e-5
        for k in range(3):
            e = np.zeros(6)
            e[k] = h
            grad[k] = np.sum(d_rt * (rt_of(p + e) - rt_of(p - e))) / (2 * h)
        return -sums[0], -grad

    p0 = np.concatenate([np.zeros(3), shift_px])
    # The gradient jumps where a sample crosses a voxel's face, so the line search may stop
    # short of a tolerance: either way the point reached is kept.
    fit = optimize.minimize(cost, p0, jac=True, method="L-BFGS-B",
                            options={"maxiter": maxiter, "maxfun": 2 * maxiter, "ftol": ftol,
                                     "gtol": 1e-9, "maxls": MAX_LINE_SEARCH})
    return turned(fit.x), fit.x[3:].copy(), -float(fit.fun)


def _working(volume, box, flipped=False):
    """The map (mirrored along z if ``flipped``) Fourier-cropped to ``box``, zero-mean, unit
    norm, float32."""
    v = volume[::-1] if flipped else volume
    if box < v.shape[0]:
        v = fourier_crop_3d(v, box)
    return _normalise(np.asarray(v, dtype=np.float64)).astype(np.float32)


def find_alignment(moving: np.ndarray, reference: np.ndarray, pixel_size: float,
                   step_deg: float = 15.0, n_refine: int = 3) -> Alignment:
    """Rotation, shift and hand that best superimpose ``moving`` on ``reference`` (same box).

    Parameters
    ----------
    moving, reference : (n, n, n) array
        Maps in one box, at ``pixel_size`` A.
    pixel_size : float
        Voxel size (A); the search works in voxels.
    step_deg : float
        Step of the global search's rotation grid.
    n_refine : int
        Distinct candidates of the global search refined locally.

    Returns
    -------
    Alignment
        ``correlation`` is that of the zero-mean, unit-norm maps at the full box.

    Notes
    -----
    The global search runs on maps Fourier-cropped to ~24 px (enough for ~12-degree steps at
    the particle's edge) over a ``step_deg`` grid for both hands, each rotation's translation
    from an FFT cross-correlation. The best ``n_refine`` distinct candidates (more than
    ``1.5 step_deg`` apart) are refined on the search's maps, those within ``REFINE_LEVELS``'
    margin of the best again on maps cropped to ``REFINE_BOX`` px (within ~0.2 degrees of the
    full box's optimum on the demo maps), on boxes over ``SETTLE_BOX`` px those again at that
    box, and the best one is polished at the full box: the
    objective there, and the ``correlation`` returned, are the full-box correlation of the
    one-at-a-time search this replaces (same rotations within 0.04 degrees on the demo pairs).
    """
    # The search calls BLAS only on small arrays, and BLAS threads left spinning between those
    # calls took the cores from the Numba passes: 10 s against 5 s per 64-px alignment on 2
    # busy cores.
    with _blas_controller().limit(limits=1, user_api="blas"):
        return _find_alignment(moving, reference, step_deg, n_refine)


@functools.cache
def _blas_controller() -> ThreadpoolController:
    """One controller for the process: building one scans every loaded library."""
    return ThreadpoolController()


def _find_alignment(moving, reference, step_deg, n_refine):
    n = reference.shape[0]
    small = min(n - n % 2, SEARCH_BOX)
    ref_s = _working(reference, small)
    ref_ft = np.conj(sfft.rfftn(ref_s, workers=numba.get_num_threads()))
    rotations = search_rotations(step_deg)
    scores, shifts, hands = [], [], []
    for flipped in (False, True):
        sc, sh = _global_search(_working(moving, small, flipped), ref_ft, rotations, small // 4)
        scores.append(sc)
        shifts.append(sh)
        hands.append(np.full(len(rotations), flipped))
    scores, shifts, hands = np.concatenate(scores), np.concatenate(shifts), np.concatenate(hands)
    both = np.concatenate([rotations, rotations])
    # Stable, so ties keep the grid's order as the one-rotation-at-a-time search did.
    order = np.argsort(-scores, kind="stable")
    chosen = _distinct(order, hands, both, n_refine, 1.5 * step_deg)

    # Refinement from coarse to fine: each level starts from the previous one's optima, scaled
    # to its box, and passes on those within its margin of the best (near-ties are settled
    # where the maps have more detail).
    boxes = sorted({small, min(n - n % 2, REFINE_BOX), n})
    levels = [REFINE_LEVELS[min(level, len(REFINE_LEVELS) - 1)] for level in range(len(boxes))]
    if n > SETTLE_BOX > boxes[-2]:
        boxes.insert(-1, SETTLE_BOX)
        levels.insert(-1, SETTLE_LEVEL)
    found = [(float(scores[i]), bool(hands[i]), both[i], shifts[i]) for i in chosen]
    box = small
    for next_box, (maxiter, ftol, margin) in zip(boxes, levels):
        if next_box == n:
            margin = 0.0
        ref_l = _working(reference, next_box)
        mov_l = {hand: _working(moving, next_box, hand) for hand in {c[1] for c in found}}
        refined = []
        for _, flipped, rotation, shift in found:
            r, t, c = _refine(mov_l[flipped], ref_l, rotation, shift * next_box / box,
                              maxiter, ftol)
            refined.append((c, flipped, r, t))
        best = max(c[0] for c in refined)
        found = sorted((c for c in refined if c[0] >= best - margin), key=lambda c: -c[0])
        box = next_box
    correlation, flipped, rotation, shift = found[0]
    return Alignment(rotation, shift, flipped, correlation)


def fsc_after_alignment(volume: np.ndarray, reference: np.ndarray, pixel_size: float,
                        mask=None):
    """Align ``volume`` to ``reference``, then their FSC.

    Returns ``(alignment, freq (1/A), fsc, resolution at 0.143 in A)``.
    """
    alignment = find_alignment(volume, reference, pixel_size)
    aligned = apply_alignment(volume, alignment)
    freq, curve = fsc(aligned, reference, pixel_size, mask=mask)
    return alignment, freq, curve, resolution_at(freq, curve, 0.143)
