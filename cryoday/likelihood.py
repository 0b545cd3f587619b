"""Marginal likelihood of particle images over poses and shifts, and its gradient (paper Eq. 4).

For image ``i`` with data ``d`` (its operator coefficients), CTF ``c``, noise variance ``s2`` and a
model slice ``S_r`` at rotation ``r`` shifted by ``t_s``, the energy is

    E_irs = sum_k w_k |d_k - c_k S_rk phi_s(k)|^2 / (2 s2),   phi_s(k) = exp(2 pi i k.t_s / box)

with Hermitian weights ``w``, and ``nll_i = -log sum_{r,s} exp(log W_r + log W_s - E_irs)``.

The hot work is arranged as dense matrix products, which run near the machine's arithmetic peak:

* the cross term over all of an image's rotations and shifts is one real GEMM,
  ``[Re S, -Im S] (n_r x 2K) @ [Re Z; Im Z] (2K x n_s)`` with ``Z_ks = w_k c_k conj(d_k) phi_s(k)``;
* ``sum_k w_k c_k^2 |S_rk|^2`` does not depend on the shift: one GEMV per image;
* the gradient's data term ``sum_s gamma_rs phi_s(k)`` is again a GEMM.

Slices are computed once per minibatch for the union of the rotations its images need, shared by
all of them (so the in-plane rotation is applied to the model, exactly, without interpolating
images). Images are processed in parallel (``prange``), each thread calling single-threaded BLAS
and accumulating its share of the gradient in its own buffer; nothing of size
(images x poses x coefficients) is ever formed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from cryoday import jit
from cryoday.ctf import evaluate_ctf
from cryoday.fourier import ft2
from cryoday.projection import SliceOperator


@dataclass
class ImageBatch:
    """A minibatch in the operator's coefficients.

    Attributes
    ----------
    data : (B, n_coef) complex64, centred unitary transforms of the images at the stage box
    ctf : (B, n_coef) float32
    sigma2 : (B,) float32, noise variance per pixel (= per unitary Fourier coefficient)
    """

    data: np.ndarray
    ctf: np.ndarray
    sigma2: np.ndarray

    def __len__(self) -> int:
        return len(self.data)


def make_batch(op: SliceOperator, images: np.ndarray, ctf_params: dict, pixel_size: float,
               sigma) -> ImageBatch:
    """Transform ``images`` ``(B, box, box)`` and evaluate their CTFs at the coefficients.

    ``ctf_params`` holds ``(B,)`` arrays named as :func:`cryoday.ctf.evaluate_ctf`'s arguments;
    ``sigma`` is the noise standard deviation per pixel (scalar or ``(B,)``).
    """
    images = np.asarray(images, dtype=np.float32)
    data = op.extract(ft2(images))
    scale = 1.0 / (op.box * pixel_size)
    ctf = evaluate_ctf(op.kx * scale, op.ky * scale, **ctf_params)
    ctf = np.broadcast_to(ctf, data.shape).astype(np.float32)
    sigma2 = np.broadcast_to(np.asarray(sigma, dtype=np.float32) ** 2, (len(images),))
    return ImageBatch(data, np.ascontiguousarray(ctf), np.ascontiguousarray(sigma2))


@dataclass
class PoseSubsets:
    """Per-image (ragged) subsets of the grid's rotations and shifts to evaluate.

    Image ``i`` evaluates the product of ``rot_index[rot_offsets[i]:rot_offsets[i+1]]`` and
    ``shift_index[shift_offsets[i]:shift_offsets[i+1]]``; ``rot_logw``/``shift_logw`` are the
    log quadrature weights (with importance corrections when sampled).
    """

    rot_offsets: np.ndarray
    rot_index: np.ndarray
    rot_logw: np.ndarray
    shift_offsets: np.ndarray
    shift_index: np.ndarray
    shift_logw: np.ndarray

    @property
    def n_points(self) -> int:
        return int((np.diff(self.rot_offsets) * np.diff(self.shift_offsets)).sum())


def exhaustive_subsets(grid, n_images: int) -> PoseSubsets:
    """Every rotation and shift of ``grid`` for each of ``n_images`` images."""
    n_rot, n_shift = len(grid.rotations), len(grid.shifts)
    return PoseSubsets(
        rot_offsets=np.arange(n_images + 1, dtype=np.int64) * n_rot,
        rot_index=np.tile(np.arange(n_rot, dtype=np.int64), n_images),
        rot_logw=np.tile(np.asarray(grid.rot_log_weights, np.float64), n_images),
        shift_offsets=np.arange(n_images + 1, dtype=np.int64) * n_shift,
        shift_index=np.tile(np.arange(n_shift, dtype=np.int64), n_images),
        shift_logw=np.tile(np.asarray(grid.shift_log_weights, np.float64), n_images),
    )


def single_pose_subsets(n_images: int) -> PoseSubsets:
    """One pose (the first rotation and shift) of unit weight per image.

    With an empty volume every pose predicts the same (zero) image, so this one pose gives the
    exact -log p(I | V = 0): the likelihood of the images as pure noise.
    """
    one = np.arange(n_images + 1, dtype=np.int64)
    zeros_i, zeros_w = np.zeros(n_images, np.int64), np.zeros(n_images, np.float64)
    return PoseSubsets(one, zeros_i, zeros_w, one.copy(), zeros_i.copy(), zeros_w.copy())


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


@numba.njit(parallel=True, cache=jit.CACHE, fastmath=jit.FASTMATH)
def _batch_kernel(s_real, s_abs2, data, ctf, weights, sigma2, phase_re, phase_im,
                  rot_off, rot_loc, rot_logw, sh_off, sh_idx, sh_logw, want_grad,
                  nll, rot_post, shift_post, best_rot, best_shift, acc_b):
    """Energies, log-sum-exp, posteriors and gradient accumulators for a minibatch.

    ``s_real`` is ``[Re S, -Im S]`` of the union slices ``(n_u, 2K)`` float32, ``s_abs2`` is
    ``|S|^2``; ``rot_loc`` indexes the union. The per-thread accumulator ``acc_b (T, n_u, K)``
    gathers ``sum_i c_ik d_ik conj(sum_s gamma_irs phi_s(k)) / s2_i``.
    """
    n_images = data.shape[0]
    k_coef = data.shape[1]
    for i in numba.prange(n_images):
        tid = numba.get_thread_id()
        r0, r1 = rot_off[i], rot_off[i + 1]
        s0, s1 = sh_off[i], sh_off[i + 1]
        n_r = r1 - r0
        n_s = s1 - s0
        s2 = sigma2[i]
        # Z = w c conj(d) phi_s, stacked as [Re Z; Im Z] (2K x n_s).
        z = np.empty((2 * k_coef, n_s), dtype=np.float32)
        wc2 = np.empty(k_coef, dtype=np.float32)
        dnorm = 0.0
        for k in range(k_coef):
            dr = data[i, k].real
            di = data[i, k].imag
            wc = weights[k] * ctf[i, k]
            wc2[k] = wc * ctf[i, k]
            dnorm += weights[k] * (dr * dr + di * di)
            for j in range(n_s):
                pr = phase_re[sh_idx[s0 + j], k]
                pi = phase_im[sh_idx[s0 + j], k]
                # conj(d) * phi = (dr - i di)(pr + i pi)
                z[k, j] = wc * (dr * pr + di * pi)
                z[k_coef + k, j] = wc * (dr * pi - di * pr)
        sub = np.empty((n_r, 2 * k_coef), dtype=np.float32)
        sub_abs2 = np.empty((n_r, k_coef), dtype=np.float32)
        for a in range(n_r):
            u = rot_loc[r0 + a]
            sub[a, :] = s_real[u, :]
            sub_abs2[a, :] = s_abs2[u, :]
        cross = np.dot(sub, z)
        norm = np.dot(sub_abs2, wc2)
        # Log posterior (unnormalised) in float64.
        logits = np.empty((n_r, n_s), dtype=np.float64)
        best = -np.inf
        best_a = 0
        best_j = 0
        inv = 1.0 / (2.0 * s2)
        for a in range(n_r):
            lw = rot_logw[r0 + a]
            for j in range(n_s):
                e = (dnorm - 2.0 * cross[a, j] + norm[a]) * inv
                v = lw + sh_logw[s0 + j] - e
                logits[a, j] = v
                if v > best:
                    best = v
                    best_a = a
                    best_j = j
        total = 0.0
        for a in range(n_r):
            for j in range(n_s):
                p = np.exp(logits[a, j] - best)
                logits[a, j] = p
                total += p
        nll[i] = -(best + np.log(total))
        best_rot[i] = best_a
        best_shift[i] = best_j
        gamma = np.empty((n_r, n_s), dtype=np.float32)
        for j in range(n_s):
            shift_post[s0 + j] = 0.0
        for a in range(n_r):
            row = 0.0
            for j in range(n_s):
                g = logits[a, j] / total
                gamma[a, j] = g
                row += g
                shift_post[s0 + j] += g
            rot_post[r0 + a] = row
        if want_grad:
            # sum_s gamma_rs phi_s(k): two real GEMMs (n_r x n_s) @ (n_s x K).
            ph_re = np.empty((n_s, k_coef), dtype=np.float32)
            ph_im = np.empty((n_s, k_coef), dtype=np.float32)
            for j in range(n_s):
                ph_re[j, :] = phase_re[sh_idx[s0 + j], :]
                ph_im[j, :] = phase_im[sh_idx[s0 + j], :]
            g_re = np.dot(gamma, ph_re)
            g_im = np.dot(gamma, ph_im)
            inv_s2 = 1.0 / s2
            for a in range(n_r):
                u = rot_loc[r0 + a]
                for k in range(k_coef):
                    c = ctf[i, k] * inv_s2
                    # c d conj(g): (dr + i di)(gr - i gi)
                    dr = data[i, k].real
                    di = data[i, k].imag
                    acc_b[tid, u, k] += c * complex(dr * g_re[a, k] + di * g_im[a, k],
                                                    di * g_re[a, k] - dr * g_im[a, k])


@numba.njit(parallel=True, cache=jit.CACHE, fastmath=jit.FASTMATH)
def _ctf2_term(rot_off, rot_loc, rot_post, ctf, sigma2, acc_c):
    """Per-thread ``sum_i Gamma_ir c_ik^2 / s2_i`` into ``acc_c (T, n_u, K)``."""
    for i in numba.prange(len(sigma2)):
        tid = numba.get_thread_id()
        inv = 1.0 / sigma2[i]
        for a in range(rot_off[i], rot_off[i + 1]):
            u = rot_loc[a]
            g = rot_post[a] * inv
            for k in range(ctf.shape[1]):
                acc_c[tid, u, k] += g * ctf[i, k] * ctf[i, k]


def shift_phases(op: SliceOperator, shifts_px: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``phi_s(k) = exp(2 pi i k.t_s / box)`` at the operator's coefficients, float32 parts."""
    t = np.asarray(shifts_px, dtype=np.float64).reshape(-1, 2)
    angle = 2 * np.pi * (np.outer(t[:, 0], op.kx) + np.outer(t[:, 1], op.ky)) / op.box
    return (np.ascontiguousarray(np.cos(angle), dtype=np.float32),
            np.ascontiguousarray(np.sin(angle), dtype=np.float32))


