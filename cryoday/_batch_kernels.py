"""Numba kernels of ``cryoday.batch``: laying out the padded image transforms.

The padded transforms' last DFT is one matrix product over every image at once, which leaves
them as ``(ky, image, kx >= 0)``; turning that into ``(image, ky, kx)`` with the ``kx < 0`` half
filled by Hermitian symmetry took numpy two strided copies, 100 ms a minibatch at a 60-px stage
(more than both DFTs), and one pass over the images in parallel does it.
"""

from __future__ import annotations

import numba
import numpy as np

from cryoday import jit


@numba.njit(parallel=True, cache=jit.CACHE)
def hermitian_layout(half, out):
    """``out[i, y, h + x] = half[y, i, x]`` and ``out[i, y, x] = conj(half[2h - y, i, h - x])``
    for ``x < h``, where ``half`` is ``(2h + 1, n_images, h + 1)`` (rows ``ky = -h..h``, columns
    ``kx = 0..h``) and ``out`` ``(n_images, 2h + 1, 2h + 1)``."""
    ny, n_images, nx = half.shape
    h = nx - 1
    for i in numba.prange(n_images):
        for y in range(ny):
            for x in range(nx):
                out[i, y, h + x] = half[y, i, x]
            for x in range(h):
                out[i, y, x] = np.conj(half[ny - 1 - y, i, h - x])
