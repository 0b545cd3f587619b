"""The marginal likelihood against a dense reference, finite differences and invariances."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from reference import elementwise, turned_image_nll

from cryoday import _likelihood_kernels as kernels
from cryoday import likelihood, molecule, simulate, tunables
from cryoday.batch import image_padded_size, make_batch
from cryoday.fourier import ft2
from cryoday.likelihood import LikelihoodPlan, edge_taper, marginal_nll
from cryoday.pose_sets import PoseSubsets, empty_map_subsets, exhaustive_subsets
from cryoday.projection import SliceOperator
from cryoday.quadrature import pose_grid

BOX, PSIZE = 20, 6.0


def apply_ctf_as_in_a_micrograph(images, ctf, pixel_size):
    """The CTF acting on the projections before they are boxed: on a 4x larger field, then
    cropped. (Applied on the box itself it would wrap the delocalised signal round the box,
    which no micrograph does, and which only a model sampled on that same grid would match.)"""
    from cryoday.ctf import evaluate_ctf
    from cryoday.fourier import ift2

    n = images.shape[-1]
    m = 4 * n
    field = np.zeros((len(images), m, m))
    lo = m // 2 - n // 2
    field[:, lo:lo + n, lo:lo + n] = images
    k = (np.arange(m) - m // 2) / (m * pixel_size)
    fy, fx = np.meshgrid(k, k, indexing="ij")
    params = {key: ctf[key] for key in ("defocus_u", "defocus_v", "defocus_angle", "voltage",
                                         "cs", "amplitude_contrast")}
    field = ift2(evaluate_ctf(fx, fy, **params) * ft2(field))
    return field[:, lo:lo + n, lo:lo + n].astype(np.float32)


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
    images = apply_ctf_as_in_a_micrograph(images, ctf, PSIZE)
    sigma = 0.5 * images.std()
    noisy = images + sigma * rng.standard_normal(images.shape).astype(np.float32)
    batch = make_batch(op, noisy, ctf, PSIZE, sigma)
    return volume, grid, op, batch, true_r, true_s, (noisy, ctf)


def reference_nll(raw, volume, grid, op, batch, dirs=None, inps=None, shifts=None,
                  volume_grad=False):
    """:func:`reference.turned_image_nll` of the images in ``raw``; with ``volume_grad``, also
    the gradient of their summed nll with respect to ``volume``: the twin's gradient with
    respect to the slices, taken to the volume by the operator's adjoint (which
    ``tests/test_projection.py`` holds to its own twin)."""
    images, ctf = raw
    dirs = np.arange(grid.n_dir) if dirs is None else dirs
    inps = np.arange(grid.n_inp) if inps is None else inps
    shifts = np.arange(grid.n_shift) if shifts is None else shifts
    slices = op.forward(volume, grid.direction_rotations[dirs]).astype(np.complex128)
    weights = op.weights * edge_taper(op)
    out = turned_image_nll(slices, images, ctf, batch.sigma2, PSIZE, op.kx, op.ky, weights,
                           grid.inplane_matrices[inps], grid.shifts[shifts],
                           grid.dir_log_weights[dirs], grid.inp_log_weights[inps],
                           grid.shift_log_weights[shifts], image_padded_size(op.box),
                           slice_grad=volume_grad)
    if not volume_grad:
        return out
    nll, slice_grad = out
    return nll, op.adjoint(slice_grad / op.weights, grid.direction_rotations[dirs])


def test_matches_dense_reference(problem):
    """The engine's objective, against a numpy/scipy twin that forms every pose explicitly."""
    volume, grid, op, batch, _, _, raw = problem
    subsets = exhaustive_subsets(grid, len(batch))
    result = marginal_nll(op, volume, batch, grid, subsets, want_grad=False)
    expected = reference_nll(raw, volume, grid, op, batch)
    # float32 data and GEMMs against float64: 1e-4 relative on nll of ~10-40 nats.
    assert np.allclose(result.nll, expected, rtol=1e-4, atol=2e-3)
    assert result.n_evaluated == len(batch) * grid.size


