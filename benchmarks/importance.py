"""Importance sampling against the exhaustive sum: the paper's Figures 6, 7 and 3, and a run with
and without it.

* Default (Figure 6): simulated images (``--box`` px at ``--pixel-size`` A/px, SNR ``--snr``,
  with CTF, the synthetic molecule, normalised as the pipeline's preprocess rule does) at a
  "converged" state: the true map, Fourier-resampled to a fine stage's box and put in the
  normalised, cropped images' units (divided by the noise sigma and multiplied by
  ``box / stage box``; the least-squares scale of its slices to the data at the true poses is
  printed and should be 1), is the volume. A first pass sums each image's likelihood over the
  whole pose grid (exact ``-log p(I|V)`` and the image's posterior), which is stored in an
  :class:`~cryoday.importance.ImportanceSampler` through its own ``update`` (as a stage does
  after a visit); a second pass estimates ``-log p(I|V)`` from the sampler's importance sample
  for each ``s0`` (``--repeats`` seeds). Reported: median and 90th percentile over images and
  seeds of the relative error ``|est - exact| / |exact|``, the mean absolute error in nats and
  the fraction of the grid evaluated. Our ``-log p`` leaves out the constant
  ``n log(2 pi sigma^2) / 2`` of the Gaussian, so the relative errors are, if anything,
  overstated compared with a fully normalised likelihood.
* ``--run DIR`` (Figures 7 and 3): from a finished run's ``DIR/abinitio/seed*/stage*/
  history.tsv``, the fraction of the grid evaluated over each stage's last epoch, the speed-up
  ``n_full / n_evaluated``, and per epoch the mean of the ``kl_epoch`` column (Figure 3: each
  image's pose posterior against its previous visit's, minibatch mean; see
  :mod:`cryoday.importance`) and of the ``kl`` column (posterior against proposal over
  directions); ``--plot PATH`` saves both figures as a PNG. Histories written before
  ``kl_epoch`` existed read it as missing.
* ``--compare``: the same simulated data set and stages run through
  :func:`cryoday.stage.run_stage` (chained as ``scripts/reconstruct_stage.py`` does: random
  start, resampled volume and SAGD state passed on, the schema's defaults and the pipeline's
  stage schedule, :func:`cryoday.stage_config.stage_schedule`) with and without importance sampling, the
  same number of iterations each (no early stop); wall-time ratio (total and per stage), FSC
  0.143 to the truth after alignment, and each final volume's held-out ``-log p`` summed over
  the whole last-stage grid.

Prints tables, then one JSON line. No asserts: figures for the issue notes.

    python benchmarks/importance.py                      # Figure 6, a few minutes
    python benchmarks/importance.py --run results/demo --plot /tmp/is.png
    python benchmarks/importance.py --compare            # ~10 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

import numpy as np

from cryoday import initial, molecule, records, simulate
from cryoday.align import fsc_after_alignment
from cryoday.batch import make_batch, shift_phases
from cryoday.fourier import fourier_crop_2d
from cryoday.geometry import euler_to_matrix
from cryoday.importance import ImportanceSampler
from cryoday.likelihood import marginal_nll
from cryoday.pose_sets import exhaustive_subsets
from cryoday.preprocess import choose_heldout, estimate_noise, normalise, outer_mask, stage_box
from cryoday.projection import SliceOperator
from cryoday.quadrature import pose_grid
from cryoday.stage import run_stage
from cryoday.stage_config import StageConfig, default_reconstruction_config, stage_schedule

CTF_OPTICS = {"voltage": 300.0, "cs": 2.7, "amplitude_contrast": 0.1}


# ---------------------------------------------------------------------- data


def simulated_set(box, pixel_size, n, snr, seed):
    """Normalised images (unit noise, protein bright), CTFs, true poses and the true map.

    Returns ``images, ctf, poses, truth, noise_sigma`` where ``truth / noise_sigma`` is the map
    in the normalised images' units (the per-image noise estimates' median).
    """
    truth = molecule.synthetic_molecule(box, pixel_size, seed=0)
    truth = truth.clip(min=0) if truth.min() >= -1e-3 * truth.max() else truth
    images, tables = [], []
    for chunk, table in simulate.simulate_chunks(truth, pixel_size, n, snr=snr, seed=seed,
                                                 **CTF_OPTICS):
        images.append(chunk)
        tables.append(table)
    images = np.concatenate(images)
    table = {k: np.concatenate([t[k].to_numpy() for t in tables]) for k in tables[0].columns}
    # As the preprocess rule: background and robust sigma outside 0.95 of the half box.
    background, sigma = estimate_noise(images, outer_mask(box, 0.95 * box / 2))
    images = normalise(images, background, sigma, 1)
    ctf = {"defocus_u": table["rlnDefocusU"].astype(np.float32),
           "defocus_v": table["rlnDefocusV"].astype(np.float32),
           "defocus_angle": table["rlnDefocusAngle"].astype(np.float32), **CTF_OPTICS}
    poses = {"rotations": euler_to_matrix(table["rlnAngleRot"], table["rlnAngleTilt"],
                                          table["rlnAnglePsi"]),
             "shifts_A": np.stack([table["rlnOriginXAngst"], table["rlnOriginYAngst"]], 1)}
    return images, ctf, poses, truth, float(np.median(sigma))


def rotation_angle_deg(a, b):
    """Angle of ``a b^T`` per pair, degrees."""
    trace = np.einsum("nij,nij->n", a, b)
    return np.degrees(np.arccos(np.clip((trace - 1) / 2, -1, 1)))


# ---------------------------------------------------------------------- Figure 6


def true_pose_scale(op, volume, cube, batch, poses, pixel_size):
    """``c`` minimising ``sum_i |d_i - c CTF_i S(R_i) phi(t_i)|^2``: the volume's scale error."""
    slices = op.forward(volume, poses["rotations"], cube)
    phase_re, phase_im = shift_phases(op, poses["shifts_A"] / pixel_size)
    model = batch.ctf * slices * (phase_re + 1j * phase_im)
    w = op.weights
    return float(np.sum(w * (np.conj(model) * batch.data).real) / np.sum(w * np.abs(model) ** 2))


