"""Refinement after the last coarse-to-fine stage: expectation-maximisation rounds at its map.

The last stage's SAGD map leaves the particles' poses where ~1 epoch of minibatch steps at a
map still short of its stage's cutoff put them (#15: on a realistic set, FSC 0.5 against the
truth 13.8 A at a 10 A stage). Each round here is RELION's refinement iteration on the
stage's images and grid:

- **M step**: a direct Fourier reconstruction from every particle's pose posterior (the top
  points of its stored marginals, :func:`cryoday.final_map.posterior_poses`), in two
  gold-standard halves; the full map filtered per shell by the halves' figure of merit
  ``sqrt(2 FSC / (1 + FSC))`` (so the next poses are not fitted to the noise the halves
  disagree on) and kept non-negative, as the stages' maps are.
- **E step**: the pose pass of every particle at that map (:func:`cryoday.stage.final_poses`),
  with the importance sampler's proposals built from each particle's previous posterior, which
  the pass updates: the search stays local where a posterior is sharp.

Measured on the realistic synthetic set (10,000 x 64 px, coloured noise, B 150, per-particle
defocus, SNR 0.05; docs/refine.md): four rounds at the 10 A stage's map took FSC 0.5 against
the truth of the unfiltered map from 13.77 A to 13.16 A, 13 s a round.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np

from cryoday.final_map import final_reconstruction, fsc_weight, posterior_poses
from cryoday.fourier import ft3, ift3, radial_index_3d
from cryoday.symmetry import pose_errors


def filtered_map(full: np.ndarray, fsc_masked: np.ndarray) -> np.ndarray:
    """``full`` weighted per Fourier shell by ``sqrt(2 FSC / (1 + FSC))`` of the half maps'
    masked FSC (0 beyond its last shell), clipped at 0."""
    box = full.shape[0]
    weight = np.append(fsc_weight(fsc_masked), 0.0)
    shells = np.minimum(np.rint(radial_index_3d(box)).astype(np.int64), len(weight) - 1)
    return np.maximum(ift3(ft3(full) * weight[shells]).real, 0.0).astype(np.float32)


def m_step(state: dict, images, ctf_params: dict, pixel_size: float, symmetry: str,
           seed: int = 0):
    """The map of the stored pose posteriors ``state`` (a sampler's :meth:`state`) at the
    images' box: returns ``(filtered map, FinalMap)``."""
    n = len(images)
    box = int(images.shape[-1])
    image, rotations, shifts, weights = posterior_poses(state, pixel_size)
    result = final_reconstruction(lambda rows: np.asarray(images[rows], np.float32), n,
                                  rotations, shifts, ctf_params, pixel_size, box,
                                  image=image, weights=weights, seed=seed, symmetry=symmetry,
                                  log=lambda _: None)
    return filtered_map(result.full, result.fsc_masked), result


def moved_share(before: np.ndarray, after: np.ndarray, degrees: float,
                symmetry: str = "C1") -> float:
    """Share of the particles whose most probable rotation moved by more than ``degrees``
    (up to the point group's equivalent poses)."""
    return float(np.mean(pose_errors(after, before, symmetry) > degrees))


@contextmanager
def annealing_off(sampler):
    """The sampler's proposals at ``T = 1``, the prior's floor and no antipodal term, then its
    schedule back as it was."""
    was = sampler.anneal
    sampler.anneal = False
    try:
        yield sampler
    finally:
        sampler.anneal = was


def refine(volume: np.ndarray, poses, objective, iteration: int, rounds: int, images,
           ctf_params: dict, pixel_size: float, symmetry: str = "C1", log=print,
           start_time=None, residuals=None, seed: int = 0):
    """``rounds`` EM rounds from the stage's map ``volume`` and its final ``poses`` (whose pass
    has updated ``objective``'s sampler); ``residuals`` (noise refinement) are taken in the
    last round's pass. Returns ``(poses, map, history)``: the last pass's poses, the last M
    step's filtered map and one record per round."""
    from cryoday.stage import final_poses

    start_time = time.perf_counter() if start_time is None else start_time
    history = []
    for k in range(1, rounds + 1):
        volume, halves = m_step(objective.sampler.state(), images, ctf_params, pixel_size,
                                symmetry, seed)
        previous = poses.rotations
        # The rounds start from posteriors the stage has annealed into: proposals at T = 1
        # draw fewer points than at the stage's last temperature (2.5 on the realistic set)
        # and found as many right poses (docs/refine.md).
        with annealing_off(objective.sampler):
            poses = final_poses(volume, objective, iteration + k, log=lambda _: None,
                                start_time=start_time,
                                residuals=residuals if k == rounds else None)
        heldout = float(np.mean(poses.nll[objective.heldout_rows]))
        record = {"round": k, "halfmap_fsc143_A": halves.resolution_A, "heldout_nll": heldout,
                  "moved_5deg": moved_share(previous, poses.rotations, 5.0, symmetry),
                  "time_s": time.perf_counter() - start_time}
        history.append(record)
        log(f"refinement round {k} of {rounds}: half-map FSC 0.143 {halves.resolution_A:.2f} A "
            f"at this box, held-out nll {heldout:.4f}, {100 * record['moved_5deg']:.1f}% of "
            f"the particles moved by more than 5 deg, {record['time_s']:.1f} s")
    return poses, volume, history
