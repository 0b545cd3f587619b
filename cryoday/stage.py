"""One coarse-to-fine stage of ab initio reconstruction: SAGD on the marginal likelihood.

A stage works on images Fourier-cropped to its box, uses the coefficients up to its resolution,
evaluates minibatches of training images with poses marginalised over its quadrature grid (or an
importance-sampled part of it), takes SAGD steps with the prior and non-negativity, tracks the
held-out images' mean negative log-likelihood, stops when that stops improving, and checkpoints
so that a killed stage, rerun, replays exactly: it ends with the map it would have had if it had
never been killed.

The pieces, composed by :func:`run_stage`:

* :class:`StageConfig`: the stage's settings, built once from the validated ``reconstruction``
  section, with :func:`stage_schedule`'s learning rate, undersampling and seed for the stage;
* :class:`Checkpoint`: what a stage saves to resume exactly, with a fingerprint of what
  produced it (:func:`stage_fingerprint`); one that no longer fits, or cannot be read, is
  discarded with a log line;
* :func:`resume_or_start`: the optimiser, importance sampler and history a stage starts from
  (its own checkpoint, the previous stage's state, or nothing);
* :func:`train`: SAGD iterations with held-out evaluation and early stopping
  (:class:`EarlyStopping`);
* :func:`final_poses`: every particle's most probable pose at the final map.

Defaults live only in ``workflow/schemas/config.schema.yaml``; :func:`default_reconstruction_config`
reads them for tests and benchmarks that run a stage without the workflow.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, NamedTuple

import numba
import numpy as np
import scipy
import yaml

from cryoday import __version__, records, shift_range
from cryoday.batch import make_batch
from cryoday.errors import InputError
from cryoday.importance import ImportanceSampler
from cryoday.initial import low_pass
from cryoday.io import read_rows
from cryoday.likelihood import marginal_nll
from cryoday.pose_sets import empty_map_subsets
from cryoday.priors import make_prior
from cryoday.projection import SliceOperator
from cryoday.quadrature import pose_grid, undersampling_for_level
from cryoday.sagd import SAGD
from cryoday.tunables import IMAGE_CACHE_BYTES, KEPT_BATCHES

SCHEMA = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"
# A held-out error counts as an improvement when it beats the best so far by this fraction:
# the importance-sampled estimate wobbles by less, a real gain in a stage's last epochs by more.
MIN_RELATIVE_IMPROVEMENT = 1e-4
# Training images whose power sets a random start's scale (``scale_to_data``).
SCALE_SAMPLE = 200


# ---------------------------------------------------------------------- configuration


class StageSchedule(NamedTuple):
    """What changes from stage to stage: SAGD's learning rate, the grid's angular
    undersampling and the stage's random seed."""

    learning_rate: float
    undersampling: float
    seed: int


def stage_schedule(section: dict, stage: int, seed: int) -> StageSchedule:
    """The schedule of stage ``stage`` (1-based) of random start ``seed``.

    The learning rate halves at each stage, floored at ``learning_rate_min``; undersampling
    ``'auto'`` follows ``cryoday.quadrature.UNDERSAMPLING_BY_LEVEL``, a list gives one factor per
    stage (1 beyond its end); the stage's seed is ``seed * 1000 + stage``, so every stage of every
    start draws its own minibatches and importance samples.
    """
    level = stage - 1
    learning_rate = max(section["learning_rate_min"], section["learning_rate"] * 0.5**level)
    factors = section["undersampling"]
    if factors == "auto":
        undersampling = undersampling_for_level(level)
    else:
        undersampling = float(factors[level]) if level < len(factors) else 1.0
    return StageSchedule(float(learning_rate), float(undersampling), int(seed) * 1000 + stage)


# A field's annotation (a string: annotations are postponed) -> how a config value is cast.
_CASTS = {"int": int, "float": float, "bool": bool, "str": str,
          "tuple": lambda values: tuple(float(v) for v in values)}


