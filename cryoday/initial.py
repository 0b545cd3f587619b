"""The random initial density (paper Figure 5) and resampling of volumes between stages."""

from __future__ import annotations

import numpy as np

from cryoday.fourier import fourier_crop_3d, ft3, ift3, radial_index_3d, rescale_volume


def random_blobs(box: int, pixel_size: float, seed: int, diameter_A: float | None = None,
                 n_blobs: int = 12) -> np.ndarray:
    """A sum of random Gaussian blobs inside a sphere of the particle's size, reproducibly.

    Blob centres are uniform in a sphere of radius 0.3 x diameter, radii 0.08-0.16 x diameter,
    weights 0.5-1.5: a lumpy, roughly particle-sized object with no preferred orientation.
    Returns float32, non-negative, maximum 1 (the caller scales it to the data).
    """
    rng = np.random.default_rng(seed)
    diameter = diameter_A if diameter_A else 0.6 * box * pixel_size
    radius_px = 0.3 * diameter / pixel_size
    direction = rng.standard_normal((n_blobs, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    centres = direction * radius_px * rng.uniform(0, 1, (n_blobs, 1)) ** (1 / 3)
    sizes = rng.uniform(0.08, 0.16, n_blobs) * diameter / pixel_size
    weights = rng.uniform(0.5, 1.5, n_blobs)
    axis = np.arange(box) - box // 2
    volume = np.zeros((box,) * 3)
    for (x, y, z), s, w in zip(centres, sizes, weights):
        gx = np.exp(-((axis - x) ** 2) / (2 * s * s))
        gy = np.exp(-((axis - y) ** 2) / (2 * s * s))
        gz = np.exp(-((axis - z) ** 2) / (2 * s * s))
        volume += w * gz[:, None, None] * gy[None, :, None] * gx[None, None, :]
    return (volume / volume.max()).astype(np.float32)


def low_pass(volume: np.ndarray, radius_px: float, edge_px: float = 2.0) -> np.ndarray:
    """Soft (raised-cosine) low-pass to Fourier radius ``radius_px``, clipped at 0."""
    r = radial_index_3d(volume.shape[0])
    filt = np.clip((radius_px + edge_px - r) / edge_px, 0, 1)
    filt = 0.5 - 0.5 * np.cos(np.pi * filt)
    return np.maximum(ift3(ft3(volume) * filt), 0).astype(np.float32)


def resample_volume(volume: np.ndarray, new_box: int) -> np.ndarray:
    """Resample to ``new_box`` over the same physical box (mean-preserving), clipped at 0."""
    return np.maximum(fourier_crop_3d(volume, new_box), 0).astype(np.float32)


def resample_for_stage(volume: np.ndarray, new_box: int) -> np.ndarray:
    """The previous stage's map at the next stage's box, its projections at the images' scale.

    Stage images are Fourier-cropped keeping pixel values (a local mean), while a projection sums
    ``box`` voxels along each ray: a map resampled the same way from ``n`` to ``new_box`` voxels
    would project ``new_box / n`` times too bright, so its density is scaled by ``n / new_box``.
    """
    n = volume.shape[0]
    return resample_volume(volume, new_box) * np.float32(n / new_box)


def resample_to(volume: np.ndarray, voxel_size: float, box: int, pixel_size: float) -> np.ndarray:
    """A user's map resampled to ``box`` voxels of ``pixel_size`` A, clipped at 0."""
    return np.maximum(rescale_volume(volume, voxel_size, box, pixel_size), 0).astype(np.float32)
