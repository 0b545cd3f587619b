"""The stage driver: its configuration from the schema, the stage schedule, early stopping, and
resuming from a checkpoint."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from snakemake.utils import validate
from stage_helpers import ScriptedObjective, tiny_particle_set

from cryoday import initial, molecule
from cryoday.errors import InputError
from cryoday.importance import ImportanceSampler
from cryoday.quadrature import UNDERSAMPLING_BY_LEVEL
from cryoday.sagd import SAGD
from cryoday.stage import run_stage, train, view_order
from cryoday.stage_config import SCHEMA, StageConfig, default_reconstruction_config, stage_schedule

# Keys of the reconstruction section read outside StageConfig: by the workflow (stages, seeds,
# the last stage's refinement rounds), the schedule (learning_rate_min) and the rule script (the
# stage-1 start).
OUTSIDE_STAGE_CONFIG = {"stages_A", "seeds", "refine_rounds", "learning_rate_min",
                        "particle_diameter_A", "initial_model"}


def test_defaults_are_the_schemas_as_the_workflow_fills_them():
    config = {"datasets": {"d": {"simulate": {}}}}
    validate(config, str(SCHEMA), set_default=True)
    assert config["reconstruction"] == default_reconstruction_config()
    assert config["datasets"]["d"]["simulate"]["n_particles"] == 2000  # nested defaults too
    assert default_reconstruction_config(seeds=[7])["seeds"] == [7]
    with pytest.raises(InputError, match="reconstruction.seed:"):
        default_reconstruction_config(seed=7)


def test_every_reconstruction_key_is_read_and_stage_config_has_no_defaults():
    names = {f.name for f in dataclasses.fields(StageConfig)}
    schedule = {"learning_rate", "undersampling", "seed"}
    assert set(default_reconstruction_config()) == (names - {"seed"}) | OUTSIDE_STAGE_CONFIG
    assert schedule <= names
    assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(StageConfig))
    config = StageConfig.from_config(default_reconstruction_config(), 1, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 2


def test_a_section_not_filled_by_the_schema_is_refused_with_the_key_named():
    section = default_reconstruction_config()
    del section["patience"]
    with pytest.raises(InputError, match="reconstruction.patience"):
        StageConfig.from_config(section, 1, 1)


def test_schedule_halves_the_learning_rate_down_to_its_floor_and_seeds_each_stage():
    section = default_reconstruction_config(learning_rate=0.8, learning_rate_min=0.15)
    rates = [stage_schedule(section, stage, 3).learning_rate for stage in range(1, 6)]
    assert rates == pytest.approx([0.8, 0.4, 0.2, 0.15, 0.15])
    assert [stage_schedule(section, s, 3).seed for s in (1, 2)] == [3001, 3002]
    assert stage_schedule(section, 1, 4).seed != stage_schedule(section, 1, 3).seed


def test_auto_undersampling_is_the_quadratures_and_a_list_ends_at_one():
    auto = default_reconstruction_config()
    n = len(UNDERSAMPLING_BY_LEVEL)
    assert [stage_schedule(auto, s, 1).undersampling for s in range(1, n + 2)] == \
        [*UNDERSAMPLING_BY_LEVEL, 1.0]
    listed = default_reconstruction_config(undersampling=[2.0, 1.75])
    assert [stage_schedule(listed, s, 1).undersampling for s in (1, 2, 3)] == [2.0, 1.75, 1.0]


def test_importance_settings_reach_the_sampler():
    section = default_reconstruction_config(importance_min_grid_points=123,
                                            importance_max_rotations=45,
                                            importance_max_shifts=6, importance_coverage=0.5,
                                            importance_dataset_prior=[0.1, 0.2, 0.3], s0=4)
    config = StageConfig.from_config(section, 2, 1)
    sampler = ImportanceSampler(10, **config.sampler_options(iterations_per_epoch=3))
    assert (sampler.min_grid_points, sampler.max_rotations, sampler.max_shifts,
            sampler.coverage, sampler.s0) == (123, 45, 6, 0.5, 4.0)
    assert sampler.dataset_prior == (0.1, 0.2, 0.3)


@pytest.mark.parametrize(("min_iterations", "expected"), [(0, 4), (6, 6)])
def test_training_stops_when_the_heldout_error_stops_improving(min_iterations, expected):
    # Best at the second evaluation, then two without improvement: patience 2 stops at the
    # fourth iteration, unless the stage must run six.
    config = StageConfig.from_config(default_reconstruction_config(
        minibatch_size=5, max_iterations=10, min_iterations=min_iterations, patience=2,
        heldout_every=1), 1, 1)
    objective = ScriptedObjective([5.0, 4.0, 4.5, 4.6, 4.7, 4.8, 4.9])
    history = []
    volume = np.ones((4, 4, 4), np.float32)
    out = train(volume, SAGD(2, volume.shape, seed=1), objective, None, config, history,
                log=lambda *_: None)
    assert len(history) == expected
    assert [h["iteration"] for h in history] == list(range(1, expected + 1))
    assert [h["heldout_nll"] for h in history][:4] == [5.0, 4.0, 4.5, 4.6]
    assert out.sum() < volume.sum()  # it descended


def _tiny_set():
    return tiny_particle_set(molecule.synthetic_molecule(24, 8.0), 8.0, 100, seed=2)


def test_a_stage_resumes_from_its_checkpoint(tmp_path):
    images, ctf = _tiny_set()
    rows = np.arange(len(images))
    start = initial.random_blobs(24, 8.0, seed=1)
    checkpoint = tmp_path / "checkpoint.npz"
    lines = []

    def stage(max_iterations):
        section = default_reconstruction_config(
            minibatch_size=40, max_iterations=max_iterations, min_iterations=max_iterations,
            heldout_every=2, checkpoint_every=2)
        return run_stage(start, images, ctf, 1.0, 8.0, 30.0, rows[20:], rows[:20],
                         StageConfig.from_config(section, 1, 1), log=lines.append,
                         checkpoint_path=checkpoint, scale_start=True)

    first = stage(2)
    assert checkpoint.exists()
    resumed = stage(4)
    assert f"resuming from checkpoint {checkpoint} at iteration 2" in lines
    assert [h["iteration"] for h in resumed.history] == [1, 2, 3, 4]
    assert [h["objective"] for h in resumed.history[:2]] == \
        [h["objective"] for h in first.history]
    assert resumed.optimiser.t == 4 and np.isfinite(resumed.nll).all()


def test_a_stage_before_the_last_keeps_the_last_epochs_evaluations(monkeypatch):
    # 80 training particles in 2 minibatches, 5 iterations: every training particle was seen in
    # the last epoch (2 iterations), so with MIN_PASSED_PARTICLES lowered the pass covers only
    # the 20 held out, and the others' poses and nll are those of their last visit.
    from cryoday import stage as stage_module

    images, ctf = _tiny_set()
    rows = np.arange(len(images))
    start = initial.random_blobs(24, 8.0, seed=1)
    section = default_reconstruction_config(minibatch_size=40, max_iterations=5,
                                            min_iterations=5, heldout_every=5)
    config = StageConfig.from_config(section, 1, 1)
    seen = {}
    real_pass = stage_module.pose_pass

    def spy(objective, what, chunk, log=print, start_time=None, only=None):
        seen["only"] = only
        seen["objective"] = objective
        return real_pass(objective, what, chunk, log, start_time, only)

    monkeypatch.setattr(stage_module, "pose_pass", spy)
    monkeypatch.setattr(stage_module, "MIN_PASSED_PARTICLES", 30)
    lines = []
    result = run_stage(start, images, ctf, 1.0, 8.0, 30.0, rows[20:], rows[:20], config,
                       log=lines.append, scale_start=True, last_stage=False)
    objective = seen["objective"]
    # 30 passed: the 20 held out and the 10 training particles seen longest ago.
    passed = np.asarray(seen["only"])
    assert len(passed) == 30 and set(rows[:20]) <= set(passed)
    kept = np.setdiff1d(rows, passed)
    assert np.all(objective.visited_at[kept] >= objective.visited_at[np.setdiff1d(passed,
                                                                                 rows[:20])].max())
    grid = objective.grid
    np.testing.assert_array_equal(result.rotations[kept],
                                  grid.rotations[objective.visit_rot[kept]])
    np.testing.assert_array_equal(result.nll[kept], objective.visit_nll[kept])
    assert np.isfinite(result.nll).all() and np.isfinite(result.rotations).all()
    assert any("the other 70 keep their evaluation" in line for line in lines)

    # The last stage passes over every particle.
    run_stage(start, images, ctf, 1.0, 8.0, 30.0, rows[20:], rows[:20], config,
              log=lambda *_: None, scale_start=True)
    assert seen["only"] is None


def test_recently_visited_leaves_enough_particles_to_the_pass():
    from cryoday.stage import recently_visited

    class Seen:
        visited_at = np.array([-1, 9, 3, 8, 7, 9, -1, 2])

    assert recently_visited(Seen, 7, 0).tolist() == [1, 3, 4, 5]
    # 5 must be passed: 2 unvisited, 2 seen before 7, so one of the recent goes back (the
    # earliest, row 4).
    assert recently_visited(Seen, 7, 5).tolist() == [1, 3, 5]
    assert recently_visited(Seen, 7, 100).tolist() == []


def test_view_order_puts_particles_of_nearby_views_in_the_same_chunk():
    n, chunk = 4000, 200
    rng = np.random.default_rng(4)
    store = ImportanceSampler(n).store
    views = rng.normal(size=(n, 3))
    views /= np.linalg.norm(views, axis=1, keepdims=True)
    best = rng.integers(0, 32, n)
    store.dir_xyz[np.arange(n), best] = views
    store.dir_logp[np.arange(n), best] = 0.0
    store.has[:] = True
    store.has[:50] = False  # no posterior yet: they come last
    rows = rng.permutation(n)
    order = view_order(store, rows, chunk)
    assert np.array_equal(np.sort(order), np.arange(n))
    assert set(order[-50:]) == set(range(50))

    def mean_spread(ordered):
        """Mean over chunks of the angle (rad) from a chunk's views to their mean direction."""
        spreads = []
        for part in np.array_split(ordered[:-50], (n - 50) // chunk):
            v = views[part]
            centre = v.sum(axis=0) / np.linalg.norm(v.sum(axis=0))
            spreads.append(np.arccos(np.clip(v @ centre, -1, 1)).mean())
        return float(np.mean(spreads))

    # A chunk covers 1/20 of the sphere: a cap of about 0.45 rad, views within ~0.3 of its
    # centre; random chunks spread over the whole sphere (mean angle pi / 2).
    assert mean_spread(order) < 0.4
    assert mean_spread(rows[~np.isin(rows, np.arange(50))]) > 1.4
    # Too few rows to chunk: left as they are.
    assert np.array_equal(view_order(store, rows[:chunk], chunk), rows[:chunk])
