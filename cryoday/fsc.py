"""Fourier shell correlation and resolution estimates."""

from __future__ import annotations

import numpy as np

from cryoday.fourier import ft3, radial_index_3d


def fsc(map1: np.ndarray, map2: np.ndarray, pixel_size: float, mask=None
        ) -> tuple[np.ndarray, np.ndarray]:
    """FSC between two maps in shells of one Fourier pixel, up to Nyquist.

    Returns ``(freq, fsc)`` with ``freq`` the shells' spatial frequency in 1/A (shell ``k`` is
    ``k / (box * pixel_size)``).
    """
    if map1.shape != map2.shape:
        raise ValueError(f"maps of different shapes {map1.shape} and {map2.shape}")
    a = np.asarray(map1, np.float64)
    b = np.asarray(map2, np.float64)
    if mask is not None:
        a, b = a * mask, b * mask
    fa, fb = ft3(a), ft3(b)
    n = a.shape[0]
    shells = np.rint(radial_index_3d(n)).astype(np.int64).ravel()
    n_shells = n // 2 + 1
    keep = shells < n_shells
    shells = shells[keep]
    cross = np.bincount(shells, (fa * np.conj(fb)).real.ravel()[keep], n_shells)
    pa = np.bincount(shells, (np.abs(fa) ** 2).ravel()[keep], n_shells)
    pb = np.bincount(shells, (np.abs(fb) ** 2).ravel()[keep], n_shells)
    curve = cross / np.sqrt(np.maximum(pa * pb, 1e-300))
    return np.arange(n_shells) / (n * pixel_size), curve


def resolution_at(freq: np.ndarray, curve: np.ndarray, threshold: float = 0.143) -> float:
    """Resolution (A) where the FSC first falls below ``threshold`` (linear interpolation).

    Returns the Nyquist resolution when it never does, and inf when it starts below.
    """
    below = np.flatnonzero(curve[1:] < threshold) + 1
    if len(below) == 0:
        return float(1.0 / freq[-1])
    k = below[0]
    if k <= 1:
        return float("inf")
    f0, f1, c0, c1 = freq[k - 1], freq[k], curve[k - 1], curve[k]
    f = f0 + (c0 - threshold) * (f1 - f0) / (c0 - c1)
    return float(1.0 / f)


def soft_spherical_mask(box: int, radius_px: float, edge_px: float = 3.0) -> np.ndarray:
    """1 inside ``radius_px`` of the centre voxel, a raised-cosine edge, 0 outside."""
    k = np.arange(box) - box // 2
    z, y, x = np.meshgrid(k, k, k, indexing="ij")
    r = np.sqrt(x * x + y * y + z * z)
    t = np.clip((r - radius_px) / edge_px, 0, 1)
    return (0.5 + 0.5 * np.cos(np.pi * t)).astype(np.float32)
