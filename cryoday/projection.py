"""The Fourier slice operator of the reconstruction engine and its exact adjoint.

``forward`` maps a real-space volume to central slices of its 3D transform at the given
rotations, evaluated at the operator's coefficients (the half plane of the ``box x box`` centred
spectrum inside ``radius``). Interpolation is trilinear on a 2x zero-padded transform, with a
gridding correction (the volume is divided by the real-space image of the trilinear kernel,
``sinc^2`` per axis, before padding) that removes most of trilinear's attenuation towards the
box edge; the accuracy against a real-space projection is measured in
``tests/test_projection.py``. Only the sub-cube of the padded spectrum the slices can reach
(radius ``2 * radius + 2``) is kept, so memory and the adjoint's scatter scale with the stage's
resolution, not with the box.

``adjoint`` is the exact adjoint under the real inner product with the Hermitian weights, so
gradients through it are exact gradients of the discretised model.
"""

from __future__ import annotations

import numba
import numpy as np
import scipy.fft as sfft

from cryoday import jit, scratch
from cryoday.fourier import ft3, ift3


@numba.njit(cache=jit.CACHE, fastmath=jit.FASTMATH, inline="always")
def _trilinear_weights(fx, fy, fz):
    """The eight corner weights at fractions ``(fx, fy, fz)``, ``w_zyx`` in the order
    000, 001, 010, 011, 100, 101, 110, 111 (x fastest), of the adjoint's scatter. The slice
    computes the same trilinear interpolation as lerps; the adjoint identity test holds the two
    together to float precision."""
    gx = 1 - fx
    gy = 1 - fy
    gz = 1 - fz
    return (gz * gy * gx, gz * gy * fx, gz * fy * gx, gz * fy * fx,
            fz * gy * gx, fz * gy * fx, fz * fy * gx, fz * fy * fx)


@numba.njit(parallel=True, cache=jit.CACHE, fastmath=jit.FASTMATH)
def _slice_trilinear(flat, m, centre, rotations, kx, ky, scale, out):
    """Trilinear slices of a cube at ``2 A_r^T (kx, ky, 0) + centre``, times ``scale``.

    ``flat`` is the ``(m, m, m)`` complex64 cube viewed as interleaved float32; row ``r`` of
    ``out`` ``(n_rot, 2 n_coef)`` gets the real parts, then the imaginary parts. Every point must
    lie inside the cube (the operator sizes it so). Per slice, a first loop forms the corner
    offsets and fractions (it vectorises); the second does the gathers, with no bounds checks or
    index arithmetic left in it, and interpolates by seven lerps (along x, then y, then z) rather
    than eight corner weights: the same trilinear value in fewer operations. Each of these steps
    (complex64 rather than complex128, the two loops, slices in locality order, lerps) made the
    kernel faster; ``benchmarks/likelihood.py`` times it (``forward``).
    """
    n_coef = kx.shape[0]
    sy = np.uint64(2 * m)
    sz = np.uint64(2 * m * m)
    for r in numba.prange(rotations.shape[0]):
        a = rotations[r]
        a00 = np.float32(2.0 * a[0, 0])
        a10 = np.float32(2.0 * a[1, 0])
        a01 = np.float32(2.0 * a[0, 1])
        a11 = np.float32(2.0 * a[1, 1])
        a02 = np.float32(2.0 * a[0, 2])
        a12 = np.float32(2.0 * a[1, 2])
        c = np.float32(centre)
        base = np.empty(n_coef, dtype=np.uint32)  # slice_parts checks 2 m^3 < 2^32
        fxs = np.empty(n_coef, dtype=np.float32)
        fys = np.empty(n_coef, dtype=np.float32)
        fzs = np.empty(n_coef, dtype=np.float32)
        for k in range(n_coef):
            qx = a00 * kx[k] + a10 * ky[k] + c
            qy = a01 * kx[k] + a11 * ky[k] + c
            qz = a02 * kx[k] + a12 * ky[k] + c
            x0 = np.int32(qx)  # truncation is floor here: every q is positive
            y0 = np.int32(qy)
            z0 = np.int32(qz)
            fxs[k] = qx - x0
            fys[k] = qy - y0
            fzs[k] = qz - z0
            base[k] = np.uint32(z0 * (2 * m * m) + y0 * (2 * m) + 2 * x0)
        row = out[r]
        for k in range(np.uint64(n_coef)):
            b0 = np.uint64(base[k])
            b1 = b0 + sy
            b2 = b0 + sz
            b3 = b2 + sy
            fx = fxs[k]
            fy = fys[k]
            fz = fzs[k]
            re00 = flat[b0] + fx * (flat[b0 + 2] - flat[b0])
            im00 = flat[b0 + 1] + fx * (flat[b0 + 3] - flat[b0 + 1])
            re01 = flat[b1] + fx * (flat[b1 + 2] - flat[b1])
            im01 = flat[b1 + 1] + fx * (flat[b1 + 3] - flat[b1 + 1])
            re10 = flat[b2] + fx * (flat[b2 + 2] - flat[b2])
            im10 = flat[b2 + 1] + fx * (flat[b2 + 3] - flat[b2 + 1])
            re11 = flat[b3] + fx * (flat[b3 + 2] - flat[b3])
            im11 = flat[b3 + 1] + fx * (flat[b3 + 3] - flat[b3 + 1])
            re0 = re00 + fy * (re01 - re00)
            im0 = im00 + fy * (im01 - im00)
            re1 = re10 + fy * (re11 - re10)
            im1 = im10 + fy * (im11 - im10)
            row[k] = (re0 + fz * (re1 - re0)) * scale
            row[np.uint64(n_coef) + k] = (im0 + fz * (im1 - im0)) * scale


