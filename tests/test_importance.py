"""Importance sampling: unbiased weights, exhaustive fall-backs, caching, bounded state."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import logsumexp

from cryoday import molecule, simulate
from cryoday.importance import ImportanceSampler
from cryoday.likelihood import exhaustive_subsets, make_batch, marginal_nll
from cryoday.projection import SliceOperator
from cryoday.quadrature import pose_grid


def test_weights_are_unbiased(rng):
    n = 50
    q = rng.dirichlet(np.ones(n))
    q = 0.9 * q + 0.1 / n
    log_w = np.full(n, -np.log(n))
    f = rng.uniform(0, 1, n) ** 4
    exact = np.sum(np.exp(log_w) * f)
    estimates = []
    for _ in range(4000):
        idx, lw = ImportanceSampler._sample(q, log_w, 20, rng)
        estimates.append(np.sum(np.exp(lw) * f[idx]))
    estimates = np.array(estimates)
    assert abs(estimates.mean() - exact) < 4 * estimates.std() / np.sqrt(len(estimates))


def small_problem(n_images=6, box=24, psize=6.0, resolution=15.0):
    rng = np.random.default_rng(4)
    volume = molecule.synthetic_molecule(box, psize)
    grid = pose_grid(resolution, box, psize, undersampling=1.5, shift_sigma_A=6.0)
    op = SliceOperator(box, box * psize / resolution)
    true_r = rng.integers(0, grid.n_rot, n_images)
    true_s = rng.integers(0, grid.n_shift, n_images)
    images = simulate.project(volume, grid.rotations[true_r], grid.shifts[true_s])
    images += 0.5 * images.std() * rng.standard_normal(images.shape).astype(np.float32)
    ctf = {"defocus_u": np.full(n_images, 1.5e4, np.float32),
           "defocus_v": np.full(n_images, 1.5e4, np.float32),
           "defocus_angle": np.zeros(n_images, np.float32), "voltage": 300.0, "cs": 2.7,
           "amplitude_contrast": 0.1}
    return volume, grid, op, make_batch(op, images, ctf, psize, 0.5 * images.std())


def test_disabled_or_small_grids_are_exhaustive():
    _, grid, _, batch = small_problem()
    rows = np.arange(len(batch))
    expected = exhaustive_subsets(grid, len(batch))
    for sampler in (ImportanceSampler(len(batch), enabled=False),
                    ImportanceSampler(len(batch), min_grid_points=grid.size + 1)):
        got = sampler.subsets(grid, rows, 0)
        assert np.array_equal(got.rot_index, expected.rot_index)
        assert np.array_equal(got.shift_index, expected.shift_index)
        assert np.allclose(got.rot_logw, expected.rot_logw)


def test_sampled_nll_matches_the_exhaustive_one_with_far_fewer_points():
    volume, grid, op, batch = small_problem()
    rows = np.arange(len(batch))
    sampler = ImportanceSampler(len(batch), min_grid_points=0, seed=1)
    first = sampler.subsets(grid, rows, 0)  # no posterior yet: capped uniform draws
    exact = marginal_nll(op, volume, batch, grid, exhaustive_subsets(grid, len(batch)),
                         want_grad=False)
    sampler.update(grid, rows, exhaustive_subsets(grid, len(batch)), exact)
    sampled_subsets = sampler.subsets(grid, rows, 1)
    sampled = marginal_nll(op, volume, batch, grid, sampled_subsets, want_grad=False)
    assert sampled_subsets.n_points < 0.2 * exact.n_evaluated
    assert np.allclose(sampled.nll, exact.nll, rtol=0.01)
    assert first.n_points <= len(batch) * sampler.max_rotations * grid.n_shift
    # Same (rows, iteration): the same samples, as the line search needs.
    again = sampler.subsets(grid, rows, 1)
    assert again is sampled_subsets


def test_state_per_image_does_not_grow_with_the_grid():
    coarse = ImportanceSampler(100)
    fine = ImportanceSampler(100)
    coarse.set_grid(pose_grid(40.0, 64, 3.0))
    fine.set_grid(pose_grid(10.0, 64, 3.0))
    size = lambda s: sum(v.nbytes for v in s.state().values())  # noqa: E731
    assert size(coarse) == size(fine) < 100 * 2000


def test_state_round_trip(tmp_path):
    _, grid, op, batch = small_problem()
    sampler = ImportanceSampler(len(batch), min_grid_points=0)
    volume = molecule.synthetic_molecule(24, 6.0)
    subsets = exhaustive_subsets(grid, len(batch))
    sampler.update(grid, np.arange(len(batch)), subsets,
                   marginal_nll(op, volume, batch, grid, subsets, want_grad=False))
    np.savez(tmp_path / "s.npz", **sampler.state())
    restored = ImportanceSampler.from_state(dict(np.load(tmp_path / "s.npz")), min_grid_points=0)
    restored.set_grid(grid)
    a = sampler.subsets(grid, np.arange(3), 5)
    b = restored.subsets(grid, np.arange(3), 5)
    assert np.array_equal(a.rot_index, b.rot_index)
    assert logsumexp(a.rot_logw) == pytest.approx(logsumexp(b.rot_logw))


def test_state_between_visits_does_not_grow_with_passes_over_the_data():
    """A pass over every particle at one iteration (held-out, final poses) keeps no per-batch
    samples, and per-visit proposals are dropped once the visit is stored."""
    from cryoday.importance import ImportanceSampler
    from cryoday.quadrature import pose_grid

    grid = pose_grid(15.0, 30, 6.4, 1.0)
    n = 600
    sampler = ImportanceSampler(n, seed=0, min_grid_points=0)
    sampler.set_grid(grid)
    rng = np.random.default_rng(0)
    for row in range(n):
        sampler.dir_xyz[row, 0] = grid.directions[rng.integers(grid.n_dir)]
        sampler.dir_p[row, 0] = 1.0
        sampler.inp_p[row, 0] = 1.0
        sampler.shift_p[row, 0] = 1.0
        sampler.has[row] = True

    class Flat:  # a posterior spread evenly over the sampled points
        def __init__(self, subsets):
            self.rot_post = np.ones(len(subsets.rot_index))
            self.shift_post = np.ones(len(subsets.shift_index))

    for rows in np.array_split(np.arange(n), 12):
        subsets = sampler.subsets(grid, rows, iteration=7)
        sampler.update(grid, rows, subsets, Flat(subsets))
    assert len(sampler._cache) <= ImportanceSampler.CACHED_BATCHES
    assert len(sampler._proposals) == 0
