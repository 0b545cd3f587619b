"""Radial noise power spectra: estimated from the background of the images, used as weights.

Real noise is not white: ice and the detector make its power several times higher at low
frequency than at high. The likelihood's coloured-noise energy is
``E = sum_k w_k |d_k - c_k S_k phi_k|^2 / (2 s2 P(|k|))``: the scalar ``s2`` per image (from
:mod:`cryoday.preprocess`, so images keep unit real-space noise) times a relative radial shape
``P`` whose mean over the box's Fourier grid is 1. A radial ``P`` is the same at ``k`` and at
the turned frequency ``P k``, so ``1 / P`` is a per-coefficient factor on the likelihood's
weights (:func:`cryoday.batch.make_batch` evaluates it per group; the kernels multiply it in per
image).

**Estimate** (:func:`estimate_spectra`). Each normalised image is multiplied by a soft mask
``m`` that is 0 on the particle disc and 1 outside it; for stationary noise of spectrum ``P``,
``E |FT(m n)|^2 = K * P`` (circular convolution) with ``K = |FT(m)|^2 / N^2``: the background's
spectrum is ``P`` blurred by the mask's. With the background only the box's corners (the
default particle circle), that blur is several Fourier pixels wide, so rather than dividing by
the masked fraction the radial profile is *deconvolved*: ``P`` is written in hat functions of
``|k|`` one shell apart, each basis function's blurred shell averages form the columns of a
matrix, and the shell averages of the images' background power are fitted by least squares with
a small second-difference penalty (the smoothing). The fit is well posed: ``K`` keeps a spike
of weight ``mean(m)^2 / mean(m^2)`` (~0.2) at the origin.

Biases: (1) signal outside the mask (the CTF delocalises a particle's signal by
``lambda * defocus * k``, neighbouring particles in crowded micrographs) is counted as noise,
mostly at low frequency, so ``P`` is overestimated there and low frequencies are slightly
under-weighted (the safe side); (2) subtracting each image's background median removes part of
the power of the lowest shells, so shells 0 and 1 are left out of the fit and follow from the
smoothness penalty (within ~7% on a 4:1 spectrum in tests).

Groups (:func:`noise_groups`): one spectrum per optics group, and one per micrograph
(``rlnMicrographName``) with at least ``min_micrograph_particles`` particles, shrunk towards its
optics group's (``n / (n + min)`` of its own), since 50 images give a noisy spectrum.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cryoday import io
from cryoday.errors import InputError
from cryoday.fourier import centred_index, half_spectrum

NOISE_MODELS = ("white", "radial")
MIN_MICROGRAPH_PARTICLES = 50
# Images per group a spectrum is estimated from at most: a shell of a 128-px box's background
# holds hundreds of pixels, so 10,000 images pin its power to well under 1%, and the pass no
# longer grows with the data set (it took 20 s of 40,000 images, 100 s of 200,000).
SAMPLE_PER_GROUP = 10_000
# Second-difference penalty of the deconvolution, relative to the fit's mean diagonal: smooths
# over ~2 shells and costs < 1% of a smooth spectrum's level.
SMOOTHING = 0.05
# Lowest shells left out of the fit (the background median removed part of their power).
SKIPPED_SHELLS = 2
# Width of the mask's soft edge, as a fraction of the box (at least 2 px).
EDGE_FRACTION = 0.05


@dataclass(frozen=True)
class NoiseSpectrum:
    """Relative radial noise power per group, mean 1 over the full box's Fourier grid.

    Attributes
    ----------
    shells : (S,) float64
        Shell radii in 1/A (shell ``j`` at ``j / (box * pixel_size)``).
    power : (G, S) float64
        Relative power per group at each shell; linear in between, flat beyond the last.
    labels : tuple of str
        One name per group (``"optics 1"``, ``"optics 1 / mic0001.mrc"``).
    """

    shells: np.ndarray
    power: np.ndarray
    labels: tuple

    @property
    def n_groups(self) -> int:
        return len(self.labels)

    def at(self, freq) -> np.ndarray:
        """``(G, *freq.shape)`` relative power at frequencies ``freq`` (1/A)."""
        freq = np.asarray(freq, np.float64)
        return np.stack([np.interp(freq, self.shells, p) for p in self.power])

    def weights(self, freq) -> np.ndarray:
        """``(G, *freq.shape)`` float32 ``1 / P``: the likelihood's per-coefficient factors."""
        return (1.0 / self.at(freq)).astype(np.float32)

    def save(self, path) -> None:
        """Write a TSV: ``shell_invA`` then one column per group, atomically."""
        frame = pd.DataFrame({"shell_invA": self.shells})
        for label, p in zip(self.labels, self.power):
            frame[label] = p
        with io.atomic_path(path) as tmp:
            frame.to_csv(tmp, sep="\t", index=False, float_format="%.6g")

    @classmethod
    def load(cls, path) -> NoiseSpectrum:
        """Read what :meth:`save` wrote."""
        frame = pd.read_csv(path, sep="\t")
        if frame.columns[0] != "shell_invA" or len(frame.columns) < 2:
            raise InputError(f"{path}: not a noise spectrum (expected shell_invA and one column "
                             "per group)")
        power = frame.iloc[:, 1:].to_numpy(np.float64).T
        if not np.all(np.isfinite(power)) or np.any(power <= 0):
            raise InputError(f"{path}: noise power must be finite and > 0")
        return cls(frame["shell_invA"].to_numpy(np.float64), power, tuple(frame.columns[1:]))

    @classmethod
    def white(cls, box: int, pixel_size: float, labels=("optics 1",)) -> NoiseSpectrum:
        """A flat spectrum (the white-noise model)."""
        n = n_shells(box)
        return cls(np.arange(n) / (box * pixel_size), np.ones((len(labels), n)), tuple(labels))


