"""Importance sampling over the pose and shift quadrature (paper Section 3.3, METHOD.md 5).

Each image keeps, from its previous visit, its posterior marginals over viewing directions,
in-plane angles and shifts, **sparse**: the ``K`` points with the most mass, as coordinates (unit
vectors, angles, shifts in A), so they carry over to the finer grid of the next stage. At the next
visit, each dimension's proposal on the current grid is that posterior diffused by a kernel
(von Mises-Fisher on directions with kappa = ln 4 / (1 - cos a), value 1/4 at one grid spacing
a; circular von Mises in-plane, 1/2 at one spacing; Gaussian on shifts, sigma = 0.67 spacings),
mixed with a uniform floor ``alpha``. ``M = ceil(s0 * ESS)`` points are drawn with replacement
(ESS = 1 / sum q^2); a point drawn ``c`` times gets weight ``W c / (M q)``, which makes the
log-sum-exp over the evaluated product set an unbiased estimate of the marginal likelihood. A
dimension whose sample would cover more than 95% of it is evaluated whole.

Memory per image: ``K x (3 + 1 + 2 + 3) x 4`` bytes plus flags (K = 32: ~1.2 kB), independent of
the grid size: 100,000 particles cost ~120 MB.

Small grids (below ``min_grid_points`` per image) are evaluated exhaustively: exact and cheap.
A broad posterior would ask for most of a huge grid, so the draws per image are capped
(``max_rotations`` rotations, ``max_shifts`` shifts): the estimate stays unbiased, with more
variance, and the cost per image stays bounded.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from cryoday.likelihood import PoseSubsets

K_STORED = 32


class ImportanceSampler:
    """Per-image proposals over the current grid; see the module docstring."""

    CACHED_BATCHES = 2  # sample sets kept per iteration: the minibatch, and one more

    def __init__(self, n_particles: int, enabled: bool = True, s0: float = 10.0, seed: int = 0,
                 alpha: float = 0.05, min_grid_points: int = 20000, coverage: float = 0.95,
                 max_rotations: int = 3000, max_shifts: int = 64):
        self.n = int(n_particles)
        self.enabled = enabled
        self.s0 = float(s0)
        self.alpha = float(alpha)
        self.min_grid_points = int(min_grid_points)
        self.coverage = float(coverage)
        self.max_rotations = int(max_rotations)
        self.max_shifts = int(max_shifts)
        self.seed = int(seed)
        self.has = np.zeros(self.n, dtype=bool)
        self.dir_xyz = np.zeros((self.n, K_STORED, 3), dtype=np.float32)
        self.dir_p = np.zeros((self.n, K_STORED), dtype=np.float32)
        self.inp_angle = np.zeros((self.n, K_STORED), dtype=np.float32)
        self.inp_p = np.zeros((self.n, K_STORED), dtype=np.float32)
        self.shift_A = np.zeros((self.n, K_STORED, 2), dtype=np.float32)
        self.shift_p = np.zeros((self.n, K_STORED), dtype=np.float32)
        self.grid = None
        self._cache_key = None
        self._cache: dict = {}
        self._proposals: dict = {}
        self.last_kl = float("nan")

    # ------------------------------------------------------------------ state

    def state(self) -> dict:
        return {"is_has": self.has, "is_dir_xyz": self.dir_xyz, "is_dir_p": self.dir_p,
                "is_inp_angle": self.inp_angle, "is_inp_p": self.inp_p,
                "is_shift_A": self.shift_A, "is_shift_p": self.shift_p}

    @classmethod
    def from_state(cls, state: dict, **kwargs) -> ImportanceSampler:
        has = state["is_has"]
        sampler = cls(len(has), **kwargs)
        for key in ("has", "dir_xyz", "dir_p", "inp_angle", "inp_p", "shift_A", "shift_p"):
            setattr(sampler, key, np.array(state[f"is_{key}"]))
        return sampler

    def set_grid(self, grid) -> None:
        self.grid = grid
        self._tree = cKDTree(grid.directions)
        self._cache_key = None
        self._cache = {}

    @property
    def active(self) -> bool:
        return self.enabled and self.grid is not None and self.grid.size > self.min_grid_points

    # ------------------------------------------------------------------ proposals

    def _proposal(self, row: int):
        g = self.grid
        a = g.angular_step
        # The direction kernel is below 4^-16 beyond 4 grid spacings: evaluate it only on the
        # grid directions within that distance of a stored point (a k-d tree query), so the
        # cost follows the posterior's support, not the grid size.
        kappa_dir = np.log(4.0) / (1.0 - np.cos(a))
        stored = self.dir_p[row] > 0
        xyz = self.dir_xyz[row][stored].astype(np.float64)
        q_dir = np.zeros(g.n_dir)
        neighbours = self._tree.query_ball_point(xyz, 2 * np.sin(2 * a))
        for u, p, idx in zip(xyz, self.dir_p[row][stored], neighbours):
            idx = np.asarray(idx, dtype=np.int64)
            q_dir[idx] += p * np.exp(kappa_dir * (g.directions[idx] @ u - 1.0))
        step_inp = 2 * np.pi / g.n_inp
        kappa_inp = np.log(2.0) / (1.0 - np.cos(step_inp))
        dangle = g.inplane[:, None] - self.inp_angle[row][None, :]
        q_inp = np.exp(kappa_inp * (np.cos(dangle) - 1.0)) @ self.inp_p[row]
        sigma = 0.67 * g.shift_step_px * g.pixel_size
        shifts_A = g.shifts * g.pixel_size
        d2 = ((shifts_A[:, None, :] - self.shift_A[row][None]) ** 2).sum(-1)
        q_shift = np.exp(-d2 / (2 * sigma * sigma)) @ self.shift_p[row]
        out = []
        for q in (q_dir, q_inp, q_shift):
            total = q.sum()
            q = q / total if total > 0 and np.isfinite(total) else np.full_like(q, 1.0 / len(q))
            out.append((1 - self.alpha) * q + self.alpha / len(q))
        return out

    def _draws(self, q: np.ndarray) -> int:
        """``ceil(s0 * ESS)`` draws, or the whole dimension (0) when they would cover it."""
        m = int(np.ceil(self.s0 / np.sum(q * q)))
        return 0 if m >= self.coverage * len(q) else m

    @staticmethod
    def _sample(q: np.ndarray, log_w: np.ndarray, m: int, rng):
        """Multinomial draws with unbiased weights ``W c / (M q)``; ``m = 0``: every point."""
        if m <= 0:
            return np.arange(len(q)), log_w.copy()
        counts = rng.multinomial(m, q)
        picked = np.flatnonzero(counts)
        return picked, log_w[picked] + np.log(counts[picked]) - np.log(m) - np.log(q[picked])

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
        rot_sets, rot_logw, shift_sets, shift_logw = [], [], [], []
        log_w_dir = np.full(g.n_dir, -np.log(g.n_dir))
        log_w_inp = np.full(g.n_inp, -np.log(g.n_inp))
        for row in rows:
            if not self.active:
                rot_sets.append(np.arange(g.n_rot))
                rot_logw.append(np.asarray(g.rot_log_weights, np.float64))
                shift_sets.append(np.arange(g.n_shift))
                shift_logw.append(np.asarray(g.shift_log_weights, np.float64))
                self._proposals[row] = None
                continue
            rng = np.random.default_rng([self.seed, int(iteration), int(row)])
            if self.has[row]:
                q_dir, q_inp, q_shift = self._proposal(row)
            else:
                # No posterior yet on a large grid: uniform proposals, capped like the others.
                q_dir = np.full(g.n_dir, 1.0 / g.n_dir)
                q_inp = np.full(g.n_inp, 1.0 / g.n_inp)
                q_shift = np.exp(np.asarray(g.shift_log_weights))
            m_dir, m_inp, m_shift = self._draws(q_dir), self._draws(q_inp), self._draws(q_shift)
            # A broad posterior (early on, or at low SNR) would ask for most of a huge grid: cap
            # the rotations per image by drawing fewer samples. Any M keeps the weights unbiased;
            # only the variance grows.
            m_dir = m_dir or g.n_dir
            m_inp = m_inp or g.n_inp
            while m_dir * m_inp > self.max_rotations and (m_dir > 1 or m_inp > 1):
                m_dir, m_inp = max(1, int(m_dir * 0.8)), max(1, int(m_inp * 0.8))
            m_dir = 0 if m_dir >= self.coverage * g.n_dir else m_dir
            m_inp = 0 if m_inp >= self.coverage * g.n_inp else m_inp
            m_shift = min(m_shift or g.n_shift, self.max_shifts)
            m_shift = 0 if m_shift >= self.coverage * g.n_shift else m_shift
            d, lw_d = self._sample(q_dir, log_w_dir, m_dir, rng)
            j, lw_j = self._sample(q_inp, log_w_inp, m_inp, rng)
            s, lw_s = self._sample(q_shift, np.asarray(g.shift_log_weights), m_shift, rng)
            rot_sets.append((d[:, None] * g.n_inp + j[None, :]).ravel())
            rot_logw.append((lw_d[:, None] + lw_j[None, :]).ravel())
            shift_sets.append(s)
            shift_logw.append(lw_s)
            self._proposals[row] = (d, j, q_dir)
        subsets = PoseSubsets(
            rot_offsets=np.concatenate([[0], np.cumsum([len(r) for r in rot_sets])]).astype(
                np.int64),
            rot_index=np.concatenate(rot_sets).astype(np.int64),
            rot_logw=np.concatenate(rot_logw),
            shift_offsets=np.concatenate([[0], np.cumsum([len(s) for s in shift_sets])]).astype(
                np.int64),
            shift_index=np.concatenate(shift_sets).astype(np.int64),
            shift_logw=np.concatenate(shift_logw),
        )
        self._cache[key] = subsets
        return subsets

    # ------------------------------------------------------------------ updates

    def update(self, grid, rows, subsets: PoseSubsets, result) -> None:
        """Store each image's posterior marginals (top ``K`` per dimension, as coordinates)."""
        g = self.grid if grid is self.grid else grid
        kls = []
        for i, row in enumerate(np.asarray(rows)):
            r0, r1 = subsets.rot_offsets[i], subsets.rot_offsets[i + 1]
            s0, s1 = subsets.shift_offsets[i], subsets.shift_offsets[i + 1]
            rot_index = subsets.rot_index[r0:r1]
            # The posterior at a grid point is gamma divided by the importance correction
            # c / (M q), i.e. gamma * W / exp(logw): the true posterior mass at that point.
            rot_mass = result.rot_post[r0:r1] * np.exp(
                g.rot_log_weights[rot_index] - subsets.rot_logw[r0:r1])
            d = rot_index // g.n_inp
            j = rot_index % g.n_inp
            p_dir = np.bincount(d, weights=rot_mass, minlength=g.n_dir)
            p_inp = np.bincount(j, weights=rot_mass, minlength=g.n_inp)
            shift_index = subsets.shift_index[s0:s1]
            p_shift = np.zeros(g.n_shift)
            p_shift[shift_index] = result.shift_post[s0:s1] * np.exp(
                g.shift_log_weights[shift_index] - subsets.shift_logw[s0:s1])
            proposal = self._proposals.pop(row, None)  # kept only until this visit's update
            if proposal is not None:
                q_dir = proposal[2]
                p = p_dir / max(p_dir.sum(), 1e-300)
                nz = p > 0
                kls.append(float(np.sum(p[nz] * np.log(p[nz] / (q_dir[nz] / q_dir[nz].sum())))))
            self._store(row, g, p_dir, p_inp, p_shift)
        self.last_kl = float(np.mean(kls)) if kls else float("nan")

    def _store(self, row, g, p_dir, p_inp, p_shift) -> None:
        for p, coords, xyz_attr, p_attr in (
            (p_dir, g.directions, "dir_xyz", "dir_p"),
            (p_inp, g.inplane, "inp_angle", "inp_p"),
            (p_shift, g.shifts * g.pixel_size, "shift_A", "shift_p"),
        ):
            top = np.argsort(p)[::-1][:K_STORED]
            mass = p[top]
            total = mass.sum()
            stored_p = getattr(self, p_attr)
            stored_x = getattr(self, xyz_attr)
            stored_p[row] = 0.0
            stored_p[row, :len(top)] = mass / total if total > 0 else 1.0 / len(top)
            stored_x[row, :len(top)] = coords[top]
        self.has[row] = True
