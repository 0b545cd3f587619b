"""One coarse-to-fine stage of ab initio reconstruction: SAGD on the marginal likelihood.

A stage works on images Fourier-cropped to its box, uses the coefficients up to its resolution,
evaluates minibatches of training images with poses marginalised over its quadrature grid (or an
importance-sampled part of it), takes SAGD steps with the prior and non-negativity, tracks the
held-out images' mean negative log-likelihood, stops when that stops improving, and checkpoints
so that a killed stage, rerun, replays exactly: it ends with the map it would have had if it had
never been killed.

The pieces, composed by :func:`run_stage`:

* :class:`~cryoday.stage_config.StageConfig` (``cryoday/stage_config.py``): the stage's
  settings, built once from the validated ``reconstruction`` section, with
  :func:`~cryoday.stage_config.stage_schedule`'s learning rate, undersampling and seed;
* :class:`~cryoday.checkpoint.Checkpoint` (``cryoday/checkpoint.py``): what a stage saves to
  resume exactly, with a fingerprint of what produced it; one that no longer fits, or cannot be
  read, is discarded with a log line;
* :func:`resume_or_start`: the optimiser, importance sampler and history a stage starts from
  (its own checkpoint, the previous stage's state, or nothing);
* :func:`train`: SAGD iterations with held-out evaluation and early stopping
  (:class:`~cryoday.checkpoint.EarlyStopping`);
* :func:`final_poses`: every particle's most probable pose at the final map.

Above ``reconstruction.max_particles`` training particles, the SAGD loop trains on a random
subset of that size (:func:`~cryoday.stage_config.training_subset`), so that its stored
gradients (one volume per minibatch) do not grow with the data set; the final pose pass still
covers every particle.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from cryoday import classes, noise_refine, records, refine, shift_range, symmetry
from cryoday.batch import make_batch
from cryoday.checkpoint import Checkpoint, EarlyStopping, Start, stage_fingerprint
from cryoday.importance import ImportanceSampler
from cryoday.importance.sampler import FAR_SHARE_DROP, FAR_SHARE_QUANTILE
from cryoday.initial import low_pass
from cryoday.io import read_rows
from cryoday.likelihood import band_order, marginal_nll
from cryoday.pose_sets import empty_map_subsets
from cryoday.priors import make_prior
from cryoday.projection import SliceOperator
from cryoday.quadrature import pose_grid
from cryoday.sagd import SAGD
from cryoday.stage_config import StageConfig, training_subset
from cryoday.tunables import IMAGE_CACHE_BYTES, KEPT_BATCHES

# Training images whose power sets a random start's scale (``scale_to_data``).
SCALE_SAMPLE = 200


# ---------------------------------------------------------------------- data and objective


class _Data:
    """Stage images and CTFs: held in memory when small, read per batch otherwise.

    Batches are built on demand (transforms, padded transforms for in-plane turning, CTFs), which
    costs a few FFTs per image; the last few are kept because an SAGD step evaluates the same
    minibatch several times (line search), and the held-out set is evaluated repeatedly.
    """

    def __init__(self, op, images, ctf, sigma, pixel_size, noise=None, noise_group=None):
        self.op, self.images, self.ctf, self.pixel_size = op, images, ctf, pixel_size
        n = len(images)
        self.noise = noise
        self.noise_group = (None if noise is None else np.zeros(n, np.int64)
                            if noise_group is None else np.asarray(noise_group, np.int64))
        self.sigma = np.broadcast_to(np.asarray(sigma, np.float32), (n,))
        self.cache = None
        if images.nbytes <= IMAGE_CACHE_BYTES:
            self.cache = np.asarray(read_rows(images, np.arange(n)), dtype=np.float32)
        self._kept: dict = {}

    def __len__(self) -> int:
        return len(self.images)

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
        batch = make_batch(self.op, images, ctf, self.pixel_size, self.sigma[rows], self.noise,
                           None if self.noise is None else self.noise_group[rows])
        if len(self._kept) >= KEPT_BATCHES:
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


class _Objective:
    """The minibatch objective SAGD calls, and the held-out error, over one stage's data.

    ``iteration`` is the importance sampler's clock (SAGD's ``t`` when the step began), set by
    :func:`train` before each step; ``last`` is the last gradient evaluation's result, whose
    evaluated-point count goes into the history.
    """

    def __init__(self, op, data: _Data, grid, sampler, partition, heldout_rows, batch_size):
        self.op, self.data, self.grid, self.sampler = op, data, grid, sampler
        self.partition = partition
        self.heldout_rows = np.asarray(heldout_rows)
        self.batch_size = batch_size
        self.n_train = sum(len(p) for p in partition)
        self.n_classes = 1
        self.iteration = 0
        self.last = None
        # Each particle's last gradient evaluation (the sampler's clock then, -1 for none) and
        # its most probable grid pose and nll there: what the final pass of a stage that is
        # not the last keeps for the particles seen in its last epoch (:func:`final_poses`).
        n = len(data)
        self.visited_at = np.full(n, -1, np.int64)
        self.visit_rot = np.zeros(n, np.int64)
        self.visit_shift = np.zeros(n, np.int64)
        self.visit_nll = np.full(n, np.nan)

    def end_step(self) -> None:
        """After a SAGD step (K classes update their proportions here)."""

    def __call__(self, volume, batch_id: int, want_grad: bool):
        """Mean negative log-likelihood of minibatch ``batch_id`` and its gradient (or None)."""
        rows = self.partition[batch_id]
        subsets = self.sampler.subsets(self.grid, rows, self.iteration)
        result = marginal_nll(self.op, volume, self.data.batch(rows), self.grid, subsets,
                              want_grad=want_grad)
        finite_or_raise(result.nll, rows)
        if want_grad:
            self.sampler.update(self.grid, rows, subsets, result)
            self.last = result
            self.visited_at[rows] = self.iteration
            self.visit_rot[rows] = result.best_rot
            self.visit_shift[rows] = result.best_shift
            self.visit_nll[rows] = result.nll
        grad = None if result.grad is None else result.grad / len(rows)
        return float(result.nll.mean()), grad

    def heldout_nll(self, volume) -> float:
        """Mean negative log-likelihood of the held-out images (NaN if there are none)."""
        rows_all = self.heldout_rows
        if len(rows_all) == 0:
            return float("nan")
        total = 0.0
        cube = self.op.prepare(volume)
        for rows in np.array_split(rows_all, max(1, len(rows_all) // self.batch_size)):
            subsets = self.sampler.subsets(self.grid, rows, self.iteration)
            result = marginal_nll(self.op, volume, self.data.batch(rows), self.grid, subsets,
                                  want_grad=False, cube=cube)
            self.sampler.update(self.grid, rows, subsets, result, measure=False)
            total += finite_or_raise(result.nll, rows).sum()
        return total / len(rows_all)


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


# ---------------------------------------------------------------------- the stage's parts


def resume_or_start(volume, n_images: int, n_batches: int, config: StageConfig,
                    sagd_state=None, checkpoint: Checkpoint | None = None, log=print,
                    grid=None) -> Start:
    """The stage's own checkpoint if there is one that fits (see :class:`Checkpoint`); else
    the previous stage's optimiser and sampler (``sagd_state``, its stored gradients dropped:
    they do not survive resampling); else a fresh optimiser and sampler. ``volume`` is
    returned unless the checkpoint's replaces it. The sampler is set to ``grid`` (a
    checkpoint needs it: its dataset average lives on the grid)."""
    options = config.sampler_options(n_batches)
    eps = config.learning_rate
    sampler_type = classes.sampler_type(config.classes)
    if checkpoint is not None:
        if grid is None:
            raise ValueError("resuming from a checkpoint needs the stage's grid")
        resumed = checkpoint.load(config, volume.shape, n_images, n_batches, grid)
        if resumed is not None:
            return resumed
    if sagd_state is not None:
        optimiser, extra = SAGD.load(sagd_state)
        sampler = sampler_type.from_state(extra, **options)
        if optimiser.n_batches != n_batches:
            optimiser = SAGD(n_batches, volume.shape, eps, optimiser.L, seed=config.seed)
        optimiser.reset_for_new_stage(volume.shape, eps)
    else:
        optimiser = SAGD(n_batches, volume.shape, eps, L=1.0, seed=config.seed)
        sampler = classes.new_sampler(n_images, config.classes, options)
    if grid is not None:
        sampler.set_grid(grid)
    return Start(volume, optimiser, sampler, [], resumed=False)


def _symmetrised_gradients(objective, group: str):
    """``objective`` with its gradients averaged over the point group (values unchanged).

    The gradient is symmetrised rather than the volume after each step: on the asymmetric
    unit's grid the likelihood gradient at a symmetric map sees each image at one of its
    ``|G|`` equivalent poses, and its group average is the gradient the whole sphere's grid
    would give, so SAGD stays a gradient method on the symmetric maps (its line search and
    stored gradients included) and a symmetric start stays symmetric. Symmetrising the volume
    instead would step off the symmetric maps and project back, a step the line search never
    tested. One symmetrisation per iteration: line-search trials ask for no gradient.
    """
    def symmetric(volume, batch_id, want_grad):
        value, grad = objective(volume, batch_id, want_grad)
        if grad is None:
            return value, None
        return value, (classes.symmetrised(grad, group) if grad.ndim == 4
                       else symmetry.symmetrise(grad, group))

    return symmetric


def train(volume, optimiser: SAGD, objective: _Objective, prior, config: StageConfig,
          history: list, log=print, checkpoint: Checkpoint | None = None, start_time=None,
          after_iteration: Callable[[int], object] | None = None) -> np.ndarray:
    """SAGD iterations from ``len(history) + 1`` to ``config.max_iterations``, appending one
    row per iteration to ``history``; returns the final volume.

    Every ``heldout_every`` iterations (and at the last) the held-out error is evaluated; the
    stage stops once it has run ``min_iterations`` and the best error so far has improved by
    less than ``MIN_RELATIVE_IMPROVEMENT`` per evaluation over the last ``patience``
    evaluations (:class:`EarlyStopping`, replayed from ``history`` when resuming). The stage
    is saved to ``checkpoint`` every ``checkpoint_every`` iterations;
    ``after_iteration(iteration)`` is called after each iteration (and its checkpoint): a test
    kills the process there. With a point group
    (``config.symmetry``) every gradient is averaged over the group (see
    :func:`_symmetrised_gradients`): a symmetric start stays symmetric.
    """
    start_time = time.perf_counter() if start_time is None else start_time
    n_train = objective.n_train
    step_objective = (objective if config.symmetry == "C1"
                      else _symmetrised_gradients(objective, config.symmetry))
    stopping, stopped_at = EarlyStopping.replay(history, config)
    if stopped_at is not None:  # a checkpoint written as the stage stopped
        log(f"held-out error has stopped improving over {config.patience} evaluations: "
            "stage done")
        return volume
    flip_dropped = objective.sampler.flip_dropped
    for iteration in range(len(history) + 1, config.max_iterations + 1):
        objective.iteration = optimiser.t
        batch_id = optimiser.next_batch()
        volume, figures = optimiser.step(volume, batch_id, step_objective, prior, n_train)
        objective.end_step()
        if objective.sampler.flip_dropped and not flip_dropped:
            log(f"iteration {iteration}: the map tells views from their mirror images ("
                f"{FAR_SHARE_QUANTILE:.0%} of the particles keep under {FAR_SHARE_DROP:.0%} of "
                "their posterior on the far hemisphere): the proposals stop covering the "
                "antipodal directions")
            flip_dropped = True
        last = objective.last
        row = {"iteration": iteration, "epoch": iteration * config.minibatch_size / n_train,
               "heldout_nll": float("nan"), "n_evaluated": last.n_evaluated,
               "n_full": (len(objective.partition[batch_id]) * objective.grid.size
                          * objective.n_classes),
               "kl": objective.sampler.last_kl, "kl_epoch": objective.sampler.last_kl_epochs,
               **figures}
        stop = False
        if iteration % config.heldout_every == 0 or iteration == config.max_iterations:
            value = objective.heldout_nll(volume)
            row["heldout_nll"] = value
            stop = stopping.evaluate(iteration, value)
            log(f"iteration {iteration} (epoch {row['epoch']:.2f}): held-out nll {value:.4f}, "
                f"objective {row['objective']:.4f}, step {row['step']:.3g}, "
                f"evaluated {last.n_evaluated / row['n_full']:.2%} of the grid, "
                f"{time.perf_counter() - start_time:.1f} s")
        row["wall_s"] = time.perf_counter() - start_time
        history.append(row)
        if checkpoint is not None and iteration % config.checkpoint_every == 0:
            checkpoint.save(optimiser, volume, history, objective.sampler)
        if after_iteration is not None:
            after_iteration(iteration)
        if stop:
            log(f"held-out error has stopped improving over {config.patience} evaluations: "
                "stage done")
            break
    return volume


class Poses(NamedTuple):
    """Every particle's most probable pose at a map, and its likelihoods (nats)."""

    rotations: np.ndarray  # (n, 3, 3)
    shifts_px: np.ndarray  # (n, 2), pixels of the stage's box
    nll: np.ndarray  # -log p(I | V)
    null_nll: np.ndarray  # -log p(I | V = 0)