def figure6(args):
    t0 = time.perf_counter()
    images, ctf, poses, truth, noise_sigma = simulated_set(
        args.box, args.pixel_size, args.images, args.snr, args.seed)
    sbox, spsize = stage_box(args.box, args.pixel_size, args.resolution)
    radius = sbox * spsize / args.resolution
    op = SliceOperator(sbox, radius)
    grid = pose_grid(args.resolution, sbox, spsize, args.undersampling)
    stage_images = fourier_crop_2d(images, sbox)
    batch = make_batch(op, stage_images, ctf, spsize, sbox / args.box)
    # Fourier cropping keeps voxel values (local means), so a cropped map's projections sum
    # sbox voxels where the cropped images' pixels hold sums of box voxels: scale by box / sbox.
    volume = (initial.resample_volume(truth, sbox) * (args.box / sbox) / noise_sigma
              ).astype(np.float32)
    cube = op.prepare(volume)
    n = len(batch)
    rows = np.arange(n)
    scale = true_pose_scale(op, volume, cube, batch, poses, spsize)
    print(f"Figure 6: {n} images, {args.box} px at {args.pixel_size} A/px, SNR {args.snr}; "
          f"stage {args.resolution:g} A: box {sbox} at {spsize:.3f} A/px, {op.n_coef} "
          f"coefficients, grid {grid.n_dir} x {grid.n_inp} x {grid.n_shift} = {grid.size:,} "
          f"points per image (undersampling {args.undersampling}); simulated in "
          f"{time.perf_counter() - t0:.1f} s; least-squares scale of the volume's slices to "
          f"the data at the true poses {scale:.3f} (1 = the volume is in the data's units)",
          flush=True)

    # Pass 1: the exact sum over the whole grid, and each image's posterior.
    exact_subsets = exhaustive_subsets(grid, n)
    start = time.perf_counter()
    exact = marginal_nll(op, volume, batch, grid, exact_subsets, want_grad=False, cube=cube)
    t_exact = time.perf_counter() - start
    map_error = rotation_angle_deg(grid.rotations[exact.best_rot], poses["rotations"])
    shift_error = np.hypot(*(grid.shifts[exact.best_shift] * spsize - poses["shifts_A"]).T)
    post = exact.rot_post.reshape(n, grid.n_rot)
    rot_ess = 1.0 / np.sum(post**2, axis=1)
    print(f"exact pass: {t_exact:.1f} s ({t_exact / n:.2f} s/image); -log p(I|V) median "
          f"{np.median(exact.nll):.1f}; MAP rotation within {np.median(map_error):.1f} deg "
          f"(median; {np.mean(map_error < 3 * np.degrees(grid.angular_step)):.0%} within 3 "
          f"grid steps), MAP shift {np.median(shift_error):.1f} A off; posterior ESS over "
          f"rotations median {np.median(rot_ess):.1f} of {grid.n_rot:,}", flush=True)
    # The converged regime (T = 1, alpha at its floor, no antipodal term): Figure 6 is about
    # images of a converged run, whatever iteration number the sampler is asked at.
    base = ImportanceSampler(n, anneal=False)
    base.set_grid(grid)
    base.update(grid, rows, exact_subsets, exact)
    state = base.state()

    # Pass 2: importance-sampled estimates for each s0, with the engine's per-image caps
    # (max_rotations, max_shifts: the default sampler a stage uses) and without them (the
    # paper's rule alone: ceil(s0 * ESS) draws in each dimension).
    modes = [("engine defaults", {})]
    if not args.no_uncapped:
        modes.append(("uncapped", {"max_rotations": grid.n_rot, "max_shifts": grid.n_shift}))
    tables = {}
    for label, caps in modes:
        limits = ("no per-image caps" if caps else
                  f"max_rotations {base.max_rotations}, max_shifts {base.max_shifts}")
        print(f"importance-sampled estimates, {label} ({limits}); {args.repeats} seed(s) x "
              f"{n} images per row")
        print(f"{'s0':>6} {'median rel err':>15} {'90th pct':>10} {'max':>10} "
              f"{'mean |err| nats':>16} {'mean bias nats':>15} {'grid fraction':>14} "
              f"{'speed-up':>9} {'rot/img':>8} {'shift/img':>9} {'time s':>7}")
        table = tables[label] = []
        for s0 in args.s0:
            table.append(is_estimates(state, caps, s0, args, grid, op, volume, batch, cube,
                                      exact, rows))
            row = table[-1]
            print(f"{s0:6g} {row['median_rel_error']:15.2e} {row['p90_rel_error']:10.2e} "
                  f"{row['max_rel_error']:10.2e} {row['mean_abs_error_nats']:16.3g} "
                  f"{row['mean_error_nats']:15.3g} {row['mean_grid_fraction']:14.3e} "
                  f"{row['speedup']:9.1f} {row['mean_rotations']:8.0f} "
                  f"{row['mean_shifts']:9.1f} {row['time_s']:7.2f}", flush=True)
    return {"images": n, "box": args.box, "pixel_size": args.pixel_size, "snr": args.snr,
            "resolution_A": args.resolution, "true_pose_scale": scale, "stage_box": sbox,
            "n_coef": op.n_coef, "undersampling": args.undersampling, "grid_points": grid.size,
            "exact_s": t_exact, "median_exact_nll": float(np.median(exact.nll)),
            "median_map_rotation_error_deg": float(np.median(map_error)),
            "median_posterior_rotation_ess": float(np.median(rot_ess)),
            "s0": tables["engine defaults"], "s0_uncapped": tables.get("uncapped")}


