"""The posterior store: what each image's latest visit leaves for its next proposal.

Per image and dimension (viewing direction, in-plane angle, shift) the ``K_STORED`` points with
the most posterior mass, as coordinates (unit vectors, radians, A) with their untempered log
masses. Coordinates rather than grid indices, so that a posterior carries over to the finer
grid of the next stage; a fixed ``K`` keeps the state per image independent of the grid size
(``K x 9 x 4`` bytes and a flag, about 1.2 kB). The masses are stored untempered because the
tempering depends on the time of the next visit and the between-visit KL compares the
posteriors themselves. See ``docs/importance.md``.

Beside the marginals, the ``K_JOINT`` rotations (direction and in-plane angle together) of most
mass at the latest visit (180 bytes): the proposals do not read them, the final map and the
refinement's M step insert each image at them (``final_map.posterior_poses``). The product of
the marginals' top points puts mass on (direction, in-plane) pairs the image never had: a
particle whose posterior holds two views, each at its own in-plane angle, is inserted at four.
"""

from __future__ import annotations

import numpy as np

from cryoday.importance._marginals import (
    marginals,  # noqa: F401  (the store's API)
    marginals_and_top_rotations,  # noqa: F401
)
from cryoday.importance._normalise import normalised_logw  # noqa: F401
from cryoday.importance._select import top_k_rows

K_STORED = 32
# Joint rotations kept per image. On the realistic synthetic set's last stage (docs/refine.md)
# the 9 heaviest held all but 1% of nearly every particle's rotation mass.
K_JOINT = 9
DIMENSIONS = ("dir", "inp", "shift")
# Per dimension: the attribute holding the coordinates and the one holding the log masses.
FIELDS = (("dir_xyz", "dir_logp"), ("inp_angle", "inp_logp"), ("shift_A", "shift_logp"))


