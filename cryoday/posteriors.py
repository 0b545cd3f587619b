"""Log posteriors of poses laid out as columns: their log-sum-exp and normalised posteriors.

The likelihood kernels hold the energies of one image, or of a group of images sharing their
viewing directions, as a ``(n_d, C)`` float32 matrix: a row per direction, a column per
(image, in-plane angle, shift). Every pass here runs along whole rows with per-column
parameters, so its loop is long and vectorises whatever the number of in-plane angles and shifts
per image (one image's ~40 columns per row left a scalar remainder of a sixth of each row).

The exponentials are float32, taken relative to each image's largest log posterior, so every
term lies in [e^-60, 1] (smaller ones are 0); the sums over them are float64. Log posteriors in
float32 carry an absolute error that grows with their size (6e-5 nats at 1,000); against the
float64 version this replaced (128 px at 1/40 A, 40 images, nll ~140 nats) the nll agreed to
1e-7 nats, and the evaluation ran faster. ``tests/reference.py`` has the dense float64 twin.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

from cryoday import jit

F32 = np.float32


@intrinsic
def _float32_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the low 32 bits of the integer ``bits``."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        value = args[0]
        if bits.bitwidth > 32:
            value = builder.trunc(value, ir.IntType(32))
        return builder.bitcast(value, ir.FloatType())

    return types.float32(bits), codegen


@numba.njit(cache=jit.CACHE, fastmath=jit.FASTMATH, inline="always")
def exp32(x):
    """exp(x) for float32 ``x <= 0`` without a library call, so loops calling it vectorise.

    ``x`` is clamped at -87 (e^-87 is still a normal float32); ``x = n ln2 + r`` with
    ``|r| <= ln2 / 2``, the Taylor polynomial of e^r to r^6, times ``2^n`` made from its exponent
    bits: relative error below 1e-6 (tested against numpy.exp). PyPI's llvmlite has no vector
    maths library, and float32 runs twice the lanes of float64.
    """
    y = max(x, F32(-87.0))
    n = np.rint(y * F32(1.4426950408889634))
    # ln2 in two parts (Cody-Waite): n times the first, of 9 significant bits, is exact.
    r = (y - n * F32(0.693359375)) - n * F32(-2.1219444005469057e-4)
    poly = F32(1.0) + r * (F32(1.0) + r * (F32(0.5) + r * (F32(1.0 / 6.0) + r * (
        F32(1.0 / 24.0) + r * (F32(1.0 / 120.0) + r * F32(1.0 / 720.0))))))
    return poly * _float32_from_bits((np.int32(n) + np.int32(127)) << np.int32(23))


@numba.njit(cache=jit.CACHE, fastmath=jit.FASTMATH)
def column_logits(v, norm, norm_col, contiguous, col_lw, col_inv, dir_lw, col_max):
    """In place, ``v[a, c] <- dir_lw[a] + col_lw[c] + (2 v[a, c] - norm[a, q]) col_inv[c]``,
    ``q = norm_col[c]``.

    On entry ``v`` holds the cross terms ``Re sum_k S conj(Z)``; on return the log posteriors
    less each image's constant ``-|d|^2 / (2 s2)``. ``col_inv`` is ``1 / (2 s2)`` of the column's
    image, ``col_max[c]`` gets each column's largest log posterior (NaN if any is NaN).
    ``contiguous`` says ``norm_col[c] == c`` (one shift per in-plane angle), which saves a
    gather per term. A ``norm`` with no columns says ``v`` is already the cross term less half
    the norm term.
    """
    n_c = np.uint64(v.shape[1])
    for c in range(n_c):
        col_max[c] = -np.inf
    # The vectorised maximum drops NaNs (measured: as max() or as a select), so they are counted
    # apart: bad input must surface in the image's nll.
    nans = np.zeros(n_c, dtype=np.int32)
    for a in range(v.shape[0]):
        va = v[a]
        na = norm[a]
        lw = F32(dir_lw[a])
        if norm.shape[1] == 0:  # merged: v is already the cross term less half the norm
            for c in range(n_c):
                x = lw + col_lw[c] + (va[c] + va[c]) * col_inv[c]
                va[c] = x
                col_max[c] = max(col_max[c], x)
                nans[c] += np.isnan(x)
        elif contiguous:
            for c in range(n_c):
                x = lw + col_lw[c] + (va[c] + va[c] - na[c]) * col_inv[c]
                va[c] = x
                col_max[c] = max(col_max[c], x)
                nans[c] += np.isnan(x)
        else:
            for c in range(n_c):
                x = lw + col_lw[c] + (va[c] + va[c] - na[norm_col[c]]) * col_inv[c]
                va[c] = x
                col_max[c] = max(col_max[c], x)
                nans[c] += np.isnan(x)
    for c in range(n_c):
        if nans[c]:
            col_max[c] = np.nan


@numba.njit(cache=jit.CACHE, fastmath=jit.FASTMATH)
def exp_columns(v, col_ref, col_sum):
    """In place, ``v[a, c] <- exp(v[a, c] - col_ref[c])``; ``col_sum[c]`` their float64 sums.

    Terms below e^-60 of the reference are exactly 0: they cannot change a float64 sum, and the
    importance sampler keeps a pose with any posterior mass as a candidate (a floor of e^-87
    everywhere would fill its stored top points with poses of no real mass).
    """
    n_c = np.uint64(v.shape[1])
    for c in range(n_c):
        col_sum[c] = 0.0
    for a in range(v.shape[0]):
        va = v[a]
        for c in range(n_c):
            x = va[c] - col_ref[c]
            e = exp32(x) if x > F32(-60.0) else F32(0.0)
            va[c] = e
            col_sum[c] += e


@numba.njit(cache=jit.CACHE, fastmath=jit.FASTMATH)
def scale_columns(v, col_factor):
    """In place, ``v[a, c] <- v[a, c] col_factor[c]``, flushed to 0 below 1e-30.

    As float32 such values would be subnormal, and GEMMs on subnormals run many times slower.
    """
    n_c = np.uint64(v.shape[1])
    for a in range(v.shape[0]):
        va = v[a]
        for c in range(n_c):
            g = va[c] * col_factor[c]
            va[c] = g if g > F32(1e-30) else F32(0.0)


@numba.njit(cache=jit.CACHE, fastmath=jit.FASTMATH)
def image_maximum(col_max, c0, c1, col_ref):
    """The largest of ``col_max[c0:c1]`` (one image's columns), also written to ``col_ref``;
    NaN if any is: bad input must surface in the image's nll (the exponentials drop it)."""
    m = col_max[c0]
    bad = False
    for c in range(c0, c1):
        m = max(m, col_max[c])
        bad = bad or np.isnan(col_max[c])
    if bad:
        m = np.nan
    col_ref[c0:c1] = m
    return m


@numba.njit(cache=jit.CACHE, fastmath=jit.FASTMATH)
def image_posteriors(e, c0, n_p, n_s, col_max, col_sum, rot_post_i, shift_post_i):
    """One image's marginals from its columns ``c0:c0 + n_p n_s`` of :func:`exp_columns`' output.

    Columns are ordered in-plane angle major, shift minor. Writes the posterior of each
    (direction, in-plane angle), ``rot_post_i[a n_p + p]``, and of each shift. Returns
    ``(sum of the image's exponentials, best direction, best column)``.
    """
    n_cols = n_p * n_s
    best_c = 0
    for c in range(1, n_cols):
        if col_max[c0 + c] > col_max[c0 + best_c]:
            best_c = c
    total = 0.0
    for c in range(n_cols):
        total += col_sum[c0 + c]
    # No posterior mass: a NaN among the image's energies (see image_maximum). NaN marginals
    # then, not a division by zero, which Numba raises as an exception.
    inv_total = 1.0 / total if total > 0.0 else np.nan
    best_a = 0
    col = c0 + best_c
    for a in range(e.shape[0]):
        if e[a, col] > e[best_a, col]:
            best_a = a
    q0 = np.uint64(c0)
    if n_s == 1:
        for a in range(e.shape[0]):
            ea = e[a]
            rot_a = rot_post_i[a * n_p:(a + 1) * n_p]
            for p in range(np.uint64(n_p)):
                rot_a[p] = ea[q0 + p] * inv_total
    else:
        ns = np.uint64(n_s)
        for a in range(e.shape[0]):
            ea = e[a]
            for p in range(np.uint64(n_p)):
                row = 0.0
                for j in range(ns):
                    row += ea[q0 + p * ns + j]
                rot_post_i[a * n_p + p] = row * inv_total
    for j in range(n_s):
        s = 0.0
        for p in range(n_p):
            s += col_sum[c0 + p * n_s + j]
        shift_post_i[j] = s * inv_total
    return total, best_a, best_c


@numba.njit(cache=jit.CACHE, fastmath=jit.FASTMATH)
def sum_over_shifts(gamma, run, gamma_dp):
    """``gamma_dp[a, q]``: the sum of ``gamma[a]``'s ``run[q]`` columns of in-plane angle ``q``."""
    for a in range(gamma.shape[0]):
        ga = gamma[a]
        c = np.uint64(0)
        for q in range(gamma_dp.shape[1]):
            s = F32(0.0)
            for j in range(np.uint64(run[q])):
                s += ga[c + j]
            gamma_dp[a, q] = s
            c += np.uint64(run[q])