def is_estimates(state, caps, s0, args, grid, op, volume, batch, cube, exact, rows):
    """Relative errors and cost of the importance-sampled -log p(I|V) for one s0."""
    rel, err, frac, n_rot, n_shift, times = [], [], [], [], [], []
    for rep in range(args.repeats):
        sampler = ImportanceSampler.from_state(state, s0=s0, seed=1000 * args.seed + rep,
                                               anneal=False, **caps)
        sampler.set_grid(grid)
        subsets = sampler.subsets(grid, rows, iteration=1)
        start = time.perf_counter()
        result = marginal_nll(op, volume, batch, grid, subsets, want_grad=False, cube=cube)
        times.append(time.perf_counter() - start)
        err.append(result.nll - exact.nll)
        rel.append(np.abs(result.nll - exact.nll) / np.abs(exact.nll))
        r_count, s_count = np.diff(subsets.rot_offsets), np.diff(subsets.shift_offsets)
        frac.append(r_count * s_count / grid.size)
        n_rot.append(r_count)
        n_shift.append(s_count)
    rel, err, frac = np.concatenate(rel), np.concatenate(err), np.concatenate(frac)
    return {"s0": s0, "median_rel_error": float(np.median(rel)),
            "p90_rel_error": float(np.percentile(rel, 90)), "max_rel_error": float(rel.max()),
            "mean_abs_error_nats": float(np.mean(np.abs(err))),
            "mean_error_nats": float(np.mean(err)),
            "mean_grid_fraction": float(np.mean(frac)), "speedup": float(1.0 / np.mean(frac)),
            "mean_rotations": float(np.mean(np.concatenate(n_rot))),
            "mean_shifts": float(np.mean(np.concatenate(n_shift))),
            "time_s": float(np.mean(times))}


