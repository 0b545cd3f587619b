"""Numba kernels of preprocessing's per-image pass (``cryoday.preprocess``): the background's
robust statistics and the normalisation, a thread per image, with no float64 copy of a chunk
(numpy's ``partition`` on a chunk and the normalisation's temporaries were 40% of
preprocessing a 40,000-particle, 128-px set)."""

from __future__ import annotations

import numba
import numpy as np

from cryoday import jit


@numba.njit(parallel=True, cache=jit.CACHE)
def background_statistics(images, pixels, background, deviation):
    """Per image ``i`` of ``images`` ``(n, box * box)``: the median of its ``pixels`` (flat
    indices) into ``background[i]`` and the median absolute deviation from it into
    ``deviation[i]`` (numpy's medians: the mean of the two middle values of an even count)."""
    for i in numba.prange(images.shape[0]):
        values = np.empty(len(pixels), dtype=np.float64)
        for j in range(len(pixels)):
            values[j] = images[i, pixels[j]]
        centre = np.median(values)
        for j in range(len(pixels)):
            values[j] = abs(values[j] - centre)
        background[i] = centre
        deviation[i] = np.median(values)


@numba.njit(parallel=True, cache=jit.CACHE, fastmath=jit.FASTMATH)
def normalise_into(images, background, scale, out):
    """``out[i] = (images[i] - background[i]) * scale[i]`` for ``(n, m)`` float32 images."""
    for i in numba.prange(images.shape[0]):
        b = background[i]
        s = scale[i]
        for j in range(images.shape[1]):
            out[i, j] = np.float32((images[i, j] - b) * s)