@dataclass(frozen=True)
class StageConfig:
    """A stage's settings (the schema's ``reconstruction`` keys, with the stage's schedule
    applied); no field has a default: build it with :meth:`from_config`."""

    minibatch_size: int
    max_iterations: int
    min_iterations: int
    patience: int
    heldout_every: int
    checkpoint_every: int
    learning_rate: float
    undersampling: float
    seed: int
    prior: str
    prior_strength: float
    shift_sigma_A: float
    importance_sampling: bool
    s0: float
    importance_min_grid_points: int
    importance_max_rotations: int
    importance_max_shifts: int
    importance_coverage: float
    importance_dataset_prior: tuple

    @classmethod
    def from_config(cls, section: dict, stage: int, seed: int) -> StageConfig:
        """The settings of stage ``stage`` (1-based) of random start ``seed``.

        Parameters
        ----------
        section : dict
            The validated config's ``reconstruction`` section, defaults filled in
            (``validate(..., set_default=True)``, or :func:`default_reconstruction_config`).
        stage, seed : int
            See :func:`stage_schedule`.
        """
        schedule = stage_schedule(section, stage, seed)._asdict()
        keys = [f for f in fields(cls) if f.name not in schedule]
        missing = [f.name for f in keys if f.name not in section]
        if missing:
            raise InputError(f"reconstruction.{missing[0]} is missing: the section must be "
                             "validated against the schema, which fills in the defaults")
        values = {f.name: _CASTS[f.type](section[f.name]) for f in keys}
        return cls(**values, **schedule)

    def sampler_options(self, iterations_per_epoch: int) -> dict:
        """The importance sampler's constructor arguments."""
        return {"enabled": self.importance_sampling, "s0": self.s0, "seed": self.seed,
                "iterations_per_epoch": iterations_per_epoch,
                "min_grid_points": self.importance_min_grid_points,
                "max_rotations": self.importance_max_rotations,
                "max_shifts": self.importance_max_shifts,
                "coverage": self.importance_coverage,
                "dataset_prior": self.importance_dataset_prior}


def default_reconstruction_config(schema=SCHEMA, **overrides) -> dict:
    """The ``reconstruction`` section as the workflow sees it when the user sets only
    ``overrides``: the schema's defaults, updated.

    For tests and benchmarks that run stages without Snakemake; the workflow fills the same
    defaults with ``validate(config, schema, set_default=True)``. The schema is the checkout's
    (``workflow/`` is not part of the installed package): pass ``schema`` from elsewhere.
    """
    with open(schema) as f:
        spec = yaml.safe_load(f)["properties"]["reconstruction"]["properties"]
    unknown = sorted(set(overrides) - set(spec))
    if unknown:
        raise InputError(f"reconstruction.{unknown[0]}: not a key of {schema}")
    section = {k: copy.deepcopy(v["default"]) for k, v in spec.items() if "default" in v}
    section.update(overrides)
    return section


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
        self.iteration = 0
        self.last = None

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
            self.sampler.update(self.grid, rows, subsets, result)
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


# ---------------------------------------------------------------------- checkpoints

# StageConfig fields that change no number of the stage, only how often it is saved: a
# checkpoint written with another value replays exactly.
NEUTRAL_PARAMS = frozenset({"checkpoint_every"})
# Fields that decide only when the stage stops: a checkpoint written with other values is
# kept when the stage as now configured would have run the same iterations up to it (see
# ``Checkpoint._length_change``), so raising ``max_iterations`` continues a killed stage.
LENGTH_PARAMS = ("max_iterations", "min_iterations", "patience")
# The fingerprint's inputs that are digests of contents, as a log line names them.
INPUT_NAMES = {"images": "images", "ctf": "CTF parameters", "sigma": "noise sigma",
               "train_rows": "training rows", "heldout_rows": "held-out rows",
               "start_volume": "start volume", "previous_state": "previous stage's state"}