# ---------------------------------------------------------------------- Figures 7 and 3


def read_history(path):
    """A ``history.tsv``'s columns as arrays (NaN where a value is empty)."""
    rows = records.read_history(path)
    return {k: np.array([r[k] for r in rows]) for k in (rows[0] if rows else {})}


def _stage_number(path):
    return int(re.sub(r"\D", "", path.name) or 0)


def run_figures(run_dir, plot_path=None):
    run_dir = Path(run_dir)
    seeds = sorted((run_dir / "abinitio").glob("seed*"), key=_stage_number)
    if not seeds:
        raise SystemExit(f"{run_dir}: no abinitio/seed*/ folders")
    out = {"run": str(run_dir), "seeds": {}}
    print(f"Figures 7 and 3 from {run_dir}")
    print(f"{'seed':>5} {'stage':>5} {'iters':>5} {'epochs':>6} {'full/iter':>11} "
          f"{'last-epoch fraction':>19} {'speed-up':>9} {'wall s':>7}  KL between epochs / "
          f"KL posterior-proposal, per epoch (means)")
    for seed_dir in seeds:
        stages = []
        for stage_dir in sorted(seed_dir.glob("stage*"), key=_stage_number):
            path = stage_dir / "history.tsv"
            if not path.exists():
                continue
            h = read_history(path)
            if not len(h.get("iteration", [])):
                continue
            epoch = h["epoch"]
            last = epoch > epoch.max() - 1.0 + 1e-9
            fraction = float(h["n_evaluated"][last].sum() / h["n_full"][last].sum())
            full_per_iteration = float(np.median(h["n_full"]))  # grid size x minibatch
            bins = np.ceil(epoch - 1e-9).astype(int)
            missing = np.full(len(epoch), np.nan)
            kl_visits = h.get("kl_epoch", missing)
            row = {"stage": _stage_number(stage_dir), "iterations": len(epoch),
                   "epochs": float(epoch.max()), "n_full_per_iteration": full_per_iteration,
                   "last_epoch_fraction": fraction, "speedup": 1.0 / fraction,
                   "wall_s": float(np.nanmax(h["wall_s"])),
                   "kl_epoch_per_epoch": _per_epoch(kl_visits, bins),
                   "kl_per_epoch": _per_epoch(h.get("kl", missing), bins),
                   "fraction_per_iteration": (h["n_evaluated"] / h["n_full"]).tolist(),
                   "kl": h.get("kl", missing).tolist(), "kl_epoch": kl_visits.tolist(),
                   "epoch": epoch.tolist()}
            stages.append(row)
            kl_text = " ".join(
                f"{_fmt(a)}/{_fmt(b)}"
                for a, b in zip(row["kl_epoch_per_epoch"], row["kl_per_epoch"]))
            print(f"{seed_dir.name:>5} {row['stage']:5d} {row['iterations']:5d} "
                  f"{row['epochs']:6.2f} {row['n_full_per_iteration']:11.3g} "
                  f"{fraction:19.3e} {row['speedup']:9.1f} {row['wall_s']:7.1f}  {kl_text}")
        out["seeds"][seed_dir.name] = stages
    if plot_path:
        plot_run(out, plot_path)
        print(f"plot saved to {plot_path}")
    # The JSON keeps the per-stage summaries, not the per-iteration series.
    for stages in out["seeds"].values():
        for row in stages:
            for key in ("fraction_per_iteration", "kl", "kl_epoch", "epoch"):
                row.pop(key)
    return out


