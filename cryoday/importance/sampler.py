"""The importance sampler's facade: the stage driver's one object for proposals and posteriors.

``subsets`` gives the poses to evaluate for a minibatch, drawn from each image's proposal
(or the whole grid where sampling would not pay); ``update`` stores the posteriors the
likelihood found on them, refreshes the dataset average and measures the KL diagnostics;
``state`` / ``from_state`` carry the posteriors from stage to stage. The parts live in the
sibling modules; the method is in ``docs/importance.md``.
"""

from __future__ import annotations

import numbers

import numpy as np

from cryoday import symmetry, tunables
from cryoday.errors import InputError
from cryoday.importance import diagnostics, schedule
from cryoday.importance.average import DatasetAverage
from cryoday.importance.geometry import GridKernels
from cryoday.importance.proposals import (capped_draw_counts, prior_parts, proposal_matrices,
                                          ragged_subsets, sample)
from cryoday.importance.store import (DIMENSIONS, K_JOINT, K_STORED, PosteriorStore,
                                      marginals_and_top_rotations, top_points)
from cryoday.pose_sets import PoseSubsets, exhaustive_subsets

# Config keys (section ``reconstruction``): the constructor argument each sets, its type and, for
# numbers, their range (lower bound, whether it is excluded, upper bound).
CONFIG_OPTIONS = {
    "importance_sampling": ("enabled", bool, None),
    "s0": ("s0", float, (0, True, np.inf)),
    "importance_min_grid_points": ("min_grid_points", int, (0, False, np.inf)),
    "importance_max_rotations": ("max_rotations", int, (1, False, np.inf)),
    "importance_max_shifts": ("max_shifts", int, (1, False, np.inf)),
    "importance_coverage": ("coverage", float, (0, True, 1)),
    "importance_dataset_prior": ("dataset_prior", tuple, (0, False, 1)),  # 3 floats
    "importance_temperature_epochs": ("temperature_epochs", float, (0, True, np.inf)),
    "importance_anneal_halflife": ("alpha_halflife", float, (0, True, np.inf)),
}


# The antipodal term goes once three particles in four keep less than this share of their
# posterior on the far hemisphere from their previous best direction, over at least this many
# particles (or a quarter of them) visited on the current grid (ImportanceSampler._judge_flip).
FAR_SHARE_DROP = 0.01
FAR_SHARE_QUANTILE = 0.75
FAR_SHARE_MIN_VISITS = 2000


