"""Numba kernel of the posterior store's update: each image's posterior mass per grid direction,
in-plane angle and shift, from the likelihood's posteriors over its importance sample.

An image's rotations are the product of its direction and in-plane sets (direction-major, the
order of ``LikelihoodResult.rot_post``). Built with NumPy, the marginals first spelled out the
product's grid indices and log weights (three arrays the size of the sample), then took three
``bincount`` passes over flattened ``(image, point)`` bins: at a 20 A stage, 9% of the stage.
Here each image walks its own product once and adds into its own rows, images in parallel, in
the same order as ``bincount`` (so the sums are the same, up to the exponential's last bit).

The same walk keeps each image's ``k`` heaviest rotations, the joint (direction, in-plane)
points the final map inserts: the product of the two marginals' top points spreads an image's
mass over pairs it never had (docs/refine.md measured the joint points' map better).
"""

from __future__ import annotations

import numba
import numpy as np

from cryoday import jit


@numba.njit(cache=jit.CACHE, inline="always")
def _lightest(masses, k):
    """Position of the smallest of the first ``k`` of ``masses``."""
    low = 0
    for i in range(1, k):
        if masses[i] < masses[low]:
            low = i
    return low


@numba.njit(parallel=True, cache=jit.CACHE)
def _rotation_marginals(dir_offsets, dir_index, dir_logw, inp_offsets, inp_index, inp_logw,
                        rot_offsets, rot_post, rot_log_weights, n_inp, p_dir, p_inp,
                        top_dir, top_inp, top_mass):
    k = top_mass.shape[1]
    for b in numba.prange(len(dir_offsets) - 1):
        i = rot_offsets[b]
        filled = 0
        low = 0
        for a in range(dir_offsets[b], dir_offsets[b + 1]):
            d = dir_index[a]
            for c in range(inp_offsets[b], inp_offsets[b + 1]):
                j = inp_index[c]
                # The grid's weight over the proposal's: the true posterior mass at the point.
                mass = rot_post[i] * np.exp(rot_log_weights[d * n_inp + j]
                                            - (dir_logw[a] + inp_logw[c]))
                p_dir[b, d] += mass
                p_inp[b, j] += mass
                i += 1
                if k == 0:
                    continue
                if filled < k:
                    slot = filled
                    filled += 1
                elif mass > top_mass[b, low]:  # a NaN mass never enters
                    slot = low
                else:
                    continue
                top_dir[b, slot] = d
                top_inp[b, slot] = j
                top_mass[b, slot] = mass
                if filled == k:
                    low = _lightest(top_mass[b], k)


@numba.njit(parallel=True, cache=jit.CACHE)
def _shift_marginals(shift_offsets, shift_index, shift_logw, shift_post, shift_log_weights,
                     p_shift):
    for b in numba.prange(len(shift_offsets) - 1):
        for i in range(shift_offsets[b], shift_offsets[b + 1]):
            s = shift_index[i]
            p_shift[b, s] += shift_post[i] * np.exp(shift_log_weights[s] - shift_logw[i])


def marginals(grid, subsets, rot_post: np.ndarray, shift_post: np.ndarray):
    """Each image's posterior mass per grid direction, in-plane angle and shift: float64
    ``(B, n_dir)``, ``(B, n_inp)``, ``(B, n_shift)``; :func:`marginals_and_top_rotations`
    with no rotations kept.

    The posterior at a grid point is gamma divided by the importance correction ``c / (M q)``,
    i.e. ``gamma W / exp(logw)``: the true posterior mass at that point.

    Parameters
    ----------
    grid : cryoday.quadrature.PoseGrid
    subsets : PoseSubsets the posteriors were evaluated on
    rot_post, shift_post : the likelihood's posteriors over ``subsets``' rotations and shifts
    """
    return marginals_and_top_rotations(grid, subsets, rot_post, shift_post, 0)[:3]


def marginals_and_top_rotations(grid, subsets, rot_post: np.ndarray, shift_post: np.ndarray,
                                k: int):
    """:func:`marginals`, and each image's ``k`` rotations of most posterior mass.

    Returns
    -------
    p_dir, p_inp, p_shift : as :func:`marginals`
    top : ``(dir_index, inp_index, mass)``, each ``(B, k)``: the rotations' grid direction and
        in-plane indices and their (unnormalised) masses, in no particular order; an image
        with fewer than ``k`` rotations has index -1 and mass 0 in the slots left. Among equal
        masses which are kept is unspecified.
    """
    n_images = subsets.n_images
    p_dir = np.zeros((n_images, grid.n_dir))
    p_inp = np.zeros((n_images, grid.n_inp))
    p_shift = np.zeros((n_images, grid.n_shift))
    top_dir = np.full((n_images, k), -1, np.int64)
    top_inp = np.full((n_images, k), -1, np.int64)
    top_mass = np.zeros((n_images, k))
    f64 = np.float64
    _rotation_marginals(
        subsets.dir_offsets, subsets.dir_index, np.asarray(subsets.dir_logw, f64),
        subsets.inp_offsets, subsets.inp_index, np.asarray(subsets.inp_logw, f64),
        subsets.rot_offsets, np.asarray(rot_post, f64),
        np.asarray(grid.rot_log_weights, f64), int(grid.n_inp), p_dir, p_inp,
        top_dir, top_inp, top_mass)
    _shift_marginals(subsets.shift_offsets, subsets.shift_index,
                     np.asarray(subsets.shift_logw, f64), np.asarray(shift_post, f64),
                     np.asarray(grid.shift_log_weights, f64), p_shift)
    return p_dir, p_inp, p_shift, (top_dir, top_inp, top_mass)
