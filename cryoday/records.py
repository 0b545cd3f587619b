"""The one reader and writer of a stage's records: ``history.tsv``, ``poses.npz`` and ``state.npz``.

A stage directory holds

``history.tsv``
    one row per SAGD iteration (columns ``HISTORY_COLUMNS``; empty where a figure was not taken,
    e.g. the held-out error between evaluations);
``poses.npz``
    every particle's most probable pose at the stage's final map: ``rotations`` (n, 3, 3),
    ``shifts_A`` (n, 2) in A, ``nll`` and ``null_nll`` (n,) in nats (the negative log-likelihood
    under the map and under empty density; ``null_nll`` is NaN but for the held-out images,
    the only ones validation compares) and ``heldout_rows`` (int64);
``state.npz``
    what the next stage starts from: the SAGD optimiser's state and the importance sampler's
    per-particle posteriors (see ``cryoday.sagd.SAGD.save``);
``classes.npz``
    the stage's class maps (``reconstruction.classes``; one with K = 1): ``volumes`` (K, box,
    box, box) float32 at ``pixel_size``, the learned ``proportions`` (K,), ``main`` (the
    0-based class holding the most particles by posterior mass, whose map is also the stage's
    ``volume.mrc``) and ``proportion_history`` (iterations, K), the proportions after each
    SAGD iteration. ``poses.npz`` then also holds ``class_posterior`` (n, K) float32, each
    particle's posterior over the classes (rows sum to 1), and its poses are those of the
    particle's most probable class.

Every write goes to a temporary path and is renamed into place, so a killed job leaves either
the old file or the new one, never half of one.
"""

from __future__ import annotations

import csv
import math

import numpy as np

from cryoday.io import atomic_path

HISTORY_COLUMNS = ("iteration", "epoch", "objective", "heldout_nll", "eps", "L", "step", "wall_s",
                   "n_evaluated", "n_full", "kl", "kl_epoch")
POSE_ARRAYS = ("rotations", "shifts_A", "nll", "null_nll", "heldout_rows")
# Optional arrays of poses.npz (absent from stages written before classes existed: one class).
POSE_OPTIONAL_ARRAYS = ("class_posterior",)
# Optional scalars of poses.npz: the stage's shift prior and grid, and what its posteriors said
# of them (``cryoday.shift_range.ShiftEstimate.state``).
POSE_SCALARS = ("shift_sigma_A", "shift_radius_A", "shift_sigma_estimate_A",
                "shift_edge_fraction", "shift_edge_expected", "shift_step_A")


def _blank(value) -> object:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else value


def write_history(path, rows: list[dict]) -> None:
    """Write iteration rows as ``history.tsv``; keys outside ``HISTORY_COLUMNS`` are ignored."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_COLUMNS, delimiter="\t",
                                extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _blank(v) for k, v in row.items()})


def read_history(path) -> list[dict]:
    """A stage's ``history.tsv`` as dicts of floats (NaN where a value is empty)."""
    with open(path) as f:
        return [{k: float(v) if v not in ("", None) else float("nan") for k, v in row.items()}
                for row in csv.DictReader(f, delimiter="\t")]


def final_heldout_nll(path) -> float:
    """The last held-out error in a ``history.tsv`` (inf if it has none): lower means the map
    explains images it never saw better."""
    values = [h["heldout_nll"] for h in read_history(path) if math.isfinite(h["heldout_nll"])]
    return values[-1] if values else math.inf


def history_to_array(rows: list[dict]) -> np.ndarray:
    """History rows as a float64 array (columns ``HISTORY_COLUMNS``), for a checkpoint."""
    return np.array([[np.nan if h.get(c) is None else float(h.get(c)) for c in HISTORY_COLUMNS]
                     for h in rows], dtype=np.float64).reshape(len(rows), len(HISTORY_COLUMNS))