def test_turning_the_image_approximates_turning_the_slice():
    """At cryo-EM signal levels the turned-image objective stays close to slicing every
    rotation (the exact discretisation): same best pose, nll within a fraction of a nat per
    image, posteriors that overlap."""
    box, psize, res = 40, 3.0, 12.0
    rng = np.random.default_rng(3)
    volume = molecule.synthetic_molecule(box, psize)
    grid = pose_grid(res, box, psize, undersampling=2.0)
    op = SliceOperator(box, box * psize / res)
    n = 4
    true_r = rng.integers(0, grid.n_rot, n)
    images = simulate.project(volume, grid.rotations[true_r])
    ctf = {"defocus_u": rng.uniform(1e4, 3e4, n), "defocus_v": rng.uniform(1e4, 3e4, n),
           "defocus_angle": rng.uniform(0, 180, n), "voltage": 300.0, "cs": 2.7,
           "amplitude_contrast": 0.1}
    clean = apply_ctf_as_in_a_micrograph(images, ctf, psize)
    sigma = 3.0 * clean.std()  # SNR 0.1
    noisy = (clean + sigma * rng.standard_normal(clean.shape)).astype(np.float32)
    batch = make_batch(op, noisy, ctf, psize, sigma)
    shifts = np.array([int(np.argmin(np.hypot(*grid.shifts.T)))])
    subsets = PoseSubsets.from_sets(
        grid.n_inp, [np.arange(grid.n_dir)] * n, [grid.dir_log_weights] * n,
        [np.arange(grid.n_inp)] * n, [grid.inp_log_weights] * n, [shifts] * n, [np.zeros(1)] * n)
    turned = marginal_nll(op, volume, batch, grid, subsets, want_grad=False)
    slices = op.forward(volume, grid.rotations).astype(np.complex128)
    weights = op.weights * edge_taper(op)  # the likelihood's weights, soft at the cutoff
    exact_post = []
    exact = np.empty(n)
    for i in range(n):
        phase = np.ones(op.n_coef)
        energy = np.sum(weights * np.abs(batch.data[i] - batch.ctf[i] * slices * phase) ** 2,
                        axis=1) / (2 * batch.sigma2[i])
        logits = grid.rot_log_weights - energy
        exact[i] = -np.logaddexp.reduce(logits)
        exact_post.append(np.exp(logits + exact[i]))
    assert np.abs(turned.nll - exact).max() < 1.0
    post = turned.rot_post.reshape(n, grid.n_rot)
    overlap = np.sum(np.minimum(post, np.array(exact_post)), axis=1)
    assert overlap.min() > 0.7, overlap
    # Its best pose is one the exact posterior also rates (near-ties may swap).
    for i in range(n):
        assert exact_post[i][turned.best_rot[i]] >= 0.1 * exact_post[i].max()


def test_posteriors_are_normalised_and_find_the_true_pose(problem):
    volume, grid, op, batch, true_r, true_s, _ = problem
    result = marginal_nll(op, volume, batch, grid, exhaustive_subsets(grid, len(batch)),
                          want_grad=False)
    per_image_rot = result.rot_post.reshape(len(batch), -1).sum(axis=1)
    per_image_shift = result.shift_post.reshape(len(batch), -1).sum(axis=1)
    assert np.allclose(per_image_rot, 1) and np.allclose(per_image_shift, 1)
    assert np.array_equal(result.best_rot, true_r)
    assert np.array_equal(result.best_shift, true_s)


def test_gradient_matches_finite_differences(problem):
    volume, grid, op, batch, _, _, _ = problem
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


