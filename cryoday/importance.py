"""Importance sampling over the pose and shift quadrature (paper Section 3.3, METHOD.md 5).

Stored state
    Each image keeps, from its previous visit, its posterior marginals over viewing directions,
    in-plane angles and shifts, **sparse**: the ``K`` points with the most mass, as coordinates
    (unit vectors, angles, shifts in A) with their untempered log masses, so they carry over to
    the finer grid of the next stage. Memory per image: ``K x (3 + 1 + 2 + 3) x 4`` bytes plus a
    flag (K = 32: ~1.2 kB), independent of the grid size: 100,000 particles cost ~120 MB. While a
    grid is set, each stored point's nearest grid point is cached too (0.5 kB per image).

Proposals
    At the next visit each dimension's proposal on the current grid is the mixture

        q = (1 - alpha) q_kernel + alpha [(1 - g) W + g * dataset-average posterior]

    ``q_kernel`` is the stored marginal, tempered (masses to the power 1/T) and diffused by a
    kernel tied to the grid spacing ``a``: von Mises-Fisher on directions with
    kappa = ln 4 / (1 - cos a) (value 1/4 at one spacing), plus the same kernel at the antipodal
    directions while the hand is undecided (views from ``u`` and ``-u`` are mirror images, which
    a low-resolution map cannot tell apart); circular von Mises in-plane (1/2 at one spacing);
    Gaussian on shifts, sigma = 0.67 spacings. Every kernel is ``exp(-c |x - y|^2)`` in an
    embedding (unit vectors for angles, A for shifts); stored points are snapped to their nearest
    current grid point and spread with the grid's own sparse kernel matrix (exact on the grid
    they were stored from, within half a spacing after a refinement). ``W`` is the quadrature's
    base measure (uniform for angles, the Gaussian prior for shifts). ``g`` is 0.9 for directions
    and shifts, 0 in-plane.

    The dataset-average posterior is the mean over all images of their stored marginals (images
    not seen yet count as ``W``), smoothed by the same kernel. It lives on the current grid only
    (``n_dir + n_inp + n_shift`` floats): it is rebuilt from the per-image state when the grid
    changes and kept up to date at each ``update`` by replacing the visited images'
    contributions, so it adds nothing to the saved state.

Schedules, in epochs of the data
    The paper's code uses T = max(1, 2^(750 / max(1, t - 50))) and
    alpha = max(0.05, 2^(-0.005 max(0, t - 50))), and keeps the antipodal term while t < 2500,
    for ~10,000 iterations of ~200 images over 46,000 (230 iterations per epoch). Our stages
    run a few hundred iterations in all, so those constants would keep T astronomically high
    (2^15 at t = 100) and every proposal flat for the whole run. What the schedules really track
    is how often each image's posterior has been refreshed and how far the map has come in
    passes over the data, so we count epochs, ``tau = t / iterations_per_epoch``, and keep the
    paper's values in those units:

        T(tau)     = max(1, 2^(tau_T / (tau - tau_0)))            tau_T = 3 epochs (paper 3.3)
        alpha(tau) = max(alpha_min, 2^(-(tau - tau_0) / h))       h = 0.9 epochs (paper 0.87),
                                                                  alpha_min = 0.05
        antipodal term while tau < tau_flip                       tau_flip = 10 epochs (10.9)

    with tau_0 = 0.2 epochs (the paper's first 50 iterations, 0.22 epochs), before which alpha =
    1 and proposals are the prior alone. On the 5,000-image demo (25 iterations per epoch, ~2.4
    epochs per stage) alpha reaches its floor in the second stage, T falls from ~2.6 where the
    grids first become large enough to sample (30 A) to ~1.2 at the last stage, and the
    antipodal term goes at epoch 10, in the fifth of six stages, near the end of the resolution
    ramp, where the paper drops it. A data set too large for several epochs per run stays in
    the early, cautious regime (flat proposals, capped draws: unbiased, but less saving):
    lower ``iterations_per_epoch`` there. The tempering is applied when a proposal is built,
    with T at that time, not when the posterior is stored: that is the paper's schedule one
    visit later, and it keeps ``update`` free of the clock and the stored masses untempered,
    which the between-visit KL needs.

Samples
    ``M = ceil(s0 * ESS)`` points are drawn with replacement (ESS = 1 / sum q^2), for a
    batch's images at once (proposals as sparse products, one multinomial call per dimension,
    seeded by the iteration and the rows: the same rows at the same iteration draw the same);
    a point drawn ``c`` times gets weight ``W c / (M q)``, which makes the log-sum-exp over the
    evaluated product set an unbiased estimate of the marginal likelihood. A dimension whose
    sample would cover more than 95% of it is evaluated whole. Small grids (below
    ``min_grid_points`` per image) are evaluated exhaustively: exact and cheap. A broad
    posterior would ask for most of a huge grid, so the draws per image are capped
    (``max_rotations`` rotations, ``max_shifts`` shifts): the estimate stays unbiased, with more
    variance, and the cost per image stays bounded.

Between-visit KL (the paper's Figure 3)
    ``last_kl_epochs`` is the minibatch mean of each image's KL(new || previous) between the pose
    posteriors of its two latest visits, taken as the product of the three marginals (so the
    KL is the sum of the three). Both visits' top-``K`` marginals (untempered, renormalised over
    their ``K`` points) are smoothed by the current grid's kernel and compared as discrete
    distributions on the union of their ``2K`` support points, from their coordinates (the
    previous visit may be on another grid). It is 0 for an unchanged posterior and grows as
    ``c d^2`` (``ln 4 (d / a)^2`` for directions) when a sharp posterior moves by ``d``.
    ``last_kl`` (posterior against proposal over directions) is kept as well.
"""

