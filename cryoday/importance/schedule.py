"""The annealing schedule, in epochs of the data (passes over the training images).

What the schedule tracks is how often each image's posterior has been refreshed and how far
the map has come, so it counts epochs ``tau`` rather than iterations; the paper's constants
(section 3.3, given per iteration of its ~230 iterations per epoch) are converted to epochs in
``docs/importance.md``. Early on the stored posteriors are distrusted (high temperature, a
large share of the prior, both hands of each view); the schedule relaxes as they firm up.
Pure functions: the constants are parameters, their defaults live in ``ImportanceSampler``.
"""

from __future__ import annotations

import numpy as np

MAX_LOG2_TEMPERATURE = 64.0  # beyond this every stored point weighs the same anyway


def epoch(iteration: float, iterations_per_epoch: float) -> float:
    """``tau``: passes over the data at SAGD iteration ``iteration``."""
    return float(iteration) / iterations_per_epoch


def temperature(tau: float, *, offset: float, temperature_epochs: float) -> float:
    """``T = max(1, 2^(tau_T / (tau - tau_0)))``, infinite (capped at 2^64) until ``tau_0``.

    Stored posteriors enter the proposals as ``p^(1/T)``.

    Parameters
    ----------
    tau : float, epochs
    offset : float, ``tau_0``: epochs before the stored posteriors are used at all
    temperature_epochs : float, ``tau_T``
    """
    since = tau - offset
    log2_t = temperature_epochs / since if since > 0 else np.inf
    return float(2.0 ** min(log2_t, MAX_LOG2_TEMPERATURE))


def alpha(tau: float, *, offset: float, halflife: float, alpha_min: float) -> float:
    """``alpha = max(alpha_min, 2^(-max(0, tau - tau_0) / h))``: the prior's share of the
    proposals (1 until ``tau_0``).

    Parameters
    ----------
    tau : float, epochs
    offset : float, ``tau_0``
    halflife : float, ``h``, epochs
    alpha_min : float, the floor
    """
    since = max(0.0, tau - offset)
    return float(max(alpha_min, 2.0 ** (-since / halflife)))


def antipodal(tau: float, *, flip_epochs: float) -> bool:
    """Whether direction proposals also cover the antipodes of the stored directions: while
    ``tau < flip_epochs``, as long as a low-resolution map cannot tell a view from its mirror
    image."""
    return tau < flip_epochs
