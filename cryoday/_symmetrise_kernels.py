"""Numba kernel that symmetrises known-pose insertion sums (``cryoday.reconstruct.symmetrise``).

Inserting an image at the ``|G|`` equivalents ``A g`` of its pose puts its values at ``g^T q``
wherever the pose alone puts them at ``q``: the expanded sums are ``sum_g S(g p)`` of the
unexpanded ones. RELION's ``BackProjector::applyPointGroupSymmetry`` forms that sum once, by
trilinear lookup, instead of inserting every pose ``|G|`` times; this kernel does the same on
the Hermitian-completed cubes, over one half of the cube (the other half is its mirror).
"""

from __future__ import annotations

import numba
import numpy as np

from cryoday import jit


@numba.njit(parallel=True, cache=jit.CACHE)
def _packed(num, den):
    """``num`` and ``den`` side by side per voxel in float32 (``(m, m, m, 4)``, the last slot
    unused): a trilinear corner pair is one cache line, not four in two cubes. The sums are
    float32 sums of a few thousand poses each already (``reconstruct.FLUSH_POSES_PER_THREAD``)."""
    m = num.shape[0]
    out = np.zeros((m, m, m, 4), dtype=np.float32)
    for iz in numba.prange(m):
        for iy in range(m):
            for ix in range(m):
                out[iz, iy, ix, 0] = num[iz, iy, ix].real
                out[iz, iy, ix, 1] = num[iz, iy, ix].imag
                out[iz, iy, ix, 2] = den[iz, iy, ix]
    return out


@numba.njit(cache=jit.CACHE, fastmath=jit.FASTMATH, inline="always")
def _corner_sum(packed, o, sx, sy, sz, fx, fy, fz, slot):
    gx = 1.0 - fx
    gy = 1.0 - fy
    return ((1.0 - fz) * (gy * (gx * packed[o + slot] + fx * packed[o + sx + slot])
                          + fy * (gx * packed[o + sy + slot] + fx * packed[o + sy + sx + slot]))
            + fz * (gy * (gx * packed[o + sz + slot] + fx * packed[o + sz + sx + slot])
                    + fy * (gx * packed[o + sz + sy + slot]
                            + fx * packed[o + sz + sy + sx + slot])))


@numba.njit(parallel=True, cache=jit.CACHE, fastmath=jit.FASTMATH)
def symmetrise_cubes(num, den, ops, centre, rmax, num_out, den_out):
    """``num_out[p] = sum_g num[g p]`` and likewise ``den_out`` for every voxel ``p`` (vector
    ``(x, y, z)`` from ``centre``; the cubes are indexed ``[z, y, x]``) within ``rmax`` voxels of
    the centre, zero beyond; ``ops`` ``(G, 3, 3)`` acts on ``(x, y, z)``. ``num`` must be
    Hermitian (``num[-p] = conj num[p]``): the half ``z >= centre`` is computed, the rest
    mirrored. Corners outside the cube count as zero; the lookups read float32 copies of the
    cubes (:func:`_packed`, made before anything is written) and sum in double precision, so
    ``num_out`` and ``den_out`` may be ``num`` and ``den`` themselves.

    A row of voxels is looked up one op at a time: along the row each op's points step by one
    voxel through the cube, so consecutive lookups share cache lines."""
    m = num.shape[0]
    n_ops = ops.shape[0]
    r2 = rmax * rmax
    c = np.int64(centre)
    packed = _packed(num, den).ravel()
    sx = np.int64(4)
    sy = np.int64(4 * m)
    sz = np.int64(4 * m * m)
    n_rows = (m - c) * m
    for row in numba.prange(n_rows):
        iz = c + row // m
        iy = row % m
        z = np.float64(iz - c)
        y = np.float64(iy - c)
        num_out[iz, iy, :] = 0
        den_out[iz, iy, :] = 0
        room = r2 - y * y - z * z
        if room < 0:
            continue
        half_width = np.int64(np.floor(np.sqrt(room)))
        lo = max(c - half_width, 0)
        hi = min(c + half_width + 1, m)
        acc_re = np.zeros(hi - lo)
        acc_im = np.zeros(hi - lo)
        acc_den = np.zeros(hi - lo)
        for g in range(n_ops):
            # q = g p + centre, p = (x, y, z): linear in x along the row.
            bx = ops[g, 0, 1] * y + ops[g, 0, 2] * z + centre
            by = ops[g, 1, 1] * y + ops[g, 1, 2] * z + centre
            bz = ops[g, 2, 1] * y + ops[g, 2, 2] * z + centre
            dx = ops[g, 0, 0]
            dy = ops[g, 1, 0]
            dz = ops[g, 2, 0]
            for j in range(hi - lo):
                x = np.float64(lo + j - c)
                qx = bx + dx * x
                qy = by + dy * x
                qz = bz + dz * x
                x0 = np.int64(np.floor(qx))
                y0 = np.int64(np.floor(qy))
                z0 = np.int64(np.floor(qz))
                fx = qx - x0
                fy = qy - y0
                fz = qz - z0
                if 0 <= x0 and x0 + 1 < m and 0 <= y0 and y0 + 1 < m and 0 <= z0 \
                        and z0 + 1 < m:
                    o = z0 * sz + y0 * sy + x0 * sx
                    acc_re[j] += _corner_sum(packed, o, sx, sy, sz, fx, fy, fz, 0)
                    acc_im[j] += _corner_sum(packed, o, sx, sy, sz, fx, fy, fz, 1)
                    acc_den[j] += _corner_sum(packed, o, sx, sy, sz, fx, fy, fz, 2)
                    continue
                for corner in range(8):  # at the cube's faces: the corners inside only
                    xx = x0 + (corner & 1)
                    yy = y0 + ((corner >> 1) & 1)
                    zz = z0 + ((corner >> 2) & 1)
                    if xx < 0 or xx >= m or yy < 0 or yy >= m or zz < 0 or zz >= m:
                        continue
                    w = ((fx if corner & 1 else 1.0 - fx) * (fy if corner & 2 else 1.0 - fy)
                         * (fz if corner & 4 else 1.0 - fz))
                    o = zz * sz + yy * sy + xx * sx
                    acc_re[j] += w * packed[o]
                    acc_im[j] += w * packed[o + 1]
                    acc_den[j] += w * packed[o + 2]
        for j in range(hi - lo):
            num_out[iz, iy, lo + j] = acc_re[j] + 1j * acc_im[j]
            den_out[iz, iy, lo + j] = acc_den[j]
    last = m - 1
    for iz in numba.prange(c):
        for iy in range(m):
            for ix in range(m):
                num_out[iz, iy, ix] = np.conj(num_out[last - iz, last - iy, last - ix])
                den_out[iz, iy, ix] = den_out[last - iz, last - iy, last - ix]
