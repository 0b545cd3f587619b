"""Heterogeneous ab initio: K class maps trained at once, the class marginalised with the pose.

With ``reconstruction.classes: K > 1`` a particle's likelihood is a mixture over classes,

    p(I_i | V_1..V_K) = sum_k pi_k p(I_i | V_k),   p(I_i | V_k) = sum_poses (the paper's Eq. 4),

with learned class proportions ``pi``. The gradient of ``-log p`` with respect to ``V_k`` is
``r_ik`` times the one-class gradient of image ``i``, ``r_ik`` its class posterior (Bayes:
``pi_k p(I_i | V_k) / p(I_i)``). SAGD steps all K maps together, as one array of shape
(K, box, box, box): each class has its own stored gradients (SAGD's, per minibatch), its own
importance sampler (its own pose posteriors per particle), and its own random start.

Costs. A minibatch's gradient takes each class's nll first (no gradient: about a third of a
gradient evaluation), which gives the class posteriors; then the weighted gradient of each
class over only the images whose weight is not negligible (``SHARE_FLOOR``): with classes that
have sorted the particles, each image enters about one class's gradient, so K classes cost
about ``K / 3 + 1`` one-class gradient evaluations, not ``K``.

Class similarity. Random starts differ at random, so at first one class explains every image a
little better than the others and would take them all (rich get richer; the others, without
gradient, empty out). As cryoSPARC does ("class similarity", annealed), the gradient's weights
are at first mixed with the uniform ones, ``(1 - s) r_ik + s / K``, ``s`` falling linearly from
``CLASS_SIMILARITY`` to 0 over the first ``CLASS_SIMILARITY_EPOCHS`` epochs of the start: every
class first learns the common low-resolution shape, and the classes separate as it falls. The
objective (line search, held-out error) is the mixture's own throughout.

Proportions. ``pi_k`` is the mean class posterior of the training particles visited so far
(each particle's latest), updated after each SAGD step (never within one: the line search
compares values of one objective); before any visit it is uniform. A floor keeps an emptied
class's ``log pi`` finite, so that it can still take particles it explains better.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp

from cryoday import symmetry
from cryoday.importance import ImportanceSampler
from cryoday.likelihood import marginal_nll

# Images whose gradient weight for a class is below this enter that class's gradient not at all:
# what they would add is at most this fraction of their one-class gradient.
SHARE_FLOOR = 1e-3
# The class similarity at the start, and the epochs over which it falls to 0 (see above).
CLASS_SIMILARITY = 0.5
CLASS_SIMILARITY_EPOCHS = 2.0
# Floor of a class proportion in the mixture (an emptied class stays a candidate).
PROPORTION_FLOOR = 1e-3
# Mixed into each class's sampler seed, so that classes draw their pose samples independently.
CLASS_SEED_STRIDE = 7919
# Duplicate classes (find_duplicates): FSC 0.5 finer than this times the stage's resolution, once
# the stage resolves this fraction of the particle's diameter (two different 120 A molecules'
# true maps agree to FSC 0.5 at 25 A, a fifth of it: at 20 A their classes could not be told
# from copies); their new start's peak (weak_start).
DUPLICATE_FACTOR = 1.25
DUPLICATE_DETAIL = 6.0
WEAK_START = 0.05
# The share of a random density in each class's start from a shared initial model.
PERTURBATION = 0.2
# A class holding less than this fraction of the particles is reported as empty.
EMPTY_FRACTION = 0.01


def find_duplicates(volumes, pixel_size: float, resolution_A: float, diameter_A: float | None,
                    proportions) -> list[tuple[int, int]]:
    """Classes that are another class's molecule again, to be started afresh: ``(duplicate,
    twin)`` pairs (0-based), the duplicate the smaller of the two.

    K classes of a set that holds fewer kinds of particle than K split a molecule between
    copies of it, which then hold particles that are junk or another conformation elsewhere
    would take. Two maps of a stage at ``resolution_A`` are copies when their FSC 0.5 after
    alignment is finer than ``DUPLICATE_FACTOR`` times it; only once the stage resolves
    detail of a ``DUPLICATE_DETAIL``-th of the particle's diameter, since coarser maps of two
    different molecules agree as well as copies do (two blobs of one size).
    """
    from cryoday.class_results import class_agreement

    if diameter_A is None or resolution_A > diameter_A / DUPLICATE_DETAIL:
        return []
    agreement = class_agreement(volumes, pixel_size, resolution_A, factor=DUPLICATE_FACTOR)
    taken: set[int] = set()
    pairs = []
    proportions = np.asarray(proportions)
    for name, figures in agreement["pairs"].items():
        if not figures["same_molecule"]:
            continue
        a, b = (int(x) - 1 for x in name.split("-"))  # a < b: a is the twin on a tie
        twin, duplicate = (a, b) if proportions[a] >= proportions[b] else (b, a)
        if duplicate in taken or twin in taken:
            continue
        taken.add(duplicate)
        pairs.append((duplicate, twin))
    return pairs


def _with_peak(density: np.ndarray, peak: float) -> np.ndarray:
    """``density`` scaled to the peak ``peak`` (zeros stay zeros)."""
    top = float(density.max())
    return density * (peak / top if top > 0 else 0.0)


def weak_start(like: np.ndarray, start: np.ndarray) -> np.ndarray:
    """A duplicate's new start: ``start`` at ``WEAK_START`` of the twin map ``like``'s peak, so
    that it begins by explaining images as little as empty density does (pure noise
    prefers it) and grows into whatever the images it takes hold."""
    return _with_peak(start, WEAK_START * float(like.max())).astype(np.float32)


def perturbed_start(model: np.ndarray, blob: np.ndarray) -> np.ndarray:
    """A class's start from an initial model shared by all classes: ``1 - PERTURBATION`` of
    the model and ``PERTURBATION`` of a random density scaled to the model's peak (identical
    starts would get identical gradients, and the classes would never part)."""
    scaled = _with_peak(blob, float(model.max()))
    return ((1.0 - PERTURBATION) * model + PERTURBATION * scaled).astype(np.float32)


def class_start_seed(seed: int, c: int) -> int:
    """The seed of class ``c`` (0-based) from a one-class seed ``seed`` (a random start's, or
    its importance sampler's): class 0's is the one-class one."""
    return int(seed) + CLASS_SEED_STRIDE * int(c)


def _class_options(options: dict, c: int) -> dict:
    """The importance sampler's ``options`` for class ``c``: its own seed."""
    return {**options, "seed": class_start_seed(options.get("seed", 0), c)}


def class_similarity(epoch: float) -> float:
    """The class similarity ``s`` at ``epoch`` of the start (see the module docstring)."""
    if CLASS_SIMILARITY_EPOCHS <= 0:
        return 0.0
    return CLASS_SIMILARITY * max(0.0, 1.0 - epoch / CLASS_SIMILARITY_EPOCHS)


class ClassSamplers:
    """The K classes' importance samplers, each particle's class posterior, the proportions.

    It stands in for an :class:`~cryoday.importance.ImportanceSampler` where a stage saves,
    restores and re-grids its sampler (``state``, ``from_state``, ``set_grid``, ``n``,
    ``store``, ``last_kl``): its state holds every class's sampler under ``class{k}_`` keys,
    and the main class's (the largest) under the usual ones too, so that a reader of one
    sampler (the final map) reads the main class's.

    Parameters
    ----------
    samplers : list of ImportanceSampler
    posterior : (n, K) float32, optional
        Each particle's latest class posterior (uniform before its first visit).
    visited : (n,) bool, optional
        Training particles whose posterior a gradient step has set (they make the proportions).
    proportion_history : (iterations, K), optional
        The proportions after each SAGD step so far.
    """

    def __init__(self, samplers, posterior=None, visited=None, proportion_history=None):
        self.samplers = list(samplers)
        self.k = len(self.samplers)
        self.n = self.samplers[0].n
        self.posterior = (np.full((self.n, self.k), 1.0 / self.k, np.float32)
                          if posterior is None else np.asarray(posterior, np.float32))
        self.visited = (np.zeros(self.n, bool) if visited is None
                        else np.asarray(visited, bool))
        self.proportion_history = ([] if proportion_history is None
                                   else [np.asarray(p, np.float64) for p in proportion_history])

    @classmethod
    def fresh(cls, n_images: int, k: int, **options) -> ClassSamplers:
        """K new samplers, each with its own seed."""
        return cls([ImportanceSampler(n_images, **_class_options(options, c)) for c in range(k)])

    # ------------------------------------------------------------------ proportions

    def proportions(self) -> np.ndarray:
        """The class proportions: the visited training particles' mean class posterior."""
        if not self.visited.any():
            return np.full(self.k, 1.0 / self.k)
        mean = self.posterior[self.visited].astype(np.float64).mean(axis=0)
        return mean / mean.sum()

    def log_proportions(self) -> np.ndarray:
        return np.log(np.maximum(self.proportions(), PROPORTION_FLOOR))

    @property
    def main(self) -> int:
        """The class holding the most particles (0-based)."""
        return int(np.argmax(self.proportions()))

    def record(self, rows, posterior, training: bool) -> None:
        """Store ``rows``' class posteriors; ``training`` ones count towards the proportions."""
        self.posterior[rows] = posterior
        if training:
            self.visited[rows] = True

    def end_step(self) -> None:
        """After a SAGD step: the proportions enter the history (and the next step's mixture)."""
        self.proportion_history.append(self.proportions())

    def reseed(self, duplicate: int, twin: int, options: dict, grid) -> None:
        """Class ``duplicate`` starts again (:func:`find_duplicates`): its particles pass to
        ``twin``, and the proportions start uniform again (no particle counts as visited), so
        the new class is a candidate for every particle. Its pose posteriors are replaced by
        a copy of the twin's: a fresh sampler would search a fine stage's whole grid for every
        particle (3x the stage's time, measured), and the new class's first map is a weak
        density whose likelihood hardly depends on the pose."""
        self.posterior[:, twin] += self.posterior[:, duplicate]
        self.posterior[:, duplicate] = 0.0
        self.visited[:] = False
        sampler = ImportanceSampler.from_state(self.samplers[twin].state(),
                                               **_class_options(options, duplicate))
        sampler.set_grid(grid)
        self.samplers[duplicate] = sampler

    # ------------------------------------------------------------------ the sampler interface

    @property
    def store(self):
        """The main class's pose posteriors (the learned shift range reads them)."""
        return self.samplers[self.main].store

    @property
    def last_kl(self) -> float:
        return _mean_of_finite([s.last_kl for s in self.samplers])

    @property
    def flip_dropped(self) -> bool:
        """Whether every class's sampler has dropped the antipodal term."""
        return all(s.flip_dropped for s in self.samplers)

    @property
    def last_kl_epochs(self) -> float:
        return _mean_of_finite([s.last_kl_epochs for s in self.samplers])

    def set_grid(self, grid, average: dict | None = None) -> None:
        for c, sampler in enumerate(self.samplers):
            sampler.set_grid(grid, None if average is None else _unprefixed(average, c))

    def state(self, exact: bool = False) -> dict:
        """Every class's sampler (``class{k}_`` keys), the main one's under the usual keys, the
        class posteriors, visited flags and proportion history."""
        state = dict(self.samplers[self.main].state(exact))
        for c, sampler in enumerate(self.samplers):
            state.update({f"class{c}_{key}": value for key, value in sampler.state(exact).items()})
        history = (np.array(self.proportion_history, np.float64) if self.proportion_history
                   else np.zeros((0, self.k)))
        state.update(class_count=np.int64(self.k), class_posterior=self.posterior,
                     class_visited=self.visited, class_proportion_history=history)
        return state

    @classmethod
    def from_state(cls, state: dict, **options) -> ClassSamplers:
        """The classes saved in ``state`` (:meth:`state`); ``options`` as for :meth:`fresh`.

        Raises
        ------
        KeyError
            ``state`` holds no classes (a one-class stage's).
        """
        samplers = [ImportanceSampler.from_state(_unprefixed(state, c), **_class_options(options, c))
                    for c in range(int(state["class_count"]))]
        return cls(samplers, state["class_posterior"], state["class_visited"],
                   list(state["class_proportion_history"]))


def _mean_of_finite(values) -> float:
    values = np.asarray(values, np.float64)
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if len(finite) else float("nan")


def _unprefixed(state: dict, c: int) -> dict:
    prefix = f"class{c}_"
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def sampler_type(n_classes: int):
    """What holds a stage's pose posteriors: one sampler, or :class:`ClassSamplers`."""
    return ClassSamplers if n_classes > 1 else ImportanceSampler


def new_sampler(n_images: int, n_classes: int, options: dict):
    """A fresh sampler for ``n_classes`` classes."""
    if n_classes > 1:
        return ClassSamplers.fresh(n_images, n_classes, **options)
    return ImportanceSampler(n_images, **options)


# ---------------------------------------------------------------------- maps


def per_class(function, volumes: np.ndarray) -> np.ndarray:
    """``function`` applied to each class map of a (K, box, box, box) stack."""
    return np.stack([function(v) for v in volumes]).astype(np.float32)


class PerClassPrior:
    """A one-map prior applied to each class map, summed (the maps are independent a priori)."""

    def __init__(self, prior):
        self.prior = prior

    def value_and_grad(self, volumes):
        parts = [self.prior.value_and_grad(v) for v in volumes]
        return (sum(p[0] for p in parts),
                np.stack([np.broadcast_to(p[1], v.shape) for p, v in zip(parts, volumes)]))


def symmetrised(grad: np.ndarray, group: str) -> np.ndarray:
    """Each class map's gradient averaged over the point group."""
    return per_class(lambda g: symmetry.symmetrise(g, group), grad)


# ---------------------------------------------------------------------- the objective


@dataclass
class Evaluation:
    """One evaluation of images over the classes: the mixture's nll, each class posterior,
    each class's result (pose posteriors, best poses) and the subsets it evaluated."""

    nll: np.ndarray  # (n,) -log sum_k pi_k p(I | V_k)
    posterior: np.ndarray  # (n, K)
    results: list
    subsets: list
    grad: np.ndarray | None
    n_evaluated: int


class _Last:
    """What :func:`cryoday.stage.train` reads of the last gradient evaluation."""

    def __init__(self, n_evaluated: int):
        self.n_evaluated = n_evaluated


class MixtureObjective:
    """The minibatch objective of K classes, with the one-class ``_Objective``'s interface
    (``__call__``, ``heldout_nll``, ``end_step``, ``last``, ``iteration``); ``sampler`` is a
    :class:`ClassSamplers`."""

    def __init__(self, op, data, grid, sampler: ClassSamplers, partition, heldout_rows,
                 batch_size, finite_or_raise):
        self.op, self.data, self.grid, self.sampler = op, data, grid, sampler
        self.partition = partition
        self.heldout_rows = np.asarray(heldout_rows)
        self.batch_size = batch_size
        self.n_train = sum(len(p) for p in partition)
        self.n_classes = sampler.k
        self.iteration = 0
        self.last = None
        self._finite_or_raise = finite_or_raise

    def evaluate(self, volumes, rows, want_grad: bool, cubes=None, update: bool = True,
                 training: bool = False) -> Evaluation:
        """The mixture over the classes of images ``rows`` (see the module docstring); with
        ``update`` each class's sampler takes its pose posteriors and the class posteriors are
        stored (``training``: they count towards the proportions)."""
        op, grid = self.op, self.grid
        batch = self.data.batch(rows)
        cubes = [op.prepare(v) for v in volumes] if cubes is None else cubes
        subsets = [s.subsets(grid, rows, self.iteration) for s in self.sampler.samplers]
        results = [marginal_nll(op, v, batch, grid, sub, want_grad=False, cube=cube)
                   for v, sub, cube in zip(volumes, subsets, cubes)]
        log_joint = self.sampler.log_proportions()[None, :] - np.stack(
            [r.nll for r in results], axis=1)
        nll = -logsumexp(log_joint, axis=1)
        self._finite_or_raise(nll, rows)
        posterior = np.exp(log_joint + nll[:, None])
        n_evaluated = sum(sub.n_points for sub in subsets)
        grad = None
        if want_grad:
            s = class_similarity(self.iteration / max(1, len(self.partition)))
            shares = ((1.0 - s) * posterior + s / self.n_classes).astype(np.float32)
            grad = np.zeros(volumes.shape, np.float32)
            for c in range(self.n_classes):
                picked = np.flatnonzero(shares[:, c] > SHARE_FLOOR)
                if len(picked) == 0:
                    continue
                whole = len(picked) == len(rows)
                part = marginal_nll(op, volumes[c], batch if whole else batch.take(picked), grid,
                                    subsets[c] if whole else subsets[c].take(picked),
                                    want_grad=True, cube=cubes[c],
                                    grad_weights=shares[picked, c])
                grad[c] = part.grad
                n_evaluated += part.n_evaluated
        if update:
            for sampler, sub, result in zip(self.sampler.samplers, subsets, results):
                sampler.update(grid, rows, sub, result, measure=training)
            self.sampler.record(rows, posterior, training)
        return Evaluation(nll, posterior, results, subsets, grad, n_evaluated)

    def __call__(self, volumes, batch_id: int, want_grad: bool):
        """Mean negative log-likelihood of minibatch ``batch_id`` and its gradient (or None)."""
        rows = self.partition[batch_id]
        result = self.evaluate(volumes, rows, want_grad, update=want_grad, training=True)
        if want_grad:
            self.last = _Last(result.n_evaluated)
        grad = None if result.grad is None else result.grad / len(rows)
        return float(result.nll.mean()), grad

    def end_step(self) -> None:
        self.sampler.end_step()

    def heldout_nll(self, volumes) -> float:
        """Mean negative log-likelihood of the held-out images (NaN if there are none)."""
        rows_all = self.heldout_rows
        if len(rows_all) == 0:
            return float("nan")
        cubes = [self.op.prepare(v) for v in volumes]
        total = 0.0
        for rows in np.array_split(rows_all, max(1, len(rows_all) // self.batch_size)):
            total += self.evaluate(volumes, rows, False, cubes).nll.sum()
        return total / len(rows_all)


def final_class_poses(volumes, objective: MixtureObjective, iteration: int, log=print,
                      start_time=None, residuals=None):
    """Every particle's class posterior, and its most probable pose in its most probable class
    (:func:`cryoday.stage.pose_pass`, as :func:`cryoday.stage.final_poses` for one class;
    ``residuals`` are taken at those poses in that class's map).

    Returns
    -------
    poses : cryoday.stage.Poses
    posterior : (n, K) float32
    """
    from cryoday.stage import pose_pass  # stage imports this module

    data, grid = objective.data, objective.grid
    n = len(data)
    posterior = np.empty((n, objective.n_classes), np.float32)
    cubes = [objective.op.prepare(v) for v in volumes]
    objective.iteration = iteration

    def chunk(rows, batch):
        result = objective.evaluate(volumes, rows, False, cubes)
        best = np.argmax(result.posterior, axis=1)
        best_rot = np.stack([r.best_rot for r in result.results])[best, np.arange(len(rows))]
        best_shift = np.stack([r.best_shift for r in result.results])[best, np.arange(len(rows))]
        rotations, shifts = grid.rotations[best_rot], grid.shifts[best_shift]
        posterior[rows] = result.posterior
        if residuals is not None:
            for c in np.unique(best):
                mine = np.flatnonzero(best == c)
                residuals.add(cubes[c], batch.take(mine), rotations[mine], shifts[mine],
                              None if data.noise_group is None else data.noise_group[rows][mine])
        return rotations, shifts, result.nll

    poses = pose_pass(objective, f"and classes of all {n} particles at the stage's "
                      f"{len(volumes)} maps", chunk, log, start_time)
    sizes = np.bincount(np.argmax(posterior, axis=1), minlength=objective.n_classes)
    log("classes: " + ", ".join(f"{c + 1}: {size} particles ({size / n:.1%})"
                                for c, size in enumerate(sizes)))
    empty = [c + 1 for c, size in enumerate(sizes) if size < EMPTY_FRACTION * n]
    if empty:
        log(f"class(es) {', '.join(map(str, empty))} hold fewer than {EMPTY_FRACTION:.0%} of the "
            "particles: empty")
    return poses, posterior


__all__ = [
    "ClassSamplers",
    "MixtureObjective",
    "PerClassPrior",
    "class_similarity",
    "final_class_poses",
    "new_sampler",
    "per_class",
    "sampler_type",
    "symmetrised",
]
