"""Numba kernels of map alignment (``cryoday.align``): maps turned by trilinear interpolation.

Both kernels sample ``volume`` at ``rt @ (z, y, x) + offset`` (array axes, voxels), as
``scipy.ndimage.affine_transform(volume, rt, offset, order=1, mode="constant")`` does: a point
outside the box samples 0. They allocate nothing beyond per-slice accumulators.
"""

from __future__ import annotations

import numba

from cryoday import jit


@numba.njit(cache=jit.CACHE, fastmath=jit.FASTMATH, inline="always")
def _trilinear(volume, z, y, x):
    n0, n1, n2 = volume.shape
    # As ndimage's mode="constant": a point outside [0, n - 1] on any axis samples 0.
    if not (0.0 <= z <= n0 - 1 and 0.0 <= y <= n1 - 1 and 0.0 <= x <= n2 - 1):
        return 0.0
    z0, y0, x0 = min(int(z), n0 - 2), min(int(y), n1 - 2), min(int(x), n2 - 2)
    dz, dy, dx = z - z0, y - y0, x - x0
    c00 = volume[z0, y0, x0] * (1.0 - dx) + volume[z0, y0, x0 + 1] * dx
    c01 = volume[z0, y0 + 1, x0] * (1.0 - dx) + volume[z0, y0 + 1, x0 + 1] * dx
    c10 = volume[z0 + 1, y0, x0] * (1.0 - dx) + volume[z0 + 1, y0, x0 + 1] * dx
    c11 = volume[z0 + 1, y0 + 1, x0] * (1.0 - dx) + volume[z0 + 1, y0 + 1, x0 + 1] * dx
    return ((c00 * (1.0 - dy) + c01 * dy) * (1.0 - dz)
            + (c10 * (1.0 - dy) + c11 * dy) * dz)


@numba.njit(parallel=True, cache=jit.CACHE, fastmath=jit.FASTMATH)
def turn_batch(volume, rts, offsets, out):
    """``out[b] = volume`` sampled at ``rts[b] @ (z, y, x) + offsets[b]``, every ``b``.

    Parameters
    ----------
    volume : (n, n, n) float32
    rts : (B, 3, 3) float64
        Array-axis matrices (``_transform``'s ``R^T`` permuted to (z, y, x)).
    offsets : (B, 3) float64
    out : (B, n, n, n) float32
        Written in place.
    """
    n_batch, n = out.shape[0], out.shape[1]
    for i in numba.prange(n_batch * n):
        k, z = i // n, i % n
        rt = rts[k]
        for y in range(n):
            bz = rt[0, 0] * z + rt[0, 1] * y + offsets[k, 0]
            by = rt[1, 0] * z + rt[1, 1] * y + offsets[k, 1]
            bx = rt[2, 0] * z + rt[2, 1] * y + offsets[k, 2]
            for x in range(n):
                out[k, z, y, x] = _trilinear(volume, bz + rt[0, 2] * x, by + rt[1, 2] * x,
                                             bx + rt[2, 2] * x)


@numba.njit(cache=jit.CACHE, fastmath=jit.FASTMATH, inline="always")
def _trilinear_grad(volume, z, y, x):
    """The trilinear value at (z, y, x) (0 outside, as ``_trilinear``) and its derivatives along
    z, y, x (those of the cell's polynomial; 0 outside)."""
    n0, n1, n2 = volume.shape
    if not (0.0 <= z <= n0 - 1 and 0.0 <= y <= n1 - 1 and 0.0 <= x <= n2 - 1):
        return 0.0, 0.0, 0.0, 0.0
    z0, y0, x0 = min(int(z), n0 - 2), min(int(y), n1 - 2), min(int(x), n2 - 2)
    dz, dy, dx = z - z0, y - y0, x - x0
    v000, v001 = volume[z0, y0, x0], volume[z0, y0, x0 + 1]
    v010, v011 = volume[z0, y0 + 1, x0], volume[z0, y0 + 1, x0 + 1]
    v100, v101 = volume[z0 + 1, y0, x0], volume[z0 + 1, y0, x0 + 1]
    v110, v111 = volume[z0 + 1, y0 + 1, x0], volume[z0 + 1, y0 + 1, x0 + 1]
    e00, e01, e10, e11 = v001 - v000, v011 - v010, v101 - v100, v111 - v110
    c00 = v000 + e00 * dx
    c01 = v010 + e01 * dx
    c10 = v100 + e10 * dx
    c11 = v110 + e11 * dx
    c0 = c00 + (c01 - c00) * dy
    c1 = c10 + (c11 - c10) * dy
    e0 = e00 + (e01 - e00) * dy
    e1 = e10 + (e11 - e10) * dy
    return (c0 + (c1 - c0) * dz, c1 - c0, (c01 - c00) + ((c11 - c10) - (c01 - c00)) * dz,
            e0 + (e1 - e0) * dz)


