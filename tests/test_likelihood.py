"""The marginal likelihood against a dense reference, finite differences and invariances."""

from __future__ import annotations

import numpy as np
import pytest

from cryoday import molecule, simulate
from cryoday.fourier import ft2
from cryoday.geometry import euler_to_matrix
from cryoday.likelihood import PoseSubsets, exhaustive_subsets, make_batch, marginal_nll
from cryoday.projection import SliceOperator
from cryoday.quadrature import pose_grid
from reference import dense_nll

BOX, PSIZE = 20, 6.0


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(11)
    volume = molecule.synthetic_molecule(BOX, PSIZE)
    grid = pose_grid(40.0, BOX, PSIZE, undersampling=3.0, shift_sigma_A=10.0)
    op = SliceOperator(BOX, BOX * PSIZE / 40.0)
    n = 5
    true_r = rng.integers(0, grid.n_rot, n)
    true_s = rng.integers(0, grid.n_shift, n)
    images = simulate.project(volume, grid.rotations[true_r], grid.shifts[true_s])
    ctf = {"defocus_u": rng.uniform(1e4, 3e4, n).astype(np.float32),
           "voltage": 300.0, "cs": 2.7, "amplitude_contrast": 0.1}
    ctf["defocus_v"] = ctf["defocus_u"]
    ctf["defocus_angle"] = np.zeros(n, np.float32)
    k = (np.arange(BOX) - BOX // 2) / (BOX * PSIZE)
    fy, fx = np.meshgrid(k, k, indexing="ij")
    from cryoday.ctf import evaluate_ctf
    from cryoday.fourier import ift2

    full_ctf = evaluate_ctf(fx, fy, ctf["defocus_u"], ctf["defocus_v"], 0.0, 300.0, 2.7, 0.1)
    images = ift2(full_ctf * ft2(images)).astype(np.float32)
    sigma = 0.5 * images.std()
    noisy = images + sigma * rng.standard_normal(images.shape).astype(np.float32)
    batch = make_batch(op, noisy, ctf, PSIZE, sigma)
    return volume, grid, op, batch, true_r, true_s


def test_matches_dense_reference(problem):
    volume, grid, op, batch, _, _ = problem
    subsets = exhaustive_subsets(grid, len(batch))
    result = marginal_nll(op, volume, batch, grid, subsets, want_grad=False)
    slices = op.forward(volume, grid.rotations).astype(np.complex128)
    expected = dense_nll(slices, batch.data.astype(np.complex128), batch.ctf, batch.sigma2,
                         op.weights, op.kx, op.ky, op.box, grid.shifts, grid.rot_log_weights,
                         grid.shift_log_weights)
    assert np.allclose(result.nll, expected, rtol=1e-4, atol=1e-3)
    assert result.n_evaluated == len(batch) * grid.size


def test_posteriors_are_normalised_and_find_the_true_pose(problem):
    volume, grid, op, batch, true_r, true_s = problem
    result = marginal_nll(op, volume, batch, grid, exhaustive_subsets(grid, len(batch)),
                          want_grad=False)
    per_image_rot = result.rot_post.reshape(len(batch), -1).sum(axis=1)
    per_image_shift = result.shift_post.reshape(len(batch), -1).sum(axis=1)
    assert np.allclose(per_image_rot, 1) and np.allclose(per_image_shift, 1)
    assert np.array_equal(result.best_rot, true_r)
    assert np.array_equal(result.best_shift, true_s)


def test_gradient_matches_finite_differences(problem):
    volume, grid, op, batch, _, _ = problem
    subsets = exhaustive_subsets(grid, len(batch))
    # Evaluate away from the truth so the gradient is not ~0.
    start = (0.7 * volume + 0.05).astype(np.float32)
    result = marginal_nll(op, start, batch, grid, subsets)
    rng = np.random.default_rng(5)
    direction = rng.standard_normal(volume.shape).astype(np.float32)
    direction /= np.linalg.norm(direction)
    h = 1e-2
    plus = marginal_nll(op, start + h * direction, batch, grid, subsets, want_grad=False).nll
    minus = marginal_nll(op, start - h * direction, batch, grid, subsets, want_grad=False).nll
    numeric = (plus.sum() - minus.sum()) / (2 * h)
    analytic = float(np.sum(result.grad.astype(np.float64) * direction))
    # float32 energies and GEMMs: agreement to ~1% of the directional derivative.
    assert analytic == pytest.approx(numeric, rel=2e-2)


def test_ragged_subsets_equal_the_exhaustive_result_restricted(problem):
    volume, grid, op, batch, _, _ = problem
    rng = np.random.default_rng(8)
    rot_sets = [np.sort(rng.choice(grid.n_rot, 40, replace=False)) for _ in range(len(batch))]
    shift_sets = [np.arange(grid.n_shift)[: 1 + i % grid.n_shift] for i in range(len(batch))]
    subsets = PoseSubsets(
        rot_offsets=np.concatenate([[0], np.cumsum([len(r) for r in rot_sets])]),
        rot_index=np.concatenate(rot_sets),
        rot_logw=grid.rot_log_weights[np.concatenate(rot_sets)],
        shift_offsets=np.concatenate([[0], np.cumsum([len(s) for s in shift_sets])]),
        shift_index=np.concatenate(shift_sets),
        shift_logw=grid.shift_log_weights[np.concatenate(shift_sets)],
    )
    result = marginal_nll(op, volume, batch, grid, subsets, want_grad=False)
    slices = op.forward(volume, grid.rotations).astype(np.complex128)
    for i in range(len(batch)):
        expected = dense_nll(slices[rot_sets[i]], batch.data[i:i + 1].astype(np.complex128),
                             batch.ctf[i:i + 1], batch.sigma2[i:i + 1], op.weights, op.kx, op.ky,
                             op.box, grid.shifts[shift_sets[i]], grid.rot_log_weights[rot_sets[i]],
                             grid.shift_log_weights[shift_sets[i]])
        assert result.nll[i] == pytest.approx(expected[0], rel=1e-4)


def test_rotating_volume_and_poses_together_leaves_the_likelihood_unchanged():
    # An odd box turns exactly onto itself by 90 degrees about z (rot90 about voxel box // 2).
    box = 21
    volume = molecule.synthetic_molecule(box, PSIZE)
    turned = np.ascontiguousarray(np.rot90(volume, k=1, axes=(1, 2)))
    probe = np.zeros_like(volume)
    probe[box // 2, box // 2, box // 2 + 3] = 1  # a voxel at x = +3
    moved = np.argwhere(np.rot90(probe, k=1, axes=(1, 2)))[0] - box // 2  # (z, y, x)
    r = np.zeros((3, 3))
    r[:, 0] = np.array([moved[2], moved[1], moved[0]]) / 3.0  # where the x axis went
    r[:, 2] = [0, 0, 1]
    r[:, 1] = np.cross(r[:, 2], r[:, 0])
    grid = pose_grid(40.0, box, PSIZE, undersampling=3.0)
    op = SliceOperator(box, box * PSIZE / 40.0)
    rng = np.random.default_rng(2)
    images = simulate.project(volume, grid.rotations[rng.integers(0, grid.n_rot, 4)])
    images += 0.3 * images.std() * rng.standard_normal(images.shape).astype(np.float32)
    ctf = {"defocus_u": np.full(4, 2e4, np.float32), "defocus_v": np.full(4, 2e4, np.float32),
           "defocus_angle": np.zeros(4, np.float32), "voltage": 300.0, "cs": 2.7,
           "amplitude_contrast": 0.1}
    batch = make_batch(op, images, ctf, PSIZE, images.std())

    class Turned:
        # V'(x) = V(R^T x) seen at A R^T gives the projections of V at A.
        rotations = grid.rotations @ r.T
        shifts = grid.shifts
        rot_log_weights = grid.rot_log_weights
        shift_log_weights = grid.shift_log_weights

    subsets = exhaustive_subsets(grid, len(batch))
    a = marginal_nll(op, volume, batch, grid, subsets, want_grad=False).nll
    b = marginal_nll(op, turned, batch, Turned, subsets, want_grad=False).nll
    assert np.allclose(a, b, rtol=1e-5)
    c = marginal_nll(op, turned, batch, grid, subsets, want_grad=False).nll
    assert not np.allclose(a, c, rtol=1e-3)  # the check can fail


def test_single_pose_nll_is_the_energy(problem):
    volume, grid, op, batch, true_r, true_s = problem
    one = PoseSubsets(np.arange(len(batch) + 1), true_r, np.zeros(len(batch)),
                      np.arange(len(batch) + 1), true_s, np.zeros(len(batch)))
    result = marginal_nll(op, volume, batch, grid, one, want_grad=False)
    model = op.forward(volume, euler_to_matrix(0, 0, 0))  # warm path
    assert model.shape[1] == op.n_coef
    slices = op.forward(volume, grid.rotations[true_r]).astype(np.complex128)
    phase = np.exp(2j * np.pi * (grid.shifts[true_s, :1] * op.kx + grid.shifts[true_s, 1:] * op.ky)
                   / op.box)
    energy = np.sum(op.weights * np.abs(batch.data - batch.ctf * slices * phase) ** 2,
                    axis=1) / (2 * batch.sigma2)
    assert np.allclose(result.nll, energy, rtol=1e-4)


def test_blocks_of_images_give_the_same_result(problem, monkeypatch):
    import cryoday.likelihood as likelihood

    volume, grid, op, batch, _, _ = problem
    rng = np.random.default_rng(5)
    n_pick = grid.n_rot // 2
    picks = [np.sort(rng.choice(grid.n_rot, n_pick, replace=False)) for _ in range(len(batch))]
    subsets = PoseSubsets(
        np.arange(len(batch) + 1, dtype=np.int64) * n_pick, np.concatenate(picks),
        np.concatenate([grid.rot_log_weights[r] for r in picks]),
        np.arange(len(batch) + 1, dtype=np.int64) * grid.n_shift,
        np.tile(np.arange(grid.n_shift, dtype=np.int64), len(batch)),
        np.tile(np.asarray(grid.shift_log_weights, np.float64), len(batch)))
    whole = marginal_nll(op, volume, batch, grid, subsets)
    calls = []
    block = likelihood._marginal_nll_block
    monkeypatch.setattr(likelihood, "_marginal_nll_block",
                        lambda *a, **k: calls.append(1) or block(*a, **k))
    # Each image samples half the grid: about two images fit under this bound.
    monkeypatch.setattr(likelihood, "MAX_ROTATIONS_PER_BLOCK", n_pick + n_pick // 2)
    blocks = marginal_nll(op, volume, batch, grid, subsets)
    assert len(calls) >= len(batch) // 2
    assert np.allclose(blocks.nll, whole.nll)
    assert np.allclose(blocks.grad, whole.grad, rtol=1e-4, atol=1e-6 * np.abs(whole.grad).max())
    assert np.allclose(blocks.rot_post, whole.rot_post)
    assert np.array_equal(blocks.best_rot, whole.best_rot)


def test_images_sharing_the_grid_are_sliced_once(problem, monkeypatch):
    import cryoday.likelihood as likelihood

    volume, grid, op, batch, _, _ = problem
    calls = []
    block = likelihood._marginal_nll_block
    monkeypatch.setattr(likelihood, "_marginal_nll_block",
                        lambda *a, **k: calls.append(1) or block(*a, **k))
    monkeypatch.setattr(likelihood, "MAX_ROTATIONS_PER_BLOCK", grid.n_rot)
    marginal_nll(op, volume, batch, grid, exhaustive_subsets(grid, len(batch)))
    assert len(calls) == 1  # the bound counts distinct rotations, not image-rotation pairs