@numba.njit(cache=jit.CACHE, fastmath=jit.FASTMATH, inline="always")
def _scatter_corners(a, kx, ky, centre, m, base, fxs, fys, fzs):
    """For rotation ``a``, each coefficient's point ``2 a^T (kx, ky, 0) + centre`` in an
    ``(m, m, m)`` cube: the flat index of its lower corner in ``base`` (-1 when a corner falls
    outside) and its fractions in ``fxs``, ``fys``, ``fzs``. Shared by the scatters (the slice
    adjoint and known-pose insertion)."""
    for k in range(kx.shape[0]):
        qx = 2.0 * (a[0, 0] * kx[k] + a[1, 0] * ky[k]) + centre
        qy = 2.0 * (a[0, 1] * kx[k] + a[1, 1] * ky[k]) + centre
        qz = 2.0 * (a[0, 2] * kx[k] + a[1, 2] * ky[k]) + centre
        x0 = np.floor(qx)
        y0 = np.floor(qy)
        z0 = np.floor(qz)
        fxs[k] = qx - x0
        fys[k] = qy - y0
        fzs[k] = qz - z0
        inside = (0 <= x0 and x0 + 1 < m and 0 <= y0 and y0 + 1 < m
                  and 0 <= z0 and z0 + 1 < m)
        base[k] = (np.int64(z0) * m + np.int64(y0)) * m + np.int64(x0) if inside else -1


@numba.njit(cache=jit.CACHE, fastmath=jit.FASTMATH, inline="always")
def _add_at_corners(acc, b, sy, sz, weights, v):
    """``acc`` (a flat cube, strides 1, ``sy``, ``sz``) gets ``weights`` (the eight corner weights
    of :func:`_trilinear_weights`) times ``v`` at the cell whose lower corner is ``b``."""
    w000, w001, w010, w011, w100, w101, w110, w111 = weights
    acc[b] += w000 * v
    acc[b + 1] += w001 * v
    acc[b + sy] += w010 * v
    acc[b + sy + 1] += w011 * v
    acc[b + sz] += w100 * v
    acc[b + sz + 1] += w101 * v
    acc[b + sz + sy] += w110 * v
    acc[b + sz + sy + 1] += w111 * v


