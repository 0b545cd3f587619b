"""The noise spectrum refined from residuals at known poses: the residual's convention (a
noiseless image at its true pose leaves nothing), and a coloured spectrum recovered from a flat
start in the band the stage sees, the shape beyond it kept."""

from __future__ import annotations

import numpy as np
import pytest
from test_noise import coloured_noise, true_power

from cryoday import ctf, molecule, noise, noise_refine, simulate
from cryoday.batch import make_batch
from cryoday.projection import SliceOperator

BOX, PIXEL = 32, 3.0
RESOLUTION = 9.0  # the band: shells up to 1/9 A of the 1/6 A Nyquist


def particles(n, seed, noisy):
    rng = np.random.default_rng(seed)
    volume = molecule.synthetic_molecule(BOX, PIXEL).astype(np.float32)
    rotations = simulate.random_rotations(n, rng)
    shifts = rng.normal(0, 1.5, (n, 2))
    params = {"defocus_u": rng.uniform(10000, 25000, n), "voltage": 300.0, "cs": 2.7,
              "amplitude_contrast": 0.1}
    params["defocus_v"], params["defocus_angle"] = params["defocus_u"], np.zeros(n)
    k = (np.arange(BOX) - BOX // 2) / (BOX * PIXEL)
    kx, ky = np.meshgrid(k, k, indexing="xy")
    clean = np.stack([
        simulate.ift2(simulate.project_ft(volume, rotations[i:i + 1])
                      * simulate.shift_phase(BOX, shifts[i:i + 1])
                      * ctf.evaluate_ctf(kx, ky, **{key: (v[i] if np.ndim(v) else v)
                                                   for key, v in params.items()}))[0]
        for i in range(n)]).astype(np.float32)
    images = clean + (coloured_noise(n, BOX, PIXEL, seed) if noisy else 0)
    return volume, rotations, shifts, params, images.astype(np.float32)


def residuals(volume, rotations, shifts, params, images, spectrum):
    op = SliceOperator(BOX, BOX * PIXEL / RESOLUTION)
    acc = noise_refine.ResidualPower(op, spectrum, PIXEL)
    batch = make_batch(op, images, params, PIXEL, np.ones(len(images), np.float32))
    acc.add(op.prepare(volume), batch, rotations, shifts, None)
    return acc


def test_a_noiseless_image_at_its_true_pose_leaves_no_residual():
    volume, rotations, shifts, params, images = particles(20, 0, noisy=False)
    flat = noise.NoiseSpectrum.white(BOX, PIXEL)
    acc = residuals(volume, rotations, shifts, params, images, flat)
    signal = residuals(np.zeros_like(volume), rotations, shifts, params, images, flat)
    band = acc.counts[0] > 0
    # Interpolation error only (trilinear slices of a 2x padded cube): under 2% of the power.
    assert np.all(acc.sums[0][band] < 0.02 * signal.sums[0][band])
    # The other phase convention would leave most of the signal: the test can fail.
    shifted = residuals(volume, rotations, -shifts, params, images, flat)
    assert shifted.sums[0][band][3:].sum() > 0.3 * signal.sums[0][band][3:].sum()


def test_a_coloured_spectrum_is_recovered_from_a_flat_start_within_the_band():
    volume, rotations, shifts, params, images = particles(400, 1, noisy=True)
    flat = noise.NoiseSpectrum.white(BOX, PIXEL)
    acc = residuals(volume, rotations, shifts, params, images, flat)
    refined, ratio = acc.refined(BOX)
    shells = flat.shells
    truth = true_power(BOX, PIXEL, shells)
    band = np.isfinite(ratio[0])
    assert band.sum() >= 6 and not band[:noise.SKIPPED_SHELLS].any()
    # Within the band, within 6% of the truth (400 images, the lowest shells have only a few
    # coefficients each); the flat start was off by up to a factor of ~3 there.
    np.testing.assert_allclose(refined.power[0][band], truth[band], rtol=0.06)
    assert np.max(np.abs(flat.power[0][band] / truth[band] - 1)) > 0.5
    # Beyond the band, the previous (flat) shape, joined at the band's edge.
    last = np.flatnonzero(band)[-1]
    beyond = refined.power[0][last + 1:]
    np.testing.assert_allclose(beyond, refined.power[0][last], rtol=1e-9)
    # Mean 1 over the full grid, as every spectrum.
    mean = np.sum(noise._hat_basis(BOX) * refined.power[0][:, None, None]) / BOX**2
    assert mean == pytest.approx(1.0, rel=1e-9)
    summary = noise_refine.change_summary(flat, refined, ratio)
    assert summary.startswith("optics 1: residual/model power")