# Images hashed for the fingerprint, evenly spaced: a changed preprocessing changes every
# image (or their number, which is hashed too), and 256 images of 128 px are 16 MB to read.
FINGERPRINT_IMAGES = 256
# Blocks of the previous stage's state file hashed (with its size): the file holds stored
# gradients (GBs at large boxes), and a previous stage rerun with another result also changes
# its volume, which is hashed whole as this stage's start.
FINGERPRINT_BLOCKS, FINGERPRINT_BLOCK_BYTES = 64, 1 << 16
# History columns that are integers (a checkpoint stores the history as float64).
_INT_COLUMNS = ("iteration", "n_evaluated", "n_full")


def _digest(*parts) -> str:
    """A short hash of strings and arrays (their dtype and shape included)."""
    h = hashlib.blake2b(digest_size=12)
    for part in parts:
        if isinstance(part, str):
            h.update(part.encode())
        else:
            a = np.ascontiguousarray(part)
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def _file_digest(path) -> str:
    """A short hash of a file's size and ``FINGERPRINT_BLOCKS`` blocks spread over it."""
    size = os.path.getsize(path)
    h = hashlib.blake2b(str(size).encode(), digest_size=12)
    offsets = np.linspace(0, max(size - FINGERPRINT_BLOCK_BYTES, 0), FINGERPRINT_BLOCKS)
    with open(path, "rb") as f:
        for offset in np.unique(offsets.astype(np.int64)):
            f.seek(int(offset))
            h.update(f.read(FINGERPRINT_BLOCK_BYTES))
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def code_version() -> dict:
    """The code a stage runs: cryoday's version, a hash of its source files and the versions
    of the libraries whose arithmetic the numbers depend on.

    The source hash, not the version alone: an edited checkout keeps its version number, and
    a checkpoint written by other code would not replay. Every edit of an engine file (a
    comment too) therefore discards checkpoints, which costs a restart, never a wrong map.
    """
    package = Path(__file__).resolve().parent
    h = hashlib.blake2b(digest_size=12)
    for path in sorted(package.rglob("*.py")):
        h.update(path.relative_to(package).as_posix().encode())
        h.update(path.read_bytes())
    return {"cryoday": __version__, "source": h.hexdigest(), "numpy": np.__version__,
            "scipy": scipy.__version__, "numba": numba.__version__}


def stage_fingerprint(config: StageConfig, images, ctf_params, sigma, pixel_size: float,
                      resolution_A: float, train_rows, heldout_rows, volume0,
                      sagd_state=None, scale_start: bool = False, noise=None,
                      noise_group=None) -> dict:
    """What a stage's numbers are a function of, for its checkpoint (JSON-ready).

    ``code`` is :func:`code_version`; ``params`` every :class:`StageConfig` field but
    ``NEUTRAL_PARAMS``; ``inputs`` everything else :func:`run_stage` is given: digests of the
    images (shape, dtype and ``FINGERPRINT_IMAGES`` of them), CTF parameters, noise sigma,
    training and held-out rows, the start volume (whole: it carries the previous stage's map,
    the initial model or the random start's seed), the previous stage's state file (size and
    sampled blocks), and the pixel size, resolution and ``scale_start`` as values. Thread
    counts are not in it: they are the same machine's choice, as the README's promise says.
    Content rather than file times: a copied or re-made identical input keeps the checkpoint.
    """
    n = len(images)
    sample = np.unique(np.linspace(0, n - 1, min(n, FINGERPRINT_IMAGES)).round().astype(np.int64))
    ctf = [part for key in sorted(ctf_params)
           for part in (key, np.asarray(ctf_params[key], dtype=np.float64))]
    inputs = {
        "images": _digest(np.asarray(np.shape(images)), str(getattr(images, "dtype", "")),
                          read_rows(images, sample) if n else np.zeros(0)),
        "ctf": _digest(*ctf),
        "sigma": _digest(np.asarray(sigma, dtype=np.float64)),
        "train_rows": _digest(np.asarray(train_rows, dtype=np.int64)),
        "heldout_rows": _digest(np.asarray(heldout_rows, dtype=np.int64)),
        "start_volume": _digest(np.asarray(volume0)),
        "previous_state": None if sagd_state is None else _file_digest(sagd_state),
        "pixel_size": float(pixel_size), "resolution_A": float(resolution_A),
        "scale_start": bool(scale_start),
    }
    if noise is not None:  # absent for white noise: older checkpoints stay valid
        inputs["noise"] = _digest(noise.shells, noise.power, np.asarray(
            np.zeros(n) if noise_group is None else noise_group, dtype=np.int64))
    params = {f.name: getattr(config, f.name) for f in fields(config)
              if f.name not in NEUTRAL_PARAMS}
    # Through JSON, as a saved one is read back (tuples become lists).
    return json.loads(json.dumps({"code": code_version(), "params": params, "inputs": inputs}))


