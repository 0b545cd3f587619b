"""A stage's settings: the validated config's ``reconstruction`` section, with the stage's
schedule (learning rate, undersampling, seed) applied.

Defaults live only in ``workflow/schemas/config.schema.yaml``; :func:`default_reconstruction_config`
reads them for tests and benchmarks that run a stage without the workflow.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import yaml

from cryoday import symmetry as point_groups
from cryoday.errors import InputError
from cryoday.quadrature import undersampling_for_level

SCHEMA = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"


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
    start draws its own minibatches and importance samples (and ``seed // 1000`` is the start's
    seed again, :attr:`StageConfig.start_seed`; stages number fewer than 1000).
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
          "tuple": lambda values: tuple(float(v) for v in values),
          "int | None": lambda value: None if value is None else int(value)}


# Keys a stage's options may leave out, and what their absence means. The workflow leaves
# ``symmetry`` out for C1 so that the params of stages run before symmetry existed do not
# change (Snakemake would rerun them as "Params have changed"); options written before
# ``max_particles`` existed trained on every particle; ``classes`` is left out for one class.
_ABSENT_MEANS = {"symmetry": "C1", "max_particles": None, "classes": 1}

# Mixed into the start's seed for the training subset's draw, so that it is a stream of its
# own (not the random start's, nor any stage's).
SUBSET_STREAM = 18


def training_symmetry(name) -> str:
    """The point group a stage trains in: RELION's spelling of ``name``, C1 for ``'auto'``
    (which searches the C1 result for its group afterwards, see
    :mod:`cryoday.symmetry_search`); ``InputError`` naming ``reconstruction.symmetry`` when it
    is no group."""
    if isinstance(name, str) and name.strip().lower() == "auto":
        return "C1"
    try:
        return point_groups.canonical_name(name)
    except InputError as exc:
        raise InputError(f"reconstruction.symmetry: {exc}") from None


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
    importance_temperature_epochs: float
    importance_anneal_halflife: float
    symmetry: str
    max_particles: int | None
    classes: int

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
        section = {**_ABSENT_MEANS, **section}
        keys = [f for f in fields(cls) if f.name not in schedule]
        missing = [f.name for f in keys if f.name not in section]
        if missing:
            raise InputError(f"reconstruction.{missing[0]} is missing: the section must be "
                             "validated against the schema, which fills in the defaults")
        values = {f.name: _CASTS[f.type](section[f.name]) for f in keys}
        values["symmetry"] = training_symmetry(values["symmetry"])
        return cls(**values, **schedule)

    @property
    def start_seed(self) -> int:
        """The random start's seed, shared by all its stages (``seed`` is ``start * 1000 +
        stage``, :func:`stage_schedule`): it draws the training subset
        (:func:`training_subset`)."""
        return self.seed // 1000

    def sampler_options(self, iterations_per_epoch: int) -> dict:
        """The importance sampler's constructor arguments."""
        return {"enabled": self.importance_sampling, "s0": self.s0, "seed": self.seed,
                "iterations_per_epoch": iterations_per_epoch,
                "min_grid_points": self.importance_min_grid_points,
                "max_rotations": self.importance_max_rotations,
                "max_shifts": self.importance_max_shifts,
                "coverage": self.importance_coverage,
                "dataset_prior": self.importance_dataset_prior,
                "temperature_epochs": self.importance_temperature_epochs,
                "alpha_halflife": self.importance_anneal_halflife}


def training_subset(train_rows, max_particles: int | None, start_seed: int) -> np.ndarray:
    """The training rows a stage's SAGD loop uses: all of them when there are at most
    ``max_particles`` (or it is None), in their order; else ``max_particles`` of them drawn at
    random from ``start_seed`` (sorted, so that reading them from a memory map runs forward).

    The draw depends on the random start's seed only, not the stage: every stage of a start
    trains on the same particles, whose stored pose posteriors the previous stage's
    importance sampler has kept current. SAGD stores one gradient volume per minibatch, so the
    subset bounds a stage's memory whatever the particle count; the final pose pass still
    covers every particle.

    Parameters
    ----------
    train_rows : (n,) int array
        The training particles' rows (held-out rows are not among them).
    max_particles : int or None
        ``reconstruction.max_particles``.
    start_seed : int
        The random start's seed (``StageConfig.start_seed``).

    Returns
    -------
    numpy.ndarray
        ``train_rows`` itself, or the sorted subset.
    """
    train_rows = np.asarray(train_rows)
    if max_particles is None or len(train_rows) <= max_particles:
        return train_rows
    rng = np.random.default_rng([SUBSET_STREAM, int(start_seed)])
    return np.sort(rng.choice(train_rows, int(max_particles), replace=False))


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
