"""Work buffers kept between calls, handed out zeroed.

The likelihood's gradient and the slice adjoint accumulate into per-thread arrays of up to
~100 MB at 128 px and 1/10 A. Fresh ``numpy.zeros`` arrays of that size are paid for page by
page on first touch inside the kernels (measured: ~30% of the accumulators' cost); a kept buffer
is zeroed in parallel instead. Calls are not concurrent (the kernels parallelise inside), so one
buffer per key suffices.
"""

from __future__ import annotations

import numba
import numpy as np

from cryoday import jit

_BUFFERS: dict[str, np.ndarray] = {}


@numba.njit(parallel=True, cache=jit.CACHE)
def _fill_zero(flat):
    n = flat.shape[0]
    chunk = 1 << 16
    for c in numba.prange((n + chunk - 1) // chunk):
        flat[c * chunk:min(n, (c + 1) * chunk)] = 0


def zeroed(key: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """A zeroed C-contiguous array of ``shape``, reusing the buffer kept under ``key``.

    The array is only valid until the next call with the same ``key``.
    """
    dtype = np.dtype(dtype)
    size = int(np.prod(shape))
    buffer = _BUFFERS.get(key)
    if buffer is None or buffer.dtype != dtype or buffer.size < size:
        buffer = np.empty(size, dtype=dtype)
        _BUFFERS[key] = buffer
    out = buffer[:size]
    _fill_zero(out.view(np.uint8))
    return out.reshape(shape)