@numba.njit(parallel=True, cache=jit.CACHE, fastmath=jit.FASTMATH)
def _scatter_trilinear(values, factor, centre, rotations, kx, ky, accumulators):
    """Adjoint of :func:`_slice_trilinear`: scatter ``factor * values`` into per-thread cubes.

    Each thread owns one accumulator cube (summed afterwards), which avoids races without
    atomics; the cubes only span the reachable sub-cube, so this costs a few MB per thread.
    ``values`` is complex ``(n_rot, n_coef)``, ``factor`` real ``(n_coef,)``, ``accumulators``
    complex ``(T, m, m, m)``. As in the forward pass, the corner offsets and fractions are formed
    in a vectorised loop first; points outside the cube are dropped.
    """
    m = accumulators.shape[1]
    n_threads = accumulators.shape[0]
    n_rot = rotations.shape[0]
    n_coef = kx.shape[0]
    chunk = (n_rot + n_threads - 1) // n_threads
    sy = np.uint64(m)
    sz = np.uint64(m * m)
    for t in numba.prange(n_threads):
        acc = accumulators[t].ravel()
        base = np.empty(n_coef, dtype=np.int64)
        fxs = np.empty(n_coef, dtype=np.float64)
        fys = np.empty(n_coef, dtype=np.float64)
        fzs = np.empty(n_coef, dtype=np.float64)
        for r in range(t * chunk, min(n_rot, (t + 1) * chunk)):
            a = rotations[r]
            _scatter_corners(a, kx, ky, centre, m, base, fxs, fys, fzs)
            for k in range(n_coef):
                if base[k] < 0:
                    continue
                b = np.uint64(base[k])
                _add_at_corners(acc, b, sy, sz, _trilinear_weights(fxs[k], fys[k], fzs[k]),
                                values[r, k] * factor[k])


@numba.njit(parallel=True, cache=jit.CACHE, fastmath=jit.FASTMATH)
def _hermitian_half(accumulators, h, half):
    """``half[k] = (X(k) + conj X(-k)) / 2`` for ``kx >= 0``, ``X`` the threads' cubes summed.

    ``accumulators`` ``(T, 2h+1, 2h+1, 2h+1)`` are centred at ``h``; ``half`` ``(m, m, m//2+1)``
    is in the FFT's order (index ``k mod m``) and must be zero elsewhere; ``h < m / 2``.
    """
    m = half.shape[0]
    n_threads = accumulators.shape[0]
    for kz in numba.prange(-h, h + 1):
        for ky in range(-h, h + 1):
            for kx in range(h + 1):
                value = 0j
                for t in range(n_threads):
                    value += (accumulators[t, h + kz, h + ky, h + kx]
                              + np.conj(accumulators[t, h - kz, h - ky, h - kx]))
                half[kz % m, ky % m, kx] = 0.5 * value


