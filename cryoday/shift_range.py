"""A shift range that follows the data: each stage's prior on in-plane shifts and its grid's
extent, learned from the previous stage's posteriors.

Picked particles are often 10-15 A off-centre per axis; a grid fixed at 2.5 x a default sigma
misses the tail (one particle in seven on realistic data) and nothing said so. Here:

* stage 1 uses the config's ``shift_sigma_A`` as its prior and a generous grid,
  ``max(K_SIGMA sigma, FIRST_STAGE_BOX_FRACTION x box)``: the first stage is exhaustive but its
  shift spacing is coarse (30 A at 40 A), so a wide disc costs a few points;
* after every stage's final pose pass, :func:`estimate` fits the prior's sigma to the stored
  shift posteriors by the EM update of a Gaussian prior on the grid (moment matching, see
  :func:`fit_sigma`), and measures how many particles press against the grid's outer ring;
* the next stage (a separate job: the figures travel in ``state.npz``, :meth:`ShiftEstimate.state`)
  uses ``sigma = max(config, estimate)`` and a grid of radius ``K_SIGMA sigma``, widened by
  ``WIDEN`` when the posteriors piled up at the previous grid's edge, never beyond
  ``MAX_BOX_FRACTION`` of the box nor ``WIDEN`` times the previous radius (a fit to posteriors
  piled at an edge diverges: it grows by half the radius per stage instead).

The config value is therefore a starting value and a floor: the data can widen the prior, never
narrow it below what the user set. A floor because EM on a grid whose spacing exceeds sigma has a
fixed point at zero (every posterior on the centre point tells it the particles are centred);
users with well-centred particles lower ``shift_sigma_A`` themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cryoday.records import POSE_SCALARS

# Grid radius in prior sigmas: a 2D Gaussian leaves exp(-K^2 / 2) of the particles outside,
# 1.1% at 3 (4.4% at the former 2.5).
K_SIGMA = 3.0
# Stage 1's radius at least this fraction of the box (A): cheap there (a coarse, exhaustive grid).
FIRST_STAGE_BOX_FRACTION = 0.2
# No radius beyond this fraction of the box: a particle that far off is mostly outside its image.
MAX_BOX_FRACTION = 0.3
# A particle is at the grid's edge when more than this share of its posterior mass lies in the
# outer ring (grid points with a lattice neighbour outside the disc, ``on_edge``) ...
EDGE_MASS = 0.10
# ... and the posteriors pile up there when more than this fraction of the particles is, and more
# than EDGE_EXCESS times the fraction a Gaussian of the fitted sigma puts in the ring (a finite
# grid's ring always holds a Gaussian's tail; on a fine grid at 3 sigma that is about 2-4%).
EDGE_PARTICLES = 0.02
EDGE_EXCESS = 2.0
# The edge is judged as above on grids whose outer ring lies at least this many steps out...
EDGE_MIN_STEPS = 2.0
# ... and on coarser ones a crowded edge needs EDGE_EXCESS times this share of the particles.
EDGE_COARSE_EXPECTED = 0.1
# The next grid's radius when the last one's edge was crowded: 1.5 x, i.e. 2.25 x the points.
WIDEN = 1.5
# Keys of state.npz (and poses.npz) that carry a stage's shift figures: the scalars records.py
# writes into poses.npz.
STATE_KEYS = POSE_SCALARS


@dataclass(frozen=True)
class ShiftRange:
    """A stage's shift prior (``sigma_A``, per axis) and its grid's radius, with why."""

    sigma_A: float
    radius_A: float
    reason: str


@dataclass(frozen=True)
class ShiftEstimate:
    """What a stage's final shift posteriors say (see :func:`estimate`).

    Attributes
    ----------
    sigma_A : float
        EM estimate of the prior's sigma per axis (A); ``inf`` when the posteriors fill the disc
        as if it were uniform, NaN when the grid had a single shift.
    rms_A : float
        ``sqrt(mean E|s|^2 / 2)`` over the particles: the same figure without the grid's
        truncation taken into account.
    edge_fraction, edge_expected : float
        Particles with more than ``EDGE_MASS`` of their mass in the outer ring, and the fraction
        of a Gaussian that lies beyond the ring's inner radius, for ``sigma_A`` or the widest
        sigma the grid covers (its radius / ``K_SIGMA``) if that is smaller.
    used : ShiftRange
        The stage's own prior and radius.
    step_A : float
        The stage's grid spacing (A).
    n : int
        Particles with a stored posterior.
    """

    sigma_A: float
    rms_A: float
    edge_fraction: float
    edge_expected: float
    used: ShiftRange
    step_A: float
    n: int

    @property
    def crowded(self) -> bool:
        """Whether the posteriors piled up at the grid's edge (the next grid is widened)."""
        return bool(self.edge_fraction > EDGE_PARTICLES
                    and self.edge_fraction > EDGE_EXCESS * self.edge_expected)

    def state(self) -> dict:
        """Scalars for ``state.npz`` and ``poses.npz`` (keys ``STATE_KEYS``)."""
        return {"shift_sigma_A": np.float64(self.used.sigma_A),
                "shift_radius_A": np.float64(self.used.radius_A),
                "shift_sigma_estimate_A": np.float64(self.sigma_A),
                "shift_edge_fraction": np.float64(self.edge_fraction),
                "shift_edge_expected": np.float64(self.edge_expected),
                "shift_step_A": np.float64(self.step_A)}

    def summary(self) -> str:
        """One log line."""
        return (f"shift posteriors: prior sigma {_a(self.sigma_A)} estimated (EM on the grid; "
                f"rms {self.rms_A:.1f} A), {self.edge_fraction:.1%} of {self.n} particles have "
                f"more than {EDGE_MASS:.0%} of their mass in the grid's outer ring "
                f"({self.used.radius_A:.1f} A; a Gaussian the grid covers puts "
                f"{self.edge_expected:.1%} there)"
                + ("; piling up at the edge: the next grid is widened" if self.crowded else ""))


