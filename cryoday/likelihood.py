"""Marginal likelihood of particle images over poses and shifts, and its gradient (paper Eq. 4).

For image ``i`` with data ``d`` (its operator coefficients), CTF ``c``, noise variance ``s2`` and a
model slice ``S_A`` at rotation ``A`` shifted by ``t_s``, the energy is

    E_As = sum_k w_k |d_k - c_k S_A(k) phi_s(k)|^2 / (2 s2),   phi_s(k) = exp(2 pi i k.t_s / box)

with Hermitian weights ``w`` (times ``1 / P(|k|)`` of the image's noise group for coloured
noise, :mod:`cryoday.noise`: the coloured-noise likelihood; ``P`` is radial, so the factor is
the same on the turned grid), and ``nll_i = -log sum_{A,s} exp(log W_A + log W_s - E_As)``.

**One slice per viewing direction.** A rotation is an in-plane turn after a direction,
``A = P_psi A_d`` (RELION's ZYZ), so ``S_A(k) = S_d(P^T k)``. Substituting ``k = P k'`` turns the
sum over ``k`` into one over ``k'`` on the same grid with the *image* turned instead of the model:

    E_dps = sum_k' w |d(P k') - c(P k') S_d(k') phi_s(P k')|^2 / (2 s2)

(as the paper's code does). ``d(P k')`` is interpolated bilinearly in the
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
(:func:`cryoday._likelihood_kernels.shared_kernel`).

What the kernels need is built once and kept: per operator its coefficients' weights and
layout (:func:`operator_coefficients`); per set of pose subsets on a grid a
:class:`LikelihoodPlan` (its blocks of images, their distinct directions in slicing order),
which :func:`marginal_nll` keeps for as long as the subsets live, since a line search evaluates
the same subsets several times. The kernels are in :mod:`cryoday._likelihood_kernels`.
"""

from __future__ import annotations

import functools
import itertools
import weakref
from dataclasses import dataclass

import numba
import numpy as np
from threadpoolctl import ThreadpoolController

from cryoday import _likelihood_kernels as kernels
from cryoday import scratch, tunables
from cryoday.batch import ImageBatch, image_padded_size
from cryoday.pose_sets import PoseSubsets, common_directions
from cryoday.projection import SliceOperator


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


# ------------------------------------------------------------------ per operator


def edge_taper(op: SliceOperator) -> np.ndarray:
    """Per-coefficient weight falling smoothly to 0 over the last ``TAPER_PX`` inside the cutoff.

    The turned image's coefficients are a rotated copy of the grid: with a hard cutoff, which
    points fall inside the circle changes with the angle, and sums over them of the model's or
    the data's power change by the power on that rim, which is large on the small discs of the
    first stages (96 nats at the true pose on a 13-coefficient disc at SNR 4). A soft edge makes
    those sums sample a smooth function instead.
    """
    rho = np.hypot(op.kx.astype(np.float64), op.ky.astype(np.float64))
    edge = np.clip((rho - (op.radius - tunables.TAPER_PX)) / tunables.TAPER_PX, 0.0, 1.0)
    return (0.5 * (1.0 + np.cos(np.pi * edge))).astype(np.float32)


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


# Kept for as long as the operator lives: rebuilding them on every call is a fixed cost that
# small evaluations (one minibatch at a coarse stage) notice.
_COEFFICIENTS: weakref.WeakKeyDictionary[SliceOperator, kernels.Coefficients] = \
    weakref.WeakKeyDictionary()


def operator_coefficients(op: SliceOperator) -> kernels.Coefficients:
    """The kernels' view of ``op``'s coefficients: tapered weights and their rows, made once."""
    coef = _COEFFICIENTS.get(op)
    if coef is None:
        taper = edge_taper(op)
        kxi = op.kx.astype(np.int64)
        kyi = op.ky.astype(np.int64)
        row_start, row_len, row_kx0, row_ky = coefficient_rows(op)
        coef = kernels.Coefficients(
            weights=(op.weights * taper).astype(np.float32), taper=taper,
            kx=op.kx.astype(np.float64), ky=op.ky.astype(np.float64), row_start=row_start,
            row_len=row_len, row_kx0=row_kx0, row_ky=row_ky, kx_min=int(kxi.min()),
            n_kx=int(kxi.max() - kxi.min() + 1), n_ky=int(kyi.max() + 1), box=float(op.box))
        _COEFFICIENTS[op] = coef
    return coef