from __future__ import annotations

import numba
import numpy as np
from scipy.sparse import csr_matrix
from scipy.spatial import cKDTree
from scipy.special import logsumexp

from cryoday import jit
from cryoday.pose_sets import PoseSubsets, exhaustive_subsets
from cryoday.posteriors import exp32

K_STORED = 32
KERNEL_CUTOFF = 20.0  # kernel values below e^-20 of the peak are left out
MAX_LOG2_TEMPERATURE = 64.0  # beyond this every stored point weighs the same anyway
# Per dimension: the state arrays holding coordinates and log masses.
_STATE = (("dir_xyz", "dir_logp"), ("inp_angle", "inp_logp"), ("shift_A", "shift_logp"))


class _Domain:
    """One factor of the grid, embedded in R^k so that its kernel is ``exp(-c |x - y|^2)``.

    Parameters
    ----------
    points : (n, k) the grid's points in the embedding
    c : float, the kernel's scale per squared distance
    base_logw : (n,) log quadrature weights: the "uniform" part of the proposal mixture
    """

    def __init__(self, points: np.ndarray, c: float, base_logw: np.ndarray):
        self.points = np.ascontiguousarray(points, dtype=np.float64)
        self.n = len(self.points)
        self.c = float(c)
        base = np.exp(np.asarray(base_logw, np.float64) - np.max(base_logw))
        self.base = base / base.sum()
        self._tree = cKDTree(self.points)
        self._smoothing = None

    def nearest(self, x: np.ndarray) -> np.ndarray:
        """Index of the nearest grid point to each ``x[..., :]``."""
        x = np.asarray(x, dtype=np.float64)
        _, idx = self._tree.query(x.reshape(-1, x.shape[-1]))
        return idx.reshape(x.shape[:-1]).astype(np.int64)

    @property
    def smoothing(self) -> csr_matrix:
        """The kernel between grid points within its cut-off, sparse and symmetric."""
        if self._smoothing is None:
            radius = np.sqrt(KERNEL_CUTOFF / self.c)
            pairs = self._tree.query_pairs(radius, output_type="ndarray")
            i = np.concatenate([pairs[:, 0], pairs[:, 1], np.arange(self.n)])
            j = np.concatenate([pairs[:, 1], pairs[:, 0], np.arange(self.n)])
            value = np.exp(-self.c * np.sum((self.points[i] - self.points[j]) ** 2, axis=1))
            self._smoothing = csr_matrix((value, (i, j)), shape=(self.n, self.n))
        return self._smoothing

    def spread_rows(self, idx: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Row ``b``: ``sum_k w[b, k] kernel(., grid[idx[b, k]])`` on the grid, ``(B, n)``.

        One sparse product of the rows' stored points with the kernel matrix: the batch at once,
        where a loop over its images built each row from ``K`` sparse rows.
        """
        n_rows, k = idx.shape
        points = csr_matrix((np.asarray(w, np.float64).ravel(),
                             (np.repeat(np.arange(n_rows), k), np.asarray(idx).ravel())),
                            shape=(n_rows, self.n))
        return (points @ self.smoothing).toarray()


def _normalised_logw(logp: np.ndarray) -> np.ndarray:
    """Log weights renormalised over each row's finite entries (``-inf`` pads stay ``-inf``)."""
    with np.errstate(invalid="ignore"):
        return logp - logsumexp(logp, axis=-1, keepdims=True)


class ImportanceSampler:
    """Per-image proposals over the current grid; see the module docstring.

    Parameters
    ----------
    n_particles : int
        Images whose posteriors are kept.
    enabled : bool
        False: every image is evaluated on the whole grid (posteriors are still stored).
    s0 : float
        Draws per unit of the proposal's effective sample size.
    seed : int
        Seeds the draws (with the iteration and the image's row).
    alpha_min : float
        Floor of the prior's share ``alpha`` (METHOD.md: 0.05).
    min_grid_points, coverage, max_rotations, max_shifts
        Exhaustive below ``min_grid_points`` per image; a dimension is taken whole when its
        draws would cover ``coverage`` of it; per-image caps on the draws.
    iterations_per_epoch : float
        SAGD iterations per pass over the training images: the unit of the schedules (the stage
        driver passes its number of minibatches). The default 1 reads ``iteration`` as epochs.
    schedule_offset : float
        ``tau_0``, epochs before the stored posteriors are used at all (alpha = 1 until then).
    temperature_epochs : float
        ``tau_T`` in ``T = max(1, 2^(tau_T / (tau - tau_0)))``.
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
    """

    CACHED_BATCHES = 2  # sample sets kept per iteration: the minibatch, and one more
    # Images whose (image x grid) proposals and posteriors are formed at once: at most 256, and
    # ~32 MB per such float64 array (at 4 A on 128-px data a grid has 10^5 directions).
    ROWS_AT_ONCE, BYTES_AT_ONCE = 256, 32 << 20

    def __init__(self, n_particles: int, enabled: bool = True, s0: float = 10.0, seed: int = 0,
                 alpha_min: float = 0.05, min_grid_points: int = 20000, coverage: float = 0.95,
                 max_rotations: int = 3000, max_shifts: int = 64,
                 iterations_per_epoch: float = 1.0, schedule_offset: float = 0.2,
                 temperature_epochs: float = 3.0, alpha_halflife: float = 0.9,
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
        self.has = np.zeros(self.n, dtype=bool)
        self.dir_xyz = np.zeros((self.n, K_STORED, 3), dtype=np.float32)
        self.dir_logp = np.full((self.n, K_STORED), -np.inf, dtype=np.float32)
        self.inp_angle = np.zeros((self.n, K_STORED), dtype=np.float32)
        self.inp_logp = np.full((self.n, K_STORED), -np.inf, dtype=np.float32)
        self.shift_A = np.zeros((self.n, K_STORED, 2), dtype=np.float32)
        self.shift_logp = np.full((self.n, K_STORED), -np.inf, dtype=np.float32)
        self.grid = None
        self._domains = None
        self._deposit = None
        self._average = [None, None, None]
        self._cache_key = None
        self._cache: dict = {}
        self._proposals: dict = {}
        self.last_kl = float("nan")
        self.last_kl_epochs = float("nan")
        self.last_kl_epochs_parts = {"dir": float("nan"), "inp": float("nan"),
                                     "shift": float("nan")}

    # ------------------------------------------------------------------ state

    def state(self) -> dict:
        return {"is_has": self.has, "is_dir_xyz": self.dir_xyz, "is_dir_logp": self.dir_logp,
                "is_inp_angle": self.inp_angle, "is_inp_logp": self.inp_logp,
                "is_shift_A": self.shift_A, "is_shift_logp": self.shift_logp}

    @classmethod
    def from_state(cls, state: dict, **kwargs) -> ImportanceSampler:
        has = state["is_has"]
        sampler = cls(len(has), **kwargs)
        for key in ("has", "dir_xyz", "inp_angle", "shift_A"):
            setattr(sampler, key, np.array(state[f"is_{key}"]))
        for prefix in ("dir", "inp", "shift"):
            if f"is_{prefix}_logp" in state:
                logp = np.array(state[f"is_{prefix}_logp"], dtype=np.float32)
            else:
                # Saved before log masses were kept: normalised masses, 0 for empty slots.
                with np.errstate(divide="ignore"):
                    logp = np.log(np.array(state[f"is_{prefix}_p"], dtype=np.float32))
            setattr(sampler, f"{prefix}_logp", logp)
        return sampler

    def set_grid(self, grid) -> None:
        self.grid = grid
        a = grid.angular_step
        step_inp = 2 * np.pi / grid.n_inp
        sigma = 0.67 * grid.shift_step_px * grid.pixel_size
        # vMF exp(kappa (u.v - 1)) is exp(-kappa |u - v|^2 / 2) on unit vectors.
        kappa_dir = np.log(4.0) / (1.0 - np.cos(a))
        kappa_inp = np.log(2.0) / max(1.0 - np.cos(step_inp), 1e-12)
        self._domains = (
            _Domain(grid.directions, kappa_dir / 2, np.zeros(grid.n_dir)),
            _Domain(np.stack([np.cos(grid.inplane), np.sin(grid.inplane)], axis=1),
                    kappa_inp / 2, np.zeros(grid.n_inp)),
            _Domain(grid.shifts * grid.pixel_size, 1.0 / (2 * sigma * sigma),
                    grid.shift_log_weights),
        )
        self._grid_coords = (grid.directions, grid.inplane, grid.shifts * grid.pixel_size)
        # Per image and stored point, its nearest grid point (-1: not known yet), for the three
        # dimensions and the antipodal directions: int32, 0.5 kB per image.
        self._snap_cache = [np.full((self.n, K_STORED), -1, dtype=np.int32) for _ in range(4)]
        self._cache_key = None
        self._cache = {}
        self._rebuild_average()

    def _rows_at_once(self) -> int:
        g = self.grid
        largest = max(g.n_dir, g.n_inp, g.n_shift)
        return int(max(1, min(self.ROWS_AT_ONCE, self.BYTES_AT_ONCE // (8 * largest))))

    @property
    def active(self) -> bool:
        return self.enabled and self.grid is not None and self.grid.size > self.min_grid_points

    # ------------------------------------------------------------------ schedules

    def epoch(self, iteration: float) -> float:
        """``tau``: passes over the data at SAGD iteration ``iteration``."""
        return float(iteration) / self.iterations_per_epoch

    def temperature(self, iteration: float) -> float:
        """``T``: stored posteriors enter the proposals as ``p^(1/T)``."""
        if not self.anneal:
            return 1.0
        since = self.epoch(iteration) - self.schedule_offset
        log2_t = self.temperature_epochs / since if since > 0 else np.inf
        return float(2.0 ** min(log2_t, MAX_LOG2_TEMPERATURE))

    def alpha(self, iteration: float) -> float:
        """The prior's share of the proposals."""
        if not self.anneal:
            return self.alpha_min
        since = max(0.0, self.epoch(iteration) - self.schedule_offset)
        return float(max(self.alpha_min, 2.0 ** (-since / self.alpha_halflife)))

    def flip(self, iteration: float) -> bool:
        """Whether direction proposals also cover the antipodes of the stored directions."""
        return self.anneal and self.epoch(iteration) < self.flip_epochs

    # ------------------------------------------------------------------ dataset average

    def _embedded(self, dim: int, rows) -> np.ndarray:
        """Stored coordinates of ``rows`` in dimension ``dim``'s embedding, ``(B, K, k)``."""
        x = getattr(self, _STATE[dim][0])[rows].astype(np.float64)
        return np.stack([np.cos(x), np.sin(x)], axis=-1) if dim == 1 else x

    def _deposits(self, dim: int, rows) -> tuple[np.ndarray, np.ndarray]:
        """Grid indices and untempered normalised masses of ``rows``' stored points."""
        w = np.exp(_normalised_logw(getattr(self, _STATE[dim][1])[rows].astype(np.float64)))
        return self._snapped(dim, rows), np.nan_to_num(w)

    def _snapped(self, dim: int, rows, antipodes: bool = False) -> np.ndarray:
        """The current grid's points nearest to ``rows``' stored points in dimension ``dim``
        (or to their antipodes), ``(B, K)``: kept per image until its points or the grid
        change (a KD-tree query per image at each proposal and update was a tenth of a stage's
        time on the demo). Stored points written other than by :meth:`update` need
        :meth:`set_grid` again, which clears the cache."""
        cache = self._snap_cache[3 if antipodes else dim]
        rows = np.asarray(rows)
        idx = cache[rows].astype(np.int64)
        unknown = idx[:, 0] < 0
        if unknown.any():
            x = self._embedded(dim, rows[unknown])
            found = self._domains[dim].nearest(-x if antipodes else x)
            cache[rows[unknown]] = found
            idx[unknown] = found
        return idx

    def _rebuild_average(self, chunk: int = 20000) -> None:
        """Every stored image's marginals, summed on the current grid (snapped to its points)."""
        self._deposit = [np.zeros(dom.n) for dom in self._domains]
        self._average = [None, None, None]
        seen = np.flatnonzero(self.has)
        for lo in range(0, len(seen), chunk):
            self._deposit_rows(seen[lo:lo + chunk], 1.0)

    def _deposit_rows(self, rows, sign: float) -> None:
        for dim in range(3):
            idx, w = self._deposits(dim, rows)
            self._deposit[dim] += sign * np.bincount(idx.ravel(), weights=w.ravel(),
                                                     minlength=self._domains[dim].n)
            self._average[dim] = None

    def dataset_average(self, dim: int) -> np.ndarray:
        """Mean posterior over all images in dimension ``dim`` (0 directions, 1 in-plane,
        2 shifts), kernel-smoothed; images without a posterior count as the base measure."""
        if self._average[dim] is None:
            dom = self._domains[dim]
            seen = int(self.has.sum())
            # Replacing contributions leaves rounding residue around zero.
            smoothed = dom.smoothing @ np.maximum(self._deposit[dim], 0.0)
            total = smoothed.sum()
            average = (1.0 - seen / self.n) * dom.base
            if total > 0 and seen:
                average = average + (seen / self.n) * smoothed / total
            self._average[dim] = average / average.sum()
        return self._average[dim]

    # ------------------------------------------------------------------ proposals

    def _prior(self, dim: int) -> np.ndarray:
        g = self.dataset_prior[dim]
        base = self._domains[dim].base
        return base if g <= 0 else (1.0 - g) * base + g * self.dataset_average(dim)

    def proposals(self, rows, iteration: float):
        """Each row's proposals ``(q_dir, q_inp, q_shift)`` on the current grid, as a function
        of the row's position in ``rows`` (the batch's are built at once)."""
        matrices = self._proposal_matrices(np.asarray(rows), iteration)
        return lambda i: tuple(m[i] for m in matrices)

    def _proposal_matrices(self, rows: np.ndarray, iteration: float) -> list[np.ndarray]:
        """The proposals of ``rows`` per dimension, ``(B, n)`` each (read-only when they are
        all the prior)."""
        temperature, alpha = self.temperature(iteration), self.alpha(iteration)
        priors = [self._prior(dim) for dim in range(3)]
        if alpha >= 1.0:
            return [np.broadcast_to(p, (len(rows), len(p))) for p in priors]
        has = self.has[rows]
        out = []
        for dim in range(3):
            dom = self._domains[dim]
            logp = getattr(self, _STATE[dim][1])[rows].astype(np.float64)
            w = np.nan_to_num(np.exp(_normalised_logw(logp / temperature)))
            q = dom.spread_rows(self._snapped(dim, rows), w)
            if dim == 0 and self.flip(iteration):
                q += dom.spread_rows(self._snapped(0, rows, antipodes=True), w)
            total = q.sum(axis=1)
            # An image without a posterior, or with an unusable one, gets the prior alone.
            usable = has & (total > 0) & np.isfinite(total)
            q = np.where(usable[:, None], q / np.where(usable, total, 1.0)[:, None], priors[dim])
            out.append((1.0 - alpha) * q + alpha * priors[dim])
        return out

    def _draws(self, q: np.ndarray) -> np.ndarray:
        """Per row of ``q``, ``ceil(s0 * ESS)`` draws, or the whole dimension (0) when they
        would cover it."""
        m = np.ceil(self.s0 / np.sum(q * q, axis=-1)).astype(np.int64)
        return np.where(m >= self.coverage * q.shape[-1], 0, m)

    @staticmethod
    def _sample(q: np.ndarray, log_w: np.ndarray, m: np.ndarray, rng):
        """Per row of ``q`` ``(B, n)``, ``m[b]`` multinomial draws with unbiased weights
        ``W c / (M q)``, or every point where ``m[b] = 0``.

        Returns the picks, ragged: per row their number, then the points (in order) and their
        log weights, all rows' one after another.
        """
        q = np.atleast_2d(q)
        m = np.broadcast_to(np.asarray(m, np.int64), (len(q),))
        whole = m <= 0
        counts = rng.multinomial(np.where(whole, 0, m), q)
        picked = (counts > 0) | whole[:, None]
        row, point = np.nonzero(picked)
        weights = np.asarray(log_w, np.float64)[point]
        drawn = ~whole[row]
        r, p = row[drawn], point[drawn]
        weights[drawn] += np.log(counts[r, p]) - np.log(m[r]) - np.log(q[r, p])
        return np.bincount(row, minlength=len(q)), point, weights

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
        if len(self._cache) >= self.CACHED_BATCHES or self._cache_key != int(iteration):
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
            q_dir, q_inp, q_shift = self._proposal_matrices(chunk, iteration)
            m_dir, m_inp, m_shift = self._draws(q_dir), self._draws(q_inp), self._draws(q_shift)
            # A broad posterior (early on, or at low SNR) would ask for most of a huge grid: cap
            # the rotations per image by drawing fewer samples. Any M keeps the weights
            # unbiased; only the variance grows.
            m_dir = np.where(m_dir == 0, g.n_dir, m_dir)
            m_inp = np.where(m_inp == 0, g.n_inp, m_inp)
            over = (m_dir * m_inp > self.max_rotations) & ((m_dir > 1) | (m_inp > 1))
            while over.any():
                m_dir[over] = np.maximum(1, (m_dir[over] * 0.8).astype(np.int64))
                m_inp[over] = np.maximum(1, (m_inp[over] * 0.8).astype(np.int64))
                over = (m_dir * m_inp > self.max_rotations) & ((m_dir > 1) | (m_inp > 1))
            m_dir[m_dir >= self.coverage * g.n_dir] = 0
            m_inp[m_inp >= self.coverage * g.n_inp] = 0
            m_shift = np.minimum(np.where(m_shift == 0, g.n_shift, m_shift), self.max_shifts)
            m_shift[m_shift >= self.coverage * g.n_shift] = 0
            # Seeded by the rows themselves, so the same (rows, iteration) draws the same sets.
            rng = np.random.default_rng([self.seed, int(iteration), *chunk.tolist()])
            for dim, (q, m) in enumerate(((q_dir, m_dir), (q_inp, m_inp), (q_shift, m_shift))):
                parts[dim].append(self._sample(q, log_w[dim], m, rng))
            for i, row in enumerate(chunk):
                self._proposals[row] = np.array(q_dir[i])  # for the KL at its update
        ragged = []
        for dim_parts in parts:
            counts = np.concatenate([p[0] for p in dim_parts])
            ragged += [np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                       np.concatenate([p[1] for p in dim_parts]),
                       np.concatenate([p[2] for p in dim_parts])]
        subsets = PoseSubsets(g.n_inp, *ragged)
        self._cache[key] = subsets
        return subsets

    # ------------------------------------------------------------------ updates

    def update(self, grid, rows, subsets: PoseSubsets, result) -> None:
        """Store each image's posterior marginals (top ``K`` per dimension, as coordinates),
        refresh the dataset average and measure the KL to the previous visit."""
        if grid is not self.grid:
            self.set_grid(grid)
        rows = np.asarray(rows)
        new_idx = [np.zeros((len(rows), K_STORED), np.int64) for _ in range(3)]
        new_logp = [np.full((len(rows), K_STORED), -np.inf) for _ in range(3)]
        valid = np.ones(len(rows), dtype=bool)
        kls = []
        at_once = self._rows_at_once()
        for lo in range(0, len(rows), at_once):
            hi = min(len(rows), lo + at_once)
            part = subsets.block(lo, hi) if (lo, hi) != (0, len(rows)) else subsets
            r0, r1 = subsets.rot_offsets[lo], subsets.rot_offsets[hi]
            s0, s1 = subsets.shift_offsets[lo], subsets.shift_offsets[hi]
            marginals = self._marginals(part, result.rot_post[r0:r1], result.shift_post[s0:s1])
            kls.extend(self._kl_to_proposals(rows[lo:hi], marginals[0]))
            for dim, p in enumerate(marginals):
                total = p.sum(axis=1)
                valid[lo:hi] &= (total > 0) & np.isfinite(total)
                n = p.shape[1]
                top = (np.argpartition(p, -K_STORED, axis=1)[:, -K_STORED:] if n > K_STORED
                       else np.broadcast_to(np.arange(n), (len(p), n)))
                new_idx[dim][lo:hi, :top.shape[1]] = top
                with np.errstate(divide="ignore", invalid="ignore"):
                    new_logp[dim][lo:hi, :top.shape[1]] = np.log(
                        np.take_along_axis(p, top, axis=1) / total[:, None])
        self.last_kl = float(np.mean(kls)) if kls else float("nan")
        self._between_visits(rows, valid, new_idx, new_logp)
        # A visit without a usable posterior leaves the image uninformed, not misinformed.
        self._deposit_rows(rows[self.has[rows]], -1.0)
        self.has[rows[~valid]] = False
        stored = rows[valid]
        for dim, (coord_attr, logp_attr) in enumerate(_STATE):
            getattr(self, coord_attr)[stored] = self._grid_coords[dim][new_idx[dim][valid]]
            getattr(self, logp_attr)[stored] = new_logp[dim][valid]
            # Stored at grid points, they snap back to them.
            self._snap_cache[dim][stored] = new_idx[dim][valid]
        self._snap_cache[3][stored] = -1
        self.has[stored] = True
        self._deposit_rows(stored, 1.0)

    def _marginals(self, subsets: PoseSubsets, rot_post: np.ndarray, shift_post: np.ndarray):
        """Each image's posterior mass per grid direction, in-plane angle and shift, ``(B, n)``.

        The posterior at a grid point is gamma divided by the importance correction
        ``c / (M q)``, i.e. ``gamma W / exp(logw)``: the true posterior mass at that point.
        """
        g = self.grid
        n_images = subsets.n_images
        image = np.repeat(np.arange(n_images), np.diff(subsets.rot_offsets))
        rot_index = subsets.rot_index
        mass = rot_post * np.exp(g.rot_log_weights[rot_index] - subsets.rot_logw)
        d, j = rot_index // g.n_inp, rot_index % g.n_inp
        p_dir = np.bincount(image * g.n_dir + d, weights=mass, minlength=n_images * g.n_dir)
        p_inp = np.bincount(image * g.n_inp + j, weights=mass, minlength=n_images * g.n_inp)
        image = np.repeat(np.arange(n_images), np.diff(subsets.shift_offsets))
        shift_index = subsets.shift_index
        mass = shift_post * np.exp(g.shift_log_weights[shift_index] - subsets.shift_logw)
        p_shift = np.bincount(image * g.n_shift + shift_index, weights=mass,
                              minlength=n_images * g.n_shift)
        return (p_dir.reshape(n_images, g.n_dir), p_inp.reshape(n_images, g.n_inp),
                p_shift.reshape(n_images, g.n_shift))

    def _kl_to_proposals(self, rows, p_dir: np.ndarray) -> list[float]:
        """KL(posterior || proposal) over directions, for the rows that had a proposal (each is
        kept only until this visit's update); the proposal renormalised on the posterior's
        support."""
        had = [(i, q) for i, row in enumerate(rows)
               if (q := self._proposals.pop(row, None)) is not None]
        if not had:
            return []
        p = p_dir[[i for i, _ in had]]
        q = np.stack([q for _, q in had])
        # Over the posterior's support only: at most the directions the image evaluated.
        image, point = np.nonzero(p)
        p, q = p[image, point], q[image, point]
        p = p / np.bincount(image, weights=p, minlength=len(had))[image]
        q = q / np.bincount(image, weights=q, minlength=len(had))[image]
        with np.errstate(divide="ignore"):
            return list(np.bincount(image, weights=p * np.log(p / q), minlength=len(had)))

    def _between_visits(self, rows, valid, new_idx, new_logp) -> None:
        """``last_kl_epochs``: mean KL(new || previous visit) of the batch's pose posteriors."""
        before = valid & self.has[rows]
        parts = {}
        for dim, name in enumerate(("dir", "inp", "shift")):
            if not before.any():
                parts[name] = float("nan")
                continue
            # Compare what will be stored (float32), so an unchanged posterior gives exactly 0.
            coords = self._grid_coords[dim][new_idx[dim][before]].astype(np.float32)
            coords = coords.astype(np.float64)
            x_new = np.stack([np.cos(coords), np.sin(coords)], -1) if dim == 1 else coords
            x_old = self._embedded(dim, rows[before])
            lp_old = getattr(self, _STATE[dim][1])[rows[before]].astype(np.float64)
            lp_new = new_logp[dim][before].astype(np.float32).astype(np.float64)
            parts[name] = kl_on_union(x_new, lp_new, x_old, lp_old, self._domains[dim].c)
        if before.any():
            total = parts["dir"] + parts["inp"] + parts["shift"]
            self.last_kl_epochs = float(np.mean(total))
            parts = {k: float(np.mean(v)) for k, v in parts.items()}
        else:
            self.last_kl_epochs = float("nan")
        self.last_kl_epochs_parts = parts


def kl_on_union(x_p, logp_p, x_q, logp_q, c: float) -> np.ndarray:
    """KL(p || q) between kernel-smoothed weighted point sets, on the union of their points.

    Parameters
    ----------
    x_p, x_q : (B, K, k) points in a kernel's embedding
    logp_p, logp_q : (B, K) log masses, ``-inf`` for empty slots (renormalised here)
    c : float, the kernel ``exp(-c |x - y|^2)``

    Returns
    -------
    (B,) KL in nats: each set is smoothed by the kernel, evaluated at the ``2K`` points of both,
    and renormalised over the valid ones.
    """
    out = np.empty(len(x_p))
    _kl_on_union(np.ascontiguousarray(x_p, np.float64), _normalised_logw(logp_p),
                 np.ascontiguousarray(x_q, np.float64), _normalised_logw(logp_q), float(c), out)
    return out


@numba.njit(cache=jit.CACHE, fastmath=jit.FASTMATH)
def _smoothed_log_density(union, present, x, log_w, c, out):
    """``out[u]``: log of ``sum_k w_k exp(-c |union_u - x_k|^2)`` at the present union points,
    renormalised over them (``-inf`` elsewhere); ``log_w`` is ``-inf`` on empty slots.

    The exponentials, relative to each point's largest term, are float32 (:func:`exp32`,
    5e-7) so the loop over ``x`` vectorises: this is a diagnostic, and equal inputs still give
    exactly equal densities. Terms below e^-87 of the largest, empty slots among them, are 0.
    """
    n_x = np.uint64(x.shape[0])
    xt = np.ascontiguousarray(x.T)  # (dims, K): each coordinate contiguous over the points
    terms = np.empty(n_x)
    total = -np.inf
    for u in range(union.shape[0]):
        if not present[u]:
            out[u] = -np.inf
            continue
        terms[:] = 0.0
        for a in range(xt.shape[0]):
            for k in range(n_x):
                terms[k] += (union[u, a] - xt[a, k]) ** 2
        peak = -np.inf
        for k in range(n_x):
            terms[k] = log_w[k] - c * terms[k]  # from squared distances to log terms
            peak = max(peak, terms[k])
        acc = 0.0
        for k in range(n_x):
            t = np.float32(terms[k] - peak)
            acc += exp32(t) if t > np.float32(-87.0) else np.float32(0.0)
        out[u] = peak + np.log(acc)
        total = np.logaddexp(total, out[u])
    for u in range(union.shape[0]):
        out[u] -= total


@numba.njit(parallel=True, cache=jit.CACHE, fastmath=jit.FASTMATH)
def _kl_on_union(x_p, log_w_p, x_q, log_w_q, c, out):
    """:func:`kl_on_union` per image, in parallel (numpy's (B, 2K, K) arrays took ~20 ms a
    minibatch, a third of an update)."""
    n_k = x_p.shape[1]
    for b in numba.prange(x_p.shape[0]):
        union = np.concatenate((x_p[b], x_q[b]))
        present = np.empty(2 * n_k, dtype=np.bool_)
        for k in range(n_k):
            present[k] = log_w_p[b, k] > -np.inf
            present[n_k + k] = log_w_q[b, k] > -np.inf
        log_p = np.empty(2 * n_k)
        log_q = np.empty(2 * n_k)
        _smoothed_log_density(union, present, x_p[b], log_w_p[b], c, log_p)
        _smoothed_log_density(union, present, x_q[b], log_w_q[b], c, log_q)
        kl = 0.0
        for u in range(2 * n_k):
            if present[u]:
                kl += np.exp(log_p[u]) * (log_p[u] - log_q[u])
        out[b] = kl
