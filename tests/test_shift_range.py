"""The shift range follows the data: the prior's sigma is learned from shift posteriors, the
grid widens when they pile up at its edge, and a stage chain on off-centre particles recovers
their shifts better than the former fixed range."""

import math
from types import SimpleNamespace

import numpy as np
import pytest

from cryoday import initial, molecule, preprocess, shift_range, simulate
from cryoday.fourier import fourier_crop_2d
from cryoday.importance.store import PosteriorStore, top_points
from cryoday.quadrature import shift_grid
from cryoday.stage import run_stage
from cryoday.stage_config import StageConfig, default_reconstruction_config


def _grid(radius_A, step_A=2.0, prior_sigma_A=10.0, pixel_size=1.0):
    shifts, logw, step = shift_grid(2 * step_A, pixel_size, 1.0, prior_sigma_A, 1e9, radius_A)
    return SimpleNamespace(shifts=shifts, shift_log_weights=logw, shift_step_px=step,
                           pixel_size=pixel_size, n_shift=len(shifts))


def _posteriors(grid, true_A, width_A, seed=99):
    """A store holding each particle's posterior on ``grid``: the grid's prior times a Gaussian
    likelihood of width ``width_A`` about a noisy measurement of its true shift (top K kept, as
    the sampler keeps them)."""
    points = grid.shifts * grid.pixel_size
    seen = true_A + np.random.default_rng(seed).normal(scale=width_A, size=true_A.shape)
    d2 = np.sum((points[None] - seen[:, None]) ** 2, axis=2)
    logp = grid.shift_log_weights[None] - d2 / (2 * width_A**2)
    p = np.exp(logp - logp.max(axis=1, keepdims=True))
    top, logq, usable = top_points(p)
    store = PosteriorStore(len(true_A))
    n = top.shape[1]
    store.has[:] = usable
    store.shift_A[:, :n] = points[top]
    store.shift_logp[:, :n] = logq
    return store


def _fixed_point(true_A, radius_A, width_A, start_sigma=10.0, rounds=8):
    """EM over stages on one grid: each round's prior is the last round's estimate."""
    sigma = start_sigma
    for _ in range(rounds):
        grid = _grid(radius_A, prior_sigma_A=sigma)
        used = shift_range.ShiftRange(sigma, radius_A, "test")
        est = shift_range.estimate(_posteriors(grid, true_A, width_A), grid, used)
        sigma = est.sigma_A
    return est


def test_fit_sigma_inverts_the_grid_priors_second_moment():
    points = _grid(30.0).shifts
    for sigma in (3.0, 8.0, 15.0, 40.0):
        w = np.exp(-np.sum(points**2, 1) / (2 * sigma**2))
        m2 = float(w @ np.sum(points**2, 1) / w.sum())
        assert shift_range.fit_sigma(points, m2) == pytest.approx(sigma, rel=1e-6)
    assert shift_range.fit_sigma(points, np.sum(points**2, 1).mean()) == math.inf
    assert shift_range.fit_sigma(points, 0.0) == 0.0


@pytest.mark.parametrize("sigma_true", [6.0, 12.0])
def test_the_estimate_recovers_a_known_sigma_from_shift_posteriors(sigma_true):
    rng = np.random.default_rng(0)
    true_A = rng.normal(scale=sigma_true, size=(3000, 2))
    # Broad posteriors (width 5 A, more points than the store keeps) and a prior off by a lot.
    est = _fixed_point(true_A, radius_A=60.0, width_A=5.0, start_sigma=20.0)
    assert est.sigma_A == pytest.approx(sigma_true, rel=0.10)
    # One EM step from a wrong prior already moves most of the way.
    grid = _grid(60.0, prior_sigma_A=20.0)
    one = shift_range.estimate(_posteriors(grid, true_A, 2.0), grid,
                               shift_range.ShiftRange(20.0, 60.0, "test"))
    assert abs(one.sigma_A - sigma_true) < 0.15 * sigma_true
    assert not one.crowded and one.edge_fraction < 0.01


def test_truncation_is_detected_and_widens_the_next_grid_and_a_covering_grid_is_left_alone():
    rng = np.random.default_rng(1)
    true_A = rng.normal(scale=12.0, size=(3000, 2))
    small = _grid(20.0, prior_sigma_A=8.0)
    est = shift_range.estimate(_posteriors(small, true_A, 2.0), small,
                               shift_range.ShiftRange(8.0, 20.0, "test"))
    assert est.crowded and est.edge_fraction > 0.2
    # The truncation-aware fit does not take the grid's 20 A for the particles' reach.
    assert est.sigma_A > 11.0 and est.rms_A < est.sigma_A
    nxt = shift_range.choose(8.0, 400.0, est.state())
    # ... but grows by WIDEN per stage at most: a fit to posteriors piled at an edge diverges.
    assert nxt.radius_A == pytest.approx(shift_range.WIDEN * 20.0)
    assert nxt.sigma_A == pytest.approx(shift_range.WIDEN * 20.0 / shift_range.K_SIGMA)
    assert "widened" in nxt.reason
    wide = _grid(3 * 12.0, prior_sigma_A=12.0)
    ok = shift_range.estimate(_posteriors(wide, true_A, 2.0), wide,
                              shift_range.ShiftRange(12.0, 36.0, "test"))
    assert not ok.crowded, ok.summary()
    figures, warning = shift_range.edge_metrics(est.state())
    assert figures["shift_edge_crowded"] and "pile up at the edge" in warning
    assert shift_range.edge_metrics(ok.state())[1] is None
    assert shift_range.edge_metrics({}) == ({}, None)