# ------------------------------------------------------------------ per set of subsets


def band_order(views: np.ndarray, band: float) -> np.ndarray:
    """An order of unit vectors ``(n, 3)`` in which consecutive ones lie near each other: bands
    of ``band`` rad of tilt, each swept in rotation angle alternately up and down."""
    views = np.asarray(views, np.float64)
    tilt = np.arccos(np.clip(views[:, 2], -1.0, 1.0))
    rot = np.arctan2(views[:, 1], views[:, 0])
    index = np.floor(tilt / band).astype(np.int64)
    return np.lexsort((np.where(index % 2 == 1, -rot, rot), index))


def locality_order(rotations: np.ndarray, band: float | None = None) -> np.ndarray:
    """An order of directions in which consecutive slices cross nearby parts of the cube:
    :func:`band_order` of their viewing directions in bands of ``band`` rad
    (``LOCALITY_BAND``), so a thread's next slice mostly reads cache lines its last one
    loaded."""
    band = tunables.LOCALITY_BAND if band is None else band
    return band_order(np.asarray(rotations)[:, 2, :], band)


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


def _block_bounds(subsets: PoseSubsets, grid, shared_dirs: np.ndarray | None) -> list[int]:
    """Bounds of consecutive blocks of images sampling at most ``MAX_DIRECTIONS_PER_BLOCK``
    distinct directions between them (memory follows the distinct directions: slices and
    accumulators are per distinct direction, shared by the images that sample it)."""
    limit = tunables.MAX_DIRECTIONS_PER_BLOCK
    if shared_dirs is not None and len(np.unique(shared_dirs)) <= limit:
        return [0, subsets.n_images]  # one block, sliced once
    seen = np.zeros(grid.n_dir, dtype=bool)
    bounds = [0]
    distinct = 0
    for i in range(subsets.n_images):
        rows = subsets.dir_index[subsets.dir_offsets[i]:subsets.dir_offsets[i + 1]]
        new = int(np.count_nonzero(~seen[rows]))
        if distinct and distinct + new > limit:
            bounds.append(i)
            seen[:] = False
            distinct, new = 0, len(np.unique(rows))
        seen[rows] = True
        distinct += new
    bounds.append(subsets.n_images)
    return bounds


@dataclass(frozen=True)
class _Block:
    """Images ``lo:hi`` of a plan: their subsets (None: the whole set's), the rotations of their
    distinct directions in slicing order, and each (image, direction)'s row among them."""

    lo: int
    hi: int
    subsets: PoseSubsets | None
    rotations: np.ndarray
    dir_loc: np.ndarray


class LikelihoodPlan:
    """How :func:`marginal_nll` evaluates one set of pose subsets on one grid.

    The blocks of images (at most ``MAX_DIRECTIONS_PER_BLOCK`` distinct directions each), their
    distinct directions in :func:`locality_order`, and whether every image evaluates the same
    directions (then groups of images share their GEMMs). At the first stages these cost as much
    as a third of the kernels' time, so :func:`marginal_nll` keeps a plan for as long as its
    subsets live; pass one explicitly to control its lifetime.

    Parameters
    ----------
    subsets : PoseSubsets
    grid : PoseGrid
        The grid the subsets index (``direction_rotations``, ``n_dir``).
    """

    def __init__(self, subsets: PoseSubsets, grid):
        # No reference to subsets: plans are kept in a cache keyed weakly by them.
        self._subsets = weakref.ref(subsets)
        self.grid = grid
        self.shared_dirs = common_directions(subsets)
        bounds = _block_bounds(subsets, grid, self.shared_dirs)
        self.blocks = []
        for lo, hi in itertools.pairwise(bounds):
            part = None if (lo, hi) == (0, subsets.n_images) else subsets.block(lo, hi)
            rotations, dir_loc = _distinct_directions(
                subsets if part is None else part, grid, self.shared_dirs)
            self.blocks.append(_Block(lo, hi, part, rotations, dir_loc))

    def is_for(self, subsets: PoseSubsets, grid) -> bool:
        """Whether this plan was made for ``subsets`` on ``grid``."""
        return self._subsets() is subsets and self.grid is grid


_PLANS: weakref.WeakKeyDictionary[PoseSubsets, LikelihoodPlan] = weakref.WeakKeyDictionary()


