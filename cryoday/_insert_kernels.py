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
from cryoday.projection import _add_at_corners, _scatter_corners, _trilinear_weights


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
            _scatter_corners(a, kx, ky, centre, m, base, fxs, fys, fzs)
            for k in range(n_coef):
                if base[k] < 0:
                    continue
                b = np.uint64(base[k])
                weights_k = _trilinear_weights(fxs[k], fys[k], fzs[k])
                _add_at_corners(acc, b, sy, sz, weights_k, values[r, k])
                _add_at_corners(acc_den, b, sy, sz, weights_k, weights[r, k])