class EarlyStopping:
    """The held-out error's best so far and the evaluations since it last improved (by
    ``MIN_RELATIVE_IMPROVEMENT``).

    A pure function of the evaluations in order, so a resumed stage rebuilds it exactly from
    its history (:meth:`replay`) rather than restarting the count.
    """

    def __init__(self, config: StageConfig):
        self.min_iterations, self.patience = config.min_iterations, config.patience
        self.best, self.since_best = np.inf, 0

    def evaluate(self, iteration: int, value: float) -> bool:
        """Count the held-out error ``value`` at ``iteration``; whether the stage stops."""
        if not np.isfinite(self.best) or value < self.best - MIN_RELATIVE_IMPROVEMENT * abs(
                self.best):
            self.best, self.since_best = value, 0
        else:
            self.since_best += 1
        return iteration >= self.min_iterations and self.since_best >= self.patience

    @classmethod
    def replay(cls, history: list, config: StageConfig) -> tuple[EarlyStopping, int | None]:
        """The state after ``history``'s evaluations, and the first iteration at which ``config``
        stops (None if none). Rows without a finite held-out error are not evaluations (or, with
        no held-out images, evaluations that change nothing)."""
        stopping, stopped_at = cls(config), None
        for row in history:
            value = row.get("heldout_nll")
            if value is None or not np.isfinite(value):
                continue
            if stopping.evaluate(int(row["iteration"]), value) and stopped_at is None:
                stopped_at = int(row["iteration"])
        return stopping, stopped_at


@dataclass
class Start:
    """What a stage starts from (see :func:`resume_or_start`); ``reference_density`` is the
    prior's, saved in a checkpoint (None: take it from ``volume``)."""

    volume: np.ndarray
    optimiser: SAGD
    sampler: ImportanceSampler
    history: list
    resumed: bool
    reference_density: float | None = None