class ImportanceSampler:
    """Per-image proposals over the current grid; see ``docs/importance.md``.

    Parameters
    ----------
    n_particles : int
        Images whose posteriors are kept.
    enabled : bool
        False: every image is evaluated on the whole grid (posteriors are still stored).
    s0 : float
        Draws per unit of the proposal's effective sample size (the paper's default 10).
    seed : int
        Seeds the draws (with the iteration and the batch's rows).
    alpha_min : float
        Floor of the prior's share ``alpha`` (the paper's 0.05).
    min_grid_points, coverage, max_rotations, max_shifts
        Exhaustive below ``min_grid_points`` per image (for all of SO(3): see :attr:`active`);
        a dimension is taken whole when its draws would cover ``coverage`` of it; per-image
        caps on the draws. ``max_rotations`` is for all of SO(3): on a grid of one asymmetric
        unit of a point group it is divided by the group's order, the same density of draws
        (:meth:`rotation_cap`).
    iterations_per_epoch : float
        SAGD iterations per pass over the training images: the unit of the schedules (the stage
        driver passes its number of minibatches). The default 1 reads ``iteration`` as epochs.
    schedule_offset : float
        ``tau_0``, epochs before the stored posteriors are used at all (alpha = 1 until then).
    temperature_epochs : float
        ``tau_T`` in ``T = max(1, 2^(tau_T / (tau - tau_0)))``. The default is three times the
        paper's value in epochs (docs/importance.md: on realistic data the paper's let most
        particles lock into wrong poses early).
    alpha_halflife : float
        ``h`` in ``alpha = max(alpha_min, 2^(-(tau - tau_0) / h))``, epochs.
    flip_epochs : float
        The antipodal direction term is used while ``tau < flip_epochs``.
    dataset_prior : tuple of 3 floats
        ``g`` for directions, in-plane angles and shifts: the dataset average's share of the
        prior part of the mixture.
    anneal : bool
        False: the converged regime throughout (T = 1, alpha = alpha_min, no antipodal term),
        for measurements on a converged map.

    Attributes
    ----------
    store : PosteriorStore, each image's stored posterior
    grid : the current PoseGrid (None until the first ``set_grid``)
    active : whether ``subsets`` samples (else it returns the whole grid)
    last_kl : mean KL(posterior || proposal) over directions at the last ``update``
    last_kl_epochs : mean KL between the last two visits' pose posteriors at the last
        ``update`` (NaN when none of its images had been visited before)
    last_kl_epochs_parts : that KL's three terms (``dir``, ``inp``, ``shift``)
    """

    def __init__(self, n_particles: int, enabled: bool = True, s0: float = 10.0, seed: int = 0,
                 alpha_min: float = 0.05, min_grid_points: int = 20000, coverage: float = 0.95,
                 max_rotations: int = 3000, max_shifts: int = 64,
                 iterations_per_epoch: float = 1.0, schedule_offset: float = 0.2,
                 temperature_epochs: float = 9.0, alpha_halflife: float = 2.7,
                 flip_epochs: float = 10.0, dataset_prior=(0.9, 0.0, 0.9),
                 anneal: bool = True):
        self.n = int(n_particles)
        self.enabled = enabled
        self.s0 = float(s0)
        self.alpha_min = float(alpha_min)
        self.min_grid_points = int(min_grid_points)
        self.coverage = float(coverage)
        self.max_rotations = int(max_rotations)
        self.max_shifts = int(max_shifts)
        self.seed = int(seed)
        self.iterations_per_epoch = float(iterations_per_epoch)
        self.schedule_offset = float(schedule_offset)
        self.temperature_epochs = float(temperature_epochs)
        self.alpha_halflife = float(alpha_halflife)
        self.flip_epochs = float(flip_epochs)
        self.dataset_prior = tuple(float(g) for g in dataset_prior)
        self.anneal = bool(anneal)
        self.store = PosteriorStore(self.n)
        self.grid = None
        self.kernels: GridKernels | None = None
        self.average: DatasetAverage | None = None
        self._cache_key = None
        self._cache: dict = {}
        self._proposals: dict = {}  # row -> its direction proposal, until its update
        self.last_kl = float("nan")
        # Each particle's posterior share on the far hemisphere from its previous best
        # direction, at its last training visit on the current grid (NaN: none yet), and
        # whether the antipodal term has been dropped for good (see flip()).
        self.far_share = np.full(self.n, np.nan)
        self.flip_dropped = False
        self.last_kl_epochs = float("nan")
        self.last_kl_epochs_parts = {"dir": float("nan"), "inp": float("nan"),
                                     "shift": float("nan")}

    @staticmethod
    def options_from_config(config: dict) -> dict:
        """Constructor keyword arguments from the user's settings.

        Parameters
        ----------
        config : dict
            The ``reconstruction`` section (or any dict) with some of the keys
            ``importance_sampling`` (enabled), ``s0``, ``importance_min_grid_points``,
            ``importance_max_rotations``, ``importance_max_shifts``, ``importance_coverage``,
            ``importance_dataset_prior`` (3 numbers), ``importance_temperature_epochs``,
            ``importance_anneal_halflife``; other keys are ignored, absent ones keep
            the constructor's defaults.

        Returns
        -------
        dict of the arguments set, e.g. ``{"enabled": True, "s0": 10.0}``; pass it on with the
        stage's own ``seed`` and ``iterations_per_epoch``.

        Raises
        ------
        InputError
            A value of the wrong type or out of range, naming its key.
        """
        def bad(key, what):
            return InputError(f"config key reconstruction.{key} {what}, got {config[key]!r}")

        def number(key, value, kind, low, low_open, high):
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
                raise bad(key, "must be numbers" if kind is tuple else "must be a number")
            if kind is int and value != int(value):
                raise bad(key, "must be an integer")
            if value < low or (low_open and value == low) or value > high:
                bounds = f"{'>' if low_open else '>='} {low:g}" + (
                    f" and <= {high:g}" if high < np.inf else "")
                raise bad(key, f"must be {bounds}")
            return int(value) if kind is int else float(value)

        out = {}
        for key, (name, kind, bounds) in CONFIG_OPTIONS.items():
            if key not in config:
                continue
            value = config[key]
            if kind is bool:
                if not isinstance(value, (bool, np.bool_)):
                    raise bad(key, "must be true or false")
                out[name] = bool(value)
            elif kind is tuple:
                if np.ndim(value) != 1 or len(value) != 3:
                    raise bad(key, "must be 3 numbers (directions, in-plane angles, shifts)")
                out[name] = tuple(number(key, g, kind, *bounds) for g in value)
            else:
                out[name] = number(key, value, kind, *bounds)
        return out

    # ------------------------------------------------------------------ state

    def state(self, exact: bool = False) -> dict:
        """The per-image posteriors to save (``is_*`` arrays, see :class:`PosteriorStore`) and
        whether the antipodal term has gone (``sampler_flip_dropped``).

        ``exact`` (for a stage's checkpoint) adds the dataset average's sums on the current
        grid (``is_average_*``): kept up to date by adding and removing each visit's
        contribution, they differ in their last bits from sums rebuilt from the store, and
        the proposals, hence the draws, would too. It adds the far-hemisphere shares measured
        on this grid (``sampler_far_share``), which decide when the antipodal term goes.
        Nothing else of the sampler decides a later draw: the draws are seeded by
        ``(seed, iteration, rows)``, the cached sample sets are only reused within an
        iteration, and the proposals kept for the KL are popped by the update of the same
        iteration.
        """
        state = self.store.state()
        state["sampler_flip_dropped"] = np.array(self.flip_dropped)
        if exact and self.average is not None:
            for name, deposits in zip(DIMENSIONS, self.average.deposits):
                state[f"is_average_{name}"] = deposits
            state["sampler_far_share"] = self.far_share
        return state

    @classmethod
    def from_state(cls, state: dict, **kwargs) -> ImportanceSampler:
        """A sampler holding the posteriors of a saved :meth:`state`; ``kwargs`` as for the
        constructor (the number of particles comes from the state)."""
        store = PosteriorStore.from_state(state)
        sampler = cls(store.n, **kwargs)
        sampler.store = store
        sampler.flip_dropped = bool(state.get("sampler_flip_dropped", False))
        return sampler

    def set_grid(self, grid, average: dict | None = None) -> None:
        """Work on ``grid`` from now on: its kernels, the stored points snapped to it afresh, the
        dataset average rebuilt on it and no far-hemisphere shares measured on it yet (or both
        restored from ``average``, an exact :meth:`state` saved on this grid), and no cached
        samples.

        Raises
        ------
        ValueError
            ``average``'s sums are not of this grid's sizes.
        """
        self.grid = grid
        self.kernels = GridKernels(grid, self.store)
        self.far_share[:] = np.nan
        self._cache_key = None
        self._cache = {}
        self.average = DatasetAverage(self.kernels)
        if average is not None and f"is_average_{DIMENSIONS[0]}" in average:
            restored = [np.array(average[f"is_average_{name}"], dtype=np.float64)
                        for name in DIMENSIONS]
            sizes = [dom.n for dom in self.kernels.domains]
            if [len(d) for d in restored] != sizes:
                raise ValueError(f"dataset average of sizes {[len(d) for d in restored]}, "
                                 f"the grid has {sizes}")
            # Nothing has read the average since it was built, so no smoothed copy is stale.
            self.average.deposits = restored
            if "sampler_far_share" in average:
                self.far_share = np.array(average["sampler_far_share"], dtype=np.float64)

    @staticmethod
    def _group_order(grid) -> int:
        """``|G|`` of the grid's point group (1 for C1 or no grid): the grid covers ``1/|G|``
        of the rotations."""
        return symmetry.order(getattr(grid, "symmetry", "C1")) if grid is not None else 1

    @property
    def active(self) -> bool:
        """Whether the grid is sampled rather than summed whole: ``min_grid_points`` is for all
        of SO(3), like ``max_rotations``, so a grid of one asymmetric unit counts ``|G|`` times
        its points. Summed whole by the C1 rule, a C4 run's first stages evaluated their
        11,700-point grids entirely, more than the 9,000 points C1's sampling drew of its
        45,450, and took longer than C1."""
        if not self.enabled or self.grid is None:
            return False
        return self.grid.size * self._group_order(self.grid) > self.min_grid_points

    def rotation_cap(self, grid) -> int:
        """The rotations an image may draw on ``grid``: ``max_rotations / |G|``, rounded up.

        The cap bounds the draws of a broad proposal, and a grid with a point group covers
        ``1/|G|`` of the rotations. A proposal is tempered broad for most of a stage's few
        epochs, so the cap, not the posterior, sets the cost per image there: with C1's cap a
        C4 run drew as many rotations per image as C1 and was no faster (docs/importance.md).
        """
        return -(-self.max_rotations // self._group_order(grid))

    def _rows_at_once(self) -> int:
        """Images whose ``(image x grid)`` proposals or posteriors are formed at once."""
        g = self.grid
        largest = max(g.n_dir, g.n_inp, g.n_shift)
        return int(max(1, min(tunables.ROWS_AT_ONCE, tunables.BYTES_AT_ONCE // (8 * largest))))

    # ------------------------------------------------------------------ schedules

    def epoch(self, iteration: float) -> float:
        """``tau``: passes over the data at SAGD iteration ``iteration``."""
        return schedule.epoch(iteration, self.iterations_per_epoch)

    def temperature(self, iteration: float) -> float:
        """``T``: stored posteriors enter the proposals as ``p^(1/T)``."""
        if not self.anneal:
            return 1.0
        return schedule.temperature(self.epoch(iteration), offset=self.schedule_offset,
                                    temperature_epochs=self.temperature_epochs)

    def alpha_floor(self) -> float:
        """The floor of the prior's share on the current grid: ``alpha_min`` for C1, and on a
        grid of one asymmetric unit of a group of order ``|G|`` the share that keeps C1's
        density of exploratory draws, ``|G| a / (1 - a + |G| a)``.

        Why: on a C1 grid a particle of a symmetric map has ``|G|`` equivalent modes, so its
        proposal's effective sample size, and with it the draws from the prior part that let
        a particle leave a wrong pose, are ``|G|`` times those on the unit, where the modes
        fold into one. With C1's floor a D7 run left 14% of the particles of a simulated D7
        set more than 15 deg from their poses (C1: 1%). The floor above gives the prior part
        ``|G|`` times the kernel part's relative weight, as the folded C1 proposal has.
        """
        order = self._group_order(self.grid)
        a = self.alpha_min
        return order * a / (1.0 - a + order * a)

    def alpha(self, iteration: float) -> float:
        """The prior's share of the proposals."""
        if not self.anneal:
            return self.alpha_floor()
        return schedule.alpha(self.epoch(iteration), offset=self.schedule_offset,
                              halflife=self.alpha_halflife, alpha_min=self.alpha_floor())

    def flip(self, iteration: float) -> bool:
        """Whether direction proposals also cover the antipodes of the stored directions: by
        the schedule (``tau < flip_epochs``), until the posteriors show the map tells views
        from their mirror images (:meth:`_judge_flip`)."""
        return (self.anneal and not self.flip_dropped
                and schedule.antipodal(self.epoch(iteration), flip_epochs=self.flip_epochs))

    def _measure_far_share(self, rows: np.ndarray, p_dir: np.ndarray) -> None:
        """Record each row's posterior share on the hemisphere opposite its stored best
        direction (rows with a stored posterior only; call before the store is updated)."""
        had = self.store.has[rows]
        total = p_dir.sum(axis=1)
        keep = had & (total > 0) & np.isfinite(total)
        if not keep.any():
            return
        store_rows = rows[keep]
        best = np.argmax(self.store.dir_logp[store_rows], axis=1)
        previous = self.store.dir_xyz[store_rows, best].astype(np.float64)
        far = (previous @ np.asarray(self.kernels.coordinates[0], np.float64).T) < 0
        self.far_share[store_rows] = (p_dir[keep] * far).sum(axis=1) / total[keep]

    def _judge_flip(self) -> None:
        """Drop the antipodal term once the map resolves the hand.

        While a low-resolution map cannot tell a view from its mirror image, a particle's
        posterior keeps a good share on the far hemisphere from its previous best direction
        (the antipodal draws find it there), or moves there whole when the hand flips; once
        the map can, that share is the prior's stray draws, nearly nothing. When the
        ``FAR_SHARE_QUANTILE`` quantile of it over the particles visited on this grid (junk,
        with flat posteriors, stays a minority) is below ``FAR_SHARE_DROP``, over at least
        ``FAR_SHARE_MIN_VISITS`` particles, the term goes for good. On the paper-scale set
        (40,000 particles, 100 iterations per epoch) the epoch schedule alone kept it to the
        last stage, where it doubled the directions drawn; by this rule it goes in the 20 A
        stage, once the particles that changed hemisphere there have done so.
        """
        if self.flip_dropped or not self.anneal:
            return
        seen = self.far_share[np.isfinite(self.far_share)]
        if len(seen) >= max(1, min(FAR_SHARE_MIN_VISITS, self.n // 4)) and \
                float(np.quantile(seen, FAR_SHARE_QUANTILE)) < FAR_SHARE_DROP:
            self.flip_dropped = True

    # ------------------------------------------------------------------ proposals and draws

    def dataset_average(self, dim: int) -> np.ndarray:
        """Mean posterior over all images in dimension ``dim`` (0 directions, 1 in-plane,
        2 shifts) on the current grid, kernel-smoothed."""
        return self.average(dim)

    def proposals(self, rows, iteration: float):
        """Each row's proposals ``(q_dir, q_inp, q_shift)`` on the current grid, as a function
        of the row's position in ``rows`` (the batch's are built at once)."""
        matrices = self._proposal_matrices(np.asarray(rows), iteration)
        return lambda i: tuple(m[i] for m in matrices)

    def _proposal_matrices(self, rows: np.ndarray, iteration: float) -> list[np.ndarray]:
        priors = prior_parts(self.kernels, self.average, self.dataset_prior)
        return proposal_matrices(self.kernels, priors, rows, self.temperature(iteration),
                                 self.alpha(iteration), self.flip(iteration))

    def subsets(self, grid, rows, iteration: int) -> PoseSubsets:
        """The poses to evaluate for ``rows``; the same (rows, iteration) gives the same sets."""
        if grid is not self.grid:
            self.set_grid(grid)
        rows = np.asarray(rows)
        key = (int(iteration), rows.tobytes())
        if key in self._cache:
            return self._cache[key]
        # Only the minibatch being optimised needs its samples kept (its line search asks again);
        # a pass over every particle at one iteration (held-out, final poses) must not keep them
        # all: at 100,000 particles that was tens of GB.
        if len(self._cache) >= tunables.CACHED_BATCHES or self._cache_key != int(iteration):
            self._cache = {}
            self._cache_key = int(iteration)
        g = self.grid
        if not self.active:
            for row in rows:
                self._proposals[row] = None
            subsets = exhaustive_subsets(g, len(rows))
            self._cache[key] = subsets
            return subsets
        parts = [[], [], []]  # per dimension, each chunk's ragged (counts, indices, log weights)
        log_w = (g.dir_log_weights, g.inp_log_weights, np.asarray(g.shift_log_weights))
        at_once = self._rows_at_once()
        for lo in range(0, len(rows), at_once):
            chunk = rows[lo:lo + at_once]
            q = self._proposal_matrices(chunk, iteration)
            m = capped_draw_counts(g, *q, self.s0, self.coverage, self.rotation_cap(g),
                                   self.max_shifts)
            # Seeded by the rows themselves, so the same (rows, iteration) draws the same sets.
            rng = np.random.default_rng([self.seed, int(iteration), *chunk.tolist()])
            for dim in range(3):
                parts[dim].append(sample(q[dim], log_w[dim], m[dim], rng))
            for i, row in enumerate(chunk):
                self._proposals[row] = np.array(q[0][i])  # for the KL at its update
        subsets = ragged_subsets(g.n_inp, parts)
        self._cache[key] = subsets
        return subsets

    # ------------------------------------------------------------------ updates

    def update(self, grid, rows, subsets: PoseSubsets, result, measure: bool = True) -> None:
        """Store each image's posterior marginals (top ``K`` per dimension, as coordinates) and
        its ``K_JOINT`` heaviest rotations, refresh the dataset average and measure the KL to the proposal and to the previous
        visit (only with ``measure``: the history records them for training steps, and the
        held-out and final pose passes, which nothing records, spent a tenth of a pass on them).

        Parameters
        ----------
        grid : the PoseGrid ``subsets`` index
        rows : (B,) image rows
        subsets : the PoseSubsets the likelihood was evaluated on
        result : with ``rot_post`` and ``shift_post`` over ``subsets`` (a LikelihoodResult)
        """
        if grid is not self.grid:
            self.set_grid(grid)
        rows = np.asarray(rows)
        new_idx = [np.zeros((len(rows), K_STORED), np.int64) for _ in range(3)]
        new_logp = [np.full((len(rows), K_STORED), -np.inf) for _ in range(3)]
        joint_dir = np.full((len(rows), K_JOINT), -1, np.int64)
        joint_inp = np.full((len(rows), K_JOINT), -1, np.int64)
        joint_logp = np.full((len(rows), K_JOINT), -np.inf)
        valid = np.ones(len(rows), dtype=bool)
        kls = []
        at_once = self._rows_at_once()
        for lo in range(0, len(rows), at_once):
            hi = min(len(rows), lo + at_once)
            part = subsets.block(lo, hi) if (lo, hi) != (0, len(rows)) else subsets
            r0, r1 = subsets.rot_offsets[lo], subsets.rot_offsets[hi]
            s0, s1 = subsets.shift_offsets[lo], subsets.shift_offsets[hi]
            *p, (top_dir, top_inp, top_mass) = marginals_and_top_rotations(
                self.grid, part, result.rot_post[r0:r1], result.shift_post[s0:s1], K_JOINT)
            joint_dir[lo:hi], joint_inp[lo:hi] = top_dir, top_inp
            with np.errstate(divide="ignore", invalid="ignore"):
                joint_logp[lo:hi] = np.log(top_mass / p[0].sum(axis=1, keepdims=True))
            if measure:
                kls.extend(self._kl_to_proposals(rows[lo:hi], p[0]))
                if self.anneal and not self.flip_dropped:  # nothing reads it afterwards
                    self._measure_far_share(rows[lo:hi], p[0])
            else:
                for row in rows[lo:hi]:
                    self._proposals.pop(row, None)
            for dim in range(3):
                top, logp, usable = top_points(p[dim])
                valid[lo:hi] &= usable
                new_idx[dim][lo:hi, :top.shape[1]] = top
                new_logp[dim][lo:hi, :top.shape[1]] = logp
        if measure:
            self.last_kl = float(np.mean(kls)) if kls else float("nan")
            self._judge_flip()
            self.last_kl_epochs, self.last_kl_epochs_parts = diagnostics.kl_between_visits(
                self.kernels, rows, valid, new_idx, new_logp)
        store = self.store
        # A visit without a usable posterior leaves the image uninformed, not misinformed.
        self.average.deposit(rows[store.has[rows]], -1.0)
        store.has[rows[~valid]] = False
        stored = rows[valid]
        index = [new_idx[dim][valid] for dim in range(3)]
        # Empty slots (index -1) read the grid's last point, with log mass -inf.
        joint_logp = joint_logp[valid]
        joint_logp[joint_dir[valid] < 0] = -np.inf
        joint = (self.kernels.coordinates[0][joint_dir[valid]],
                 self.kernels.coordinates[1][joint_inp[valid]], joint_logp)
        store.write(stored, [self.kernels.coordinates[dim][index[dim]] for dim in range(3)],
                    [new_logp[dim][valid] for dim in range(3)], joint)
        self.kernels.stored_at(stored, index)  # stored at grid points, they snap back to them
        self.average.deposit(stored, 1.0)

    def _kl_to_proposals(self, rows, p_dir: np.ndarray):
        """KL(posterior || proposal) over directions for the rows that had a proposal (each is
        kept only until this visit's update)."""
        had = [(i, q) for i, row in enumerate(rows)
               if (q := self._proposals.pop(row, None)) is not None]
        if not had:
            return []
        return diagnostics.kl_to_proposal(p_dir[[i for i, _ in had]],
                                          np.stack([q for _, q in had]))
