"""The Numba kernels of the marginal likelihood (see :mod:`cryoday.likelihood` for the method).

The entry points are :func:`batch_kernel` (image by image) and :func:`shared_kernel` (groups of
images that evaluate the same directions), then :func:`sum_over_threads` for the gradient's
accumulators. Their inputs come in four bundles, named tuples of arrays and scalars that Numba
takes as arguments (unboxed once per call) and whose fields are read by name, so no call site
depends on an argument order:

* :class:`Coefficients`: the operator's coefficients, their weights and their layout in rows
  (one per operator, made by ``cryoday.likelihood``);
* :class:`Images`: the minibatch's data, padded transforms, CTF parameters and noise;
* :class:`Poses`: the poses each image evaluates and the grid's in-plane matrices and shifts;
* :class:`Outputs`: the arrays the kernels fill.

The loops around the GEMMs are written to vectorise: unsigned indices (Numba wraps signed ones
around, which keeps LLVM from vectorising), no library calls (a polynomial sine for the CTF, a
float32 polynomial exp for the posteriors: PyPI's llvmlite has no vector maths library), and
gathers split from the arithmetic that forms their offsets.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np

from cryoday import jit
from cryoday.posteriors import (
    column_logits,
    exp_columns,
    image_maximum,
    image_posteriors,
    scale_columns,
    sum_over_shifts,
)


class Coefficients(NamedTuple):
    """An operator's coefficients as the kernels read them.

    Attributes
    ----------
    weights : (K,) float32
        The likelihood's Hermitian weights: the operator's times :attr:`taper`.
    taper : (K,) float32
        The soft edge inside the cutoff (``cryoday.likelihood.edge_taper``).
    kx, ky : (K,) float64
        Fourier indices of the coefficients.
    row_start, row_len, row_kx0, row_ky : (R,) int64
        The coefficients as rows of constant ``ky`` (consecutive ``kx``): first coefficient,
        length, first ``kx``, ``ky``.
    kx_min : int
        Smallest ``kx``.
    n_kx, n_ky : int
        Number of distinct ``kx`` (``kx_min`` upwards) and of ``ky`` (0 upwards).
    box : float
        The operator's box in px.
    """

    weights: np.ndarray
    taper: np.ndarray
    kx: np.ndarray
    ky: np.ndarray
    row_start: np.ndarray
    row_len: np.ndarray
    row_kx0: np.ndarray
    row_ky: np.ndarray
    kx_min: int
    n_kx: int
    n_ky: int
    box: float


class Images(NamedTuple):
    """A minibatch (``cryoday.batch.ImageBatch``) as the kernels read it.

    Attributes
    ----------
    data : (B, K) complex64
        The images' coefficients.
    padded : (B, 2h + 1, h + 1) complex64
        The ``kx >= 0`` halves of the padded transforms turned coefficients are read from
        (``cryoday.batch.padded_half_transforms``; zero frequency at row :attr:`centre`).
    pad : float
        The padding factor: the padded transform at ``pad * k`` stands for ``d(k)``.
    centre : float
        Row of the zero frequency in :attr:`padded` (its column is 0).
    ctf_params : (B, 8) float64
        CTF parameters per image (``cryoday.batch.ctf_parameter_table``).
    freq_scale : float
        Fourier index to 1/A.
    sigma2 : (B,) float32
        Noise variance per image.
    noise_weight : (G, K) float32
        ``1 / P(|k|)`` per noise group, a factor on :attr:`Coefficients.weights` (the
        coloured-noise likelihood; ``P`` is radial, so it holds on the turned grid too);
        ``G = 0`` (the default): white noise.
    noise_group : (B,) int64
        Each image's row of :attr:`noise_weight` (unread for white noise).
    grad_weight : (B,) float32
        A factor on each image's share of the gradient (its class posterior when several
        class maps are trained, :mod:`cryoday.classes`); empty (the default): 1 for all.
    """

    data: np.ndarray
    padded: np.ndarray
    pad: float
    centre: float
    ctf_params: np.ndarray
    freq_scale: float
    sigma2: np.ndarray
    # Defaults: white noise (no rows).
    noise_weight: np.ndarray = np.zeros((0, 0), dtype=np.float32)
    noise_group: np.ndarray = np.zeros(0, dtype=np.int64)
    grad_weight: np.ndarray = np.zeros(0, dtype=np.float32)


class Poses(NamedTuple):
    """The poses each image evaluates (``cryoday.pose_sets.PoseSubsets``) and the grid's tables.

    Attributes
    ----------
    dir_off : (B + 1,) int64
        Image ``i``'s directions are ``dir_off[i]:dir_off[i + 1]`` of :attr:`dir_loc`.
    dir_loc : (n_dir_total,) int64
        Each (image, direction)'s row among the distinct directions' slices.
    dir_logw : (n_dir_total,) float64
        Their log weights.
    inp_off, inp_idx, inp_logw : int64, int64, float64
        Each image's in-plane angles as indices into :attr:`inplane`, ragged likewise.
    sh_off, sh_idx, sh_logw : int64, int64, float64
        Each image's shifts as indices into :attr:`shifts`.
    rot_off : (B + 1,) int64
        Image ``i``'s (direction, in-plane angle) posteriors are ``rot_off[i]:rot_off[i + 1]``.
    inplane : (n_inp, 2, 2) float64
        The grid's in-plane rotation matrices.
    shifts : (n_shift, 2) float64
        The grid's shifts in px.
    """

    dir_off: np.ndarray
    dir_loc: np.ndarray
    dir_logw: np.ndarray
    inp_off: np.ndarray
    inp_idx: np.ndarray
    inp_logw: np.ndarray
    sh_off: np.ndarray
    sh_idx: np.ndarray
    sh_logw: np.ndarray
    rot_off: np.ndarray
    inplane: np.ndarray
    shifts: np.ndarray


class Outputs(NamedTuple):
    """What the entry kernels write.

    Attributes
    ----------
    nll : (B,) float64
        Each image's negative log marginal likelihood.
    rot_post : (rot_off[-1],) float64
        Posterior of each (image, direction, in-plane angle), direction-major.
    shift_post : (sh_off[-1],) float64
        Posterior of each (image, shift).
    best_dir, best_inp, best_shift : (B,) int64
        The best pose's position in the image's own direction, in-plane and shift subsets.
    acc_h : (T, n_u, 2K) float32
        Per thread, ``[Re, Im]`` of each distinct direction's gradient accumulator (zeroed by
        the caller; ``(1, 1, 1)`` without the gradient).
    """

    nll: np.ndarray
    rot_post: np.ndarray
    shift_post: np.ndarray
    best_dir: np.ndarray
    best_inp: np.ndarray
    best_shift: np.ndarray
    acc_h: np.ndarray


class Columns(NamedTuple):
    """Per column of a group of images (:func:`column_layout`): log prior weight (in-plane angle
    and shift), ``1 / (2 s2)``, its in-plane angle's column in the norm matrix; ``contiguous``:
    one shift per in-plane angle everywhere."""

    lw: np.ndarray
    inv: np.ndarray
    norm_col: np.ndarray
    contiguous: bool


@numba.njit(cache=jit.CACHE, fastmath=jit.FASTMATH, inline="always")
def sine(x):
    """sin(x) for float64 ``x`` without a library call, so loops calling it vectorise.

    Reduced by multiples of pi (Cody-Waite, two parts), then the Taylor polynomial to x^13 on
    [-pi/2, pi/2]: absolute error below 1e-9 for |x| < 5,000 (tested against numpy.sin; CTF
    phases reach ~30 rad at 1/10 A and 5 um defocus, hundreds at finer sampling).

    Parameters
    ----------
    x : float64
    """
    n = np.rint(x * 0.3183098861837907)
    r = (x - n * 3.141592653589793) - n * 1.2246467991473532e-16
    r2 = r * r
    poly = r * (1.0 + r2 * (-1.0 / 6.0 + r2 * (1.0 / 120.0 + r2 * (-1.0 / 5040.0 + r2 * (
        1.0 / 362880.0 + r2 * (-1.0 / 39916800.0 + r2 * (1.0 / 6227020800.0)))))))
    return poly * (1.0 - 2.0 * (np.int64(n) & 1))


@numba.njit(cache=jit.CACHE, fastmath=jit.FASTMATH)
def ctf_constants(p, freq_scale):
    """Per image, RELION's CTF as ``sin(chi) * envelope`` with ``chi`` a polynomial in (x, y).

    With ``s2 = x^2 + y^2`` in Fourier pixels and the astigmatism angle ``ang``:
    ``chi = a s2 + b ((x^2 - y^2) cos 2ang + 2xy sin 2ang) + c s2^2 + phase``, the amplitude
    contrast ``q`` folded into the phase as ``arcsin(q)`` (``sqrt(1-q^2) sin chi + q cos chi``
    is ``sin(chi + arcsin q)``).

    Parameters
    ----------
    p : (8,) float64
        One row of ``cryoday.batch.ctf_parameter_table``.
    freq_scale : float
        Fourier index to 1/A.

    Returns
    -------
    a, b cos 2ang, 2 b sin 2ang, c, phase, bfactor' : float
    """
    du, dv, ang, lam, cs, q, bf, ps = p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]
    f2 = freq_scale * freq_scale
    a = np.pi * lam * 0.5 * (du + dv) * f2
    b = np.pi * lam * 0.5 * (du - dv) * f2
    c = -0.5 * np.pi * cs * lam * lam * lam * f2 * f2
    return a, b * np.cos(2.0 * ang), 2.0 * b * np.sin(2.0 * ang), c, ps + np.arcsin(q), \
        -bf * f2 / 4.0


@numba.njit(parallel=True, cache=jit.CACHE, fastmath=jit.FASTMATH)
def ctf_values(ctf_params, freq_scale, kx, ky, out):
    """``out[i, k]``: image ``i``'s CTF at coefficient ``(kx[k], ky[k])``, unturned: the
    :func:`turn_image` CTF at the identity (``cryoday.ctf.evaluate_ctf``'s values, without its
    float64 temporaries of every image times every coefficient).

    Parameters
    ----------
    ctf_params : (B, 8) float64
        ``cryoday.batch.ctf_parameter_table``.
    freq_scale : float
        Fourier index to 1/A.
    kx, ky : (K,) float64
    out : (B, K) float32
    """
    for i in numba.prange(ctf_params.shape[0]):
        a, bc, bs, cc, phase, b_factor = ctf_constants(ctf_params[i], freq_scale)
        for k in range(kx.shape[0]):
            x = kx[k]
            y = ky[k]
            s2 = x * x + y * y
            chi = (a + cc * s2) * s2 + phase + bc * (x * x - y * y) + bs * x * y
            out[i, k] = sine(chi) * np.exp(b_factor * s2)


@numba.njit(cache=jit.CACHE, fastmath=jit.FASTMATH)
def turn_image(flat, n_y, n_x, pad, centre, chi0, astigmatism, p2, kx, ky, weights, envelope,
               offset, fxs, fys, signs, b_re, b_im, c2, wc2):
    """One in-plane turn of an image: the factors of its columns at ``P k'``.

    ``B = w c conj(d)``, ``c^2`` and ``w c^2`` at the turned frequencies, with ``d`` read
    bilinearly from the ``kx >= 0`` half of the image's padded transform (zero outside it;
    at ``kx < 0`` as the conjugate of the value at ``-k``, whose four corners are the mirrors of
    ``k``'s, so the interpolation is the full transform's) and the CTF ``c = sin(chi) envelope``
    exact. A turn leaves ``|k|`` and so ``chi0`` (defocus, Cs, phase) and ``envelope``
    (B-factor) unchanged; only the astigmatic term turns. A first loop, free of library calls
    and gathers, vectorises (the half is chosen by a sign, not a branch); a second does the
    gathers, and interpolates as two lerps along x, then one along y (fewer multiplies than four
    corner weights).

    Parameters
    ----------
    flat : (2 n_y n_x,) float32
        The image's ``n_y x n_x`` half transform (:func:`cryoday.batch.padded_half_transforms`)
        as interleaved real and imaginary parts.
    n_y, n_x : int
        Its rows (``ky``) and columns (``kx >= 0``).
    pad, centre : float
        The padding factor and the row of the zero frequency.
    chi0, envelope : (K,) float64
        The CTF's phase without the astigmatic term, and its B-factor envelope.
    astigmatism : (3,) tuple of float
        The astigmatic term as the quadratic form ``A kx^2 + B kx ky + C ky^2`` of the unturned
        frequencies.
    p2 : (2, 2) float64
        The in-plane rotation ``P``.
    kx, ky, weights : (K,)
        The coefficients and the likelihood's weights.
    offset, fxs, fys, signs : (K,) uint32, float32, float32, float32
        Scratch.
    b_re, b_im, c2, wc2 : (K,) float32
        Out: ``Re B``, ``Im B``, ``c^2``, ``w c^2``.
    """
    qa, qb, qc = astigmatism
    for k in range(np.uint64(kx.shape[0])):
        x = p2[0, 0] * kx[k] + p2[0, 1] * ky[k]
        y = p2[1, 0] * kx[k] + p2[1, 1] * ky[k]
        chi = chi0[k] + (qa * kx[k] + qb * ky[k]) * kx[k] + qc * ky[k] * ky[k]
        ctf = sine(chi) * envelope[k]
        # d(k) = conj(d(-k)): at kx < 0 read -k, and conjugate below.
        sign = 1.0 - 2.0 * np.float64(x < 0.0)
        qx = pad * sign * x
        qy = pad * sign * y + centre
        x0 = min(max(np.floor(qx), 0.0), n_x - 2.0)
        y0 = min(max(np.floor(qy), 0.0), n_y - 2.0)
        fx = qx - x0
        fy = qy - y0
        inside = np.float64((fx >= 0.0) & (fx <= 1.0) & (fy >= 0.0) & (fy <= 1.0))
        fxs[k] = fx
        fys[k] = fy
        signs[k] = sign
        offset[k] = np.uint32(2.0 * (y0 * n_x + x0))
        b_re[k] = weights[k] * ctf * inside  # w c, times d below
        c2[k] = ctf * ctf
        wc2[k] = weights[k] * ctf * ctf
    row = np.uint64(2 * n_x)
    for k in range(np.uint64(kx.shape[0])):
        o = np.uint64(offset[k])
        fx = fxs[k]
        fy = fys[k]
        lo_re = flat[o] + fx * (flat[o + 2] - flat[o])
        lo_im = flat[o + 1] + fx * (flat[o + 3] - flat[o + 1])
        hi_re = flat[o + row] + fx * (flat[o + row + 2] - flat[o + row])
        hi_im = flat[o + row + 1] + fx * (flat[o + row + 3] - flat[o + row + 1])
        wc = b_re[k]
        b_re[k] = wc * (lo_re + fy * (hi_re - lo_re))
        b_im[k] = -wc * signs[k] * (lo_im + fy * (hi_im - lo_im))


@numba.njit(cache=jit.CACHE, fastmath=jit.FASTMATH)
def fill_columns(zt, p_lo, p_hi, n_s, b_re, b_im, inp_idx, sh_idx, inplane, shifts, coef):
    """Rows ``[Re Z | -Im Z]`` of ``zt`` for in-plane angles ``p_lo:p_hi`` x every shift.

    ``Z_ps(k') = B_p(k') phi(k')`` with the phase of the shift turned with the image,
    ``exp(2 pi i k'.(P^T t) / box) = ex(kx') ey(ky')``: two 1D tables built by recurrence (two
    sines and cosines per column), then one complex product per coefficient along each row of
    the coefficients, where ``kx'`` runs contiguously (the loop vectorises).

    Parameters
    ----------
    zt : ((p_hi - p_lo) n_s, >= 2K) float32
        Out: one row per (in-plane angle, shift), shift minor; only its first ``2K`` columns are
        written.
    p_lo, p_hi : int
        The image's in-plane angles to fill, as positions in ``inp_idx``.
    n_s : int
        Number of the image's shifts (``len(sh_idx)``).
    b_re, b_im : (n_p, K) float32
        ``B`` per in-plane angle of the image (:func:`prepare_image`).
    inp_idx, sh_idx : int64
        The image's in-plane angles and shifts as indices into ``inplane`` and ``shifts``.
    inplane : (n_inp, 2, 2) float64
    shifts : (n_shift, 2) float64
    coef : Coefficients
    """
    row_start, row_len, row_kx0, row_ky = coef.row_start, coef.row_len, coef.row_kx0, coef.row_ky
    kx_min, n_kx, n_ky, box = coef.kx_min, coef.n_kx, coef.n_ky, coef.box
    k_coef = np.uint64(b_re.shape[1])
    ex_re = np.empty(n_kx, dtype=np.float32)
    ex_im = np.empty(n_kx, dtype=np.float32)
    ey_re = np.empty(n_ky, dtype=np.float32)
    ey_im = np.empty(n_ky, dtype=np.float32)
    for p in range(p_lo, p_hi):
        a = inplane[inp_idx[p]]
        for j in range(n_s):
            t = shifts[sh_idx[j]]
            ux = 2.0 * np.pi * (a[0, 0] * t[0] + a[1, 0] * t[1]) / box
            uy = 2.0 * np.pi * (a[0, 1] * t[0] + a[1, 1] * t[1]) / box
            # Recurrences in complex128: n_kx ~ 100 steps lose ~1e-14, far below float32.
            step = complex(np.cos(ux), np.sin(ux))
            e = complex(np.cos(ux * kx_min), np.sin(ux * kx_min))
            for q in range(n_kx):
                ex_re[q] = e.real
                ex_im[q] = e.imag
                e *= step
            step = complex(np.cos(uy), np.sin(uy))
            e = 1.0 + 0.0j
            for q in range(n_ky):
                ey_re[q] = e.real
                ey_im[q] = e.imag
                e *= step
            z = zt[(p - p_lo) * n_s + j]
            bp_re = b_re[p]
            bp_im = b_im[p]
            for r in range(row_start.shape[0]):
                yr = ey_re[row_ky[r]]
                yi = ey_im[row_ky[r]]
                # Unsigned indices: with signed ones Numba wraps negative indices around, and
                # that keeps LLVM from vectorising the loop.
                k0 = np.uint64(row_start[r])
                q0 = np.uint64(row_kx0[r] - kx_min)
                for u in range(np.uint64(row_len[r])):
                    ph_re = ex_re[q0 + u] * yr - ex_im[q0 + u] * yi
                    ph_im = ex_re[q0 + u] * yi + ex_im[q0 + u] * yr
                    br = bp_re[k0 + u]
                    bi = bp_im[k0 + u]
                    z[k0 + u] = br * ph_re - bi * ph_im
                    z[k_coef + k0 + u] = -(br * ph_im + bi * ph_re)


@numba.njit(cache=jit.CACHE, fastmath=jit.FASTMATH)
def prepare_image(images, i, inp_idx_i, inplane, coef, b_re, b_im, c2, wc2):
    """``|d|^2`` of the unturned image ``i``, and its column factors for each in-plane angle.

    ``|d|^2`` is the exact one: the turned image's would add the noise power's sampling
    difference on the turned grid, ~sqrt(K) nats, to each in-plane angle.

    Parameters
    ----------
    images : Images
    i : int
        The image.
    inp_idx_i : (n_p,) int64
        Its in-plane angles as indices into ``inplane``.
    inplane : (n_inp, 2, 2) float64
    coef : Coefficients
    b_re, b_im, c2, wc2 : (n_p, K) float32
        Out, per in-plane angle: :func:`turn_image`'s factors.

    Returns
    -------
    float
        ``sum_k w |d_k|^2``.

    With coloured noise the image's weights are ``w / P`` and its ``c^2`` is ``c^2 / P``: the
    gradient's accumulators divide by the operator's ``w`` only (:func:`accumulate`).
    """
    data_i = images.data[i]
    padded_i = images.padded[i]
    kx, ky = coef.kx, coef.ky
    coloured = images.noise_weight.shape[0] > 0
    if coloured:
        noise_i = images.noise_weight[images.noise_group[i]]
        weights = coef.weights * noise_i
    else:
        noise_i = coef.weights  # unused
        weights = coef.weights
    dnorm = 0.0
    for k in range(data_i.shape[0]):
        dnorm += weights[k] * (data_i[k].real ** 2 + data_i[k].imag ** 2)
    a, bc, bs, cc, phase, b_factor = ctf_constants(images.ctf_params[i], images.freq_scale)
    n_k = kx.shape[0]
    chi0 = np.empty(n_k)
    envelope = np.empty(n_k)
    for k in range(n_k):
        s2 = kx[k] * kx[k] + ky[k] * ky[k]
        chi0[k] = (a + cc * s2) * s2 + phase
        envelope[k] = np.exp(b_factor * s2)
    offset = np.empty(n_k, dtype=np.uint32)
    fxs = np.empty(n_k, dtype=np.float32)
    fys = np.empty(n_k, dtype=np.float32)
    signs = np.empty(n_k, dtype=np.float32)
    flat = padded_i.ravel().view(np.float32)  # interleaved real and imaginary parts
    for p in range(inp_idx_i.shape[0]):
        r = inplane[inp_idx_i[p]]
        # bc (x^2 - y^2) + bs x y at (x, y) = r (kx, ky), as a quadratic form in (kx, ky).
        astigmatism = (bc * (r[0, 0] ** 2 - r[1, 0] ** 2) + bs * r[0, 0] * r[1, 0],
                       2.0 * bc * (r[0, 0] * r[0, 1] - r[1, 0] * r[1, 1])
                       + bs * (r[0, 0] * r[1, 1] + r[0, 1] * r[1, 0]),
                       bc * (r[0, 1] ** 2 - r[1, 1] ** 2) + bs * r[0, 1] * r[1, 1])
        turn_image(flat, padded_i.shape[0], padded_i.shape[1], images.pad, images.centre, chi0,
                   astigmatism, r, kx, ky, weights, envelope, offset, fxs, fys, signs, b_re[p],
                   b_im[p], c2[p], wc2[p])
        if coloured:
            c2_p = c2[p]
            for k in range(n_k):
                c2_p[k] *= noise_i[k]
    return dnorm


@numba.njit(cache=jit.CACHE, fastmath=jit.FASTMATH)
def gather_slices(s_parts, loc, sub, sub_abs2):
    """The rows ``loc`` of ``s_parts`` into ``sub``, and their ``|S|^2``.

    Parameters
    ----------
    s_parts : (n_u, 2K) float32
        ``[Re S, Im S]`` of the distinct directions' slices.
    loc : (n_d,) int64
        The rows to gather.
    sub : (n_d, >= 2K) float32
        Out: the gathered rows (its first ``2K`` columns).
    sub_abs2 : (n_d, K) float32
        Out: ``|S|^2``.
    """
    n_k = np.uint64(sub_abs2.shape[1])
    for a in range(loc.shape[0]):
        src = s_parts[loc[a]]
        dst = sub[a]
        dst2 = sub_abs2[a]
        for k in range(np.uint64(2) * n_k):
            dst[k] = src[k]
        for k in range(n_k):
            dst2[k] = dst[k] * dst[k] + dst[n_k + k] * dst[n_k + k]


@numba.njit(cache=jit.CACHE, fastmath=jit.FASTMATH)
def accumulate(h, s_u, grad_z_a, ctf_term_a, inv_weights):
    """``h += ctf_term S - conj(sum gamma Z) / w``, in ``[Re, Im]`` parts.

    Parameters
    ----------
    h : (2K,) float32
        In/out: one direction's accumulator.
    s_u : (2K,) float32
        ``[Re S, Im S]`` of its slice.
    grad_z_a : (2K,) float32
        ``[sum gamma Re Z, -sum gamma Im Z]``, i.e. ``conj(sum gamma Z)``.
    ctf_term_a : (K,) float32
        ``sum_p Gamma_dp c_p^2``.
    inv_weights : (K,) float32
        ``1 / w``.
    """
    n_k = np.uint64(ctf_term_a.shape[0])
    for k in range(n_k):
        h[k] += ctf_term_a[k] * s_u[k] - inv_weights[k] * grad_z_a[k]
        h[n_k + k] += ctf_term_a[k] * s_u[n_k + k] - inv_weights[k] * grad_z_a[n_k + k]


@numba.njit(cache=jit.CACHE, fastmath=jit.FASTMATH)
def accumulate_merged(h, s_u, g_a, inv_weights):
    """:func:`accumulate` from one row of the merged gradient GEMM.

    Parameters
    ----------
    h, s_u : (2K,) float32
        As for :func:`accumulate`.
    g_a : (3K,) float32
        ``[conj(sum gamma Z), -sum_p Gamma_dp w c_p^2 / 2]``: the CTF term is ``-2 / w`` times
        its last ``K``.
    inv_weights : (K,) float32
    """
    n_k = np.uint64(inv_weights.shape[0])
    for k in range(n_k):
        c = np.float32(-2.0) * g_a[np.uint64(2) * n_k + k]
        h[k] += inv_weights[k] * (c * s_u[k] - g_a[k])
        h[n_k + k] += inv_weights[k] * (c * s_u[n_k + k] - g_a[n_k + k])


@numba.njit(cache=jit.CACHE, fastmath=jit.FASTMATH)
def column_layout(i0, n_img, poses, sigma2):
    """The layout of images ``i0:i0 + n_img``'s columns side by side, and their parameters.

    Image ``u``'s in-plane angles are ``p_start[u]:p_start[u + 1]`` of the group's, its columns
    ``c_start[u]:c_start[u + 1]``, in-plane angle major and shift minor.

    Parameters
    ----------
    i0, n_img : int
        The images.
    poses : Poses
    sigma2 : (B,) float32

    Returns
    -------
    p_start, c_start : (n_img + 1,) int64
    columns : Columns
    run : (p_start[-1],) int64
        Per in-plane angle, its number of shifts.
    """
    inp_off, inp_logw, sh_off, sh_logw = poses.inp_off, poses.inp_logw, poses.sh_off, \
        poses.sh_logw
    p_start = np.zeros(n_img + 1, dtype=np.int64)
    c_start = np.zeros(n_img + 1, dtype=np.int64)
    for u in range(n_img):
        i = i0 + u
        n_p = inp_off[i + 1] - inp_off[i]
        p_start[u + 1] = p_start[u] + n_p
        c_start[u + 1] = c_start[u] + n_p * (sh_off[i + 1] - sh_off[i])
    col_lw = np.empty(c_start[n_img], dtype=np.float32)
    col_inv = np.empty(c_start[n_img], dtype=np.float32)
    norm_col = np.empty(c_start[n_img], dtype=np.uint64)
    run = np.empty(p_start[n_img], dtype=np.int64)
    contiguous = True
    for u in range(n_img):
        i = i0 + u
        n_s = sh_off[i + 1] - sh_off[i]
        contiguous = contiguous and n_s == 1
        inv = 1.0 / (2.0 * sigma2[i])
        for p in range(p_start[u + 1] - p_start[u]):
            q = p_start[u] + p
            run[q] = n_s
            for j in range(n_s):
                c = c_start[u] + p * n_s + j
                col_lw[c] = inp_logw[inp_off[i] + p] + sh_logw[sh_off[i] + j]
                col_inv[c] = inv
                norm_col[c] = q
    return p_start, c_start, Columns(col_lw, col_inv, norm_col, contiguous), run


@numba.njit(cache=jit.CACHE, fastmath=jit.FASTMATH)
def columns_to_posteriors(gamma, norm, columns, dir_lw, i0, p_start, c_start, dnorms, sigma2,
                          grad_weight, poses, want_grad, out):
    """From the cross terms of images ``i0:`` side by side to each image's nll, marginals and
    best pose.

    Parameters
    ----------
    gamma : (n_d, C) float32
        In: the cross terms, laid out by :func:`column_layout` (less half the norm terms if
        ``norm`` has no columns). Out, with ``want_grad``: the posteriors times ``1 / s2``, the
        weights of the gradient's GEMMs.
    norm : (n_d, p_start[-1]) or (n_d, 0) float32
        The norm terms ``sum_k w c_p^2 |S_d|^2`` per in-plane angle.
    columns : Columns
    dir_lw : (n_d,) float64
        The directions' log weights (shared by the images).
    i0 : int
        The first image.
    p_start, c_start : int64
        :func:`column_layout`'s.
    dnorms : (n_img,) float64
        ``sum_k w |d_k|^2`` per image.
    sigma2 : (B,) float32
    grad_weight : (B,) or (0,) float32
        :attr:`Images.grad_weight`.
    poses : Poses
    want_grad : bool
    out : Outputs
        Its ``nll``, ``rot_post``, ``shift_post`` and ``best_*`` of the images are written.
    """
    sh_off, rot_off = poses.sh_off, poses.rot_off
    n_c = gamma.shape[1]
    col_max = np.empty(n_c, dtype=np.float32)
    col_ref = np.empty(n_c, dtype=np.float32)
    col_sum = np.empty(n_c)
    column_logits(gamma, norm, columns.norm_col, columns.contiguous, columns.lw, columns.inv,
                  dir_lw, col_max)
    n_img = c_start.shape[0] - 1
    for u in range(n_img):
        image_maximum(col_max, c_start[u], c_start[u + 1], col_ref)
    exp_columns(gamma, col_ref, col_sum)
    col_factor = np.empty(n_c, dtype=np.float32)
    for u in range(n_img):
        i = i0 + u
        n_s = sh_off[i + 1] - sh_off[i]
        total, out.best_dir[i], best_c = image_posteriors(
            gamma, c_start[u], p_start[u + 1] - p_start[u], n_s, col_max, col_sum,
            out.rot_post[rot_off[i]:rot_off[i + 1]], out.shift_post[sh_off[i]:sh_off[i + 1]])
        out.nll[i] = -(np.float64(col_ref[c_start[u]]) + np.log(total)
                       - dnorms[u] / (2.0 * sigma2[i]))
        out.best_inp[i] = best_c // n_s
        out.best_shift[i] = best_c % n_s
        share = grad_weight[i] if grad_weight.shape[0] > 0 else np.float32(1.0)
        col_factor[c_start[u]:c_start[u + 1]] = (share / (sigma2[i] * total) if total > 0.0
                                                 else np.nan)  # NaN energies: a NaN gradient
    if want_grad:
        scale_columns(gamma, col_factor)


@numba.njit(cache=jit.CACHE, fastmath=jit.FASTMATH)
def ctf_term(gamma, contiguous, run, c2):
    """The gradient's CTF term ``sum_p Gamma_dp c_p^2``, ``Gamma_dp`` summed over shifts.

    Parameters
    ----------
    gamma : (n_d, C) float32
        The gradient's weights per column.
    contiguous : bool
        One shift per in-plane angle: ``Gamma_dp`` is ``gamma``.
    run : (n_p,) int64
        Shifts per in-plane angle.
    c2 : (n_p, K) float32
        ``c^2`` per in-plane angle.

    Returns
    -------
    (n_d, K) float32
    """
    if contiguous:
        return np.dot(gamma, c2)
    gamma_dp = np.empty((gamma.shape[0], run.shape[0]), dtype=np.float32)
    sum_over_shifts(gamma, run, gamma_dp)
    return np.dot(gamma_dp, c2)


@numba.njit(parallel=True, cache=jit.CACHE, fastmath=jit.FASTMATH)
def batch_kernel(s_parts, images, coef, poses, want_grad, col_budget, out):
    """Energies, log-sum-exp, posteriors and gradient accumulators, image by image.

    Per thread, ``out.acc_h`` gathers ``[Re, Im]`` of
    ``sum_i (sum_p Gamma_dp c_p^2 S_d - conj(sum_ps gamma_dps Z_ps) / w) / s2`` per distinct
    direction. An image's columns are built in chunks of ``col_budget`` at most; with a single
    chunk (the usual case) they are kept for the gradient pass.

    Parameters
    ----------
    s_parts : (n_u, 2K) float32
        ``[Re S, Im S]`` of the distinct directions' slices (``poses.dir_loc`` indexes them).
    images : Images
    coef : Coefficients
    poses : Poses
    want_grad : bool
        Also accumulate the gradient.
    col_budget : int
        Columns (in-plane angle x shift) built at once per image.
    out : Outputs
    """
    data, sigma2 = images.data, images.sigma2
    dir_off, dir_loc, dir_logw = poses.dir_off, poses.dir_loc, poses.dir_logw
    inp_off, inp_idx, sh_off, sh_idx = poses.inp_off, poses.inp_idx, poses.sh_off, poses.sh_idx
    inplane, shifts = poses.inplane, poses.shifts
    acc_h = out.acc_h
    n_images = data.shape[0]
    k_coef = data.shape[1]
    inv_weights = 1.0 / coef.weights
    one = np.int64(1)
    for i_ in numba.prange(n_images):
        # prange's index is unsigned and a literal argument is its own type: both would compile
        # the helpers shared with shared_kernel a second time (~10 s of a cold warm-up).
        i = np.int64(i_)
        tid = numba.get_thread_id()
        d0, d1 = dir_off[i], dir_off[i + 1]
        p0, p1 = inp_off[i], inp_off[i + 1]
        s0, s1 = sh_off[i], sh_off[i + 1]
        n_d = d1 - d0
        n_p = p1 - p0
        n_s = s1 - s0
        n_cols = n_p * n_s
        p_start, c_start, columns, run = column_layout(i, one, poses, sigma2)
        b_re = np.empty((n_p, k_coef), dtype=np.float32)
        b_im = np.empty((n_p, k_coef), dtype=np.float32)
        c2 = np.empty((n_p, k_coef), dtype=np.float32)
        wc2 = np.empty((n_p, k_coef), dtype=np.float32)
        dnorms = np.empty(1)
        dnorms[0] = prepare_image(images, i, inp_idx[p0:p1], inplane, coef, b_re, b_im, c2, wc2)
        sub = np.empty((n_d, 2 * k_coef), dtype=np.float32)
        sub_abs2 = np.empty((n_d, k_coef), dtype=np.float32)
        gather_slices(s_parts, dir_loc[d0:d1], sub, sub_abs2)
        norm = np.dot(sub_abs2, wc2.T)  # (n_d, n_p)
        p_chunk = max(1, min(n_p, col_budget // max(1, n_s)))
        single = p_chunk >= n_p
        zt_kept = np.empty((n_cols if single else 0, 2 * k_coef), dtype=np.float32)
        gamma = np.empty((n_d, n_cols), dtype=np.float32)
        for c0 in range(0, n_p, p_chunk):
            c1 = min(n_p, c0 + p_chunk)
            zt = zt_kept if single else np.empty(((c1 - c0) * n_s, 2 * k_coef),
                                                 dtype=np.float32)
            fill_columns(zt, c0, c1, n_s, b_re, b_im, inp_idx[p0:p1], sh_idx[s0:s1], inplane,
                         shifts, coef)
            if single:
                np.dot(sub, zt.T, gamma)
            else:
                gamma[:, c0 * n_s:c1 * n_s] = np.dot(sub, zt.T)
        columns_to_posteriors(gamma, norm, columns, dir_logw[d0:d1], i, p_start, c_start,
                              dnorms, sigma2, images.grad_weight, poses, want_grad, out)
        if want_grad:
            if single:
                grad_z = np.dot(gamma, zt_kept)
            else:
                grad_z = np.zeros((n_d, 2 * k_coef), dtype=np.float32)
                for c0 in range(0, n_p, p_chunk):
                    c1 = min(n_p, c0 + p_chunk)
                    zt = np.empty(((c1 - c0) * n_s, 2 * k_coef), dtype=np.float32)
                    fill_columns(zt, c0, c1, n_s, b_re, b_im, inp_idx[p0:p1], sh_idx[s0:s1],
                                 inplane, shifts, coef)
                    g_chunk = np.ascontiguousarray(gamma[:, c0 * n_s:c1 * n_s])
                    grad_z += np.dot(g_chunk, zt)
            term = ctf_term(gamma, columns.contiguous, run, c2)
            for a in range(n_d):
                u = dir_loc[d0 + a]
                accumulate(acc_h[tid, u], s_parts[u], grad_z[a], term[a], inv_weights)


@numba.njit(parallel=True, cache=jit.CACHE, fastmath=jit.FASTMATH)
def shared_kernel(s_parts, images, coef, poses, group_off, want_grad, out):
    """As :func:`batch_kernel`, for groups of images that evaluate the same directions with
    the same weights.

    Their columns side by side make one GEMM per group instead of one small GEMM per image (on
    the first stages a whole minibatch shares the full grid, and an image has as few as 20
    columns), and the gradient's two GEMMs sum over the group's images at once, the posteriors
    carrying each image's ``1 / s2``. With one shift per in-plane angle everywhere (the first
    stages), the norm term has a column per column of the cross term, and the two merge into one
    GEMM with 3K rows: ``[Re S, Im S, |S|^2] . [Re Z, -Im Z, -w c^2 / 2] = cross - norm / 2``;
    the gradient's two GEMMs merge the same way (one call instead of two, and no norm matrix to
    write and read back).

    Parameters
    ----------
    s_parts : (n_u, 2K) float32
        As for :func:`batch_kernel`.
    images : Images
    coef : Coefficients
    poses : Poses
        Every image's directions and their weights are the first image's.
    group_off : (G + 1,) int64
        Group ``g`` is images ``group_off[g]:group_off[g + 1]``.
    want_grad : bool
    out : Outputs
    """
    data, sigma2 = images.data, images.sigma2
    dir_off, dir_loc, dir_logw = poses.dir_off, poses.dir_loc, poses.dir_logw
    inp_off, inp_idx, sh_off, sh_idx = poses.inp_off, poses.inp_idx, poses.sh_off, poses.sh_idx
    inplane, shifts = poses.inplane, poses.shifts
    acc_h = out.acc_h
    k_coef = data.shape[1]
    inv_weights = 1.0 / coef.weights
    merged = True
    for i in range(data.shape[0]):
        merged = merged and sh_off[i + 1] - sh_off[i] == 1
    width = 3 * k_coef if merged else 2 * k_coef
    # Every image's directions are the first image's: their slices are gathered once.
    d0, d1 = dir_off[0], dir_off[1]
    n_d = d1 - d0
    sub = np.empty((n_d, width), dtype=np.float32)
    sub_abs2 = np.empty((n_d, k_coef), dtype=np.float32)
    gather_slices(s_parts, dir_loc[d0:d1], sub, sub_abs2)
    if merged:
        sub[:, 2 * k_coef:] = sub_abs2
    for g in numba.prange(group_off.shape[0] - 1):
        tid = numba.get_thread_id()
        i0, i1 = group_off[g], group_off[g + 1]
        n_img = i1 - i0
        p_start, c_start, columns, run = column_layout(i0, n_img, poses, sigma2)
        b_re = np.empty((p_start[n_img], k_coef), dtype=np.float32)
        b_im = np.empty((p_start[n_img], k_coef), dtype=np.float32)
        c2 = np.empty((p_start[n_img], k_coef), dtype=np.float32)
        wc2 = np.empty((p_start[n_img], k_coef), dtype=np.float32)
        zt = np.empty((c_start[n_img], width), dtype=np.float32)
        dnorms = np.empty(n_img)
        for u in range(n_img):
            i = i0 + u
            pa, pb = p_start[u], p_start[u + 1]
            dnorms[u] = prepare_image(images, i, inp_idx[inp_off[i]:inp_off[i + 1]], inplane,
                                      coef, b_re[pa:pb], b_im[pa:pb], c2[pa:pb], wc2[pa:pb])
            fill_columns(zt[c_start[u]:c_start[u + 1]], np.int64(0), pb - pa,
                         sh_off[i + 1] - sh_off[i],
                         b_re[pa:pb], b_im[pa:pb], inp_idx[inp_off[i]:inp_off[i + 1]],
                         sh_idx[sh_off[i]:sh_off[i + 1]], inplane, shifts, coef)
            if merged:
                zt[c_start[u]:c_start[u + 1], 2 * k_coef:] = np.float32(-0.5) * wc2[pa:pb]
        gamma = np.empty((n_d, c_start[n_img]), dtype=np.float32)
        np.dot(sub, zt.T, gamma)  # the cross terms (less half the norm terms, if merged)
        if merged:
            norm = np.empty((n_d, 0), dtype=np.float32)
        else:
            norm = np.dot(sub_abs2, wc2.T)  # (n_d, all in-plane angles of the group)
        columns_to_posteriors(gamma, norm, columns, dir_logw[d0:d1], i0, p_start, c_start,
                              dnorms, sigma2, images.grad_weight, poses, want_grad, out)
        if want_grad:  # summed over the group's images
            if merged:
                both = np.dot(gamma, zt)
                for a in range(n_d):
                    u = dir_loc[d0 + a]
                    accumulate_merged(acc_h[tid, u], s_parts[u], both[a], inv_weights)
            else:
                grad_z = np.dot(gamma, zt)
                term = ctf_term(gamma, columns.contiguous, run, c2)
                for a in range(n_d):
                    u = dir_loc[d0 + a]
                    accumulate(acc_h[tid, u], s_parts[u], grad_z[a], term[a], inv_weights)


@numba.njit(parallel=True, cache=jit.CACHE, fastmath=jit.FASTMATH)
def sum_over_threads(acc, taper, out):
    """``out[u] = taper * sum_t (acc[t, u, :K] + i acc[t, u, K:])``: the threads' accumulators.

    Parameters
    ----------
    acc : (T, n_u, 2K) float32
        :attr:`Outputs.acc_h`.
    taper : (K,) float32
        :attr:`Coefficients.taper`.
    out : (n_u, K) complex64
        Out.
    """
    n_k = np.uint64(out.shape[1])
    for u in numba.prange(acc.shape[1]):
        re = np.zeros(n_k, dtype=np.float32)
        im = np.zeros(n_k, dtype=np.float32)
        for t in range(acc.shape[0]):
            row = acc[t, u]
            for k in range(n_k):
                re[k] += row[k]
                im[k] += row[n_k + k]
        for k in range(n_k):
            out[u, k] = complex(re[k] * taper[k], im[k] * taper[k])
