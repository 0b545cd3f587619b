"""Numba kernel of known-pose insertion (``cryoday.reconstruct.insert``).

Each pose inserts ``CTF x`` into the numerator and ``CTF^2`` into the denominator at the same
trilinear corners. Two calls of the slice adjoint (``projection._scatter_trilinear``) computed
every corner twice and kept the real denominator in complex cubes: twice the cube memory
(1.1 GB for its accumulators at a 128-px box) and the work. One pass does both, the
denominator in float64.
"""

from __future__ import annotations

import numba
import numpy as np

from cryoday import jit
from cryoday.projection import _trilinear_weights


@numba.njit(parallel=True, cache=jit.CACHE, fastmath=jit.FASTMATH)
def insert_pairs(values, weights, centre, rotations, kx, ky, num, den):
    """Scatter ``values`` (complex ``(n_rot, n_coef)``) into ``num`` and ``weights`` (real, the
    same shape) into ``den`` at ``2 A_r^T (kx, ky, 0) + centre``, trilinearly; ``num`` complex128
    and ``den`` float64 are ``(T, m, m, m)``, one cube per thread (summed by the caller), each
    thread taking a contiguous run of the poses. Points outside the cube are dropped."""
    m = num.shape[1]
    n_threads = num.shape[0]
    n_rot = rotations.shape[0]
    n_coef = kx.shape[0]
    chunk = (n_rot + n_threads - 1) // n_threads
    sy = np.uint64(m)
    sz = np.uint64(m * m)
    for t in numba.prange(n_threads):
        acc = num[t].ravel()
        acc_den = den[t].ravel()
        base = np.empty(n_coef, dtype=np.int64)
        fxs = np.empty(n_coef, dtype=np.float64)
        fys = np.empty(n_coef, dtype=np.float64)
        fzs = np.empty(n_coef, dtype=np.float64)
        for r in range(t * chunk, min(n_rot, (t + 1) * chunk)):
            a = rotations[r]
            for k in range(n_coef):
                qx = 2.0 * (a[0, 0] * kx[k] + a[1, 0] * ky[k]) + centre
                qy = 2.0 * (a[0, 1] * kx[k] + a[1, 1] * ky[k]) + centre
                qz = 2.0 * (a[0, 2] * kx[k] + a[1, 2] * ky[k]) + centre
                x0 = np.floor(qx)
                y0 = np.floor(qy)
                z0 = np.floor(qz)
                fxs[k] = qx - x0
                fys[k] = qy - y0
                fzs[k] = qz - z0
                inside = (0 <= x0 and x0 + 1 < m and 0 <= y0 and y0 + 1 < m
                          and 0 <= z0 and z0 + 1 < m)
                base[k] = (np.int64(z0) * m + np.int64(y0)) * m + np.int64(x0) if inside else -1
            for k in range(n_coef):
                if base[k] < 0:
                    continue
                b = np.uint64(base[k])
                v = values[r, k]
                c = weights[r, k]
                w000, w001, w010, w011, w100, w101, w110, w111 = _trilinear_weights(
                    fxs[k], fys[k], fzs[k])
                acc[b] += w000 * v
                acc[b + 1] += w001 * v
                acc[b + sy] += w010 * v
                acc[b + sy + 1] += w011 * v
                acc[b + sz] += w100 * v
                acc[b + sz + 1] += w101 * v
                acc[b + sz + sy] += w110 * v
                acc[b + sz + sy + 1] += w111 * v
                acc_den[b] += w000 * c
                acc_den[b + 1] += w001 * c
                acc_den[b + sy] += w010 * c
                acc_den[b + sy + 1] += w011 * c
                acc_den[b + sz] += w100 * c
                acc_den[b + sz + 1] += w101 * c
                acc_den[b + sz + sy] += w110 * c
                acc_den[b + sz + sy + 1] += w111 * c
