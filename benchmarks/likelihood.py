"""Throughput of the marginal likelihood (and gradient) against numpy, and against matmul peak.

For 64-px and 128-px images at 2.8 A/px (a 180-A and a 360-A box; 64 px at 5.6 A/px could not
reach 10 A, its Nyquist being 11.2 A) at max frequency 1/40 A and 1/10 A, on each stage's
cropped box:

* evaluations per second: (image, rotation, shift, Fourier coefficient) terms evaluated, with the
  full grid at 1/40 A and an importance-sized sample (rotations x shifts per image) at 1/10 A,
  where the full grid (~1e9 points per image) is impossible;
* the same work by a straightforward vectorised numpy implementation (every model image formed,
  then the energies and the log-sum-exp), measured in the same run on a subset and compared as a
  throughput ratio;
* the kernel's floating-point rate (the GEMM-formulated work: 4 n_rot K n_shift flops per image
  for the energies' cross term; the norm term's GEMM, half as much again with one shift, is not
  counted) as a fraction of this machine's float32 ``numpy.matmul`` rate, also measured here;
  and the same for an evaluation with the gradient, whose GEMM work is twice that (the
  transposed product for the gradient), to show what the gradient's adjoint costs on top;
* the time to prepare the volume's padded transform (once per volume, outside the timings
  above: the line search evaluates one volume several times);
* the share of the time spent in slicing (forward) and its adjoint.

Prints a table, then one JSON line. No asserts: figures for the issue notes.

    python benchmarks/likelihood.py
"""

from __future__ import annotations

import json
import time

import numpy as np
from scipy.special import logsumexp

from cryoday import molecule
from cryoday.batch import make_batch
from cryoday.likelihood import marginal_nll
from cryoday.pose_sets import PoseSubsets, exhaustive_subsets
from cryoday.preprocess import stage_box
from cryoday.projection import SliceOperator
from cryoday.quadrature import pose_grid

N_IMAGES = 40
# An importance sample per image at 1/10 A: directions x in-plane angles x shifts (2,000 rotations).
SAMPLE_DIRECTIONS, SAMPLE_INPLANE, SAMPLE_SHIFTS = 100, 20, 25


