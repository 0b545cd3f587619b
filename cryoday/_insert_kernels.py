"""Numba kernels of known-pose insertion (``cryoday.reconstruct.insert``).

Each pose inserts ``w CTF x`` (phase-shifted) into the numerator and ``w CTF^2`` into the
denominator at the same trilinear corners, in one pass. The sums sit side by side per voxel in
float32 cubes, one per thread, which are added into double precision every few thousand poses:
insertion is bound by the cube's memory (~50 ns per coefficient at a 128-px box), and this
touches half the bytes and half the cache lines of separate complex128 and float64 cubes.
"""

from __future__ import annotations

import numba
import numpy as np

from cryoday import jit
from cryoday.projection import _scatter_corners


@numba.njit(cache=jit.CACHE, fastmath=jit.FASTMATH, inline="always")
def _add_triple(cube, o, g, re, im, weight):
    cube[o] += g * re
    cube[o + 1] += g * im
    cube[o + 2] += g * weight


@numba.njit(parallel=True, cache=jit.CACHE, fastmath=jit.FASTMATH)
def insert_images(data, ctf, image_of, shifts, weights, rotations, kx, ky, ix, iy, box, centre,
                  acc):
    """Insert poses of a chunk's images: pose ``r`` of image ``image_of[r]`` (rows of ``data``,
    complex64 coefficients, and ``ctf``, float32), shifted by ``shifts[r]`` (px) and weighted by
    ``weights[r]``, scatters ``w CTF x e^{-2 pi i k.t / box}`` and ``w CTF^2`` at its slice.

    ``acc`` ``(T, m, m, m, 4)`` float32 holds per thread, for each voxel, the numerator's real and
    imaginary parts and the denominator side by side: a corner is one cache line, not one in
    each of two cubes, and half the bytes of double precision. The caller adds it into double
    precision cubes every few thousand poses (:func:`flush`). ``ix``, ``iy`` are ``kx, ky`` as
    indices of a ``box``-long table (``k + box // 2``): the shift's phase is the product of two
    tables of ``box`` values a pose, not a complex exponential per coefficient. Per pose, a
    first loop forms the values (it vectorises), the second scatters them. Each thread takes a
    contiguous run of the poses (given in locality order, its planes overlap in cache)."""
    m = acc.shape[1]
    n_threads = acc.shape[0]
    n_pose = rotations.shape[0]
    n_coef = kx.shape[0]
    chunk = (n_pose + n_threads - 1) // n_threads
    sy = np.uint64(4 * m)
    sz = np.uint64(4 * m * m)
    four = np.uint64(4)
    one = np.float32(1)
    for t in numba.prange(n_threads):
        cube = acc[t].ravel()
        base = np.empty(n_coef, dtype=np.int64)
        fxs = np.empty(n_coef, dtype=np.float64)
        fys = np.empty(n_coef, dtype=np.float64)
        fzs = np.empty(n_coef, dtype=np.float64)
        value_re = np.empty(n_coef, dtype=np.float32)
        value_im = np.empty(n_coef, dtype=np.float32)
        value_weight = np.empty(n_coef, dtype=np.float32)
        phase_x_re = np.empty(box, dtype=np.float32)
        phase_x_im = np.empty(box, dtype=np.float32)
        phase_y_re = np.empty(box, dtype=np.float32)
        phase_y_im = np.empty(box, dtype=np.float32)
        for r in range(t * chunk, min(n_pose, (t + 1) * chunk)):
            _scatter_corners(rotations[r], kx, ky, centre, m, base, fxs, fys, fzs)
            step_x = -2.0 * np.pi * shifts[r, 0] / box
            step_y = -2.0 * np.pi * shifts[r, 1] / box
            for j in range(box):
                k = j - box // 2
                phase_x_re[j] = np.cos(step_x * k)
                phase_x_im[j] = np.sin(step_x * k)
                phase_y_re[j] = np.cos(step_y * k)
                phase_y_im[j] = np.sin(step_y * k)
            i = image_of[r]
            w = np.float32(weights[r])
            for k in range(n_coef):
                a = ix[k]
                b = iy[k]
                p_re = phase_x_re[a] * phase_y_re[b] - phase_x_im[a] * phase_y_im[b]
                p_im = phase_x_re[a] * phase_y_im[b] + phase_x_im[a] * phase_y_re[b]
                c = ctf[i, k] * w
                d = data[i, k]
                value_re[k] = (d.real * p_re - d.imag * p_im) * c
                value_im[k] = (d.real * p_im + d.imag * p_re) * c
                value_weight[k] = c * ctf[i, k]
            for k in range(n_coef):
                if base[k] < 0:
                    continue
                o = np.uint64(base[k]) * four
                fx = np.float32(fxs[k])
                fy = np.float32(fys[k])
                fz = np.float32(fzs[k])
                gx = one - fx
                gy = one - fy
                gz = one - fz
                re = value_re[k]
                im = value_im[k]
                weight = value_weight[k]
                _add_triple(cube, o, gz * gy * gx, re, im, weight)
                _add_triple(cube, o + four, gz * gy * fx, re, im, weight)
                _add_triple(cube, o + sy, gz * fy * gx, re, im, weight)
                _add_triple(cube, o + sy + four, gz * fy * fx, re, im, weight)
                _add_triple(cube, o + sz, fz * gy * gx, re, im, weight)
                _add_triple(cube, o + sz + four, fz * gy * fx, re, im, weight)
                _add_triple(cube, o + sz + sy, fz * fy * gx, re, im, weight)
                _add_triple(cube, o + sz + sy + four, fz * fy * fx, re, im, weight)


@numba.njit(parallel=True, cache=jit.CACHE)
def flush(acc, num, den):
    """Add every thread's float32 sums of ``acc`` (``insert_images``') into ``num`` (complex128)
    and ``den`` (float64) ``(m, m, m)``, and zero ``acc``."""
    m = num.shape[0]
    for z in numba.prange(m):
        for t in range(acc.shape[0]):
            for y in range(m):
                for x in range(m):
                    num[z, y, x] += complex(acc[t, z, y, x, 0], acc[t, z, y, x, 1])
                    den[z, y, x] += acc[t, z, y, x, 2]
                    acc[t, z, y, x, 0] = 0
                    acc[t, z, y, x, 1] = 0
                    acc[t, z, y, x, 2] = 0
