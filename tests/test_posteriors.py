"""The column passes of the posteriors against their dense numpy twin, and their exp."""

from __future__ import annotations

import numpy as np
from reference import column_posteriors, elementwise

from cryoday.posteriors import (
    column_logits,
    exp32,
    exp_columns,
    image_maximum,
    image_posteriors,
    scale_columns,
    sum_over_shifts,
)


def test_exp32_matches_numpy():
    """Relative error below 1e-6 from 0 down to -87, where it is clamped (e^-87 is the
    smallest value it returns, still a normal float32)."""
    exp = elementwise(exp32)
    x = -np.random.default_rng(1).uniform(0.0, 87.0, 200_000).astype(np.float32)
    x[:3] = [0.0, -1e-7, -86.99]
    assert np.max(np.abs(exp(x) / np.exp(x.astype(np.float64)) - 1.0)) < 1e-6
    assert exp(np.array([0.0], np.float32))[0] == 1.0
    floor = exp(np.array([-87.0, -100.0, -1e30], np.float32))
    assert np.all(floor == floor[0]) and 0 < floor[0] < 2e-38
    assert np.isnan(exp(np.array([np.nan], np.float32))[0])


def test_column_passes_match_a_dense_log_sum_exp():
    """Three images side by side with ragged in-plane angles and shifts: their nll constants,
    rotation and shift marginals, best poses and gradient weights against numpy."""
    rng = np.random.default_rng(3)
    n_d = 37
    layout = [(5, 1), (3, 4), (7, 2)]  # (in-plane angles, shifts) per image
    inv = [0.02, 0.05, 0.01]  # 1 / (2 s2)
    n_q = sum(p for p, _ in layout)
    n_c = sum(p * s for p, s in layout)
    cross = rng.normal(0.0, 40.0, (n_d, n_c)).astype(np.float32)
    norm = rng.uniform(0.0, 200.0, (n_d, n_q)).astype(np.float32)
    dir_lw = rng.normal(0.0, 1.0, n_d)
    col_lw = np.empty(n_c, np.float32)
    col_inv = np.empty(n_c, np.float32)
    norm_col = np.empty(n_c, np.uint64)
    run = np.empty(n_q, np.int64)
    c_start, q_start = [0], [0]
    priors = []
    for (n_p, n_s), inv_i in zip(layout, inv):
        inp_lw, sh_lw = rng.normal(0, 1, n_p), rng.normal(0, 1, n_s)
        priors.append((inp_lw, sh_lw))
        c0, q0 = c_start[-1], q_start[-1]
        for p in range(n_p):
            run[q0 + p] = n_s
            for j in range(n_s):
                c = c0 + p * n_s + j
                col_lw[c], col_inv[c], norm_col[c] = inp_lw[p] + sh_lw[j], inv_i, q0 + p
        c_start.append(c0 + n_p * n_s)
        q_start.append(q0 + n_p)

    v = cross.copy()
    col_max = np.empty(n_c, np.float32)
    column_logits(v, norm, norm_col, False, col_lw, col_inv, dir_lw, col_max)
    col_ref = np.empty(n_c, np.float32)
    maxima = [image_maximum(col_max, c_start[u], c_start[u + 1], col_ref) for u in range(3)]
    col_sum = np.empty(n_c)
    exp_columns(v, col_ref, col_sum)
    factor = np.empty(n_c, np.float32)
    for u, ((n_p, n_s), inv_i, (inp_lw, sh_lw)) in enumerate(zip(layout, inv, priors)):
        c0, c1, q0 = c_start[u], c_start[u + 1], q_start[u]
        rot_post, shift_post = np.empty(n_d * n_p), np.empty(n_s)
        total, best_a, best_c = image_posteriors(v, c0, n_p, n_s, col_max, col_sum, rot_post,
                                                 shift_post)
        # The dense float64 twin: every (direction, in-plane angle, shift).
        lse, rot_ref, shift_ref, best = column_posteriors(
            cross[:, c0:c1].reshape(n_d, n_p, n_s), norm[:, q0:q0 + n_p], dir_lw, inp_lw,
            sh_lw, inv_i)
        # float32 log posteriors and exponentials: 1e-5 relative.
        assert abs(maxima[u] + np.log(total) - lse) < 1e-5 * max(1.0, abs(lse))
        assert np.allclose(rot_post, rot_ref, rtol=1e-5, atol=1e-12)
        assert np.allclose(shift_post, shift_ref, rtol=1e-5)
        assert (best_a, best_c) == best
        factor[c0:c1] = 1.0 / total
    scale_columns(v, factor)
    gamma_dp = np.empty((n_d, n_q), np.float32)
    sum_over_shifts(v, run, gamma_dp)
    for u, (n_p, n_s) in enumerate(layout):
        logit_u = v[:, c_start[u]:c_start[u + 1]].reshape(n_d, n_p, n_s)
        assert abs(logit_u.sum() - 1.0) < 1e-5  # normalised gradient weights
        assert np.allclose(gamma_dp[:, q_start[u]:q_start[u + 1]], logit_u.sum(2), atol=1e-7)


