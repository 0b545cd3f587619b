"""The simulator's projector against RELION's own projections and a real-space reference."""

from __future__ import annotations

import warnings

import mrcfile
import numpy as np
import pytest
import starfile
from scipy import ndimage

from cryoday import molecule, simulate
from cryoday.fourier import fourier_crop_3d
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
