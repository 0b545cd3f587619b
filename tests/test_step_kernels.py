"""The kernels that replaced numpy calls in every SAGD step and pose pass, each against the numpy
call it replaced or an exact reference: the store's top-K selection (``np.argpartition``), the
proposals' multinomial draws (``Generator.multinomial``: same law), SAGD's stored-gradient
average (``np.tensordot``) and the padded image transforms (a zero-padded ``numpy.fft``)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from cryoday._sagd_kernels import weighted_sum
from cryoday.batch import image_padded_size, padded_half_transforms
from cryoday.importance import proposals
from cryoday.importance._select import top_k_rows
from cryoday.importance.store import top_points
from cryoday.projection import SliceOperator


def sparse_rows(rng, n_rows=50, n=3000, nonzero=200):
    """Rows as the store sees them: a posterior over a large grid, zero but at the points the
    importance sample evaluated (argpartition's pathological case)."""
    p = np.zeros((n_rows, n))
    for row in p:
        row[rng.choice(n, nonzero, replace=False)] = rng.random(nonzero)
    return p


@pytest.mark.parametrize("kind", ["sparse", "dense", "increasing", "few_nonzero"])
def test_top_k_rows_keeps_the_largest_values(rng, kind):
    p = {"sparse": lambda: sparse_rows(rng),
         "dense": lambda: rng.random((40, 500)),
         "increasing": lambda: np.tile(np.arange(500.0), (5, 1)),
         "few_nonzero": lambda: sparse_rows(rng, nonzero=10)}[kind]()
    k = 32
    top = top_k_rows(p, k)
    assert top.shape == (len(p), k)
    assert all(len(set(row)) == k for row in top)  # k distinct points
    kept = np.sort(np.take_along_axis(p, top, axis=1), axis=1)
    expected = np.sort(np.take_along_axis(p, np.argpartition(p, -k, axis=1)[:, -k:], axis=1),
                       axis=1)
    np.testing.assert_array_equal(kept, expected)


def test_top_points_normalises_over_the_row_and_flags_unusable_rows(rng):
    p = sparse_rows(rng, n_rows=4)
    p[1] = 0.0
    p[2, 5] = np.nan
    top, logp, usable = top_points(p)
    assert usable.tolist() == [True, False, False, True]
    for r in (0, 3):
        np.testing.assert_allclose(np.exp(logp[r]), p[r, top[r]] / p[r].sum(), rtol=1e-12)


def test_top_k_rows_refuses_k_beyond_the_row():
    with pytest.raises(ValueError, match="must be in"):
        top_k_rows(np.ones((2, 5)), 6)


def test_multinomial_draws_follow_the_multinomial_law(rng):
    # Row b: m[b] draws from q[b]; zero-mass points are never drawn.
    n_rows, n = 4000, 6
    q = np.array([0.4, 0.0, 0.25, 0.2, 0.0, 0.15])
    m = np.full(n_rows, 12)
    flat, count = proposals.multinomial_draws(np.broadcast_to(q, (n_rows, n)), m, rng)
    assert np.all(np.diff(flat) > 0)  # distinct, increasing
    counts = np.bincount(flat, weights=count, minlength=n_rows * n).reshape(n_rows, n)
    assert np.all(counts.sum(axis=1) == 12)
    assert counts[:, [1, 4]].sum() == 0
    # Per category the counts are Binomial(12, q): mean within 4 standard errors, and the
    # category totals pass a chi-square test against 12 n_rows q (p > 1e-4).
    mean, se = counts.mean(axis=0), np.sqrt(12 * q * (1 - q) / n_rows)
    assert np.all(np.abs(mean - 12 * q) <= 4 * se + 1e-12)
    positive = q > 0
    chi2 = stats.chisquare(counts.sum(axis=0)[positive], 12 * n_rows * q[positive])
    assert chi2.pvalue > 1e-4


def test_multinomial_draws_stay_in_their_row_at_rounding_edges(rng):
    # Rows whose last points carry no mass and a row of one point: every draw must land in its
    # own row on a point of positive mass, however the uniforms round.
    q = np.zeros((3, 5))
    q[0, :2] = [0.5, 0.5]
    q[1, 2] = 1.0
    q[2] = [0.1, 0.2, 0.3, 0.4, 0.0]
    m = np.array([1000, 1000, 1000])
    flat, count = proposals.multinomial_draws(q, m, rng)
    row, point = flat // 5, flat % 5
    assert np.all(q[row, point] > 0)
    assert np.bincount(row, weights=count).tolist() == [1000.0, 1000.0, 1000.0]


def test_multinomial_draws_are_reproducible_from_the_generator_state():
    q = np.full((3, 10), 0.1)
    m = np.array([5, 0, 7])
    a = proposals.multinomial_draws(q, m, np.random.default_rng(7))
    b = proposals.multinomial_draws(q, m, np.random.default_rng(7))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert np.all((a[0] // 10) != 1)  # the row of no draws has none


def test_weighted_sum_equals_tensordot(rng):
    stored = rng.standard_normal((30, 2, 17, 17, 17)).astype(np.float32)  # K = 2 classes
    weights = rng.random(30)
    weights[::4] = 0.0
    weights /= weights.sum()
    got = weighted_sum(weights, stored)
    expected = np.tensordot(weights, stored.astype(np.float64), axes=1)
    assert got.dtype == np.float32 and got.shape == stored.shape[1:]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("box, radius", [(24, 9.6), (31, 12.0)])
def test_padded_transforms_are_the_padded_fft_near_the_origin(rng, box, radius):
    """The kx >= 0 half of the window |kx|, |ky| <= h of the padded array's FFT."""
    op = SliceOperator(box, radius)
    images = rng.standard_normal((3, box, box)).astype(np.float32)
    out = padded_half_transforms(op, images)
    m = image_padded_size(box)
    h = out.shape[-1] - 1
    assert out.shape == (3, 2 * h + 1, h + 1)
    pos = np.arange(box) - box // 2
    g = np.sinc(pos / m) ** 2
    for image, got in zip(images, out):
        big = np.zeros((m, m))
        lo = m // 2 - box // 2
        big[lo:lo + box, lo:lo + box] = image / np.outer(g, g)
        # Unitary on the padded array and m / box times larger (see padded_half_transforms).
        spectrum = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(big))) / m * (m / box)
        window = spectrum[m // 2 - h:m // 2 + h + 1, m // 2:m // 2 + h + 1]
        np.testing.assert_allclose(got, window, atol=2e-5 * np.abs(window).max())


def test_batch_ctf_equals_evaluate_ctf(rng):
    """make_batch's CTF kernel against ``ctf.evaluate_ctf`` (numpy), per image: a defocus each,
    astigmatism, B-factor and phase shift."""
    from cryoday.batch import make_batch
    from cryoday.ctf import evaluate_ctf

    op, n, psize = SliceOperator(40, 18.0), 5, 2.3
    params = {"defocus_u": rng.uniform(5e3, 3e4, n), "defocus_v": rng.uniform(5e3, 3e4, n),
              "defocus_angle": rng.uniform(0, 180, n), "voltage": 300.0, "cs": 2.7,
              "amplitude_contrast": 0.07, "bfactor": rng.uniform(0, 150, n),
              "phase_shift": rng.uniform(0, 90, n)}
    batch = make_batch(op, rng.standard_normal((n, 40, 40)).astype(np.float32), params, psize,
                       1.0, padded=False)
    scale = 1.0 / (40 * psize)
    expected = evaluate_ctf(op.kx * scale, op.ky * scale, **params)
    assert batch.ctf.shape == (n, op.n_coef) and batch.ctf.dtype == np.float32
    np.testing.assert_allclose(batch.ctf, expected, atol=1e-5)  # float32 phases of ~30 rad
