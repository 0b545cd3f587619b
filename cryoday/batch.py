"""Minibatches of particle images in a slice operator's coefficients, ready for the likelihood.

:func:`make_batch` transforms the images, reads their coefficients, evaluates the CTF there,
and keeps what the likelihood needs to turn each image in-plane: its zero-padded,
gridding-corrected transform near the origin (:func:`image_padded_size`) and its CTF parameters
as one float64 row per image (:func:`ctf_parameter_table`), since the CTF is evaluated exactly
at the turned frequencies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.fft as sfft

from cryoday import tunables
from cryoday._likelihood_kernels import ctf_values
from cryoday.ctf import electron_wavelength
from cryoday.projection import SliceOperator

CTF_FIELDS = ("defocus_u", "defocus_v", "defocus_angle", "voltage", "cs", "amplitude_contrast",
              "bfactor", "phase_shift")


@dataclass
class ImageBatch:
    """A minibatch in the operator's coefficients.

    Attributes
    ----------
    data : (B, n_coef) complex64, centred unitary transforms of the images at the stage box
    ctf : (B, n_coef) float32
    sigma2 : (B,) float32, noise variance per pixel (= per unitary Fourier coefficient)
    padded : (B, 2h + 1, h + 1) complex64, the ``kx >= 0`` half of the part of each image's
        zero-padded (``image_padded_size``), gridding-corrected transform that turned
        coefficients reach (:func:`padded_half_transforms`; ``ky = 0`` at row ``h``), scaled so
        that its value at ``p k`` (``p`` the padding factor) stands for ``d(k)``
    ctf_params : (B, 8) float64, per image: defocus U, V (A), astigmatism angle (rad),
        wavelength (A), Cs (A), amplitude contrast, B-factor (A^2), phase shift (rad)
    freq_scale : float, 1 / (box * pixel size): Fourier index to 1/A
    noise_weight : (G, n_coef) float32 or None, ``1 / P(|k|)`` of each noise group
        (:class:`cryoday.noise.NoiseSpectrum`); None: white noise
    noise_group : (B,) int64 or None, each image's row of ``noise_weight``
    """

    data: np.ndarray
    ctf: np.ndarray
    sigma2: np.ndarray
    padded: np.ndarray | None = None
    ctf_params: np.ndarray | None = None
    freq_scale: float = 1.0
    noise_weight: np.ndarray | None = None
    noise_group: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.data)

    def take(self, rows) -> ImageBatch:
        """The images at ``rows`` (a slice or an index array)."""
        return ImageBatch(self.data[rows], self.ctf[rows], self.sigma2[rows],
                          None if self.padded is None else self.padded[rows],
                          None if self.ctf_params is None else self.ctf_params[rows],
                          self.freq_scale, self.noise_weight,
                          None if self.noise_group is None else self.noise_group[rows])


def image_padded_size(box: int) -> int:
    """Size of the zero-padded images: about ``IMAGE_PADDING x box``, a fast FFT length."""
    return int(sfft.next_fast_len(int(np.ceil(tunables.IMAGE_PADDING * box)), real=True))


def padded_half_transforms(op: SliceOperator, images: np.ndarray) -> np.ndarray:
    """The ``kx >= 0`` half of each image's zero-padded transform near the origin:
    ``(n_images, 2h + 1, h + 1)``, rows ``ky = -h..h`` (the zero frequency at row ``h``),
    columns ``kx = 0..h``.

    The window ``|kx|, |ky| <= h`` of :func:`~cryoday.fourier.ft2` of the gridding-corrected
    image centred in an ``m x m`` array of zeros. Only the image's ``n x n`` pixels enter, so the
    window is two small DFTs as matrix products, over x for every row of every image, then over
    y image by image (a stacked product, which leaves the images outermost), rather than an FFT
    of the nine-times larger padded array. The ``kx < 0`` half is the conjugate of ``-k``: the
    likelihood's turning reads it there, so it is neither computed nor stored.
    """
    n, n_images = op.box, len(images)
    m = image_padded_size(n)
    pos = np.arange(n) - n // 2
    g = np.sinc(pos / m) ** 2  # real-space image of the bilinear kernel on the padded grid
    corrected = (np.asarray(images, np.float32) / (g[:, None] * g[None, :])).astype(np.float32)
    pad = m / n
    h = min(int(np.ceil(pad * op.radius)) + 2, m // 2 - 1)
    # Unitary on the m x m array, and p = m / n times larger, as the transform of a p-times
    # larger array is p times smaller at the same frequency.
    angle_x = 2 * np.pi * np.outer(pos, np.arange(h + 1)) / m
    scale = pad / m
    flat = corrected.reshape(n_images * n, n)
    rows = (flat @ (np.cos(angle_x) * scale).astype(np.float32)
            - 1j * (flat @ (np.sin(angle_x) * scale).astype(np.float32))).astype(np.complex64)
    dft_y = np.exp(-2j * np.pi * np.outer(np.arange(-h, h + 1), pos) / m).astype(np.complex64)
    return np.matmul(dft_y, rows.reshape(n_images, n, h + 1))


def ctf_parameter_table(ctf_params: dict, n: int) -> np.ndarray:
    """``(n, 8)`` float64 table of the kernel's CTF parameters (see :class:`ImageBatch`).

    Parameters
    ----------
    ctf_params : dict
        ``(n,)`` arrays or scalars named as :data:`CTF_FIELDS` (missing ones are 0), in the
        units of :func:`cryoday.ctf.evaluate_ctf`.
    n : int
        Number of images.
    """
    get = {k: np.broadcast_to(np.asarray(ctf_params.get(k, 0.0), np.float64), (n,))
           for k in CTF_FIELDS}
    return np.ascontiguousarray(np.stack([
        get["defocus_u"], get["defocus_v"], np.deg2rad(get["defocus_angle"]),
        electron_wavelength(get["voltage"]), get["cs"] * 1e7, get["amplitude_contrast"],
        get["bfactor"], np.deg2rad(get["phase_shift"])], axis=1))


def make_batch(op: SliceOperator, images: np.ndarray, ctf_params: dict, pixel_size: float,
               sigma, noise=None, noise_group=None, padded: bool = True) -> ImageBatch:
    """Transform ``images`` and evaluate their CTFs at the operator's coefficients.

    Parameters
    ----------
    op : SliceOperator
        The stage's operator (its box is the images').
    images : (B, box, box) array
        Real-space particle images.
    ctf_params : dict
        ``(B,)`` arrays (or scalars) named as :func:`cryoday.ctf.evaluate_ctf`'s arguments.
    pixel_size : float
        Pixel size of ``images`` in A.
    sigma : float or (B,) array
        Noise standard deviation per pixel.
    noise : NoiseSpectrum, optional
        The relative radial noise power per group (:mod:`cryoday.noise`); None: white.
    noise_group : (B,) int array, optional
        Each image's group in ``noise`` (default: all the first).
    padded : bool
        Also the padded transforms the likelihood turns the images with; insertion at known
        poses needs none (at a 128-px box they are nine times the image, and most of its cost).

    Returns
    -------
    ImageBatch
    """
    images = np.asarray(images, dtype=np.float32)
    data = op.coefficients(images)
    scale = 1.0 / (op.box * pixel_size)
    ctf_table = ctf_parameter_table(ctf_params, len(images))
    ctf = np.empty(data.shape, np.float32)
    ctf_values(ctf_table, scale, op._kx64, op._ky64, ctf)
    # A writable copy: a read-only view (broadcast_to's) is another Numba type than the rows
    # a batch's take() copies, and would compile every kernel twice.
    sigma2 = np.broadcast_to(np.asarray(sigma, dtype=np.float32) ** 2, (len(images),)).copy()
    noise_weight = None
    if noise is not None:
        # Radial, so the same at the turned frequencies: a factor on the likelihood's weights.
        noise_weight = np.ascontiguousarray(noise.weights(np.hypot(op.kx, op.ky) * scale))
        noise_group = (np.zeros(len(images), np.int64) if noise_group is None
                       else np.ascontiguousarray(noise_group, dtype=np.int64))
    return ImageBatch(data, ctf, sigma2,
                      padded_half_transforms(op, images) if padded else None, ctf_table,
                      scale, noise_weight, noise_group if noise is not None else None)


def shift_phases(op: SliceOperator, shifts_px: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``phi_s(k) = exp(2 pi i k.t_s / box)`` at the operator's coefficients, float32 parts.

    Parameters
    ----------
    op : SliceOperator
    shifts_px : (n, 2) array
        Shifts ``(x, y)`` in px.

    Returns
    -------
    (n, n_coef) float32 cosines and sines.
    """
    t = np.asarray(shifts_px, dtype=np.float64).reshape(-1, 2)
    angle = 2 * np.pi * (np.outer(t[:, 0], op.kx) + np.outer(t[:, 1], op.ky)) / op.box
    return (np.ascontiguousarray(np.cos(angle), dtype=np.float32),
            np.ascontiguousarray(np.sin(angle), dtype=np.float32))
