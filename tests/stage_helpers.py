"""A stand-in for the stage driver's objective, shared by the stage and checkpoint tests."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np


class ScriptedObjective:
    """A quadratic minibatch objective whose held-out error follows a script."""

    def __init__(self, heldout):
        self.heldout = list(heldout)
        self.partition = [np.arange(5), np.arange(5, 10)]
        self.n_train = 10
        self.grid = SimpleNamespace(size=100)
        self.sampler = SimpleNamespace(last_kl=float("nan"), last_kl_epochs=float("nan"))
        self.iteration = 0
        self.last = None

    def __call__(self, volume, batch_id, want_grad):
        if want_grad:
            self.last = SimpleNamespace(n_evaluated=50)
        return 0.5 * float(np.sum(volume.astype(np.float64) ** 2)), volume.copy()

    def heldout_nll(self, volume):
        return self.heldout.pop(0)
