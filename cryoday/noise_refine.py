"""The noise spectrum refined from each stage's residuals at its final poses.

Preprocessing estimates each group's radial noise power from the pixels outside the particle
circle (:mod:`cryoday.noise`). That estimate is biased where it cannot see: crowded particles
put their neighbours' density in the background, and the particle's own tails and CTF fringes
reach past the circle. At the end of a stage every particle has a most probable pose at a map
that explains its signal, so the residual ``I - CTF * shift * slice`` holds the noise over the
whole image, as RELION re-estimates it each iteration. Its shell power per group, relative to
the per-image ``sigma^2``, is a direct estimate of the relative power ``P`` within the stage's
band; beyond the band the previous shape is kept, scaled to join at the band's edge, and the
whole is renormalised to mean 1 over the full grid (the per-image sigma keeps the level).

The lowest shells are left as they are (as in :func:`cryoday.noise.deconvolve`): they hold the
background the preprocessing subtracted, and a map at its first stage's resolution has not
explained them yet either.
"""

from __future__ import annotations

import numpy as np

from cryoday.batch import ImageBatch, shift_phases
from cryoday.noise import SKIPPED_SHELLS, NoiseSpectrum, grid_mean_one


class ResidualPower:
    """Shell sums of ``|residual|^2 / sigma^2`` per noise group at a stage's coefficients.

    Parameters
    ----------
    op : SliceOperator
        The stage's operator.
    spectrum : NoiseSpectrum
        The spectrum the stage ran with (its shells are the full box's).
    pixel_size : float
        The stage's pixel size (A).
    """

    def __init__(self, op, spectrum: NoiseSpectrum, pixel_size: float):
        self.op, self.spectrum = op, spectrum
        step = spectrum.shells[1] - spectrum.shells[0]
        freq = np.hypot(op.kx, op.ky) / (op.box * pixel_size)
        self.shell = np.rint(freq / step).astype(np.int64)  # each coefficient's full-box shell
        self.n_shells = len(spectrum.shells)
        self.sums = np.zeros((spectrum.n_groups, self.n_shells))
        self.counts = np.zeros((spectrum.n_groups, self.n_shells))

    def add(self, cube, batch: ImageBatch, rotations: np.ndarray, shifts_px: np.ndarray,
            group: np.ndarray | None) -> None:
        """Add the residuals of ``batch``'s images at their poses (``rotations``, ``shifts_px``)
        at the map whose :meth:`SliceOperator.prepare` is ``cube``."""
        slices = self.op.slice_parts(cube, rotations)
        n = self.op.n_coef
        model = slices[:, :n] + 1j * slices[:, n:]
        cos, sin = shift_phases(self.op, shifts_px)
        # The likelihood compares the image un-shifted by conj(phi) with CTF S (tested on a
        # simulation at its true poses: the other sign leaves a residual above the noise).
        residual = batch.data * (cos - 1j * sin) - batch.ctf * model
        power = (np.abs(residual) ** 2).astype(np.float64) / batch.sigma2[:, None]
        group = np.zeros(len(power), np.int64) if group is None else np.asarray(group)
        for g in np.unique(group):
            rows = group == g
            self.sums[g] += np.bincount(self.shell, weights=power[rows].sum(axis=0),
                                        minlength=self.n_shells)[:self.n_shells]
            self.counts[g] += np.bincount(self.shell, minlength=self.n_shells
                                          )[:self.n_shells] * rows.sum()

    def refined(self, full_box: int) -> tuple[NoiseSpectrum, np.ndarray]:
        """The refined spectrum, and each group's measured/previous power ratio per shell
        (NaN outside the band the stage measured).

        Parameters
        ----------
        full_box : int
            The full-size images' box, on whose grid the spectrum has mean 1.
        """
        old = self.spectrum.power
        measured = np.divide(self.sums, self.counts, out=np.full_like(self.sums, np.nan),
                             where=self.counts > 0)
        measured[:, :SKIPPED_SHELLS] = np.nan
        ratio = measured / old
        power = old.copy()
        for g in range(len(old)):
            band = np.flatnonzero(np.isfinite(ratio[g]))
            if len(band) == 0:
                continue
            # np.interp holds the end values outside the band: below it the ratio at its start,
            # beyond it the ratio at its edge, so the shape there stays the previous one, joined
            # continuously.
            r = np.interp(np.arange(len(old[g])), band, ratio[g, band])
            power[g] = grid_mean_one(old[g] * r, full_box)
        return NoiseSpectrum(self.spectrum.shells, power, self.spectrum.labels), ratio


def change_summary(old: NoiseSpectrum, new: NoiseSpectrum, ratio: np.ndarray) -> str:
    """One log line: per optics group, the measured/previous power range over the stage's band
    and the largest relative change of the (renormalised) spectrum."""
    parts = []
    for g, label in enumerate(new.labels):
        if "/" in label:
            continue
        r = ratio[g][np.isfinite(ratio[g])]
        if len(r) == 0:
            continue
        change = np.max(np.abs(new.power[g] / old.power[g] - 1))
        parts.append(f"{label}: residual/model power {r.min():.2f}-{r.max():.2f} over "
                     f"{len(r)} shells, spectrum changed by up to {100 * change:.0f}%")
    micro = sum("/" in lab for lab in new.labels)
    return "; ".join(parts) + (f"; {micro} micrograph spectra refined too" if micro else "")


__all__ = ["ResidualPower", "change_summary"]