class Checkpoint:
    """A stage's checkpoint file: what it saves, and whether a saved one may be resumed.

    It holds everything the next iteration depends on: the volume; the optimiser (``L``,
    ``t``, stored gradients and weights, the epoch's minibatch order and its generator); the
    sampler's per-image posteriors and its dataset average's sums (``state(exact=True)``);
    the prior's reference density (taken from the stage's start volume, not the
    checkpoint's); the history (from which :class:`EarlyStopping` is rebuilt); and the
    fingerprint of what produced it. The minibatch partition is not saved: it is the stage
    generator's first draw (seed, rows and minibatch size are in the fingerprint), and that
    generator draws nothing after the start.

    Parameters
    ----------
    path : path of the ``.npz``
    fingerprint : dict from :func:`stage_fingerprint`, the stage as it is now
    log : callable receiving one line
    """

    def __init__(self, path, fingerprint: dict, log: Callable[[str], object] = print):
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.log = log
        self.reference_density: float | None = None  # set by run_stage before training

    def save(self, optimiser: SAGD, volume, history: list, sampler: ImportanceSampler) -> None:
        """Write the checkpoint (atomically)."""
        optimiser.save(self.path, volume=volume, history=records.history_to_array(history),
                       reference_density=np.float64(self.reference_density),
                       fingerprint=np.frombuffer(json.dumps(self.fingerprint).encode(),
                                                 dtype=np.uint8),
                       **sampler.state(exact=True))

    def discard(self, why: str) -> None:
        """Log why the checkpoint is not used, and remove it."""
        self.log(f"checkpoint {self.path} {why}: starting the stage afresh")
        self.path.unlink(missing_ok=True)

    def set_aside(self, error: BaseException) -> None:
        """After a resumed stage failed: move the checkpoint out of the way (``.failed``), so
        that a rerun starts afresh instead of failing the same way again and again."""
        if not self.path.exists():
            return
        aside = self.path.with_name(self.path.name + ".failed")
        os.replace(self.path, aside)
        self.log(f"the stage failed after resuming from checkpoint {self.path} "
                 f"({type(error).__name__}: {error}); the checkpoint is set aside as {aside}, "
                 "so that a rerun starts the stage afresh")

    def load(self, config: StageConfig, shape, n_images: int, n_batches: int, grid) -> Start | None:
        """The saved stage, ready to continue on ``grid``; None (with one log line, the file
        removed) if there is none, it cannot be read, or it no longer fits the stage."""
        if not self.path.exists():
            return None
        try:
            with np.load(self.path, allow_pickle=False) as f:
                if "fingerprint" not in f.files:
                    self.discard("has no fingerprint (it was written by an older cryoday)")
                    return None
                saved = json.loads(bytes(f["fingerprint"]).decode())
                history = _history_from_checkpoint(f["history"])
                changes = self._changes(saved, history, config)
                if changes:
                    self.discard("was written with " + "; ".join(changes))
                    return None
                data = {k: f[k] for k in f.files}
            optimiser, extra = SAGD.from_state(data)
            volume = extra.pop("volume").astype(np.float32)
            reference_density = float(extra.pop("reference_density"))
            if volume.shape != tuple(shape) or optimiser.shape != tuple(shape):
                raise ValueError(f"volume {volume.shape} and gradients {optimiser.shape}, "
                                 f"the stage's box is {tuple(shape)}")
            if optimiser.n_batches != n_batches:
                raise ValueError(f"{optimiser.n_batches} minibatches, the stage has {n_batches}")
            sampler = ImportanceSampler.from_state(extra, **config.sampler_options(n_batches))
            if sampler.n != n_images:
                raise ValueError(f"posteriors of {sampler.n} images, the stage has {n_images}")
            sampler.set_grid(grid, average=extra)
        except MemoryError:
            raise
        # Whatever is wrong with a checkpoint, it must not stop the stage: it is discarded.
        except Exception as error:  # noqa: BLE001
            self.discard(f"could not be read ({type(error).__name__}: {error})")
            return None
        self.log(f"resuming from checkpoint {self.path} at iteration {len(history)}")
        return Start(volume, optimiser, sampler, history, resumed=True,
                     reference_density=reference_density)

    def _changes(self, saved: dict, history: list, config: StageConfig) -> list[str]:
        """What differs between the saved fingerprint and the stage now, as phrases."""
        now = self.fingerprint
        changes = []
        old_code, new_code = saved.get("code", {}), now["code"]
        for key, value in new_code.items():
            old = old_code.get(key)
            if old != value:
                changes.append(f"cryoday source {old}, now {value}" if key == "source"
                               else f"{key} {old}, now {value}")
        old_inputs = saved.get("inputs", {})
        for key, value in now["inputs"].items():
            old = old_inputs.get(key, "missing")
            if old != value:
                changes.append(f"different {INPUT_NAMES[key]}" if key in INPUT_NAMES
                               else f"{key} {old}, now {value}")
        old_params = saved.get("params", {})
        for key, value in now["params"].items():
            if key not in LENGTH_PARAMS and old_params.get(key, "missing") != value:
                changes.append(f"{key} {old_params.get(key, 'missing')}, now {value}")
        if not changes:
            length = _length_change(old_params, history, config)
            if length:
                changes.append(length)
        return changes


