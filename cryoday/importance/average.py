"""The dataset-average posterior: the mean over all images of their stored marginals.

It lets an image's proposal reach poses that are common in the data but that the image itself
has not had mass on (a view it may have been wrongly assigned away from). It lives on the
current grid only (``n_dir + n_inp + n_shift`` floats), so it adds nothing to the saved
state: it is rebuilt from the store when the grid changes and kept up to date at each update
by replacing the visited images' contributions.
"""

from __future__ import annotations

import numpy as np

from cryoday.importance.geometry import GridKernels
from cryoday.importance.store import normalised_logw


class DatasetAverage:
    """Per dimension, the sum of the stored images' marginals snapped to the current grid.

    Parameters
    ----------
    kernels : GridKernels of the current grid (and through it the store)
    chunk : images snapped at once while the sum is built

    Attributes
    ----------
    deposits : three (n,) arrays, the unsmoothed sums per grid point
    """

    def __init__(self, kernels: GridKernels, chunk: int = 20000):
        self.kernels = kernels
        self.store = kernels.store
        self.deposits = [np.zeros(dom.n) for dom in kernels.domains]
        self._average = [None, None, None]
        seen = np.flatnonzero(self.store.has)
        for lo in range(0, len(seen), chunk):
            self.deposit(seen[lo:lo + chunk], 1.0)

    def _masses(self, dim: int, rows) -> tuple[np.ndarray, np.ndarray]:
        """Grid indices and untempered normalised masses of ``rows``' stored points."""
        logp = self.store.log_masses(dim)[rows].astype(np.float64)
        w = np.exp(normalised_logw(logp))
        return self.kernels.snapped(dim, rows), np.nan_to_num(w)

    def deposit(self, rows, sign: float) -> None:
        """Add (``sign`` 1) or remove (-1) ``rows``' stored marginals."""
        for dim in range(3):
            idx, w = self._masses(dim, rows)
            self.deposits[dim] += sign * np.bincount(idx.ravel(), weights=w.ravel(),
                                                     minlength=self.kernels.domains[dim].n)
            self._average[dim] = None

    def __call__(self, dim: int) -> np.ndarray:
        """Mean posterior over all images in dimension ``dim`` (0 directions, 1 in-plane,
        2 shifts), kernel-smoothed, summing to 1; images without a posterior count as the
        base measure."""
        if self._average[dim] is None:
            dom = self.kernels.domains[dim]
            n = self.store.n
            seen = int(self.store.has.sum())
            # Replacing contributions leaves rounding residue around zero.
            smoothed = dom.smoothing @ np.maximum(self.deposits[dim], 0.0)
            total = smoothed.sum()
            average = (1.0 - seen / n) * dom.base
            if total > 0 and seen:
                average = average + (seen / n) * smoothed / total
            self._average[dim] = average / average.sum()
        return self._average[dim]