def _per_epoch(values, bins):
    """Mean of the finite ``values`` in each epoch bin (NaN where there are none)."""
    out = []
    for b in np.unique(bins):
        v = values[bins == b]
        v = v[np.isfinite(v)]
        out.append(float(v.mean()) if len(v) else float("nan"))
    return out


def _fmt(value):
    return "nan" if not np.isfinite(value) else f"{value:.3f}"


def plot_run(out, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4))
    colours = plt.get_cmap("tab20").colors
    for ax in (ax1, ax2, ax3):
        ax.set_prop_cycle(color=colours)
    for seed, stages in out["seeds"].items():
        offset = 0.0
        for row in stages:
            epoch = np.array(row["epoch"]) + offset
            label = f"{seed} stage {row['stage']}"
            ax1.semilogy(epoch, row["fraction_per_iteration"], ".-", ms=3, label=label)
            for ax, key in ((ax2, "kl_epoch"), (ax3, "kl")):
                values = np.array(row[key])
                good = np.isfinite(values)
                ax.plot(np.array(row["epoch"])[good], values[good], ".-", ms=3, label=label)
            offset += row["epochs"]
    ax1.set_xlabel("epoch (cumulative over stages)")
    ax1.set_ylabel("fraction of the pose grid evaluated")
    ax1.set_title("Figure 7: importance sampling cost")
    ax2.set_xlabel("epoch within the stage")
    ax2.set_ylabel("KL(this visit || previous visit), nats")
    ax2.set_title("Figure 3: pose posterior KL between epochs")
    ax2.legend(fontsize=6, ncol=2)
    ax3.set_xlabel("epoch within the stage")
    ax3.set_ylabel("KL(posterior || proposal), directions, nats")
    ax3.set_title("posterior against its proposal")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------- with / without


