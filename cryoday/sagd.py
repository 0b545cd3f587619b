"""Stochastic Average Gradient Descent with a line-searched Lipschitz step (paper Eq. 7-8).

One likelihood gradient is stored per minibatch (a fixed partition of the training images); the
step uses their running average, so every image's information enters each step while only one
minibatch is evaluated. Memory: ``n_batches x box^3 x 4`` bytes at the stage's box (at 128 px
and 46,000 images, 230 batches of a 76^3 stage volume cost 400 MB; of a 128^3 volume 1.9 GB).

Old stored gradients are down-weighted by ``mu_t = 1 - 1 / (1 + 0.1 t)`` as in the paper's code,
so early iterations behave like SGD (the stored gradients were computed at very different
volumes) and later ones like SAG. The step is ``eps / L`` with ``L`` from a backtracking line
search on the current minibatch (``f(x - g/L) <= f(x) - |g|^2 / (2L)``), run at the start and
every ``line_search_every`` iterations; between searches ``L`` decays slowly so it can shrink.
"""

from __future__ import annotations

import ast

import numpy as np

from cryoday._sagd_kernels import weighted_sum
from cryoday.records import read_npz, write_npz


class SAGD:
    """Optimiser state and steps.

    Parameters
    ----------
    n_batches : int
        Minibatches in the fixed partition.
    shape : tuple
        Volume shape (the stage's box^3).
    eps : float
        Learning rate multiplying ``1 / L``.
    L : float
        Initial Lipschitz estimate (searched on the first step anyway).
    line_search_every : int
    seed : int
        Seeds the minibatch order (reshuffled each epoch).
    """

    def __init__(self, n_batches: int, shape, eps: float = 1.0, L: float = 1.0,
                 line_search_every: int = 5, seed: int = 0):
        self.n_batches = int(n_batches)
        self.shape = tuple(shape)
        self.eps = float(eps)
        self.L = float(L)
        self.line_search_every = int(line_search_every)
        self.t = 0
        self.stored = np.zeros((self.n_batches,) + self.shape, dtype=np.float32)
        self.weight = np.zeros(self.n_batches, dtype=np.float64)
        self.rng = np.random.default_rng(seed)
        self._order: list[int] = []

    def next_batch(self) -> int:
        """The next minibatch of a reshuffled epoch."""
        if not self._order:
            self._order = list(self.rng.permutation(self.n_batches))
        return int(self._order.pop())

    def _line_search(self, volume, f0, grad, objective, batch_id, max_tries=20):
        """Double ``L`` until the projected step satisfies the descent condition.

        The test is the projected-gradient one, ``f(x+) <= f(x) + <g, d> + L/2 |d|^2`` with
        ``d = x+ - x`` after clipping at zero. The unconstrained ``f(x) - |g|^2 / 2L`` counts
        the gradient at voxels the clip holds at zero, so where much of the map is at zero (a
        real map's solvent) no ``L`` could satisfy it: L grew a millionfold and the step died.
        """
        grad64 = grad.astype(np.float64)
        if not np.any(grad64):
            return 0
        tries = 0
        while tries < max_tries:
            trial = np.maximum(volume - grad / self.L, 0).astype(np.float32)
            f1, _ = objective(trial, batch_id, False)
            tries += 1
            d = trial.astype(np.float64) - volume
            if f1 <= f0 + float(np.sum(grad64 * d)) + 0.5 * self.L * float(np.sum(d * d)):
                break
            self.L *= 2.0
        return tries

    def step(self, volume: np.ndarray, batch_id: int, objective, prior=None, n_train: int = 1):
        """One SAGD iteration on minibatch ``batch_id``.

        ``objective(volume, batch_id, want_grad) -> (f, grad)`` is the minibatch's mean negative
        log-likelihood and its gradient; ``prior.value_and_grad`` enters divided by ``n_train``.
        Returns the new (non-negative) volume and a dict of figures.
        """
        f, grad = objective(volume, batch_id, True)
        prior_value, prior_grad = (0.0, 0.0) if prior is None else prior.value_and_grad(volume)
        full_grad = grad + prior_grad / n_train
        figures = {"objective": float(f + prior_value / n_train), "line_search_evals": 0}
        if self.t % self.line_search_every == 0 or self.t < 2:
            objective_with_prior = _with_prior(objective, prior, n_train)
            figures["line_search_evals"] = self._line_search(volume, figures["objective"],
                                                             full_grad, objective_with_prior,
                                                             batch_id)
        else:
            self.L *= 2.0 ** (-1.0 / max(self.n_batches, 1))
        # SAG average with the code's decay of old gradients.
        mu = 1.0 - 1.0 / (1.0 + 0.1 * self.t)
        self.weight *= mu
        self.weight[batch_id] = 1.0
        self.stored[batch_id] = grad
        w = self.weight / self.weight.sum()
        average = weighted_sum(w, self.stored)
        step = self.eps / self.L
        new = np.maximum(volume - step * (average + prior_grad / n_train), 0).astype(np.float32)
        self.t += 1
        figures.update({"eps": self.eps, "L": self.L, "step": step})
        return new, figures

    def reset_for_new_stage(self, shape, eps: float):
        """Keep L's scale and the iteration count; stored gradients do not survive resampling."""
        self.shape = tuple(shape)
        self.stored = np.zeros((self.n_batches,) + self.shape, dtype=np.float32)
        self.weight[:] = 0.0
        self.eps = float(eps)
        self._order = []

    # ------------------------------------------------------------------ persistence

    def state(self) -> dict:
        """Everything the next step depends on: ``L``, ``t``, the stored gradients and their
        weights, what is left of this epoch's minibatch order and the generator that shuffles
        the next (its full bit-generator state), so a restored optimiser steps exactly as the
        saved one would have."""
        return {
            "n_batches": self.n_batches, "shape": np.array(self.shape), "eps": self.eps,
            "L": self.L, "line_search_every": self.line_search_every, "t": self.t,
            "stored": self.stored, "weight": self.weight,
            "order": np.array(self._order, dtype=np.int64),
            "rng": np.frombuffer(repr(self.rng.bit_generator.state).encode(), dtype=np.uint8),
        }

    def save(self, path, **extra) -> None:
        """Save to ``.npz`` atomically, with ``extra`` arrays beside the optimiser's."""
        write_npz(path, **self.state(), **extra)

    @classmethod
    def load(cls, path) -> tuple[SAGD, dict]:
        """Restore a saved optimiser; also returns the extra arrays saved with it (a state saved
        with the former ``seen`` flags returns those among them, unused)."""
        return cls.from_state(read_npz(path))

    @classmethod
    def from_state(cls, data: dict) -> tuple[SAGD, dict]:
        """The optimiser saved in ``data`` (the arrays of a saved ``.npz``) and the other arrays.

        Raises
        ------
        KeyError, ValueError
            A key is missing, or the arrays disagree with each other (stored gradients of
            another shape or number, a minibatch order naming minibatches that do not exist):
            a checkpoint that would otherwise fail later with an IndexError.
        """
        opt = cls(int(data["n_batches"]), tuple(int(s) for s in data["shape"]), float(data["eps"]),
                  float(data["L"]), int(data["line_search_every"]))
        opt.t = int(data["t"])
        opt.stored = data["stored"]
        opt.weight = data["weight"]
        opt._order = [int(b) for b in data["order"]]
        opt.rng.bit_generator.state = ast.literal_eval(bytes(data["rng"]).decode())
        if (opt.stored.shape != (opt.n_batches,) + opt.shape
                or opt.weight.shape != (opt.n_batches,)
                or any(not 0 <= b < opt.n_batches for b in opt._order)):
            raise ValueError(f"the optimiser's arrays disagree: {opt.n_batches} minibatches of "
                             f"shape {opt.shape}, stored gradients {opt.stored.shape}, weights "
                             f"{opt.weight.shape}, order {opt._order}")
        known = set(opt.state())
        return opt, {k: v for k, v in data.items() if k not in known}


def _with_prior(objective, prior, n_train):
    def wrapped(volume, batch_id, want_grad):
        f, g = objective(volume, batch_id, want_grad)
        if prior is not None:
            pv, pg = prior.value_and_grad(volume)
            f = f + pv / n_train
            g = None if g is None else g + pg / n_train
        return f, g

    return wrapped