def _a(value: float) -> str:
    return f"{value:.1f} A" if math.isfinite(value) else str(value)


def choose(config_sigma_A: float, box_A: float, previous: dict | None) -> ShiftRange:
    """The shift prior and grid radius of a stage.

    Parameters
    ----------
    config_sigma_A : float
        The config's ``shift_sigma_A``: stage 1's prior and every stage's floor.
    box_A : float
        The box's side (A), the same at every stage.
    previous : dict or None
        The previous stage's :meth:`ShiftEstimate.state` (from its ``state.npz``), None at
        stage 1 or when the state predates these figures.
    """
    cap = MAX_BOX_FRACTION * box_A
    if previous is None:
        radius = max(K_SIGMA * config_sigma_A, FIRST_STAGE_BOX_FRACTION * box_A)
        return ShiftRange(config_sigma_A, min(radius, cap),
                          f"config {config_sigma_A:g} A; first stage: radius "
                          f"max({K_SIGMA:g} sigma, {FIRST_STAGE_BOX_FRACTION:g} x the box)")
    estimate = float(previous["shift_sigma_estimate_A"])
    if math.isnan(estimate):
        sigma, why = config_sigma_A, "the previous grid had one shift: config"
    else:
        # Posteriors piled at a grid's edge fit a Gaussian wider than anything the grid shows
        # (the fit diverges as they approach a uniform disc): grow by WIDEN per stage at most.
        reach = WIDEN * float(previous["shift_radius_A"]) / K_SIGMA
        sigma = max(config_sigma_A, min(estimate, reach, cap / K_SIGMA))
        why = (f"estimated {_a(estimate)} from the previous stage's posteriors; config "
               f"{config_sigma_A:g} A is the floor")
        if estimate > reach:
            why += f"; at most {WIDEN:g} x the previous grid's reach"
    radius = K_SIGMA * sigma
    edge, expected = float(previous["shift_edge_fraction"]), float(previous["shift_edge_expected"])
    if edge > EDGE_PARTICLES and edge > EDGE_EXCESS * expected:
        radius = max(radius, WIDEN * float(previous["shift_radius_A"]))
        why += (f"; widened: {edge:.1%} of the particles sat at the previous grid's edge "
                f"({float(previous['shift_radius_A']):.1f} A)")
    if radius >= cap * (1 - 1e-9):
        why += f"; capped at {MAX_BOX_FRACTION:g} x the box"
    return ShiftRange(float(sigma), float(min(radius, cap)), why)


def read_state(path) -> dict | None:
    """The shift figures of a ``state.npz`` (or ``poses.npz``), None if it has none."""
    if path is None:
        return None
    with np.load(path, allow_pickle=False) as f:
        if not all(k in f.files for k in STATE_KEYS):
            return None
        return {k: float(f[k]) for k in STATE_KEYS}