def run_stages(images, ctf, box, pixel_size, stages, train, heldout, args, importance, workdir,
               quiet=False):
    volume = None
    state_path = None
    history = []
    start = time.perf_counter()
    for level, resolution in enumerate(stages):
        sbox, spsize = stage_box(box, pixel_size, resolution)
        stage_images = fourier_crop_2d(images, sbox)
        if volume is None:
            volume0 = initial.random_blobs(sbox, spsize, seed=args.seed + 1)
        else:
            volume0 = initial.resample_for_stage(volume, sbox)
        section = default_reconstruction_config(
            minibatch_size=args.minibatch, max_iterations=args.iterations,
            min_iterations=args.iterations, patience=10**6, heldout_every=args.heldout_every,
            checkpoint_every=10**6, importance_sampling=importance)
        config = StageConfig.from_config(section, stage=level + 1, seed=args.seed + 1)
        t0 = time.perf_counter()
        result = run_stage(volume0, stage_images, ctf, sbox / box, spsize, resolution, train,
                           heldout, config, sagd_state=state_path, log=lambda *_: None,
                           scale_start=(level == 0))
        wall = time.perf_counter() - t0
        volume = result.volume
        state_path = Path(workdir) / f"{'is' if importance else 'full'}_stage{level + 1}.npz"
        result.save_state(state_path)
        h = result.history
        evaluated = sum(r["n_evaluated"] for r in h)
        full = sum(r["n_full"] for r in h)
        history.append({"resolution_A": resolution, "box": sbox, "wall_s": wall,
                        "iterations": len(h), "grid_fraction": evaluated / full,
                        "heldout_nll": float(h[-1]["heldout_nll"])})
        if quiet:
            continue
        print(f"  {'with' if importance else 'without'} IS, stage {level + 1} "
              f"({resolution:g} A, box {sbox}): {wall:.1f} s, {len(h)} iterations, "
              f"{evaluated / full:.2%} of the grid, held-out nll {h[-1]['heldout_nll']:.3f}",
              flush=True)
    return volume, spsize, time.perf_counter() - start, history