def n_shells(box: int) -> int:
    """Shells 0.. up to the grid's corner."""
    return int(np.ceil(np.sqrt(2) * (box // 2 + 1))) + 1


def radius_grid(box: int) -> np.ndarray:
    """``|k|`` in Fourier px on the centred ``box x box`` grid."""
    k = np.arange(box) - box // 2
    return np.hypot(*np.meshgrid(k, k, indexing="ij"))


def background_mask(box: int, radius_px: float) -> np.ndarray:
    """0 on the particle disc (``r <= radius_px``), rising as a raised cosine to 1 outside."""
    edge = max(2.0, EDGE_FRACTION * box)
    r = radius_grid(box)
    t = np.clip((r - radius_px) / edge, 0.0, 1.0)
    mask = 0.5 * (1.0 - np.cos(np.pi * t))
    if mask.sum() < 16:
        raise ValueError(f"a particle circle of radius {radius_px} px leaves almost no "
                         f"background in a {box} px box")
    return mask


def _hat_basis(box: int) -> np.ndarray:
    """``(S, box, box)`` hat functions of ``|k|``, one per shell: linear interpolation."""
    r = radius_grid(box)
    j = np.arange(n_shells(box))[:, None, None]
    return np.clip(1.0 - np.abs(r[None] - j), 0.0, None)


def _shell_indicator(box: int) -> np.ndarray:
    """``(box^2, S)`` float64: each pixel's share of its shells (the hats, normalised per
    shell), so that ``power.reshape(n, -1) @ it`` is the shell averages."""
    basis = _hat_basis(box).reshape(n_shells(box), -1).T
    return basis / np.maximum(basis.sum(axis=0), 1e-12)


def mask_response(mask: np.ndarray) -> np.ndarray:
    """``(S, S)`` matrix: shell averages of ``E |FT(m n)|^2`` per unit of each hat of ``P``."""
    box = mask.shape[0]
    kernel = np.abs(np.fft.fft2(mask, norm="ortho")) ** 2 / box**2  # uncentred
    basis = _hat_basis(box)
    blurred = np.fft.ifft2(np.fft.fft2(np.fft.ifftshift(basis, axes=(-2, -1)))
                           * np.fft.fft2(kernel)).real
    blurred = np.fft.fftshift(blurred, axes=(-2, -1)).reshape(len(basis), -1)
    return blurred @ _shell_indicator(box)  # [basis j, shell i]


@functools.lru_cache(maxsize=8)
def _half_shell_indicator(box: int) -> np.ndarray:
    """:func:`_shell_indicator` on a real FFT's half grid (``rfft2``: rows ``ky mod box``, columns
    ``kx = 0 .. box // 2``): each bin stands for itself and, but for the columns ``kx = 0`` and
    (even boxes) ``box / 2``, for its mirror image ``-k``, which has the same power and radius."""
    ky = centred_index(np.arange(box), box)
    kx = np.arange(box // 2 + 1)
    r = np.hypot(*np.meshgrid(ky, kx, indexing="ij"))
    j = np.arange(n_shells(box))[:, None, None]
    hats = np.clip(1.0 - np.abs(r[None] - j), 0.0, None)
    twice = np.where((kx == 0) | (2 * kx == box), 1.0, 2.0)
    basis = (hats * twice).reshape(n_shells(box), -1).T
    return basis / np.maximum(basis.sum(axis=0), 1e-12)


def shell_power(images: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``(n, S)`` shell averages of ``|FT(m x)|^2`` of each image (from a real FFT's half
    spectrum: a real image's power is the same at ``k`` and ``-k``)."""
    images = np.asarray(images, np.float32)
    half = half_spectrum(images * mask.astype(np.float32))
    power = (half.real ** 2 + half.imag ** 2).reshape(len(images), -1)
    return power.astype(np.float64) @ _half_shell_indicator(mask.shape[0])


def deconvolve(observed: np.ndarray, response: np.ndarray, box: int) -> np.ndarray:
    """The hat coefficients of ``P`` fitting ``observed`` shell averages, smoothed, mean 1."""
    # Shells 0 and 1 hold the power the background median took out: they are left out of the
    # fit, and P there follows from the smoothness penalty (a linear extrapolation).
    a = response.T[SKIPPED_SHELLS:]  # observed = a @ p
    observed = observed[SKIPPED_SHELLS:]
    s = a.shape[1]
    d2 = np.diff(np.eye(s), 2, axis=0)
    ata = a.T @ a
    lam = SMOOTHING * np.trace(ata) / s
    p = np.linalg.solve(ata + lam * d2.T @ d2, a.T @ observed)
    p = np.maximum(p, 1e-3 * np.max(p))
    return grid_mean_one(p, box)


def grid_mean_one(p: np.ndarray, box: int) -> np.ndarray:
    """Shell powers ``p`` scaled so that their linear interpolation averages 1 over the
    ``box x box`` Fourier grid (every spectrum's normalisation)."""
    return p / (np.sum(_hat_basis(box) * p[:, None, None]) / box**2)


def noise_groups(table: pd.DataFrame,
                 min_micrograph_particles: int = MIN_MICROGRAPH_PARTICLES):
    """Each particle's noise group, and the groups' labels and optics parents.

    Returns
    -------
    group : (n,) int64
        Index into ``labels``.
    labels : list of str
    parent : (G,) int64
        For a micrograph group, its optics group's index; for an optics group, itself.
    """
    n = len(table)
    optics = (table["rlnOpticsGroup"].to_numpy() if "rlnOpticsGroup" in table
              else np.ones(n, dtype=int))
    optics_values, optics_index = np.unique(optics, return_inverse=True)
    labels = [f"optics {v}" for v in optics_values]
    parent = list(range(len(labels)))
    group = optics_index.astype(np.int64)
    if "rlnMicrographName" in table and min_micrograph_particles > 0:
        keys = pd.Series(list(zip(optics_index, table["rlnMicrographName"].astype(str))))
        counts = keys.map(keys.value_counts())
        for key in pd.unique(keys[counts.to_numpy() >= min_micrograph_particles]):
            rows = (keys == key).to_numpy()
            group[rows] = len(labels)
            labels.append(f"optics {optics_values[key[0]]} / {key[1]}")
            parent.append(int(key[0]))
    return group, labels, np.asarray(parent, dtype=np.int64)


def sampled_rows(group: np.ndarray, n_groups: int, max_per_group: int) -> np.ndarray:
    """The rows a spectrum estimate reads, in increasing order: every row of a group of at most
    ``max_per_group``, and ``max_per_group`` evenly spaced ones of a larger group."""
    group = np.asarray(group)
    keep = np.ones(len(group), bool)
    sizes = np.bincount(group, minlength=n_groups)
    for g in np.flatnonzero(sizes > max_per_group):
        members = np.flatnonzero(group == g)
        chosen = members[np.linspace(0, len(members) - 1, max_per_group).round().astype(int)]
        keep[members] = False
        keep[chosen] = True
    return np.flatnonzero(keep)


def estimate_spectra(read, n: int, box: int, pixel_size: float, group: np.ndarray, labels,
                     parent, radius_px: float, chunk_size: int = 1000,
                     min_micrograph_particles: int = MIN_MICROGRAPH_PARTICLES,
                     max_per_group: int = SAMPLE_PER_GROUP) -> NoiseSpectrum:
    """Estimate each group's spectrum from the background of normalised images (at most
    ``max_per_group`` of each group's, evenly spread over it: :func:`sampled_rows`).

    Parameters
    ----------
    read : callable
        ``read(rows)`` -> ``(len(rows), box, box)`` normalised images (unit noise).
    n, box, pixel_size
        Number of images, box (px), pixel size (A).
    group, labels, parent
        :func:`noise_groups`'s.
    radius_px : float
        The particle circle's radius; the background is outside it.
    chunk_size : int
        Images read at once.
    min_micrograph_particles : int
        Shrinkage of micrograph spectra towards their optics group's (see the module).
    max_per_group : int
        Images per group the estimate reads at most.
    """
    mask = background_mask(box, radius_px)
    n_groups, s = len(labels), n_shells(box)
    sums = np.zeros((n_groups, s))
    used = sampled_rows(np.asarray(group)[:n], n_groups, max_per_group)
    counts = np.bincount(group[used], minlength=n_groups).astype(np.float64)
    for start in range(0, len(used), chunk_size):
        rows = used[start:start + chunk_size]
        np.add.at(sums, group[rows], shell_power(read(rows), mask))
    parent = np.asarray(parent)
    pooled = np.zeros((n_groups, s))
    np.add.at(pooled, parent, sums)  # an optics group's pool includes its micrographs
    pooled_counts = np.bincount(parent, weights=counts, minlength=n_groups)
    response = mask_response(mask)
    power = np.empty((n_groups, s))
    for g in range(n_groups):
        if parent[g] == g:
            power[g] = deconvolve(pooled[g] / max(pooled_counts[g], 1.0), response, box)
    for g in range(n_groups):
        if parent[g] != g:
            own = deconvolve(sums[g] / counts[g], response, box)
            share = counts[g] / (counts[g] + min_micrograph_particles)
            power[g] = share * own + (1 - share) * power[parent[g]]
    return NoiseSpectrum(np.arange(s) / (box * pixel_size), power, tuple(labels))


def summary(spectrum: NoiseSpectrum) -> str:
    """One log line: each optics group's low- to high-frequency power ratio."""
    parts = []
    for label, p in zip(spectrum.labels, spectrum.power):
        if "/" not in label:
            parts.append(f"{label}: P(low)/P(high) = {p[1] / np.median(p[len(p) // 2:]):.2f}")
    micro = sum("/" in lab for lab in spectrum.labels)
    return "; ".join(parts) + (f"; {micro} micrograph spectra" if micro else "")