def plan_for(subsets: PoseSubsets, grid) -> LikelihoodPlan:
    """The kept :class:`LikelihoodPlan` of ``subsets`` on ``grid``, made if need be."""
    plan = _PLANS.get(subsets)
    if plan is None or plan.grid is not grid:
        plan = _PLANS[subsets] = LikelihoodPlan(subsets, grid)
    return plan


def shared_groups(subsets: PoseSubsets, shared: bool, n_union: int, n_coef: int,
                  n_threads: int) -> np.ndarray | None:
    """Bounds of groups of images for the group kernel, or None to go image by image.

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
    size = min(tunables.GROUP_BYTES // max(1, per_image), -(-n // (2 * n_threads)))
    if size < 2:
        return None
    return np.r_[np.arange(0, n, size), n].astype(np.int64)


# ------------------------------------------------------------------ evaluation


@functools.cache
def _blas_controller() -> ThreadpoolController:
    """One controller for the process: building one scans every loaded library."""
    return ThreadpoolController()


def marginal_nll(op: SliceOperator, volume: np.ndarray, batch: ImageBatch, grid,
                 subsets: PoseSubsets, want_grad: bool = True, cube=None,
                 plan: LikelihoodPlan | None = None,
                 grad_weights: np.ndarray | None = None) -> LikelihoodResult:
    """Negative log marginal likelihood of each image, with posteriors and the gradient.

    Parameters
    ----------
    op : SliceOperator
    volume : (box, box, box) float32
        Real-space volume.
    batch : ImageBatch
        From :func:`cryoday.batch.make_batch`.
    grid : PoseGrid
        ``direction_rotations``, ``inplane_matrices``, ``shifts`` in px.
    subsets : PoseSubsets
        The poses each image evaluates.
    want_grad : bool
        Also return the gradient of ``sum_i nll_i`` with respect to ``volume``.
    cube : optional
        ``op.prepare(volume)``, when the caller evaluates the same volume repeatedly.
    plan : LikelihoodPlan, optional
        ``LikelihoodPlan(subsets, grid)``; by default the one kept for ``subsets``
        (:func:`plan_for`).
    grad_weights : (n,) array, optional
        With ``want_grad``, the gradient is of ``sum_i grad_weights[i] nll_i`` (each image's
        class posterior, :mod:`cryoday.classes`); the nll and posteriors are unchanged.

    Returns
    -------
    LikelihoodResult
    """
    if plan is None:
        plan = plan_for(subsets, grid)
    elif not plan.is_for(subsets, grid):
        raise ValueError("the plan was made for other subsets or another grid")
    if batch.padded is None:
        raise ValueError("the batch has no padded transforms: build it with make_batch")
    cube = op.prepare(volume) if cube is None else cube
    weights = (np.zeros(0, np.float32) if grad_weights is None
               else np.ascontiguousarray(grad_weights, dtype=np.float32))
    if len(weights) not in (0, len(batch)):
        raise ValueError(f"{len(weights)} gradient weights for {len(batch)} images")
    if len(plan.blocks) == 1:
        return _marginal_nll_block(op, cube, batch, grid, subsets, plan.blocks[0],
                                   plan.shared_dirs is not None, want_grad, weights)
    parts = [_marginal_nll_block(op, cube, batch.take(slice(b.lo, b.hi)), grid, b.subsets, b,
                                 plan.shared_dirs is not None, want_grad,
                                 weights[b.lo:b.hi] if len(weights) else weights)
             for b in plan.blocks]
    return LikelihoodResult(
        nll=np.concatenate([p.nll for p in parts]),
        grad=sum(p.grad for p in parts) if want_grad else None,
        rot_post=np.concatenate([p.rot_post for p in parts]),
        shift_post=np.concatenate([p.shift_post for p in parts]),
        best_rot=np.concatenate([p.best_rot for p in parts]),
        best_shift=np.concatenate([p.best_shift for p in parts]),
        n_evaluated=sum(p.n_evaluated for p in parts),
    )


def _images(op: SliceOperator, batch: ImageBatch, grad_weights=None) -> kernels.Images:
    """The kernels' view of ``batch`` (white noise: no noise weight rows; no gradient
    weights: 1 for every image)."""
    if batch.noise_weight is None:
        noise_weight = np.ones((0, op.n_coef), dtype=np.float32)
        noise_group = np.zeros(len(batch), dtype=np.int64)
    else:
        noise_weight, noise_group = batch.noise_weight, batch.noise_group
    return kernels.Images(
        data=batch.data, padded=batch.padded, pad=image_padded_size(op.box) / op.box,
        centre=float(batch.padded.shape[1] // 2), ctf_params=batch.ctf_params,
        freq_scale=float(batch.freq_scale), sigma2=batch.sigma2,
        noise_weight=np.ascontiguousarray(noise_weight, dtype=np.float32),
        noise_group=np.ascontiguousarray(noise_group, dtype=np.int64),
        grad_weight=np.zeros(0, np.float32) if grad_weights is None else grad_weights)


def _poses(subsets: PoseSubsets, dir_loc: np.ndarray, grid) -> kernels.Poses:
    """The kernels' view of ``subsets`` (``dir_loc``: rows among the distinct directions)."""
    return kernels.Poses(
        dir_off=subsets.dir_offsets, dir_loc=dir_loc, dir_logw=subsets.dir_logw,
        inp_off=subsets.inp_offsets, inp_idx=subsets.inp_index, inp_logw=subsets.inp_logw,
        sh_off=subsets.shift_offsets, sh_idx=subsets.shift_index, sh_logw=subsets.shift_logw,
        rot_off=subsets.rot_offsets, inplane=np.asarray(grid.inplane_matrices, np.float64),
        shifts=np.asarray(grid.shifts, np.float64))


