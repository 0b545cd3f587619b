"""One coarse-to-fine stage of ab initio reconstruction: SAGD on the marginal likelihood.

A stage works on images Fourier-cropped to its box, uses the coefficients up to its resolution,
evaluates minibatches of training images with poses marginalised over its quadrature grid (or an
importance-sampled part of it), takes SAGD steps with the prior and non-negativity, tracks the
held-out images' mean negative log-likelihood, stops when that stops improving, and checkpoints
so a killed stage resumes where it was.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cryoday import importance as importance_mod
from cryoday.batch import make_batch
from cryoday.initial import low_pass
from cryoday.io import atomic_path, read_rows
from cryoday.likelihood import marginal_nll
from cryoday.pose_sets import empty_map_subsets
from cryoday.priors import make_prior
from cryoday.projection import SliceOperator
from cryoday.quadrature import pose_grid
from cryoday.sagd import SAGD

HISTORY_COLUMNS = ("iteration", "epoch", "objective", "heldout_nll", "eps", "L", "step", "wall_s",
                   "n_evaluated", "n_full", "kl", "kl_epoch")
IMAGE_CACHE_BYTES = 2 << 30  # stage images kept in memory below this size; streamed above it


@dataclass
class StageResult:
    """What a stage hands to the next one and to the user."""

    volume: np.ndarray
    optimiser: SAGD
    sampler: importance_mod.ImportanceSampler
    history: list = field(default_factory=list)
    rotations: np.ndarray | None = None
    shifts_px: np.ndarray | None = None
    nll: np.ndarray | None = None
    null_nll: np.ndarray | None = None
    heldout_rows: np.ndarray | None = None

    def save_state(self, path) -> None:
        self.optimiser.save(path, **self.sampler.state())

    def save_history(self, path) -> None:
        _write_history(path, self.history)

    def save_poses(self, path, pixel_size: float) -> None:
        _atomic_savez(path, rotations=self.rotations, shifts_A=self.shifts_px * pixel_size,
                      nll=self.nll, null_nll=self.null_nll,
                      heldout_rows=np.asarray(self.heldout_rows, dtype=np.int64))


def _atomic_savez(path, **arrays) -> None:
    with atomic_path(path) as tmp:
        np.savez(tmp, **arrays)


def _write_history(path, history) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_COLUMNS, delimiter="\t",
                                extrasaction="ignore")
        writer.writeheader()
        for row in history:
            writer.writerow({k: ("" if v is None or (isinstance(v, float) and np.isnan(v))
                                 else v) for k, v in row.items()})


class _Data:
    """Stage images and CTFs: held in memory when small, read per batch otherwise.

    Batches are built on demand (transforms, padded transforms for in-plane turning, CTFs), which
    costs a few FFTs per image; the last few are kept because an SAGD step evaluates the same
    minibatch several times (line search), and the held-out set is evaluated repeatedly.
    """

    KEPT_BATCHES = 4

    def __init__(self, op, images, ctf, sigma, pixel_size):
        self.op, self.images, self.ctf, self.pixel_size = op, images, ctf, pixel_size
        n = len(images)
        self.sigma = np.broadcast_to(np.asarray(sigma, np.float32), (n,))
        self.cache = None
        if images.nbytes <= IMAGE_CACHE_BYTES:
            self.cache = np.asarray(read_rows(images, np.arange(n)), dtype=np.float32)
        self._kept: dict = {}

    def batch(self, rows):
        rows = np.asarray(rows)
        key = rows.tobytes()
        if key in self._kept:
            return self._kept[key]
        if self.cache is not None:
            images = self.cache[rows]
        else:
            images = read_rows(self.images, np.sort(rows))[np.argsort(np.argsort(rows))]
        ctf = {k: (v[rows] if np.ndim(v) else v) for k, v in self.ctf.items()}
        batch = make_batch(self.op, images, ctf, self.pixel_size, self.sigma[rows])
        if len(self._kept) >= self.KEPT_BATCHES:
            self._kept.pop(next(iter(self._kept)))
        self._kept[key] = batch
        return batch


def finite_or_raise(nll: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``nll`` if every value is finite; otherwise an error naming the particles (1-based rows
    of the STAR file), whose images, CTF or the map hold NaN or infinite values (the likelihood
    makes a NaN energy the image's nll rather than dropping it)."""
    bad = ~np.isfinite(nll)
    if bad.any():
        named = ", ".join(str(int(r) + 1) for r in np.asarray(rows)[bad][:5])
        more = f" and {int(bad.sum()) - 5} more" if bad.sum() > 5 else ""
        raise FloatingPointError(
            f"the likelihood of particle row(s) {named}{more} is not finite: their images or "
            "CTF parameters, or the map, hold NaN or infinite values")
    return nll


