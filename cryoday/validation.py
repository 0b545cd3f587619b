"""Figures of a finished run, for ``metrics.json``: stages, resolution, seed consistency."""

from __future__ import annotations

import csv
import json
from itertools import combinations
from pathlib import Path

import numpy as np

from cryoday import io
from cryoday.align import fsc_after_alignment
from cryoday.fourier import rescale_volume
from cryoday.fsc import fsc, resolution_at, soft_spherical_mask


def read_history(path) -> list[dict]:
    """A stage's ``history.tsv`` as dicts of floats (NaN where a value is empty)."""
    with open(path) as f:
        return [{k: float(v) if v not in ("", None) else float("nan") for k, v in row.items()}
                for row in csv.DictReader(f, delimiter="\t")]


def stage_figures(history_path, resolution_A: float) -> dict:
    """Per-stage figures from its history and the volume beside it."""
    history = read_history(history_path)
    heldout = [h["heldout_nll"] for h in history if np.isfinite(h["heldout_nll"])]
    volume_path = Path(history_path).with_name("volume.mrc")
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


def write_fsc_table(path, table: dict) -> None:
    """TSV of FSC curves: ``freq_invA``, ``resolution_A`` and one column per curve."""
    columns = list(table)
    with io.atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f, delimiter="\t")
            writer.writerow(columns)
            for row in zip(*(table[c] for c in columns)):
                writer.writerow([f"{v:.6g}" for v in row])


def pose_errors(true_rotations: np.ndarray, estimated: np.ndarray) -> tuple[np.ndarray, bool]:
    """Angular errors (degrees) of estimated poses after the best global rotation and hand.

    If the estimated map is the truth rotated by ``R``, poses relate as ``B_i R ~ A_i``; ``R``
    is the rotation average of ``B_i^T A_i`` (projected onto SO(3) by SVD). A mirrored map sees
    ``J A_i J`` instead (``J`` flips z); both hands are tried and the better one kept.
    """
    flip = np.diag([1.0, 1.0, -1.0])
    best = None
    for mirrored in (False, True):
        a = flip @ true_rotations @ flip if mirrored else true_rotations
        m = np.einsum("nji,njk->ik", estimated, a)
        u, _, vt = np.linalg.svd(m)
        r = u @ np.diag([1, 1, np.linalg.det(u @ vt)]) @ vt
        relative = np.einsum("nij,jk,nlk->nil", estimated, r, a)
        cos = np.clip((np.trace(relative, axis1=1, axis2=2) - 1) / 2, -1, 1)
        errors = np.degrees(np.arccos(cos))
        if best is None or np.median(errors) < np.median(best[0]):
            best = (errors, mirrored)
    return best


def halfmap_fsc(preprocessed_star, final_star, box, pixel_size, log=print):
    """Gold-standard FSC: two half-maps from disjoint halves with the final poses."""
    from cryoday.geometry import euler_to_matrix
    from cryoday.reconstruct import half_sets, reconstruct

    particles = io.read_particles(preprocessed_star)
    final = io.read_particles(final_star, pixel_size=pixel_size, check_stacks=False)
    pose = io.poses(final)
    rotations = euler_to_matrix(pose["rot"], pose["tilt"], pose["psi"])
    shifts = np.stack([pose["shift_x"], pose["shift_y"]], axis=1) / pixel_size
    ctf = io.ctf_params(particles)
    maps = []
    with io.ImageSource(particles) as source:
        for rows in half_sets(len(particles)):
            maps.append(reconstruct(lambda r, rows=rows: source.read(rows[r]), len(rows),
                                    rotations[rows], shifts[rows],
                                    {k: v[rows] for k, v in ctf.items()}, pixel_size, box))
    log(f"half maps reconstructed from {len(particles)} particles")
    return maps


SIGNAL_Z = 3.0  # held-out log-likelihood gain, in standard errors, that counts as signal


def histories_of(histories: list[str], seed: int) -> list[str]:
    """One seed's ``history.tsv`` paths, stage order kept."""
    return [h for h in histories if f"/seed{seed}/" in str(h)]


def heldout_signal_test(poses_path) -> dict | None:
    """Does the map explain images it never saw better than empty density does?

    For each held-out image the gain is ``-log p(I | 0) - (-log p(I | V))``, the log-likelihood
    ratio of the map against pure noise. On images with no signal its expectation is at most 0
    (Jensen: the ratio itself averages 1 under noise), whatever the map was fitted to, so a mean
    gain many standard errors above 0 is evidence of signal, and one near 0 is its absence.
    """
    with np.load(poses_path) as f:
        if "null_nll" not in f or "heldout_rows" not in f:
            return None
        rows = f["heldout_rows"]
        gain = f["null_nll"][rows] - f["nll"][rows]
    if len(gain) < 2:
        return None
    standard_error = gain.std(ddof=1) / np.sqrt(len(gain))
    z = float(gain.mean() / standard_error) if standard_error > 0 else 0.0
    return {"gain_nats_per_image": float(gain.mean()), "z": z, "n_heldout": int(len(gain))}


