"""Slow, obviously correct numpy twins of the engine's kernels (for tests only).

Each kernel family, its twin here, and the test comparing them:

* slices, ``SliceOperator.forward``: :func:`slice_trilinear` (``tests/test_projection.py``);
* their adjoint, ``SliceOperator.adjoint``: :func:`slice_adjoint` (``tests/test_projection.py``);
* the likelihood's energies, marginal nll and gradient (``cryoday._likelihood_kernels``):
  :func:`turned_image_nll` (``tests/test_likelihood.py``);
* the posteriors' column passes (``cryoday.posteriors``): :func:`column_posteriors`
  (``tests/test_posteriors.py``).
"""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp


def turned_image_nll(dir_slices, images, ctf_params, sigma2, pixel_size, kx, ky, weights,
                     inplane_matrices, shifts_px, dir_logw, inp_logw, shift_logw, padding,
                     slice_grad=False):
    """The engine's turned-image objective, written out with numpy and scipy (no Numba).

    For each direction ``d``, in-plane matrix ``P`` and shift ``t``:
    ``E = (sum w |d(Pk) - c(Pk) exp(2 pi i Pk.t / N) S_d(k)|^2 + |d|^2 - |d(Pk)|^2) / (2 s2)``,
    ``|d|^2`` on the unturned grid, with ``d(Pk)`` read bilinearly (``map_coordinates``,
    order 1) from the gridding-corrected, ``padding``-times zero-padded transform of the image
    (``numpy.fft``) and ``c(Pk)`` from ``evaluate_ctf`` at the turned frequencies.
    images: (B, N, N); dir_slices: (n_dir, K); returns (B,) nll. ``weights`` is ``(K,)``, or
    ``(B, K)`` for one row per image (coloured noise: ``w / P(|k|)`` of the image's group).

    With ``slice_grad``, also the gradient of ``sum_i nll_i`` with respect to the slices:
    ``G`` ``(n_dir, K)`` complex with ``d nll = Re sum conj(dS) G``, i.e.
    ``G_d = -sum_ps gamma_dps w c conj(phi) residual / s2`` (``gamma`` the posteriors); the
    volume gradient is then ``SliceOperator.adjoint(G / op.weights, rotations)``.
    """
    from scipy.ndimage import map_coordinates

    from cryoday.ctf import evaluate_ctf

    n = images.shape[-1]
    m = padding  # padded size in px
    x = (np.arange(n) - n // 2) / m
    g = np.sinc(x) ** 2
    out = np.empty(len(images))
    grad = np.zeros(np.shape(dir_slices), dtype=np.complex128)
    k = np.stack([kx, ky], axis=1).astype(np.float64)
    all_weights = np.broadcast_to(np.asarray(weights, np.float64), (len(images), len(kx)))
    for i, image in enumerate(images):
        weights = all_weights[i]
        big = np.zeros((m, m))
        lo = m // 2 - n // 2
        big[lo:lo + n, lo:lo + n] = image / np.outer(g, g)
        spectrum = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(big))) / m
        centred = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(image))) / n
        d_grid = centred[(ky + n // 2).astype(int), (kx + n // 2).astype(int)]
        dnorm = np.sum(weights * np.abs(d_grid) ** 2)
        params = {key: np.asarray(v)[i] if np.ndim(v) else v for key, v in ctf_params.items()}
        logits = []
        d_energy = []  # per pose, dE/dS in the convention of G
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
                    if slice_grad:
                        d_energy.append((d, -weights * c * np.conj(phase) * residual
                                         / sigma2[i]))
        out[i] = -logsumexp(logits)
        if slice_grad:
            posterior = np.exp(np.asarray(logits) + out[i])
            for gamma, (d, de) in zip(posterior, d_energy):
                grad[d] += gamma * de
    return (out, grad) if slice_grad else out


def slice_trilinear(volume, rotations, kx, ky):
    """``SliceOperator.forward`` written out with numpy and scipy: central slices of the 2x
    zero-padded, gridding-corrected volume's centred unitary transform (``numpy.fft``), read
    trilinearly (``map_coordinates``, order 1) at ``2 A^T (kx, ky, 0)`` from its centre, and
    scaled to the unitary 2D transform of the projection (``2^1.5 sqrt(N)``).

    volume: (N, N, N) ``[z, y, x]``; rotations: (n_rot, 3, 3); returns (n_rot, K) complex128.
    """
    from scipy.ndimage import map_coordinates

    n = volume.shape[0]
    m = 2 * n
    g = np.sinc((np.arange(n) - n // 2) / m) ** 2  # real-space image of the trilinear kernel
    padded = np.zeros((m, m, m))
    lo = m // 2 - n // 2
    padded[lo:lo + n, lo:lo + n, lo:lo + n] = volume / (g[:, None, None] * g[None, :, None]
                                                        * g[None, None, :])
    spectrum = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(padded), norm="ortho"))
    k = np.stack([kx, ky, np.zeros_like(kx)], axis=1).astype(np.float64)
    out = np.empty((len(rotations), len(kx)), dtype=np.complex128)
    for r, a in enumerate(np.asarray(rotations, np.float64)):
        f = k @ a  # rows: A^T k
        coords = [2 * f[:, 2] + m // 2, 2 * f[:, 1] + m // 2, 2 * f[:, 0] + m // 2]
        out[r] = (map_coordinates(spectrum.real, coords, order=1)
                  + 1j * map_coordinates(spectrum.imag, coords, order=1))
    return out * 2.0**1.5 * np.sqrt(n)


def slice_adjoint(values, shape, rotations, kx, ky, weights):
    """The adjoint of :func:`slice_trilinear` by its definition: the slices are linear in the
    volume, so form their matrix ``M`` column by column from unit volumes, then
    ``adjoint(y) = Re(M^H (w y))``, so that ``sum Re(conj(M v) w y) == v . adjoint(y)``.

    values: (n_rot, K); shape: the volume's (small: one slice per voxel); returns float64.
    """
    n_vox = int(np.prod(shape))
    columns = np.empty((n_vox, np.size(values)), dtype=np.complex128)
    unit = np.zeros(n_vox)
    for j in range(n_vox):
        unit[:] = 0.0
        unit[j] = 1.0
        columns[j] = slice_trilinear(unit.reshape(shape), rotations, kx, ky).ravel()
    weighted = (np.asarray(weights)[None, :] * np.asarray(values)).ravel()
    return (np.conj(columns) @ weighted).real.reshape(shape)


def column_posteriors(cross, norm, dir_lw, inp_lw, shift_lw, inv_2s2):
    """One image's log posteriors over (direction, in-plane angle, shift) as a dense float64
    array, and what :mod:`cryoday.posteriors` makes of them.

    ``logit[a, p, s] = dir_lw[a] + inp_lw[p] + shift_lw[s] + (2 cross[a, p, s] - norm[a, p])
    inv_2s2``, from ``cross`` (n_d, n_p, n_s) and ``norm`` (n_d, n_p). Returns its log-sum-exp,
    the marginals over (direction, in-plane angle) (flat, direction-major) and over shifts, and
    the best pose as (direction, column ``p n_s + s``).
    """
    cross = np.asarray(cross, np.float64)
    n_d, n_p, n_s = cross.shape
    logit = (np.asarray(dir_lw)[:, None, None] + np.asarray(inp_lw)[None, :, None]
             + np.asarray(shift_lw)[None, None, :]
             + (2.0 * cross - np.asarray(norm, np.float64)[:, :, None]) * inv_2s2)
    lse = logsumexp(logit)
    post = np.exp(logit - lse)
    best = np.unravel_index(np.argmax(logit.reshape(n_d, -1)), (n_d, n_p * n_s))
    return lse, post.sum(axis=2).ravel(), post.sum(axis=(0, 1)), tuple(int(b) for b in best)


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