@pytest.mark.parametrize("shared", [False, True], ids=["image by image", "group kernel"])
def test_gradient_matches_the_dense_reference(problem, monkeypatch, shared):
    """nll and volume gradient against the numpy twin, away from the truth: each image with its
    own directions, in-plane angles and shifts (the image-by-image kernel), or all images with
    the same directions and one shift each (the group kernel, its GEMMs merged)."""
    volume, grid, op, batch, _, _, raw = problem
    start = (0.7 * volume + 0.05).astype(np.float32)
    rng = np.random.default_rng(12)
    n = len(batch)
    common = np.sort(rng.choice(grid.n_dir, 4, replace=False))
    dir_sets = [common if shared else np.sort(rng.choice(grid.n_dir, 2 + i % 3, replace=False))
                for i in range(n)]
    inp_sets = [np.sort(rng.choice(grid.n_inp, 2 + i % 3, replace=False)) for i in range(n)]
    shift_sets = [np.sort(rng.choice(grid.n_shift, 1 if shared else min(grid.n_shift, 1 + i % 3),
                                     replace=False)) for i in range(n)]
    subsets = PoseSubsets.from_sets(
        grid.n_inp, dir_sets, [grid.dir_log_weights[d] for d in dir_sets], inp_sets,
        [grid.inp_log_weights[p] for p in inp_sets], shift_sets,
        [grid.shift_log_weights[s] for s in shift_sets])
    calls = []
    kernel = kernels.shared_kernel
    monkeypatch.setattr(kernels, "shared_kernel", lambda *a: calls.append(1) or kernel(*a))
    result = marginal_nll(op, start, batch, grid, subsets)
    assert bool(calls) == shared
    # Class posteriors as gradient weights (cryoday.classes): one image left out entirely.
    shares = np.r_[0.0, rng.uniform(0.1, 1.0, n - 1)].astype(np.float32)
    weighted = marginal_nll(op, start, batch, grid, subsets, grad_weights=shares)
    images, ctf = raw
    expected = np.zeros(volume.shape)
    expected_weighted = np.zeros(volume.shape)
    for i in range(n):
        one = (images[i:i + 1], {k: (v[i:i + 1] if np.ndim(v) else v) for k, v in ctf.items()})
        nll, grad = reference_nll(one, start, grid, op, batch.take(slice(i, i + 1)), dir_sets[i],
                                  inp_sets[i], shift_sets[i], volume_grad=True)
        assert result.nll[i] == pytest.approx(nll[0], rel=1e-4)
        expected += grad
        expected_weighted += shares[i] * grad
    # float32 slices, GEMMs and accumulators against float64: 1e-3 of the largest voxel.
    assert np.abs(result.grad - expected).max() < 1e-3 * np.abs(expected).max()
    assert np.abs(expected).max() > 0
    assert np.array_equal(weighted.nll, result.nll)
    assert (np.abs(weighted.grad - expected_weighted).max()
            < 1e-3 * np.abs(expected_weighted).max())
    assert np.abs(expected_weighted - expected).max() > 0.05 * np.abs(expected).max()


def test_ragged_subsets_equal_the_exhaustive_result_restricted(problem):
    volume, grid, op, batch, _, _, raw = problem
    rng = np.random.default_rng(8)
    n = len(batch)
    dir_sets = [np.sort(rng.choice(grid.n_dir, 1 + i % 4, replace=False)) for i in range(n)]
    inp_sets = [np.sort(rng.choice(grid.n_inp, 2 + i % 3, replace=False)) for i in range(n)]
    shift_sets = [np.arange(grid.n_shift)[: 1 + i % grid.n_shift] for i in range(n)]
    subsets = PoseSubsets.from_sets(
        grid.n_inp, dir_sets, [grid.dir_log_weights[d] for d in dir_sets], inp_sets,
        [grid.inp_log_weights[p] for p in inp_sets], shift_sets,
        [grid.shift_log_weights[s] for s in shift_sets])
    result = marginal_nll(op, volume, batch, grid, subsets, want_grad=False)
    images, ctf = raw
    for i in range(n):
        one = (images[i:i + 1], {k: (v[i:i + 1] if np.ndim(v) else v) for k, v in ctf.items()})
        expected = reference_nll(one, volume, grid, op, batch.take(slice(i, i + 1)), dir_sets[i],
                                 inp_sets[i], shift_sets[i])
        assert result.nll[i] == pytest.approx(expected[0], rel=1e-4)
    # The rotations each image evaluated, direction-major, as rot_post is ordered.
    first = (dir_sets[0][:, None] * grid.n_inp + inp_sets[0][None, :]).ravel()
    assert np.array_equal(subsets.rot_index[:subsets.rot_offsets[1]], first)


