"""Centred unitary FFTs, resampling and RELION Euler angles against independent references."""

from __future__ import annotations

import numpy as np
import pytest

from cryoday.fourier import (
    fourier_crop_2d,
    fourier_crop_3d,
    ft2,
    ft3,
    ift2,
    ift3,
    rescale_volume,
)
from cryoday.geometry import euler_to_matrix, matrix_to_euler


@pytest.mark.parametrize("n", [16, 17])
def test_ft2_is_unitary_centred_and_invertible(rng, n):
    x = rng.standard_normal((3, n, n))
    spec = ft2(x)
    assert np.allclose((np.abs(spec) ** 2).sum(), (x**2).sum(), rtol=1e-10)
    # The zero frequency sits at n // 2 and equals sum / n for a unitary 2D transform.
    assert np.allclose(spec[:, n // 2, n // 2], x.sum(axis=(1, 2)) / n)
    assert np.allclose(ift2(spec), x, atol=1e-12)


def test_ft2_matches_a_direct_dft(rng):
    n = 8
    x = rng.standard_normal((n, n))
    k = np.arange(n) - n // 2
    # Direct sum with the centre of both spaces at n // 2: X(k) = sum_r x(r) e^{-2 pi i k.r / n}.
    r = np.arange(n) - n // 2
    e = np.exp(-2j * np.pi * np.outer(k, r) / n)
    direct = e @ x @ e.T / n
    assert np.allclose(ft2(x), direct, atol=1e-12)


def test_ft3_parseval_and_inverse(rng):
    v = rng.standard_normal((10, 10, 10))
    spec = ft3(v)
    assert np.allclose((np.abs(spec) ** 2).sum(), (v**2).sum())
    assert np.allclose(ift3(spec), v, atol=1e-12)


def test_fourier_crop_keeps_the_mean_and_low_frequencies(rng):
    x = rng.standard_normal((2, 64, 64)).astype(np.float32) + 3.0
    y = fourier_crop_2d(x, 32)
    assert y.shape == (2, 32, 32)
    assert np.allclose(y.mean(axis=(1, 2)), x.mean(axis=(1, 2)), rtol=1e-5)
    # Low-frequency coefficients are the originals scaled by new_n / n.
    sx, sy = ft2(x), ft2(y)
    assert np.allclose(sy[:, 12:20, 12:20], sx[:, 28:36, 28:36] * 0.5, atol=1e-4)


def test_fourier_crop_scales_white_noise_by_the_box_ratio(rng):
    # Inside the disc the engine uses, unit white noise becomes white with std new_n / n.
    x = rng.standard_normal((200, 64, 64)).astype(np.float32)
    spec = ft2(fourier_crop_2d(x, 16))
    k = np.arange(16) - 8
    inside = np.hypot(*np.meshgrid(k, k)) < 6
    assert np.abs(spec[:, inside]).std() ** 2 + np.abs(spec[:, inside]).mean() ** 2 == pytest.approx(
        (16 / 64) ** 2, rel=0.03
    )


def test_volume_resampling_round_trip_of_a_band_limited_map(rng):
    spec = ft3(rng.standard_normal((8, 8, 8)))
    k = np.arange(8) - 4
    kz, ky, kx = np.meshgrid(k, k, k, indexing="ij")
    spec[np.sqrt(kx**2 + ky**2 + kz**2) >= 3] = 0  # band-limited below Nyquist
    v = ift3(spec).astype(np.float32)
    up = fourier_crop_3d(v, 16)
    assert np.allclose(fourier_crop_3d(up, 8), v, atol=1e-5)
    assert up.mean() == pytest.approx(v.mean(), rel=1e-5)


def test_rescale_volume_keeps_a_centred_blob_centred():
    n = 32
    z, y, x = np.mgrid[:n, :n, :n] - n // 2
    blob = np.exp(-(x**2 + y**2 + z**2) / (2 * 3.0**2)).astype(np.float32)
    out = rescale_volume(blob, 2.0, 24, 4.0)  # 64 A of map into a 96 A box at 4 A/px
    assert out.shape == (24, 24, 24)
    assert np.unravel_index(out.argmax(), out.shape) == (12, 12, 12)
    # Total density scales with the voxel volume ratio: sum(out) * 4^3 == sum(blob) * 2^3.
    assert out.sum() * 4**3 == pytest.approx(blob.sum() * 2**3, rel=1e-3)


def test_euler_matrices_are_rotations_and_round_trip(rng):
    rot, tilt, psi = rng.uniform(-180, 180, 200), rng.uniform(0, 180, 200), rng.uniform(-180, 180, 200)
    a = euler_to_matrix(rot, tilt, psi)
    assert np.allclose(a @ np.swapaxes(a, -1, -2), np.eye(3), atol=1e-12)
    assert np.allclose(np.linalg.det(a), 1.0)
    assert np.allclose(euler_to_matrix(*matrix_to_euler(a)), a, atol=1e-10)


def test_euler_matrix_is_relions_zyz_composition():
    # RELION: A = Rz(psi) Ry(tilt) Rz(rot) with passive (frame) rotations.
    def rz(t):
        c, s = np.cos(np.deg2rad(t)), np.sin(np.deg2rad(t))
        return np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]])

    def ry(t):
        c, s = np.cos(np.deg2rad(t)), np.sin(np.deg2rad(t))
        return np.array([[c, 0, -s], [0, 1, 0], [s, 0, c]])

    rot, tilt, psi = 30.0, 50.0, -70.0
    assert np.allclose(euler_to_matrix(rot, tilt, psi), rz(psi) @ ry(tilt) @ rz(rot))
    # The viewing direction (third row) depends on rot and tilt only.
    assert np.allclose(euler_to_matrix(rot, tilt, 0)[2], euler_to_matrix(rot, tilt, psi)[2])


def test_euler_at_the_poles():
    for tilt in (0.0, 180.0):
        a = euler_to_matrix(40.0, tilt, 25.0)
        rot, t, psi = matrix_to_euler(a)
        assert psi == 0.0
        assert np.allclose(euler_to_matrix(rot, t, psi), a, atol=1e-12)


@pytest.mark.parametrize("n,new_n", [(64, 30), (64, 18), (64, 33), (65, 32), (65, 31), (33, 32)])
def test_crop_from_the_half_spectrum_is_the_centred_spectrums_crop(n, new_n):
    # Reference: the definition on numpy's full centred FFT (crop the centred window, scale by
    # new_n / n, inverse, real part), for every parity of both boxes (an even crop keeps the
    # Nyquist row and column -new_n / 2 only, which the real FFT must reproduce).
    rng = np.random.default_rng(n * 100 + new_n)
    x = rng.standard_normal((3, n, n)).astype(np.float32)
    centred = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=(-2, -1)), norm="ortho"),
                              axes=(-2, -1))
    lo = n // 2 - new_n // 2
    window = centred[:, lo:lo + new_n, lo:lo + new_n] * (new_n / n)
    reference = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(window, axes=(-2, -1)),
                                             norm="ortho"), axes=(-2, -1)).real
    got = fourier_crop_2d(x, new_n)
    assert got.dtype == np.float32 and got.shape == (3, new_n, new_n)
    assert np.abs(got - reference).max() < 1e-5 * np.abs(reference).max()