def best_time(fn, repeats=3, min_total=0.5, max_repeats=50):
    """Best of ``repeats`` timings, or of as many as fit in ``min_total`` seconds for short calls
    (a millisecond call's best of three varied by 20% between runs)."""
    fn()  # compile / warm caches
    times = []
    while len(times) < repeats or (sum(times) < min_total and len(times) < max_repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_gflops(n=2048):
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((n, n)).astype(np.float32)
    return 2 * n**3 / best_time(lambda: a @ b) / 1e9


def numpy_nll(slices, batch, op, shifts, rot_logw, shift_logw):
    """The straightforward way: form every model image, then energies and log-sum-exp."""
    phase = np.exp(2j * np.pi * (np.outer(shifts[:, 0], op.kx) + np.outer(shifts[:, 1], op.ky))
                   / op.box)
    out = np.empty(len(batch))
    for i in range(len(batch)):
        model = batch.ctf[i] * slices[:, None, :] * phase[None, :, :]
        energy = (op.weights * np.abs(batch.data[i] - model) ** 2).sum(-1) / (2 * batch.sigma2[i])
        out[i] = -logsumexp(rot_logw[:, None] + shift_logw[None, :] - energy)
    return out


def random_subsets(grid, n_images, rng):
    def pick(n_grid, n_pick, logw):
        sets = [np.sort(rng.choice(n_grid, min(n_pick, n_grid), replace=False))
                for _ in range(n_images)]
        return sets, [logw[x] for x in sets]

    return PoseSubsets.from_sets(
        grid.n_inp, *pick(grid.n_dir, SAMPLE_DIRECTIONS, grid.dir_log_weights),
        *pick(grid.n_inp, SAMPLE_INPLANE, grid.inp_log_weights),
        *pick(grid.n_shift, SAMPLE_SHIFTS, grid.shift_log_weights))


def case(full_box, pixel_size, resolution, rng):
    box, psize = stage_box(full_box, pixel_size, resolution)
    radius = box * psize / resolution
    op = SliceOperator(box, radius)
    grid = pose_grid(resolution, box, psize, undersampling=1.5 if resolution >= 30 else 1.0)
    volume = molecule.synthetic_molecule(box, psize)
    images = rng.standard_normal((N_IMAGES, box, box)).astype(np.float32)
    ctf = {"defocus_u": rng.uniform(1e4, 3e4, N_IMAGES).astype(np.float32),
           "defocus_v": rng.uniform(1e4, 3e4, N_IMAGES).astype(np.float32),
           "defocus_angle": np.zeros(N_IMAGES, np.float32), "voltage": 300.0, "cs": 2.7,
           "amplitude_contrast": 0.1}
    batch = make_batch(op, images, ctf, psize, 1.0)
    exhaustive = grid.size <= 200_000
    if exhaustive:
        subsets = exhaustive_subsets(grid, N_IMAGES)
    else:
        subsets = random_subsets(grid, N_IMAGES, rng)
    cube = op.prepare(volume)
    points = subsets.n_points
    t_nll = best_time(lambda: marginal_nll(op, volume, batch, grid, subsets, False, cube))
    t_grad = best_time(lambda: marginal_nll(op, volume, batch, grid, subsets, True, cube), 2)
    union = np.unique(subsets.dir_index)
    rotations = grid.direction_rotations[union]
    t_prepare = best_time(lambda: op.prepare(volume))
    t_forward = best_time(lambda: op.forward(volume, rotations, cube))
    slices = op.forward(volume, rotations, cube)
    t_adjoint = best_time(lambda: op.adjoint(slices, rotations), 2)
    # numpy on the first few images' first rotations (it materialises every model image).
    n_np_rot = min(len(np.unique(subsets.rot_index)), 1500)
    n_np_img = 4
    shift_sel = subsets.shift_index[:subsets.shift_offsets[1]]
    np_slices = op.forward(volume, grid.rotations[:n_np_rot], cube)
    sub_batch = type(batch)(batch.data[:n_np_img], batch.ctf[:n_np_img],
                            batch.sigma2[:n_np_img])
    t_numpy = best_time(lambda: numpy_nll(np_slices, sub_batch, op, grid.shifts[shift_sel],
                                          grid.rot_log_weights[:n_np_rot],
                                          grid.shift_log_weights[shift_sel]), 1)
    numpy_evals = n_np_img * n_np_rot * len(shift_sel) * op.n_coef / t_numpy
    evals = points * op.n_coef / t_nll
    flops = 4.0 * points * op.n_coef / t_nll  # the energies' GEMM work, without the gradient
    return {
        "full_box": full_box, "box": box, "resolution_A": resolution, "n_coef": op.n_coef,
        "grid_points": grid.size, "evaluated_per_image": points // N_IMAGES,
        "exhaustive": exhaustive, "nll_s": t_nll, "nll_grad_s": t_grad,
        "evals_per_s": evals, "evals_per_s_with_grad": points * op.n_coef / t_grad,
        "numpy_evals_per_s": numpy_evals, "speedup_vs_numpy": evals / numpy_evals,
        "gflops": flops / 1e9, "gflops_with_grad": 8.0 * points * op.n_coef / t_grad / 1e9,
        "prepare_s": t_prepare, "forward_share": t_forward / t_grad,
        "adjoint_share": t_adjoint / t_grad,
    }


def main():
    rng = np.random.default_rng(0)
    peak = matmul_gflops()
    print(f"numpy float32 matmul: {peak:.1f} GFLOP/s on this machine")
    rows = []
    for full_box, psize in ((64, 2.8), (128, 2.8)):
        for resolution in (40.0, 10.0):
            row = case(full_box, psize, resolution, rng)
            row["fraction_of_matmul_peak"] = row["gflops"] / peak
            row["fraction_of_matmul_peak_with_grad"] = row["gflops_with_grad"] / peak
            rows.append(row)
            print(f"{full_box:4d} px (stage box {row['box']:3d}) at {resolution:4.0f} A: "
                  f"{row['n_coef']:5d} coef, {row['evaluated_per_image']:>9,} poses/image "
                  f"({'full grid' if row['exhaustive'] else 'sampled'} of "
                  f"{row['grid_points']:,}); {row['evals_per_s']:.3g} evals/s "
                  f"({row['evals_per_s_with_grad']:.3g} with gradient), "
                  f"{row['speedup_vs_numpy']:.0f}x numpy, {row['gflops']:.1f} GFLOP/s = "
                  f"{row['fraction_of_matmul_peak']:.0%} of matmul "
                  f"({row['fraction_of_matmul_peak_with_grad']:.0%} with gradient); forward "
                  f"{row['forward_share']:.0%}, adjoint {row['adjoint_share']:.0%} of the "
                  f"gradient evaluation; volume prepared in {row['prepare_s'] * 1e3:.0f} ms",
                  flush=True)
    summary = {
        "matmul_gflops": peak,
        "evals_per_s": float(np.median([r["evals_per_s"] for r in rows])),
        "speedup_vs_numpy": float(np.median([r["speedup_vs_numpy"] for r in rows])),
        "fraction_of_matmul_peak": float(np.median([r["fraction_of_matmul_peak"] for r in rows])),
        "fraction_of_matmul_peak_with_grad": float(np.median(
            [r["fraction_of_matmul_peak_with_grad"] for r in rows])),
        "cases": rows,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