def pose_pass(objective, what: str, chunk, log=print, start_time=None, only=None) -> Poses:
    """The final pose pass's frame, shared by one class (:func:`final_poses`) and K
    (:func:`cryoday.classes.final_class_poses`): every particle (training and held out), or
    the rows ``only``, in chunks of the minibatch size; ``chunk(rows, batch)`` returns the rows'
    rotations, shifts (px) and nll, and the null nll (empty density) is added here; progress is
    logged every tenth of them. ``what`` ends the first log line. Rows not passed are NaN.

    ``null_nll`` explains the images as pure noise: validation asks whether the map explains
    the held-out images better than that (a likelihood-ratio test for signal). It is evaluated
    for the held-out images only (NaN for the others): it sums over every in-plane angle of the
    grid, so for every particle it cost twice the pose pass itself at a 10 A stage.
    """
    start_time = time.perf_counter() if start_time is None else start_time
    op, data, grid = objective.op, objective.data, objective.grid
    n = len(data)
    rotations, shifts = np.full((n, 3, 3), np.nan), np.full((n, 2), np.nan)
    nll, null_nll = np.full(n, np.nan), np.full(n, np.nan)
    passed = np.arange(n) if only is None else np.asarray(only, np.int64)
    passed = view_order(objective.sampler.store, passed, objective.batch_size)
    empty = np.zeros((op.box,) * 3, np.float32)
    empty_cube = op.prepare(empty)
    heldout = np.zeros(n, bool)
    heldout[objective.heldout_rows] = True
    chunks = np.array_split(passed, max(1, len(passed) // objective.batch_size))
    log(f"final poses {what}")
    next_report = 0.1
    for done, rows in enumerate(chunks, 1):
        batch = data.batch(rows)
        rotations[rows], shifts[rows], nll[rows] = chunk(rows, batch)
        held = np.flatnonzero(heldout[rows])
        if len(held):
            null_nll[rows[held]] = marginal_nll(
                op, empty, batch.take(held), grid, empty_map_subsets(grid, len(held)),
                want_grad=False, cube=empty_cube).nll
        if done / len(chunks) >= next_report:
            log(f"final poses: {sum(len(c) for c in chunks[:done])} / {len(passed)} particles, "
                f"{time.perf_counter() - start_time:.1f} s")
            next_report += 0.1
    return Poses(rotations, shifts, nll, null_nll)


def view_order(store, rows: np.ndarray, chunk: int) -> np.ndarray:
    """``rows`` in an order where consecutive chunks of ``chunk`` particles look from nearby
    directions (by each one's most probable stored direction; those without come last).

    A chunk's images then sample overlapping directions, so the distinct slices a chunk
    needs (its main cost at a fine stage) fall from about 20 per image to a few: the
    directions in :func:`~cryoday.likelihood.band_order`, with bands of tilt as wide as the
    patch of sphere one chunk covers.
    """
    rows = np.asarray(rows, np.int64)
    if len(rows) <= chunk:
        return rows
    best = np.argmax(store.dir_logp[rows], axis=1)
    order = band_order(store.dir_xyz[rows, best], np.sqrt(4.0 * np.pi * chunk / len(rows)))
    # Stable: the particles without a posterior go last, the others keep the bands' order.
    order = order[np.argsort(~store.has[rows][order], kind="stable")]
    return rows[order]


def recently_visited(objective: _Objective, since: int, min_passed: int) -> np.ndarray:
    """The particles whose last gradient evaluation was at the sampler clock ``since`` or
    later, less the earliest-visited of them as needed to leave ``min_passed`` particles (or
    all) to a pose pass."""
    visited = np.flatnonzero(objective.visited_at >= since)
    n = len(objective.visited_at)
    room = min(len(visited), n - min(n, min_passed))
    latest_first = visited[np.argsort(-objective.visited_at[visited], kind="stable")]
    return np.sort(latest_first[:room])


# The fewest particles a final pass evaluates when it keeps the others' last visits: the noise
# spectrum is refined from their residuals.
MIN_PASSED_PARTICLES = 2000


def final_poses(volume, objective: _Objective, iteration: int, log=print,
                start_time=None, residuals=None, keep_last_epoch: bool = False) -> Poses:
    """The pose pass over every particle (:func:`pose_pass`) at the final ``volume``, with the
    sampler's proposals at ``iteration`` (their posteriors are updated too); with
    ``residuals`` (a :class:`cryoday.noise_refine.ResidualPower`) each image's residual at its
    most probable pose is added to it.

    With ``keep_last_epoch`` (a stage that is not the last) the particles SAGD evaluated in
    the stage's last epoch keep that evaluation: its pose, nll and stored posterior, made at a
    map one epoch from the final one, which is what the next stage's sampler builds on anyway
    (it diffuses the posteriors onto a finer grid). The pass then covers the others (those
    outside the training subset, held out, or not seen for an epoch; at least
    ``MIN_PASSED_PARTICLES``): half the pass of a 40,000-particle set with the default
    ``max_particles``. The last stage's pass covers every particle: its poses are the result.
    """
    op, data, grid, sampler = objective.op, objective.data, objective.grid, objective.sampler
    cube = op.prepare(volume)
    kept = (recently_visited(objective, iteration - len(objective.partition),
                             MIN_PASSED_PARTICLES)
            if keep_last_epoch else np.zeros(0, np.int64))
    passed = np.setdiff1d(np.arange(len(data)), kept)

    def chunk(rows, batch):
        subsets = sampler.subsets(grid, rows, iteration)
        result = marginal_nll(op, volume, batch, grid, subsets, want_grad=False, cube=cube)
        sampler.update(grid, rows, subsets, result, measure=False)
        rotations, shifts = grid.rotations[result.best_rot], grid.shifts[result.best_shift]
        if residuals is not None:
            residuals.add(cube, batch, rotations, shifts,
                          None if data.noise_group is None else data.noise_group[rows])
        return rotations, shifts, result.nll

    what = (f"of all {len(data)} particles at the stage's map" if len(kept) == 0 else
            f"of {len(passed)} of {len(data)} particles at the stage's map (the other "
            f"{len(kept)} keep their evaluation in the stage's last epoch)")
    poses = pose_pass(objective, what, chunk, log, start_time,
                      only=passed if len(kept) else None)
    poses.rotations[kept] = grid.rotations[objective.visit_rot[kept]]
    poses.shifts_px[kept] = grid.shifts[objective.visit_shift[kept]]
    poses.nll[kept] = objective.visit_nll[kept]
    return poses


# ---------------------------------------------------------------------- the stage


@dataclass
class StageResult:
    """What a stage hands to the next one and to the user."""

    volume: np.ndarray
    optimiser: SAGD
    sampler: ImportanceSampler
    history: list = field(default_factory=list)
    rotations: np.ndarray | None = None
    shifts_px: np.ndarray | None = None
    nll: np.ndarray | None = None
    null_nll: np.ndarray | None = None
    heldout_rows: np.ndarray | None = None
    shift_estimate: shift_range.ShiftEstimate | None = None  # the final shift posteriors' fit
    noise: object = None  # the noise spectrum refined from the final poses' residuals, or None
    volumes: np.ndarray | None = None  # (K, box, box, box) class maps; volume is the main one's
    class_posterior: np.ndarray | None = None  # (n, K), K > 1 only

    def _shift_state(self) -> dict:
        return {} if self.shift_estimate is None else self.shift_estimate.state()

    def save_state(self, path) -> None:
        """``state.npz``: what the next stage starts from (with the learned shift range)."""
        self.optimiser.save(path, **self.sampler.state(), **self._shift_state())

    def save_history(self, path) -> None:
        records.write_history(path, self.history)

    def save_classes(self, path, pixel_size: float, resolution_A: float | None = None) -> None:
        """``classes.npz`` (:func:`cryoday.records.write_classes`)."""
        if self.volumes is None or len(self.volumes) == 1:
            records.write_classes(path, self.volume[None], [1.0], pixel_size,
                                  np.ones((len(self.history), 1)), resolution_A)
            return
        records.write_classes(path, self.volumes, self.sampler.proportions(), pixel_size,
                              self.sampler.proportion_history, resolution_A)

    def save_poses(self, path, pixel_size: float) -> None:
        records.write_poses(path, self.rotations, self.shifts_px * pixel_size, self.nll,
                            self.null_nll, self.heldout_rows, self.class_posterior,
                            **self._shift_state())


def run_stage(volume0, images, ctf_params, sigma, pixel_size, resolution_A, train_rows,
              heldout_rows, config: StageConfig, sagd_state=None,
              log: Callable[[str], object] = print, checkpoint_path=None,
              scale_start=False,
              after_iteration: Callable[[int], object] | None = None, noise=None,
              noise_group=None, full_box: int | None = None,
              reseeded: tuple = (), last_stage: bool = True,
              refine_rounds: int = 0) -> StageResult:
    """Run one stage; see the module docstring.

    Parameters
    ----------
    volume0 : (box, box, box) or (K, box, box, box) float32
        Start (the resampled previous stage, or the random start); with
        ``config.classes = K > 1`` one map per class (:mod:`cryoday.classes`).
    images : (n, box, box) array-like
        A memory map of the stage's images, normalised, protein bright.
    ctf_params : dict of (n,) arrays
        ``cryoday.ctf.evaluate_ctf`` argument names.
    sigma : float or (n,) array
        Noise standard deviation per pixel at this box.
    pixel_size, resolution_A : float
        The stage's pixel size and resolution (A).
    train_rows, heldout_rows : int arrays
        Particle rows. SAGD trains on at most ``config.max_particles`` of the training rows
        (:func:`~cryoday.stage_config.training_subset`: the same ones in every stage of a
        start); the held-out rows and the final pose pass are not subsampled.
    config : StageConfig
    sagd_state : path or None
        The previous stage's ``state.npz``, or None for the first stage.
    log : callable
        Receives one progress line at a time.
    checkpoint_path : path or None
        Where to checkpoint; resumed from if it exists and its fingerprint matches the
        stage's (see :class:`Checkpoint`). A stage that fails after resuming sets it aside.
    scale_start : bool
        Scale ``volume0`` to the data's signal power (for random starts).
    after_iteration : callable or None
        Called with each iteration's number once it (and its checkpoint) is done.
    noise : cryoday.noise.NoiseSpectrum or None
        Relative radial noise power per group (None: white); every likelihood term weights
        each coefficient by its inverse.
    noise_group : (n,) int array or None
        Each particle's group in ``noise`` (default: the first).
    full_box : int or None
        The full-size images' box: with it and ``noise``, the spectrum is refined from the
        residuals at the final poses (:mod:`cryoday.noise_refine`) into ``result.noise``.
    reseeded : sequence of (class, twin)
        Classes whose start in ``volume0`` is a new one (:func:`cryoday.classes.find_duplicates`):
        their particles pass to their twin, and their pose posteriors are replaced by a copy
        of the twin's (:meth:`cryoday.classes.ClassSamplers.reseed`).
    last_stage : bool
        False for a stage the schedule follows with another: its final pass keeps the last
        epoch's evaluations of the particles SAGD saw then (:func:`final_poses`; one class).
    refine_rounds : int
        After the final pass of a last stage of one class, this many EM rounds at the stage's
        images and grid (:mod:`cryoday.refine`): the poses (and the posteriors in the state)
        are then the last round's; the stage's map stays SAGD's.
    """
    start_time = time.perf_counter()
    n_classes = config.classes
    volume0 = np.asarray(volume0, np.float32)
    if n_classes > 1 and (volume0.ndim != 4 or len(volume0) != n_classes):
        raise ValueError(f"{n_classes} classes need {n_classes} start maps, got an array of "
                         f"shape {volume0.shape}")
    box = volume0.shape[-1]
    radius = box * pixel_size / resolution_A
    op = SliceOperator(box, radius)
    shift_prior = shift_range.for_stage(config.shift_sigma_A, box * pixel_size, sagd_state, log)
    grid = pose_grid(resolution_A, box, pixel_size, config.undersampling,
                     shift_sigma_A=shift_prior.sigma_A, shift_radius_A=shift_prior.radius_A,
                     symmetry=config.symmetry)
    data = _Data(op, images, ctf_params, sigma, pixel_size, noise, noise_group)
    train_rows = np.asarray(train_rows)
    heldout_rows = np.asarray(heldout_rows)
    # SAGD trains on at most max_particles of them (the same ones in every stage of the start);
    # the final pose pass covers every particle.
    fitted = training_subset(train_rows, config.max_particles, config.start_seed)
    # One generator, drawn in this order: the partition, then a random start's scale sample.
    rng = np.random.default_rng(config.seed)
    n_batches = max(1, int(np.ceil(len(fitted) / config.minibatch_size)))
    partition = np.array_split(rng.permutation(fitted), n_batches)
    subset = ("" if len(fitted) == len(train_rows) else
              f" (a random {len(fitted)} of {len(train_rows)}: reconstruction.max_particles)")
    log(f"stage at {resolution_A:g} A: box {box}, {op.n_coef} coefficients, grid "
        f"{grid.n_dir} directions x {grid.n_inp} in-plane x {grid.n_shift} shifts "
        f"= {grid.size:,} points per image; {len(fitted)} training images{subset} in "
        f"{n_batches} minibatches, {len(heldout_rows)} held out")

    checkpoint = None
    if checkpoint_path:
        checkpoint = Checkpoint(checkpoint_path, stage_fingerprint(
            config, images, ctf_params, sigma, pixel_size, resolution_A, train_rows,
            heldout_rows, volume0, sagd_state, scale_start, noise, noise_group), log)
    each = classes.per_class if n_classes > 1 else (lambda f, v: f(v))
    volume_start = each(lambda v: low_pass(v, radius), volume0)
    if config.symmetry != "C1":
        # The grid holds one asymmetric unit: the map must be symmetric from the start (a
        # random start too), and the symmetrised gradients keep it so (see ``train``).
        volume_start = each(lambda v: symmetry.symmetrise(v, config.symmetry), volume_start)
        log(f"symmetry {config.symmetry} (order {symmetry.order(config.symmetry)}): the grid "
            "covers one asymmetric unit, the start map and every gradient are symmetrised")
    start = resume_or_start(volume_start, len(images), n_batches, config,
                            sagd_state, checkpoint, log, grid)
    volume = start.volume
    reference_density = start.reference_density
    if not start.resumed:
        for duplicate, twin in reseeded:
            start.sampler.reseed(duplicate, twin, config.sampler_options(n_batches), grid)
        if scale_start:
            sample = rng.choice(fitted, min(len(fitted), SCALE_SAMPLE), replace=False)
            volume = each(lambda v: scale_to_data(v, op, data, grid, sample, rng), volume)
        top = volume.max()
        reference_density = float(volume[volume > 0.1 * top].mean()) if top > 0 else 1.0
    if checkpoint is not None:
        checkpoint.reference_density = reference_density
    prior = make_prior(config.prior, reference_density, config.prior_strength)
    if n_classes > 1:
        prior = classes.PerClassPrior(prior)
        objective = classes.MixtureObjective(op, data, grid, start.sampler, partition,
                                             heldout_rows, config.minibatch_size,
                                             finite_or_raise)
        log(f"{n_classes} classes, each from its own start; proportions "
            + ", ".join(f"{p:.2f}" for p in start.sampler.proportions()))
    else:
        objective = _Objective(op, data, grid, start.sampler, partition, heldout_rows,
                               config.minibatch_size)
    try:
        volume = train(volume, start.optimiser, objective, prior, config, start.history, log,
                       checkpoint, start_time, after_iteration)
        residuals = (None if noise is None or full_box is None
                     else noise_refine.ResidualPower(op, noise, pixel_size))
        class_posterior = None
        if n_classes > 1:
            poses, class_posterior = classes.final_class_poses(
                volume, objective, start.optimiser.t, log, start_time, residuals)
        else:
            refining = last_stage and refine_rounds > 0
            poses = final_poses(volume, objective, start.optimiser.t, log, start_time,
                                None if refining else residuals, keep_last_epoch=not last_stage)
            if refining:
                log(f"refinement: {refine_rounds} EM rounds at the stage's images and grid "
                    "(a map from every particle's pose posterior, then a pose pass at it)")
                poses, _, _ = refine.refine(volume, poses, objective, start.optimiser.t,
                                            refine_rounds, images, ctf_params, pixel_size,
                                            config.symmetry, log, start_time, residuals,
                                            seed=config.seed)
    except Exception as error:
        # Out of memory or disk is the machine's, not the checkpoint's fault: keep it.
        if start.resumed and not isinstance(error, (OSError, MemoryError)):
            checkpoint.set_aside(error)
        raise
    learned = shift_range.learn(start.sampler.store, grid, shift_prior, log)
    refined = None
    if residuals is not None:
        refined, ratio = residuals.refined(full_box)
        log("noise spectrum refined from the residuals at the final poses: "
            + noise_refine.change_summary(noise, refined, ratio))
    volumes = volume if n_classes > 1 else volume[None]
    main_volume = volumes[start.sampler.main] if n_classes > 1 else volume
    return StageResult(main_volume, start.optimiser, start.sampler, start.history, *poses,
                       heldout_rows, learned, refined, volumes, class_posterior)


__all__ = [
    "Poses",
    "StageResult",
    "final_poses",
    "finite_or_raise",
    "pose_pass",
    "resume_or_start",
    "run_stage",
    "scale_to_data",
    "train",
]