class PosteriorStore:
    """Each image's sparse posterior marginals, as float32 arrays over ``(image, K)``.

    Parameters
    ----------
    n_particles : int
        Images whose posteriors are kept.

    Attributes
    ----------
    has : (n,) bool
        Whether the image has a stored posterior.
    dir_xyz, inp_angle, shift_A : (n, K, 3), (n, K), (n, K, 2) float32
        The stored points: unit direction vectors, in-plane angles (radians), shifts (A).
    dir_logp, inp_logp, shift_logp : (n, K) float32
        Their log masses, normalised over the ``K`` points, ``-inf`` for empty slots.
    joint_dir_xyz, joint_inp_angle : (n, K_JOINT, 3), (n, K_JOINT) float32
        The image's heaviest rotations, as a direction and an in-plane angle each.
    joint_logp : (n, K_JOINT) float32
        Their log masses as shares of the image's whole rotation posterior (not renormalised
        over the ``K_JOINT``: what they leave out shows), ``-inf`` for empty slots and for
        images without joint points (a state saved before they were kept).
    """

    def __init__(self, n_particles: int):
        self.n = int(n_particles)
        self.has = np.zeros(self.n, dtype=bool)
        self.dir_xyz = np.zeros((self.n, K_STORED, 3), dtype=np.float32)
        self.dir_logp = np.full((self.n, K_STORED), -np.inf, dtype=np.float32)
        self.inp_angle = np.zeros((self.n, K_STORED), dtype=np.float32)
        self.inp_logp = np.full((self.n, K_STORED), -np.inf, dtype=np.float32)
        self.shift_A = np.zeros((self.n, K_STORED, 2), dtype=np.float32)
        self.shift_logp = np.full((self.n, K_STORED), -np.inf, dtype=np.float32)
        self.joint_dir_xyz = np.zeros((self.n, K_JOINT, 3), dtype=np.float32)
        self.joint_inp_angle = np.zeros((self.n, K_JOINT), dtype=np.float32)
        self.joint_logp = np.full((self.n, K_JOINT), -np.inf, dtype=np.float32)

    def coordinates(self, dim: int) -> np.ndarray:
        """The stored points of dimension ``dim`` (0 directions, 1 in-plane, 2 shifts)."""
        return getattr(self, FIELDS[dim][0])

    def log_masses(self, dim: int) -> np.ndarray:
        """The stored points' log masses in dimension ``dim``, ``(n, K)``."""
        return getattr(self, FIELDS[dim][1])

    def write(self, rows, coordinates, log_masses, joint=None) -> None:
        """Store ``rows``' points: per dimension, their coordinates and log masses; ``joint``
        ``(directions, in-plane angles, log masses)`` their heaviest rotations (None: the
        rows' joint points are cleared, not left from an older visit)."""
        self.has[rows] = True
        for dim in range(3):
            self.coordinates(dim)[rows] = coordinates[dim]
            self.log_masses(dim)[rows] = log_masses[dim]
        if joint is None:
            self.joint_logp[rows] = -np.inf
        else:
            self.joint_dir_xyz[rows], self.joint_inp_angle[rows], self.joint_logp[rows] = joint

    def has_joint(self, rows) -> np.ndarray:
        """Whether each of ``rows`` has joint rotations stored."""
        return np.isfinite(self.joint_logp[rows]).any(axis=1)

    def state(self) -> dict:
        """The arrays to save, under the keys ``state.npz`` has always used (``is_*``)."""
        return {"is_has": self.has, "is_dir_xyz": self.dir_xyz, "is_dir_logp": self.dir_logp,
                "is_inp_angle": self.inp_angle, "is_inp_logp": self.inp_logp,
                "is_shift_A": self.shift_A, "is_shift_logp": self.shift_logp,
                "is_joint_dir_xyz": self.joint_dir_xyz,
                "is_joint_inp_angle": self.joint_inp_angle, "is_joint_logp": self.joint_logp}

    @classmethod
    def from_state(cls, state: dict) -> PosteriorStore:
        """The store saved as :meth:`state` (copies of its arrays).

        A state saved before log masses were kept has normalised masses (``is_*_p``, 0 for
        empty slots) instead, and still loads; one saved before joint rotations were kept
        loads without them (:meth:`has_joint` False). Arrays of inconsistent shapes raise ValueError
        (rather than an IndexError at the first proposal).
        """
        has = state["is_has"]
        store = cls(len(has))
        for key in ("has", "dir_xyz", "inp_angle", "shift_A"):
            setattr(store, key, np.array(state[f"is_{key}"]))
        for prefix in DIMENSIONS:
            if f"is_{prefix}_logp" in state:
                logp = np.array(state[f"is_{prefix}_logp"], dtype=np.float32)
            else:
                with np.errstate(divide="ignore"):
                    logp = np.log(np.array(state[f"is_{prefix}_p"], dtype=np.float32))
            setattr(store, f"{prefix}_logp", logp)
        if "is_joint_logp" in state:
            for key in ("joint_dir_xyz", "joint_inp_angle", "joint_logp"):
                setattr(store, key, np.array(state[f"is_{key}"], dtype=np.float32))
        expected = {"has": (store.n,), "dir_xyz": (store.n, K_STORED, 3),
                    "inp_angle": (store.n, K_STORED), "shift_A": (store.n, K_STORED, 2),
                    **{f"{prefix}_logp": (store.n, K_STORED) for prefix in DIMENSIONS},
                    "joint_dir_xyz": (store.n, K_JOINT, 3),
                    "joint_inp_angle": (store.n, K_JOINT), "joint_logp": (store.n, K_JOINT)}
        for key, shape in expected.items():
            if getattr(store, key).shape != shape:
                raise ValueError(f"stored posteriors: is_{key} has shape "
                                 f"{getattr(store, key).shape}, expected {shape}")
        return store


def top_points(p: np.ndarray):
    """The ``K_STORED`` points of most mass in each row of ``p`` ``(B, n)`` (all of them when
    ``n <= K``), with their log masses normalised over the row.

    Returns
    -------
    index : (B, min(n, K)) int, the points (in no particular order)
    logp : (B, min(n, K)) float64, their log masses
    usable : (B,) bool, rows with a positive, finite total mass
    """
    total = p.sum(axis=1)
    usable = (total > 0) & np.isfinite(total)
    n = p.shape[1]
    top = (top_k_rows(p, K_STORED) if n > K_STORED
           else np.broadcast_to(np.arange(n), (len(p), n)))
    with np.errstate(divide="ignore", invalid="ignore"):
        logp = np.log(np.take_along_axis(p, top, axis=1) / total[:, None])
    return top, logp, usable
