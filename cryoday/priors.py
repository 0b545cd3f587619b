"""Priors on the density (docs/method.md section 6): -log p(V) and its gradient.

Each prior is scaled by ``strength`` and, in the minibatch objective, divided by the number of
training images (so the prior weighs as much as one image's likelihood per image). Scales are
data-driven through ``reference_density``: the mean density of the expected structure (the
current volume's mean over its support when not given), so the defaults do not depend on the
units of the data.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


class Prior:
    """Negative log prior; ``value_and_grad(volume) -> (float, float32 array)``."""

    kind = "none"

    def value_and_grad(self, volume: np.ndarray) -> tuple[float, np.ndarray]:
        return 0.0, np.zeros_like(volume)


class ExponentialPrior(Prior):
    """``-log p(V) = lam * sum(V)`` for V >= 0, ``lam = 0.9 * strength / reference_density``.

    The paper's default: it favours empty solvent, which keeps the random start from filling the
    box with noise.
    """

    kind = "exponential"

    def __init__(self, reference_density: float, strength: float = 1.0):
        self.lam = 0.9 * strength / max(reference_density, 1e-12)

    def value_and_grad(self, volume):
        return float(self.lam * volume.sum(dtype=np.float64)), np.full_like(volume, self.lam)


class GaussianPrior(Prior):
    """``-log p(V) = sum(V^2) / (2 s^2)``, i.i.d. on voxels, ``s = reference_density / strength``."""

    kind = "gaussian"

    def __init__(self, reference_density: float, strength: float = 1.0):
        self.inv_var = (strength / max(reference_density, 1e-12)) ** 2

    def value_and_grad(self, volume):
        v = volume.astype(np.float64)
        return float(0.5 * self.inv_var * (v * v).sum()), (self.inv_var * volume).astype(
            np.float32)


class SmoothnessPrior(Prior):
    """``-log p(V) = 0.5 * lam * ||(I - K) V||^2`` with K a normalised Gaussian blur (1 voxel).

    A conditional autoregressive prior: each voxel is pulled towards the weighted mean of its
    neighbours. K is symmetric, so the gradient is ``lam * (I - K)(I - K) V`` exactly.
    """

    kind = "smoothness"

    def __init__(self, reference_density: float, strength: float = 1.0, sigma_voxels=1.0):
        self.lam = strength / max(reference_density, 1e-12) ** 2
        self.sigma = sigma_voxels

    def _residual(self, v):
        return v - ndimage.gaussian_filter(v, self.sigma, mode="constant")

    def value_and_grad(self, volume):
        v = volume.astype(np.float64)
        r = self._residual(v)
        return float(0.5 * self.lam * (r * r).sum()), (self.lam * self._residual(r)).astype(
            np.float32)


def make_prior(kind: str, reference_density: float, strength: float = 1.0) -> Prior:
    """A prior by name: ``exponential``, ``gaussian`` or ``smoothness``."""
    classes = {"exponential": ExponentialPrior, "gaussian": GaussianPrior,
               "smoothness": SmoothnessPrior}
    if kind not in classes:
        raise ValueError(f"unknown prior {kind!r}; choose one of {sorted(classes)}")
    return classes[kind](reference_density, strength)
