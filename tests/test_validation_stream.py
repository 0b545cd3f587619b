"""Validation's passes over particles stream in chunks and give the figures the one-shot
computation gave."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from cryoday import io, molecule, simulate
from cryoday.geometry import euler_to_matrix
from cryoday.validation import pose_error_figures, pose_errors, pose_errors_from_angles


def _one_shot_pose_errors(true_rotations, estimated):
    """validation.pose_errors as it was before streaming (every particle's matrices at once)."""
    flip = np.diag([1.0, 1.0, -1.0])
    best = None
    for mirrored in (False, True):
        a = flip @ true_rotations @ flip if mirrored else true_rotations
        m = np.einsum("nji,njk->ik", estimated, a)
        u, _, vt = np.linalg.svd(m)
        r = u @ np.diag([1, 1, np.linalg.det(u @ vt)]) @ vt
        relative = np.einsum("nij,jk,nlk->nil", estimated, r, a)
        cos = np.clip((np.trace(relative, axis1=1, axis2=2) - 1) / 2, -1, 1)
        errors = np.degrees(np.arccos(cos))
        if best is None or np.median(errors) < np.median(best[0]):
            best = (errors, mirrored)
    return best


def _poses(n, mirrored, seed):
    rng = np.random.default_rng(seed)
    true = Rotation.random(n, random_state=seed).as_matrix()
    jitter = Rotation.from_rotvec(rng.normal(0, 0.05, (n, 3))).as_matrix()
    r = Rotation.random(random_state=seed + 1).as_matrix()
    flip = np.diag([1.0, 1.0, -1.0])
    base = flip @ true @ flip if mirrored else true
    return true, jitter @ base @ r.T


@pytest.mark.parametrize("mirrored", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 7, 64, 10_000])
def test_chunked_pose_errors_equal_the_one_shot_ones(mirrored, chunk_size):
    true, estimated = _poses(301, mirrored, seed=3)
    expected, expected_hand = _one_shot_pose_errors(true, estimated)
    errors, hand = pose_errors(true, estimated, chunk_size=chunk_size)
    assert hand == expected_hand == mirrored
    # Only the order of the 3 x 3 sums differs: float64 rounding, far below any reported digit.
    np.testing.assert_allclose(errors, expected, rtol=0, atol=1e-9)
    assert np.median(errors) == pytest.approx(np.median(expected), abs=1e-9)


def test_errors_from_angles_equal_errors_from_matrices():
    rng = np.random.default_rng(4)
    n = 257
    true_angles = (rng.uniform(-180, 180, n), rng.uniform(0, 180, n), rng.uniform(-180, 180, n))
    est_angles = tuple(a + rng.normal(0, 2.0, n) for a in true_angles)
    expected, hand = _one_shot_pose_errors(euler_to_matrix(*true_angles),
                                           euler_to_matrix(*est_angles))
    errors, streamed_hand = pose_errors_from_angles(true_angles, est_angles, chunk_size=10)
    assert streamed_hand == hand
    np.testing.assert_allclose(errors, expected, rtol=0, atol=1e-9)
    assert 0.5 < np.median(errors) < 10  # 2-degree jitter per angle: a few degrees, not zero


def test_pose_error_figures_do_not_depend_on_the_chunk(tmp_path):
    volume = molecule.synthetic_molecule(16, 5.0)
    chunks = list(simulate.simulate_chunks(volume, 5.0, 60, snr=1.0, seed=2))
    truth = chunks[0][1]
    truth["rlnImageName"] = [f"{i + 1:06d}@particles.mrcs" for i in range(len(truth))]
    estimated = truth.copy()
    rng = np.random.default_rng(6)
    for column in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"):
        estimated[column] = estimated[column] + rng.normal(0, 3.0, len(truth))
    optics = simulate.optics_table(5.0, 16, 300.0, 2.7, 0.1)
    io.write_particles(tmp_path / "truth.star", truth, optics)
    io.write_particles(tmp_path / "final.star", estimated, optics)
    whole = pose_error_figures(tmp_path / "truth.star", tmp_path / "final.star", 5.0,
                               chunk_size=10**6)
    chunked = pose_error_figures(tmp_path / "truth.star", tmp_path / "final.star", 5.0,
                                 chunk_size=7)
    assert chunked["pose_error_histogram"] == whole["pose_error_histogram"]
    assert chunked["pose_error_hand_flipped"] == whole["pose_error_hand_flipped"] is False
    assert chunked["pose_error_median_deg"] == pytest.approx(whole["pose_error_median_deg"],
                                                             abs=1e-9)
    assert sum(whole["pose_error_histogram"]) == 60 and whole["pose_error_median_deg"] > 0.5