def run_metrics(final_volume, final_star, seed_choice, preprocess_info, seed_volumes, histories,
                seeds, stages_A, reference=None, simulated=False, log=print):
    """Everything ``metrics.json`` reports, and the FSC table."""
    info = json.loads(Path(preprocess_info).read_text())
    choice = json.loads(Path(seed_choice).read_text())
    chosen = int(choice["chosen_seed"])
    per_seed = {}
    for seed in seeds:
        paths = histories_of(histories, seed)
        per_seed[str(seed)] = [stage_figures(p, float(r)) for p, r in zip(paths, stages_A)]
    metrics = {
        "dataset": Path(final_volume).parts[-3] if len(Path(final_volume).parts) >= 3 else "",
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
    preprocessed = Path(preprocess_info).with_name("particles.star")
    half1, half2 = halfmap_fsc(preprocessed, final_star, volume.shape[0], pixel_size, log)
    freq, unmasked = fsc(half1, half2, pixel_size)
    mask = soft_spherical_mask(volume.shape[0], 0.4 * volume.shape[0], 3.0)
    _, masked = fsc(half1, half2, pixel_size, mask=mask)
    table.setdefault("freq_invA", freq)
    table["fsc_halfmaps_unmasked"] = unmasked
    table["fsc_halfmaps_masked"] = masked
    metrics["halfmap_fsc0143_A"] = resolution_at(freq, unmasked, 0.143)
    metrics["halfmap_fsc05_A"] = resolution_at(freq, unmasked, 0.5)
    metrics["halfmap_fsc0143_masked_A"] = resolution_at(freq, masked, 0.143)
    if metrics["halfmap_fsc0143_masked_A"] > 3 * float(stages_A[-1]):
        metrics["warnings"].append(
            f"half maps agree only to {metrics['halfmap_fsc0143_masked_A']:.1f} A (masked "
            f"FSC 0.143), far from the last stage's {stages_A[-1]} A: the poses are unreliable"
        )
    if simulated:
        truth_star = Path(final_volume).parents[1] / "simulated" / "particles.star"
        truth = io.poses(io.read_particles(truth_star, check_stacks=False))
        est = io.poses(io.read_particles(final_star, pixel_size=pixel_size, check_stacks=False))
        from cryoday.geometry import euler_to_matrix

        errors, mirrored = pose_errors(
            euler_to_matrix(truth["rot"], truth["tilt"], truth["psi"]),
            euler_to_matrix(est["rot"], est["tilt"], est["psi"]))
        metrics["pose_error_median_deg"] = float(np.median(errors))
        metrics["pose_error_hand_flipped"] = bool(mirrored)
        metrics["pose_error_histogram"] = np.histogram(errors, bins=18, range=(0, 180))[0].tolist()
        log(f"median angular error of the poses: {np.median(errors):.1f} degrees")
    signal = heldout_signal_test(Path(histories_of(histories, chosen)[-1]).with_name("poses.npz"))
    if signal is not None:
        metrics["heldout_signal"] = signal
        log(f"held-out images: the map explains them {signal['gain_nats_per_image']:.2f} nats "
            f"per image better than empty density (z = {signal['z']:.1f})")
        if signal["z"] < SIGNAL_Z:
            metrics["warnings"].append(
                f"the final map explains the {signal['n_heldout']} held-out images no better than "
                f"empty density ({signal['gain_nats_per_image']:+.2f} nats per image, "
                f"z = {signal['z']:.1f} < {SIGNAL_Z}): there is no evidence of a structure in "
                "these particles (too few, too noisy, or not particles)")
    # Seed consistency: every pair of final maps, aligned.
    maps = {}
    for seed, path in zip(seeds, seed_volumes):
        v, voxel = io.read_map(path)
        maps[seed] = rescale_volume(v, voxel or pixel_size, volume.shape[0], pixel_size)
    pairs = {}
    for a, b in combinations(seeds, 2):
        _, _, _, res = fsc_after_alignment(maps[a], maps[b], pixel_size)
        pairs[f"{a}-{b}"] = res
    final_res = float(stages_A[-1])
    agree = all(r <= 2 * final_res for r in pairs.values())
    metrics["seed_consistency"] = {"pairwise_fsc0143_A": pairs, "agree": agree}
    if not agree:
        metrics["warnings"].append(
            f"random starts disagree (pairwise FSC 0.143 {pairs}); the final map comes from seed "
            f"{chosen}, which has the lowest held-out error, but the structure is not reproducible"
        )
    if "freq_invA" not in table:
        freq, _ = fsc(volume, volume, pixel_size)
        table["freq_invA"] = freq
    table["resolution_A"] = np.where(table["freq_invA"] > 0, 1 / np.maximum(table["freq_invA"],
                                                                            1e-12), np.inf)
    metrics["status"] = "warning" if metrics["warnings"] else "ok"
    return metrics, table