def _history_from_checkpoint(array) -> list:
    """The history rows of a checkpoint, integer columns as integers (as a run's own rows)."""
    rows = records.history_from_array(array)
    for row in rows:
        for key in _INT_COLUMNS:
            if key in row and np.isfinite(row[key]):
                row[key] = int(row[key])
    return rows


def _length_change(old: dict, history: list, config: StageConfig) -> str | None:
    """Why a checkpoint's iterations are not those of the stage as configured now, when only
    ``LENGTH_PARAMS`` changed (None when they are).

    They differ when the checkpoint holds more iterations than the stage now runs, when the
    old or the new last iteration falls within them off the held-out schedule (the last
    iteration is always evaluated, and an evaluation updates the sampler), or when the new
    ``min_iterations`` and ``patience`` would have stopped the stage before the checkpoint.
    """
    changed = [k for k in LENGTH_PARAMS if old.get(k) != getattr(config, k)]
    if not changed:
        return None
    described = ", ".join(f"{k} {old.get(k)}, now {getattr(config, k)}" for k in changed)
    if any(not isinstance(old.get(k), int) for k in LENGTH_PARAMS):
        return described
    saved = len(history)

    def off_schedule(last):
        return last if last <= saved and last % config.heldout_every else None

    if saved > config.max_iterations or (off_schedule(old["max_iterations"])
                                         != off_schedule(config.max_iterations)):
        return f"{described} (its {saved} iterations are not those the stage now runs)"
    stopped_at = EarlyStopping.replay(history, config)[1]
    if stopped_at is not None and stopped_at < saved:
        return f"{described} (the stage would have stopped at iteration {stopped_at})"
    return None


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
    if checkpoint is not None:
        if grid is None:
            raise ValueError("resuming from a checkpoint needs the stage's grid")
        resumed = checkpoint.load(config, volume.shape, n_images, n_batches, grid)
        if resumed is not None:
            return resumed
    if sagd_state is not None:
        optimiser, extra = SAGD.load(sagd_state)
        sampler = ImportanceSampler.from_state(extra, **options)
        if optimiser.n_batches != n_batches:
            optimiser = SAGD(n_batches, volume.shape, eps, optimiser.L, seed=config.seed)
        optimiser.reset_for_new_stage(volume.shape, eps)
    else:
        optimiser = SAGD(n_batches, volume.shape, eps, L=1.0, seed=config.seed)
        sampler = ImportanceSampler(n_images, **options)
    if grid is not None:
        sampler.set_grid(grid)
    return Start(volume, optimiser, sampler, [], resumed=False)


