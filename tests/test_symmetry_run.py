"""Symmetry in the ab initio run: the stage's setting, the pose grid on one asymmetric unit,
the sampler's snapping into it, and a trained map that stays symmetric."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from stage_helpers import tiny_particle_set

from cryoday import initial, molecule, simulate, symmetry
from cryoday.errors import InputError
from cryoday.importance import ImportanceSampler
from cryoday.importance.geometry import GridKernels
from cryoday.quadrature import pose_grid
from cryoday.stage import run_stage
from cryoday.stage_config import StageConfig, default_reconstruction_config

GRID_ARGS = (20.0, 32, 4.0, 1.5)


def _asymmetry(volume, name):
    """The largest relative difference between the volume and its image under one element."""
    v = np.asarray(volume, np.float64)
    scale = np.linalg.norm(v)
    return max(np.linalg.norm(symmetry.rotate_volume(v, g) - v) / scale
               for g in symmetry.group(name)[1:])


# ---------------------------------------------------------------------- the setting


def test_the_stage_setting_is_canonical_and_auto_trains_in_c1():
    assert StageConfig.from_config(default_reconstruction_config(), 1, 1).symmetry == "C1"
    assert StageConfig.from_config(default_reconstruction_config(symmetry="d7"), 1, 1
                                   ).symmetry == "D7"
    assert StageConfig.from_config(default_reconstruction_config(symmetry="auto"), 1, 1
                                   ).symmetry == "C1"
    # The workflow leaves the key out for C1 (so old stages' params are unchanged).
    section = default_reconstruction_config()
    del section["symmetry"]
    assert StageConfig.from_config(section, 1, 1).symmetry == "C1"
    with pytest.raises(InputError, match=r"^reconstruction\.symmetry: .*'D1'"):
        StageConfig.from_config(default_reconstruction_config(symmetry="D1"), 1, 1)


def test_the_symmetry_is_in_the_checkpoint_fingerprint():
    from cryoday.checkpoint import stage_fingerprint

    def fingerprint(name):
        config = StageConfig.from_config(default_reconstruction_config(symmetry=name), 1, 1)
        images = np.zeros((3, 8, 8), np.float32)
        return stage_fingerprint(config, images, {"defocus_u": np.ones(3)}, 1.0, 1.0, 10.0,
                                 [0, 1], [2], np.zeros((8, 8, 8), np.float32))

    assert fingerprint("C1")["params"]["symmetry"] == "C1"
    assert fingerprint("C1") != fingerprint("C4")


# ---------------------------------------------------------------------- the grid


def test_c1_grid_is_the_grid_without_a_symmetry():
    plain = pose_grid(*GRID_ARGS)
    c1 = pose_grid(*GRID_ARGS, symmetry="C1")
    for f in dataclasses.fields(plain):
        a, b = getattr(plain, f.name), getattr(c1, f.name)
        if isinstance(a, np.ndarray):
            assert a.dtype == b.dtype and np.array_equal(a, b), f.name
        else:
            assert a == b, f.name


@pytest.mark.parametrize("name", ["C4", "D7", "O"])
def test_the_grid_covers_one_asymmetric_unit(name):
    full = pose_grid(*GRID_ARGS)
    grid = pose_grid(*GRID_ARGS, symmetry=name.lower())
    order = symmetry.order(name)
    assert grid.symmetry == name
    assert symmetry.in_asymmetric_unit(grid.directions, name).all()
    # About 1/|G| of the sphere's directions (a spiral's points fall unevenly on the unit's
    # edges: within 15 %), the in-plane angles and shifts those of C1.
    assert grid.n_dir == pytest.approx(full.n_dir / order, rel=0.15)
    np.testing.assert_array_equal(grid.inplane, full.inplane)
    np.testing.assert_array_equal(grid.shifts, full.shifts)
    np.testing.assert_array_equal(grid.shift_log_weights, full.shift_log_weights)
    assert grid.n_rot == grid.n_dir * grid.n_inp
    np.testing.assert_allclose(np.exp(grid.rot_log_weights).sum(), 1.0, rtol=1e-12)
    np.testing.assert_allclose(np.exp(grid.dir_log_weights).sum(), 1.0, rtol=1e-12)
    # The rotations are the kept directions' (third row = viewing direction).
    np.testing.assert_allclose(grid.rotations[::grid.n_inp, 2], grid.directions, atol=1e-12)
    # Every direction of the sphere has an equivalent within about a grid step of the unit's
    # points: the unit's grid loses nothing.
    equivalents, _ = symmetry.to_asymmetric_unit(full.directions, name)
    nearest = np.max(equivalents @ grid.directions.T, axis=1)
    assert np.degrees(np.arccos(np.clip(nearest.min(), -1, 1))) < 1.5 * np.degrees(
        full.angular_step)


def test_the_sampler_snaps_antipodes_into_the_unit():
    grid = pose_grid(*GRID_ARGS, symmetry="C4")
    sampler = ImportanceSampler(2)
    sampler.set_grid(grid)
    store = sampler.store
    # Image 0 stored at a direction of the unit; its antipode lies outside it (C4's wedge
    # 0 <= rot < 90 degrees, the antipode at rot + 180).
    d = grid.directions[len(grid.directions) // 3]
    store.dir_xyz[0, :] = d
    store.dir_logp[0, :] = -np.log(store.dir_logp.shape[1])
    store.has[0] = True
    kernels = GridKernels(grid, store)
    snapped = kernels.snapped(0, np.array([0]), antipodes=True)[0, 0]
    target, _ = symmetry.to_asymmetric_unit(-d, "C4")
    best = np.argmax(grid.directions @ target)
    assert snapped == best
    assert not symmetry.in_asymmetric_unit(-d, "C4")
    # In C1 the antipode is its own grid point.
    c1 = pose_grid(*GRID_ARGS)
    store.dir_xyz[0, :] = c1.directions[5]
    assert GridKernels(c1, store).snapped(0, np.array([0]), antipodes=True)[0, 0] == \
        np.argmax(c1.directions @ -c1.directions[5])


@pytest.mark.parametrize("name", ["C1", "C4", "D7"])
def test_broad_proposals_draw_the_c1_density_of_rotations_on_the_unit(name):
    """The rotation cap is per asymmetric unit: C1's cap over all of SO(3), |G| times fewer
    draws on the unit's grid (a C4 run had drawn as many as C1 and taken as long)."""
    section = default_reconstruction_config(symmetry=name, importance_min_grid_points=1,
                                            importance_max_rotations=600)
    config = StageConfig.from_config(section, 1, 1)
    cap = -(-600 // symmetry.order(name))
    grid = pose_grid(*GRID_ARGS, symmetry=name.lower())
    sampler = ImportanceSampler(50, **config.sampler_options(10))
    assert sampler.rotation_cap(grid) == cap
    # No stored posteriors: every proposal is the prior, as broad as a proposal gets.
    subsets = sampler.subsets(grid, np.arange(50), iteration=1)
    drawn = np.diff(subsets.rot_offsets)
    assert drawn.max() <= cap
    # The cap binds: the draws it allows (distinct rotations of draws with replacement, the
    # directions and in-plane counts cut by 0.8 at a time) are not a small posterior's.
    assert np.median(drawn) > 0.25 * cap


@pytest.mark.parametrize("name", ["C4", "D7"])
def test_the_exhaustive_threshold_counts_the_unit_as_its_share_of_so3(name):
    """A grid of one asymmetric unit is sampled when the whole sphere's grid would be: a C4
    run had summed its first stages' grids whole, more points than C1 sampled of its own."""
    grid = pose_grid(*GRID_ARGS, symmetry=name.lower())
    c1 = pose_grid(*GRID_ARGS)
    order = symmetry.order(name)
    # Between the unit's own size and its share of SO(3): sampled with the group, summed whole
    # on a C1 grid of the unit's size.
    threshold = grid.size * order - 1
    assert grid.size < threshold < c1.size * 1.5
    sampler = ImportanceSampler(10, min_grid_points=threshold)
    sampler.set_grid(grid)
    assert sampler.active
    sampler.set_grid(c1)
    assert sampler.active == (c1.size > threshold)
    above = ImportanceSampler(10, min_grid_points=grid.size * order)
    above.set_grid(grid)
    assert not above.active
    subsets = above.subsets(grid, np.arange(10), iteration=1)
    assert np.all(np.diff(subsets.rot_offsets) == grid.n_dir * grid.n_inp)


def _prior_draws(grid, directions, c1_floor=False, iteration=10**6):
    """Directions drawn from the prior part, ``alpha * M``, for an image whose stored
    direction posterior is split evenly over ``directions``, late on (T = 1, the floor)."""
    sampler = ImportanceSampler(1, min_grid_points=0, dataset_prior=(0.0, 0.0, 0.0))
    if c1_floor:
        sampler.alpha_floor = lambda: sampler.alpha_min
    sampler.set_grid(grid)
    store = sampler.store
    k = len(directions)
    store.dir_xyz[0, :k] = directions
    store.dir_logp[0, :k] = -np.log(k)
    store.inp_logp[0, 0] = 0.0
    store.shift_logp[0, 0] = 0.0
    store.has[0] = True
    q_dir = sampler._proposal_matrices(np.array([0]), iteration)[0][0]
    m = np.ceil(sampler.s0 / np.sum(q_dir ** 2))
    return sampler.alpha(iteration) * m, sampler


def test_a_group_keeps_c1s_exploratory_draws():
    """On C1's grid a particle of a C4 map has four equivalent directions, so its proposal
    draws four times as much, the prior part's exploratory draws included; on the unit the
    modes fold into one. The prior share's floor on the unit keeps the exploratory draws at
    C1's count (a D7 run with C1's floor left 14% of its particles at wrong poses)."""
    unit = pose_grid(*GRID_ARGS, symmetry="c4")
    c1 = pose_grid(*GRID_ARGS)
    d = unit.directions[len(unit.directions) // 2]
    equivalents = np.einsum("gji,j->gi", symmetry.group("C4"), d)
    c1_draws, c1_sampler = _prior_draws(c1, equivalents)
    unit_draws, unit_sampler = _prior_draws(unit, d[None])
    assert c1_sampler.alpha_floor() == c1_sampler.alpha_min
    a = unit_sampler.alpha_min
    assert unit_sampler.alpha_floor() == pytest.approx(4 * a / (1 - a + 4 * a))
    assert 0.6 * c1_draws < unit_draws < 2.5 * c1_draws
    # With C1's floor on the unit they are about a quarter of C1's.
    assert _prior_draws(unit, d[None], c1_floor=True)[0] < 0.4 * c1_draws


# ---------------------------------------------------------------------- training


def _symmetric_set(name, n=120, box=24, pixel_size=8.0):
    truth = symmetry.symmetrise(molecule.synthetic_molecule(box, pixel_size), name)
    return tiny_particle_set(truth, pixel_size, n, seed=3)


def test_a_trained_map_stays_symmetric_and_c1_is_untouched(monkeypatch):
    images, ctf = _symmetric_set("C4")
    rows = np.arange(len(images))
    start = initial.random_blobs(24, 8.0, seed=1)
    section = default_reconstruction_config(minibatch_size=40, max_iterations=4,
                                            min_iterations=4, heldout_every=2)

    def stage(name, log=lambda *_: None):
        config = StageConfig.from_config({**section, "symmetry": name}, 1, 1)
        return run_stage(start, images, ctf, 1.0, 8.0, 30.0, rows[20:], rows[:20], config,
                         log=log, scale_start=True)

    lines = []
    c4 = stage("C4", lines.append)
    assert any("symmetry C4 (order 4)" in line for line in lines)
    assert any(" directions x " in line for line in lines)
    c1 = stage("C1")
    # The random start is far from C4; the C4 stage's map is C4 to interpolation accuracy, the
    # C1 stage's is not.
    assert _asymmetry(start, "C4") > 0.3
    assert _asymmetry(c4.volume, "C4") < 0.05
    assert _asymmetry(c1.volume, "C4") > 4 * _asymmetry(c4.volume, "C4")
    # C1 never symmetrises: the same map with symmetrise broken.
    monkeypatch.setattr(symmetry, "symmetrise", lambda *a, **k: pytest.fail("symmetrised"))
    again = stage("C1")
    np.testing.assert_array_equal(again.volume, c1.volume)


# ---------------------------------------------------------------------- the workflow


def test_a_datasets_symmetry_reaches_its_stages_and_a_bad_name_is_refused(tmp_path):
    from test_planning import _mock_params
    from workflow_helpers import run_snakemake, write_config

    write_config(tmp_path, {"datasets": {"d7": {"simulate": {"box": 32}, "symmetry": "d7"},
                                         "plain": {"simulate": {"box": 32}},
                                         "search": {"simulate": {"box": 32},
                                                    "symmetry": "auto"}},
                            "reconstruction": {"stages_A": [40, 30], "symmetry": "C1"}})
    options = {name: _mock_params(tmp_path, "reconstruct_stage", dataset=name, seed="1",
                                  stage="2")["options"] for name in ("d7", "plain", "search")}
    assert options["d7"]["symmetry"] == "d7"
    assert "symmetry" not in options["plain"] and "symmetry" not in options["search"]
    assert StageConfig.from_config(options["d7"], 2, 1).symmetry == "D7"
    for key, config in [
        ("datasets.d.symmetry", {"datasets": {"d": {"simulate": {}, "symmetry": "C4v"}}}),
        ("reconstruction.symmetry", {"datasets": {"d": {"simulate": {}}},
                                     "reconstruction": {"symmetry": "D1"}}),
    ]:
        write_config(tmp_path, config)
        proc = run_snakemake(tmp_path, "-n", "--cores", "1")
        assert proc.returncode != 0
        output = (proc.stdout + proc.stderr).strip()
        assert output.splitlines()[-1].startswith(f"cryoday: {key}: "), output
        assert "Traceback" not in output


# ---------------------------------------------------------------------- validation


@pytest.mark.parametrize("mirror", [False, True])
def test_pose_errors_are_taken_up_to_the_group_after_the_frame(mirror):
    from scipy.spatial.transform import Rotation

    from cryoday.validation import POSE_CHUNK, symmetric_pose_errors

    rng = np.random.default_rng(4)
    n = 600
    true = Rotation.random(n, random_state=5).as_matrix()
    elements = symmetry.group("D7")
    g = elements[rng.integers(0, len(elements), n)]
    frame = Rotation.from_rotvec([0.3, -0.7, 1.1]).as_matrix()
    noise = Rotation.from_rotvec(rng.normal(scale=np.radians(2.0), size=(n, 3))).as_matrix()
    flip = np.diag([1.0, 1.0, -1.0])
    seen = flip @ true @ flip if mirror else true
    # Each estimate is one of its |G| equivalents, in a map turned by ``frame``, 2 deg off.
    est = noise @ seen @ (flip @ g @ flip if mirror else g) @ frame.T
    errors, mirrored = symmetric_pose_errors(lambda r: (true[r], est[r]), n, "D7",
                                             chunk_size=128)
    assert mirrored is mirror
    # 2 deg per axis: the angle's median is ~ 2 * 1.54 deg (a Maxwell distribution's).
    assert np.median(errors) == pytest.approx(3.1, abs=0.5)
    assert errors.max() < 10
    # Without the group the same poses look wrong (the C1 average of B^T A is no frame).
    from cryoday.validation import pose_errors

    assert np.median(pose_errors(true, est, POSE_CHUNK)[0]) > 30


def test_metrics_say_the_group_and_search_a_c1_map_when_asked():
    from cryoday.validation import symmetry_figures

    box = 32
    truth = symmetry.symmetrise(molecule.synthetic_molecule(box, 6.0), "C4")
    rng = np.random.default_rng(1)
    halves = [truth + 0.02 * truth.std() * rng.standard_normal(truth.shape).astype(np.float32)
              for _ in range(2)]
    assert symmetry_figures("d7", False, truth, *halves, 6.0) == {"group": "D7", "order": 14}
    assert symmetry_figures("C1", False, truth, *halves, 6.0) == {"group": "C1", "order": 1}
    found = symmetry_figures("auto", False, truth, *halves, 6.0)
    assert found["group"] == "C1" and found["search"]["group"] == "C4"
    assert {c["group"] for c in found["search"]["candidates"]} >= {"C1", "C4", "D7", "I"}
    assert "search" not in symmetry_figures("D7", True, truth, *halves, 6.0)
    # The report: the group, the scores table with the found group marked, the aligned views.
    from cryoday import report
    from cryoday.symmetry_search import align_to_recorded_axes

    page = report.symmetry_section({"symmetry": found}, truth)
    assert "<h2>Symmetry</h2>" in page and "point group <b>C1</b>" in page
    assert page.count("<tr") == 1 + len(found["search"]["candidates"])
    assert "<tr class=ok><td>C4</td>" in page
    assert 'alt="final map turned onto the C4 axes found (the n-fold along z)"' in page
    assert _asymmetry(align_to_recorded_axes(truth, found["search"]), "C4") < 0.1
    d7 = report.symmetry_section({"symmetry": {"group": "D7", "order": 14}}, truth)
    assert "point group <b>D7</b> (order 14): the pose grid" in d7 and "<table>" not in d7
    assert report.symmetry_section({}, truth) == ""


# ---------------------------------------------------------------------- simulation


@pytest.mark.parametrize("name", ["C4", "D7"])
def test_the_synthetic_assembly_has_its_group_and_no_larger_one(name):
    volume = simulate.symmetric_assembly(48, 3.0, name)
    assert volume.shape == (48, 48, 48) and volume.max() == pytest.approx(1.0)
    assert _asymmetry(volume, name) < 0.02
    # Its subunits sit off the axes, so the group is no larger: C8 / D14 turns move them.
    larger = f"{name[0]}{2 * int(name[1:])}"
    assert _asymmetry(volume, larger) > 0.2
