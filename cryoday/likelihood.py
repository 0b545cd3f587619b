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
  ``[Re S, -Im S] (n_d x 2K) @ [Re Z; Im Z] (2K x n_p n_s)``, ``Z = w c_p conj(d_p) phi_ps``;
* ``sum_k w c_p^2 |S_d|^2`` does not depend on the shift: ``|S|^2 (n_d x K) @ (K x n_p)``;
* the gradient's data term ``sum_{p,s} gamma_dps conj(Z_ps)`` is the transposed GEMM, and its
  CTF term ``sum_p Gamma_dp c_p^2`` a third one.

Images are processed in parallel (``prange``), each thread calling single-threaded BLAS and
accumulating its share of the gradient per direction in its own buffer; nothing of size
(images x poses x coefficients) is ever formed, and each image's (in-plane x shift) columns are
built in chunks of bounded size.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cached_property

import numba
import numpy as np
import scipy.fft as sfft
from threadpoolctl import threadpool_limits

from cryoday import jit
from cryoday.ctf import electron_wavelength, evaluate_ctf
from cryoday.fourier import ft2
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
    """Each image's zero-padded transform near the origin, ready for bilinear turning."""
    n = op.box
    m = image_padded_size(n)
    x = (np.arange(n) - n // 2) / m
    g = np.sinc(x) ** 2  # real-space image of the bilinear kernel on the padded grid
    padded = np.zeros((len(images), m, m), dtype=np.float32)
    lo = m // 2 - n // 2
    padded[:, lo:lo + n, lo:lo + n] = images / (g[:, None] * g[None, :])
    spectra = ft2(padded)
    pad = m / n
    h = min(int(np.ceil(pad * op.radius)) + 2, m // 2 - 1)
    c = m // 2
    # The unitary transform of a p-times larger array is p times smaller at the same frequency.
    return np.ascontiguousarray(pad * spectra[:, c - h:c + h + 1, c - h:c + h + 1],
                                dtype=np.complex64)


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
    are log quadrature weights (with importance corrections when sampled). The rotations an
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
        parts = []
        for i in range(self.n_images):
            a = dir_values[self.dir_offsets[i]:self.dir_offsets[i + 1]]
            b = inp_values[self.inp_offsets[i]:self.inp_offsets[i + 1]]
            parts.append(combine(a[:, None], b[None, :]).ravel())
        return np.concatenate(parts) if parts else np.zeros(0)

    @cached_property
    def rot_index(self) -> np.ndarray:
        n_inp = self.n_inp
        return self._rot_product(self.dir_index, self.inp_index,
                                 lambda d, p: d * n_inp + p).astype(np.int64)

    @cached_property
    def rot_logw(self) -> np.ndarray:
        return self._rot_product(self.dir_logw, self.inp_logw, np.add)

    @property
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


@numba.njit(cache=jit.CACHE, fastmath=jit.FASTMATH)
def _ctf_at(fx, fy, p):
    """RELION's CTF at one frequency (1/A) for a parameter row of :func:`ctf_parameter_table`."""
    s2 = fx * fx + fy * fy
    du, dv, ang, lam, cs, q, bf, ps = p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]
    # cos 2(alpha - ang) without atan2; at s2 = 0 the defocus term vanishes anyway.
    cos2 = 1.0
    sin2 = 0.0
    if s2 > 0.0:
        cos2 = (fx * fx - fy * fy) / s2
        sin2 = 2.0 * fx * fy / s2
    dz = 0.5 * (du + dv + (cos2 * np.cos(2.0 * ang) + sin2 * np.sin(2.0 * ang)) * (du - dv))
    chi = np.pi * lam * dz * s2 - 0.5 * np.pi * cs * lam * lam * lam * s2 * s2 + ps
    value = np.sqrt(1.0 - q * q) * np.sin(chi) + q * np.cos(chi)
    if bf != 0.0:
        value *= np.exp(-bf * s2 / 4.0)
    return value


@numba.njit(cache=jit.CACHE, fastmath=jit.FASTMATH)
def _turn_image(padded, pad, centre, ctf_params, freq_scale, p2, kx, ky, data_out, ctf_out):
    """The image's coefficients and CTF at ``P k'`` for one in-plane matrix ``p2``."""
    m = padded.shape[0]
    for k in range(kx.shape[0]):
        x = p2[0, 0] * kx[k] + p2[0, 1] * ky[k]
        y = p2[1, 0] * kx[k] + p2[1, 1] * ky[k]
        ctf_out[k] = _ctf_at(x * freq_scale, y * freq_scale, ctf_params)
        qx = pad * x + centre
        qy = pad * y + centre
        x0 = int(np.floor(qx))
        y0 = int(np.floor(qy))
        fx = qx - x0
        fy = qy - y0
        if 0 <= x0 and x0 + 1 < m and 0 <= y0 and y0 + 1 < m:
            data_out[k] = ((1 - fy) * ((1 - fx) * padded[y0, x0] + fx * padded[y0, x0 + 1])
                           + fy * ((1 - fx) * padded[y0 + 1, x0] + fx * padded[y0 + 1, x0 + 1]))
        else:
            data_out[k] = 0j


@numba.njit(cache=jit.CACHE, fastmath=jit.FASTMATH)
def _fill_columns(zt, p_lo, p_hi, n_s, turned, turned_ctf, weights, inp_idx, p2_all, sh_idx,
                  shifts, kxi, kyi, kx_min, ky_max, box):
    """Rows ``[Re Z | Im Z]`` of ``zt`` for in-plane angles ``p_lo:p_hi`` x every shift.

    ``Z_ps(k') = w c_p(k') conj(d_p(k')) phi(k')`` with the phase of the shift turned with the
    image, ``exp(2 pi i k'.(P^T t) / box)``, built from two 1D tables (one complex product per
    coefficient instead of a sine and a cosine).
    """
    k_coef = kxi.shape[0]
    # Scratch tables allocated here rather than by the prange body that calls this: an
    # allocation of loop-invariant size there, written only in a callee, may be hoisted out of
    # the parallel loop and shared by its threads. (A full test run once gave nll ~ -1e19 on some
    # images while these were allocated by the caller; that this was the cause is not proven.)
    ex = np.empty(2 * (-kx_min) + 1, dtype=np.complex64)
    ey = np.empty(ky_max + 1, dtype=np.complex64)
    for p in range(p_lo, p_hi):
        a = p2_all[inp_idx[p]]
        for j in range(n_s):
            t = shifts[sh_idx[j]]
            ux = a[0, 0] * t[0] + a[1, 0] * t[1]
            uy = a[0, 1] * t[0] + a[1, 1] * t[1]
            for q in range(ex.shape[0]):
                angle = 2.0 * np.pi * (q + kx_min) * ux / box
                ex[q] = complex(np.cos(angle), np.sin(angle))
            for q in range(ey.shape[0]):
                angle = 2.0 * np.pi * q * uy / box
                ey[q] = complex(np.cos(angle), np.sin(angle))
            row = (p - p_lo) * n_s + j
            for k in range(k_coef):
                ph = ex[kxi[k] - kx_min] * ey[kyi[k]]
                v = weights[k] * turned_ctf[p, k] * (turned[p, k].conjugate() * ph)
                zt[row, k] = v.real
                zt[row, k_coef + k] = v.imag


@numba.njit(parallel=True, cache=jit.CACHE, fastmath=jit.FASTMATH)
def _batch_kernel(s_real, s_abs2, data, padded, pad, centre, ctf_params, freq_scale, weights, sigma2,
                  kx, ky, kxi, kyi, kx_min, ky_max, box, p2_all, shifts,
                  dir_off, dir_loc, dir_logw, inp_off, inp_idx, inp_logw,
                  sh_off, sh_idx, sh_logw, rot_off, want_grad, col_budget,
                  nll, rot_post, shift_post, best_dir, best_inp, best_shift, acc_b, acc_c):
    """Energies, log-sum-exp, posteriors and gradient accumulators for a minibatch.

    ``s_real`` is ``[Re S, -Im S]`` of the union directions' slices ``(n_u, 2K)`` float32,
    ``s_abs2`` is ``|S|^2``; ``dir_loc`` indexes the union. Per thread, ``acc_b (T, n_u, K)``
    gathers ``sum conj(sum_ps gamma Z_ps) / (w s2)`` and ``acc_c`` ``sum_p Gamma_dp c_p^2 / s2``.
    """
    n_images = data.shape[0]
    k_coef = data.shape[1]
    for i in numba.prange(n_images):
        tid = numba.get_thread_id()
        d0, d1 = dir_off[i], dir_off[i + 1]
        p0, p1 = inp_off[i], inp_off[i + 1]
        s0, s1 = sh_off[i], sh_off[i + 1]
        n_d = d1 - d0
        n_p = p1 - p0
        n_s = s1 - s0
        n_cols = n_p * n_s
        s2 = sigma2[i]
        # |d|^2 of the unturned data (the exact one; the turned image's would add the noise
        # power's sampling difference on the turned grid, ~sqrt(K) nats, to each in-plane angle).
        dnorm = 0.0
        for k in range(k_coef):
            dnorm += weights[k] * (data[i, k].real ** 2 + data[i, k].imag ** 2)
        # The image and its CTF turned by each of its in-plane angles.
        turned = np.empty((n_p, k_coef), dtype=np.complex64)
        turned_ctf = np.empty((n_p, k_coef), dtype=np.float32)
        for p in range(n_p):
            _turn_image(padded[i], pad, centre, ctf_params[i], freq_scale, p2_all[inp_idx[p0 + p]],
                        kx, ky, turned[p], turned_ctf[p])
        c2 = np.empty((n_p, k_coef), dtype=np.float32)
        wc2 = np.empty((n_p, k_coef), dtype=np.float32)
        for p in range(n_p):
            for k in range(k_coef):
                c2[p, k] = turned_ctf[p, k] * turned_ctf[p, k]
                wc2[p, k] = weights[k] * c2[p, k]
        sub = np.empty((n_d, 2 * k_coef), dtype=np.float32)
        sub_abs2 = np.empty((n_d, k_coef), dtype=np.float32)
        for a in range(n_d):
            u = dir_loc[d0 + a]
            sub[a, :] = s_real[u, :]
            sub_abs2[a, :] = s_abs2[u, :]
        norm = np.dot(sub_abs2, wc2.T)  # (n_d, n_p)
        p_chunk = max(1, min(n_p, col_budget // max(1, n_s)))
        logits = np.empty((n_d, n_cols), dtype=np.float64)
        inv = 1.0 / (2.0 * s2)
        best = -np.inf
        best_a = 0
        best_c = 0
        inp_lw = inp_logw[p0:p1]
        sh_lw = sh_logw[s0:s1]
        # With a single chunk (the usual case) its columns are kept for the gradient pass.
        single = p_chunk >= n_p
        zt_kept = np.empty((n_cols if single else 0, 2 * k_coef), dtype=np.float32)
        for c0 in range(0, n_p, p_chunk):
            c1 = min(n_p, c0 + p_chunk)
            zt = zt_kept if single else np.empty(((c1 - c0) * n_s, 2 * k_coef),
                                                 dtype=np.float32)
            _fill_columns(zt, c0, c1, n_s, turned, turned_ctf, weights, inp_idx[p0:p1], p2_all,
                          sh_idx[s0:s1], shifts, kxi, kyi, kx_min, ky_max, box)
            cross = np.dot(sub, zt.T)
            for a in range(n_d):
                lw = dir_logw[d0 + a]
                for p in range(c0, c1):
                    base = lw + inp_lw[p] - (dnorm + norm[a, p]) * inv
                    for j in range(n_s):
                        col = p * n_s + j
                        v = base + sh_lw[j] + 2.0 * cross[a, (p - c0) * n_s + j] * inv
                        logits[a, col] = v
                        if v > best:
                            best = v
                            best_a = a
                            best_c = col
        total = 0.0
        for a in range(n_d):
            for col in range(n_cols):
                # Terms below e^-60 of the best cannot change a float64 sum: skip their exp.
                e_arg = logits[a, col] - best
                e = np.exp(e_arg) if e_arg > -60.0 else 0.0
                logits[a, col] = e
                total += e
        nll[i] = -(best + np.log(total))
        best_dir[i] = best_a
        best_inp[i] = best_c // n_s
        best_shift[i] = best_c % n_s
        gamma = np.empty((n_d, n_cols), dtype=np.float32)
        gamma_dp = np.empty((n_d, n_p), dtype=np.float32)
        for j in range(n_s):
            shift_post[s0 + j] = 0.0
        inv_total = 1.0 / total
        for a in range(n_d):
            for p in range(n_p):
                row = 0.0
                for j in range(n_s):
                    col = p * n_s + j
                    g = logits[a, col] * inv_total
                    # Posteriors below 1e-30 are flushed to zero: as float32 they would be
                    # subnormal, and GEMMs on subnormals run ~50x slower (measured).
                    gamma[a, col] = g if g > 1e-30 else 0.0
                    row += g
                    shift_post[s0 + j] += g
                rot_post[rot_off[i] + a * n_p + p] = row
                gamma_dp[a, p] = row
        if want_grad:
            grad_z = np.zeros((n_d, 2 * k_coef), dtype=np.float32)
            if single:
                grad_z += np.dot(gamma, zt_kept)
            else:
                for c0 in range(0, n_p, p_chunk):
                    c1 = min(n_p, c0 + p_chunk)
                    zt = np.empty(((c1 - c0) * n_s, 2 * k_coef), dtype=np.float32)
                    _fill_columns(zt, c0, c1, n_s, turned, turned_ctf, weights, inp_idx[p0:p1],
                                  p2_all, sh_idx[s0:s1], shifts, kxi, kyi, kx_min, ky_max, box)
                    g_chunk = np.ascontiguousarray(gamma[:, c0 * n_s:c1 * n_s])
                    grad_z += np.dot(g_chunk, zt)
            ctf_term = np.dot(gamma_dp, c2)  # (n_d, K)
            inv_s2 = 1.0 / s2
            for a in range(n_d):
                u = dir_loc[d0 + a]
                for k in range(k_coef):
                    scale = inv_s2 / weights[k]
                    acc_b[tid, u, k] += complex(grad_z[a, k] * scale,
                                                -grad_z[a, k_coef + k] * scale)
                    acc_c[tid, u, k] += ctf_term[a, k] * inv_s2


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
COLUMN_BYTES = 4 << 20  # per thread, the (in-plane x shift) columns built at once


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
        return _marginal_nll_block(op, volume, batch, grid, subsets, want_grad, cube)
    parts = [_marginal_nll_block(op, volume, batch.take(slice(lo, hi)), grid,
                                 subsets.block(lo, hi), want_grad, cube)
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
                        subsets: PoseSubsets, want_grad: bool = True, cube=None
                        ) -> LikelihoodResult:
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

    Returns
    -------
    LikelihoodResult
    """
    n_images = len(batch)
    if batch.padded is None:
        raise ValueError("the batch has no padded transforms: build it with make_batch")
    union, dir_loc = np.unique(subsets.dir_index, return_inverse=True)
    rotations = np.asarray(grid.direction_rotations)[union]
    slices = op.forward(volume, rotations, cube)
    s_real = np.ascontiguousarray(np.concatenate([slices.real, -slices.imag], axis=1),
                                  dtype=np.float32)
    s_abs2 = np.ascontiguousarray(np.abs(slices) ** 2, dtype=np.float32)
    n_threads = numba.get_num_threads()
    n_u, k_coef = len(union), op.n_coef
    acc_shape = (n_threads, n_u, k_coef) if want_grad else (1, 1, 1)
    acc_b = np.zeros(acc_shape, dtype=np.complex128)
    acc_c = np.zeros(acc_shape, dtype=np.float64)
    nll = np.empty(n_images)
    rot_post = np.empty(len(subsets.rot_index))
    shift_post = np.empty(len(subsets.shift_index))
    best_dir = np.empty(n_images, dtype=np.int64)
    best_inp = np.empty(n_images, dtype=np.int64)
    best_shift = np.empty(n_images, dtype=np.int64)
    kxi = op.kx.astype(np.int64)
    kyi = op.ky.astype(np.int64)
    col_budget = max(1, COLUMN_BYTES // (8 * k_coef))
    taper = edge_taper(op)
    weights = (op.weights * taper).astype(np.float32)
    # Each kernel thread calls BLAS on its own image: BLAS's own threads would only contend
    # with them (measured: the forward pass ran 1.9x slower with 2 BLAS threads per call).
    with threadpool_limits(limits=1, user_api="blas"):
        _batch_kernel(s_real, s_abs2, batch.data, batch.padded,
                      image_padded_size(op.box) / op.box, float(batch.padded.shape[1] // 2),
                      batch.ctf_params, float(batch.freq_scale), weights, batch.sigma2,
                      op.kx.astype(np.float64), op.ky.astype(np.float64), kxi, kyi,
                      int(kxi.min()), int(kyi.max()), float(op.box),
                      np.asarray(grid.inplane_matrices, np.float64),
                      np.asarray(grid.shifts, np.float64),
                      subsets.dir_offsets, dir_loc.astype(np.int64).ravel(), subsets.dir_logw,
                      subsets.inp_offsets, subsets.inp_index, subsets.inp_logw,
                      subsets.shift_offsets, subsets.shift_index, subsets.shift_logw,
                      subsets.rot_offsets, want_grad, col_budget, nll, rot_post, shift_post,
                      best_dir, best_inp, best_shift, acc_b, acc_c)
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
        h = (acc_c.sum(axis=0) * slices - acc_b.sum(axis=0)) * taper
        grad = op.adjoint(h, rotations)
    return LikelihoodResult(nll, grad, rot_post, shift_post, best_rot, best_shift,
                            subsets.n_points)