def scale_to_data(volume, op, data, grid, rows, rng) -> np.ndarray:
    """Scale ``volume`` so its CTF-modulated slices carry the data's signal power.

    The data's signal power is its power minus the expected noise power (sigma^2 per
    coefficient); the model's is averaged over random grid rotations. Pure noise gives no
    signal: the volume is then kept at a tenth of the noise power, a harmless start.
    """
    batch = data.batch(rows)
    w = op.weights
    power = np.sum(w * np.abs(batch.data) ** 2, axis=1) - batch.sigma2 * w.sum()
    signal = max(float(np.mean(power)), 0.0)
    picks = rng.integers(0, len(grid.rotations), len(rows))
    slices = op.forward(volume, grid.rotations[picks])
    model = float(np.mean(np.sum(w * batch.ctf**2 * np.abs(slices) ** 2, axis=1)))
    if signal <= 0:
        signal = 0.1 * float(np.mean(batch.sigma2)) * w.sum()
    return (volume * np.sqrt(signal / max(model, 1e-30))).astype(np.float32)


def run_stage(volume0, images, ctf_params, sigma, pixel_size, resolution_A, train_rows,
              heldout_rows, config, sagd_state=None, log=print, checkpoint_path=None,
              scale_start=False) -> StageResult:
    """Run one stage; see the module docstring.

    Parameters
    ----------
    volume0 : (box, box, box) float32 start (resampled previous stage, or the random start)
    images : (n, box, box) array-like (a memory map), normalised, protein bright
    ctf_params : dict of (n,) arrays (``cryoday.ctf.evaluate_ctf`` argument names)
    sigma : float or (n,) noise standard deviation per pixel at this box
    pixel_size, resolution_A : float
    train_rows, heldout_rows : int arrays of particle rows
    config : dict with minibatch_size, max_iterations, min_iterations, patience, heldout_every,
        checkpoint_every, learning_rate, prior, prior_strength, undersampling, seed and
        optionally importance_sampling (bool), s0, shift_sigma_A
    sagd_state : path of the previous stage's state (``.npz``), or None for the first stage
    checkpoint_path : where to checkpoint; resumed from if it exists
    scale_start : scale ``volume0`` to the data's signal power (for random starts)
    """
    start_time = time.perf_counter()
    box = volume0.shape[0]
    radius = box * pixel_size / resolution_A
    op = SliceOperator(box, radius)
    grid = pose_grid(resolution_A, box, pixel_size, config.get("undersampling", 1.0),
                     shift_sigma_A=config.get("shift_sigma_A", 10.0))
    data = _Data(op, images, ctf_params, sigma, pixel_size)
    train_rows = np.asarray(train_rows)
    heldout_rows = np.asarray(heldout_rows)
    rng = np.random.default_rng(config.get("seed", 0))
    batch_size = int(config.get("minibatch_size", 200))
    n_batches = max(1, int(np.ceil(len(train_rows) / batch_size)))
    partition = np.array_split(rng.permutation(train_rows), n_batches)
    log(f"stage at {resolution_A:g} A: box {box}, {op.n_coef} coefficients, grid "
        f"{grid.n_dir} directions x {grid.n_inp} in-plane x {grid.n_shift} shifts "
        f"= {grid.size:,} points per image; {len(train_rows)} training images in "
        f"{n_batches} minibatches, {len(heldout_rows)} held out")

    volume = low_pass(volume0, radius)
    history: list[dict] = []
    iteration0 = 0
    eps = float(config.get("learning_rate", 1.0))
    sampler_kwargs = {"enabled": bool(config.get("importance_sampling", True)),
                      "s0": float(config.get("s0", 10.0)), "seed": int(config.get("seed", 0)),
                      "iterations_per_epoch": n_batches}
    if checkpoint_path and Path(checkpoint_path).exists():
        optimiser, extra = SAGD.load(checkpoint_path)
        volume = extra.pop("volume").astype(np.float32)
        history = _history_from_array(extra.pop("history"))
        sampler = importance_mod.ImportanceSampler.from_state(extra, **sampler_kwargs)
        iteration0 = len(history)
        log(f"resuming from checkpoint {checkpoint_path} at iteration {iteration0}")
    else:
        if sagd_state is not None:
            optimiser, extra = SAGD.load(sagd_state)
            sampler = importance_mod.ImportanceSampler.from_state(extra, **sampler_kwargs)
            if optimiser.n_batches != n_batches:
                optimiser = SAGD(n_batches, volume.shape, eps, optimiser.L,
                                 seed=config.get("seed", 0))
            optimiser.reset_for_new_stage(volume.shape, eps)
        else:
            optimiser = SAGD(n_batches, volume.shape, eps, L=1.0, seed=config.get("seed", 0))
            sampler = importance_mod.ImportanceSampler(len(images), **sampler_kwargs)
        if scale_start:
            sample = rng.choice(train_rows, min(len(train_rows), 200), replace=False)
            volume = scale_to_data(volume, op, data, grid, sample, rng)
    sampler.set_grid(grid)

    reference_density = float(volume[volume > 0.1 * volume.max()].mean()) if volume.max() > 0 \
        else 1.0
    prior = make_prior(config.get("prior", "exponential"), reference_density,
                       float(config.get("prior_strength", 1.0)))
    n_train = len(train_rows)
    state = {"iteration": 0}

    def objective(vol, batch_id, want_grad):
        rows = partition[batch_id]
        batch = data.batch(rows)
        subsets = sampler.subsets(grid, rows, state["iteration"])
        result = marginal_nll(op, vol, batch, grid, subsets, want_grad=want_grad)
        finite_or_raise(result.nll, rows)
        if want_grad:
            sampler.update(grid, rows, subsets, result)
            state["last"] = result
        grad = None if result.grad is None else result.grad / len(rows)
        return float(result.nll.mean()), grad

    def heldout_nll(vol):
        if len(heldout_rows) == 0:
            return float("nan")
        total = 0.0
        cube = op.prepare(vol)
        for rows in np.array_split(heldout_rows, max(1, len(heldout_rows) // batch_size)):
            subsets = sampler.subsets(grid, rows, state["iteration"])
            result = marginal_nll(op, vol, data.batch(rows), grid, subsets, want_grad=False,
                                  cube=cube)
            sampler.update(grid, rows, subsets, result)
            total += finite_or_raise(result.nll, rows).sum()
        return total / len(heldout_rows)

    max_iterations = int(config.get("max_iterations", 300))
    min_iterations = int(config.get("min_iterations", 20))
    patience = int(config.get("patience", 4))
    heldout_every = int(config.get("heldout_every", 10))
    checkpoint_every = int(config.get("checkpoint_every", 20))
    best_heldout = min((h["heldout_nll"] for h in history
                        if h["heldout_nll"] is not None and np.isfinite(h["heldout_nll"])),
                       default=np.inf)
    since_best = 0
    for iteration in range(iteration0 + 1, max_iterations + 1):
        state["iteration"] = optimiser.t
        batch_id = optimiser.next_batch()
        volume, figures = optimiser.step(volume, batch_id, objective, prior, n_train)
        last = state["last"]
        row = {"iteration": iteration, "epoch": iteration * batch_size / n_train,
               "heldout_nll": float("nan"), "n_evaluated": last.n_evaluated,
               "n_full": len(partition[batch_id]) * grid.size, "kl": sampler.last_kl,
               "kl_epoch": sampler.last_kl_epochs, **figures}
        stop = False
        if iteration % heldout_every == 0 or iteration == max_iterations:
            value = heldout_nll(volume)
            row["heldout_nll"] = value
            if not np.isfinite(best_heldout) or value < best_heldout - 1e-4 * abs(best_heldout):
                best_heldout, since_best = value, 0
            else:
                since_best += 1
            stop = iteration >= min_iterations and since_best >= patience
            log(f"iteration {iteration} (epoch {row['epoch']:.2f}): held-out nll {value:.4f}, "
                f"objective {row['objective']:.4f}, step {row['step']:.3g}, "
                f"evaluated {last.n_evaluated / row['n_full']:.2%} of the grid, "
                f"{time.perf_counter() - start_time:.1f} s")
        row["wall_s"] = time.perf_counter() - start_time
        history.append(row)
        if checkpoint_path and iteration % checkpoint_every == 0:
            optimiser.save(checkpoint_path, volume=volume, history=_history_array(history),
                           **sampler.state())
        if stop:
            log(f"held-out error has not improved for {patience} evaluations: stage done")
            break

    # Final poses of every particle at the final volume.
    rotations = np.empty((len(images), 3, 3))
    shifts = np.empty((len(images), 2))
    nll = np.empty(len(images))
    # -log p(I | V = 0), the images explained as pure noise: validation asks whether the map
    # explains the held-out images better than that (a likelihood-ratio test for signal).
    null_nll = np.empty(len(images))
    cube = op.prepare(volume)
    empty = np.zeros_like(volume)
    empty_cube = op.prepare(empty)
    chunks = np.array_split(np.arange(len(images)), max(1, len(images) // batch_size))
    log(f"final poses of all {len(images)} particles at the stage's map")
    next_report = 0.1
    for done, rows in enumerate(chunks, 1):
        batch = data.batch(rows)
        subsets = sampler.subsets(grid, rows, optimiser.t)
        result = marginal_nll(op, volume, batch, grid, subsets, want_grad=False, cube=cube)
        sampler.update(grid, rows, subsets, result)
        rotations[rows] = grid.rotations[result.best_rot]
        shifts[rows] = grid.shifts[result.best_shift]
        nll[rows] = result.nll
        null_nll[rows] = marginal_nll(op, empty, batch, grid, empty_map_subsets(grid, len(rows)),
                                      want_grad=False, cube=empty_cube).nll
        if done / len(chunks) >= next_report:
            log(f"final poses: {rows[-1] + 1} / {len(images)} particles, "
                f"{time.perf_counter() - start_time:.1f} s")
            next_report += 0.1
    return StageResult(volume, optimiser, sampler, history, rotations, shifts, nll, null_nll,
                       heldout_rows)


def _history_array(history) -> np.ndarray:
    return np.array([[np.nan if h.get(c) is None else float(h.get(c)) for c in HISTORY_COLUMNS]
                     for h in history], dtype=np.float64)


def _history_from_array(array) -> list[dict]:
    """A checkpoint's history rows; columns added since it was written (appended to
    ``HISTORY_COLUMNS``) are absent from its rows and read as missing."""
    return [dict(zip(HISTORY_COLUMNS, row)) for row in np.asarray(array).tolist()]
