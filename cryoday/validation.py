"""Figures of a finished run, for ``metrics.json``: stages, resolution, seed consistency, verdict.

Every function takes the files and arrays it judges as arguments; none knows where the workflow
keeps them (``workflow/rules/common.smk`` does). The verdict is ``ok`` only when nothing below
casts doubt on the map; each doubt is a sentence in ``warnings``.
"""

from __future__ import annotations

import csv
import json
import math
from itertools import combinations
from pathlib import Path

import numpy as np

from cryoday import class_results, io, noise, records, shift_range
from cryoday import symmetry as point_groups
from cryoday.align import apply_alignment, fsc_after_alignment
from cryoday.fourier import rescale_volume
from cryoday.fsc import fsc, resolution_at, soft_spherical_mask

# Held-out log-likelihood gain, in standard errors, that counts as signal.
SIGNAL_Z = 3.0
# A per-image gain whose spread is below this fraction of its mean is one number, not a sample.
# Under the engine's Gaussian noise model an image-dependent gain of mean g nats varies by about
# sqrt(2 g) between images from the noise alone (the cross term <noise, model> / sigma^2), a
# relative spread of sqrt(2 / g); that falls below 1e-4 only for g > 2e8 nats per image, far
# beyond any image. A smaller spread is a numerical offset (a collapsed map gains the same
# 2e-7 nats on every image, spread 1e-15), whose z-score (2.6e9) means nothing.
GAIN_MIN_RELATIVE_SPREAD = 1e-4
# A mean gain below this (nats per image) is below the precision of the likelihood (float32
# quadrature weights are good to ~1e-7 relative) and is no evidence whatever its z. By the same
# noise model a real gain g is significant (z >= 3) over n images only if g >= 18 / n, so this
# floor could hide a real signal only on more than 1.8e7 held-out images.
GAIN_FLOOR_NATS = 1e-6
# A map whose voxels spread by less than this fraction of their largest magnitude is constant:
# float32 holds ~7 digits, so 1e-5 is ~100 rounding steps, not structure.
CONSTANT_MAP_SPREAD = 1e-5
# A map whose projection varies by less than this (in units of the images' noise sigma, 1 after
# preprocessing) explains nothing: its best possible gain on a box^2 image is box^2 * rms^2 / 2
# nats (0.002 at 64 px). Real projections vary by ~sqrt(SNR), 0.2 at the paper's SNR of 0.05
# and still 0.03 at 1e-3, so the threshold sits 30x below the noisiest data with any signal.
MIN_PROJECTION_RMS = 1e-3
# Random starts agree when their aligned maps' FSC 0.143 is within this factor of what the data
# support (see seed_agreement).
SEED_AGREEMENT_FACTOR = 1.25


def stage_figures(history_path, volume_path, resolution_A: float) -> dict:
    """Figures of one stage from its ``history.tsv`` and its map.

    Parameters
    ----------
    history_path, volume_path : path
        The stage's ``history.tsv`` and ``volume.mrc``.
    resolution_A : float
        The stage's target resolution (A).
    """
    history = records.read_history(history_path)
    heldout = [h["heldout_nll"] for h in history if np.isfinite(h["heldout_nll"])]
    volume, pixel_size = io.read_map(volume_path)
    last_epoch = [h for h in history if h["epoch"] > history[-1]["epoch"] - 1.0] or history
    evaluated = sum(h["n_evaluated"] for h in last_epoch)
    full = sum(h["n_full"] for h in last_epoch)
    return {
        "resolution_A": resolution_A,
        "box": int(volume.shape[0]),
        "pixel_size": pixel_size,
        "iterations": len(history),
        "wall_s": history[-1]["wall_s"] if history else 0.0,
        "heldout_nll": heldout[-1] if heldout else None,
        "is_speedup": full / evaluated if evaluated else None,
    }


def by_seed(paths, seeds) -> dict[int, list]:
    """Split a seed-major list (every stage of the first seed, then the next) into one list per
    seed, stage order kept."""
    paths, seeds = list(paths), [int(s) for s in seeds]
    if not seeds or len(paths) % len(seeds):
        raise ValueError(f"{len(paths)} files do not split evenly over seeds {seeds}")
    n = len(paths) // len(seeds)
    return {seed: paths[i * n:(i + 1) * n] for i, seed in enumerate(seeds)}


def choose_seed(last_histories: dict) -> tuple[int, dict[int, float]]:
    """The random start whose last stage explains the held-out images best (lowest held-out nll),
    which chooses between starts without a reference; and every start's figure.

    Parameters
    ----------
    last_histories : dict
        ``{seed: path of the seed's last stage's history.tsv}``, in config order (ties go to the
        first).
    """
    scores = {int(seed): records.final_heldout_nll(path) for seed, path in last_histories.items()}
    return min(scores, key=scores.get), scores


def write_fsc_table(path, table: dict) -> None:
    """TSV of FSC curves: ``freq_invA``, ``resolution_A`` and one column per curve."""
    columns = list(table)
    with io.atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(columns)
        for row in zip(*(table[c] for c in columns)):
            writer.writerow([f"{v:.6g}" for v in row])


# Particles per chunk of the pose-error passes: their 3 x 3 matrices (a few hundred bytes per
# particle and hand) exist one chunk at a time, not for the whole set.
POSE_CHUNK = 65536


