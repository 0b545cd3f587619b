"""The particle diameter estimated at preprocessing from the images' mean power."""

from __future__ import annotations

import numpy as np
import pytest

from cryoday import molecule, preprocess, simulate

PIXEL_SIZE = 3.0


def true_diameter_A(volume: np.ndarray, fraction: float = 0.05) -> float:
    """Twice the farthest distance from the box centre of a voxel above ``fraction`` of the max."""
    k = np.arange(volume.shape[0]) - volume.shape[0] // 2
    z, y, x = np.meshgrid(k, k, k, indexing="ij")
    radius = np.sqrt(x * x + y * y + z * z)
    return 2 * float(radius[volume > fraction * volume.max()].max()) * PIXEL_SIZE


def simulated(volume: np.ndarray, n: int = 600) -> np.ndarray:
    return np.concatenate([images for images, _ in
                           simulate.simulate_chunks(volume, PIXEL_SIZE, n, snr=0.1, seed=1)])


@pytest.fixture(scope="module")
def molecule_48():
    return molecule.synthetic_molecule(48, PIXEL_SIZE)  # ~0.6 x a 48 px box


def test_diameter_follows_the_molecule_not_the_box(molecule_48):
    # The same molecule filling ~0.6 of a 48 px box and ~0.3 of a 96 px box at one pixel size.
    padded = np.zeros((96,) * 3, dtype=np.float32)
    padded[24:72, 24:72, 24:72] = molecule_48
    truth = true_diameter_A(molecule_48)
    fractions = []
    for volume in (molecule_48, padded):
        box = volume.shape[0]
        images = simulated(volume)
        diameter, how = preprocess.estimate_particle_diameter(
            lambda rows, images=images: images[rows], len(images), box, PIXEL_SIZE)
        assert how.startswith("estimated"), how
        assert abs(diameter - truth) < 0.25 * truth, (diameter, truth, how)
        # Far from the 0.6 x box default in the big box: it was measured, not assumed.
        fractions.append(diameter / (box * PIXEL_SIZE))
    assert fractions[0] > 1.6 * fractions[1]


def test_bigger_molecule_gives_a_bigger_diameter(molecule_48):
    # A molecule drawn for a 64 px box, cut to 48 px: it fills ~0.8 of the box.
    large = molecule.synthetic_molecule(64, PIXEL_SIZE)[8:56, 8:56, 8:56]
    estimates = [preprocess.estimate_particle_diameter(
        lambda rows, images=images: images[rows], len(images), 48, PIXEL_SIZE)[0]
        for images in (simulated(molecule_48), simulated(large))]
    truth = true_diameter_A(large)
    assert abs(estimates[1] - truth) < 0.25 * truth, (estimates, truth)
    assert estimates[1] > 1.1 * estimates[0]


def test_pure_noise_falls_back_to_the_default(rng):
    images = (5.0 + 2.0 * rng.standard_normal((600, 48, 48))).astype(np.float32)
    diameter, how = preprocess.estimate_particle_diameter(
        lambda rows: images[rows], len(images), 48, PIXEL_SIZE)
    assert diameter == pytest.approx(0.6 * 48 * PIXEL_SIZE)
    assert how.startswith("default") and "no particle signal" in how


def test_profile_matches_a_slow_reference(rng):
    # A disc of known radius 10 px with variance 1 over unit noise: the edge is at the disc's rim.
    box, n = 48, 400
    r = preprocess.radius_map(box)
    images = rng.standard_normal((n, box, box)).astype(np.float32)
    images[:, r < 10] += rng.standard_normal((n, int((r < 10).sum()))).astype(np.float32)
    diameter, how = preprocess.estimate_particle_diameter(
        lambda rows: images[rows], n, box, 1.0, chunk_size=64)
    # Slow reference: the same profile ring by ring, per image.
    outside = preprocess.outer_mask(box, 0.95 * box / 2)
    bins = np.rint(r).astype(int)
    profile = np.zeros(int(0.95 * box / 2) + 1)
    for image in images:
        background, sigma = preprocess.estimate_noise(image[None], outside)
        power = ((image - background[0]) / sigma[0]) ** 2
        for ring in range(len(profile)):
            profile[ring] += power[bins == ring].mean() - power[outside].mean()
    profile /= n
    smooth = np.convolve(np.pad(profile, 1, mode="edge"), np.ones(3) / 3, mode="valid")
    peak = int(np.argmax(smooth))
    threshold = preprocess.DIAMETER_EDGE_FRACTION * smooth[peak]
    edge = peak + int(np.flatnonzero(smooth[peak:] < threshold)[0])
    edge_px = edge - 1 + (smooth[edge - 1] - threshold) / (smooth[edge - 1] - smooth[edge])
    assert diameter == pytest.approx(2 * edge_px, rel=1e-4), how
    assert 18 < diameter < 24  # the rim, blurred by the 3-ring smoothing