def _marginal_nll_block(op: SliceOperator, cube: np.ndarray, batch: ImageBatch, grid,
                        subsets: PoseSubsets, block: _Block, shared: bool,
                        want_grad: bool, grad_weights=None) -> LikelihoodResult:
    """:func:`marginal_nll` of one block of images (``batch`` and ``subsets`` are the block's;
    ``shared``: every image evaluates the same directions)."""
    n_images = len(batch)
    rotations = block.rotations
    s_parts = op.slice_parts(cube, rotations)
    n_threads = numba.get_num_threads()
    n_u, k_coef = len(rotations), op.n_coef
    coef = operator_coefficients(op)
    out = kernels.Outputs(
        nll=np.empty(n_images), rot_post=np.empty(int(subsets.rot_offsets[-1])),
        shift_post=np.empty(len(subsets.shift_index)),
        best_dir=np.empty(n_images, dtype=np.int64), best_inp=np.empty(n_images, dtype=np.int64),
        best_shift=np.empty(n_images, dtype=np.int64),
        # float32: each entry sums the few images of one block that sample that direction.
        acc_h=scratch.zeroed("likelihood.acc_h", (n_threads, n_u, 2 * k_coef) if want_grad
                             else (1, 1, 1), np.float32))
    images = _images(op, batch, grad_weights)
    poses = _poses(subsets, block.dir_loc, grid)
    groups = shared_groups(subsets, shared, n_u, k_coef, n_threads)
    # Each kernel thread calls BLAS on its own images: BLAS's own threads would only contend
    # with them (the forward pass ran about twice as slow with 2 BLAS threads per call).
    with _blas_controller().limit(limits=1, user_api="blas"):
        if groups is None:
            col_budget = max(1, tunables.COLUMN_BYTES // (8 * k_coef))
            kernels.batch_kernel(s_parts, images, coef, poses, want_grad, col_budget, out)
        else:
            kernels.shared_kernel(s_parts, images, coef, poses, groups, want_grad, out)
    d_index = subsets.dir_index[subsets.dir_offsets[:-1] + out.best_dir]
    p_index = subsets.inp_index[subsets.inp_offsets[:-1] + out.best_inp]
    best_rot = d_index * grid.n_inp + p_index
    best_shift = subsets.shift_index[subsets.shift_offsets[:-1] + out.best_shift]
    grad = None
    if want_grad:
        # With d nll = Re sum_dk H_dk dS_dk, H = w conj(sum_i (c^2 Gamma S - c d conj(g)) / s2),
        # so d nll = sum Re(conj(dS) w conj(H) / w): the volume gradient is the adjoint applied
        # to conj(H) / w = sum_i (c^2 Gamma S - c d conj(g)) / s2.
        # The likelihood's weights are the operator's times the edge taper, which the adjoint
        # (carrying the operator's weights) still needs applied.
        h = np.empty((n_u, k_coef), dtype=np.complex64)
        kernels.sum_over_threads(out.acc_h, coef.taper, h)
        grad = op.adjoint(h, rotations)
    return LikelihoodResult(out.nll, grad, out.rot_post, out.shift_post, best_rot, best_shift,
                            subsets.n_points)