def for_stage(config_sigma_A: float, box_A: float, previous_state=None, log=print) -> ShiftRange:
    """:func:`choose` for a stage that starts from ``previous_state`` (a path or None), logged."""
    previous = read_state(previous_state)
    if previous_state is not None and previous is None:
        log("the previous stage's state has no shift estimate (written by an older cryoday): "
            "the shift range starts afresh")
    chosen = choose(config_sigma_A, box_A, previous)
    log(f"shift prior sigma {chosen.sigma_A:.1f} A ({chosen.reason}), grid radius "
        f"{chosen.radius_A:.1f} A")
    return chosen


# ---------------------------------------------------------------------- the estimate


def fit_sigma(points_A: np.ndarray, target_m2: float) -> float:
    """The sigma whose Gaussian prior on the grid ``points_A`` ``(m, 2)`` has mean ``|s|^2``
    equal to ``target_m2``: the EM (M-step) update of a Gaussian prior restricted to the grid.

    The grid prior ``w_i ~ exp(-|s_i|^2 / 2 sigma^2)`` is an exponential family in ``|s|^2``, so
    maximising the expected complete-data likelihood matches its mean ``|s|^2`` to the
    posteriors'. Unlike ``sqrt(target / 2)`` this accounts for the grid's truncation and spacing.
    Returns 0 for a non-positive target and ``inf`` when the target reaches the uniform disc's
    (the grid is too small to say).
    """
    r2 = np.sum(np.asarray(points_A, np.float64) ** 2, axis=1)
    if target_m2 <= 0 or len(r2) < 2:
        return 0.0 if len(r2) >= 2 else float("nan")
    if target_m2 >= r2.mean() * (1 - 1e-9):
        return float("inf")

    def mean_r2(log_sigma):
        logw = -r2 / (2.0 * math.exp(2 * log_sigma))
        w = np.exp(logw - logw.max())
        return float(w @ r2 / w.sum())

    positive = r2[r2 > 0]
    lo, hi = math.log(positive.min() ** 0.5 * 1e-2), math.log(r2.max() ** 0.5 * 1e3)
    for _ in range(80):  # monotone in sigma: bisection to ~1e-12 relative in log sigma
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if mean_r2(mid) < target_m2 else (lo, mid)
    return math.exp(0.5 * (lo + hi))


def particle_moments(store, grid, rows=None) -> tuple[np.ndarray, np.ndarray]:
    """Each stored particle's posterior ``E|s|^2`` (A^2) and its mass in the grid's outer ring.

    The store keeps an image's ``K`` most probable shifts, with masses normalised over the whole
    grid, so they hold ``c <= 1`` of it. The mass it dropped is taken to be the tail of an
    isotropic Gaussian about the kept points' mean: the kept points are that Gaussian inside a
    disc holding ``c`` (``t = |d|^2 / 2v = -log(1 - c)`` at its edge), which fixes its variance
    ``v`` from the kept points' spread, and the tail's mean ``|d|^2`` is ``2 v (1 + t)``. Without
    it a broad posterior would read as a narrower one.
    """
    rows = np.flatnonzero(store.has) if rows is None else np.asarray(rows)
    s = store.shift_A[rows].astype(np.float64)
    p = np.exp(store.shift_logp[rows].astype(np.float64))
    r2 = np.sum(s**2, axis=2)
    kept = np.clip(p.sum(axis=1), 1e-12, 1.0)
    q = p / kept[:, None]
    mean = np.einsum("nk,nkx->nx", q, s)
    spread = np.sum(q * np.sum((s - mean[:, None]) ** 2, axis=2), axis=1)
    t = -np.log(np.clip(1.0 - kept, 1e-12, 1.0))
    with np.errstate(invalid="ignore", divide="ignore"):
        # Mean of an exponential truncated at t: 1 - t e^-t / (1 - e^-t), t/2 as t -> 0.
        inside = np.where(t > 1e-6, 1.0 - t * np.exp(-t) / -np.expm1(-t), t / 2)
        variance = np.where(inside > 0, spread / (2.0 * inside), 0.0)
    tail = np.sum(mean**2, axis=1) + 2.0 * variance * (1.0 + t)
    m2 = kept * np.sum(q * r2, axis=1) + (1.0 - kept) * tail
    ring = (np.sum(p * on_edge(s, grid), axis=1) if grid.n_shift > 1
            else np.zeros(len(rows)))
    return m2, ring