def test_taking_images_of_subsets_equals_building_them_from_those_images(problem):
    _, grid, *_ = problem
    rng = np.random.default_rng(5)
    n = 6
    sets = [[np.sort(rng.choice(size, min(size, 1 + (i * 7 + j) % 4), replace=False))
             for i in range(n)]
            for j, size in enumerate((grid.n_dir, grid.n_inp, grid.n_shift))]
    logws = [[rng.standard_normal(len(x)) for x in part] for part in sets]
    whole = PoseSubsets.from_sets(grid.n_inp, sets[0], logws[0], sets[1], logws[1], sets[2],
                                  logws[2])
    picked = [4, 1, 5]
    taken = whole.take(picked)
    built = PoseSubsets.from_sets(grid.n_inp, *[[part[i] for i in picked]
                                                for pair in zip(sets, logws) for part in pair])
    for name in ("dir_offsets", "dir_index", "dir_logw", "inp_offsets", "inp_index", "inp_logw",
                 "shift_offsets", "shift_index", "shift_logw"):
        assert np.array_equal(getattr(taken, name), getattr(built, name)), name


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

    # V'(x) = V(R^T x) seen at A R^T gives the projections of V at A (A = P A_d, so turning the
    # directions turns every rotation).
    from dataclasses import replace

    turned_grid = replace(grid, direction_rotations=grid.direction_rotations @ r.T)

    subsets = exhaustive_subsets(grid, len(batch))
    a = marginal_nll(op, volume, batch, grid, subsets, want_grad=False).nll
    b = marginal_nll(op, turned, batch, turned_grid, subsets, want_grad=False).nll
    assert np.allclose(a, b, rtol=1e-5)
    c = marginal_nll(op, turned, batch, grid, subsets, want_grad=False).nll
    assert not np.allclose(a, c, rtol=1e-3)  # the check can fail


def test_single_pose_nll_is_the_energy_and_the_empty_map_nll_is_exact(problem):
    volume, grid, op, batch, true_r, true_s, raw = problem
    n = len(batch)
    d, p = np.divmod(true_r, grid.n_inp)
    one = PoseSubsets.from_sets(grid.n_inp, d[:, None], np.zeros((n, 1)), p[:, None],
                                np.zeros((n, 1)), true_s[:, None], np.zeros((n, 1)))
    result = marginal_nll(op, volume, batch, grid, one, want_grad=False)
    images, ctf = raw
    for i in range(n):
        raw_i = (images[i:i + 1], {k: (v[i:i + 1] if np.ndim(v) else v) for k, v in ctf.items()})
        single = batch.take(slice(i, i + 1))
        logw = (grid.dir_log_weights[d[i]] + grid.inp_log_weights[p[i]]
                + grid.shift_log_weights[true_s[i]])
        energy = reference_nll(raw_i, volume, grid, op, single, d[i:i + 1], p[i:i + 1],
                               true_s[i:i + 1])[0] + logw
        # float32 GEMMs: |d|^2 - 2 cross + |m|^2 cancels; 1e-3 nats absolute.
        assert result.nll[i] == pytest.approx(energy, rel=1e-4, abs=1e-3)
    # An empty map: the in-plane angles alone give -log p(I | 0) exactly (any direction or
    # shift predicts the same zero image), which is |d|^2 / 2 s2 of the unturned data.
    empty = np.zeros_like(volume)
    null = marginal_nll(op, empty, batch, grid, empty_map_subsets(grid, n), want_grad=False).nll
    full = marginal_nll(op, empty, batch, grid, exhaustive_subsets(grid, n), want_grad=False).nll
    assert np.allclose(null, full, rtol=1e-6)
    weights = op.weights * edge_taper(op)
    grid_energy = np.sum(weights * np.abs(batch.data) ** 2, axis=1) / (2 * batch.sigma2)
    assert np.allclose(null, grid_energy, rtol=1e-5)


