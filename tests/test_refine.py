"""The EM rounds after the last stage (cryoday.refine): the M step's shell filter against a
plain FFT, and the rounds inside a stage on a tiny simulated set."""

from __future__ import annotations

import numpy as np

from cryoday import geometry, molecule, simulate, validation
from cryoday.importance import ImportanceSampler
from cryoday.refine import annealing_off, filtered_map, moved_share
from cryoday.stage import run_stage
from cryoday.stage_config import StageConfig, default_reconstruction_config


def test_filtered_map_weights_each_shell_by_the_halves_figure_of_merit(rng):
    box = 12
    full = rng.normal(size=(box,) * 3).astype(np.float32)
    fsc = np.clip(rng.uniform(-0.2, 1.0, box // 2 + 1), -1, 1)
    # Reference: numpy's uncentred FFT, the radius from fftfreq, rounded to a shell; shells
    # beyond the curve (the cube's corners) get nothing.
    k = np.fft.fftfreq(box) * box
    radius = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    shell = np.rint(radius).astype(int)
    c = np.clip(fsc, 0, 1)
    weight = np.where(shell < len(fsc), np.sqrt(2 * c / (1 + c))[np.minimum(shell, len(fsc) - 1)],
                      0.0)
    expected = np.maximum(np.fft.ifftn(np.fft.fftn(full) * weight).real, 0)
    np.testing.assert_allclose(filtered_map(full, fsc), expected, atol=1e-5)
    # FSC 1 everywhere inside the sphere leaves the sphere's coefficients as they are.
    assert np.all(filtered_map(full, np.ones(box // 2 + 1)) >= 0)


def test_moved_share_counts_rotations_beyond_the_angle():
    eye = np.repeat(np.eye(3)[None], 4, axis=0)
    turned = eye.copy()
    turned[:2] = geometry.euler_to_matrix(np.array([0.0, 0.0]), np.array([0.0, 0.0]),
                                          np.array([3.0, 12.0]))
    assert moved_share(eye, turned, 5.0) == 0.25
    # Under C4 a quarter turn about z is no move at all.
    quarter = geometry.euler_to_matrix(np.zeros(4), np.zeros(4), np.full(4, 90.0))
    assert moved_share(eye, quarter, 5.0, "C4") == 0.0
    assert moved_share(eye, quarter, 5.0) == 1.0


def test_annealing_off_draws_at_t1_and_gives_the_schedule_back():
    # Early in its schedule (epoch 0.5, offset 0.2) the sampler's T is 2^(9 / 0.3) and the
    # prior's share 1; with annealing off, T = 1 and the floor, and afterwards the schedule's.
    sampler = ImportanceSampler(100, iterations_per_epoch=10.0)
    annealed = (sampler.temperature(5.0), sampler.alpha(5.0), sampler.flip(5.0))
    assert annealed[0] > 1e6 and annealed[1] > 0.9 and annealed[2]
    try:
        with annealing_off(sampler):
            assert sampler.temperature(5.0) == 1.0
            assert sampler.alpha(5.0) == sampler.alpha_floor()
            assert not sampler.flip(5.0)
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert (sampler.temperature(5.0), sampler.alpha(5.0), sampler.flip(5.0)) == annealed


def test_refinement_rounds_keep_the_stage_map_and_find_the_poses():
    # 160 images of 24 px at SNR 0.5, a 30 A stage started from the true map: the rounds must
    # leave SAGD's map as it was, log each round, and bring the poses closer to the truth.
    volume = molecule.synthetic_molecule(24, 8.0)
    images, table = next(simulate.simulate_chunks(volume, 8.0, 160, snr=0.5, seed=3,
                                                  shift_sigma_A=0.0))
    images = ((images - images.mean()) / images[:, :3].std()).astype(np.float32)
    ctf = {"defocus_u": table.rlnDefocusU.to_numpy(), "defocus_v": table.rlnDefocusV.to_numpy(),
           "defocus_angle": table.rlnDefocusAngle.to_numpy(), "voltage": 300.0, "cs": 2.7,
           "amplitude_contrast": 0.1}
    true = geometry.euler_to_matrix(table.rlnAngleRot.to_numpy(), table.rlnAngleTilt.to_numpy(),
                                    table.rlnAnglePsi.to_numpy())
    rows = np.arange(len(images))
    section = default_reconstruction_config(minibatch_size=40, max_iterations=4,
                                            min_iterations=4, heldout_every=4)
    config = StageConfig.from_config(section, 1, 1)

    def stage(rounds, lines):
        return run_stage(volume, images, ctf, 1.0, 8.0, 30.0, rows[20:], rows[:20], config,
                         log=lines.append, scale_start=True, refine_rounds=rounds)

    plain_lines, refined_lines = [], []
    plain, refined = stage(0, plain_lines), stage(2, refined_lines)
    np.testing.assert_array_equal(refined.volume, plain.volume)
    assert not any("refinement round" in line for line in plain_lines)
    assert sum("refinement round" in line for line in refined_lines) == 2
    assert any(line.startswith("refinement round 2 of 2") for line in refined_lines)
    assert np.isfinite(refined.nll).all() and np.isfinite(refined.rotations).all()
    errors, _ = validation.pose_errors(true, refined.rotations)
    before, _ = validation.pose_errors(true, plain.rotations)
    # Measured: median error 14.0 deg after the stage's pass, 12.5 after two rounds; within
    # 30 deg 84% and 89% (the 30 A grid's directions are ~15 deg apart).
    assert np.median(errors) < np.median(before)
    assert np.mean(errors < 30) > 0.85
