"""What a stage resumes from: its checkpoint file, the fingerprint that says whether the file
still fits the stage, and the early-stopping state rebuilt from the history.

A checkpoint holds everything the next iteration depends on, so a stage killed at any iteration
and rerun ends with bitwise the same map as one never killed; one written by other code,
settings or inputs, or one that cannot be read, is discarded with one log line.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import numba
import numpy as np
import scipy

from cryoday import __version__, classes, records
from cryoday.importance import ImportanceSampler
from cryoday.io import read_rows
from cryoday.sagd import SAGD
from cryoday.stage_config import StageConfig

# The held-out error's relative improvement per evaluation below which a stage stops: the
# importance-sampled estimate wobbles by less, a real gain in a stage's last epochs by more.
MIN_RELATIVE_IMPROVEMENT = 1e-4

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
    """Whether a stage stops: once it has run ``min_iterations`` and the best held-out error so
    far has improved by less than ``MIN_RELATIVE_IMPROVEMENT`` per evaluation over the last
    ``patience`` evaluations (a rate over a window, so one lucky evaluation does not restart
    the count while the error creeps down at a rate too slow to matter).

    A pure function of the evaluations in order, so a resumed stage rebuilds it exactly from
    its history (:meth:`replay`) rather than restarting the count.
    """

    def __init__(self, config: StageConfig):
        self.min_iterations, self.patience = config.min_iterations, config.patience
        self.bests: list[float] = []  # the best so far at each evaluation

    @property
    def best(self) -> float:
        return self.bests[-1] if self.bests else np.inf

    def evaluate(self, iteration: int, value: float) -> bool:
        """Count the held-out error ``value`` at ``iteration``; whether the stage stops."""
        self.bests.append(min(self.best, value) if np.isfinite(self.best) else value)
        if len(self.bests) <= self.patience or iteration < self.min_iterations:
            return False
        gain = self.bests[-1 - self.patience] - self.bests[-1]
        return gain < self.patience * MIN_RELATIVE_IMPROVEMENT * abs(self.bests[-1])

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
    generator's first draw from the training subset (seed, rows, minibatch size, and the
    subset's ``max_particles`` and ``start_seed`` are in the fingerprint), and that generator
    draws nothing after the start.

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
            sampler = classes.sampler_type(config.classes).from_state(
                extra, **config.sampler_options(n_batches))
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