def compare(args):
    t0 = time.perf_counter()
    images, ctf, _, truth, _ = simulated_set(args.box, args.pixel_size, args.particles,
                                             args.snr, args.seed)
    n_heldout = max(1, min(100, args.particles // 10))
    heldout_mask = choose_heldout(args.particles, n_heldout, seed=0)
    train, heldout = np.flatnonzero(~heldout_mask), np.flatnonzero(heldout_mask)
    print(f"with / without importance sampling: {args.particles} particles, {args.box} px at "
          f"{args.pixel_size} A/px, SNR {args.snr}, stages {args.stages} A, {args.iterations} "
          f"iterations of {args.minibatch} each per stage (simulated in "
          f"{time.perf_counter() - t0:.1f} s)", flush=True)
    out = {"particles": args.particles, "box": args.box, "pixel_size": args.pixel_size,
           "stages_A": args.stages, "iterations": args.iterations}
    with tempfile.TemporaryDirectory() as workdir:
        # Warm-up (JIT, caches), untimed, so neither run is charged for it.
        warm = argparse.Namespace(**{**vars(args), "iterations": 1})
        run_stages(images, ctf, args.box, args.pixel_size, args.stages[:1], train, heldout,
                   warm, True, workdir, quiet=True)
        for importance in (True, False):
            volume, spsize, wall, history = run_stages(
                images, ctf, args.box, args.pixel_size, args.stages, train, heldout, args,
                importance, workdir)
            reference = initial.resample_volume(truth, volume.shape[0])
            _, _, _, res = fsc_after_alignment(volume, reference, spsize)
            # The held-out error of the final volume summed over the whole last-stage grid:
            # the same yardstick for both runs (a run's own figure with importance sampling
            # is an estimate).
            last = stage_schedule(default_reconstruction_config(), len(args.stages), args.seed)
            exact = exact_heldout_nll(volume, images, ctf, args.box, args.pixel_size,
                                      args.stages[-1], last.undersampling, heldout)
            key = "with_is" if importance else "without_is"
            out[key] = {"wall_s": wall, "fsc_0143_A": float(res), "exact_heldout_nll": exact,
                        "stages": history}
            print(f"{'with' if importance else 'without'} importance sampling: {wall:.1f} s, "
                  f"FSC 0.143 to the truth {res:.1f} A (Nyquist of the last stage box "
                  f"{2 * spsize:.1f} A), exact held-out nll {exact:.3f}", flush=True)
    ratios = [b["wall_s"] / a["wall_s"] for a, b in zip(out["with_is"]["stages"],
                                                         out["without_is"]["stages"])]
    out["stage_wall_ratios"] = ratios
    out["wall_ratio_without_over_with"] = out["without_is"]["wall_s"] / out["with_is"]["wall_s"]
    print(f"wall time without / with importance sampling: "
          f"{out['wall_ratio_without_over_with']:.2f}x (per stage: "
          f"{', '.join(f'{r:.2f}x' for r in ratios)}); FSC 0.143: with "
          f"{out['with_is']['fsc_0143_A']:.1f} A, without {out['without_is']['fsc_0143_A']:.1f} A")
    return out


def exact_heldout_nll(volume, images, ctf, box, pixel_size, resolution, undersampling,
                      heldout):
    """Mean held-out -log p(I|V) over the whole grid of the stage at ``resolution``."""
    sbox, spsize = stage_box(box, pixel_size, resolution)
    op = SliceOperator(sbox, sbox * spsize / resolution)
    grid = pose_grid(resolution, sbox, spsize, undersampling)
    rows_ctf = {k: (v[heldout] if np.ndim(v) else v) for k, v in ctf.items()}
    batch = make_batch(op, fourier_crop_2d(images[heldout], sbox), rows_ctf, spsize, sbox / box)
    result = marginal_nll(op, volume, batch, grid, exhaustive_subsets(grid, len(batch)),
                          want_grad=False)
    return float(result.nll.mean())


# ---------------------------------------------------------------------- main


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a finished run's results/<dataset> folder")
    parser.add_argument("--plot", type=Path, help="with --run: save Figures 7 and 3 as a PNG")
    parser.add_argument("--compare", action="store_true",
                        help="run stages with and without importance sampling")
    parser.add_argument("--figure6", action="store_true",
                        help="also run Figure 6 with --run or --compare")
    parser.add_argument("--box", type=int, help="simulated box, px (Figure 6: 64, --compare: 48)")
    parser.add_argument("--pixel-size", type=float, default=3.0, help="A/px")
    parser.add_argument("--snr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    g6 = parser.add_argument_group("Figure 6")
    g6.add_argument("--images", type=int, default=40)
    g6.add_argument("--resolution", type=float, default=15.0, help="stage resolution, A")
    g6.add_argument("--undersampling", type=float, default=1.25,
                    help="grid undersampling (the pipeline uses 1.25 at 15 A, 1 from 12 A)")
    g6.add_argument("--s0", type=float, nargs="+", default=[1, 3, 10, 30, 100])
    g6.add_argument("--repeats", type=int, default=3, help="random seeds per s0")
    g6.add_argument("--no-uncapped", action="store_true",
                    help="skip the table without the sampler's per-image caps")
    gc = parser.add_argument_group("--compare")
    gc.add_argument("--particles", type=int, default=600)
    gc.add_argument("--stages", type=float, nargs="+", default=[40.0, 25.0, 20.0],
                    help="stage resolutions, A (a 15-A stage without importance sampling costs "
                    "~0.7 s per image at 48 px: minutes per epoch on 2 cores)")
    gc.add_argument("--iterations", type=int, default=12, help="iterations per stage")
    gc.add_argument("--minibatch", type=int, default=100)
    gc.add_argument("--heldout-every", type=int, default=4)
    args = parser.parse_args()

    summary = {}
    box = args.box
    if args.figure6 or not (args.run or args.compare):
        args.box = box or 64
        summary["figure6"] = figure6(args)
    if args.run:
        summary["figures7_3"] = run_figures(args.run, args.plot)
    if args.compare:
        args.box = box or 48
        summary["compare"] = compare(args)
    print(json.dumps(finite(summary)))


def finite(value):
    """NaN and infinities as null, so the last line is strict JSON."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


if __name__ == "__main__":
    main()