def test_blocks_of_images_give_the_same_result(problem, monkeypatch):
    volume, grid, op, batch, _, _, _ = problem
    rng = np.random.default_rng(5)
    n = len(batch)
    n_pick = grid.n_dir // 2
    picks = [np.sort(rng.choice(grid.n_dir, n_pick, replace=False)) for _ in range(n)]
    subsets = PoseSubsets.from_sets(
        grid.n_inp, picks, [grid.dir_log_weights[d] for d in picks],
        [np.arange(grid.n_inp)] * n, [grid.inp_log_weights] * n,
        [np.arange(grid.n_shift)] * n, [grid.shift_log_weights] * n)
    whole = marginal_nll(op, volume, batch, grid, subsets)
    calls = []
    block = likelihood._marginal_nll_block
    monkeypatch.setattr(likelihood, "_marginal_nll_block",
                        lambda *a, **k: calls.append(1) or block(*a, **k))
    # Each image samples half the grid: about two images fit under this bound. The plan kept
    # for these subsets has one block: a new plan is made under the new bound.
    monkeypatch.setattr(tunables, "MAX_DIRECTIONS_PER_BLOCK", n_pick + n_pick // 2)
    plan = LikelihoodPlan(subsets, grid)
    assert len(plan.blocks) >= len(batch) // 2
    blocks = marginal_nll(op, volume, batch, grid, subsets, plan=plan)
    assert len(calls) >= len(batch) // 2
    assert np.allclose(blocks.nll, whole.nll)
    assert np.allclose(blocks.grad, whole.grad, rtol=1e-4, atol=1e-6 * np.abs(whole.grad).max())
    assert np.allclose(blocks.rot_post, whole.rot_post)
    assert np.array_equal(blocks.best_rot, whole.best_rot)


def test_images_sharing_the_grid_are_sliced_once(problem, monkeypatch):
    volume, grid, op, batch, _, _, _ = problem
    calls = []
    block = likelihood._marginal_nll_block
    monkeypatch.setattr(likelihood, "_marginal_nll_block",
                        lambda *a, **k: calls.append(1) or block(*a, **k))
    monkeypatch.setattr(tunables, "MAX_DIRECTIONS_PER_BLOCK", grid.n_dir)
    marginal_nll(op, volume, batch, grid, exhaustive_subsets(grid, len(batch)))
    assert len(calls) == 1  # the bound counts distinct directions, not image-direction pairs


def test_turned_ctf_matches_relion_ctf_with_astigmatism():
    """The kernel's CTF at turned frequencies equals evaluate_ctf there (astigmatism, B-factor,
    phase shift), so turning an image turns its CTF exactly."""
    from cryoday.batch import ctf_parameter_table
    from cryoday.ctf import evaluate_ctf
    from cryoday.quadrature import inplane_matrices

    op = SliceOperator(32, 12.0)
    params = {"defocus_u": 2.1e4, "defocus_v": 1.6e4, "defocus_angle": 37.0, "voltage": 200.0,
              "cs": 2.0, "amplitude_contrast": 0.07, "bfactor": 40.0, "phase_shift": 20.0}
    table = ctf_parameter_table(params, 1)[0]
    psize = 2.5
    p2 = inplane_matrices(np.array([0.7]))
    # A constant "image transform" of 1 + 0i, so that B = w c conj(d) is w c (its kx >= 0
    # half: rows ky = -20..20, columns kx = 0..20).
    padded = np.ones((41, 21), np.complex64)
    b_re, b_im, c2, wc2 = (np.empty((1, op.n_coef), np.float32) for _ in range(4))
    kx, ky = op.kx.astype(np.float64), op.ky.astype(np.float64)
    weights = op.weights
    images = kernels.Images(data=np.ones((1, op.n_coef), np.complex64), padded=padded[None],
                            pad=1.0, centre=20.0, ctf_params=table[None],
                            freq_scale=1.0 / (32 * psize), sigma2=np.ones(1, np.float32))
    coef = likelihood.operator_coefficients(op)._replace(weights=weights)  # untapered
    dnorm = kernels.prepare_image(images, 0, np.zeros(1, np.int64), p2, coef, b_re, b_im, c2,
                                  wc2)
    assert dnorm == pytest.approx(weights.sum())
    b_re, b_im, c2, wc2, p2 = b_re[0], b_im[0], c2[0], wc2[0], p2[0]
    turned = np.stack([kx, ky], axis=1) @ p2.T
    expected = evaluate_ctf(turned[:, 0] / (32 * psize), turned[:, 1] / (32 * psize), **params)
    assert np.allclose(b_re / weights, expected, atol=1e-5)
    assert np.allclose(b_im, 0.0) and np.allclose(c2, expected**2, atol=1e-5)
    assert np.allclose(wc2, weights * expected**2, atol=1e-5)
    unturned = evaluate_ctf(kx / (32 * psize), ky / (32 * psize), **params)
    assert not np.allclose(b_re / weights, unturned, atol=1e-2)  # astigmatism makes turning matter


def test_fast_sine_matches_numpy():
    """The kernel's polynomial sine (it keeps the CTF loop free of library calls) against numpy,
    beyond the range of CTF phases (|chi| reaches hundreds of radians at high defocus and fine
    sampling)."""
    x = np.random.default_rng(0).uniform(-5000.0, 5000.0, 200_000)
    x[:5] = [0.0, np.pi / 2, -np.pi / 2, np.pi, 1e-8]
    assert np.max(np.abs(elementwise(kernels.sine)(x) - np.sin(x))) < 1e-9


@pytest.mark.parametrize("one_shift", [False, True], ids=["ragged shifts", "one shift each"])
def test_groups_sharing_directions_equal_image_by_image(problem, monkeypatch, one_shift):
    """The shared-direction kernel (one GEMM per group of images) against the image-by-image
    one, with each image's own in-plane angles and shifts, so the groups' column offsets are
    ragged; with one shift per image, the group kernel merges the norm term into the cross
    term's GEMM, and the gradient's two GEMMs into one."""
    volume, _, op, batch, _, _, _ = problem
    grid = pose_grid(40.0, BOX, PSIZE, undersampling=3.0, shift_sigma_A=30.0)  # 5 shifts
    rng = np.random.default_rng(8)
    n = len(batch)
    inps = [np.sort(rng.choice(grid.n_inp, rng.integers(2, grid.n_inp + 1), replace=False))
            for _ in range(n)]
    shifts = [np.sort(rng.choice(grid.n_shift, 1 if one_shift else rng.integers(
        1, grid.n_shift + 1), replace=False)) for _ in range(n)]
    subsets = PoseSubsets.from_sets(
        grid.n_inp, [np.arange(grid.n_dir)] * n, [grid.dir_log_weights] * n,
        inps, [grid.inp_log_weights[x] for x in inps],
        shifts, [grid.shift_log_weights[x] for x in shifts])
    calls = []
    shared = kernels.shared_kernel
    monkeypatch.setattr(kernels, "shared_kernel", lambda *a: calls.append(1) or shared(*a))
    grouped = marginal_nll(op, volume, batch, grid, subsets)
    assert calls, "the images share their directions: the group kernel should have run"
    monkeypatch.setattr(likelihood, "shared_groups", lambda *a: None)
    single = marginal_nll(op, volume, batch, grid, subsets)
    assert np.allclose(grouped.nll, single.nll, rtol=1e-6)
    assert np.allclose(grouped.rot_post, single.rot_post, atol=1e-6)
    assert np.allclose(grouped.shift_post, single.shift_post, atol=1e-6)
    assert np.array_equal(grouped.best_rot, single.best_rot)
    assert np.array_equal(grouped.best_shift, single.best_shift)
    assert np.allclose(grouped.grad, single.grad, rtol=1e-4,
                       atol=1e-5 * np.abs(single.grad).max())


def test_images_share_directions_only_with_the_same_weights():
    """The group kernel gives a group one row of direction weights: images whose directions
    agree but whose weights differ must not be grouped."""
    from cryoday.pose_sets import common_directions

    grid = pose_grid(40.0, BOX, PSIZE, undersampling=3.0)
    same = exhaustive_subsets(grid, 3)
    assert np.array_equal(common_directions(same), np.arange(grid.n_dir))
    logw = [grid.dir_log_weights, grid.dir_log_weights + 0.1, grid.dir_log_weights]
    every = np.arange(grid.n_dir)
    differ = PoseSubsets.from_sets(
        grid.n_inp, [every] * 3, logw, [np.arange(grid.n_inp)] * 3,
        [grid.inp_log_weights] * 3, [np.arange(grid.n_shift)] * 3, [grid.shift_log_weights] * 3)
    assert common_directions(differ) is None


@pytest.mark.parametrize("grouped", [True, False], ids=["group kernel", "image by image"])
def test_a_nan_in_an_image_makes_its_nll_nan(problem, monkeypatch, grouped):
    """Bad input surfaces (Numba's fast maths here leave out no-NaN assumptions): a NaN in one
    image's transform makes that image's nll NaN, and leaves the others' as they were."""
    volume, grid, op, batch, _, _, _ = problem
    subsets = exhaustive_subsets(grid, len(batch))
    if not grouped:
        monkeypatch.setattr(likelihood, "shared_groups", lambda *a: None)
    clean = marginal_nll(op, volume, batch, grid, subsets, want_grad=False).nll
    c = batch.padded.shape[1] // 2
    padded = batch.padded.copy()
    padded[1, c + 1, 0] = np.nan  # read by the turned image near the origin (kx = 0)
    bad = marginal_nll(op, volume, dataclasses.replace(batch, padded=padded), grid, subsets,
                       want_grad=False).nll
    assert np.isnan(bad[1])
    assert np.allclose(np.delete(bad, 1), np.delete(clean, 1), rtol=1e-12)


def test_a_non_finite_likelihood_names_the_particles():
    """...and a stage stops there, naming the particles by their STAR rows (1-based), instead of
    letting a NaN poison the map."""
    from cryoday.stage import finite_or_raise

    rows = np.array([10, 11, 12, 40])
    nll = np.array([5.0, np.nan, 7.0, np.inf])
    with pytest.raises(FloatingPointError, match=r"particle row\(s\) 12, 41 is not finite"):
        finite_or_raise(nll, rows)
    many = np.full(8, np.nan)
    with pytest.raises(FloatingPointError, match=r"1, 2, 3, 4, 5 and 3 more"):
        finite_or_raise(many, np.arange(8))
    assert finite_or_raise(np.array([1.0, 2.0]), np.array([0, 1])) is not None


def test_columns_built_in_chunks_equal_columns_built_at_once(problem, monkeypatch):
    """An image's columns built in several chunks (the path for images with more columns than
    COLUMN_BYTES holds) against one chunk: nll, posteriors and gradient."""
    volume, _, op, batch, _, _, _ = problem
    grid = pose_grid(40.0, BOX, PSIZE, undersampling=3.0, shift_sigma_A=30.0)  # 5 shifts
    subsets = exhaustive_subsets(grid, len(batch))
    monkeypatch.setattr(likelihood, "shared_groups", lambda *a: None)
    once = marginal_nll(op, volume, batch, grid, subsets)
    # Room for the columns of 2 in-plane angles (x 5 shifts) per chunk.
    monkeypatch.setattr(tunables, "COLUMN_BYTES", 8 * op.n_coef * 2 * grid.n_shift)
    chunked = marginal_nll(op, volume, batch, grid, subsets)
    assert grid.n_inp > 2
    assert np.allclose(chunked.nll, once.nll, rtol=1e-6)
    assert np.allclose(chunked.rot_post, once.rot_post, atol=1e-6)
    assert np.allclose(chunked.shift_post, once.shift_post, atol=1e-6)
    assert np.allclose(chunked.grad, once.grad, rtol=1e-4, atol=1e-5 * np.abs(once.grad).max())