def on_edge(points_A: np.ndarray, grid) -> np.ndarray:
    """Whether each point (A, ``(..., 2)``, on ``grid``) is on the grid's edge: a lattice
    neighbour farther out lies outside the disc (every lattice point inside it is on the grid)."""
    h = grid.shift_step_px * grid.pixel_size
    r_max = float(np.hypot(*(grid.shifts * grid.pixel_size).T).max())
    x, y = np.abs(points_A[..., 0]), np.abs(points_A[..., 1])
    out = np.maximum(np.hypot(x + h, y), np.hypot(x, y + h))
    return out > r_max + 1e-3 * h


def ring_inner_radius(grid) -> float:
    """Radius (A) of the innermost point of the grid's edge (:func:`on_edge`)."""
    points = grid.shifts * grid.pixel_size
    return float(np.hypot(*points[on_edge(points, grid)].T).min())


def estimate(store, grid, used: ShiftRange) -> ShiftEstimate:
    """Fit the shift prior to ``store``'s posteriors on ``grid`` (the stage's, with prior and
    radius ``used``) and measure the edge; see the module docstring."""
    m2, ring = particle_moments(store, grid)
    n = len(m2)
    target = float(m2.mean()) if n else 0.0
    sigma = fit_sigma(grid.shifts * grid.pixel_size, target) if n else float("nan")
    inner = ring_inner_radius(grid)
    outer = float(np.hypot(*(grid.shifts * grid.pixel_size).T).max())
    # The tail in the ring of a Gaussian the grid covers (at most outer / K_SIGMA): a wider fit
    # is itself a sign that the particles reach beyond the grid.
    covered = 0.0 if math.isnan(sigma) else min(sigma, outer / K_SIGMA)
    expected = math.exp(-inner**2 / (2 * covered**2)) if grid.n_shift > 1 and covered > 0 else 0.0
    step = float(grid.shift_step_px * grid.pixel_size)
    if grid.n_shift > 1 and inner == 0:
        expected = 1.0  # one ring around the centre: a coarse grid cannot tell
    elif grid.n_shift > 1 and inner < EDGE_MIN_STEPS * step:
        # A ring within a step or so of the centre: at a coarse stage a noise-broadened
        # posterior puts a tenth of its mass there whatever the particles' spread (seen: 3.5%
        # "at the edge" of a 25 A stage of particles simulated 3 A off-centre), so only a
        # large share counts (particles 12 A off-centre on a 22.5 A grid: 60%).
        expected = max(expected, EDGE_COARSE_EXPECTED)
    edge = float(np.mean(ring > EDGE_MASS)) if n else 0.0
    return ShiftEstimate(sigma_A=float(sigma), rms_A=math.sqrt(target / 2), edge_fraction=edge,
                         edge_expected=float(expected), used=used,
                         step_A=float(grid.shift_step_px * grid.pixel_size), n=n)


def learn(store, grid, used: ShiftRange, log=print) -> ShiftEstimate:
    """:func:`estimate`, logged."""
    result = estimate(store, grid, used)
    log(result.summary())
    return result


# ---------------------------------------------------------------------- validation and report


def edge_metrics(poses: dict) -> tuple[dict, str | None]:
    """The last stage's shift figures for ``metrics.json`` and the warning, if its posteriors
    piled up at the grid's edge; ``({}, None)`` for poses written without them.

    Parameters
    ----------
    poses : dict
        ``cryoday.records.read_poses`` of the chosen seed's last stage.
    """
    if not all(k in poses for k in STATE_KEYS):
        return {}, None
    figures = {k: float(poses[k]) for k in STATE_KEYS}
    edge, expected = figures["shift_edge_fraction"], figures["shift_edge_expected"]
    crowded = edge > EDGE_PARTICLES and edge > EDGE_EXCESS * expected
    figures["shift_edge_crowded"] = bool(crowded)
    if not crowded:
        return figures, None
    return figures, (
        f"shift posteriors pile up at the edge of the last stage's shift grid: {edge:.1%} of the "
        f"particles have more than {EDGE_MASS:.0%} of their posterior mass in its outer ring "
        f"(radius {figures['shift_radius_A']:.1f} A; a Gaussian of the fitted sigma "
        f"{figures['shift_sigma_estimate_A']:.1f} A puts {expected:.1%} there): particles sit "
        "farther off-centre than the grid reaches; raise reconstruction.shift_sigma_A")


def add_to_metrics(metrics: dict, poses: dict) -> None:
    """Add :func:`edge_metrics`' figures to ``metrics`` and its warning to
    ``metrics["warnings"]``."""
    figures, warning = edge_metrics(poses)
    metrics.update(figures)
    if warning:
        metrics["warnings"].append(warning)