MAX_ROTATIONS_PER_BLOCK = 30000  # distinct rotations per block: bounds slices and accumulators


def _subset_block(subsets: PoseSubsets, lo: int, hi: int) -> PoseSubsets:
    r0, r1 = subsets.rot_offsets[lo], subsets.rot_offsets[hi]
    s0, s1 = subsets.shift_offsets[lo], subsets.shift_offsets[hi]
    return PoseSubsets(subsets.rot_offsets[lo:hi + 1] - r0, subsets.rot_index[r0:r1],
                       subsets.rot_logw[r0:r1], subsets.shift_offsets[lo:hi + 1] - s0,
                       subsets.shift_index[s0:s1], subsets.shift_logw[s0:s1])


def marginal_nll(op: SliceOperator, volume: np.ndarray, batch: ImageBatch, grid,
                 subsets: PoseSubsets, want_grad: bool = True, cube=None) -> LikelihoodResult:
    """Negative log marginal likelihood of each image, with posteriors and the gradient.

    Images are processed in blocks that sample at most ``MAX_ROTATIONS_PER_BLOCK`` distinct
    rotations between them, so memory stays bounded whatever the batch and its subsets;
    see :func:`_marginal_nll_block` for the parameters.
    """
    cube = op.prepare(volume) if cube is None else cube
    # Memory follows the block's *distinct* rotations (slices and accumulators are per distinct
    # rotation, shared by the images that sample it): images sharing a grid, as on an exhaustive
    # stage, go in one block and are sliced once, not one image at a time.
    seen = np.zeros(len(grid.rotations), dtype=bool)
    bounds = [0]
    distinct = 0
    for i in range(len(subsets.rot_offsets) - 1):
        rows = subsets.rot_index[subsets.rot_offsets[i]:subsets.rot_offsets[i + 1]]
        new = int(np.count_nonzero(~seen[rows]))
        if distinct and distinct + new > MAX_ROTATIONS_PER_BLOCK:
            bounds.append(i)
            seen[:] = False
            distinct, new = 0, len(np.unique(rows))
        seen[rows] = True
        distinct += new
    bounds.append(len(subsets.rot_offsets) - 1)
    if len(bounds) == 2:
        return _marginal_nll_block(op, volume, batch, grid, subsets, want_grad, cube)
    parts = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        block = ImageBatch(batch.data[lo:hi], batch.ctf[lo:hi], batch.sigma2[lo:hi])
        parts.append(_marginal_nll_block(op, volume, block, grid, _subset_block(subsets, lo, hi),
                                         want_grad, cube))
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
    batch : ImageBatch
    grid : PoseGrid (``rotations``, ``shifts`` in px)
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
    union, rot_loc = np.unique(subsets.rot_index, return_inverse=True)
    rotations = np.asarray(grid.rotations)[union]
    slices = op.forward(volume, rotations, cube)
    s_real = np.ascontiguousarray(np.concatenate([slices.real, -slices.imag], axis=1),
                                  dtype=np.float32)
    s_abs2 = np.ascontiguousarray(np.abs(slices) ** 2, dtype=np.float32)
    phase_re, phase_im = shift_phases(op, grid.shifts)
    n_threads = numba.get_num_threads()
    n_u, k_coef = len(union), op.n_coef
    acc_b = np.zeros((n_threads if want_grad else 1, n_u if want_grad else 1,
                      k_coef if want_grad else 1), dtype=np.complex128)
    nll = np.empty(n_images)
    rot_post = np.empty(len(subsets.rot_index))
    shift_post = np.empty(len(subsets.shift_index))
    best_rot = np.empty(n_images, dtype=np.int64)
    best_shift = np.empty(n_images, dtype=np.int64)
    _batch_kernel(s_real, s_abs2, batch.data, batch.ctf, op.weights, batch.sigma2,
                  phase_re, phase_im, subsets.rot_offsets, rot_loc.astype(np.int64),
                  subsets.rot_logw, subsets.shift_offsets, subsets.shift_index,
                  subsets.shift_logw, want_grad, nll, rot_post, shift_post, best_rot, best_shift,
                  acc_b)
    best_rot = subsets.rot_index[subsets.rot_offsets[:-1] + best_rot]
    best_shift = subsets.shift_index[subsets.shift_offsets[:-1] + best_shift]
    grad = None
    if want_grad:
        acc_c = np.zeros((n_threads, n_u, k_coef), dtype=np.float64)
        _ctf2_term(subsets.rot_offsets, rot_loc.astype(np.int64), rot_post, batch.ctf,
                   batch.sigma2, acc_c)
        # With d nll = Re sum_rk H_rk dS_rk, H = w conj(sum_i (c^2 Gamma S - c d conj(g)) / s2),
        # so d nll = sum Re(conj(dS) w conj(H) / w): the volume gradient is the adjoint applied
        # to conj(H) / w = sum_i (c^2 Gamma S - c d conj(g)) / s2.
        h = acc_c.sum(axis=0) * slices - acc_b.sum(axis=0)
        grad = op.adjoint(h, rotations)
    n_points = int((np.diff(subsets.rot_offsets) * np.diff(subsets.shift_offsets)).sum())
    return LikelihoodResult(nll, grad, rot_post, shift_post, best_rot, best_shift, n_points)