def test_contiguous_norm_columns_equal_the_gathered_ones():
    """``contiguous`` (one shift per in-plane angle) only skips the norm column gather."""
    rng = np.random.default_rng(4)
    cross = rng.normal(0, 10, (9, 12)).astype(np.float32)
    norm = rng.uniform(0, 50, (9, 12)).astype(np.float32)
    norm_col = np.arange(12, dtype=np.uint64)
    col_lw = rng.normal(0, 1, 12).astype(np.float32)
    out = []
    for contiguous in (True, False):
        v, col_max = cross.copy(), np.empty(12, np.float32)
        column_logits(v, norm, norm_col, contiguous, col_lw, np.full(12, 0.1, np.float32),
                      np.zeros(9), col_max)
        out.append((v, col_max))
    assert np.array_equal(out[0][0], out[1][0]) and np.array_equal(out[0][1], out[1][1])
    assert np.allclose(out[0][0], col_lw + (2 * cross - norm) * np.float32(0.1), rtol=1e-5,
                       atol=1e-5)
    assert np.array_equal(out[0][1], out[0][0].max(axis=0))


def test_tiny_posteriors_are_flushed_not_subnormal():
    v = np.array([[1.0, 1e-20, 1e-35]], np.float32)
    scale_columns(v, np.array([1.0, 1e-12, 1.0], np.float32))
    assert v[0, 0] == 1.0 and v[0, 1] == 0.0 and v[0, 2] == 0.0


def test_merged_norm_columns():
    """A norm matrix with no columns: the cross terms already hold cross - norm / 2."""
    rng = np.random.default_rng(6)
    v = rng.normal(0, 10, (5, 8)).astype(np.float32)
    expected = np.float32(0.3) + (2 * v) * np.float32(0.05)
    col_max = np.empty(8, np.float32)
    column_logits(v, np.empty((5, 0), np.float32), np.zeros(8, np.uint64), True,
                  np.full(8, 0.3, np.float32), np.full(8, 0.05, np.float32), np.zeros(5),
                  col_max)
    assert np.allclose(v, expected, rtol=1e-6) and np.array_equal(col_max, v.max(axis=0))


def test_exponentials_far_below_the_best_are_exactly_zero():
    v = np.array([[0.0, -10.0, -59.9, -60.5, -1e4]], np.float32)
    col_sum = np.empty(5)
    exp_columns(v, np.zeros(5, np.float32), col_sum)
    assert v[0, 0] == 1.0 and 0 < v[0, 2] < 1e-25
    assert v[0, 3] == 0.0 and v[0, 4] == 0.0 and np.array_equal(col_sum, v[0].astype(float))


def test_a_nan_energy_makes_its_image_maximum_nan():
    """Bad input surfaces in the nll: a NaN among an image's log posteriors (here in a row long
    enough for the vectorised loops) makes its column maximum and its image's maximum NaN, which
    the nll carries, and leaves the other image's alone."""
    rng = np.random.default_rng(7)
    for contiguous, norm_cols in ((True, 40), (False, 8)):  # the two norm layouts
        v = rng.normal(0, 1, (9, 40)).astype(np.float32)
        v[4, 27] = np.nan
        col_max = np.empty(40, np.float32)
        norm_col = np.arange(40, dtype=np.uint64) * norm_cols // 40
        column_logits(v, np.zeros((9, norm_cols), np.float32), norm_col, contiguous,
                      np.zeros(40, np.float32), np.full(40, 0.5, np.float32), np.zeros(9),
                      col_max)
        assert np.isnan(col_max[27]) and np.isfinite(np.delete(col_max, 27)).all()
        col_ref = np.empty(40, np.float32)
        assert np.isfinite(image_maximum(col_max, 0, 20, col_ref))
        assert np.isnan(image_maximum(col_max, 20, 40, col_ref))