def test_choose_starts_generous_floors_at_the_config_and_caps_at_the_box():
    first = shift_range.choose(10.0, 192.0, None)
    assert first.sigma_A == 10.0 and first.radius_A == pytest.approx(0.2 * 192.0)
    later = {"shift_sigma_A": 10.0, "shift_radius_A": 38.4, "shift_sigma_estimate_A": 4.0,
             "shift_edge_fraction": 0.0, "shift_edge_expected": 0.01, "shift_step_A": 5.0}
    assert shift_range.choose(10.0, 192.0, later).sigma_A == 10.0  # the config is the floor
    later["shift_sigma_estimate_A"] = math.inf
    later["shift_radius_A"] = 50.0
    huge = shift_range.choose(10.0, 192.0, later)
    assert huge.radius_A == pytest.approx(0.3 * 192.0) and "capped" in huge.reason


def _off_centre_set(n=600, box=40, pixel_size=4.0, shift_sigma_A=12.0):
    volume = molecule.synthetic_molecule(box, pixel_size)
    images, table = next(simulate.simulate_chunks(volume, pixel_size, n, snr=0.3,
                                                  shift_sigma_A=shift_sigma_A, seed=3,
                                                  chunk_size=n))
    images = ((images - images.mean()) / images[:, :3].std()).astype(np.float32)
    ctf = {"defocus_u": table.rlnDefocusU.to_numpy(), "defocus_v": table.rlnDefocusV.to_numpy(),
           "defocus_angle": table.rlnDefocusAngle.to_numpy(), "voltage": 300.0, "cs": 2.7,
           "amplitude_contrast": 0.1}
    truth = np.stack([table.rlnOriginXAngst, table.rlnOriginYAngst], axis=1)
    return volume, images, ctf, truth


def _two_stages(tmp_path, volume, images, ctf, pixel_size, lines):
    """Stages at 30 and 20 A from the true map, cropped as the workflow crops them (this tests
    the shift range, not ab initio)."""
    tmp_path.mkdir(exist_ok=True)
    section = default_reconstruction_config(minibatch_size=100, max_iterations=6,
                                            min_iterations=6, heldout_every=3)
    box = images.shape[1]
    rows = np.arange(len(images))
    state, start, results = None, volume, []
    for stage, res in ((1, 30.0), (2, 20.0)):
        stage_box, stage_pixel = preprocess.stage_box(box, pixel_size, res)
        result = run_stage(initial.resample_for_stage(start, stage_box),
                           fourier_crop_2d(images, stage_box), ctf, stage_box / box,
                           stage_pixel, res, rows[60:], rows[:60],
                           StageConfig.from_config(section, stage, 1), sagd_state=state,
                           log=lines.append, scale_start=stage == 1)
        state = tmp_path / f"state{stage}.npz"
        result.save_state(state)
        results.append((result, stage_pixel))
        start = result.volume
    return results


def test_a_stage_chain_widens_the_grid_and_recovers_far_off_centre_particles(tmp_path, monkeypatch):
    pixel_size = 4.0
    volume, images, ctf, truth = _off_centre_set(pixel_size=pixel_size)
    lines = []
    adaptive = _two_stages(tmp_path, volume, images, ctf, pixel_size, lines)
    # The former fixed range: the config's sigma, 2.5 sigma, whatever the data say.
    monkeypatch.setattr(shift_range, "choose", lambda sigma, box_A, previous:
                        shift_range.ShiftRange(sigma, 2.5 * sigma, "fixed"))
    fixed = _two_stages(tmp_path / "fixed", volume, images, ctf, pixel_size, [])

    def errors(stage):
        result, stage_pixel = stage
        return np.hypot(*(result.shifts_px * stage_pixel - truth).T)

    est2 = adaptive[1][0].shift_estimate
    assert est2.used.radius_A > 30.0, lines  # stage 2's grid widened beyond the fixed 25 A
    assert est2.sigma_A == pytest.approx(12.0, rel=0.25)
    assert adaptive[0][0].shift_estimate.crowded and not est2.crowded  # stage 1's 32 A was tight
    assert fixed[1][0].shift_estimate.crowded  # the former fixed 25 A grid: flagged
    err_a, err_f = errors(adaptive[1]), errors(fixed[1])
    far = np.hypot(*truth.T) > 25.0
    print(f"median shift error: adaptive {np.median(err_a):.1f} A, fixed {np.median(err_f):.1f} A;"
          f" beyond 25 A ({far.sum()} particles): {np.median(err_a[far]):.1f} vs "
          f"{np.median(err_f[far]):.1f} A; stage pixel {adaptive[1][1]:.1f} A,"
          f" near median {np.median(err_a[~far]):.1f} A")
    assert np.median(err_a) <= np.median(err_f)
    # Recovered: the widened grid finds the far particles about as well as the near ones (at
    # 20 A a stage pixel is ~8 A, so a median within a third of a pixel of theirs), while the
    # fixed grid, which cannot reach them, misses them by at least 40% more.
    near_a = np.median(err_a[~far])
    assert np.median(err_a[far]) < near_a + 0.35 * adaptive[1][1]
    assert np.median(err_f[far]) > 1.4 * np.median(err_a[far])
    assert any("shift prior sigma" in line and "estimated" in line for line in lines)
