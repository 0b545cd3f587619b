"""The simulator's projector against RELION's own projections and a real-space reference."""

from __future__ import annotations

import warnings

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
from scipy import ndimage

from cryoday import io, molecule, simulate
from cryoday.errors import InputError
from cryoday.fourier import fourier_crop_3d, ft2
from cryoday.geometry import euler_to_matrix

warnings.filterwarnings("ignore", module="mrcfile")


def real_space_projection(volume, rotation):
    """Slow reference: rotate the volume with cubic splines and sum along z."""
    n = volume.shape[0]
    g = np.arange(n) - n // 2
    z, y, x = np.meshgrid(g, g, g, indexing="ij")
    r = np.stack([x, y, z], -1) @ rotation  # r_volume = A^T r_image, as row vectors
    coords = [r[..., 2] + n // 2, r[..., 1] + n // 2, r[..., 0] + n // 2]
    return ndimage.map_coordinates(volume, coords, order=3, mode="constant").sum(axis=0)


def correlation(a, b):
    return np.corrcoef(a.ravel(), b.ravel())[0, 1]


@pytest.mark.parametrize("name", ["rln_proj_65_centered", "rln_proj_65_shifted",
                                  "rln_proj_64_centered", "rln_proj_64_shifted"])
def test_projections_match_relion_project(shared_data, name):
    aspire = shared_data / "aspire"
    volume = mrcfile.read(aspire / "clean70SRibosome_vol_65p.mrc").astype(np.float32)
    table = starfile.read(aspire / f"{name}.star")["particles"]
    images = mrcfile.read(aspire / f"{name}.mrcs")
    box = images.shape[-1]
    if box == 64:  # RELION projected the map Fourier-cropped to 64 px (SOURCES.md)
        volume = fourier_crop_3d(volume, 64)
    rotations = euler_to_matrix(table.rlnAngleRot, table.rlnAngleTilt, table.rlnAnglePsi)
    shifts = None
    if "rlnOriginX" in table:
        shifts = np.stack([table.rlnOriginX, table.rlnOriginY], axis=1)
        assert ("shifted" in name) == bool(np.abs(shifts).max() > 0)
    ours = simulate.project(volume, rotations, shifts)
    if box % 2:  # relion_project puts an odd box's centre one pixel further (SOURCES.md)
        ours = np.roll(ours, (1, 1), axis=(1, 2))
    for mine, theirs in zip(ours, images):
        assert correlation(mine, theirs) > 0.99


def test_shift_sign_is_relions(shared_data):
    aspire = shared_data / "aspire"
    volume = fourier_crop_3d(
        mrcfile.read(aspire / "clean70SRibosome_vol_65p.mrc").astype(np.float32), 64)
    table = starfile.read(aspire / "rln_proj_64_shifted.star")["particles"]
    images = mrcfile.read(aspire / "rln_proj_64_shifted.mrcs")
    rotations = euler_to_matrix(table.rlnAngleRot, table.rlnAngleTilt, table.rlnAnglePsi)
    shifts = np.stack([table.rlnOriginX, table.rlnOriginY], axis=1)
    right = simulate.project(volume, rotations, shifts)
    wrong = simulate.project(volume, rotations, -shifts)
    for a, b, image in zip(right, wrong, images):
        assert correlation(a, image) > correlation(b, image) + 0.05


def test_projector_accuracy_against_real_space():
    volume = molecule.synthetic_molecule(40, 4.0)
    rotations = simulate.random_rotations(4, np.random.default_rng(1))
    ours = simulate.project(volume, rotations)
    reference = np.array([real_space_projection(volume, a) for a in rotations])
    # Measured 0.30% (0.24% at 64 px): cubic convolution on a 2x oversampled transform;
    # tolerance 1%.
    assert np.linalg.norm(ours - reference) / np.linalg.norm(reference) < 0.01


def test_random_rotations_are_uniform():
    rotations = simulate.random_rotations(20000, np.random.default_rng(2))
    assert np.allclose(rotations @ np.swapaxes(rotations, 1, 2), np.eye(3), atol=1e-12)
    assert np.allclose(np.linalg.det(rotations), 1)
    directions = rotations[:, 2]  # viewing directions (third row of RELION's A)
    assert np.abs(directions.mean(axis=0)).max() < 4 / np.sqrt(20000)
    # cos(tilt) is uniform on [-1, 1] for uniform directions.
    hist = np.histogram(directions[:, 2], bins=10, range=(-1, 1))[0]
    assert np.abs(hist - 2000).max() < 5 * np.sqrt(2000)


def test_molecule_is_deterministic_nonnegative_and_asymmetric():
    a = molecule.synthetic_molecule(48, 3.0, seed=0)
    assert np.array_equal(a, molecule.synthetic_molecule(48, 3.0, seed=0))
    assert a.min() >= 0 and a.max() == pytest.approx(1.0)
    assert not np.array_equal(a, molecule.synthetic_molecule(48, 3.0, seed=1))
    for other in (a[::-1], a[:, ::-1, ::-1], a[::-1, ::-1], np.rot90(a, axes=(1, 2))):
        assert correlation(a, other) < 0.6


def test_density_from_atomic_model(shared_data):
    volume = molecule.density_from_model(shared_data / "cryojax" / "1uao.pdb", 32, 1.0)
    assert volume.shape == (32, 32, 32) and volume.min() >= 0
    weights = volume / volume.sum()
    z, y, x = np.mgrid[:32, :32, :32]
    centre = [(weights * c).sum() for c in (z, y, x)]
    assert np.allclose(centre, 16, atol=1.5)  # centred on the model


def test_simulation_snr_and_determinism():
    volume = molecule.synthetic_molecule(32, 5.0)
    kwargs = {"snr": 0.1, "seed": 5, "shift_sigma_A": 0.0}
    a = np.concatenate([c[0] for c in simulate.simulate_chunks(volume, 5.0, 300, chunk_size=100,
                                                               **kwargs)])
    b = np.concatenate([c[0] for c in simulate.simulate_chunks(volume, 5.0, 300, chunk_size=64,
                                                               **kwargs)])
    assert np.array_equal(a, b)
    clean = np.concatenate([c[0] for c in simulate.simulate_chunks(volume, 5.0, 300, snr=1e12,
                                                                   seed=5, shift_sigma_A=0.0)])
    noise = a - clean
    k = np.arange(32) - 16
    inside = np.hypot(*np.meshgrid(k, k, indexing="ij")) < 16
    snr = clean[:, inside].var(axis=1).mean() / noise.var()
    assert snr == pytest.approx(0.1, rel=0.1)
    table = next(simulate.simulate_chunks(volume, 5.0, 10, seed=5))[1]
    for column in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst",
                   "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"):
        assert column in table
    assert (table.rlnDefocusU >= table.rlnDefocusV).all()


