"""Slow, obviously correct numpy twins of the engine's kernels (for tests only)."""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp


def turned_image_nll(dir_slices, images, ctf_params, sigma2, pixel_size, kx, ky, weights,
                     inplane_matrices, shifts_px, dir_logw, inp_logw, shift_logw, padding):
    """The engine's turned-image objective, written out with numpy and scipy (no Numba).

    For each direction ``d``, in-plane matrix ``P`` and shift ``t``:
    ``E = (sum w |d(Pk) - c(Pk) exp(2 pi i Pk.t / N) S_d(k)|^2 + |d|^2 - |d(Pk)|^2) / (2 s2)``,
    ``|d|^2`` on the unturned grid, with ``d(Pk)`` read bilinearly (``map_coordinates``,
    order 1) from the gridding-corrected, ``padding``-times zero-padded transform of the image
    (``numpy.fft``) and ``c(Pk)`` from ``evaluate_ctf`` at the turned frequencies.
    images: (B, N, N); dir_slices: (n_dir, K); returns (B,) nll.
    """
    from scipy.ndimage import map_coordinates

    from cryoday.ctf import evaluate_ctf

    n = images.shape[-1]
    m = padding  # padded size in px
    x = (np.arange(n) - n // 2) / m
    g = np.sinc(x) ** 2
    out = np.empty(len(images))
    k = np.stack([kx, ky], axis=1).astype(np.float64)
    for i, image in enumerate(images):
        big = np.zeros((m, m))
        lo = m // 2 - n // 2
        big[lo:lo + n, lo:lo + n] = image / np.outer(g, g)
        spectrum = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(big))) / m
        centred = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(image))) / n
        d_grid = centred[(ky + n // 2).astype(int), (kx + n // 2).astype(int)]
        dnorm = np.sum(weights * np.abs(d_grid) ** 2)
        params = {key: np.asarray(v)[i] if np.ndim(v) else v for key, v in ctf_params.items()}
        logits = []
        for d, s_d in enumerate(dir_slices):
            for p, mat in enumerate(inplane_matrices):
                turned = k @ np.asarray(mat).T  # P k
                coords = [turned[:, 1] * m / n + m // 2, turned[:, 0] * m / n + m // 2]
                d_turned = (map_coordinates(spectrum.real, coords, order=1)
                            + 1j * map_coordinates(spectrum.imag, coords, order=1)) * (m / n)
                c = evaluate_ctf(turned[:, 0] / (n * pixel_size), turned[:, 1] / (n * pixel_size),
                                 **params).astype(np.float64)
                for s, t in enumerate(shifts_px):
                    phase = np.exp(2j * np.pi * (turned @ np.asarray(t, np.float64)) / n)
                    residual = d_turned - c * phase * s_d
                    # |d|^2 from the unturned data, as the engine does.
                    energy = (np.sum(weights * np.abs(residual) ** 2) + dnorm
                              - np.sum(weights * np.abs(d_turned) ** 2)) / (2 * sigma2[i])
                    logits.append(dir_logw[d] + inp_logw[p] + shift_logw[s] - energy)
        out[i] = -logsumexp(logits)
    return out


def elementwise(scalar_kernel):
    """A compiled loop applying one of the kernels' inline scalar functions to an array, with
    the kernels' floating-point flags (they decide, e.g., whether a multiply-add is fused)."""
    import numba

    from cryoday import jit

    @numba.njit(fastmath=jit.FASTMATH)
    def apply(x):
        out = np.empty_like(x)
        for i in range(len(x)):
            out[i] = scalar_kernel(x[i])
        return out

    return apply


# --- importance sampling
def kl_on_union_reference(x_p, logp_p, x_q, logp_q, c):
    """``cryoday.importance.kl_on_union``, densely: per image, both weighted point sets smoothed
    by ``exp(-c |x - y|^2)`` and evaluated (float64 throughout) at the union of their non-empty
    points, renormalised there, and ``sum p log(p / q)`` over those points."""
    out = np.empty(len(x_p))
    for b in range(len(x_p)):
        union = np.concatenate([x_p[b], x_q[b]])[np.isfinite(np.r_[logp_p[b], logp_q[b]])]

        def log_density(x, logp):
            log_w = logp - logsumexp(logp)  # empty slots: -inf, weight 0
            d2 = np.sum((union[:, None, :] - x[None, :, :]) ** 2, axis=-1)
            log_d = logsumexp(log_w[None, :] - c * d2, axis=1)
            return log_d - logsumexp(log_d)

        log_p = log_density(np.asarray(x_p[b], np.float64), np.asarray(logp_p[b], np.float64))
        log_q = log_density(np.asarray(x_q[b], np.float64), np.asarray(logp_q[b], np.float64))
        out[b] = np.sum(np.exp(log_p) * (log_p - log_q))
    return out
