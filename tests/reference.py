"""Slow, obviously correct numpy twins of the engine's kernels (for tests only)."""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp


def dense_nll(slices, data, ctf, sigma2, weights, kx, ky, box, shifts_px, rot_logw, shift_logw):
    """-log sum_{r,s} W_r W_s exp(-E_rs) per image, forming every model image explicitly.

    slices: (n_rot, K) complex model slices; data/ctf: (B, K); shifts_px: (n_shift, 2).
    """
    out = np.empty(len(data))
    for i in range(len(data)):
        logits = []
        for r in range(len(slices)):
            for s, (tx, ty) in enumerate(shifts_px):
                phase = np.exp(2j * np.pi * (kx * tx + ky * ty) / box)
                model = ctf[i] * slices[r] * phase
                energy = np.sum(weights * np.abs(data[i] - model) ** 2) / (2 * sigma2[i])
                logits.append(rot_logw[r] + shift_logw[s] - energy)
        out[i] = -logsumexp(logits)
    return out
