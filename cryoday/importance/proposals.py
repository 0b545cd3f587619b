"""Proposals on the current grid and the capped multinomial draws from them.

Per image and dimension the proposal is the mixture ``(1 - alpha) q_kernel + alpha prior``:
the stored posterior, tempered and spread by the grid's kernel, mixed with a prior part that
keeps every grid point reachable (so the weights stay unbiased) and lets the image find poses
the data set has elsewhere. ``M = ceil(s0 * ESS)`` draws with replacement from it, weighted
``W c / (M q)``, make the log-sum-exp over the sampled product set an unbiased estimate of the
image's marginal likelihood; the caps on ``M`` bound the cost per image at the price of
variance, never of bias.
"""

from __future__ import annotations

import numpy as np

from cryoday.importance._draws import draw_points
from cryoday.importance.average import DatasetAverage
from cryoday.importance.geometry import GridKernels
from cryoday.importance.store import normalised_logw
from cryoday.pose_sets import PoseSubsets


def prior_parts(kernels: GridKernels, average: DatasetAverage, dataset_prior) -> list:
    """Per dimension ``(1 - g) W + g * dataset average``: the prior part of the mixture."""
    out = []
    for dim, g in enumerate(dataset_prior):
        base = kernels.domains[dim].base
        out.append(base if g <= 0 else (1.0 - g) * base + g * average(dim))
    return out


def proposal_matrices(kernels: GridKernels, priors, rows: np.ndarray, temperature: float,
                      alpha: float, antipodal: bool) -> list[np.ndarray]:
    """The proposals of ``rows`` per dimension, ``(B, n)`` each (read-only when they are all the
    prior).

    Parameters
    ----------
    kernels : GridKernels of the current grid (and through it the store)
    priors : per dimension the prior part, from :func:`prior_parts`
    rows : (B,) image rows
    temperature, alpha : the schedule's ``T`` and ``alpha`` now
    antipodal : add the kernel at the stored directions' antipodes
    """
    if alpha >= 1.0:
        return [np.broadcast_to(p, (len(rows), len(p))) for p in priors]
    store = kernels.store
    has = store.has[rows]
    out = []
    for dim in range(3):
        dom = kernels.domains[dim]
        logp = store.log_masses(dim)[rows].astype(np.float64)
        w = np.nan_to_num(np.exp(normalised_logw(logp / temperature)))
        q = dom.spread_rows(kernels.snapped(dim, rows), w)
        if dim == 0 and antipodal:
            q += dom.spread_rows(kernels.snapped(0, rows, antipodes=True), w)
        total = q.sum(axis=1)
        # An image without a posterior, or with an unusable one, gets the prior alone.
        usable = has & (total > 0) & np.isfinite(total)
        q = np.where(usable[:, None], q / np.where(usable, total, 1.0)[:, None], priors[dim])
        out.append((1.0 - alpha) * q + alpha * priors[dim])
    return out


