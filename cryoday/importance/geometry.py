"""Kernel geometry: each grid factor embedded so that its smoothing kernel is ``exp(-c |x-y|^2)``.

Directions are unit vectors in R^3 (a von Mises-Fisher kernel ``exp(kappa (u.v - 1))`` is
``exp(-kappa |u - v|^2 / 2)`` on them), in-plane angles unit vectors in R^2, shifts points in A.
One embedding per factor lets stored points from any grid be snapped to the current grid by a
nearest-point search and spread by the grid's own sparse kernel matrix. The kernels' widths
are tied to the grid spacing (see ``docs/importance.md``).

A grid with a point group covers one asymmetric unit of directions. Stored directions come from
such grids, but the antipodes the early proposals add, and points stored under another unit,
lie outside it: they snap to the grid point nearest to their equivalent in the unit
(``cryoday.symmetry.to_asymmetric_unit``), not to the nearest point across the unit's edge.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import csr_matrix
from scipy.spatial import cKDTree

from cryoday import symmetry, tunables
from cryoday.importance.store import K_STORED, PosteriorStore


def embed(dim: int, coordinates: np.ndarray) -> np.ndarray:
    """Stored coordinates of dimension ``dim`` in its kernel's embedding (angles to
    ``(cos, sin)``; directions and shifts are their own embedding), ``(..., k)``."""
    x = coordinates
    return np.stack([np.cos(x), np.sin(x)], axis=-1) if dim == 1 else x


class Domain:
    """One factor of the grid, embedded in R^k so that its kernel is ``exp(-c |x - y|^2)``.

    Parameters
    ----------
    points : (n, k) the grid's points in the embedding
    c : float, the kernel's scale per squared distance
    base_logw : (n,) log quadrature weights: the "uniform" part of the proposal mixture
    """

    def __init__(self, points: np.ndarray, c: float, base_logw: np.ndarray):
        self.points = np.ascontiguousarray(points, dtype=np.float64)
        self.n = len(self.points)
        self.c = float(c)
        base = np.exp(np.asarray(base_logw, np.float64) - np.max(base_logw))
        self.base = base / base.sum()
        self._tree = cKDTree(self.points)
        self._smoothing = None

    def nearest(self, x: np.ndarray) -> np.ndarray:
        """Index of the nearest grid point to each ``x[..., :]``."""
        x = np.asarray(x, dtype=np.float64)
        _, idx = self._tree.query(x.reshape(-1, x.shape[-1]))
        return idx.reshape(x.shape[:-1]).astype(np.int64)

    @property
    def smoothing(self) -> csr_matrix:
        """The kernel between grid points within its cut-off, sparse and symmetric."""
        if self._smoothing is None:
            radius = np.sqrt(tunables.KERNEL_CUTOFF / self.c)
            pairs = self._tree.query_pairs(radius, output_type="ndarray")
            i = np.concatenate([pairs[:, 0], pairs[:, 1], np.arange(self.n)])
            j = np.concatenate([pairs[:, 1], pairs[:, 0], np.arange(self.n)])
            value = np.exp(-self.c * np.sum((self.points[i] - self.points[j]) ** 2, axis=1))
            self._smoothing = csr_matrix((value, (i, j)), shape=(self.n, self.n))
        return self._smoothing

    def spread_rows(self, idx: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Row ``b``: ``sum_k w[b, k] kernel(., grid[idx[b, k]])`` on the grid, ``(B, n)``.

        One sparse product of the rows' stored points with the kernel matrix, for the batch
        at once.
        """
        n_rows, k = idx.shape
        points = csr_matrix((np.asarray(w, np.float64).ravel(),
                             (np.repeat(np.arange(n_rows), k), np.asarray(idx).ravel())),
                            shape=(n_rows, self.n))
        return (points @ self.smoothing).toarray()


def grid_domains(grid) -> tuple[Domain, Domain, Domain]:
    """The grid's directions, in-plane angles and shifts as kernel domains.

    The kernels are 1/4 of their peak one angular step ``a`` away on directions (von
    Mises-Fisher, ``kappa = ln 4 / (1 - cos a)``), 1/2 one in-plane step away, and Gaussian on
    shifts with ``sigma`` = 0.67 shift steps. Directions and angles have uniform base
    measures, shifts the grid's Gaussian prior weights.
    """
    a = grid.angular_step
    step_inp = 2 * np.pi / grid.n_inp
    sigma = 0.67 * grid.shift_step_px * grid.pixel_size
    # vMF exp(kappa (u.v - 1)) is exp(-kappa |u - v|^2 / 2) on unit vectors.
    kappa_dir = np.log(4.0) / (1.0 - np.cos(a))
    kappa_inp = np.log(2.0) / max(1.0 - np.cos(step_inp), 1e-12)
    return (
        Domain(grid.directions, kappa_dir / 2, np.zeros(grid.n_dir)),
        Domain(np.stack([np.cos(grid.inplane), np.sin(grid.inplane)], axis=1),
               kappa_inp / 2, np.zeros(grid.n_inp)),
        Domain(grid.shifts * grid.pixel_size, 1.0 / (2 * sigma * sigma),
               grid.shift_log_weights),
    )


class GridKernels:
    """The current grid's kernel domains, with each stored point's nearest grid point cached.

    Parameters
    ----------
    grid : cryoday.quadrature.PoseGrid
    store : PosteriorStore whose points are snapped to the grid

    Attributes
    ----------
    domains : the three :class:`Domain` (directions, in-plane angles, shifts)
    coordinates : the grid's points per dimension in the store's units (unit vectors,
        radians, A), indexed as the grid is
    """

    def __init__(self, grid, store: PosteriorStore):
        self.store = store
        self.domains = grid_domains(grid)
        self.coordinates = (grid.directions, grid.inplane, grid.shifts * grid.pixel_size)
        self.symmetry = getattr(grid, "symmetry", "C1")
        # Per image and stored point, its nearest grid point (-1: not known yet), for the three
        # dimensions and the antipodal directions: int32, 0.5 kB per image.
        self._snap = [np.full((store.n, K_STORED), -1, dtype=np.int32) for _ in range(4)]

    def embedded(self, dim: int, rows) -> np.ndarray:
        """Stored coordinates of ``rows`` in dimension ``dim``'s embedding, ``(B, K, k)``."""
        return embed(dim, self.store.coordinates(dim)[rows].astype(np.float64))

    def snapped(self, dim: int, rows, antipodes: bool = False) -> np.ndarray:
        """The grid points nearest to ``rows``' stored points in dimension ``dim`` (or to their
        antipodes), ``(B, K)``.

        Kept per image until its points or the grid change: without the cache every proposal
        and update ran a KD-tree query per image. Stored points written other than by
        :meth:`stored_at` need a new :class:`GridKernels` (``set_grid`` again).
        """
        cache = self._snap[3 if antipodes else dim]
        rows = np.asarray(rows)
        idx = cache[rows].astype(np.int64)
        unknown = idx[:, 0] < 0
        if unknown.any():
            x = self.embedded(dim, rows[unknown])
            x = -x if antipodes else x
            if dim == 0 and self.symmetry != "C1":
                x = symmetry.to_asymmetric_unit(x, self.symmetry)[0]
            found = self.domains[dim].nearest(x)
            cache[rows[unknown]] = found
            idx[unknown] = found
        return idx

    def stored_at(self, rows, index) -> None:
        """``rows`` were just stored at the grid points ``index[dim]`` ``(B, K)``: they snap back
        to them (their antipodes are found again when asked for)."""
        for dim in range(3):
            self._snap[dim][rows] = index[dim]
        self._snap[3][rows] = -1