def test_random_poses_and_optics_table():
    poses = simulate.random_poses(500, np.random.default_rng(3), 4.0, pixel_size=2.0)
    assert ((poses["tilt"] >= 0) & (poses["tilt"] <= 180)).all()
    assert np.allclose(poses["shift_x_px"] * 2.0, poses["shift_x"])
    assert np.std(poses["shift_y"]) == pytest.approx(4.0, rel=0.15)
    # Euler angles reproduce uniformly distributed matrices: cos(tilt) has mean ~0.
    assert abs(np.cos(np.deg2rad(poses["tilt"])).mean()) < 4 / np.sqrt(3 * 500)
    optics = simulate.optics_table(3.0, 64, 300.0, 2.7, 0.1)
    assert len(optics) == 1 and optics.rlnImageSize[0] == 64 and optics.rlnOpticsGroup[0] == 1


# ----------------------------------------------------------------------------- realistic data


def simulated(volume, pixel_size, n, **kwargs):
    """All chunks of :func:`simulate.simulate_chunks` as one stack and one table."""
    chunks = list(simulate.simulate_chunks(volume, pixel_size, n, **kwargs))
    return (np.concatenate([c[0] for c in chunks]),
            pd.concat([c[1] for c in chunks], ignore_index=True))


def radial_mean(power):
    """Mean of ``power[..., y, x]`` (centred grid) over integer shells; shells up to box/2."""
    box = power.shape[-1]
    k = np.arange(box) - box // 2
    shell = np.rint(np.hypot(*np.meshgrid(k, k, indexing="ij"))).astype(int)
    keep = shell < box // 2
    flat = power.reshape(-1, box, box).mean(axis=0)
    return (np.bincount(shell[keep], flat[keep], box // 2)
            / np.bincount(shell[keep], minlength=box // 2))


def test_new_keys_at_their_defaults_change_nothing():
    volume = molecule.synthetic_molecule(32, 5.0)
    base = {"snr": 0.1, "seed": 4, "shift_sigma_A": 6.0, "chunk_size": 70}
    images, table = simulated(volume, 5.0, 150, **base)
    explicit, explicit_table = simulated(
        volume, 5.0, 150, **base, noise_spectrum="white", bfactor_A2=0.0, n_micrographs=None,
        defocus_spread_A=0.0, extraction="periodic", junk_fraction=0.0, junk_kind="mixed",
        junk_volume=None)
    assert images.dtype == np.float32 and np.array_equal(images, explicit)
    pd.testing.assert_frame_equal(table, explicit_table)
    assert "rlnMicrographName" not in table and simulate.JUNK_COLUMN not in table
    # The same numbers as the simulator gave before these keys existed (recorded from main
    # for these arguments when they were added; the stack was bit-identical there, the
    # tolerance only allows for another machine's FFT and fastmath rounding).
    assert table.rlnDefocusU.iloc[0] == pytest.approx(20276.671044039336, rel=1e-12)
    assert float(images[0, 16, 16]) == pytest.approx(4.886074542999268, rel=1e-5)
    assert np.abs(images).astype(np.float64).sum() == pytest.approx(183625.56863493467, rel=1e-6)


def test_coloured_noise_has_the_requested_spectrum_and_snr():
    box, pixel_size, ratio, falloff = 32, 4.0, 4.0, 30.0
    volume = molecule.synthetic_molecule(box, pixel_size)
    kwargs = {"seed": 2, "shift_sigma_A": 0.0,
              "noise_spectrum": {"low_to_high": ratio, "falloff_A": falloff}}
    noisy, _ = simulated(volume, pixel_size, 400, snr=0.1, **kwargs)
    clean, _ = simulated(volume, pixel_size, 400, snr=1e12, **kwargs)
    noise = (noisy - clean).astype(np.float64)
    # Expected shape, written out independently of simulate.noise_power.
    k = (np.arange(box) - box // 2) / (box * pixel_size)
    s = np.hypot(*np.meshgrid(k, k, indexing="ij"))
    expected = 1 + (ratio - 1) * np.exp(-((s * falloff) ** 2))
    expected /= expected.mean()
    measured = radial_mean(np.abs(ft2(noise)) ** 2) / noise.var()
    assert np.allclose(measured[1:], radial_mean(expected)[1:], rtol=0.06)
    # Shell 1 (k = 1/128 A^-1) holds 1 + 3 exp(-(30/128)^2) = 3.84 times the power at Nyquist.
    assert measured[1] / measured[-3:].mean() == pytest.approx(
        1 + (ratio - 1) * np.exp(-((falloff / (box * pixel_size)) ** 2)), rel=0.06)
    # SNR as documented: signal variance inside the circle (first 200 particles) over the
    # noise's real-space variance per pixel.
    inside = np.hypot(*np.meshgrid(np.arange(box) - box // 2, np.arange(box) - box // 2,
                                   indexing="ij")) < box / 2
    signal = clean[:200][:, inside].var(axis=1).mean()
    assert signal / noise.var() == pytest.approx(0.1, rel=0.03)


def test_bfactor_envelope_scales_power_by_exp_minus_b_s2_over_2():
    box, pixel_size, b = 32, 4.0, 150.0
    volume = molecule.synthetic_molecule(box, pixel_size)
    kwargs = {"snr": 1e12, "seed": 3, "shift_sigma_A": 2.0}
    sharp = ft2(simulated(volume, pixel_size, 60, **kwargs)[0].astype(np.float64))
    decayed = ft2(simulated(volume, pixel_size, 60, bfactor_A2=b, **kwargs)[0]
                  .astype(np.float64))
    k = (np.arange(box) - box // 2) / (box * pixel_size)
    s2 = sum(g ** 2 for g in np.meshgrid(k, k, indexing="ij"))
    power_sharp, power_decayed = np.abs(sharp) ** 2, np.abs(decayed) ** 2
    ratio = radial_mean(power_decayed) / radial_mean(power_sharp)
    analytic = radial_mean(power_sharp * np.exp(-b * s2 / 2)) / radial_mean(power_sharp)
    assert np.allclose(ratio[1:], analytic[1:], rtol=0.01)
    # Near Nyquist (1/8 A^-1) the power is down by exp(-150 / 64 / 2) ~ 0.31.
    assert ratio[-1] == pytest.approx(np.exp(-b * (15 / (box * pixel_size)) ** 2 / 2), rel=0.1)


def test_defocus_per_particle_and_per_micrograph():
    volume = molecule.synthetic_molecule(32, 5.0)
    low, high = 10000.0, 30000.0
    _, own = simulated(volume, 5.0, 300, seed=1, defocus_range_A=(low, high))
    mean = (own.rlnDefocusU + own.rlnDefocusV) / 2
    assert mean.nunique() == 300 and mean.between(low, high).all()
    assert mean.std() == pytest.approx((high - low) / np.sqrt(12), rel=0.15)
    _, grouped = simulated(volume, 5.0, 300, seed=1, defocus_range_A=(low, high),
                           n_micrographs=12)
    assert grouped.rlnMicrographName.nunique() == 12
    # Consecutive rows, one defocus per micrograph.
    names = grouped.rlnMicrographName.to_numpy()
    assert (names[1:] != names[:-1]).sum() == 11
    per_mic = grouped.groupby("rlnMicrographName")
    assert (per_mic.rlnDefocusU.nunique() == 1).all()
    assert per_mic.rlnDefocusU.first().between(low, high + 500).all()
    _, spread = simulated(volume, 5.0, 300, seed=1, n_micrographs=12, defocus_spread_A=150.0)
    within = spread.rlnDefocusU - spread.groupby("rlnMicrographName").rlnDefocusU.transform(
        "mean")
    assert spread.rlnDefocusU.nunique() == 300
    assert within.std() == pytest.approx(150.0, rel=0.15)


def cross_correlation_peak(image, reference):
    """Sub-pixel (parabolic) position ``(x, y)`` of the peak of ``image`` against ``reference``
    (periodic): the image is the reference moved by this many pixels."""
    box = image.shape[-1]
    cc = np.fft.fftshift(np.fft.ifft2(np.fft.fft2(image) * np.conj(np.fft.fft2(reference))).real)
    iy, ix = np.unravel_index(np.argmax(cc), cc.shape)

    def vertex(m, c, p):
        return 0.5 * (m - p) / (m - 2 * c + p)

    dy = vertex(cc[iy - 1, ix], cc[iy, ix], cc[(iy + 1) % box, ix])
    dx = vertex(cc[iy, ix - 1], cc[iy, ix], cc[iy, (ix + 1) % box])
    return np.array([ix + dx - box // 2, iy + dy - box // 2])


@pytest.mark.parametrize("extraction", ["periodic", "cropped"])
def test_shifts_of_15_A_are_in_the_images(extraction):
    box, pixel_size = 64, 3.0
    volume = molecule.synthetic_molecule(box, pixel_size)
    kwargs = {"snr": 10.0, "seed": 6, "extraction": extraction}
    shifted, table = simulated(volume, pixel_size, 40, shift_sigma_A=15.0, **kwargs)
    # Rotations and defoci do not depend on the shifts' scale (the same draws, scaled).
    centred, centred_table = simulated(volume, pixel_size, 40, shift_sigma_A=0.0, snr=1e12,
                                       seed=6, extraction=extraction)
    assert np.allclose(table.rlnDefocusU, centred_table.rlnDefocusU)
    origins = table[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy()
    assert np.abs(origins).max() > 25  # tails beyond 1.5 sigma are there, not truncated
    found = np.array([cross_correlation_peak(a, b) for a, b in zip(shifted, centred)])
    # An image is its projection moved by minus its origin (RELION).
    assert np.abs(found * pixel_size + origins).max() < 0.3 * pixel_size


def test_cropped_extraction_is_centred_like_periodic():
    volume = molecule.synthetic_molecule(48, 3.0)
    kwargs = {"snr": 1e12, "seed": 8, "shift_sigma_A": 0.0, "defocus_range_A": (3000, 3001),
              "astigmatism_A": 0.0}
    periodic, _ = simulated(volume, 3.0, 20, **kwargs)
    cropped, _ = simulated(volume, 3.0, 20, extraction="cropped", **kwargs)
    for a, b in zip(periodic, cropped):
        assert correlation(a, b) > 0.99


def test_junk_rows_are_flagged_noise_or_another_map(tmp_path):
    box, pixel_size, n = 48, 3.0, 200
    volume = molecule.synthetic_molecule(box, pixel_size)
    kwargs = {"seed": 12, "shift_sigma_A": 3.0, "chunk_size": 64}
    plain, plain_table = simulated(volume, pixel_size, n, snr=1.0, **kwargs)
    clean, _ = simulated(volume, pixel_size, n, snr=1e12, **kwargs)
    junk, table = simulated(volume, pixel_size, n, snr=1.0, junk_fraction=0.3, **kwargs)
    kind = table[simulate.JUNK_COLUMN].to_numpy()
    assert (kind != simulate.JUNK_NONE).sum() == 60
    assert (kind == simulate.JUNK_NOISE).sum() == 30 and (kind == simulate.JUNK_OTHER).sum() == 30
    good = kind == simulate.JUNK_NONE
    # Particles and their poses are those of the set without junk; junk does not move them.
    assert np.allclose(junk[good], plain[good], atol=1e-5 * plain.std())
    pd.testing.assert_frame_equal(table.drop(columns=simulate.JUNK_COLUMN), plain_table)
    # Pure noise: the set without junk minus these images is the map's clean image.
    noise_rows = kind == simulate.JUNK_NOISE
    assert np.allclose(plain[noise_rows] - junk[noise_rows], clean[noise_rows],
                       atol=1e-4 * plain.std())
    # Another map: what is left after the noise is unlike the map's projection at that pose,
    # and of the map's contrast.
    other_rows = kind == simulate.JUNK_OTHER
    other = junk[other_rows] - (plain[other_rows] - clean[other_rows])
    c = np.array([correlation(a, b) for a, b in zip(other, clean[other_rows])])
    assert abs(c.mean()) < 0.1 and np.abs(c).max() < 0.4
    assert other.var(axis=(1, 2)).mean() / clean.var(axis=(1, 2)).mean() == pytest.approx(
        1, rel=0.35)
    # Same-pose good rows correlate fully, so the check above could fail.
    assert correlation(junk[good][0] - (plain[good][0] - clean[good][0]), clean[good][0]) > 0.99
    # The flag survives a STAR round trip through cryoday's reader.
    table["rlnImageName"] = [f"{i + 1:06d}@p.mrcs" for i in range(n)]
    io.write_particles(tmp_path / "p.star", table, simulate.optics_table(pixel_size, box, 300,
                                                                         2.7, 0.1))
    back = io.read_particles(tmp_path / "p.star", check_stacks=False).table
    assert np.array_equal(back[simulate.JUNK_COLUMN].to_numpy(), kind)


def test_junk_kinds_and_other_molecule():
    volume = molecule.synthetic_molecule(32, 5.0)
    for junk_kind, expected in (("noise", {1}), ("other_map", {2})):
        _, table = simulated(volume, 5.0, 100, seed=1, junk_fraction=0.2, junk_kind=junk_kind)
        assert set(table[simulate.JUNK_COLUMN]) - {0} == expected
        assert (table[simulate.JUNK_COLUMN] != 0).sum() == 20
    other = molecule.other_molecule(48, 3.0)
    assert np.array_equal(other, molecule.other_molecule(48, 3.0))
    assert other.min() >= 0 and other.max() == pytest.approx(1.0)
    assert correlation(other, molecule.synthetic_molecule(48, 3.0)) < 0.3
    with pytest.raises(InputError, match="junk_fraction"):
        next(simulate.simulate_chunks(volume, 5.0, 10, junk_fraction=1.0))
    with pytest.raises(InputError, match="noise_spectrum"):
        next(simulate.simulate_chunks(volume, 5.0, 10, noise_spectrum={"low_to_high": 4}))


def test_realistic_sets_do_not_depend_on_the_chunk_size(monkeypatch):
    volume = molecule.synthetic_molecule(32, 5.0)
    kwargs = {"seed": 3, "shift_sigma_A": 12.0, "noise_spectrum": {"low_to_high": 4.0,
                                                                   "falloff_A": 30.0},
              "bfactor_A2": 150.0, "n_micrographs": 7, "defocus_spread_A": 100.0,
              "extraction": "cropped", "junk_fraction": 0.2}
    a, table_a = simulated(volume, 5.0, 90, chunk_size=90, **kwargs)
    # Small cropped blocks too (tunables.SIM_CROPPED_BYTES_AT_ONCE): 5 images at a time.
    monkeypatch.setattr(simulate.tunables, "SIM_CROPPED_BYTES_AT_ONCE", 5 * 16 * 64 * 64)
    b, table_b = simulated(volume, 5.0, 90, chunk_size=32, **kwargs)
    assert np.array_equal(a, b)
    pd.testing.assert_frame_equal(table_a, table_b)