def history_from_array(array) -> list[dict]:
    """A checkpoint's history rows; columns added since it was written (appended to
    ``HISTORY_COLUMNS``) are absent from its rows and read as missing."""
    return [dict(zip(HISTORY_COLUMNS, row)) for row in np.asarray(array).tolist()]


def write_poses(path, rotations, shifts_A, nll, null_nll, heldout_rows, class_posterior=None,
                **scalars) -> None:
    """Write a stage's per-particle poses and likelihoods as ``poses.npz`` (see the module
    docstring for the arrays and their units), each particle's ``class_posterior`` (n, K) if
    given, and optional ``scalars`` (``POSE_SCALARS``)."""
    unknown = sorted(set(scalars) - set(POSE_SCALARS))
    if unknown:
        raise ValueError(f"write_poses: {unknown[0]} is not one of POSE_SCALARS")
    optional = ({} if class_posterior is None
                else {"class_posterior": np.asarray(class_posterior, np.float32)})
    with atomic_path(path) as tmp:
        np.savez(tmp, **{k: np.float64(v) for k, v in scalars.items()}, **optional,
                 rotations=np.asarray(rotations, np.float64),
                 shifts_A=np.asarray(shifts_A, np.float64), nll=np.asarray(nll, np.float64),
                 null_nll=np.asarray(null_nll, np.float64),
                 heldout_rows=np.asarray(heldout_rows, dtype=np.int64))


def read_poses(path) -> dict[str, np.ndarray]:
    """A ``poses.npz`` as a dict of arrays (whichever of ``POSE_ARRAYS``,
    ``POSE_OPTIONAL_ARRAYS`` and ``POSE_SCALARS`` it holds)."""
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in POSE_ARRAYS + POSE_OPTIONAL_ARRAYS + POSE_SCALARS if k in f}


def class_posterior(poses: dict) -> np.ndarray:
    """The (n, K) class posterior of :func:`read_poses`' ``poses``: ones (n, 1) for a stage of
    one class, or one written before classes existed."""
    if "class_posterior" in poses:
        return np.asarray(poses["class_posterior"], np.float32)
    return np.ones((len(poses["nll"]), 1), np.float32)


def write_classes(path, volumes, proportions, pixel_size: float, proportion_history,
                  resolution_A: float | None = None) -> None:
    """Write a stage's ``classes.npz`` (module docstring); ``main`` is the class of the largest
    proportion; ``resolution_A``, the stage's, is kept when given."""
    volumes = np.asarray(volumes, np.float32)
    proportions = np.asarray(proportions, np.float64)
    if volumes.ndim != 4 or len(volumes) != len(proportions):
        raise ValueError(f"write_classes: {len(proportions)} proportions for volumes of shape "
                         f"{volumes.shape}")
    history = np.asarray(proportion_history, np.float64).reshape(-1, len(proportions))
    extra = {} if resolution_A is None else {"resolution_A": np.float64(resolution_A)}
    write_npz(path, volumes=volumes, proportions=proportions, pixel_size=np.float64(pixel_size),
              main=np.int64(np.argmax(proportions)), proportion_history=history, **extra)


def read_classes(path) -> dict:
    """A ``classes.npz``: ``volumes``, ``proportions``, ``pixel_size`` (float), ``main`` (int),
    ``proportion_history`` and ``resolution_A`` (float, None in files written without it)."""
    data = read_npz(path)
    data["pixel_size"] = float(data["pixel_size"])
    data["resolution_A"] = float(data["resolution_A"]) if "resolution_A" in data else None
    data["main"] = int(data["main"])
    return data


def write_npz(path, **arrays) -> None:
    """Write arrays as an ``.npz`` atomically (``state.npz`` and checkpoints)."""
    with atomic_path(path) as tmp:
        np.savez(tmp, **arrays)


def read_npz(path) -> dict[str, np.ndarray]:
    """An ``.npz`` as a dict of arrays, read whole (pickles refused)."""
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}