def train(volume, optimiser: SAGD, objective: _Objective, prior, config: StageConfig,
          history: list, log=print, checkpoint: Checkpoint | None = None, start_time=None,
          after_iteration: Callable[[int], object] | None = None) -> np.ndarray:
    """SAGD iterations from ``len(history) + 1`` to ``config.max_iterations``, appending one
    row per iteration to ``history``; returns the final volume.

    Every ``heldout_every`` iterations (and at the last) the held-out error is evaluated; the
    stage stops once it has run ``min_iterations`` and that error has not improved (by
    ``MIN_RELATIVE_IMPROVEMENT``) for ``patience`` evaluations in a row (:class:`EarlyStopping`,
    replayed from ``history`` when resuming). The stage is saved to ``checkpoint`` every
    ``checkpoint_every`` iterations; ``after_iteration(iteration)`` is called after each
    iteration (and its checkpoint): a test kills the process there.
    """
    start_time = time.perf_counter() if start_time is None else start_time
    n_train = objective.n_train
    stopping, stopped_at = EarlyStopping.replay(history, config)
    if stopped_at is not None:  # a checkpoint written as the stage stopped
        log(f"held-out error has not improved for {config.patience} evaluations: stage done")
        return volume
    for iteration in range(len(history) + 1, config.max_iterations + 1):
        objective.iteration = optimiser.t
        batch_id = optimiser.next_batch()
        volume, figures = optimiser.step(volume, batch_id, objective, prior, n_train)
        last = objective.last
        row = {"iteration": iteration, "epoch": iteration * config.minibatch_size / n_train,
               "heldout_nll": float("nan"), "n_evaluated": last.n_evaluated,
               "n_full": len(objective.partition[batch_id]) * objective.grid.size,
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
            log(f"held-out error has not improved for {config.patience} evaluations: "
                "stage done")
            break
    return volume


class Poses(NamedTuple):
    """Every particle's most probable pose at a map, and its likelihoods (nats)."""

    rotations: np.ndarray  # (n, 3, 3)
    shifts_px: np.ndarray  # (n, 2), pixels of the stage's box
    nll: np.ndarray  # -log p(I | V)
    null_nll: np.ndarray  # -log p(I | V = 0)


def final_poses(volume, objective: _Objective, iteration: int, log=print,
                start_time=None) -> Poses:
    """The pose pass over every particle (training and held out) at the final ``volume``,
    with the sampler's proposals at ``iteration`` (their posteriors are updated too).

    ``null_nll`` explains the images as pure noise: validation asks whether the map explains
    the held-out images better than that (a likelihood-ratio test for signal).
    """
    start_time = time.perf_counter() if start_time is None else start_time
    op, data, grid, sampler = objective.op, objective.data, objective.grid, objective.sampler
    n = len(data)
    rotations, shifts = np.empty((n, 3, 3)), np.empty((n, 2))
    nll, null_nll = np.empty(n), np.empty(n)
    cube = op.prepare(volume)
    empty = np.zeros_like(volume)
    empty_cube = op.prepare(empty)
    chunks = np.array_split(np.arange(n), max(1, n // objective.batch_size))
    log(f"final poses of all {n} particles at the stage's map")
    next_report = 0.1
    for done, rows in enumerate(chunks, 1):
        batch = data.batch(rows)
        subsets = sampler.subsets(grid, rows, iteration)
        result = marginal_nll(op, volume, batch, grid, subsets, want_grad=False, cube=cube)
        sampler.update(grid, rows, subsets, result)
        rotations[rows] = grid.rotations[result.best_rot]
        shifts[rows] = grid.shifts[result.best_shift]
        nll[rows] = result.nll
        null_nll[rows] = marginal_nll(op, empty, batch, grid, empty_map_subsets(grid, len(rows)),
                                      want_grad=False, cube=empty_cube).nll
        if done / len(chunks) >= next_report:
            log(f"final poses: {rows[-1] + 1} / {n} particles, "
                f"{time.perf_counter() - start_time:.1f} s")
            next_report += 0.1
    return Poses(rotations, shifts, nll, null_nll)


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

    def _shift_state(self) -> dict:
        return {} if self.shift_estimate is None else self.shift_estimate.state()

    def save_state(self, path) -> None:
        """``state.npz``: what the next stage starts from (with the learned shift range)."""
        self.optimiser.save(path, **self.sampler.state(), **self._shift_state())

    def save_history(self, path) -> None:
        records.write_history(path, self.history)

    def save_poses(self, path, pixel_size: float) -> None:
        records.write_poses(path, self.rotations, self.shifts_px * pixel_size, self.nll,
                            self.null_nll, self.heldout_rows, **self._shift_state())


def run_stage(volume0, images, ctf_params, sigma, pixel_size, resolution_A, train_rows,
              heldout_rows, config: StageConfig, sagd_state=None,
              log: Callable[[str], object] = print, checkpoint_path=None,
              scale_start=False,
              after_iteration: Callable[[int], object] | None = None, noise=None,
              noise_group=None) -> StageResult:
    """Run one stage; see the module docstring.

    Parameters
    ----------
    volume0 : (box, box, box) float32
        Start (the resampled previous stage, or the random start).
    images : (n, box, box) array-like
        A memory map of the stage's images, normalised, protein bright.
    ctf_params : dict of (n,) arrays
        ``cryoday.ctf.evaluate_ctf`` argument names.
    sigma : float or (n,) array
        Noise standard deviation per pixel at this box.
    pixel_size, resolution_A : float
        The stage's pixel size and resolution (A).
    train_rows, heldout_rows : int arrays
        Particle rows.
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
    """
    start_time = time.perf_counter()
    box = volume0.shape[0]
    radius = box * pixel_size / resolution_A
    op = SliceOperator(box, radius)
    shift_prior = shift_range.for_stage(config.shift_sigma_A, box * pixel_size, sagd_state, log)
    grid = pose_grid(resolution_A, box, pixel_size, config.undersampling,
                     shift_sigma_A=shift_prior.sigma_A, shift_radius_A=shift_prior.radius_A)
    data = _Data(op, images, ctf_params, sigma, pixel_size, noise, noise_group)
    train_rows = np.asarray(train_rows)
    heldout_rows = np.asarray(heldout_rows)
    # One generator, drawn in this order: the partition, then a random start's scale sample.
    rng = np.random.default_rng(config.seed)
    n_batches = max(1, int(np.ceil(len(train_rows) / config.minibatch_size)))
    partition = np.array_split(rng.permutation(train_rows), n_batches)
    log(f"stage at {resolution_A:g} A: box {box}, {op.n_coef} coefficients, grid "
        f"{grid.n_dir} directions x {grid.n_inp} in-plane x {grid.n_shift} shifts "
        f"= {grid.size:,} points per image; {len(train_rows)} training images in "
        f"{n_batches} minibatches, {len(heldout_rows)} held out")

    checkpoint = None
    if checkpoint_path:
        checkpoint = Checkpoint(checkpoint_path, stage_fingerprint(
            config, images, ctf_params, sigma, pixel_size, resolution_A, train_rows,
            heldout_rows, volume0, sagd_state, scale_start, noise, noise_group), log)
    start = resume_or_start(low_pass(volume0, radius), len(images), n_batches, config,
                            sagd_state, checkpoint, log, grid)
    volume = start.volume
    reference_density = start.reference_density
    if not start.resumed:
        if scale_start:
            sample = rng.choice(train_rows, min(len(train_rows), SCALE_SAMPLE), replace=False)
            volume = scale_to_data(volume, op, data, grid, sample, rng)
        top = volume.max()
        reference_density = float(volume[volume > 0.1 * top].mean()) if top > 0 else 1.0
    if checkpoint is not None:
        checkpoint.reference_density = reference_density
    prior = make_prior(config.prior, reference_density, config.prior_strength)
    objective = _Objective(op, data, grid, start.sampler, partition, heldout_rows,
                           config.minibatch_size)
    try:
        volume = train(volume, start.optimiser, objective, prior, config, start.history, log,
                       checkpoint, start_time, after_iteration)
        poses = final_poses(volume, objective, start.optimiser.t, log, start_time)
    except Exception as error:
        # Out of memory or disk is the machine's, not the checkpoint's fault: keep it.
        if start.resumed and not isinstance(error, (OSError, MemoryError)):
            checkpoint.set_aside(error)
        raise
    learned = shift_range.learn(start.sampler.store, grid, shift_prior, log)
    return StageResult(volume, start.optimiser, start.sampler, start.history, *poses,
                       heldout_rows, learned)


__all__ = ["StageConfig", "StageSchedule", "stage_schedule", "default_reconstruction_config",
           "resume_or_start", "train", "final_poses", "run_stage", "StageResult", "Start",
           "Poses", "scale_to_data", "finite_or_raise", "Checkpoint", "EarlyStopping",
           "stage_fingerprint", "code_version"]
