"""The per-step kernels against the numpy calls they replaced, at a paper-scale 10 A stage.

Sizes are those of a 40,000-particle, 128-px set at its 10 A stage (60 px, 9,463 directions,
1,145 coefficients, 100 stored gradients, minibatches of 200) and of its final map (128 px):

- ``top_k``: the store's 32 heaviest points per row of 200 mostly-zero posterior rows
  (``np.argpartition`` before, ``importance._select.top_k_rows`` now);
- ``draws``: 300 multinomial draws per row from 200 proposals over the directions
  (``Generator.multinomial`` before, ``proposals.multinomial_draws`` now);
- ``sag_average``: SAGD's weighted average of 100 stored 60^3 gradients (``np.tensordot``
  before, ``_sagd_kernels.weighted_sum`` now);
- ``padded``: 200 images' padded transforms (the old full layout, written out here, against
  ``batch.padded_half_transforms``, the ``kx >= 0`` half the likelihood now reads);
- ``insertion``: 4,000 poses of 500 images inserted at 128 px: the last stop's kernel (written
  out here: complex128 and float64 cubes, the CTF and shift phase applied by numpy, poses in
  particle order, chunks of 500) against ``reconstruct.insert``'s path now
  (``_insert_kernels.insert_images``: interleaved float32 sums, the values formed in the
  kernel, poses in ``reconstruct.locality_order``, chunks of 2,000, then ``flush``).

Nothing is asserted; it prints each pair's milliseconds and their ratio, then one JSON line.

    python benchmarks/step_kernels.py
"""

from __future__ import annotations

import json
import time

import numba
import numpy as np

from cryoday._insert_kernels import flush, insert_images
from cryoday._sagd_kernels import weighted_sum
from cryoday.batch import image_padded_size, padded_half_transforms
from cryoday.geometry import euler_to_matrix
from cryoday.importance import proposals
from cryoday.importance._select import top_k_rows
from cryoday.projection import SliceOperator, _add_at_corners, _scatter_corners, _trilinear_weights
from cryoday.reconstruct import locality_order


