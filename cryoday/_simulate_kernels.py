"""Numba kernels of the simulator's projector (private; see :mod:`cryoday.simulate`).

Kernels allocate nothing and take contiguous arrays; the public wrappers in ``simulate.py``
validate, cast and allocate.
"""

from __future__ import annotations

import numba
import numpy as np

from cryoday import jit


@numba.njit(cache=jit.CACHE, fastmath=jit.FASTMATH, inline="always")
def _keys(t):
    """Keys' cubic convolution kernel (a = -0.5) at offset ``t`` (grid units), support [-2, 2]."""
    t = abs(t)
    if t < 1.0:
        return (1.5 * t - 2.5) * t * t + 1.0
    if t < 2.0:
        return ((-0.5 * t + 2.5) * t - 4.0) * t + 2.0
    return 0.0


@numba.njit(parallel=True, cache=jit.CACHE, fastmath=jit.FASTMATH)
def slice_cubic(spectrum, rotations, box, out):
    """Central slices of a 2x zero-padded centred spectrum, cubic (Keys) interpolation.

    Parameters
    ----------
    spectrum : (m, m, m) complex64 (or complex128), C-contiguous
        Centred transform of the volume zero-padded to ``m = 2 * box`` (index ``[z, y, x]``).
    rotations : (n, 3, 3) float64
        RELION matrices ``A``; image frequency ``(kx, ky, 0)`` samples ``A^T (kx, ky, 0)``.
    box : int
        Image size N; image Fourier index ``k = i - N // 2`` maps to padded index ``2 k + m // 2``.
    out : (n, box, box) complex128
        Written in place (unscaled slice values).
    """
    m = spectrum.shape[0]
    centre = m // 2
    half = box // 2
    for r in numba.prange(rotations.shape[0]):
        a = rotations[r]
        wx = np.empty(4)
        wy = np.empty(4)
        wz = np.empty(4)
        for iy in range(box):
            ky = iy - half
            for ix in range(box):
                kx = ix - half
                # Frequency (kx, ky, 0) in the image frame is A^T (kx, ky, 0) in the volume's;
                # the factor 2 is the padding.
                qx = 2.0 * (a[0, 0] * kx + a[1, 0] * ky) + centre
                qy = 2.0 * (a[0, 1] * kx + a[1, 1] * ky) + centre
                qz = 2.0 * (a[0, 2] * kx + a[1, 2] * ky) + centre
                x0 = int(np.floor(qx)) - 1
                y0 = int(np.floor(qy)) - 1
                z0 = int(np.floor(qz)) - 1
                # Weights once per axis (12 kernel calls instead of 64).
                for d in range(4):
                    wx[d] = _keys(qx - (x0 + d))
                    wy[d] = _keys(qy - (y0 + d))
                    wz[d] = _keys(qz - (z0 + d))
                acc = 0j
                if x0 >= 0 and y0 >= 0 and z0 >= 0 and x0 + 3 < m and y0 + 3 < m and z0 + 3 < m:
                    for dz in range(4):
                        for dy in range(4):
                            w = wz[dz] * wy[dy]
                            row = spectrum[z0 + dz, y0 + dy]
                            acc += w * (wx[0] * row[x0] + wx[1] * row[x0 + 1]
                                        + wx[2] * row[x0 + 2] + wx[3] * row[x0 + 3])
                else:  # only the padded spectrum's edge (corners beyond Nyquist) gets here
                    for dz in range(4):
                        z = z0 + dz
                        if z < 0 or z >= m:
                            continue
                        for dy in range(4):
                            y = y0 + dy
                            if y < 0 or y >= m:
                                continue
                            for dx in range(4):
                                x = x0 + dx
                                if x < 0 or x >= m:
                                    continue
                                acc += wz[dz] * wy[dy] * wx[dx] * spectrum[z, y, x]
                out[r, iy, ix] = acc
