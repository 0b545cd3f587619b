"""Centred, unitary Fourier transforms and frequency grids.

Every Fourier-space array in cryoday has its zero frequency at index ``N // 2`` and is unitary
(``norm="ortho"``), so Parseval holds exactly and white noise of unit variance in real space has
unit variance per Fourier coefficient.
"""

from __future__ import annotations

import functools

import numpy as np
import scipy.fft as sfft


def ft2(images: np.ndarray, workers: int = -1) -> np.ndarray:
    """Centred unitary 2D FFT over the last two axes (``[..., y, x]``)."""
    axes = (-2, -1)
    shifted = sfft.ifftshift(images, axes=axes)
    return sfft.fftshift(sfft.fft2(shifted, axes=axes, norm="ortho", workers=workers), axes=axes)


def ift2(spectra: np.ndarray, workers: int = -1) -> np.ndarray:
    """Inverse of :func:`ft2`; returns the real part."""
    axes = (-2, -1)
    shifted = sfft.ifftshift(spectra, axes=axes)
    out = sfft.fftshift(sfft.ifft2(shifted, axes=axes, norm="ortho", workers=workers), axes=axes)
    return out.real


def ft3(volume: np.ndarray, workers: int = -1) -> np.ndarray:
    """Centred unitary 3D FFT of a ``[z, y, x]`` volume."""
    shifted = sfft.ifftshift(volume)
    return sfft.fftshift(sfft.fftn(shifted, norm="ortho", workers=workers))


def ift3(spectrum: np.ndarray, workers: int = -1) -> np.ndarray:
    """Inverse of :func:`ft3`; returns the real part."""
    shifted = sfft.ifftshift(spectrum)
    return sfft.fftshift(sfft.ifftn(shifted, norm="ortho", workers=workers)).real


def freq_index(n: int) -> np.ndarray:
    """Fourier indices ``k = i - n // 2`` of the centred layout, as float64."""
    return np.arange(n, dtype=np.float64) - n // 2


def radial_index_3d(n: int) -> np.ndarray:
    """Radius ``|k|`` in Fourier pixels of every voxel of a centred ``n^3`` spectrum."""
    k = freq_index(n)
    kz, ky, kx = np.meshgrid(k, k, k, indexing="ij")
    return np.sqrt(kx**2 + ky**2 + kz**2)


def half_spectrum(images: np.ndarray) -> np.ndarray:
    """Unitary real FFT of ``[..., n, n]`` images (``rfft2``: uncentred, ``kx >= 0``), the input
    of :func:`crop_half_spectrum`: one per image serves every crop."""
    return sfft.rfft2(np.asarray(images, dtype=np.float32), norm="ortho", workers=-1)


