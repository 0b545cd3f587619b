"""K classes (cryoday.classes): the mixture objective against single-class evaluations and finite
differences, the class samplers' state, and a stage that sorts two molecules apart."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import logsumexp
from stage_helpers import tiny_particle_set

from cryoday import classes, initial, molecule
from cryoday.classes import ClassSamplers, MixtureObjective
from cryoday.likelihood import marginal_nll
from cryoday.pose_sets import exhaustive_subsets
from cryoday.projection import SliceOperator
from cryoday.quadrature import pose_grid
from cryoday.stage import _Data, finite_or_raise, run_stage, scale_to_data
from cryoday.stage_config import StageConfig, default_reconstruction_config

BOX, PSIZE = 20, 8.0


def two_molecules(n: int, seed: int = 1):
    """``n`` images, the first half of one molecule, the rest of another, and their CTFs."""
    a = tiny_particle_set(molecule.synthetic_molecule(BOX, PSIZE), PSIZE, n // 2, seed)
    b = tiny_particle_set(molecule.other_molecule(BOX, PSIZE), PSIZE, n - n // 2, seed + 1)
    images = np.concatenate([a[0], b[0]])
    ctf = {k: np.concatenate([a[1][k], b[1][k]]) if np.ndim(a[1][k]) else a[1][k] for k in a[1]}
    return images, ctf, np.r_[np.zeros(n // 2, int), np.ones(n - n // 2, int)]


@pytest.fixture(scope="module")
def mixture():
    images, ctf, truth = two_molecules(12)
    op = SliceOperator(BOX, BOX * PSIZE / 24.0)
    grid = pose_grid(24.0, BOX, PSIZE, undersampling=2.5, shift_sigma_A=8.0)
    data = _Data(op, images, ctf, 1.0, PSIZE)
    volumes = np.stack([initial.low_pass(v, op.radius) for v in (
        molecule.synthetic_molecule(BOX, PSIZE), molecule.other_molecule(BOX, PSIZE))])
    # Each scaled to its own molecule's images' signal power: each then explains its own.
    rng = np.random.default_rng(0)
    volumes = np.stack([scale_to_data(v, op, data, grid, np.flatnonzero(truth == c), rng)
                        for c, v in enumerate(volumes)])
    sampler = ClassSamplers.fresh(len(images), 2, enabled=False)
    objective = MixtureObjective(op, data, grid, sampler, [np.arange(len(images))], [], 12,
                                 finite_or_raise)
    # Past the class similarity's epochs: the gradient is the mixture's own.
    objective.iteration = 10 * classes.CLASS_SIMILARITY_EPOCHS
    return objective, volumes, truth


def test_the_mixture_nll_is_the_log_sum_of_each_class_likelihood(mixture):
    objective, volumes, truth = mixture
    rows = np.arange(len(truth))
    batch = objective.data.batch(rows)
    subsets = exhaustive_subsets(objective.grid, len(rows))
    per_class = np.stack([marginal_nll(objective.op, v, batch, objective.grid, subsets,
                                       want_grad=False).nll for v in volumes], axis=1)
    objective.sampler.posterior[:] = [0.3, 0.7]  # proportions 0.3 / 0.7
    objective.sampler.visited[:] = True
    try:
        result = objective.evaluate(volumes, rows, want_grad=False, update=False)
        expected = -logsumexp(np.log([0.3, 0.7])[None, :] - per_class, axis=1)
        # The proportions are means of float32 posteriors: 1e-7 relative.
        np.testing.assert_allclose(result.nll, expected, rtol=1e-7)
        np.testing.assert_allclose(result.posterior.sum(axis=1), 1.0, rtol=1e-10)
        # Each molecule's images are explained by their own molecule's map.
        assert np.array_equal(np.argmax(result.posterior, axis=1), truth)
    finally:
        objective.sampler.posterior[:] = 0.5
        objective.sampler.visited[:] = False


def test_the_class_gradient_matches_finite_differences(mixture):
    objective, volumes, _ = mixture
    value, grad = objective(volumes, 0, want_grad=True)
    assert grad.shape == volumes.shape and np.abs(grad[1]).max() > 0
    rng = np.random.default_rng(3)
    for _ in range(2):
        direction = rng.standard_normal(volumes.shape).astype(np.float32)
        direction *= 0.01 * volumes.max() / np.abs(direction).max()
        plus, _ = objective(volumes + direction, 0, want_grad=False)
        minus, _ = objective(volumes - direction, 0, want_grad=False)
        numeric = (plus - minus) / 2.0
        analytic = float(np.sum(grad.astype(np.float64) * direction))
        # float32 kernels; the images left out of a class (SHARE_FLOOR) shift it by < 1e-3.
        assert analytic == pytest.approx(numeric, rel=2e-2, abs=1e-6)


def test_class_similarity_mixes_the_gradient_weights_with_uniform_ones(mixture):
    objective, volumes, _ = mixture
    assert classes.class_similarity(0.0) == classes.CLASS_SIMILARITY
    assert classes.class_similarity(classes.CLASS_SIMILARITY_EPOCHS) == 0.0
    exact = objective(volumes, 0, want_grad=True)[1]
    saved = objective.iteration
    objective.iteration = 0
    try:
        similar = objective(volumes, 0, want_grad=True)[1]
    finally:
        objective.iteration = saved
    # At s = 0.5 each class map also learns from the other molecule's images.
    assert np.abs(similar - exact).max() > 0.05 * np.abs(exact).max()


def test_class_samplers_state_round_trips_with_the_main_class_under_the_usual_keys():
    samplers = ClassSamplers.fresh(5, 3, enabled=False, seed=4)
    samplers.record(np.arange(5), np.tile([0.1, 0.6, 0.3], (5, 1)), training=True)
    samplers.end_step()
    assert samplers.main == 1
    np.testing.assert_allclose(samplers.proportions(), [0.1, 0.6, 0.3], rtol=1e-6)
    state = samplers.state()
    for key, value in samplers.samplers[1].state().items():
        assert np.array_equal(state[key], state[f"class1_{key}"])
    back = ClassSamplers.from_state(state, enabled=False, seed=4)
    assert back.k == 3 and back.n == 5
    assert np.array_equal(back.posterior, samplers.posterior)
    assert np.array_equal(back.visited, samplers.visited)
    np.testing.assert_array_equal(back.proportion_history, samplers.proportion_history)
    assert [s.seed for s in back.samplers] == [s.seed for s in samplers.samplers]
    assert len({s.seed for s in back.samplers}) == 3
    # A floor keeps an emptied class a candidate.
    samplers.record(np.arange(5), np.tile([0.0, 1.0, 0.0], (5, 1)), training=True)
    assert np.isfinite(samplers.log_proportions()).all()


def _two_class_stage(images, ctf, rows, max_iterations, checkpoint=None, lines=None):
    section = default_reconstruction_config(
        minibatch_size=60, max_iterations=max_iterations, min_iterations=max_iterations,
        heldout_every=2, checkpoint_every=2, classes=2)
    start = np.stack([initial.random_blobs(BOX, PSIZE, seed=classes.class_start_seed(1, c))
                      for c in range(2)])
    return run_stage(start, images, ctf, 1.0, PSIZE, 40.0, rows[30:], rows[:30],
                     StageConfig.from_config(section, 1, 1),
                     log=(lines.append if lines is not None else lambda *_: None),
                     checkpoint_path=checkpoint, scale_start=True)


def test_a_two_class_stage_sorts_two_molecules_apart():
    images, ctf, truth = two_molecules(360, seed=5)
    rows = np.random.default_rng(0).permutation(len(images))
    result = _two_class_stage(images, ctf, rows, 24)
    assigned = np.argmax(result.class_posterior, axis=1)
    # Which class took which molecule is arbitrary: the better of the two matchings.
    agreement = max(np.mean(assigned == truth), np.mean(assigned != truth))
    assert agreement >= 0.9, agreement
    np.testing.assert_allclose(result.class_posterior.sum(axis=1), 1.0, rtol=1e-5)
    assert result.volumes.shape == (2, BOX, BOX, BOX)
    assert np.array_equal(result.volume, result.volumes[result.sampler.main])
    assert len(result.sampler.proportion_history) == len(result.history)


def test_a_two_class_stage_resumes_from_its_checkpoint_exactly(tmp_path):
    images, ctf, _ = two_molecules(120, seed=7)
    rows = np.arange(len(images))
    whole = _two_class_stage(images, ctf, rows, 4)
    checkpoint = tmp_path / "checkpoint.npz"
    lines = []
    _two_class_stage(images, ctf, rows, 2, checkpoint, lines)
    assert checkpoint.exists()
    resumed = _two_class_stage(images, ctf, rows, 4, checkpoint, lines)
    assert f"resuming from checkpoint {checkpoint} at iteration 2" in lines
    assert np.array_equal(resumed.volumes, whole.volumes)
    assert np.array_equal(resumed.class_posterior, whole.class_posterior)
    np.testing.assert_array_equal(resumed.sampler.proportion_history,
                                  whole.sampler.proportion_history)


def test_a_copy_of_a_class_is_found_but_another_molecule_or_a_coarse_stage_is_not():
    from scipy import ndimage

    box, psize = 32, 4.0
    one = molecule.synthetic_molecule(box, psize)
    other = molecule.other_molecule(box, psize)
    turned = ndimage.rotate(one, 90, axes=(0, 1), reshape=False, order=1).astype(np.float32)
    volumes = np.stack([one, other, turned])
    # Class 3, smaller than class 1, is class 1's molecule turned: it is the duplicate.
    assert classes.find_duplicates(volumes, psize, 12.0, 100.0, [0.5, 0.2, 0.3]) == [(2, 0)]
    assert classes.find_duplicates(volumes, psize, 12.0, 100.0, [0.2, 0.2, 0.6]) == [(0, 2)]
    assert classes.find_duplicates(volumes[:2], psize, 12.0, 100.0, [0.5, 0.5]) == []
    # At a stage coarser than a sixth of the diameter two molecules agree: no test is made.
    assert classes.find_duplicates(volumes, psize, 30.0, 100.0, [0.5, 0.2, 0.3]) == []
    assert classes.find_duplicates(volumes, psize, 12.0, None, [0.5, 0.2, 0.3]) == []


def test_a_reseeded_class_gives_its_particles_to_its_twin_and_takes_its_poses():
    grid = pose_grid(40.0, BOX, PSIZE, undersampling=2.0, shift_sigma_A=8.0)
    samplers = ClassSamplers.fresh(4, 3, enabled=False, seed=2)
    samplers.set_grid(grid)
    samplers.record(np.arange(4), np.tile([0.2, 0.5, 0.3], (4, 1)), training=True)
    before = samplers.samplers[2]
    samplers.reseed(2, 1, {"enabled": False, "seed": 2}, grid)
    np.testing.assert_allclose(samplers.posterior, np.tile([0.2, 0.8, 0.0], (4, 1)), atol=1e-7)
    assert samplers.samplers[2] is not before and samplers.samplers[2].grid is grid
    assert samplers.samplers[2].seed == before.seed
    # The twin's pose posteriors, copied (the twin's own are not shared).
    twin, new = samplers.samplers[1].store, samplers.samplers[2].store
    for key, value in twin.state().items():
        assert np.array_equal(new.state()[key], value)
    assert new.has is not twin.has
    # The proportions start uniform again: the new class is a candidate for every particle.
    np.testing.assert_allclose(samplers.proportions(), [1 / 3] * 3)
    weak = classes.weak_start(np.full((4, 4, 4), 2.0, np.float32), np.ones((4, 4, 4)))
    assert weak.max() == pytest.approx(2.0 * classes.WEAK_START)


def test_classes_from_one_initial_model_start_apart_but_close_to_it():
    model = molecule.synthetic_molecule(BOX, PSIZE)
    blob = initial.random_blobs(BOX, PSIZE, seed=3)
    start = classes.perturbed_start(model, blob)
    assert not np.allclose(start, model)
    assert np.corrcoef(start.ravel(), model.ravel())[0, 1] > 0.8
    assert start.max() <= model.max() * (1 + 1e-6)