def best_of(f, repeats=5) -> float:
    f()  # compiled and warm
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def padded_before(op, images):
    """The padded transforms as they were: the y DFT as one product over every image, which
    leaves them ``(ky, image, kx >= 0)``, then numpy's two strided copies to ``(image, ky, kx)``
    with the ``kx < 0`` half filled by Hermitian symmetry."""
    n, n_images = op.box, len(images)
    m = image_padded_size(n)
    pos = np.arange(n) - n // 2
    g = np.sinc(pos / m) ** 2
    corrected = (np.asarray(images, np.float32) / (g[:, None] * g[None, :])).astype(np.float32)
    pad = m / n
    h = min(int(np.ceil(pad * op.radius)) + 2, m // 2 - 1)
    angle_x = 2 * np.pi * np.outer(pos, np.arange(h + 1)) / m
    flat = corrected.reshape(n_images * n, n)
    rows = (flat @ (np.cos(angle_x) * pad / m).astype(np.float32)
            - 1j * (flat @ (np.sin(angle_x) * pad / m).astype(np.float32))).astype(np.complex64)
    rows = rows.reshape(n_images, n, h + 1).transpose(1, 0, 2).reshape(n, n_images * (h + 1))
    dft_y = np.exp(-2j * np.pi * np.outer(np.arange(-h, h + 1), pos) / m).astype(np.complex64)
    half = (dft_y @ rows).reshape(2 * h + 1, n_images, h + 1).transpose(1, 0, 2)
    out = np.empty((n_images, 2 * h + 1, 2 * h + 1), dtype=np.complex64)
    out[:, :, h:] = half
    out[:, :, :h] = np.conj(half[:, ::-1, h:0:-1])
    return out


@numba.njit(parallel=True, fastmath=True)
def insert_pairs_before(values, weights, centre, rotations, kx, ky, num, den):
    """The insertion kernel as it was: values and CTF^2 weights formed beforehand (complex128,
    float64), scattered into a complex128 and a float64 cube per thread."""
    m = num.shape[1]
    n_threads = num.shape[0]
    n_rot = rotations.shape[0]
    n_coef = kx.shape[0]
    chunk = (n_rot + n_threads - 1) // n_threads
    sy = np.uint64(m)
    sz = np.uint64(m * m)
    for t in numba.prange(n_threads):
        acc = num[t].ravel()
        acc_den = den[t].ravel()
        base = np.empty(n_coef, dtype=np.int64)
        fxs = np.empty(n_coef, dtype=np.float64)
        fys = np.empty(n_coef, dtype=np.float64)
        fzs = np.empty(n_coef, dtype=np.float64)
        for r in range(t * chunk, min(n_rot, (t + 1) * chunk)):
            _scatter_corners(rotations[r], kx, ky, centre, m, base, fxs, fys, fzs)
            for k in range(n_coef):
                if base[k] < 0:
                    continue
                b = np.uint64(base[k])
                weights_k = _trilinear_weights(fxs[k], fys[k], fzs[k])
                _add_at_corners(acc, b, sy, sz, weights_k, values[r, k])
                _add_at_corners(acc_den, b, sy, sz, weights_k, weights[r, k])


def main() -> None:
    rng = np.random.default_rng(0)
    figures = {}

    p = np.zeros((200, 9463))
    for row in p:
        row[rng.choice(9463, 300, replace=False)] = rng.random(300)
    figures["top_k"] = (best_of(lambda: np.argpartition(p, -32, axis=1)[:, -32:]),
                        best_of(lambda: top_k_rows(p, 32)))

    q = rng.random((200, 9463)) ** 4 + 1e-4
    q /= q.sum(axis=1, keepdims=True)
    m = np.full(200, 300)
    figures["draws"] = (best_of(lambda: rng.multinomial(m, q)),
                        best_of(lambda: proposals.multinomial_draws(q, m, rng)))

    stored = rng.standard_normal((100, 60, 60, 60)).astype(np.float32)
    w = rng.random(100)
    w /= w.sum()
    figures["sag_average"] = (
        best_of(lambda: np.tensordot(w, stored, axes=1).astype(np.float32)),
        best_of(lambda: weighted_sum(w, stored)))

    op = SliceOperator(60, 27.0)
    images = rng.standard_normal((200, 60, 60)).astype(np.float32)
    figures["padded"] = (best_of(lambda: padded_before(op, images)),
                         best_of(lambda: padded_half_transforms(op, images)))

    big = SliceOperator(128, 63.0)
    size, threads = big._cube_size, numba.get_num_threads()
    n_images, n = 500, 4000
    rotations = euler_to_matrix(rng.uniform(0, 360, n),
                                np.degrees(np.arccos(rng.uniform(-1, 1, n))),
                                rng.uniform(0, 360, n))
    image_of = rng.integers(0, n_images, n)
    shifts = rng.normal(0, 2, (n, 2))
    pose_weights = rng.random(n)
    data = (rng.standard_normal((n_images, big.n_coef))
            + 1j * rng.standard_normal((n_images, big.n_coef))).astype(np.complex64)
    ctf = rng.random((n_images, big.n_coef)).astype(np.float32)
    centre = float(big._half_cube)
    num = np.zeros((threads, size, size, size), np.complex128)
    den = np.zeros((threads, size, size, size), np.float64)

    def before():
        for start in range(0, n, 500):
            rows = slice(start, start + 500)
            t = shifts[rows]
            phase = np.exp(-2j * np.pi * (np.outer(t[:, 0], big.kx) + np.outer(t[:, 1], big.ky))
                           / big.box)
            w = pose_weights[rows, None]
            values = (ctf * data)[image_of[rows]] * phase * w
            ctf2 = ctf[image_of[rows]].astype(np.float64) ** 2 * w
            insert_pairs_before(values.astype(np.complex128), ctf2, centre, rotations[rows],
                                big._kx64, big._ky64, num, den)

    acc = np.zeros((threads, size, size, size, 4), np.float32)
    total_num = np.zeros((size, size, size), np.complex128)
    total_den = np.zeros((size, size, size), np.float64)
    ix = big.kx.astype(np.int64) + big.box // 2
    iy = big.ky.astype(np.int64) + big.box // 2

    def after():
        order = locality_order(rotations, image_of, pose_weights)
        for start in range(0, n, 2000):
            rows = order[start:start + 2000]
            insert_images(data, ctf, image_of[rows], np.ascontiguousarray(shifts[rows]),
                          np.ascontiguousarray(pose_weights[rows]),
                          np.ascontiguousarray(rotations[rows]), big._kx64, big._ky64, ix, iy,
                          big.box, centre, acc)
        flush(acc, total_num, total_den)

    figures["insertion"] = (best_of(before, 2), best_of(after, 2))

    for name, (before, after) in figures.items():
        print(f"{name:12s} before {before:8.1f} ms   after {after:8.1f} ms   "
              f"{before / after:5.1f}x")
    print(json.dumps({name: {"before_ms": round(b, 2), "after_ms": round(a, 2),
                             "ratio": round(b / a, 2)} for name, (b, a) in figures.items()}))


if __name__ == "__main__":
    main()
