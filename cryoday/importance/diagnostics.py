"""Diagnostics of the sampler: how well proposals match posteriors, and how far posteriors move.

``kl_to_proposal`` is KL(posterior || proposal) over directions, for the images just
evaluated. ``kl_between_visits`` is the paper's Figure 3: each image's KL(new || previous)
between the pose posteriors of its two latest visits, as the product of the three marginals
(so the sum of three KLs). Both visits' top-``K`` marginals are smoothed by the current grid's
kernel and compared on the union of their ``2K`` support points, from coordinates, because the
previous visit may have been on another grid. An unchanged posterior gives exactly 0; a sharp
one moved by ``d`` gives about ``c d^2`` (``ln 4 (d / a)^2`` for directions on a grid of
angular step ``a``).
"""

from __future__ import annotations

import numba
import numpy as np

from cryoday import jit
from cryoday.importance.geometry import GridKernels, embed
from cryoday.importance.store import DIMENSIONS, normalised_logw
from cryoday.posteriors import exp32


def kl_to_proposal(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p || q) per row of ``(B, n)`` posteriors ``p`` and proposals ``q``, over the support of
    ``p`` only (at most the points the image evaluated), both renormalised on it."""
    n_rows = len(p)
    image, point = np.nonzero(p)
    p, q = p[image, point], q[image, point]
    p = p / np.bincount(image, weights=p, minlength=n_rows)[image]
    q = q / np.bincount(image, weights=q, minlength=n_rows)[image]
    with np.errstate(divide="ignore"):
        return np.bincount(image, weights=p * np.log(p / q), minlength=n_rows)


def kl_between_visits(kernels: GridKernels, rows, valid, new_idx, new_logp):
    """Mean KL(new || previous visit) of ``rows``' pose posteriors, and its three parts.

    Parameters
    ----------
    kernels : GridKernels of the current grid, whose store still holds the previous visit
    rows : (B,) image rows
    valid : (B,) bool, rows whose new posterior is usable
    new_idx, new_logp : per dimension ``(B, K)`` grid indices and log masses of the new visit

    Returns
    -------
    total : float, mean over the rows visited before of the summed KL (NaN if none were)
    parts : dict ``dir``, ``inp``, ``shift`` of the per-dimension means
    """
    store = kernels.store
    before = valid & store.has[rows]
    parts = {}
    for dim, name in enumerate(DIMENSIONS):
        if not before.any():
            parts[name] = float("nan")
            continue
        # Compare what will be stored (float32), so an unchanged posterior gives exactly 0.
        coords = kernels.coordinates[dim][new_idx[dim][before]].astype(np.float32)
        x_new = embed(dim, coords.astype(np.float64))
        x_old = kernels.embedded(dim, rows[before])
        lp_old = store.log_masses(dim)[rows[before]].astype(np.float64)
        lp_new = new_logp[dim][before].astype(np.float32).astype(np.float64)
        parts[name] = kl_on_union(x_new, lp_new, x_old, lp_old, kernels.domains[dim].c)
    if not before.any():
        return float("nan"), parts
    total = parts["dir"] + parts["inp"] + parts["shift"]
    return float(np.mean(total)), {k: float(np.mean(v)) for k, v in parts.items()}


def kl_on_union(x_p, logp_p, x_q, logp_q, c: float) -> np.ndarray:
    """KL(p || q) between kernel-smoothed weighted point sets, on the union of their points.

    Parameters
    ----------
    x_p, x_q : (B, K, k) points in a kernel's embedding
    logp_p, logp_q : (B, K) log masses, ``-inf`` for empty slots (renormalised here)
    c : float, the kernel ``exp(-c |x - y|^2)``

    Returns
    -------
    (B,) KL in nats: each set is smoothed by the kernel, evaluated at the ``2K`` points of both,
    and renormalised over the valid ones.
    """
    out = np.empty(len(x_p))
    _kl_on_union(np.ascontiguousarray(x_p, np.float64), normalised_logw(logp_p),
                 np.ascontiguousarray(x_q, np.float64), normalised_logw(logp_q), float(c), out)
    return out


@numba.njit(cache=jit.CACHE, fastmath=jit.FASTMATH)
def _smoothed_log_density(union, present, x, log_w, c, out):
    """Log density of a kernel-smoothed point set at the present union points.

    Parameters
    ----------
    union : (U, k) float64, where to evaluate
    present : (U,) bool, the union points that count (the others get ``-inf``)
    x : (K, k) float64, the set's points
    log_w : (K,) float64, their log weights, ``-inf`` on empty slots
    c : float, the kernel ``exp(-c |x - y|^2)``
    out : (U,) float64, written: ``log sum_k w_k exp(-c |union_u - x_k|^2)``, renormalised
        over the present points

    Notes
    -----
    The exponentials, relative to each point's largest term, are float32 (:func:`exp32`,
    5e-7) so the loop over ``x`` vectorises: this is a diagnostic, and equal inputs still give
    exactly equal densities. Terms below e^-87 of the largest, empty slots among them, are 0.
    """
    n_x = np.uint64(x.shape[0])
    xt = np.ascontiguousarray(x.T)  # (dims, K): each coordinate contiguous over the points
    terms = np.empty(n_x)
    total = -np.inf
    for u in range(union.shape[0]):
        if not present[u]:
            out[u] = -np.inf
            continue
        terms[:] = 0.0
        for a in range(xt.shape[0]):
            for k in range(n_x):
                terms[k] += (union[u, a] - xt[a, k]) ** 2
        peak = -np.inf
        for k in range(n_x):
            terms[k] = log_w[k] - c * terms[k]  # from squared distances to log terms
            peak = max(peak, terms[k])
        acc = 0.0
        for k in range(n_x):
            t = np.float32(terms[k] - peak)
            acc += exp32(t) if t > np.float32(-87.0) else np.float32(0.0)
        out[u] = peak + np.log(acc)
        total = np.logaddexp(total, out[u])
    for u in range(union.shape[0]):
        out[u] -= total


@numba.njit(parallel=True, cache=jit.CACHE, fastmath=jit.FASTMATH)
def _kl_on_union(x_p, log_w_p, x_q, log_w_q, c, out):
    """:func:`kl_on_union` per image, in parallel over the images.

    Parameters
    ----------
    x_p, x_q : (B, K, k) float64, contiguous, the two sets' points
    log_w_p, log_w_q : (B, K) float64, their normalised log weights, ``-inf`` on empty slots
    c : float, the kernel ``exp(-c |x - y|^2)``
    out : (B,) float64, written: KL(p || q) per image
    """
    n_k = x_p.shape[1]
    for b in numba.prange(x_p.shape[0]):
        union = np.concatenate((x_p[b], x_q[b]))
        present = np.empty(2 * n_k, dtype=np.bool_)
        for k in range(n_k):
            present[k] = log_w_p[b, k] > -np.inf
            present[n_k + k] = log_w_q[b, k] > -np.inf
        log_p = np.empty(2 * n_k)
        log_q = np.empty(2 * n_k)
        _smoothed_log_density(union, present, x_p[b], log_w_p[b], c, log_p)
        _smoothed_log_density(union, present, x_q[b], log_w_q[b], c, log_q)
        kl = 0.0
        for u in range(2 * n_k):
            if present[u]:
                kl += np.exp(log_p[u]) * (log_p[u] - log_q[u])
        out[b] = kl