# The global rotation between the run's frame and the truth's is fitted on the particles it
# explains (errors below this), not on all of them: on hard data most poses can be wrong, and a
# plain average of B_i^T A_i is then pulled anywhere (a map from the right fifth of the particles
# scored a median 108 degrees against 112 for the rotation of the map's own alignment).
INLIER_DEG = 15.0
POSE_FIT_SAMPLE = 4096  # particles the rotation is fitted on (evenly spaced rows)
POSE_FIT_CANDIDATES = 256  # of them, each one's own relative rotation is tried as the fit


def _project_rotation(m: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(m)
    return u @ np.diag([1, 1, np.linalg.det(u @ vt)]) @ vt


def _robust_rotation(relative: np.ndarray) -> np.ndarray:
    """The rotation ``R`` that the most of ``relative`` (``(s, 3, 3)``, ``B_i^T A_i``) lie within
    ``INLIER_DEG`` of: the plain average and single particles' rotations are tried, the one with
    the most inliers is refined by averaging its inliers (twice)."""
    cos_in = np.cos(np.radians(INLIER_DEG))
    picks = np.linspace(0, len(relative) - 1, min(len(relative), POSE_FIT_CANDIDATES)).astype(int)
    candidates = np.concatenate([_project_rotation(relative.sum(axis=0))[None], relative[picks]])
    # trace(R^T M) = sum_ij R_ij M_ij; cos(angle) = (trace - 1) / 2
    inliers = (np.einsum("cij,sij->cs", candidates, relative) - 1) / 2 > cos_in
    best = candidates[int(np.argmax(inliers.sum(axis=1)))]
    for _ in range(2):
        keep = (np.einsum("ij,sij->s", best, relative) - 1) / 2 > cos_in
        if not keep.any():
            break
        best = _project_rotation(relative[keep].sum(axis=0))
    return best


def _pose_errors_stream(pairs, n: int, chunk_size: int = POSE_CHUNK) -> tuple[np.ndarray, bool]:
    """:func:`pose_errors` over ``pairs(rows) -> (true, estimated)`` rotation chunks: the global
    rotation of each hand is fitted on an evenly spaced sample, then each particle's error is
    computed a chunk at a time."""
    flip = np.diag([1.0, 1.0, -1.0])
    chunks = [slice(start, min(start + chunk_size, n)) for start in range(0, n, chunk_size)]
    sample = np.unique(np.linspace(0, n - 1, min(n, POSE_FIT_SAMPLE)).astype(int))
    true_s, estimated_s = pairs(sample)
    best_rotations = [
        _robust_rotation(np.einsum("nji,njk->nik", estimated_s, a))
        for a in (true_s, flip @ true_s @ flip)]
    errors = [np.empty(n), np.empty(n)]
    for rows in chunks:
        true, estimated = pairs(rows)
        for hand, a in enumerate((true, flip @ true @ flip)):
            relative = np.einsum("nij,jk,nlk->nil", estimated, best_rotations[hand], a)
            cos = np.clip((np.trace(relative, axis1=1, axis2=2) - 1) / 2, -1, 1)
            errors[hand][rows] = np.degrees(np.arccos(cos))
    # The hand whose fit explains more particles; the lower median breaks a tie.
    counts = [int((e < INLIER_DEG).sum()) for e in errors]
    if counts[0] != counts[1]:
        mirrored = counts[1] > counts[0]
    else:
        mirrored = bool(np.median(errors[1]) < np.median(errors[0]))
    return errors[int(mirrored)], mirrored


def pose_errors(true_rotations: np.ndarray, estimated: np.ndarray,
                chunk_size: int = POSE_CHUNK) -> tuple[np.ndarray, bool]:
    """Angular errors (degrees) of estimated poses after the best global rotation and hand.

    If the estimated map is the truth rotated by ``R``, poses relate as ``B_i R ~ A_i``; ``R``
    is fitted robustly to the ``B_i^T A_i`` of an evenly spaced sample (the rotation most of
    them lie within ``INLIER_DEG`` of, then averaged over those and projected onto SO(3) by SVD).
    A mirrored map sees ``J A_i J`` instead (``J`` flips z); both hands are tried and the one
    whose fit explains more particles kept (the lower median error, then the unmirrored one, on
    a tie). The errors go ``chunk_size`` particles at a time.

    Parameters
    ----------
    true_rotations, estimated : numpy.ndarray
        ``(n, 3, 3)`` rotation matrices (RELION's, :func:`cryoday.geometry.euler_to_matrix`).
    chunk_size : int
        Particles per chunk.

    Returns
    -------
    errors : numpy.ndarray
        ``(n,)`` float64 degrees.
    mirrored : bool
        Whether the estimated map is the truth's mirror image.
    """
    return _pose_errors_stream(lambda rows: (true_rotations[rows], estimated[rows]),
                               len(true_rotations), chunk_size)


def pose_errors_from_angles(true_angles, estimated_angles, chunk_size: int = POSE_CHUNK,
                            symmetry: str = "C1") -> tuple[np.ndarray, bool]:
    """:func:`pose_errors` of poses given as RELION Euler angles (degrees), each chunk's
    matrices built as it is needed: memory stays at the angles and the errors.

    Parameters
    ----------
    true_angles, estimated_angles : tuple of numpy.ndarray
        ``(rot, tilt, psi)``, each ``(n,)``.
    chunk_size : int
        Particles per chunk.
    symmetry : str
        The run's point group: each error is the minimum over the group
        (:func:`symmetric_pose_errors`).
    """
    from cryoday.geometry import euler_to_matrix

    def pairs(rows):
        return (euler_to_matrix(*(np.asarray(a)[rows] for a in true_angles)),
                euler_to_matrix(*(np.asarray(a)[rows] for a in estimated_angles)))

    if point_groups.canonical_name(symmetry) != "C1":
        return symmetric_pose_errors(pairs, len(true_angles[0]), symmetry, chunk_size)
    return _pose_errors_stream(pairs, len(true_angles[0]), chunk_size)


# Symmetric pose errors: particles whose relative rotation is tried as the map's frame, and the
# particles a frame is scored on (the median of their errors), evenly spaced.
FRAME_CANDIDATES, FRAME_SAMPLE = 32, 2000


def symmetric_pose_errors(pairs, n: int, symmetry: str, chunk_size: int = POSE_CHUNK
                          ) -> tuple[np.ndarray, bool]:
    """:func:`pose_errors` up to a point group: ``min_g angle(B_i R, A_i g)``
    (:func:`cryoday.symmetry.pose_errors`) after the best frame ``R`` and hand.

    Averaging ``B_i^T A_i`` as in C1 fails: each estimate is one of ``|G|`` equivalents
    ``A_i g_i``, chosen per particle. The error is the same for ``R`` and ``R g``, so any one
    particle's ``B_i^T A_i`` is a candidate frame; the best of :data:`FRAME_CANDIDATES` (lowest
    median error on :data:`FRAME_SAMPLE` particles) is refined once by averaging
    ``B_i^T A_i g_i`` with each particle's nearest equivalent ``g_i``. The mirrored hand
    compares with ``J A_i J`` and the mirrored group ``J g J``.

    Parameters
    ----------
    pairs : callable
        ``pairs(rows) -> (true, estimated)``, ``(len(rows), 3, 3)`` rotations each.
    n : int
        Particles.
    symmetry : str
        Point group name.
    chunk_size : int
        Particles per chunk of the passes over all of them.

    Returns
    -------
    errors : (n,) degrees
    mirrored : bool
    """
    flip = np.diag([1.0, 1.0, -1.0])
    elements = point_groups.group(symmetry)
    chunks = [slice(start, min(start + chunk_size, n)) for start in range(0, n, chunk_size)]
    sample = np.unique(np.linspace(0, n - 1, min(n, FRAME_SAMPLE)).round().astype(np.int64))
    picks = np.unique(np.linspace(0, len(sample) - 1, min(len(sample), FRAME_CANDIDATES))
                      .round().astype(np.int64))
    true_s, est_s = pairs(sample)

    def nearest(est, true, group):
        # traces[i, g] = trace((A_i g)^T B_i): the largest is the nearest equivalent.
        traces = np.einsum("nki,nkj,gij->ng", true, est, group)
        best = traces.argmax(axis=1)
        cos = np.clip((traces[np.arange(len(est)), best] - 1) / 2, -1, 1)
        return np.degrees(np.arccos(cos)), best

    results = []
    for hand in range(2):
        group = elements if hand == 0 else flip @ elements @ flip
        a_s = true_s if hand == 0 else flip @ true_s @ flip
        frames = [est_s[i].T @ a_s[i] for i in picks]
        frame = min(frames, key=lambda r: np.median(nearest(est_s @ r, a_s, group)[0]))
        total = np.zeros((3, 3))
        for rows in chunks:
            true, est = pairs(rows)
            a = true if hand == 0 else flip @ true @ flip
            _, g = nearest(est @ frame, a, group)
            total += np.einsum("nji,njk,nkl->il", est, a, group[g])
        frame = _project_rotation(total)
        errors = np.empty(n)
        for rows in chunks:
            true, est = pairs(rows)
            a = true if hand == 0 else flip @ true @ flip
            errors[rows] = nearest(est @ frame, a, group)[0]
        results.append(errors)
    mirrored = bool(np.median(results[1]) < np.median(results[0]))
    return results[int(mirrored)], mirrored


def halfmap_fsc(preprocessed_star, final_star, box, pixel_size, log=print, rows=None):
    """Gold-standard FSC: two half-maps from disjoint halves with the final poses.

    Parameters
    ----------
    preprocessed_star : path
        The preprocessed particles (normalised images and their CTFs).
    final_star : path
        The same particles with their final poses.
    box, pixel_size : int, float
        The maps' box and voxel size (the preprocessed images').
    rows : array of int, optional
        Only these particles (0-based rows; a class's), split into halves; default all.
    """
    from cryoday.geometry import euler_to_matrix
    from cryoday.reconstruct import half_sets, reconstruct

    particles = io.read_particles(preprocessed_star)
    final = io.read_particles(final_star, pixel_size=pixel_size, check_stacks=False)
    pose = io.poses(final)
    rotations = euler_to_matrix(pose["rot"], pose["tilt"], pose["psi"])
    shifts = np.stack([pose["shift_x"], pose["shift_y"]], axis=1) / pixel_size
    ctf = io.ctf_params(particles)
    subset = np.arange(len(particles)) if rows is None else np.asarray(rows, np.int64)
    maps = []
    with io.ImageSource(particles) as source:
        for half in half_sets(len(subset)):
            rows = subset[half]
            maps.append(reconstruct(lambda r, rows=rows: source.read(rows[r]), len(rows),
                                    rotations[rows], shifts[rows],
                                    {k: v[rows] for k, v in ctf.items()}, pixel_size, box))
    log(f"half maps reconstructed from {len(subset)} particles")
    return maps




def heldout_signal_test(poses: dict) -> dict | None:
    """Does the map explain images it never saw better than empty density does?

    For each held-out image the gain is ``-log p(I | 0) - (-log p(I | V))``, the log-likelihood
    ratio of the map against pure noise. On images with no signal its expectation is at most 0
    (Jensen: the ratio itself averages 1 under noise), whatever the map was fitted to, so a mean
    gain many standard errors above 0 is evidence of signal, and one near 0 is its absence. A
    gain that is the same for every image (spread below ``GAIN_MIN_RELATIVE_SPREAD`` of its
    mean) or below ``GAIN_FLOOR_NATS`` is a numerical constant, not evidence: its z is 0.

    Parameters
    ----------
    poses : dict
        A stage's poses and likelihoods (``cryoday.records.read_poses``).

    Returns
    -------
    dict or None
        ``gain_nats_per_image``, ``spread_nats`` (standard deviation over images), ``z``,
        ``n_heldout``, ``evidence`` (bool) and ``reason`` (why there is none, or None); None
        when the poses carry no held-out likelihoods.
    """
    if "null_nll" not in poses or "heldout_rows" not in poses:
        return None
    rows = poses["heldout_rows"]
    gain = np.asarray(poses["null_nll"], np.float64)[rows] - np.asarray(poses["nll"],
                                                                        np.float64)[rows]
    if len(gain) < 2:
        return None
    result = {"gain_nats_per_image": float(gain.mean()), "spread_nats": 0.0, "z": 0.0,
              "n_heldout": len(gain), "evidence": False, "reason": None}
    if not np.isfinite(gain).all():
        result["gain_nats_per_image"] = float("nan")
        result["reason"] = (f"{int((~np.isfinite(gain)).sum())} held-out images have a "
                            "non-finite likelihood")
        return result
    mean, spread = float(gain.mean()), float(gain.std(ddof=1))
    result["spread_nats"] = spread
    if spread <= GAIN_MIN_RELATIVE_SPREAD * abs(mean):
        result["reason"] = (f"the held-out gain is the same for every image ({mean:.3g} nats, "
                            f"spread {spread:.2g}): a numerical constant, not evidence")
    elif abs(mean) < GAIN_FLOOR_NATS:
        result["reason"] = (f"the held-out gain ({mean:.2g} nats per image) is below the "
                            f"likelihood's precision ({GAIN_FLOOR_NATS:g} nats)")
    else:
        result["z"] = float(mean / (spread / np.sqrt(len(gain))))
        result["evidence"] = result["z"] >= SIGNAL_Z
    return result


def map_collapse(volume: np.ndarray, noise_sigma: float = 1.0) -> str | None:
    """Why a map holds no structure (constant, or too faint to explain any image), or None.

    Parameters
    ----------
    volume : ndarray
        The map, scaled so that its projections match the images (as ``final/volume.mrc``).
    noise_sigma : float
        The images' noise standard deviation per pixel (1 after preprocessing).
    """
    v = np.asarray(volume, np.float64)
    if not np.isfinite(v).all():
        return "the map has non-finite values"
    spread, scale = float(v.std()), float(np.abs(v).max())
    if spread <= CONSTANT_MAP_SPREAD * scale:
        value = f"{v.mean():.3g}" if scale > 0 else "0"
        return (f"the map is constant ({value} everywhere, spread {spread:.2g}): the "
                "reconstruction collapsed")
    rms = float(v.sum(axis=0).std())
    if rms < MIN_PROJECTION_RMS * noise_sigma:
        return (f"the map is nearly empty: its projection varies by {rms:.2g} x the images' noise "
                f"(below {MIN_PROJECTION_RMS:g}), too faint to explain any image; the "
                "reconstruction collapsed")
    return None


def pairwise_resolutions(maps: dict, pixel_size: float) -> dict[str, float]:
    """FSC 0.143 resolution (A) of every pair of maps after aligning them (rotation, shift,
    hand), keyed ``"a-b"``.

    Parameters
    ----------
    maps : dict
        ``{seed: map}``, every map in one box at ``pixel_size``.
    pixel_size : float
        The maps' voxel size (A).
    """
    pairs = {}
    for a, b in combinations(maps, 2):
        _, _, _, res = fsc_after_alignment(maps[a], maps[b], pixel_size)
        pairs[f"{a}-{b}"] = res
    return pairs


def seed_agreement(pairs: dict, halfmap_A: float, last_stage_A: float,
                   factor: float = SEED_AGREEMENT_FACTOR) -> dict:
    """Do the random starts' maps agree to the resolution the data support?

    Each pair's aligned FSC 0.143 resolution is compared with the reference
    ``max(halfmap_A, last_stage_A)``: the final map's half-map resolution is what its poses
    support (two starts that found the same structure agree at least about as well as two
    halves of one map: each start saw all the images), and a start's map holds no detail beyond
    the last stage's resolution, so the reference is never finer than that. A non-finite
    half-map figure falls back on the last stage's. A pair agrees when its resolution is within
    ``factor`` of the reference; the slack covers the alignment's resampling (a few per cent of
    correlation) and the prior's smoothing of a start's map, which half maps reconstructed
    without a prior do not have. Only the final map's half maps are computed: the claim to judge
    is the final map's, and a worse start's half maps would only loosen the test.

    Parameters
    ----------
    pairs : dict
        ``{"a-b": resolution (A)}`` (``pairwise_resolutions``); empty for one start.
    halfmap_A : float
        Half-map FSC 0.143 resolution of the final map (A; may be inf).
    last_stage_A : float
        The last stage's target resolution (A).
    factor : float
        How much coarser than the reference a pair may agree and still count.

    Returns
    -------
    dict
        ``pairwise_fsc0143_A``, ``agree``, ``disagreeing`` (the pairs beyond the threshold),
        ``reference_A``, ``max_ratio`` (``factor``) and ``threshold_A``.
    """
    reference = max(halfmap_A if math.isfinite(halfmap_A) else last_stage_A, last_stage_A)
    threshold = factor * reference
    disagreeing = [pair for pair, res in pairs.items() if not res <= threshold]
    return {"pairwise_fsc0143_A": dict(pairs), "agree": not disagreeing,
            "disagreeing": disagreeing, "reference_A": float(reference),
            "max_ratio": float(factor), "threshold_A": float(threshold)}


# A right map's FSC against an exact reference crosses 0.143 about where its half maps cross it
# (and 0.5 about where they cross 0.143); these factors leave room for a reference that is not
# exact (another reconstruction, a model's map) without letting a wrong fold pass.
REFERENCE_FSC0143_FACTOR = 2.0
REFERENCE_FSC05_FACTOR = 3.0


def reference_disagreement(fsc05_A: float, fsc0143_A: float, halfmap_A: float,
                           last_stage_A: float) -> str | None:
    """A warning when the map disagrees with the reference far more than its half maps allow,
    else None: half maps from one refinement agree with each other on whatever structure the
    poses made, right or wrong, so only the reference can tell a wrong map (a wrong fold, or
    particles that fill the box) from a right one.

    The yardstick is the half maps' masked FSC 0.143 resolution, or the last stage's when that
    is coarser; the map disagrees when its FSC 0.143 against the reference is more than
    ``REFERENCE_FSC0143_FACTOR`` times it, or its FSC 0.5 more than
    ``REFERENCE_FSC05_FACTOR`` times it.
    """
    yardstick = max(halfmap_A, last_stage_A) if math.isfinite(halfmap_A) else last_stage_A
    if (fsc0143_A > REFERENCE_FSC0143_FACTOR * yardstick
            or fsc05_A > REFERENCE_FSC05_FACTOR * yardstick):
        return (f"the map disagrees with the reference: FSC 0.5 / 0.143 against it at "
                f"{fsc05_A:.1f} / {fsc0143_A:.1f} A, although the half maps agree to "
                f"{halfmap_A:.1f} A: the map is not the reference's structure (a wrong fold "
                "that the half maps share, particles too large for the box, or a reference "
                "of another molecule or at a much lower resolution)")
    return None


def pose_error_figures(truth_star, final_star, pixel_size, chunk_size: int = POSE_CHUNK,
                       symmetry: str = "C1") -> dict:
    """Angular errors of the final poses against a simulation's true ones (``pose_errors``;
    up to the run's point group ``symmetry``, :func:`symmetric_pose_errors`).

    Rows of the two files match by position. Junk rows (the simulator's ``cryodaySimJunk``
    column, not 0) are left out: a noise image has no true pose, and another map's projection
    has one only in that map's frame, so either would only blur the particles' figure.
    """
    from cryoday.simulate import JUNK_COLUMN, JUNK_NONE

    truth_particles = io.read_particles(truth_star, check_stacks=False)
    truth = io.poses(truth_particles)
    est = io.poses(io.read_particles(final_star, pixel_size=pixel_size, check_stacks=False))
    keep = slice(None)
    if JUNK_COLUMN in truth_particles.table:
        keep = truth_particles.table[JUNK_COLUMN].to_numpy() == JUNK_NONE
    errors, mirrored = pose_errors_from_angles(
        tuple(truth[k][keep] for k in ("rot", "tilt", "psi")),
        tuple(est[k][keep] for k in ("rot", "tilt", "psi")), chunk_size, symmetry)
    return {"pose_error_median_deg": float(np.median(errors)),
            "pose_error_hand_flipped": bool(mirrored),
            "pose_within_15deg_fraction": float(np.mean(errors < INLIER_DEG)),
            "pose_error_histogram": np.histogram(errors, bins=18, range=(0, 180))[0].tolist()}


def symmetry_figures(symmetry, search: bool, volume, half1, half2, pixel_size: float,
                     log=print) -> dict:
    """``metrics["symmetry"]``: the group the run used (``group``, ``order``) and, for a C1 run
    asked to (``search``, or ``symmetry`` ``'auto'``), ``search``: every candidate's scores on
    the final map with its half maps (:meth:`cryoday.symmetry_search.SymmetrySearch.as_dict`;
    its ``group`` is the one found)."""
    auto = isinstance(symmetry, str) and symmetry.strip().lower() == "auto"
    group = "C1" if auto else point_groups.canonical_name(symmetry)
    out = {"group": group, "order": point_groups.order(group)}
    if group == "C1" and (auto or search):
        from cryoday.symmetry_search import find_symmetry

        found = find_symmetry(volume, pixel_size, "auto", half1=half1, half2=half2)
        out["search"] = found.as_dict()
        log(f"symmetry search on the C1 map: {found.chosen.name} (consistency "
            f"{found.chosen.consistency:.3f}, reference {found.reference:.3f})")
    return out


def final_map_figures(final_map, figures, reference=None, alignment=None) -> tuple[dict, dict]:
    """The final map's figures (``final_map.json``) and, with a reference, its FSC against it
    after alignment; and the FSC table's extra columns (``fsc_final_vs_reference``).

    Parameters
    ----------
    final_map, figures : path
        ``final/map_full.mrc`` (unsharpened: the FSC against a reference is blind to a radial
        filter but not to the sharpened map's noise) and ``final/final_map.json``.
    reference : path, optional
    alignment : cryoday.align.Alignment, optional
        The stage map's onto ``reference``: the final map is reconstructed from the poses found
        against that map, so it shares its frame and hand, and the search need not run again.
    """
    out = {k: v for k, v in json.loads(Path(figures).read_text()).items() if k != "fsc_table"}
    columns = {}
    if reference:
        volume, pixel_size = io.read_map(final_map)
        ref, ref_voxel = io.read_map(reference)
        if ref.shape != volume.shape or (ref_voxel and abs(ref_voxel - pixel_size) > 1e-3):
            ref = rescale_volume(ref, ref_voxel or pixel_size, volume.shape[0], pixel_size)
        if alignment is None:
            _, freq, curve, res = fsc_after_alignment(volume, ref, pixel_size)
        else:
            freq, curve = fsc(apply_alignment(volume, alignment), ref, pixel_size)
            res = resolution_at(freq, curve, 0.143)
        out["fsc0143_vs_reference_A"] = res
        out["fsc05_vs_reference_A"] = resolution_at(freq, curve, 0.5)
        columns = {"freq_invA": freq, "fsc_final_vs_reference": curve}
    return out, columns


# The noise model's summary bands (A): "low" is where ab initio decides the fold (the paper's
# first stages), "high" where its last stage ends.
NOISE_LOW_BAND_A = 30.0
NOISE_HIGH_BAND_A = 10.0


def nyquist_shell(spectrum: noise.NoiseSpectrum) -> int:
    """The index of the Nyquist shell (``box // 2``), from the number of shells the TSV holds."""
    n = len(spectrum.shells)
    half = next((h for h in range(1, n + 1) if noise.n_shells(2 * h) == n), None)
    # A spectrum not written by noise.estimate_spectra: its last shell stands for Nyquist.
    return n - 1 if half is None else half


def noise_model_figures(noise_spectrum) -> dict:
    """``metrics["noise_model"]``: the number of noise groups and the pooled low-to-high ratio.

    The pooled spectrum is the mean of the optics groups' spectra (each already pools its
    micrographs' particles; the TSV holds no counts, so optics groups weigh equally); with
    micrograph groups only, all groups. ``low_to_high`` is its mean relative power over the
    shells ``0 < k < 1/30 A`` (shell 0, the mean, is left out: the background median removed it)
    divided by the mean over the shells ``1/10 A <= k <= Nyquist``; when Nyquist is coarser than
    10 A, the Nyquist shell alone. A box too small for any shell below 1/30 A uses shell 1.
    White noise gives 1; real data several.

    Parameters
    ----------
    noise_spectrum : path
        Preprocessing's ``noise_spectrum.tsv`` (:meth:`cryoday.noise.NoiseSpectrum.save`).

    Returns
    -------
    dict
        ``{"groups": n, "low_to_high": ratio}``.
    """
    spectrum = noise.NoiseSpectrum.load(noise_spectrum)
    return {"groups": spectrum.n_groups, "low_to_high": pooled_low_to_high(spectrum)}


def pooled_spectrum(spectrum: noise.NoiseSpectrum) -> np.ndarray:
    """``(S,)`` the mean of the optics groups' power (all groups' without an optics group)."""
    optics = [i for i, label in enumerate(spectrum.labels) if " / " not in label]
    return spectrum.power[optics or slice(None)].mean(axis=0)


def pooled_low_to_high(spectrum: noise.NoiseSpectrum) -> float:
    """The pooled spectrum's low-to-high power ratio (see :func:`noise_model_figures`)."""
    power = pooled_spectrum(spectrum)
    shells = spectrum.shells
    nyquist = nyquist_shell(spectrum)
    index = np.arange(len(shells))
    low = (index >= 1) & (shells < 1.0 / NOISE_LOW_BAND_A)
    if not low.any():
        low = index == 1
    high = (index <= nyquist) & (shells >= min(1.0 / NOISE_HIGH_BAND_A, shells[nyquist]))
    return float(power[low].mean() / power[high].mean())


def _reference_in_another_class(metrics: dict, stages_A, log) -> bool:
    """True (and ``metrics["reference_class"]``) when the main class is not the reference's
    structure but another class with a structure is: a set of two molecules, a reference of
    one of them. The class that agrees with the reference best (FSC 0.5) is named. False when
    no class matches the reference."""
    candidates = [c for c in metrics["classes"]["classes"]
                  if not c["main"] and not c["junk"] and "fsc05_vs_reference_A" in c]
    for c in sorted(candidates, key=lambda c: c["fsc05_vs_reference_A"]):
        halfmap = c.get("halfmap_fsc0143_masked_A", metrics["halfmap_fsc0143_masked_A"])
        if not reference_disagreement(c["fsc05_vs_reference_A"], c["fsc0143_vs_reference_A"],
                                      halfmap, float(stages_A[-1])):
            metrics["reference_class"] = c["class"]
            log(f"the reference is class {c['class']}'s structure (FSC 0.5 / 0.143 against it "
                f"{c['fsc05_vs_reference_A']:.1f} / {c['fsc0143_vs_reference_A']:.1f} A), not "
                f"the main class {metrics['classes']['main']}'s")
            return True
    return False


def run_metrics(*, dataset: str, final_volume, final_star, seed_choice, preprocess_info,
                preprocessed_star, seed_stages: dict, seed_poses: dict, stages_A,
                reference=None, truth_star=None, final_map=None, noise_spectrum=None,
                symmetry="C1", symmetry_search=False, truth_symmetry=None,
                class_stages: dict | None = None, log=print) -> tuple[dict, dict]:
    """Everything ``metrics.json`` reports, and the FSC table.

    Parameters
    ----------
    dataset : str
        The dataset's name, as reported.
    final_volume, final_star, seed_choice : path
        The final map, the particles with their final poses, and ``seed_choice.json`` (which
        seed they come from).
    preprocess_info, preprocessed_star : path
        Preprocessing's ``info.json`` and particles (the half maps' images).
    seed_stages : dict
        ``{seed: [(history.tsv, volume.mrc), ...]}``, one pair per stage in stage order, for
        every random start (config order).
    seed_poses : dict
        ``{seed: poses.npz of its last stage}``; the chosen seed's gives the held-out test.
    stages_A : list of float
        The stages' resolutions (A), in order.
    reference : path, optional
        A map to compare with (the simulation's truth or the user's).
    truth_star : path, optional
        A simulation's particles with their true poses (pose errors).
    final_map : dict, optional
        The final map's files (rule ``final_map``): ``half1``, ``half2`` (their FSC is the
        half-map figure, instead of half maps reconstructed here), ``full`` and ``figures``
        (``metrics["final_map"]``: its half-map figures, B factor and FSC against the reference,
        beside the stage map's ``fsc*_vs_reference_A``).
    noise_spectrum : path, optional
        Preprocessing's ``noise_spectrum.tsv``: ``metrics["noise_model"]``
        (:func:`noise_model_figures`).
    symmetry : str
        The dataset's configured point group (``'auto'``: C1, then searched); pose errors are
        taken up to it. ``metrics["symmetry"]`` (:func:`symmetry_figures`).
    symmetry_search : bool
        Search a C1 run's final map for its group (as ``'auto'`` does).
    truth_symmetry : str, optional
        A simulation's point group (``simulate.symmetry``): its poses are known only up to it,
        so the pose errors are taken up to it whatever group the run used (else up to the
        run's). ``metrics["symmetry"]["pose_errors_up_to"]`` says which.
    class_stages : dict, optional
        ``{seed: [classes.npz of each stage, in order]}`` of a run of K > 1 classes:
        ``metrics["classes"]`` (:func:`cryoday.class_results.class_metrics`, on the chosen
        seed's). A run of one class has no such section.
    log : callable
        Receives progress lines.
    """
    info = json.loads(Path(preprocess_info).read_text())
    choice = json.loads(Path(seed_choice).read_text())
    chosen = int(choice["chosen_seed"])
    seeds = [int(s) for s in seed_stages]
    seed_stages = {int(s): list(v) for s, v in seed_stages.items()}
    per_seed = {}
    for seed in seeds:
        stages = seed_stages[seed]
        if len(stages) != len(stages_A):
            raise ValueError(f"seed {seed}: {len(stages)} stage records for {len(stages_A)} "
                             "stages")
        per_seed[str(seed)] = [stage_figures(h, v, float(r)) for (h, v), r in zip(stages, stages_A)]
    metrics = {
        "dataset": dataset,
        "n_particles": info["n_particles"],
        "box": info["box"],
        "pixel_size": info["pixel_size"],
        "chosen_seed": chosen,
        "stages": per_seed[str(chosen)],
        "seeds": per_seed,
        "wall_s_total": float(sum(s["wall_s"] for st in per_seed.values() for s in st)),
        "warnings": [],
    }
    volume, _ = io.read_map(final_volume)
    pixel_size = info["pixel_size"]
    collapse = map_collapse(volume)
    metrics["map_collapsed"] = collapse is not None
    if collapse:
        metrics["warnings"].append(f"final map: {collapse}")
    table = {}
    if reference:
        ref, ref_voxel = io.read_map(reference)
        if ref.shape != volume.shape or (ref_voxel and abs(ref_voxel - pixel_size) > 1e-3):
            ref = rescale_volume(ref, ref_voxel or pixel_size, volume.shape[0], pixel_size)
        alignment, freq, curve, res = fsc_after_alignment(volume, ref, pixel_size)
        metrics["fsc0143_vs_reference_A"] = res
        metrics["fsc05_vs_reference_A"] = resolution_at(freq, curve, 0.5)
        metrics["reference_alignment"] = {"flipped": alignment.flipped,
                                          "correlation": alignment.correlation}
        table["freq_invA"] = freq
        table["fsc_vs_reference"] = curve
        log(f"FSC 0.143 against the reference: {res:.1f} A")
    # Gold-standard half maps with the final poses.
    if final_map:
        half1, half2 = (io.read_map(final_map[k])[0] for k in ("half1", "half2"))
        metrics["final_map"], columns = final_map_figures(
            final_map["full"], final_map["figures"], reference,
            alignment if reference else None)
        if "fsc_final_vs_reference" in columns:
            table.setdefault("freq_invA", columns["freq_invA"])
            table["fsc_final_vs_reference"] = columns["fsc_final_vs_reference"]
            log(f"final map: FSC 0.5 / 0.143 against the reference "
                f"{metrics['final_map']['fsc05_vs_reference_A']:.1f} / "
                f"{metrics['final_map']['fsc0143_vs_reference_A']:.1f} A")
    else:
        half1, half2 = halfmap_fsc(preprocessed_star, final_star, volume.shape[0], pixel_size,
                                   log)
    freq, unmasked = fsc(half1, half2, pixel_size)
    mask = soft_spherical_mask(volume.shape[0], 0.4 * volume.shape[0], 3.0)
    _, masked = fsc(half1, half2, pixel_size, mask=mask)
    table.setdefault("freq_invA", freq)
    table["fsc_halfmaps_unmasked"] = unmasked
    table["fsc_halfmaps_masked"] = masked
    metrics["halfmap_fsc0143_A"] = resolution_at(freq, unmasked, 0.143)
    metrics["halfmap_fsc05_A"] = resolution_at(freq, unmasked, 0.5)
    metrics["halfmap_fsc0143_masked_A"] = resolution_at(freq, masked, 0.143)
    halfmap_figures = (metrics["halfmap_fsc0143_A"], metrics["halfmap_fsc0143_masked_A"])
    if not all(math.isfinite(r) for r in halfmap_figures):
        metrics["warnings"].append(
            "the half maps do not correlate even at the lowest frequencies (half-map FSC 0.143 "
            f"resolution {halfmap_figures[0]} A unmasked, {halfmap_figures[1]} A masked): the "
            "map has no reproducible structure")
    elif metrics["halfmap_fsc0143_masked_A"] > 3 * float(stages_A[-1]):
        metrics["warnings"].append(
            f"half maps agree only to {metrics['halfmap_fsc0143_masked_A']:.1f} A (masked "
            f"FSC 0.143), far from the last stage's {stages_A[-1]} A: the poses are unreliable"
        )
    disagreement = None
    if reference:
        disagreement = reference_disagreement(
            metrics["fsc05_vs_reference_A"], metrics["fsc0143_vs_reference_A"],
            metrics["halfmap_fsc0143_masked_A"], float(stages_A[-1]))
    # The search reads the map its half maps belong to (the full-box final map when there is).
    searched = io.read_map(final_map["full"])[0] if final_map else volume
    metrics["symmetry"] = symmetry_figures(symmetry, symmetry_search, searched, half1, half2,
                                           pixel_size, log)
    if truth_star:
        pose_group = (point_groups.canonical_name(truth_symmetry) if truth_symmetry
                      else metrics["symmetry"]["group"])
        metrics["symmetry"]["pose_errors_up_to"] = pose_group
        metrics.update(pose_error_figures(truth_star, final_star, pixel_size,
                                          symmetry=pose_group))
        log(f"median angular error of the poses: {metrics['pose_error_median_deg']:.1f} degrees")
    chosen_poses = records.read_poses(seed_poses[chosen])
    shift_range.add_to_metrics(metrics, chosen_poses)
    signal = heldout_signal_test(chosen_poses)
    if signal is not None:
        metrics["heldout_signal"] = signal
        log(f"held-out images: the map explains them {signal['gain_nats_per_image']:.2f} nats "
            f"per image better than empty density (z = {signal['z']:.1f})")
        if not signal["evidence"]:
            why = (signal["reason"] if signal["reason"] else
                   f"{signal['gain_nats_per_image']:+.2f} nats per image, "
                   f"z = {signal['z']:.1f} < {SIGNAL_Z}")
            metrics["warnings"].append(
                f"the final map explains the {signal['n_heldout']} held-out images no better than "
                f"empty density ({why}): there is no evidence of a structure in "
                "these particles (too few, too noisy, or not particles)")
    if class_stages and class_results.n_classes(chosen_poses) > 1:
        stages = {int(s): list(v) for s, v in class_stages.items()}[chosen]
        metrics["classes"], class_warnings = class_results.class_metrics(
            chosen_poses, stages, stages_A, truth_star, reference, int(info["box"]),
            pixel_size, preprocessed_star=preprocessed_star, final_star=final_star, log=log)
        metrics["warnings"] += class_warnings
    if disagreement and not ("classes" in metrics
                             and _reference_in_another_class(metrics, stages_A, log)):
        metrics["warnings"].append(disagreement)
    # Seed consistency: every pair of final maps, aligned, against the half maps' resolution.
    maps = {}
    for seed in seeds:
        v, voxel = io.read_map(seed_stages[seed][-1][1])
        maps[seed] = rescale_volume(v, voxel or pixel_size, volume.shape[0], pixel_size)
    consistency = seed_agreement(pairwise_resolutions(maps, pixel_size),
                                 metrics["halfmap_fsc0143_A"], float(stages_A[-1]))
    metrics["seed_consistency"] = consistency
    if not consistency["agree"]:
        pairs = {p: round(consistency["pairwise_fsc0143_A"][p], 1)
                 for p in consistency["disagreeing"]}
        metrics["warnings"].append(
            f"random starts disagree: their maps agree only to {pairs} A (FSC 0.143 after "
            f"alignment), coarser than {consistency['max_ratio']:g} x the "
            f"{consistency['reference_A']:.1f} A the data support (the final map's half-map "
            f"resolution, or the last stage's if coarser); the final map comes from seed "
            f"{chosen}, which has the lowest held-out error, but the structure is not "
            "reproducible")
    if "freq_invA" not in table:
        freq, _ = fsc(volume, volume, pixel_size)
        table["freq_invA"] = freq
    table["resolution_A"] = np.where(table["freq_invA"] > 0, 1 / np.maximum(table["freq_invA"],
                                                                            1e-12), np.inf)
    if noise_spectrum:
        metrics["noise_model"] = noise_model_figures(noise_spectrum)
        log(f"noise model: {metrics['noise_model']['groups']} groups, pooled low-to-high "
            f"power ratio {metrics['noise_model']['low_to_high']:.2f}")
    metrics["status"] = "warning" if metrics["warnings"] else "ok"
    return metrics, table