def centred_index(k: np.ndarray, n: int) -> np.ndarray:
    """Frequencies ``k`` as the centred layout's ``[-n // 2, n - n // 2)``."""
    return (k + n // 2) % n - n // 2


@functools.lru_cache(maxsize=32)
def _crop_plan(n: int, new_n: int):
    """Where :func:`crop_half_spectrum` reads the half spectrum, and its factors.

    The centred crop keeps the frequencies ``[-m // 2, m - m // 2)`` of the ``n`` grid
    (``m = new_n``); the real part of its inverse transform is the inverse transform of its
    Hermitian part ``H(k) = (Y(k) + conj Y(-k mod m)) / 2``, which a real inverse FFT takes on
    ``kx >= 0``. Both terms are read from the half spectrum (a frequency ``kx < 0`` as the
    conjugate at ``-k``), with the phases of the two centrings (centre ``n // 2``, then
    ``m // 2``) and the scale ``m / n``; they differ from ``Y(k)`` only on an even crop's
    Nyquist row and column, where the crop holds ``-m / 2`` and not ``+m / 2``."""
    m = new_n
    ky = centred_index(np.arange(m), m)[:, None]
    kx = centred_index(np.arange(m // 2 + 1), m)[None, :]
    out_phase = np.exp(-2j * np.pi * (kx + ky) * (m // 2) / m) * (m / n) / 2
    terms = []
    for qy, qx, conjugate in ((ky, kx, False), (centred_index(-ky, m), centred_index(-kx, m),
                                                True)):
        qy, qx = np.broadcast_arrays(qy, qx)
        negative = qx < 0
        rows = np.where(negative, -qy, qy) % n
        cols = np.abs(qx)
        phase = np.exp(2j * np.pi * (qx + qy) * (n // 2) / n)
        # X(q) is read as conj X(-q) where qx < 0; the second term is conjugated as a whole.
        flip = negative != conjugate
        factor = (np.conj(phase) if conjugate else phase) * out_phase
        terms.append((rows, cols, flip, factor.astype(np.complex64)))
    return terms


def crop_half_spectrum(half: np.ndarray, n: int, new_n: int) -> np.ndarray:
    """``new_n``-px images from :func:`half_spectrum` of ``n``-px ones: the centred spectrum's
    crop (:func:`fourier_crop_2d`), float32."""
    spectrum = 0
    for rows, cols, flip, factor in _crop_plan(n, new_n):
        values = half[..., rows, cols]
        spectrum = spectrum + np.where(flip, np.conj(values), values) * factor
    return sfft.irfft2(spectrum, s=(new_n, new_n), norm="ortho", workers=-1).astype(np.float32)


def fourier_crop_2d(images: np.ndarray, new_n: int) -> np.ndarray:
    """Downsample ``[..., n, n]`` images to ``new_n`` by cropping their centred spectra.

    Pixel values keep their meaning as a local mean (what RELION's ``--rescale_angpix`` does). A
    projection sums a volume's voxels along each ray, so a volume resampled by
    :func:`fourier_crop_3d` to the same box projects ``new_n / n`` times brighter than the cropped
    image (see :func:`cryoday.initial.resample_for_stage`). White noise of standard deviation
    ``s`` per pixel becomes ``s * new_n / n``. Computed from a real FFT
    (:func:`crop_half_spectrum`), equal to the centred complex transform's crop to float
    precision (``tests/test_fourier.py``).
    """
    n = images.shape[-1]
    if new_n > n:
        raise ValueError(f"cannot Fourier-crop from {n} to a larger box {new_n}")
    if new_n == n:
        return np.array(images, dtype=np.float32, copy=True)
    return crop_half_spectrum(half_spectrum(images), n, new_n)


def fourier_crop_3d(volume: np.ndarray, new_n: int) -> np.ndarray:
    """Resample a ``n^3`` volume to ``new_n^3`` by cropping or zero-padding its spectrum.

    Voxel values keep their meaning (density per voxel at the coarser sampling is the local
    mean), as :func:`fourier_crop_2d` does for images.
    """
    n = volume.shape[0]
    if new_n == n:
        return np.array(volume, dtype=np.float32, copy=True)
    spec = ft3(np.asarray(volume, dtype=np.float64))
    scale = (new_n / n) ** 1.5
    if new_n < n:
        lo = n // 2 - new_n // 2
        out = spec[lo : lo + new_n, lo : lo + new_n, lo : lo + new_n] * scale
    else:
        out = np.zeros((new_n,) * 3, dtype=spec.dtype)
        lo = new_n // 2 - n // 2
        out[lo : lo + n, lo : lo + n, lo : lo + n] = spec * scale
    return ift3(out).astype(np.float32)


def rescale_volume(volume: np.ndarray, voxel_size: float, box: int, pixel_size: float) -> np.ndarray:
    """Resample a cubic map to ``box^3`` voxels of ``pixel_size`` A, keeping it centred.

    The spectrum is cropped or zero-padded to change the sampling (mean-preserving, as
    :func:`fourier_crop_3d`), then the real-space box is cropped or zero-padded around the
    centre voxel. Sampling ratios that are not a ratio of integer boxes are rounded to the
    nearest box, with the pixel-size error this implies (< 1/(2n)) reported by the caller.
    """
    n = volume.shape[0]
    n_resampled = max(2, int(round(n * voxel_size / pixel_size)))
    vol = fourier_crop_3d(volume, n_resampled)
    out = np.zeros((box,) * 3, dtype=np.float32)
    m = vol.shape[0]
    # Centre voxel m//2 of the source goes to box//2 of the target.
    src_lo = max(0, m // 2 - box // 2)
    dst_lo = max(0, box // 2 - m // 2)
    length = min(m - src_lo, box - dst_lo)
    sl_src = slice(src_lo, src_lo + length)
    sl_dst = slice(dst_lo, dst_lo + length)
    out[sl_dst, sl_dst, sl_dst] = vol[sl_src, sl_src, sl_src]
    return out
