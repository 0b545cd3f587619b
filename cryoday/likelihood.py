"""Marginal likelihood of particle images over poses and shifts, and its gradient (paper Eq. 4).

For image ``i`` with data ``d`` (its operator coefficients), CTF ``c``, noise variance ``s2`` and a
model slice ``S_A`` at rotation ``A`` shifted by ``t_s``, the energy is

    E_As = sum_k w_k |d_k - c_k S_A(k) phi_s(k)|^2 / (2 s2),   phi_s(k) = exp(2 pi i k.t_s / box)

with Hermitian weights ``w``, and ``nll_i = -log sum_{A,s} exp(log W_A + log W_s - E_As)``.

**One slice per viewing direction.** A rotation is an in-plane turn after a direction,
``A = P_psi A_d`` (RELION's ZYZ), so ``S_A(k) = S_d(P^T k)``. Substituting ``k = P k'`` turns the
sum over ``k`` into one over ``k'`` on the same grid with the *image* turned instead of the model:

    E_dps = sum_k' w |d(P k') - c(P k') S_d(k') phi_s(P k')|^2 / (2 s2)

(METHOD.md section 2, as the paper's code does). ``d(P k')`` is interpolated bilinearly in the
image's transform zero-padded ``IMAGE_PADDING`` times, with a gridding correction as for the
volume; the CTF is
evaluated exactly at the turned frequencies; ``phi_s(P k') = exp(2 pi i k'.(P^T t_s) / box)``
is a shift turned with the image. ``|d|^2`` does not depend on the pose and is taken from the
unturned data. Slicing, the costliest part per pose before, now costs one slice per direction
instead of one per (direction x in-plane angle); this objective differs from the one with turned
slices by the image interpolation (measured in ``tests/test_likelihood.py``), and its gradient is
exact for it.

The hot work per image is dense matrix products, which run near the machine's arithmetic peak:

* the cross term over all directions x (in-plane angles, shifts) is one real GEMM,
  ``[Re S, Im S] (n_d x 2K) @ [Re Z; -Im Z] (2K x n_p n_s)``, ``Z = w c_p conj(d_p) phi_ps``;
* ``sum_k w c_p^2 |S_d|^2`` does not depend on the shift: ``|S|^2 (n_d x K) @ (K x n_p)``;
* the gradient's data term ``sum_{p,s} gamma_dps conj(Z_ps)`` is the transposed GEMM, and its
  CTF term ``sum_p Gamma_dp c_p^2`` a third one;
* with one shift per in-plane angle (the first stages), the norm term rides in the cross term's
  GEMM as ``K`` more rows, and the gradient's two GEMMs merge likewise.

The energies land in a (directions x columns) float32 matrix, which :mod:`cryoday.posteriors`
turns in place into log posteriors, then their exponentials (relative to each image's best),
then the gradient's weights; nll and marginals are summed in float64.

Images are processed in parallel (``prange``), each thread calling single-threaded BLAS and
accumulating its share of the gradient per direction in its own buffer; nothing of size
(images x poses x coefficients) is ever formed, and each image's (in-plane x shift) columns are
built in chunks of bounded size. Images that evaluate the same directions (stages without
importance sampling) are taken in small groups whose columns share one GEMM
(:func:`_shared_kernel`).

The loops around the GEMMs are written to vectorise: unsigned indices (Numba wraps signed ones
around, which keeps LLVM from vectorising), no library calls (a polynomial sine for the CTF, a
float32 polynomial exp for the posteriors: PyPI's llvmlite has no vector maths library), and
gathers split from the arithmetic that forms their offsets.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from functools import cached_property

import numba
import numpy as np
import scipy.fft as sfft
from threadpoolctl import ThreadpoolController

from cryoday import jit, scratch
from cryoday.ctf import electron_wavelength, evaluate_ctf
from cryoday.fourier import ft2
from cryoday.posteriors import (
    column_logits,
    exp_columns,
    image_maximum,
    image_posteriors,
    scale_columns,
    sum_over_shifts,
)
from cryoday.projection import SliceOperator

# Zero padding of the images before their transform is turned by bilinear interpolation. Content
# at real-space offset x is weighted by sinc^2(x / (p N)) (undone by the gridding correction)
# and aliased from x - p N. Measured on a 40-px image against its exact transform at turned
# frequencies: 2.6% error at p = 2, 0.6% at p = 4; 3 is the compromise (the padded transforms
# are recomputed per minibatch, and their size grows as p^2).
IMAGE_PADDING = 3.0
CTF_FIELDS = ("defocus_u", "defocus_v", "defocus_angle", "voltage", "cs", "amplitude_contrast",
              "bfactor", "phase_shift")


@dataclass
class ImageBatch:
    """A minibatch in the operator's coefficients.

    Attributes
    ----------
    data : (B, n_coef) complex64, centred unitary transforms of the images at the stage box
    ctf : (B, n_coef) float32
    sigma2 : (B,) float32, noise variance per pixel (= per unitary Fourier coefficient)
    padded : (B, M, M) complex64, the part of each image's zero-padded (``image_padded_size``),
        gridding-corrected transform that turned coefficients reach (centre ``M // 2``), scaled
        so that its value at ``p k`` (``p`` the padding factor) stands for ``d(k)``
    ctf_params : (B, 8) float64, per image: defocus U, V (A), astigmatism angle (rad),
        wavelength (A), Cs (A), amplitude contrast, B-factor (A^2), phase shift (rad)
    freq_scale : float, 1 / (box * pixel size): Fourier index to 1/A
    """

    data: np.ndarray
    ctf: np.ndarray
    sigma2: np.ndarray
    padded: np.ndarray | None = None
    ctf_params: np.ndarray | None = None
    freq_scale: float = 1.0

    def __len__(self) -> int:
        return len(self.data)

    def take(self, rows) -> ImageBatch:
        """The images at ``rows`` (a slice or an index array)."""
        return ImageBatch(self.data[rows], self.ctf[rows], self.sigma2[rows],
                          None if self.padded is None else self.padded[rows],
                          None if self.ctf_params is None else self.ctf_params[rows],
                          self.freq_scale)


def image_padded_size(box: int) -> int:
    """Size of the zero-padded images: about ``IMAGE_PADDING x box``, a fast FFT length."""
    return int(sfft.next_fast_len(int(np.ceil(IMAGE_PADDING * box)), real=True))


def _padded_transforms(op: SliceOperator, images: np.ndarray) -> np.ndarray:
    """Each image's zero-padded transform near the origin, ready for bilinear turning.

    The window ``|kx|, |ky| <= h`` of :func:`~cryoday.fourier.ft2` of the gridding-corrected
    image centred in an ``m x m`` array of zeros. Only the image's ``n x n`` pixels enter, so the
    window is two small DFTs as matrix products, over x for every row of every image, then over
    y for all images at once, rather than an FFT of the nine-times larger padded array (200
    images of 44 px: 20 -> 10 ms); ``kx < 0`` is the conjugate of ``-k``.
    """
    n, n_images = op.box, len(images)
    m = image_padded_size(n)
    pos = np.arange(n) - n // 2
    g = np.sinc(pos / m) ** 2  # real-space image of the bilinear kernel on the padded grid
    corrected = (np.asarray(images, np.float32) / (g[:, None] * g[None, :])).astype(np.float32)
    pad = m / n
    h = min(int(np.ceil(pad * op.radius)) + 2, m // 2 - 1)
    # Unitary on the m x m array, and p = m / n times larger, as the transform of a p-times
    # larger array is p times smaller at the same frequency.
    angle_x = 2 * np.pi * np.outer(pos, np.arange(h + 1)) / m
    scale = pad / m
    flat = corrected.reshape(n_images * n, n)
    rows = (flat @ (np.cos(angle_x) * scale).astype(np.float32)
            - 1j * (flat @ (np.sin(angle_x) * scale).astype(np.float32))).astype(np.complex64)
    rows = rows.reshape(n_images, n, h + 1).transpose(1, 0, 2).reshape(n, n_images * (h + 1))
    dft_y = np.exp(-2j * np.pi * np.outer(np.arange(-h, h + 1), pos) / m).astype(np.complex64)
    half = (dft_y @ rows).reshape(2 * h + 1, n_images, h + 1).transpose(1, 0, 2)
    out = np.empty((n_images, 2 * h + 1, 2 * h + 1), dtype=np.complex64)
    out[:, :, h:] = half
    out[:, :, :h] = np.conj(half[:, ::-1, h:0:-1])
    return out


def ctf_parameter_table(ctf_params: dict, n: int) -> np.ndarray:
    """``(n, 8)`` float64 table of the kernel's CTF parameters (see :class:`ImageBatch`)."""
    get = {k: np.broadcast_to(np.asarray(ctf_params.get(k, 0.0), np.float64), (n,))
           for k in CTF_FIELDS}
    return np.ascontiguousarray(np.stack([
        get["defocus_u"], get["defocus_v"], np.deg2rad(get["defocus_angle"]),
        electron_wavelength(get["voltage"]), get["cs"] * 1e7, get["amplitude_contrast"],
        get["bfactor"], np.deg2rad(get["phase_shift"])], axis=1))


def make_batch(op: SliceOperator, images: np.ndarray, ctf_params: dict, pixel_size: float,
               sigma) -> ImageBatch:
    """Transform ``images`` ``(B, box, box)`` and evaluate their CTFs at the coefficients.

    ``ctf_params`` holds ``(B,)`` arrays (or scalars) named as
    :func:`cryoday.ctf.evaluate_ctf`'s arguments; ``sigma`` is the noise standard deviation per
    pixel (scalar or ``(B,)``).
    """
    images = np.asarray(images, dtype=np.float32)
    data = op.extract(ft2(images))
    scale = 1.0 / (op.box * pixel_size)
    ctf = evaluate_ctf(op.kx * scale, op.ky * scale, **ctf_params)
    ctf = np.broadcast_to(ctf, data.shape).astype(np.float32)
    sigma2 = np.broadcast_to(np.asarray(sigma, dtype=np.float32) ** 2, (len(images),))
    return ImageBatch(data, np.ascontiguousarray(ctf), np.ascontiguousarray(sigma2),
                      _padded_transforms(op, images), ctf_parameter_table(ctf_params, len(images)),
                      scale)


@dataclass
class PoseSubsets:
    """Per-image (ragged) subsets of the grid's directions, in-plane angles and shifts.

    Image ``i`` evaluates the product of ``dir_index[dir_offsets[i]:dir_offsets[i+1]]``,
    ``inp_index[inp_offsets[i]:...]`` and ``shift_index[shift_offsets[i]:...]``; the ``*_logw``
    are log quadrature weights (with importance corrections when sampled). Treat it as
    immutable: quantities derived from it are kept on it (``rot_*``, ``n_points``, and what
    :func:`marginal_nll` caches per grid). The rotations an
    image evaluates are ``d * n_inp + p`` over its directions ``d`` and in-plane angles ``p``,
    direction-major (``rot_*`` below), which is the order of ``LikelihoodResult.rot_post``.
    """

    n_inp: int
    dir_offsets: np.ndarray
    dir_index: np.ndarray
    dir_logw: np.ndarray
    inp_offsets: np.ndarray
    inp_index: np.ndarray
    inp_logw: np.ndarray
    shift_offsets: np.ndarray
    shift_index: np.ndarray
    shift_logw: np.ndarray

    @classmethod
    def from_sets(cls, n_inp, dir_sets, dir_logws, inp_sets, inp_logws, shift_sets, shift_logws
                  ) -> PoseSubsets:
        """From per-image lists of index arrays and their log weights."""
        def ragged(sets, logws):
            offsets = np.concatenate([[0], np.cumsum([len(x) for x in sets])]).astype(np.int64)
            return (offsets, np.concatenate(sets).astype(np.int64),
                    np.concatenate(logws).astype(np.float64))

        return cls(int(n_inp), *ragged(dir_sets, dir_logws), *ragged(inp_sets, inp_logws),
                   *ragged(shift_sets, shift_logws))

    @property
    def n_images(self) -> int:
        return len(self.dir_offsets) - 1

    @cached_property
    def rot_offsets(self) -> np.ndarray:
        counts = np.diff(self.dir_offsets) * np.diff(self.inp_offsets)
        return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def _rot_product(self, dir_values, inp_values, combine):
        """``combine(dir_value, inp_value)`` over each image's (direction, in-plane) product,
        direction-major, for all images at once."""
        n_p = np.diff(self.inp_offsets)
        image = np.repeat(np.arange(self.n_images), np.diff(self.rot_offsets))
        local = np.arange(len(image)) - self.rot_offsets[image]
        return combine(dir_values[self.dir_offsets[image] + local // n_p[image]],
                       inp_values[self.inp_offsets[image] + local % n_p[image]])

    @cached_property
    def rot_index(self) -> np.ndarray:
        n_inp = self.n_inp
        return self._rot_product(self.dir_index, self.inp_index,
                                 lambda d, p: d * n_inp + p).astype(np.int64)

    @cached_property
    def rot_logw(self) -> np.ndarray:
        return self._rot_product(self.dir_logw, self.inp_logw, np.add)

    @cached_property
    def n_points(self) -> int:
        return int((np.diff(self.dir_offsets) * np.diff(self.inp_offsets)
                    * np.diff(self.shift_offsets)).sum())

    def block(self, lo: int, hi: int) -> PoseSubsets:
        """The subsets of images ``lo:hi``."""
        def cut(offsets, index, logw):
            a, b = offsets[lo], offsets[hi]
            return offsets[lo:hi + 1] - a, index[a:b], logw[a:b]

        return PoseSubsets(self.n_inp, *cut(self.dir_offsets, self.dir_index, self.dir_logw),
                           *cut(self.inp_offsets, self.inp_index, self.inp_logw),
                           *cut(self.shift_offsets, self.shift_index, self.shift_logw))


def exhaustive_subsets(grid, n_images: int) -> PoseSubsets:
    """Every direction, in-plane angle and shift of ``grid`` for each of ``n_images`` images."""
    def every(n, logw):
        return (np.arange(n_images + 1, dtype=np.int64) * n,
                np.tile(np.arange(n, dtype=np.int64), n_images),
                np.tile(np.asarray(logw, np.float64), n_images))

    return PoseSubsets(grid.n_inp, *every(grid.n_dir, grid.dir_log_weights),
                       *every(grid.n_inp, grid.inp_log_weights),
                       *every(grid.n_shift, grid.shift_log_weights))


def empty_map_subsets(grid, n_images: int) -> PoseSubsets:
    """The poses that give -log p(I | V = 0) exactly: one direction and shift, every in-plane angle.

    With an empty volume the energy of a turned image is ``|d_p|^2 / 2 s2`` whatever the
    direction and shift, so summing over the in-plane angles alone is exact: the likelihood of the
    images as pure noise, on the same footing as any map's.
    """
    one = np.arange(n_images + 1, dtype=np.int64)
    zeros_i, zeros_w = np.zeros(n_images, np.int64), np.zeros(n_images, np.float64)
    return PoseSubsets(grid.n_inp, one, zeros_i, zeros_w,
                       np.arange(n_images + 1, dtype=np.int64) * grid.n_inp,
                       np.tile(np.arange(grid.n_inp, dtype=np.int64), n_images),
                       np.tile(np.asarray(grid.inp_log_weights, np.float64), n_images),
                       one.copy(), zeros_i.copy(), zeros_w.copy())


@dataclass
class LikelihoodResult:
    """Output of :func:`marginal_nll` (see ``docs/engine_api.md``)."""

    nll: np.ndarray
    grad: np.ndarray | None
    rot_post: np.ndarray
    shift_post: np.ndarray
    best_rot: np.ndarray
    best_shift: np.ndarray
    n_evaluated: int


@numba.njit(cache=jit.CACHE, fastmath=jit.FASTMATH, inline="always")
def _sin(x):
    """sin(x) for float64 ``x`` without a library call, so loops calling it vectorise.

    Reduced by multiples of pi (Cody-Waite, two parts), then the Taylor polynomial to x^13 on
    [-pi/2, pi/2]: absolute error below 1e-9 for |x| < 5,000 (tested against numpy.sin; CTF
    phases reach ~30 rad at 1/10 A and 5 um defocus, hundreds at finer sampling).
    """
    n = np.rint(x * 0.3183098861837907)
    r = (x - n * 3.141592653589793) - n * 1.2246467991473532e-16
    r2 = r * r
    poly = r * (1.0 + r2 * (-1.0 / 6.0 + r2 * (1.0 / 120.0 + r2 * (-1.0 / 5040.0 + r2 * (
        1.0 / 362880.0 + r2 * (-1.0 / 39916800.0 + r2 * (1.0 / 6227020800.0)))))))
    return poly * (1.0 - 2.0 * (np.int64(n) & 1))


@numba.njit(cache=jit.CACHE, fastmath=jit.FASTMATH)
def _ctf_constants(p, freq_scale):
    """Per image, RELION's CTF as ``sin(chi) * envelope`` with ``chi`` a polynomial in (x, y).

    With ``s2 = x^2 + y^2`` in Fourier pixels and the astigmatism angle ``ang``:
    ``chi = a s2 + b ((x^2 - y^2) cos 2ang + 2xy sin 2ang) + c s2^2 + phase``, the amplitude
    contrast ``q`` folded into the phase as ``arcsin(q)`` (``sqrt(1-q^2) sin chi + q cos chi``
    is ``sin(chi + arcsin q)``). Returns ``a, b cos 2ang, 2 b sin 2ang, c, phase, bfactor'``.
    """
    du, dv, ang, lam, cs, q, bf, ps = p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]
    f2 = freq_scale * freq_scale
    a = np.pi * lam * 0.5 * (du + dv) * f2
    b = np.pi * lam * 0.5 * (du - dv) * f2
    c = -0.5 * np.pi * cs * lam * lam * lam * f2 * f2
    return a, b * np.cos(2.0 * ang), 2.0 * b * np.sin(2.0 * ang), c, ps + np.arcsin(q), \
        -bf * f2 / 4.0


@numba.njit(cache=jit.CACHE, fastmath=jit.FASTMATH)
def _turn_image(flat, m, pad, centre, chi0, astigmatism, p2, kx, ky, weights, envelope, offset,
                fxs, fys, b_re, b_im, c2, wc2):
    """One in-plane turn of an image: the factors of its columns at ``P k'``.

    ``B = w c conj(d)`` (``b_re``, ``b_im``), ``c^2`` and ``w c^2`` at the turned frequencies,
    with ``d`` read bilinearly from the image's padded transform (``m x m``, as interleaved
    float32 ``flat``; zero outside it) and the CTF ``c = sin(chi) envelope`` exact. A turn
    leaves ``|k|`` and so ``chi0`` (defocus, Cs, phase) and ``envelope`` (B-factor) unchanged;
    only the astigmatic term turns, as the quadratic form ``A kx^2 + B kx ky + C ky^2`` of the
    unturned frequencies (``astigmatism = (A, B, C)``). A first loop, free of library calls and
    gathers, vectorises; a second does the gathers. ``offset``, ``fxs``, ``fys`` are scratch of
    the coefficients' length.
    """
    qa, qb, qc = astigmatism
    for k in range(np.uint64(kx.shape[0])):
        x = p2[0, 0] * kx[k] + p2[0, 1] * ky[k]
        y = p2[1, 0] * kx[k] + p2[1, 1] * ky[k]
        chi = chi0[k] + (qa * kx[k] + qb * ky[k]) * kx[k] + qc * ky[k] * ky[k]
        ctf = _sin(chi) * envelope[k]
        qx = pad * x + centre
        qy = pad * y + centre
        x0 = min(max(np.floor(qx), 0.0), m - 2.0)
        y0 = min(max(np.floor(qy), 0.0), m - 2.0)
        fx = qx - x0
        fy = qy - y0
        inside = np.float64((fx >= 0.0) & (fx <= 1.0) & (fy >= 0.0) & (fy <= 1.0))
        fxs[k] = fx
        fys[k] = fy
        offset[k] = np.uint32(2.0 * (y0 * m + x0))
        b_re[k] = weights[k] * ctf * inside  # w c, times d below
        c2[k] = ctf * ctf
        wc2[k] = weights[k] * ctf * ctf
    row = np.uint64(2 * m)
    # Bilinear as two lerps along x, then one along y: fewer multiplies than the four weights
    # (with float32 fractions and 32-bit offsets, 3.8 -> 1.9 ns a coefficient).
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
        b_im[k] = -wc * (lo_im + fy * (hi_im - lo_im))


@numba.njit(cache=jit.CACHE, fastmath=jit.FASTMATH)
def _fill_columns(zt, p_lo, p_hi, n_s, b_re, b_im, inp_idx, p2_all, sh_idx, shifts, row_start,
                  row_len, row_kx0, row_ky, kx_min, n_kx, n_ky, box):
    """Rows ``[Re Z | -Im Z]`` of ``zt`` for in-plane angles ``p_lo:p_hi`` x every shift.

    ``Z_ps(k') = B_p(k') phi(k')`` with the phase of the shift turned with the image,
    ``exp(2 pi i k'.(P^T t) / box) = ex(kx') ey(ky')``: two 1D tables built by recurrence (two
    sines and cosines per column), then one complex product per coefficient along each row of
    the coefficients, where ``kx'`` runs contiguously (the loop vectorises).
    """
    k_coef = np.uint64(b_re.shape[1])
    ex_re = np.empty(n_kx, dtype=np.float32)
    ex_im = np.empty(n_kx, dtype=np.float32)
    ey_re = np.empty(n_ky, dtype=np.float32)
    ey_im = np.empty(n_ky, dtype=np.float32)
    for p in range(p_lo, p_hi):
        a = p2_all[inp_idx[p]]
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
                # that keeps LLVM from vectorising the loop (measured 6x slower).
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
def _prepare_image(data_i, padded_i, pad, centre, ctf_i, freq_scale, p2_all, inp_idx_i, kx, ky,
                   weights, b_re, b_im, c2, wc2):
    """``|d|^2`` of the unturned image, and its column factors for each in-plane angle.

    ``|d|^2`` is the exact one: the turned image's would add the noise power's sampling
    difference on the turned grid, ~sqrt(K) nats, to each in-plane angle.
    """
    dnorm = 0.0
    for k in range(data_i.shape[0]):
        dnorm += weights[k] * (data_i[k].real ** 2 + data_i[k].imag ** 2)
    a, bc, bs, cc, phase, b_factor = _ctf_constants(ctf_i, freq_scale)
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
    flat = padded_i.ravel().view(np.float32)  # interleaved real and imaginary parts
    for p in range(inp_idx_i.shape[0]):
        r = p2_all[inp_idx_i[p]]
        # bc (x^2 - y^2) + bs x y at (x, y) = r (kx, ky), as a quadratic form in (kx, ky).
        astigmatism = (bc * (r[0, 0] ** 2 - r[1, 0] ** 2) + bs * r[0, 0] * r[1, 0],
                       2.0 * bc * (r[0, 0] * r[0, 1] - r[1, 0] * r[1, 1])
                       + bs * (r[0, 0] * r[1, 1] + r[0, 1] * r[1, 0]),
                       bc * (r[0, 1] ** 2 - r[1, 1] ** 2) + bs * r[0, 1] * r[1, 1])
        _turn_image(flat, padded_i.shape[0], pad, centre, chi0, astigmatism, r, kx, ky, weights,
                    envelope, offset, fxs, fys, b_re[p], b_im[p], c2[p], wc2[p])
    return dnorm


@numba.njit(cache=jit.CACHE, fastmath=jit.FASTMATH)
def _gather_slices(s_parts, loc, sub, sub_abs2):
    """The rows ``loc`` of ``s_parts`` into ``sub``, and their ``|S|^2``."""
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
def _accumulate(h, s_u, grad_z_a, ctf_term_a, inv_weights):
    """``h += ctf_term S - conj(sum gamma Z) / w``, in ``[Re, Im]`` parts.

    ``grad_z_a`` is ``[sum gamma Re Z, -sum gamma Im Z]``, i.e. ``conj(sum gamma Z)``.
    """
    n_k = np.uint64(ctf_term_a.shape[0])
    for k in range(n_k):
        h[k] += ctf_term_a[k] * s_u[k] - inv_weights[k] * grad_z_a[k]
        h[n_k + k] += ctf_term_a[k] * s_u[n_k + k] - inv_weights[k] * grad_z_a[n_k + k]


@numba.njit(cache=jit.CACHE, fastmath=jit.FASTMATH)
def _accumulate_merged(h, s_u, g_a, inv_weights):
    """:func:`_accumulate` from one row of the merged gradient GEMM, ``[conj(sum gamma Z),
    -sum_p Gamma_dp w c_p^2 / 2]``: the CTF term is ``-2 / w`` times its last ``K``."""
    n_k = np.uint64(inv_weights.shape[0])
    for k in range(n_k):
        c = np.float32(-2.0) * g_a[np.uint64(2) * n_k + k]
        h[k] += inv_weights[k] * (c * s_u[k] - g_a[k])
        h[n_k + k] += inv_weights[k] * (c * s_u[n_k + k] - g_a[n_k + k])


@numba.njit(cache=jit.CACHE, fastmath=jit.FASTMATH)
def _columns(i0, n_img, inp_off, inp_logw, sh_off, sh_logw, sigma2):
    """The layout of images ``i0:i0 + n_img``'s columns side by side, and their parameters.

    Image ``u``'s in-plane angles are ``p_start[u]:p_start[u + 1]`` of the group's, its columns
    ``c_start[u]:c_start[u + 1]``, in-plane angle major and shift minor. Per column: its log
    prior weight (in-plane angle and shift), ``1 / (2 s2)`` and its in-plane angle's column in
    the norm matrix; per in-plane angle, its number of shifts (``run``). ``contiguous``: one
    shift per in-plane angle everywhere.
    """
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
    return p_start, c_start, (col_lw, col_inv, norm_col, contiguous), run


@numba.njit(cache=jit.CACHE, fastmath=jit.FASTMATH)
def _posteriors(gamma, norm, columns, dir_lw, i0, p_start, c_start, dnorms, sigma2, sh_off,
                rot_off, want_grad, nll, rot_post, shift_post, best_dir, best_inp, best_shift):
    """From the cross terms in ``gamma`` (``(n_d, C)``, images ``i0:`` side by side, laid out by
    :func:`_columns`) to each image's nll, marginals and best pose; with ``want_grad``, ``gamma``
    is left holding the posteriors times ``1 / s2``, the weights of the gradient's GEMMs."""
    n_c = gamma.shape[1]
    col_lw, col_inv, norm_col, contiguous = columns
    col_max = np.empty(n_c, dtype=np.float32)
    col_ref = np.empty(n_c, dtype=np.float32)
    col_sum = np.empty(n_c)
    column_logits(gamma, norm, norm_col, contiguous, col_lw, col_inv, dir_lw, col_max)
    n_img = c_start.shape[0] - 1
    for u in range(n_img):
        image_maximum(col_max, c_start[u], c_start[u + 1], col_ref)
    exp_columns(gamma, col_ref, col_sum)
    col_factor = np.empty(n_c, dtype=np.float32)
    for u in range(n_img):
        i = i0 + u
        n_s = sh_off[i + 1] - sh_off[i]
        total, best_dir[i], best_c = image_posteriors(
            gamma, c_start[u], p_start[u + 1] - p_start[u], n_s, col_max, col_sum,
            rot_post[rot_off[i]:rot_off[i + 1]], shift_post[sh_off[i]:sh_off[i + 1]])
        nll[i] = -(np.float64(col_ref[c_start[u]]) + np.log(total)
                   - dnorms[u] / (2.0 * sigma2[i]))
        best_inp[i] = best_c // n_s
        best_shift[i] = best_c % n_s
        col_factor[c_start[u]:c_start[u + 1]] = (1.0 / (sigma2[i] * total) if total > 0.0
                                                 else np.nan)  # NaN energies: a NaN gradient
    if want_grad:
        scale_columns(gamma, col_factor)


@numba.njit(cache=jit.CACHE, fastmath=jit.FASTMATH)
def _ctf_term(gamma, contiguous, run, c2):
    """The gradient's CTF term ``sum_p Gamma_dp c_p^2``, ``Gamma_dp`` summed over shifts."""
    if contiguous:  # one shift per in-plane angle: Gamma_dp is gamma
        return np.dot(gamma, c2)
    gamma_dp = np.empty((gamma.shape[0], run.shape[0]), dtype=np.float32)
    sum_over_shifts(gamma, run, gamma_dp)
    return np.dot(gamma_dp, c2)


@numba.njit(parallel=True, cache=jit.CACHE, fastmath=jit.FASTMATH)
def _batch_kernel(s_parts, data, padded, pad, centre, ctf_params, freq_scale, weights, sigma2,
                  kx, ky, row_start, row_len, row_kx0, row_ky, kx_min, n_kx, n_ky, box, p2_all,
                  shifts, dir_off, dir_loc, dir_logw, inp_off, inp_idx, inp_logw,
                  sh_off, sh_idx, sh_logw, rot_off, want_grad, col_budget,
                  nll, rot_post, shift_post, best_dir, best_inp, best_shift, acc_h):
    """Energies, log-sum-exp, posteriors and gradient accumulators, image by image.

    ``s_parts`` is ``[Re S, Im S]`` of the union directions' slices ``(n_u, 2K)`` float32;
    ``dir_loc`` indexes the union. Per thread, ``acc_h (T, n_u, 2K)`` gathers ``[Re, Im]`` of
    ``sum_i (sum_p Gamma_dp c_p^2 S_d - conj(sum_ps gamma_dps Z_ps) / w) / s2``. An image's
    columns are built in chunks of ``col_budget`` at most.
    """
    n_images = data.shape[0]
    k_coef = data.shape[1]
    inv_weights = 1.0 / weights
    for i in numba.prange(n_images):
        tid = numba.get_thread_id()
        d0, d1 = dir_off[i], dir_off[i + 1]
        p0, p1 = inp_off[i], inp_off[i + 1]
        s0, s1 = sh_off[i], sh_off[i + 1]
        n_d = d1 - d0
        n_p = p1 - p0
        n_s = s1 - s0
        n_cols = n_p * n_s
        p_start, c_start, columns, run = _columns(i, 1, inp_off, inp_logw, sh_off, sh_logw,
                                                  sigma2)
        b_re = np.empty((n_p, k_coef), dtype=np.float32)
        b_im = np.empty((n_p, k_coef), dtype=np.float32)
        c2 = np.empty((n_p, k_coef), dtype=np.float32)
        wc2 = np.empty((n_p, k_coef), dtype=np.float32)
        dnorms = np.empty(1)
        dnorms[0] = _prepare_image(data[i], padded[i], pad, centre, ctf_params[i], freq_scale,
                                   p2_all, inp_idx[p0:p1], kx, ky, weights, b_re, b_im, c2,
                                   wc2)
        sub = np.empty((n_d, 2 * k_coef), dtype=np.float32)
        sub_abs2 = np.empty((n_d, k_coef), dtype=np.float32)
        _gather_slices(s_parts, dir_loc[d0:d1], sub, sub_abs2)
        norm = np.dot(sub_abs2, wc2.T)  # (n_d, n_p)
        p_chunk = max(1, min(n_p, col_budget // max(1, n_s)))
        # With a single chunk (the usual case) its columns are kept for the gradient pass.
        single = p_chunk >= n_p
        zt_kept = np.empty((n_cols if single else 0, 2 * k_coef), dtype=np.float32)
        gamma = np.empty((n_d, n_cols), dtype=np.float32)
        for c0 in range(0, n_p, p_chunk):
            c1 = min(n_p, c0 + p_chunk)
            zt = zt_kept if single else np.empty(((c1 - c0) * n_s, 2 * k_coef),
                                                 dtype=np.float32)
            _fill_columns(zt, c0, c1, n_s, b_re, b_im, inp_idx[p0:p1], p2_all, sh_idx[s0:s1],
                          shifts, row_start, row_len, row_kx0, row_ky, kx_min, n_kx, n_ky, box)
            if single:
                np.dot(sub, zt.T, gamma)
            else:
                gamma[:, c0 * n_s:c1 * n_s] = np.dot(sub, zt.T)
        _posteriors(gamma, norm, columns, dir_logw[d0:d1], i, p_start, c_start, dnorms, sigma2,
                    sh_off, rot_off, want_grad, nll, rot_post, shift_post, best_dir, best_inp,
                    best_shift)
        if want_grad:
            if single:
                grad_z = np.dot(gamma, zt_kept)
            else:
                grad_z = np.zeros((n_d, 2 * k_coef), dtype=np.float32)
                for c0 in range(0, n_p, p_chunk):
                    c1 = min(n_p, c0 + p_chunk)
                    zt = np.empty(((c1 - c0) * n_s, 2 * k_coef), dtype=np.float32)
                    _fill_columns(zt, c0, c1, n_s, b_re, b_im, inp_idx[p0:p1], p2_all,
                                  sh_idx[s0:s1], shifts, row_start, row_len, row_kx0, row_ky,
                                  kx_min, n_kx, n_ky, box)
                    g_chunk = np.ascontiguousarray(gamma[:, c0 * n_s:c1 * n_s])
                    grad_z += np.dot(g_chunk, zt)
            ctf_term = _ctf_term(gamma, columns[3], run, c2)
            for a in range(n_d):
                u = dir_loc[d0 + a]
                _accumulate(acc_h[tid, u], s_parts[u], grad_z[a], ctf_term[a], inv_weights)


@numba.njit(parallel=True, cache=jit.CACHE, fastmath=jit.FASTMATH)
def _shared_kernel(s_parts, data, padded, pad, centre, ctf_params, freq_scale, weights, sigma2,
                   kx, ky, row_start, row_len, row_kx0, row_ky, kx_min, n_kx, n_ky, box, p2_all,
                   shifts, group_off, dir_off, dir_loc, dir_logw, inp_off, inp_idx, inp_logw,
                   sh_off, sh_idx, sh_logw, rot_off, want_grad,
                   nll, rot_post, shift_post, best_dir, best_inp, best_shift, acc_h):
    """As :func:`_batch_kernel`, for groups of images that evaluate the same directions with
    the same weights.

    Group ``g`` is images ``group_off[g]:group_off[g + 1]``. Their columns side by side make one
    GEMM per group instead of one small GEMM per image (on the first stages a whole minibatch
    shares the full grid, and an image has as few as 20 columns), and the gradient's two GEMMs
    sum over the group's images at once, the posteriors carrying each image's ``1 / s2``.
    """
    k_coef = data.shape[1]
    inv_weights = 1.0 / weights
    # With one shift per in-plane angle everywhere (the first stages), the norm term has a
    # column per column of the cross term, and the two merge into one GEMM with 3K rows:
    # [Re S, Im S, |S|^2] . [Re Z, -Im Z, -w c^2 / 2] = cross - norm / 2, and the gradient's two
    # GEMMs merge the same way (128 px at 1/40 A, 40 images: 2.94 -> 2.67 ms, 5.2 -> 4.7 ms with
    # the gradient: one call instead of two, and no norm matrix to write and read back).
    merged = True
    for i in range(data.shape[0]):
        merged = merged and sh_off[i + 1] - sh_off[i] == 1
    width = 3 * k_coef if merged else 2 * k_coef
    # Every image's directions are the first image's: their slices are gathered once.
    d0, d1 = dir_off[0], dir_off[1]
    n_d = d1 - d0
    sub = np.empty((n_d, width), dtype=np.float32)
    sub_abs2 = np.empty((n_d, k_coef), dtype=np.float32)
    _gather_slices(s_parts, dir_loc[d0:d1], sub, sub_abs2)
    if merged:
        sub[:, 2 * k_coef:] = sub_abs2
    for g in numba.prange(group_off.shape[0] - 1):
        tid = numba.get_thread_id()
        i0, i1 = group_off[g], group_off[g + 1]
        n_img = i1 - i0
        p_start, c_start, columns, run = _columns(i0, n_img, inp_off, inp_logw, sh_off,
                                                  sh_logw, sigma2)
        b_re = np.empty((p_start[n_img], k_coef), dtype=np.float32)
        b_im = np.empty((p_start[n_img], k_coef), dtype=np.float32)
        c2 = np.empty((p_start[n_img], k_coef), dtype=np.float32)
        wc2 = np.empty((p_start[n_img], k_coef), dtype=np.float32)
        zt = np.empty((c_start[n_img], width), dtype=np.float32)
        dnorms = np.empty(n_img)
        for u in range(n_img):
            i = i0 + u
            pa, pb = p_start[u], p_start[u + 1]
            dnorms[u] = _prepare_image(data[i], padded[i], pad, centre, ctf_params[i],
                                       freq_scale, p2_all, inp_idx[inp_off[i]:inp_off[i + 1]],
                                       kx, ky, weights, b_re[pa:pb], b_im[pa:pb], c2[pa:pb],
                                       wc2[pa:pb])
            _fill_columns(zt[c_start[u]:c_start[u + 1]], 0, pb - pa, sh_off[i + 1] - sh_off[i],
                          b_re[pa:pb], b_im[pa:pb], inp_idx[inp_off[i]:inp_off[i + 1]],
                          p2_all, sh_idx[sh_off[i]:sh_off[i + 1]], shifts, row_start, row_len,
                          row_kx0, row_ky, kx_min, n_kx, n_ky, box)
            if merged:
                zt[c_start[u]:c_start[u + 1], 2 * k_coef:] = np.float32(-0.5) * wc2[pa:pb]
        gamma = np.empty((n_d, c_start[n_img]), dtype=np.float32)
        np.dot(sub, zt.T, gamma)  # the cross terms (less half the norm terms, if merged)
        if merged:
            norm = np.empty((n_d, 0), dtype=np.float32)
        else:
            norm = np.dot(sub_abs2, wc2.T)  # (n_d, all in-plane angles of the group)
        _posteriors(gamma, norm, columns, dir_logw[d0:d1], i0, p_start, c_start, dnorms, sigma2,
                    sh_off, rot_off, want_grad, nll, rot_post, shift_post, best_dir, best_inp,
                    best_shift)
        if want_grad:  # summed over the group's images
            if merged:
                both = np.dot(gamma, zt)
                for a in range(n_d):
                    u = dir_loc[d0 + a]
                    _accumulate_merged(acc_h[tid, u], s_parts[u], both[a], inv_weights)
            else:
                grad_z = np.dot(gamma, zt)
                ctf_term = _ctf_term(gamma, columns[3], run, c2)
                for a in range(n_d):
                    u = dir_loc[d0 + a]
                    _accumulate(acc_h[tid, u], s_parts[u], grad_z[a], ctf_term[a], inv_weights)


@numba.njit(parallel=True, cache=jit.CACHE, fastmath=jit.FASTMATH)
def _sum_over_threads(acc, taper, out):
    """``out[u] = taper * sum_t (acc[t, u, :K] + i acc[t, u, K:])``: the threads' accumulators."""
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


def shift_phases(op: SliceOperator, shifts_px: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``phi_s(k) = exp(2 pi i k.t_s / box)`` at the operator's coefficients, float32 parts."""
    t = np.asarray(shifts_px, dtype=np.float64).reshape(-1, 2)
    angle = 2 * np.pi * (np.outer(t[:, 0], op.kx) + np.outer(t[:, 1], op.ky)) / op.box
    return (np.ascontiguousarray(np.cos(angle), dtype=np.float32),
            np.ascontiguousarray(np.sin(angle), dtype=np.float32))


def edge_taper(op: SliceOperator) -> np.ndarray:
    """Per-coefficient weight falling smoothly to 0 over the last ``TAPER_PX`` inside the cutoff.

    The turned image's coefficients are a rotated copy of the grid: with a hard cutoff, which
    points fall inside the circle changes with the angle, and sums over them of the model's or
    the data's power change by the power on that rim, which is large on the small discs of the
    first stages (measured: 96 nats at the true pose on a 13-coefficient disc at SNR 4). A soft
    edge makes those sums sample a smooth function instead.
    """
    rho = np.hypot(op.kx.astype(np.float64), op.ky.astype(np.float64))
    edge = np.clip((rho - (op.radius - TAPER_PX)) / TAPER_PX, 0.0, 1.0)
    return (0.5 * (1.0 + np.cos(np.pi * edge))).astype(np.float32)


TAPER_PX = 1.5
MAX_DIRECTIONS_PER_BLOCK = 4000  # distinct directions per block: bounds slices and accumulators
# Per thread, the (in-plane x shift) columns built at once: large enough that an importance
# sample's columns are built once and kept for the gradient pass.
COLUMN_BYTES = 32 << 20
# Per group of images sharing their directions: their columns, cross terms and posteriors, kept
# within about half of a core's L2 cache (measured at 128 px / 1/40 A on 200 images: 69 GFLOP/s
# with 1 MB groups, 63 with 2 MB, 57 with 32 MB).
GROUP_BYTES = 1 << 20


def locality_order(rotations: np.ndarray, band: float = 0.1) -> np.ndarray:
    """An order of directions in which consecutive slices cross nearby parts of the cube.

    Directions in bands of ``band`` rad of tilt, each band swept in rotation angle alternately
    up and down, so a thread's next slice mostly reads cache lines its last one loaded
    (measured: 3,516 slices of 2,013 coefficients 0.080 -> 0.058 s; bands of 0.02 rad were
    slower than no order, 0.05 about as good).
    """
    view = np.asarray(rotations)[:, 2, :]
    tilt = np.arccos(np.clip(view[:, 2], -1.0, 1.0))
    rot = np.arctan2(view[:, 1], view[:, 0])
    index = np.floor(tilt / band).astype(np.int64)
    return np.lexsort((np.where(index % 2 == 1, -rot, rot), index))


def common_directions(subsets: PoseSubsets) -> np.ndarray | None:
    """The directions every image evaluates, in order, if they all evaluate the same ones with
    the same log prior weights (the group kernel gives a group's images one row of weights)."""
    n = subsets.n_images
    counts = np.diff(subsets.dir_offsets)
    if n < 2 or np.any(counts != counts[0]):
        return None
    first = subsets.dir_index[:counts[0]]
    for values in (subsets.dir_index, subsets.dir_logw):
        if not np.array_equal(values.reshape(n, -1),
                              np.broadcast_to(values[:counts[0]], (n, counts[0]))):
            return None
    return first


def shared_groups(subsets: PoseSubsets, shared: bool, n_union: int, n_coef: int,
                  n_threads: int) -> np.ndarray | None:
    """Bounds of groups of images for :func:`_shared_kernel`, or None to go image by image.

    Groups are used when every image evaluates the same directions (``shared``: a stage without
    importance sampling, or an empty map's null likelihood), in equal groups of at most
    ``GROUP_BYTES`` of columns, cross terms and posteriors, and at least two groups per thread
    to balance them.
    """
    n = subsets.n_images
    if not shared or n < 2:
        return None
    cols = int((np.diff(subsets.inp_offsets) * np.diff(subsets.shift_offsets)).max())
    per_image = cols * (2 * n_coef + 2 * n_union) * 4
    size = min(GROUP_BYTES // max(1, per_image), -(-n // (2 * n_threads)))
    if size < 2:
        return None
    return np.r_[np.arange(0, n, size), n].astype(np.int64)


@functools.cache
def _blas_controller() -> ThreadpoolController:
    """One controller for the process: building one scans every loaded library (0.13 ms)."""
    return ThreadpoolController()


def _operator_constants(op: SliceOperator) -> tuple:
    """The kernels' per-operator arrays, made once per operator (they cost ~0.2 ms a call).

    Returns the edge taper and ``(weights, kx, ky, row_start, row_len, row_kx0, row_ky, kx_min,
    n_kx, n_ky, box)`` in the kernels' argument order.
    """
    cached = getattr(op, "_likelihood_constants", None)
    if cached is None:
        taper = edge_taper(op)
        kxi = op.kx.astype(np.int64)
        kyi = op.ky.astype(np.int64)
        cached = (taper, ((op.weights * taper).astype(np.float32), op.kx.astype(np.float64),
                          op.ky.astype(np.float64), *coefficient_rows(op), int(kxi.min()),
                          int(kxi.max() - kxi.min() + 1), int(kyi.max() + 1), float(op.box)))
        op._likelihood_constants = cached
    return cached


def coefficient_rows(op: SliceOperator) -> tuple[np.ndarray, ...]:
    """The operator's coefficients as rows of constant ``ky``: start, length, first ``kx``, ``ky``.

    The coefficients are ordered by ``ky`` then ``kx`` (the half plane of a centred spectrum),
    so each row is a contiguous run of consecutive ``kx``.
    """
    kx = op.kx.astype(np.int64)
    ky = op.ky.astype(np.int64)
    start = np.flatnonzero(np.r_[True, ky[1:] != ky[:-1]])
    length = np.diff(np.r_[start, len(ky)])
    if np.any(np.diff(kx)[np.diff(ky) == 0] != 1):
        raise RuntimeError("the operator's coefficients are not in rows of consecutive kx")
    return (start.astype(np.int64), length.astype(np.int64), kx[start], ky[start])


def _cached(subsets: PoseSubsets, name: str, grid, compute):
    """``compute()``, kept on ``subsets`` (for ``grid``): a line search evaluates one set of
    subsets several times, and at the first stages these cost as much as a third of the
    kernel's time (40 images of 64 px at 1/40 A)."""
    memo = subsets.__dict__.setdefault("_memo", {})
    hit = memo.get(name)
    if hit is None or hit[0] is not grid:
        hit = memo[name] = (grid, compute())
    return hit[1]


def _distinct_directions(subsets: PoseSubsets, grid, shared_dirs: np.ndarray | None):
    """The rotations of the distinct directions the images evaluate, in :func:`locality_order`,
    and for each (image, direction) its row among them."""
    if shared_dirs is not None:
        # Every image evaluates the same directions (no sorting of n_images x n_dir indices).
        union, first_loc = np.unique(shared_dirs, return_inverse=True)
        dir_loc = np.tile(first_loc, subsets.n_images)
    else:
        union, dir_loc = np.unique(subsets.dir_index, return_inverse=True)
    rotations = np.asarray(grid.direction_rotations)[union]
    order = locality_order(rotations)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rotations[order], rank[dir_loc.ravel()].astype(np.int64)


def marginal_nll(op: SliceOperator, volume: np.ndarray, batch: ImageBatch, grid,
                 subsets: PoseSubsets, want_grad: bool = True, cube=None) -> LikelihoodResult:
    """Negative log marginal likelihood of each image, with posteriors and the gradient.

    Images are processed in blocks that sample at most ``MAX_DIRECTIONS_PER_BLOCK`` distinct
    directions between them, so memory stays bounded whatever the batch and its subsets;
    see :func:`_marginal_nll_block` for the parameters.
    """
    cube = op.prepare(volume) if cube is None else cube
    # Memory follows the block's *distinct* directions (slices and accumulators are per distinct
    # direction, shared by the images that sample it): images sharing a grid, as on an
    # exhaustive stage, go in one block and are sliced once.
    shared_dirs = _cached(subsets, "common_directions", None, lambda: common_directions(subsets))
    if shared_dirs is not None and len(np.unique(shared_dirs)) <= MAX_DIRECTIONS_PER_BLOCK:
        return _marginal_nll_block(op, volume, batch, grid, subsets, want_grad, cube,
                                   shared_dirs)
    seen = np.zeros(grid.n_dir, dtype=bool)
    bounds = [0]
    distinct = 0
    for i in range(subsets.n_images):
        rows = subsets.dir_index[subsets.dir_offsets[i]:subsets.dir_offsets[i + 1]]
        new = int(np.count_nonzero(~seen[rows]))
        if distinct and distinct + new > MAX_DIRECTIONS_PER_BLOCK:
            bounds.append(i)
            seen[:] = False
            distinct, new = 0, len(np.unique(rows))
        seen[rows] = True
        distinct += new
    bounds.append(subsets.n_images)
    if len(bounds) == 2:
        return _marginal_nll_block(op, volume, batch, grid, subsets, want_grad, cube,
                                   shared_dirs)
    parts = [_marginal_nll_block(op, volume, batch.take(slice(lo, hi)), grid,
                                 subsets.block(lo, hi), want_grad, cube, shared_dirs)
             for lo, hi in itertools.pairwise(bounds)]
    return LikelihoodResult(
        nll=np.concatenate([p.nll for p in parts]),
        grad=sum(p.grad for p in parts) if want_grad else None,
        rot_post=np.concatenate([p.rot_post for p in parts]),
        shift_post=np.concatenate([p.shift_post for p in parts]),
        best_rot=np.concatenate([p.best_rot for p in parts]),
        best_shift=np.concatenate([p.best_shift for p in parts]),
        n_evaluated=sum(p.n_evaluated for p in parts),
    )


def _marginal_nll_block(op: SliceOperator, volume: np.ndarray, batch: ImageBatch, grid,
                        subsets: PoseSubsets, want_grad: bool = True, cube=None,
                        shared_dirs: np.ndarray | None = None) -> LikelihoodResult:
    """Negative log marginal likelihood of each image, with posteriors and the gradient.

    Parameters
    ----------
    op : SliceOperator
    volume : (box, box, box) float32 real-space volume
    batch : ImageBatch (from :func:`make_batch`)
    grid : PoseGrid (``direction_rotations``, ``inplane_matrices``, ``shifts`` in px)
    subsets : PoseSubsets
    want_grad : bool
        Also return the gradient of ``sum_i nll_i`` with respect to ``volume``.
    cube : optional
        ``op.prepare(volume)``, when the caller evaluates the same volume repeatedly.
    shared_dirs : optional
        :func:`common_directions` of ``subsets`` (of the whole batch: a block of it shares them
        too), when every image evaluates the same directions; None otherwise.

    Returns
    -------
    LikelihoodResult
    """
    n_images = len(batch)
    if batch.padded is None:
        raise ValueError("the batch has no padded transforms: build it with make_batch")
    rotations, dir_loc = _cached(subsets, "directions", grid,
                                 lambda: _distinct_directions(subsets, grid, shared_dirs))
    cube = op.prepare(volume) if cube is None else cube
    s_parts = op.slice_parts(cube, rotations)
    n_threads = numba.get_num_threads()
    n_u, k_coef = len(rotations), op.n_coef
    # float32: each entry sums the few images of one block that sample that direction.
    acc_h = scratch.zeroed("likelihood.acc_h", (n_threads, n_u, 2 * k_coef) if want_grad
                           else (1, 1, 1), np.float32)
    nll = np.empty(n_images)
    rot_post = np.empty(int(subsets.rot_offsets[-1]))
    shift_post = np.empty(len(subsets.shift_index))
    best_dir = np.empty(n_images, dtype=np.int64)
    best_inp = np.empty(n_images, dtype=np.int64)
    best_shift = np.empty(n_images, dtype=np.int64)
    col_budget = max(1, COLUMN_BYTES // (8 * k_coef))
    taper, constants = _operator_constants(op)
    common = (s_parts, batch.data, batch.padded, image_padded_size(op.box) / op.box,
              float(batch.padded.shape[1] // 2), batch.ctf_params, float(batch.freq_scale),
              constants[0], batch.sigma2, *constants[1:],
              np.asarray(grid.inplane_matrices, np.float64), np.asarray(grid.shifts, np.float64))
    poses = (subsets.dir_offsets, dir_loc, subsets.dir_logw,
             subsets.inp_offsets, subsets.inp_index, subsets.inp_logw,
             subsets.shift_offsets, subsets.shift_index, subsets.shift_logw, subsets.rot_offsets,
             want_grad)
    outputs = (nll, rot_post, shift_post, best_dir, best_inp, best_shift, acc_h)
    groups = shared_groups(subsets, shared_dirs is not None, n_u, k_coef, n_threads)
    # Each kernel thread calls BLAS on its own images: BLAS's own threads would only contend
    # with them (measured: the forward pass ran 1.9x slower with 2 BLAS threads per call).
    with _blas_controller().limit(limits=1, user_api="blas"):
        if groups is None:
            _batch_kernel(*common, *poses, col_budget, *outputs)
        else:
            _shared_kernel(*common, groups, *poses, *outputs)
    d_index = subsets.dir_index[subsets.dir_offsets[:-1] + best_dir]
    p_index = subsets.inp_index[subsets.inp_offsets[:-1] + best_inp]
    best_rot = d_index * grid.n_inp + p_index
    best_shift = subsets.shift_index[subsets.shift_offsets[:-1] + best_shift]
    grad = None
    if want_grad:
        # With d nll = Re sum_dk H_dk dS_dk, H = w conj(sum_i (c^2 Gamma S - c d conj(g)) / s2),
        # so d nll = sum Re(conj(dS) w conj(H) / w): the volume gradient is the adjoint applied
        # to conj(H) / w = sum_i (c^2 Gamma S - c d conj(g)) / s2.
        # The likelihood's weights are the operator's times the edge taper, which the adjoint
        # (carrying the operator's weights) still needs applied.
        h = np.empty((n_u, k_coef), dtype=np.complex64)
        _sum_over_threads(acc_h, taper, h)
        grad = op.adjoint(h, rotations)
    return LikelihoodResult(nll, grad, rot_post, shift_post, best_rot, best_shift,
                            subsets.n_points)
