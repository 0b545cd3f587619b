"""Validation figures against independent checks on synthetic data."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from cryoday import molecule, simulate
from cryoday.align import _transform, fsc_after_alignment
from cryoday.fsc import fsc, resolution_at
from cryoday.validation import pose_errors


def test_fsc_of_identical_maps_is_one(rng):
    v = rng.standard_normal((16, 16, 16))
    freq, curve = fsc(v, v, 2.0)
    assert np.allclose(curve, 1.0)
    assert freq[1] == pytest.approx(1 / 32)


def test_fsc_of_noisy_copies_follows_the_snr(rng):
    # Two copies with independent white noise of equal power to the signal per shell
    # (SNR 1 with a white signal): expected FSC = SNR / (1 + SNR) = 0.5 in every shell.
    signal = rng.standard_normal((32, 32, 32))
    a = signal + rng.standard_normal(signal.shape)
    b = signal + rng.standard_normal(signal.shape)
    _, curve = fsc(a, b, 1.0)
    assert np.abs(curve[4:] - 0.5).max() < 0.1
    assert np.mean(curve[4:]) == pytest.approx(0.5, abs=0.02)


def test_alignment_recovers_rotation_shift_and_hand():
    v = molecule.synthetic_molecule(32, 5.0)
    rotation = simulate.random_rotations(1, np.random.default_rng(7))[0]
    moved = _transform(np.ascontiguousarray(v[::-1], dtype=np.float64), rotation,
                       np.array([1.5, -2.0, 1.0]), order=3).astype(np.float32)
    alignment, _freq, _curve, res = fsc_after_alignment(moved, v, 5.0)
    assert alignment.flipped
    # Cubic resampling of a map with one-pixel features costs a few percent of correlation.
    assert alignment.correlation > 0.93
    assert res < 4 * 5.0
    # Undoing a mirror (J flips z) then R: the rotation found is J R^T J.
    mirror = np.diag([1.0, 1.0, -1.0])
    expected = mirror @ rotation.T @ mirror
    assert np.degrees(Rotation.from_matrix(alignment.rotation @ expected.T).magnitude()) < 3.0


@pytest.mark.parametrize("seed", [7, 11])
def test_alignment_finds_the_known_rotation_and_shift(seed):
    # moved(x) = v(R^T (x - c - t) + c) is undone by R^T and the shift -R^T t, exactly.
    v = molecule.synthetic_molecule(32, 5.0)
    rotation = simulate.random_rotations(1, np.random.default_rng(seed))[0]
    shift = np.array([1.5, -2.0, 1.0])
    moved = _transform(np.ascontiguousarray(v, dtype=np.float64), rotation, shift,
                       order=3).astype(np.float32)
    alignment, _, _, _ = fsc_after_alignment(moved, v, 5.0)
    assert not alignment.flipped
    error_deg = np.degrees(Rotation.from_matrix(alignment.rotation @ rotation).magnitude())
    assert error_deg < 3.0  # the local refinement's tolerance; the search grid is 15 degrees
    assert np.allclose(alignment.shift_px, -rotation.T @ shift, atol=0.25)


def test_pose_errors_after_a_global_rotation_and_hand():
    rng = np.random.default_rng(3)
    true = simulate.random_rotations(500, rng)
    r = simulate.random_rotations(1, rng)[0]
    errors, mirrored = pose_errors(true, true @ r.T)
    assert not mirrored and np.median(errors) < 1e-4
    flip = np.diag([1.0, 1.0, -1.0])
    errors, mirrored = pose_errors(true, flip @ true @ flip @ r.T)
    assert mirrored and np.median(errors) < 1e-4
    # Known perturbations of 5 degrees about random axes come back as 5 degrees.
    axes = rng.standard_normal((500, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    from scipy.spatial.transform import Rotation

    jitter = Rotation.from_rotvec(np.radians(5) * axes).as_matrix()
    errors, _ = pose_errors(true, jitter @ true @ r.T)
    assert np.median(errors) == pytest.approx(5.0, abs=0.5)


def test_pose_errors_fit_the_frame_on_the_particles_it_explains():
    # As on hard data: 30% of the poses right (2 degrees of jitter), 20% turned by one fixed
    # 60-degree rotation (a pseudo-symmetric view's confusion), the rest random. The frame must come from
    # the right 30%; the plain average of B_i^T A_i (the old fit) lies between the two
    # clusters, which the last assertion checks it still would.
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(5)
    n, right, turned = 5000, 1500, 1000
    true = simulate.random_rotations(n, rng)
    r = simulate.random_rotations(1, rng)[0]
    estimated = simulate.random_rotations(n, rng)
    axes = rng.standard_normal((right, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    jitter = Rotation.from_rotvec(np.radians(2) * axes).as_matrix()
    estimated[:right] = jitter @ true[:right] @ r.T
    turn = Rotation.from_rotvec(np.radians(60) * np.array([1.0, 0, 0])).as_matrix()
    estimated[right:right + turned] = true[right:right + turned] @ turn @ r.T
    errors, mirrored = pose_errors(true, estimated)
    assert not mirrored
    assert np.median(errors[:right]) == pytest.approx(2.0, abs=0.3)
    assert np.all(errors[right:right + turned] > 50)
    m = np.einsum("nji,njk->ik", estimated, true)
    u, _, vt = np.linalg.svd(m)
    average = u @ np.diag([1, 1, np.linalg.det(u @ vt)]) @ vt
    cos = (np.trace(average.T @ r) - 1) / 2  # angle between the plain fit and the truth
    assert np.degrees(np.arccos(np.clip(cos, -1, 1))) > 20


def test_resolution_at_interpolates_the_crossing():
    freq = np.linspace(0, 0.5, 11)
    curve = np.clip(1 - 2 * freq, 0, 1)  # crosses 0.143 at f = 0.4285
    assert resolution_at(freq, curve, 0.143) == pytest.approx(1 / 0.4285, rel=1e-3)


def test_pose_error_figures_leave_out_simulated_junk(tmp_path):
    # Particles get their true poses back, junk rows (most of them) random ones: only with the
    # junk left out is the median error zero and the histogram the particles' count.
    from cryoday import io
    from cryoday.validation import pose_error_figures

    volume = molecule.synthetic_molecule(16, 5.0)
    chunks = list(simulate.simulate_chunks(volume, 5.0, 40, snr=1.0, seed=2, junk_fraction=0.6,
                                           junk_kind="noise"))
    truth = chunks[0][1]
    truth["rlnImageName"] = [f"{i + 1:06d}@particles.mrcs" for i in range(len(truth))]
    junk = truth[simulate.JUNK_COLUMN].to_numpy() != simulate.JUNK_NONE
    assert junk.sum() == 24
    estimated = truth.drop(columns=[simulate.JUNK_COLUMN])
    rng = np.random.default_rng(5)
    for column, high in (("rlnAngleRot", 180), ("rlnAngleTilt", 180), ("rlnAnglePsi", 180)):
        estimated.loc[junk, column] = rng.uniform(-high, high, junk.sum())
    optics = simulate.optics_table(5.0, 16, 300.0, 2.7, 0.1)
    io.write_particles(tmp_path / "truth.star", truth, optics)
    io.write_particles(tmp_path / "final.star", estimated, optics)

    figures = pose_error_figures(tmp_path / "truth.star", tmp_path / "final.star", 5.0)
    assert figures["pose_error_median_deg"] < 1e-3
    assert not figures["pose_error_hand_flipped"]
    assert sum(figures["pose_error_histogram"]) == 16
    assert figures["pose_error_histogram"][0] == 16

    # Without the junk column every row counts, and the random ones dominate the median.
    io.write_particles(tmp_path / "truth.star", truth.drop(columns=[simulate.JUNK_COLUMN]), optics)
    figures = pose_error_figures(tmp_path / "truth.star", tmp_path / "final.star", 5.0)
    assert sum(figures["pose_error_histogram"]) == 40
    assert figures["pose_error_median_deg"] > 10
