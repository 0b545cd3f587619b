"""Radial noise spectra: the estimator against known spectra, the coloured-noise likelihood
against the dense reference, and white noise giving exactly the white-noise numbers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.fft as sfft
from reference import turned_image_nll

from cryoday import molecule, noise, preprocess, simulate
from cryoday.batch import image_padded_size, make_batch
from cryoday.likelihood import edge_taper, marginal_nll
from cryoday.pose_sets import PoseSubsets, empty_map_subsets, exhaustive_subsets
from cryoday.projection import SliceOperator
from cryoday.quadrature import pose_grid

SPECTRUM = {"low_to_high": 4.0, "falloff_A": 30.0}


def true_power(box, pixel_size, shells):
    """The simulator's spectrum at ``shells`` (1/A), normalised as the estimator's."""
    power = simulate.noise_power(box, pixel_size, SPECTRUM)
    r = noise.radius_grid(box) / (box * pixel_size)
    shape = 1 + (SPECTRUM["low_to_high"] - 1) * np.exp(-(shells * SPECTRUM["falloff_A"]) ** 2)
    grid_shape = 1 + (SPECTRUM["low_to_high"] - 1) * np.exp(-(r * SPECTRUM["falloff_A"]) ** 2)
    # The estimator's mean is over its linear interpolation of the shells on the grid.
    assert np.allclose(power, grid_shape / grid_shape.mean())
    interpolated = np.interp(r, shells, shape)
    return shape / interpolated.mean()


def coloured_noise(n, box, pixel_size, seed):
    gain = np.sqrt(np.fft.ifftshift(simulate.noise_power(box, pixel_size, SPECTRUM))
                   [:, : box // 2 + 1])
    white = np.random.default_rng(seed).standard_normal((n, box, box))
    return sfft.irfft2(sfft.rfft2(white, norm="ortho") * gain, s=(box, box), norm="ortho")


def estimate(images, pixel_size, radius_fraction=0.95):
    n, box = len(images), images.shape[-1]
    radius = radius_fraction * box / 2
    background, sigma = preprocess.estimate_noise(images, preprocess.outer_mask(box, radius))
    normalised = preprocess.normalise(images, background, sigma)
    group = np.zeros(n, np.int64)
    return noise.estimate_spectra(lambda rows: normalised[rows], n, box, pixel_size, group,
                                  ["optics 1"], [0], radius, chunk_size=700)


def test_estimator_recovers_a_coloured_spectrum_from_pure_noise():
    box, psize = 48, 4.0
    spectrum = estimate(coloured_noise(2000, box, psize, seed=1).astype(np.float32), psize)
    truth = true_power(box, psize, spectrum.shells)
    ratio = spectrum.power[0] / truth
    inside = slice(2, box // 2)  # away from the lowest shells, inside the box's disc
    assert np.abs(ratio[inside] - 1).max() < 0.1, ratio
    assert np.abs(ratio[:2] - 1).max() < 0.15, ratio  # extrapolated
    # Not flat: the low-frequency excess is found (a flat estimate fails the bound above too).
    assert spectrum.power[0][1] / spectrum.power[0][box // 2 - 1] > 3.0


def test_estimator_recovers_the_spectrum_under_particles():
    box, psize = 48, 4.0
    volume = molecule.synthetic_molecule(box, psize)
    images, _ = next(simulate.simulate_chunks(volume, psize, 1500, snr=0.05, seed=3,
                                              noise_spectrum=SPECTRUM, chunk_size=1500))
    spectrum = estimate(images, psize, radius_fraction=0.8)
    ratio = spectrum.power[0] / true_power(box, psize, spectrum.shells)
    assert np.abs(ratio[2:box // 2] - 1).max() < 0.1, ratio


def test_white_noise_gives_a_flat_spectrum():
    box, psize = 40, 5.0
    images = np.random.default_rng(4).standard_normal((1500, box, box)).astype(np.float32)
    spectrum = estimate(images, psize)
    assert np.abs(spectrum.power[0][:box // 2] - 1).max() < 0.06


def test_groups_follow_optics_and_large_micrographs():
    table = pd.DataFrame({"rlnOpticsGroup": [1] * 130 + [2] * 20,
                          "rlnMicrographName": ["a"] * 60 + ["b"] * 70 + ["c"] * 20})
    group, labels, parent = noise.noise_groups(table, min_micrograph_particles=65)
    assert labels == ["optics 1", "optics 2", "optics 1 / b"]
    assert list(parent) == [0, 1, 0]
    assert (group[:60] == 0).all() and (group[60:130] == 2).all() and (group[130:] == 1).all()
    group, labels, _ = noise.noise_groups(table.drop(columns="rlnMicrographName"))
    assert labels == ["optics 1", "optics 2"]


def test_save_load_round_trip(tmp_path):
    spectrum = noise.NoiseSpectrum(np.arange(5) / 100.0, np.array([[3, 2, 1, 1, 1.0],
                                                                   [1, 1, 1, 1, 2.0]]),
                                   ("optics 1", "optics 1 / m.mrc"))
    spectrum.save(tmp_path / "noise.tsv")
    back = noise.NoiseSpectrum.load(tmp_path / "noise.tsv")
    assert back.labels == spectrum.labels
    assert np.allclose(back.power, spectrum.power) and np.allclose(back.shells, spectrum.shells)
    assert np.allclose(back.weights([0.005, 1.0]), [[1 / 2.5, 1.0], [1.0, 0.5]])


# ------------------------------------------------------------------ the likelihood

BOX, PSIZE = 20, 6.0


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(21)
    volume = molecule.synthetic_molecule(BOX, PSIZE)
    grid = pose_grid(40.0, BOX, PSIZE, undersampling=3.0, shift_sigma_A=10.0)
    op = SliceOperator(BOX, BOX * PSIZE / 40.0)
    n = 4
    images = simulate.project(volume, grid.rotations[rng.integers(0, grid.n_rot, n)],
                              grid.shifts[rng.integers(0, grid.n_shift, n)])
    ctf = {"defocus_u": rng.uniform(1e4, 3e4, n), "voltage": 300.0, "cs": 2.7,
           "amplitude_contrast": 0.1, "defocus_angle": np.zeros(n)}
    ctf["defocus_v"] = ctf["defocus_u"] + 300.0
    sigma = 0.5 * images.std()
    noisy = (images + sigma * coloured_noise(n, BOX, PSIZE, 5)).astype(np.float32)
    shells = np.arange(noise.n_shells(BOX)) / (BOX * PSIZE)
    power = np.stack([true_power(BOX, PSIZE, shells), 1.0 + 0.5 * np.cos(40 * shells)])
    spectrum = noise.NoiseSpectrum(shells, power, ("optics 1", "optics 2"))
    group = np.array([0, 1, 1, 0])
    return volume, grid, op, noisy, ctf, sigma, spectrum, group


@pytest.mark.parametrize("shared", [False, True], ids=["image by image", "group kernel"])
def test_coloured_likelihood_matches_the_dense_reference(problem, shared):
    """nll and volume gradient with two noise groups against the numpy twin with per-image
    weights ``w / P``."""
    volume, grid, op, images, ctf, sigma, spectrum, group = problem
    batch = make_batch(op, images, ctf, PSIZE, sigma, noise=spectrum, noise_group=group)
    start = (0.7 * volume + 0.05).astype(np.float32)
    rng = np.random.default_rng(2)
    n = len(images)
    common = np.sort(rng.choice(grid.n_dir, 3, replace=False))
    dir_sets = [common if shared else np.sort(rng.choice(grid.n_dir, 2 + i % 2, replace=False))
                for i in range(n)]
    inp_sets = [np.sort(rng.choice(grid.n_inp, 2 + i % 2, replace=False)) for i in range(n)]
    shift_sets = [np.sort(rng.choice(grid.n_shift, 1 if shared else min(grid.n_shift, 1 + i % 2),
                                            replace=False))
                  for i in range(n)]
    subsets = PoseSubsets.from_sets(
        grid.n_inp, dir_sets, [grid.dir_log_weights[d] for d in dir_sets], inp_sets,
        [grid.inp_log_weights[p] for p in inp_sets], shift_sets,
        [grid.shift_log_weights[s] for s in shift_sets])
    result = marginal_nll(op, start, batch, grid, subsets)
    freq = np.hypot(op.kx, op.ky) / (BOX * PSIZE)
    per_group = op.weights * edge_taper(op) / spectrum.at(freq)
    expected = np.zeros(volume.shape)
    for i in range(n):
        d = dir_sets[i]
        slices = op.forward(start, grid.direction_rotations[d]).astype(np.complex128)
        nll, slice_grad = turned_image_nll(
            slices, images[i:i + 1], {k: (v[i:i + 1] if np.ndim(v) else v) for k, v in
                                      ctf.items()}, batch.sigma2[i:i + 1], PSIZE, op.kx, op.ky,
            per_group[group[i]][None], grid.inplane_matrices[inp_sets[i]],
            grid.shifts[shift_sets[i]], grid.dir_log_weights[d],
            grid.inp_log_weights[inp_sets[i]], grid.shift_log_weights[shift_sets[i]],
            image_padded_size(op.box), slice_grad=True)
        assert result.nll[i] == pytest.approx(nll[0], rel=1e-4)
        expected += op.adjoint(slice_grad / op.weights, grid.direction_rotations[d])
    assert np.abs(result.grad - expected).max() < 1e-3 * np.abs(expected).max()
    # The weighting matters: the white-noise nll differs.
    white = marginal_nll(op, start, make_batch(op, images, ctf, PSIZE, sigma), grid, subsets,
                         want_grad=False)
    assert np.abs(white.nll - result.nll).max() > 0.1


def test_coloured_empty_map_nll_is_the_weighted_data_norm(problem):
    """The null likelihood (validation's) with coloured noise: ``sum w / P |d|^2 / (2 s2)``."""
    volume, grid, op, images, ctf, sigma, spectrum, group = problem
    batch = make_batch(op, images, ctf, PSIZE, sigma, noise=spectrum, noise_group=group)
    null = marginal_nll(op, np.zeros_like(volume), batch, grid,
                        empty_map_subsets(grid, len(images)), want_grad=False)
    w = op.weights * edge_taper(op) * batch.noise_weight[group]
    expected = np.sum(w * np.abs(batch.data) ** 2, axis=1) / (2 * batch.sigma2)
    assert np.allclose(null.nll, expected, rtol=1e-5)


@pytest.mark.parametrize("shared", [False, True], ids=["image by image", "group kernel"])
def test_a_white_spectrum_gives_exactly_the_white_numbers(problem, shared):
    volume, grid, op, images, ctf, sigma, _, _ = problem
    white = noise.NoiseSpectrum.white(BOX, PSIZE)
    n = len(images)
    subsets = exhaustive_subsets(grid, n)
    if not shared:  # ragged subsets take the image-by-image kernel
        subsets = subsets.block(0, n)
    start = (0.7 * volume + 0.05).astype(np.float32)
    a = marginal_nll(op, start, make_batch(op, images, ctf, PSIZE, sigma), grid, subsets)
    b = marginal_nll(op, start, make_batch(op, images, ctf, PSIZE, sigma, noise=white), grid,
                     subsets)
    assert np.array_equal(a.nll, b.nll)
    assert np.array_equal(a.grad, b.grad)
    assert np.array_equal(a.rot_post, b.rot_post)


def test_sampled_rows_cap_large_groups_and_keep_small_ones_whole():
    group = np.r_[np.zeros(1000, np.int64), np.ones(30, np.int64), np.full(500, 2)]
    rows = noise.sampled_rows(group, 3, max_per_group=100)
    assert np.all(np.diff(rows) > 0)
    assert np.bincount(group[rows]).tolist() == [100, 30, 100]
    first = rows[group[rows] == 0]
    assert first[0] == 0 and first[-1] == 999  # spread over the whole group
    assert np.array_equal(noise.sampled_rows(group, 3, 10_000), np.arange(len(group)))


def test_a_capped_estimate_reads_fewer_images_and_agrees_with_the_full_one():
    box, psize = 48, 4.0
    images = coloured_noise(2000, box, psize, seed=5).astype(np.float32)
    background, sigma = preprocess.estimate_noise(images, preprocess.outer_mask(box, 22.8))
    normalised = preprocess.normalise(images, background, sigma)
    read_count = []

    def read(rows):
        read_count.append(len(rows))
        return normalised[rows]

    group = np.zeros(2000, np.int64)
    full = noise.estimate_spectra(read, 2000, box, psize, group, ["optics 1"], [0], 22.8,
                                  max_per_group=10_000)
    assert sum(read_count) == 2000
    read_count.clear()
    capped = noise.estimate_spectra(read, 2000, box, psize, group, ["optics 1"], [0], 22.8,
                                    max_per_group=500)
    assert sum(read_count) == 500
    inside = slice(2, box // 2)
    np.testing.assert_allclose(capped.power[0][inside], full.power[0][inside], rtol=0.08)


@pytest.mark.parametrize("box", [32, 33])
def test_shell_power_from_the_half_spectrum_is_the_full_spectrums(box):
    # Reference: the definition on numpy's full centred FFT, with the full-grid indicator.
    from cryoday.fourier import ft2
    from cryoday.noise import _shell_indicator, background_mask, shell_power

    rng = np.random.default_rng(box)
    images = rng.standard_normal((4, box, box)).astype(np.float32)
    mask = background_mask(box, 0.3 * box)
    full = np.abs(ft2(images * mask.astype(np.float32))) ** 2
    reference = full.reshape(4, -1).astype(np.float64) @ _shell_indicator(box)
    np.testing.assert_allclose(shell_power(images, mask), reference, rtol=1e-5)