def _turned_dot(volume, reference, rt, offset, centre, partial):
    """``sum_x reference(x) volume(q(x))`` with ``q(x) = rt @ x + offset`` (array axes), and the
    sums its derivatives need, accumulated in float64 per z slice.

    Parameters
    ----------
    volume, reference : (n, n, n) float32
    rt : (3, 3) float64
    offset : (3,) float64
    centre : float
        ``c`` of ``M``'s ``x - c`` (the box's centre voxel).
    partial : (n, 13) float64
        Per slice, written in place: the sum, ``G = sum r grad(q)`` (3) and
        ``M = sum r grad(q) (x - c)^T`` (3 x 3, row-major).

    Returns
    -------
    (13,) float64
        ``partial`` summed over slices.
    """
    n = reference.shape[0]
    for z in numba.prange(n):
        wz = z - centre
        f = 0.0
        gz_z = gz_y = gz_x = gy_z = gy_y = gy_x = gx_z = gx_y = gx_x = 0.0
        for y in range(n):
            wy = y - centre
            bz = rt[0, 0] * z + rt[0, 1] * y + offset[0]
            by = rt[1, 0] * z + rt[1, 1] * y + offset[1]
            bx = rt[2, 0] * z + rt[2, 1] * y + offset[2]
            # Per row: x - c enters M linearly, so its sums over the row are kept apart.
            rgz = rgy = rgx = rgz_x = rgy_x = rgx_x = 0.0
            for x in range(n):
                r = reference[z, y, x]
                if r == 0.0:
                    continue
                value, dz, dy, dx = _trilinear_grad(volume, bz + rt[0, 2] * x,
                                                    by + rt[1, 2] * x, bx + rt[2, 2] * x)
                wx = x - centre
                f += r * value
                rgz += r * dz
                rgy += r * dy
                rgx += r * dx
                rgz_x += r * dz * wx
                rgy_x += r * dy * wx
                rgx_x += r * dx * wx
            gz_z += rgz
            gy_z += rgy
            gx_z += rgx
            gz_y += rgz * wy
            gy_y += rgy * wy
            gx_y += rgx * wy
            gz_x += rgz_x
            gy_x += rgy_x
            gx_x += rgx_x
        row = partial[z]
        row[0] = f
        # The slice's sums of r grad: G, then M's column of z - c (the same sums times wz).
        row[1], row[2], row[3] = gz_z, gy_z, gx_z
        row[4], row[5], row[6] = gz_z * wz, gz_y, gz_x
        row[7], row[8], row[9] = gy_z * wz, gy_y, gy_x
        row[10], row[11], row[12] = gx_z * wz, gx_y, gx_x
    return partial.sum(axis=0)


# One body, two builds: a one-core pass over a small box costs less than waking the threads
# (and much less on a busy machine, where a parallel region waits for its slowest thread).
turned_dot = numba.njit(parallel=True, cache=jit.CACHE, fastmath=jit.FASTMATH)(_turned_dot)
turned_dot_serial = numba.njit(cache=jit.CACHE, fastmath=jit.FASTMATH)(_turned_dot)
