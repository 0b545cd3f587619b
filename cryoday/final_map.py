"""The final map at the limit of the data: a full-box reconstruction from the particles' poses.

The last coarse-to-fine stage's map is a SAGD estimate cut off at the stage's resolution (10 A by
default), so it cannot show what the particles hold beyond it. Here every particle is inserted
once more, at the full input box up to Nyquist, by direct Fourier insertion
(:func:`cryoday.reconstruct.reconstruct`: CTF-weighted least squares), in two gold-standard
halves. Their FSC (masked and unmasked) gives the resolution the data support. The full map is
every particle's sums Wiener-filtered with the signal power that FSC measures (RELION's tau^2),
the best estimate of the structure; the sharpened map is the halves' average with the B factor
of its Guinier plot undone, filtered by the FSC.

Poses: by default each particle's most probable pose (what ``final/particles.star`` holds). With
the last stage's pose posteriors (``state.npz``) each particle is inserted at its heaviest
rotations of the last pass (the store's joint points: direction and in-plane angle together)
times the top points of its shift marginal, with their renormalised masses: the
posterior-marginalised insertion, cheap because the posteriors are sharp by the last stage.
Rotation and shift are taken as independent, a small loss where the shift marginal is sharp. A
state saved before joint points were kept gives the product of the top points of the three
marginals instead, which also puts mass on (direction, in-plane) pairs a particle never had.

With K classes (``reconstruction.classes``) the map is the main class's: each particle's poses
are weighted by its posterior for the main class (``poses.npz`` ``class_posterior``), so
particles of the other classes (junk, another conformation) hardly enter it; the particles'
poses and ``state.npz``'s posteriors are then the main class's for its particles.

With a point group (``reconstruction.symmetry`` or the dataset's ``symmetry:``, the group the
stages trained in, whose poses cover one asymmetric unit) every pose counts at its ``|G|``
equivalents ``A g`` (:func:`cryoday.reconstruct.insert_symmetric`, RELION's ``--sym``): a
symmetric molecule's image measures the slices at all of them, so the map comes out symmetric
about RELION's axes, its Fourier space filled from one asymmetric unit of views. Each pose is
inserted once and the sums symmetrised by a lookup at the ``|G|`` rotated points (as RELION's
``applyPointGroupSymmetry``), so the cost does not grow with ``|G|`` times the poses.

Sharpening follows RELION's ``relion_postprocess``: the Guinier plot is ``ln |F(s)|`` against
``s^2`` over shells between ``GUINIER_LOW_A`` and the FSC 0.143 resolution; a map blurred by an
envelope ``exp(-B s^2 / 4)`` has slope ``-B / 4`` there, so ``B = -4 x slope``. RELION reports
the sharpening B with the opposite sign (negative) and multiplies by ``exp(-B s^2 / 4)``; both
are in ``final_map.json`` (``guinier_B_A2`` > 0 for a blurred map, ``sharpening_B_A2`` = minus
it). The sharpened map is then weighted by ``sqrt(2 FSC / (1 + FSC))`` (the masked half-map FSC,
Rosenthal & Henderson 2003's figure of merit for the full map) and low-passed at the resolution.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cryoday import io
from cryoday import symmetry as point_groups
from cryoday.fourier import ft3, ift3, radial_index_3d
from cryoday.fsc import fsc, resolution_at, soft_spherical_mask
from cryoday.geometry import euler_to_matrix
from cryoday.projection import SliceOperator
from cryoday.quadrature import directions_to_euler
from cryoday.reconstruct import Sums, half_sets, insert_symmetric, solve

# Low-resolution end of the Guinier fit (A): below ~10 A a protein's spectrum follows its shape
# (domains, solvent contrast), not the envelope; RELION's postprocess uses 10 A too.
GUINIER_LOW_A = 10.0
# The soft spherical mask of the masked FSC and of the Guinier plot: radius as a fraction of the
# box and edge (px). The same as validation's half-map FSC, so the figures compare.
MASK_RADIUS_FRACTION = 0.4
MASK_EDGE_PX = 3.0
# Points per dimension of the posterior-marginalised insertion (directions, in-plane, shifts):
# 3 x 3 x 2 = 18 insertions per particle cover a sharp posterior's neighbouring grid points.
# With joint rotations only the shifts' number is read (rotations: the store's K_JOINT).
POSTERIOR_TOP = (3, 3, 2)
# Poses carrying less than this share of their particle's mass are not inserted (the rest is
# renormalised). On the paper-scale set's 10 A stage the 3 x 3 x 2 products held 13.5 poses per
# particle: 2.9 above 0.1% of the mass, 2.2 above 1%, 1.8 above 3%. The full map from 2.2 poses
# per particle has an FSC of 0.99998 or more in every shell with the map from 2.9 (0.9998 from
# 1.8), and the same half-map resolution (8.36 A), for a quarter fewer insertions.
POSE_WEIGHT_FLOOR = 1e-2
# Particles whose candidate poses are made at once.
POSE_BLOCK = 50_000
# Poses per chunk of the insertion (memory is per chunk, not per data set: ~2.2 poses an image;
# ~100 MB of images and coefficients at a 128-px box). Larger chunks keep a thread's planes
# closer together in the locality order (measured 1.25x faster than 500 at 128 px).
CHUNK_SIZE = 2000


@dataclass
class FinalMap:
    """The final reconstruction and its validation figures.

    Attributes
    ----------
    half1, half2, full, sharpened : (box, box, box) float32
    pixel_size : float
    freq : (box // 2 + 1,) shells' spatial frequency (1/A)
    fsc_unmasked, fsc_masked : half-map FSC per shell
    resolution_A, resolution_unmasked_A : FSC 0.143 resolution of the masked and unmasked curves
    guinier_B_A2 : envelope B factor from the Guinier plot (positive: a blurred map); nan when the
        fit range holds too few shells (then the map is not sharpened)
    n_particles, n_insertions : particles used and poses inserted (``|G|`` per pose with a
        point group)
    poses : ``"best"`` or ``"posterior"``
    symmetry : the point group the poses were expanded by (``"C1"``: none)
    """

    half1: np.ndarray
    half2: np.ndarray
    full: np.ndarray
    sharpened: np.ndarray
    pixel_size: float
    freq: np.ndarray
    fsc_unmasked: np.ndarray
    fsc_masked: np.ndarray
    resolution_A: float
    resolution_unmasked_A: float
    guinier_B_A2: float
    n_particles: int
    n_insertions: int
    poses: str
    symmetry: str = "C1"

    def figures(self) -> dict:
        """The figures of ``final_map.json`` (``symmetry`` only with a point group: a C1 run's
        figures are those it had before symmetry existed)."""
        b = self.guinier_B_A2
        group = {} if self.symmetry == "C1" else {"symmetry": self.symmetry}
        return {
            "poses": self.poses,
            **group,
            "n_particles": self.n_particles,
            "n_insertions": self.n_insertions,
            "box": int(self.full.shape[0]),
            "pixel_size": self.pixel_size,
            "halfmap_fsc0143_masked_A": self.resolution_A,
            "halfmap_fsc0143_unmasked_A": self.resolution_unmasked_A,
            "halfmap_fsc05_masked_A": resolution_at(self.freq, self.fsc_masked, 0.5),
            "guinier_B_A2": None if not math.isfinite(b) else b,
            "sharpening_B_A2": None if not math.isfinite(b) else -b,
            "guinier_range_A": [GUINIER_LOW_A, self.resolution_A],
        }


def shell_amplitudes(volume: np.ndarray, pixel_size: float, mask=None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Mean Fourier amplitude per shell of one Fourier pixel: ``(freq (1/A), amplitude)``."""
    v = np.asarray(volume, np.float64)
    if mask is not None:
        v = v * mask
    n = v.shape[0]
    shells = np.rint(radial_index_3d(n)).astype(np.int64).ravel()
    n_shells = n // 2 + 1
    keep = shells < n_shells
    amplitude = np.abs(ft3(v)).ravel()[keep]
    total = np.bincount(shells[keep], amplitude, n_shells)
    count = np.bincount(shells[keep], minlength=n_shells)
    return np.arange(n_shells) / (n * pixel_size), total / np.maximum(count, 1)


def guinier_bfactor(volume: np.ndarray, pixel_size: float, low_A: float, high_A: float,
                    mask=None) -> float:
    """Envelope B factor (A^2, positive for a blurred map) of a map from its Guinier plot.

    A least-squares line through ``ln |F|`` against ``s^2`` over the shells with
    ``1 / low_A <= s <= 1 / high_A``; an envelope ``exp(-B s^2 / 4)`` has slope ``-B / 4``.
    Returns nan when fewer than 3 shells are in the range.
    """
    freq, amplitude = shell_amplitudes(volume, pixel_size, mask)
    use = (freq >= 1 / low_A - 1e-12) & (freq <= 1 / high_A + 1e-12) & (amplitude > 0)
    if use.sum() < 3:
        return float("nan")
    slope, _ = np.polyfit(freq[use] ** 2, np.log(amplitude[use]), 1)
    return float(-4.0 * slope)


def fsc_weight(curve: np.ndarray) -> np.ndarray:
    """The full map's figure of merit per shell, ``sqrt(2 FSC / (1 + FSC))`` (0 where FSC <= 0)."""
    c = np.clip(np.asarray(curve, np.float64), 0.0, 1.0)
    return np.sqrt(2 * c / (1 + c))


def sharpen(volume: np.ndarray, pixel_size: float, guinier_B_A2: float, freq: np.ndarray,
            fsc_curve: np.ndarray, resolution_A: float) -> np.ndarray:
    """The map with its envelope undone (``exp(+B s^2 / 4)``, RELION's ``exp(-B' s^2 / 4)`` with
    ``B' = -B``), weighted by :func:`fsc_weight` and low-passed at ``resolution_A`` (a raised
    cosine one shell wide). A non-finite ``guinier_B_A2`` is taken as 0 (filter only)."""
    n = volume.shape[0]
    radius = radial_index_3d(n)
    s = radius / (n * pixel_size)
    b = guinier_B_A2 if math.isfinite(guinier_B_A2) else 0.0
    shells = np.arange(len(freq), dtype=np.float64)
    weight = np.interp(radius, shells, fsc_weight(fsc_curve), right=0.0)
    cutoff = n * pixel_size / resolution_A if math.isfinite(resolution_A) else 0.0
    edge = np.clip(radius - cutoff, 0.0, 1.0)
    lowpass = 0.5 + 0.5 * np.cos(np.pi * edge)
    spectrum = ft3(np.asarray(volume, np.float64)) * np.exp(b * s * s / 4) * weight * lowpass
    return ift3(spectrum).astype(np.float32)


def posterior_poses(state: dict, pixel_size: float, top=POSTERIOR_TOP,
                    min_weight: float = POSE_WEIGHT_FLOOR, particles=None, joint: bool = True):
    """Each particle's heaviest stored poses, as weighted poses: its joint rotations times the
    top points of its shift marginal, or (without joint rotations) the product of the top
    points of its three marginals.

    Parameters
    ----------
    state : dict
        A stage's ``state.npz`` (the importance sampler's ``is_*`` arrays).
    pixel_size : float
        A/px of the box the shifts are wanted in.
    top : (int, int, int)
        Points kept per dimension (directions, in-plane angles, shifts).
    min_weight : float
        Poses of less than this share of their particle's mass are dropped (and the rest
        renormalised); 0 keeps every pose of positive mass.
    particles : (p,) int array, optional
        Only these particle rows (a shard's); default every particle.
    joint : bool
        False: the product of the marginals for every particle, joint rotations or not.

    Returns
    -------
    image : (m,) int, the particle of each pose
    rotations : (m, 3, 3)
    shifts_px : (m, 2)
    weights : (m,) float64, the poses' masses renormalised per particle
    """
    from cryoday.importance.store import PosteriorStore

    store = PosteriorStore.from_state(state)
    particles = np.arange(store.n) if particles is None else np.asarray(particles, np.int64)
    if not store.has[particles].all():
        missing = int(particles[np.flatnonzero(~store.has[particles])[0]])
        raise ValueError(f"stored posteriors: particle row {missing + 1} has none")
    # In blocks of particles: each particle's 3 x 3 x 2 candidates take ~2 kB before the floor
    # drops most of them (2 GB at 1,000,000 particles at once; 100 MB a block).
    blocks = [_posterior_block(store, rows, pixel_size, top, min_weight, joint) for rows in
              np.array_split(particles, max(1, -(-len(particles) // POSE_BLOCK)))]
    image, rotations, shifts, weights = (np.concatenate(parts) for parts in zip(*blocks))
    return image, rotations, shifts, weights


def _posterior_block(store, particles: np.ndarray, pixel_size: float, top, min_weight: float,
                     joint: bool = True):
    """:func:`posterior_poses` of the particle rows ``particles``."""
    with_joint = store.has_joint(particles) if joint else np.zeros(len(particles), bool)
    parts = [_joint_poses(store, particles[with_joint], top[2]),
             _product_poses(store, particles[~with_joint], top)]
    # Each pose's particle within the block, particle-major again (joint rows first otherwise).
    local = np.concatenate([np.flatnonzero(with_joint)[parts[0][0]],
                            np.flatnonzero(~with_joint)[parts[1][0]]])
    order = np.argsort(local, kind="stable")
    local = local[order]
    logw, rotations, shifts_A = (np.concatenate(x)[order] for x in list(zip(*parts))[1:])
    n = len(particles)
    top_logw = np.full(n, -np.inf)
    np.maximum.at(top_logw, local, logw)
    w = np.exp(logw - top_logw[local])
    w /= np.bincount(local, weights=w, minlength=n)[local]
    # The rest of each particle's mass is renormalised over the poses kept.
    keep = (w > 0) & (w >= min_weight)
    local = local[keep]
    w = w[keep] / np.bincount(local, weights=w[keep], minlength=n)[local]
    return particles[local], rotations[keep], shifts_A[keep] / pixel_size, w


def _rotations(directions: np.ndarray, inplane_rad: np.ndarray) -> np.ndarray:
    """RELION matrices of (direction, in-plane angle) pairs of the same shape ``(...)``."""
    rot, tilt = directions_to_euler(directions.astype(np.float64))
    return euler_to_matrix(rot.ravel(), tilt.ravel(),
                           np.degrees(inplane_rad.astype(np.float64)).ravel())


def _top_shifts(store, particles: np.ndarray, k: int):
    """Each particle's ``k`` heaviest stored shifts: ``(shifts_A (p, k, 2), logp (p, k))``."""
    logp = store.shift_logp[particles].astype(np.float64)
    order = np.argsort(-logp, axis=1)[:, :k]
    return (store.shift_A[particles[:, None], order].astype(np.float64),
            np.take_along_axis(logp, order, axis=1))


def _joint_poses(store, particles: np.ndarray, n_shifts: int):
    """The poses of particles with joint rotations, as ``(local particle, log mass, rotations,
    shifts_A)``: each rotation with each of the top shifts."""
    n, kj = len(particles), store.joint_logp.shape[1]
    shifts, shift_logp = _top_shifts(store, particles, n_shifts)
    ks = shifts.shape[1]
    logw = (store.joint_logp[particles].astype(np.float64)[:, :, None]
            + shift_logp[:, None, :]).reshape(-1)
    rotations = _rotations(store.joint_dir_xyz[particles].reshape(-1, 3),
                           store.joint_inp_angle[particles].reshape(-1))
    rotations = np.repeat(rotations.reshape(n, kj, 3, 3), ks, axis=1).reshape(-1, 3, 3)
    shifts = np.broadcast_to(shifts[:, None], (n, kj, ks, 2)).reshape(-1, 2)
    return np.repeat(np.arange(n), kj * ks), logw, rotations, shifts


def _product_poses(store, particles: np.ndarray, top):
    """The poses of particles without joint rotations, as :func:`_joint_poses`: every
    combination of the top points of the three marginals."""
    n = len(particles)
    picks = []
    for dim, k in enumerate(top[:2]):
        logp = store.log_masses(dim)[particles].astype(np.float64)
        order = np.argsort(-logp, axis=1)[:, :k]
        picks.append((order, np.take_along_axis(logp, order, axis=1)))
    (di, dl), (ii, il) = picks
    shifts, sl = _top_shifts(store, particles, top[2])
    kd, ki, ks = di.shape[1], ii.shape[1], shifts.shape[1]
    logw = (dl[:, :, None, None] + il[:, None, :, None] + sl[:, None, None, :]).reshape(-1)
    rows = particles[:, None]
    shape = (n, kd, ki, ks)
    directions = np.broadcast_to(store.dir_xyz[rows, di][:, :, None, None, :], (*shape, 3))
    inplane = np.broadcast_to(store.inp_angle[rows, ii][:, None, :, None], shape)
    rotations = _rotations(directions.reshape(-1, 3), inplane.reshape(-1))
    shifts = np.broadcast_to(shifts[:, None, None], (*shape, 2)).reshape(-1, 2)
    return np.repeat(np.arange(n), kd * ki * ks), logw, rotations, shifts


def final_reconstruction(read, n: int, rotations: np.ndarray, shifts_px: np.ndarray,
                         ctf_params: dict, pixel_size: float, box: int, *, image=None,
                         weights=None, seed: int = 0, wiener: float = 1e-3,
                         chunk_size: int = CHUNK_SIZE, symmetry: str = "C1",
                         log=print) -> FinalMap:
    """Gold-standard half maps at the full box up to Nyquist, their FSC, the full map and the
    sharpened map: :func:`half_sums` of every particle, then :func:`from_half_sums`.

    Parameters
    ----------
    read : callable ``particle rows -> (m, b, b)`` float32 images (protein bright)
    n : number of particles
    rotations, shifts_px : (m, 3, 3) RELION matrices and (m, 2) origins (px of ``box``), one per
        pose inserted: one per particle (``m = n``), or several with ``image`` and ``weights``
    ctf_params : dict of (n,) per-particle arrays (or scalars), ``evaluate_ctf`` arguments
    pixel_size, box : the output maps' voxel size (A) and box
    image : optional (m,) particle of each pose (default: pose i is particle i)
    weights : optional (m,) weight of each pose (its posterior mass)
    seed : the split into halves (``reconstruct.half_sets``)
    symmetry : point group (RELION's names): each pose counts at its ``|G|`` equivalents
        (:func:`cryoday.reconstruct.insert_symmetric`); ``"C1"``, the default: once
    """
    sums = half_sums(read, n, rotations, shifts_px, ctf_params, pixel_size, box, image=image,
                     weights=weights, seed=seed, chunk_size=chunk_size, symmetry=symmetry,
                     log=log)
    return from_half_sums(sums, n, pixel_size, seed=seed, wiener=wiener, log=log)


@dataclass
class HalfSums:
    """The two halves' insertion sums of some particles (all, or one shard's), and what
    :func:`from_half_sums` reports of them."""

    sums: list  # two cryoday.reconstruct.Sums
    n_insertions: int  # poses inserted (|G| per pose with a point group)
    poses: str  # "best" or "posterior"
    symmetry: str

    def __add__(self, other: HalfSums) -> HalfSums:
        if (self.poses, self.symmetry) != (other.poses, other.symmetry):
            raise ValueError(f"sums of {self.poses} poses in {self.symmetry} and of "
                             f"{other.poses} poses in {other.symmetry} do not add up")
        added = [Sums(a.op, a.num + b.num, a.den + b.den, a.radius)
                 for a, b in zip(self.sums, other.sums)]
        return HalfSums(added, self.n_insertions + other.n_insertions, self.poses, self.symmetry)

    def save(self, path) -> None:
        """One shard's sums, atomically; single precision (each voxel's total is held in double
        precision, its terms summed in float32 a few thousand poses at a time:
        ``reconstruct.FLUSH_POSES_PER_THREAD``), as the halves' maps are written."""
        arrays = {f"{name}{half + 1}": getattr(s, name).astype(
            np.complex64 if name == "num" else np.float32) for half, s in enumerate(self.sums)
            for name in ("num", "den")}
        with io.atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays, box=self.sums[0].op.box, radius=self.sums[0].radius,
                     n_insertions=self.n_insertions, poses=self.poses, symmetry=self.symmetry)

    @classmethod
    def load(cls, path) -> HalfSums:
        with np.load(path) as f:
            op = SliceOperator(int(f["box"]), float(f["radius"]))
            sums = [Sums(op, f[f"num{h}"].astype(np.complex128), f[f"den{h}"].astype(np.float64),
                         float(f["radius"])) for h in (1, 2)]
            return cls(sums, int(f["n_insertions"]), str(f["poses"]), str(f["symmetry"]))


def half_sums(read, n: int, rotations: np.ndarray, shifts_px: np.ndarray, ctf_params: dict,
              pixel_size: float, box: int, *, image=None, weights=None, seed: int = 0,
              chunk_size: int = CHUNK_SIZE, symmetry: str = "C1", particles=None,
              log=print) -> HalfSums:
    """Each gold-standard half's insertion sums (the arguments as :func:`final_reconstruction`'s),
    of every particle, or with ``particles`` (rows) of those only: a shard's, whose sums add up
    with the other shards' to every particle's."""
    group = point_groups.canonical_name(symmetry)
    size = point_groups.order(group)
    image = np.arange(n) if image is None else np.asarray(image, np.int64)
    weights = np.ones(len(image)) if weights is None else np.asarray(weights, np.float64)
    if len(image) != len(rotations) or len(image) != len(shifts_px) or len(image) != len(weights):
        raise ValueError(f"{len(image)} pose rows, {len(rotations)} rotations, "
                         f"{len(shifts_px)} shifts and {len(weights)} weights")
    sums = []
    for half in half_sets(n, seed):
        if particles is not None:
            half = np.intersect1d(half, particles)
        # The poses of this half's particles, grouped by particle: each chunk of poses reads
        # and transforms its images once.
        rows = np.flatnonzero(np.isin(image, half))
        sums.append(insert_symmetric(read, len(rows), rotations[rows], shifts_px[rows],
                                     ctf_params, pixel_size, box, group, chunk_size=chunk_size,
                                     weights=weights[rows], image=image[rows]))
        symmetrised = "" if size == 1 else f", the sums symmetrised over {group} ({size} operators)"
        log(f"half map {len(sums)}: {len(half)} particles, {len(rows)} poses inserted"
            f"{symmetrised}")
    # One unweighted pose per particle of the set (every particle, or the shard's): best poses.
    kind = ("best" if len(image) == (n if particles is None else len(particles))
            and np.all(weights == 1) else "posterior")
    return HalfSums(sums, len(image) * size, kind, group)


def from_half_sums(halves: HalfSums, n: int, pixel_size: float, *, seed: int = 0,
                   wiener: float = 1e-3, log=print) -> FinalMap:
    """The half maps, their FSC, the full and the sharpened map from every particle's
    :class:`HalfSums` (of one job, or added up over the shards)."""
    sums = halves.sums
    box = sums[0].op.box
    # The half maps as RELION writes them: least squares with a small constant floor, no
    # filter, so that their FSC measures the data and nothing of a prior.
    half1, half2 = (solve(s, wiener) for s in sums)
    freq, unmasked = fsc(half1, half2, pixel_size)
    mask = soft_spherical_mask(box, MASK_RADIUS_FRACTION * box, MASK_EDGE_PX)
    _, masked = fsc(half1, half2, pixel_size, mask=mask)
    resolution = resolution_at(freq, masked, 0.143)
    resolution_unmasked = resolution_at(freq, unmasked, 0.143)
    average = ((len(half_sets(n, seed)[0]) * half1 + len(half_sets(n, seed)[1]) * half2)
               / max(n, 1)).astype(np.float32)
    b = (guinier_bfactor(average, pixel_size, GUINIER_LOW_A, resolution, mask)
         if math.isfinite(resolution) else float("nan"))
    sharpened = sharpen(average, pixel_size, b, freq, masked, resolution)
    # The full map: least squares from every particle's sums (each voxel weighted by how well
    # both halves sample it, which their plain average is not).
    both = Sums(sums[0].op, sums[0].num + sums[1].num, sums[0].den + sums[1].den, sums[0].radius)
    full = solve(both, wiener)
    log(f"final map: half-map FSC 0.143 {resolution:.2f} A masked, {resolution_unmasked:.2f} A "
        f"unmasked; Guinier B {b:.0f} A^2 ({GUINIER_LOW_A:g} A to {resolution:.2f} A)")
    return FinalMap(half1, half2, full, sharpened, float(pixel_size), freq, unmasked, masked,
                    resolution, resolution_unmasked, b, int(n), halves.n_insertions,
                    halves.poses, halves.symmetry)


def write_final_map(result: FinalMap, *, full, half1, half2, sharpened, figures, fsc_table,
                    extra: dict | None = None) -> dict:
    """Write the maps, the FSC table and the figures (each file atomically); returns the
    figures (``final_map.json``), which name the FSC table, with ``extra`` (if given) added."""
    for path, volume in ((full, result.full), (half1, result.half1), (half2, result.half2),
                         (sharpened, result.sharpened)):
        io.write_map(path, volume, result.pixel_size)
    with np.errstate(divide="ignore"):
        resolution = np.where(result.freq > 0, 1 / np.maximum(result.freq, 1e-12), np.inf)
    from cryoday.validation import write_fsc_table

    write_fsc_table(fsc_table, {"freq_invA": result.freq, "resolution_A": resolution,
                                "fsc_unmasked": result.fsc_unmasked,
                                "fsc_masked": result.fsc_masked})
    out = {**result.figures(), **(extra or {}), "fsc_table": str(fsc_table)}
    with io.atomic_path(figures) as tmp:
        Path(tmp).write_text(json.dumps(out, indent=2))
    return out


def _weighted_poses(particles, final_star, state, top, class_weights, main_class, subset,
                    log):
    """The poses to insert, ``(image, rotations, shifts_px, weights)`` (see :func:`run`), of
    every particle or of the rows ``subset``; ``image`` and ``weights`` are None for one
    unweighted pose of every particle."""
    n, pixel_size = len(particles), float(particles.pixel_size)
    rows = np.arange(n) if subset is None else np.asarray(subset, np.int64)
    count = len(rows)
    if state is not None:
        image, rotations, shifts, weights = posterior_poses(dict(np.load(state)), pixel_size,
                                                            top, particles=subset)
        if image.max(initial=-1) >= n:
            raise ValueError(f"{state}: posteriors of {image.max() + 1} particles, "
                             f"{particles.star_path} has {n}")
        log(f"posterior-marginalised insertion: {len(image) / max(count, 1):.1f} poses per "
            f"particle (top {top} of the stored marginals)")
    else:
        final = io.read_particles(final_star, pixel_size=pixel_size, check_stacks=False)
        if len(final) != n:
            raise ValueError(f"{final_star} has {len(final)} particles, "
                             f"{particles.star_path} {n}")
        pose = {key: np.asarray(value)[rows] for key, value in io.poses(final).items()}
        rotations = euler_to_matrix(pose["rot"], pose["tilt"], pose["psi"])
        shifts = np.stack([pose["shift_x"], pose["shift_y"]], axis=1) / pixel_size
        image = None if subset is None else rows
        weights = None
    if class_weights is not None:
        class_weights = np.asarray(class_weights, np.float64).reshape(-1)
        if len(class_weights) != n:
            raise ValueError(f"{len(class_weights)} class weights, {particles.star_path} has "
                             f"{n} particles")
        if weights is None:  # one pose per particle
            image, weights = rows, class_weights[rows]
        else:
            weights = weights * class_weights[image]
        log(f"class {main_class}: particles weighted by their posterior for it "
            f"({class_weights.sum():.1f} of {n} particles' worth)")
    return image, rotations, shifts, weights


def shard_rows(n: int, shard: int, n_shards: int) -> np.ndarray:
    """The particle rows of shard ``shard`` (0-based) of ``n_shards``: consecutive, so that a
    shard reads one stretch of the stack."""
    if not 0 <= shard < n_shards:
        raise ValueError(f"shard {shard} of {n_shards}")
    return np.array_split(np.arange(n), n_shards)[shard]


def run_shard(*, preprocessed_star, final_star, shard: int, n_shards: int, out, state=None,
              top=POSTERIOR_TOP, seed: int = 0, symmetry: str = "C1", class_weights=None,
              main_class: int | None = None, log=print) -> HalfSums:
    """One shard's half sums (rule ``final_map_shard``), written to ``out``
    (:meth:`HalfSums.save`); the arguments as :func:`run`'s, and ``shard`` of ``n_shards``
    (:func:`shard_rows`)."""
    particles = io.read_particles(preprocessed_star)
    box, pixel_size, n = int(particles.box), float(particles.pixel_size), len(particles)
    rows = shard_rows(n, shard, n_shards)
    log(f"shard {shard + 1} of {n_shards}: particles {rows[0] + 1}-{rows[-1] + 1} of {n}"
        if len(rows) else f"shard {shard + 1} of {n_shards}: no particles")
    image, rotations, shifts, weights = _weighted_poses(
        particles, final_star, state, top, class_weights, main_class, rows, log)
    with io.ImageSource(particles) as source:
        halves = half_sums(source.read, n, rotations, shifts, io.ctf_params(particles),
                           pixel_size, box, image=image, weights=weights, seed=seed,
                           symmetry=symmetry, particles=rows, log=log)
    halves.save(out)
    return halves


def run(*, preprocessed_star, final_star, state=None, outputs: dict, top=POSTERIOR_TOP,
        seed: int = 0, symmetry: str = "C1", class_weights=None, main_class: int | None = None,
        shard_sums=(), log=print) -> dict:
    """The final map of a run from its files (rule ``final_map``).

    Parameters
    ----------
    preprocessed_star : path
        The preprocessed particles (normalised images, CTFs): the maps' box and voxel size.
    final_star : path
        The same particles with their most probable poses (``final/particles.star``).
    state : path, optional
        The chosen start's last ``state.npz``: with it each particle is inserted at its pose
        posterior's top points (``top``); without it at its most probable pose.
    outputs : dict
        ``full``, ``half1``, ``half2``, ``sharpened``, ``figures``, ``fsc_table`` paths.
    symmetry : str
        The point group the stages trained in (``"C1"``: none); each pose is inserted at its
        ``|G|`` equivalents.
    class_weights : (n,) array, optional
        With K > 1 classes, each particle's posterior for the main class: its poses' weights
        are multiplied by it. The figures then say ``class`` (``main_class``, 1-based) and
        ``class_weight_sum`` (the particles' effective number).
    main_class : int, optional
        The main class, 1-based (for the figures).
    shard_sums : paths, optional
        Every shard's :func:`run_shard` sums (``shards`` > 1): added up, they replace the
        insertion here.
    """
    particles = io.read_particles(preprocessed_star)
    box, pixel_size = int(particles.box), float(particles.pixel_size)
    n = len(particles)
    if shard_sums:
        halves = HalfSums.load(shard_sums[0])
        for path in shard_sums[1:]:
            halves = halves + HalfSums.load(path)
        if halves.sums[0].op.box != box:
            raise ValueError(f"{shard_sums[0]}: sums of a {halves.sums[0].op.box}-px box, "
                             f"{preprocessed_star} has {box} px")
        log(f"the insertion sums of {len(shard_sums)} shards added up: "
            f"{halves.n_insertions} poses inserted")
        result = from_half_sums(halves, n, pixel_size, seed=seed, log=log)
    else:
        image, rotations, shifts, weights = _weighted_poses(
            particles, final_star, state, top, class_weights, main_class, None, log)
        with io.ImageSource(particles) as source:
            result = final_reconstruction(source.read, n, rotations, shifts,
                                          io.ctf_params(particles), pixel_size, box,
                                          image=image, weights=weights, seed=seed,
                                          symmetry=symmetry, log=log)
    extra = None
    if class_weights is not None:
        # The class weights are not pose posteriors: best poses stay "best".
        result.poses = "posterior" if state is not None else "best"
        extra = {"class": main_class, "class_weight_sum": float(class_weights.sum())}
    return write_final_map(result, **outputs, extra=extra)