def expected_distinct(q: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Per row of ``q`` ``(B, n)``, the expected number of distinct points among ``m[b]``
    draws with replacement: ``sum_j 1 - (1 - q_j)^m``."""
    m = np.asarray(m, np.float64)
    with np.errstate(divide="ignore"):
        log_miss = np.log1p(-np.minimum(q, 1.0))
    return q.shape[-1] - np.exp(m[:, None] * log_miss).sum(axis=-1)


def _covers(q: np.ndarray, m: np.ndarray, coverage: float) -> np.ndarray:
    """Rows whose ``m`` draws would hit at least ``coverage`` of the points (the expected
    distinct count; only rows drawing that many at all can)."""
    n = q.shape[-1]
    whole = np.zeros(len(m), dtype=bool)
    maybe = np.flatnonzero(m >= coverage * n)
    if len(maybe):
        whole[maybe] = expected_distinct(q[maybe], m[maybe]) >= coverage * n
    return whole


def draw_counts(q: np.ndarray, s0: float, coverage: float) -> np.ndarray:
    """Per row of ``q``, ``ceil(s0 * ESS)`` draws (``ESS = 1 / sum q^2``), or 0 (the whole
    dimension) when they would hit ``coverage`` of its points anyway.

    Drawn with replacement from a peaked proposal, ``M`` draws hit far fewer than ``M``
    points: at the 15 A stage of the paper-scale set an image's 57 shift draws of a 37-point
    grid hit 10.5 on average, so comparing ``M`` itself with the grid (as this did) summed the
    whole shift grid for every image, 3.5 times the points.
    """
    m = np.ceil(s0 / np.sum(q * q, axis=-1)).astype(np.int64)
    return np.where(_covers(q, m, coverage), 0, m)


def capped_draw_counts(grid, q_dir, q_inp, q_shift, s0: float, coverage: float,
                       max_rotations: int, max_shifts: int):
    """Draws per image and dimension, with the per-image caps; 0 means the whole dimension.

    A broad posterior (early on, or at low SNR) would ask for most of a huge grid: the
    rotations are capped by drawing fewer directions and in-plane angles alike (by 0.8 at a
    time) until ``m_dir * m_inp <= max_rotations``, and the shifts at ``max_shifts``. Any
    ``M`` keeps the weights unbiased; only the variance grows.
    """
    m_dir, m_inp = draw_counts(q_dir, s0, coverage), draw_counts(q_inp, s0, coverage)
    m_shift = draw_counts(q_shift, s0, coverage)
    whole_dir, whole_inp, whole_shift = m_dir == 0, m_inp == 0, m_shift == 0
    m_dir = np.where(whole_dir, grid.n_dir, m_dir)
    m_inp = np.where(whole_inp, grid.n_inp, m_inp)
    asked_dir, asked_inp = m_dir.copy(), m_inp.copy()
    over = (m_dir * m_inp > max_rotations) & ((m_dir > 1) | (m_inp > 1))
    while over.any():
        m_dir[over] = np.maximum(1, (m_dir[over] * 0.8).astype(np.int64))
        m_inp[over] = np.maximum(1, (m_inp[over] * 0.8).astype(np.int64))
        over = (m_dir * m_inp > max_rotations) & ((m_dir > 1) | (m_inp > 1))
    asked_shift = np.where(whole_shift, grid.n_shift, m_shift)
    m_shift = np.minimum(asked_shift, max_shifts)
    # A row the caps left alone keeps draw_counts' decision (its full M draws would cover the
    # dimension, which the grid's size of draws need not); a capped one is summed whole only
    # if its fewer draws would still cover it.
    for m, asked, whole, q in ((m_dir, asked_dir, whole_dir, q_dir),
                               (m_inp, asked_inp, whole_inp, q_inp),
                               (m_shift, asked_shift, whole_shift, q_shift)):
        capped = m < asked
        m[np.where(capped, _covers(q, m, coverage), whole)] = 0
    return m_dir, m_inp, m_shift


def multinomial_draws(q: np.ndarray, m: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    """``m[b]`` independent draws from each row ``b`` of ``q`` ``(B, n)`` (rows summing to 1),
    as the distinct points drawn and how often: ``(flat, count)``, ``flat = b * n + point``
    in increasing order (:func:`cryoday.importance._draws.draw_points`)."""
    n = q.shape[1]
    m = np.asarray(m, np.int64)
    points = draw_points(q, m, rng.random(int(m.sum())))
    flat = np.repeat(np.arange(len(q)), m) * n + points
    if len(flat) == 0:
        return flat, flat
    starts = np.flatnonzero(np.concatenate([[True], flat[1:] != flat[:-1]]))
    return flat[starts], np.diff(np.append(starts, len(flat)))


def sample(q: np.ndarray, log_w: np.ndarray, m: np.ndarray, rng):
    """Per row of ``q`` ``(B, n)``, ``m[b]`` multinomial draws with unbiased weights
    ``W c / (M q)``, or every point where ``m[b] = 0``.

    Parameters
    ----------
    q : (B, n) proposals, rows summing to 1
    log_w : (n,) log quadrature weights ``W``
    m : (B,) or scalar, draws per row
    rng : numpy Generator

    Returns
    -------
    The picks, ragged: per row their number, then the points (in increasing order) and their
    log weights, all rows' one after another.
    """
    q = np.atleast_2d(q)
    n_rows, n = q.shape
    m = np.broadcast_to(np.asarray(m, np.int64), (n_rows,))
    whole = m <= 0
    log_w = np.asarray(log_w, np.float64)
    flat, count = multinomial_draws(q, np.where(whole, 0, m), rng)
    row, point = flat // n, flat % n
    weights = (log_w[point] + np.log(count) - np.log(m[row])
               - np.log(q.reshape(-1)[flat]))
    whole_rows = np.flatnonzero(whole)
    if len(whole_rows):
        row = np.concatenate([row, np.repeat(whole_rows, n)])
        point = np.concatenate([point, np.tile(np.arange(n), len(whole_rows))])
        weights = np.concatenate([weights, np.tile(log_w, len(whole_rows))])
        order = np.argsort(row, kind="stable")
        row, point, weights = row[order], point[order], weights[order]
    return np.bincount(row, minlength=n_rows), point, weights


def ragged_subsets(n_inp: int, parts) -> PoseSubsets:
    """One :class:`PoseSubsets` from per dimension (directions, in-plane, shifts) a list of
    chunks' :func:`sample` results, the chunks in row order."""
    ragged = []
    for dim_parts in parts:
        counts = np.concatenate([p[0] for p in dim_parts])
        ragged += [np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                   np.concatenate([p[1] for p in dim_parts]),
                   np.concatenate([p[2] for p in dim_parts])]
    return PoseSubsets(n_inp, *ragged)
