"""What the stage tests share: a stand-in for the stage driver's objective (the stage and
checkpoint tests) and a tiny simulated particle set (the stage, max_particles and symmetry
tests)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from cryoday import simulate


class ScriptedObjective:
    """A quadratic minibatch objective whose held-out error follows a script."""

    def __init__(self, heldout):
        self.heldout = list(heldout)
        self.partition = [np.arange(5), np.arange(5, 10)]
        self.n_train = 10
        self.n_classes = 1
        self.grid = SimpleNamespace(size=100)
        self.sampler = SimpleNamespace(last_kl=float("nan"), last_kl_epochs=float("nan"),
                                       flip_dropped=False)
        self.iteration = 0
        self.last = None

    def __call__(self, volume, batch_id, want_grad):
        if want_grad:
            self.last = SimpleNamespace(n_evaluated=50)
        return 0.5 * float(np.sum(volume.astype(np.float64) ** 2)), volume.copy()

    def heldout_nll(self, volume):
        return self.heldout.pop(0)

    def end_step(self):
        pass


def tiny_particle_set(volume, pixel_size: float, n: int, seed: int):
    """``n`` simulated images of ``volume`` at SNR 0.5, normalised to unit noise by their first
    three rows' spread, and their CTF parameters (``cryoday.ctf.evaluate_ctf`` names)."""
    images, table = next(simulate.simulate_chunks(volume, pixel_size, n, snr=0.5, seed=seed))
    images = ((images - images.mean()) / images[:, :3].std()).astype(np.float32)
    ctf = {"defocus_u": table.rlnDefocusU.to_numpy(), "defocus_v": table.rlnDefocusV.to_numpy(),
           "defocus_angle": table.rlnDefocusAngle.to_numpy(), "voltage": 300.0, "cs": 2.7,
           "amplitude_contrast": 0.1}
    return images, ctf
