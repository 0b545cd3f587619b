"""SAGD, the priors and the random start, on problems with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import nnls

from cryoday.initial import random_blobs, resample_volume
from cryoday.priors import make_prior
from cryoday.sagd import SAGD


@pytest.mark.parametrize("kind", ["exponential", "gaussian", "smoothness"])
def test_prior_gradients_match_finite_differences(rng, kind):
    prior = make_prior(kind, reference_density=0.5, strength=2.0)
    v = rng.uniform(0.1, 1.0, (8, 8, 8))
    value, grad = prior.value_and_grad(v)
    d = rng.standard_normal(v.shape)
    h = 1e-5
    numeric = (prior.value_and_grad(v + h * d)[0] - prior.value_and_grad(v - h * d)[0]) / (2 * h)
    assert np.sum(grad * d) == pytest.approx(numeric, rel=1e-4)
    assert value >= 0


def test_exponential_prior_value():
    prior = make_prior("exponential", reference_density=2.0, strength=1.0)
    assert prior.value_and_grad(np.ones((2, 2, 2)))[0] == pytest.approx(0.45 * 8)


def nnls_problem(rng, n_batches=6, rows=20, n=27):
    a = rng.standard_normal((n_batches * rows, n))
    x_true = np.maximum(rng.standard_normal(n), 0)
    b = a @ x_true + 0.1 * rng.standard_normal(len(a))
    blocks = np.array_split(np.arange(len(a)), n_batches)

    def objective(v, batch_id, want_grad):
        x = v.ravel().astype(np.float64)
        rows_ = blocks[batch_id]
        r = a[rows_] @ x - b[rows_]
        f = 0.5 * float(r @ r) / len(rows_)
        g = (a[rows_].T @ r / len(rows_)).reshape(v.shape).astype(np.float32) if want_grad else None
        return f, g

    return a, b, objective


def test_sagd_converges_to_the_nonnegative_least_squares_optimum(rng):
    a, b, objective = nnls_problem(rng)
    optimum = nnls(a, b)[0]
    opt = SAGD(6, (3, 3, 3), eps=1.0, seed=1)
    v = np.zeros((3, 3, 3), np.float32)
    for _ in range(3000):
        v, figures = opt.step(v, opt.next_batch(), objective)
    assert np.allclose(v.ravel(), optimum, atol=0.05 * np.abs(optimum).max())
    assert (v >= 0).all()


def test_line_search_meets_its_condition(rng):
    _, _, objective = nnls_problem(rng)
    opt = SAGD(6, (3, 3, 3), L=1e-3)
    v = np.full((3, 3, 3), 0.5, np.float32)
    f0, g = objective(v, 0, True)
    opt._line_search(v, f0, g, objective, 0)
    f1, _ = objective(np.maximum(v - g / opt.L, 0), 0, False)
    assert f1 <= f0 - np.sum(g.astype(np.float64) ** 2) / (2 * opt.L)
    assert opt.L > 1e-3


def test_save_and_restore_continue_the_same_trajectory(rng, tmp_path):
    _, _, objective = nnls_problem(rng)
    opt = SAGD(6, (3, 3, 3), seed=3)
    v = np.zeros((3, 3, 3), np.float32)
    for _ in range(10):
        v, _ = opt.step(v, opt.next_batch(), objective)
    opt.save(tmp_path / "s.npz", volume=v)
    restored, extra = SAGD.load(tmp_path / "s.npz")
    w = extra["volume"]
    for _ in range(10):
        v, _ = opt.step(v, opt.next_batch(), objective)
        w, _ = restored.step(w, restored.next_batch(), objective)
    assert np.array_equal(v, w)


def test_random_start_is_seeded_nonnegative_and_inside_the_particle():
    a = random_blobs(32, 3.0, seed=1)
    assert np.array_equal(a, random_blobs(32, 3.0, seed=1))
    assert not np.array_equal(a, random_blobs(32, 3.0, seed=2))
    assert a.min() >= 0 and a.max() == pytest.approx(1.0)
    k = np.arange(32) - 16
    r = np.sqrt(sum(g**2 for g in np.meshgrid(k, k, k, indexing="ij")))
    assert a[r > 15].max() < 0.05  # particle diameter 0.6 x box: nothing at the box edge
    assert resample_volume(a, 16).shape == (16, 16, 16)


def test_line_search_accepts_a_step_when_the_clip_holds_most_voxels_at_zero():
    # f(V) = |V - T|^2 / 2 + sum(V) (an exponential prior): at V = 0 on the solvent the gradient
    # is +1 and the clip keeps V there. f is 1-smooth, so L ~ 1 must be accepted; the old test
    # |g|^2 / 2L counted the solvent's gradient and no L passed it.
    from cryoday.sagd import SAGD

    target = np.zeros((8, 8, 8), np.float32)
    target[3:5, 3:5, 3:5] = 3.0
    start = np.zeros_like(target)

    def objective(volume, batch_id, want_grad):
        diff = volume.astype(np.float64) - target
        value = 0.5 * float(np.sum(diff * diff)) + float(np.sum(volume))
        return value, ((diff + 1.0).astype(np.float32) if want_grad else None)

    sagd = SAGD(1, target.shape, eps=1.0, L=1.0)
    volume, figures = sagd.step(start, 0, objective)
    assert figures["L"] <= 2.0
    assert np.allclose(volume, np.maximum(target - 1.0, 0))  # the exact minimiser, in one step