class SliceOperator:
    """Central slices of a ``box^3`` volume's transform at the coefficients ``|k| < radius``.

    Parameters
    ----------
    box : int
        Image and volume size in px (the stage's box).
    radius : float
        Cutoff in Fourier pixels, ``box * pixel_size / resolution_A``; must be below ``box / 2``.

    Attributes
    ----------
    kx, ky : numpy.ndarray
        ``(n_coef,)`` float32 Fourier indices of the coefficients: the half plane ``ky > 0`` or
        ``ky == 0, kx >= 0``; the other half follows by Hermitian symmetry.
    weights : numpy.ndarray
        ``(n_coef,)`` float32, 1 at the origin and 2 elsewhere, so that a weighted sum over the
        half plane equals the sum over the full disc.
    """

    def __init__(self, box: int, radius: float):
        # Up to Nyquist itself (the disc keeps |k| < radius), with room for rounding.
        if not 0 < radius <= box / 2 * (1 + 1e-9):
            raise ValueError(f"radius {radius} must be in (0, {box / 2}] for a {box} px box")
        self.box = int(box)
        self.radius = float(radius)
        k = np.arange(box) - box // 2
        ky, kx = np.meshgrid(k, k, indexing="ij")
        half = (ky > 0) | ((ky == 0) & (kx >= 0))
        keep = half & (np.hypot(kx, ky) < radius)
        self._flat = np.flatnonzero(keep.ravel())
        # The same coefficients in a real FFT over y (``rfft2(axes=(-1, -2))``: ky >= 0, every
        # kx, uncentred): its flat index, and the phase that makes it the centred transform
        # (ifftshift in real space is a shift by box // 2, a phase in Fourier space).
        half_ky, half_kx = ky.ravel()[self._flat], kx.ravel()[self._flat]
        self._rfft_flat = half_ky * box + np.mod(half_kx, box)
        self._rfft_phase = np.exp(2j * np.pi * (box // 2) * (half_kx + half_ky) / box).astype(
            np.complex64)
        self.kx = kx.ravel()[self._flat].astype(np.float32)
        self.ky = ky.ravel()[self._flat].astype(np.float32)
        self.weights = np.where((self.kx == 0) & (self.ky == 0), 1.0, 2.0).astype(np.float32)
        self.n_coef = len(self._flat)
        # Reachable sub-cube of the 2x padded spectrum: |q| <= 2 * radius, plus one voxel (it
        # may overhang the padded spectrum near Nyquist: that part is zero, see _window).
        self._half_cube = int(np.ceil(2 * radius)) + 2
        self._cube_size = 2 * self._half_cube + 1
        m = 2 * self.box
        x = (np.arange(self.box) - self.box // 2) / m
        self._gridding = (np.sinc(x) ** 2).astype(np.float64)
        self._scale = 2.0**1.5 * np.sqrt(self.box)
        self._kx64 = self.kx.astype(np.float64)
        self._ky64 = self.ky.astype(np.float64)

    # ------------------------------------------------------------------ helpers

    def extract(self, images_ft: np.ndarray) -> np.ndarray:
        """The operator's coefficients of centred unitary image transforms ``(B, box, box)``."""
        flat = np.asarray(images_ft).reshape(len(images_ft), -1)
        return np.ascontiguousarray(flat[:, self._flat]).astype(np.complex64)

    def coefficients(self, images: np.ndarray) -> np.ndarray:
        """The operator's coefficients of real images ``(B, box, box)``: ``extract(ft2(images))``
        (complex64), from a half real FFT with no shifts, about three times faster."""
        half = sfft.rfft2(np.asarray(images, dtype=np.float32), axes=(-1, -2), norm="ortho",
                          workers=-1)
        flat = half.reshape(len(half), -1)
        return np.ascontiguousarray(flat[:, self._rfft_flat] * self._rfft_phase,
                                    dtype=np.complex64)

    def _corrected(self, volume: np.ndarray) -> np.ndarray:
        g = self._gridding
        return volume / (g[:, None, None] * g[None, :, None] * g[None, None, :])

    def _window(self) -> tuple[slice, slice]:
        """Where the sub-cube and the ``2 box`` padded spectrum overlap: (spectrum, cube) slices."""
        c, h = self.box, self._half_cube
        lo, hi = max(0, c - h), min(2 * self.box, c + h + 1)
        return slice(lo, hi), slice(lo - (c - h), hi - (c - h))

    def prepare(self, volume: np.ndarray) -> np.ndarray:
        """The reachable sub-cube of the 2x padded transform of the corrected volume (complex64).

        Single precision: the slices are float32 anyway, and the cube, read once per point of
        every slice, is half the size in memory.
        """
        n, m = self.box, 2 * self.box
        # float32: the cube is kept in single precision anyway, and the FFT runs 2x faster.
        padded = np.zeros((m, m, m), dtype=np.float32)
        lo = m // 2 - n // 2
        padded[lo:lo + n, lo:lo + n, lo:lo + n] = self._corrected(np.asarray(volume, np.float64))
        spectrum = ft3(padded)
        spec, sub = self._window()
        cube = np.zeros((self._cube_size,) * 3, dtype=np.complex64)
        cube[sub, sub, sub] = spectrum[spec, spec, spec]
        return cube

    # ------------------------------------------------------------------ operator

    def forward(self, volume: np.ndarray, rotations: np.ndarray, cube: np.ndarray | None = None
                ) -> np.ndarray:
        """Slices ``(n_rot, n_coef)`` complex64 at RELION rotation matrices ``(n_rot, 3, 3)``.

        Equal to ``extract(ft2(P))`` for the real-space projections ``P`` up to interpolation
        error. Pass ``cube=prepare(volume)`` to reuse the transform across calls.
        """
        parts = self.slice_parts(self.prepare(volume) if cube is None else cube, rotations)
        return parts[:, :self.n_coef] + 1j * parts[:, self.n_coef:]

    def slice_parts(self, cube: np.ndarray, rotations: np.ndarray) -> np.ndarray:
        """Slices as float32 ``(n_rot, 2 n_coef)``: real parts, then imaginary parts.

        The form the likelihood kernel multiplies; ``cube`` is :meth:`prepare`'s.
        """
        rotations = np.ascontiguousarray(np.asarray(rotations, np.float64).reshape(-1, 3, 3))
        if 2 * cube.shape[0] ** 3 >= 2**32:  # the kernel's offsets are 32-bit
            raise ValueError(f"a {cube.shape[0]}^3 cube is too large to slice (at most 1289^3)")
        out = np.empty((len(rotations), 2 * self.n_coef), dtype=np.float32)
        cube = np.ascontiguousarray(cube, dtype=np.complex64)
        _slice_trilinear(cube.view(np.float32).ravel(), cube.shape[0], float(self._half_cube),
                         rotations, self.kx, self.ky, np.float32(self._scale), out)
        return out

    def adjoint(self, slices: np.ndarray, rotations: np.ndarray) -> np.ndarray:
        """Exact adjoint: ``sum(Re(conj(forward(v)) * weights * y)) == sum(v * adjoint(y))``.

        Returns a float32 ``(box, box, box)`` volume.
        """
        rotations = np.ascontiguousarray(np.asarray(rotations, np.float64).reshape(-1, 3, 3))
        values = np.ascontiguousarray(slices)
        if values.dtype != np.complex64 and values.dtype != np.complex128:
            values = values.astype(np.complex128)
        n_threads = numba.get_num_threads()
        size = self._cube_size
        # Single precision: the gradient it serves is float32, and half the memory to zero,
        # fill and sum (tested against the forward pass to 1e-5).
        accumulators = scratch.zeroed("projection.adjoint", (n_threads, size, size, size),
                                      np.complex64)
        _scatter_trilinear(values, self.weights.astype(np.float64) * self._scale,
                           float(self._half_cube), rotations, self._kx64, self._ky64,
                           accumulators)
        n, m = self.box, 2 * self.box
        lo = m // 2 - n // 2
        # The adjoint of the unitary forward transform is the unitary inverse; the real part is
        # the adjoint of embedding a real volume in complex space.
        if self._half_cube < self.box:
            # The real part of the inverse transform is the inverse transform of the Hermitian
            # part (X(k) + conj X(-k)) / 2: a real-output FFT of half the spectrum, which the
            # threads' cubes are summed straight into, in the FFT's (unshifted) order.
            half = scratch.zeroed("projection.adjoint_half", (m, m, m // 2 + 1), np.complex64)
            _hermitian_half(accumulators, self._half_cube, half)
            unshifted = sfft.irfftn(half, s=(m, m, m), norm="ortho", workers=-1)
            keep = (lo + np.arange(n) + m // 2) % m  # the centred box, read through the shift
            padded = unshifted[np.ix_(keep, keep, keep)]
        else:  # the sub-cube overhangs the spectrum near Nyquist: no mirror inside it
            spectrum = np.zeros((m, m, m), dtype=np.complex64)
            spec, sub = self._window()
            spectrum[spec, spec, spec] = accumulators.sum(axis=0)[sub, sub, sub]
            padded = ift3(spectrum)[lo:lo + n, lo:lo + n, lo:lo + n]
        return self._corrected(padded).astype(np.float32)
