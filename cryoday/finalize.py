"""The run's result: the chosen random start's map at the input box, and the particles with its
poses as RELION STAR and cryoSPARC ``.cs`` files.

With K classes (``reconstruction.classes``) the map is the main class's (the stage's
``volume.mrc``) and the particles carry their most probable class as ``rlnClassNumber``
(1-based) and its posterior as ``rlnMaxValueProbDistribution`` (``alignments3D/class`` and
``class_posterior`` in the ``.cs``); their poses are those of that class. With one class
neither column is added. Each class's map and particles (``final/class{k}/``) are written by
:func:`class_outputs`, the class summary by :func:`cryoday.class_results.write_class_summary`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from cryoday import class_results, cryosparc, io, records, validation
from cryoday.fourier import rescale_volume
from cryoday.geometry import matrix_to_euler

log = logging.getLogger(__name__)


def final_map(volume_path, box: int, pixel_size: float):
    """A stage's map resampled to the input's ``box`` and ``pixel_size``.

    Scaled as a stage map is between stages (by the box ratio), so its projections match the
    input images in amplitude as they matched the stage's downsampled ones.
    """
    volume, stage_pixel_size = io.read_map(volume_path)
    return to_input_box(volume, stage_pixel_size, box, pixel_size)


def to_input_box(volume, stage_pixel_size: float, box: int, pixel_size: float):
    """:func:`final_map` of a map in memory (a class map of ``classes.npz``)."""
    final = rescale_volume(volume, stage_pixel_size, box, pixel_size)
    final *= volume.shape[0] / box
    return final


def posed_table(source: io.Particles, poses: dict, star_dir):
    """The source's particle table with ``poses`` (:func:`cryoday.records.read_poses`) in
    RELION's columns and image names that find the source's stacks from ``star_dir``."""
    rot, tilt, psi = matrix_to_euler(poses["rotations"])
    table = source.table.copy()
    table["rlnAngleRot"], table["rlnAngleTilt"], table["rlnAnglePsi"] = rot, tilt, psi
    table["rlnOriginXAngst"] = poses["shifts_A"][:, 0]
    table["rlnOriginYAngst"] = poses["shifts_A"][:, 1]
    # Pixel origins (RELION 3.0) would contradict the Angstrom ones just set.
    table = table.drop(columns=[c for c in ("rlnOriginX", "rlnOriginY") if c in table])
    table["rlnImageName"] = source.image_names_from(star_dir)
    posterior = records.class_posterior(poses)
    if posterior.shape[1] > 1:
        assigned = class_results.assigned_classes(posterior)
        table["rlnClassNumber"] = assigned + 1
        table["rlnMaxValueProbDistribution"] = posterior[np.arange(len(assigned)), assigned]
    return table


def finalize(seed_histories: Sequence, seed_volumes: Sequence, seed_poses: Sequence,
             source_particles, info, volume_out, star_out, cs_out, choice_out,
             seeds: Sequence[int]) -> tuple[int, dict[int, float]]:
    """Pick the random start with the lowest held-out nll and write the run's results.

    Parameters
    ----------
    seed_histories, seed_volumes, seed_poses : sequence of path
        Each random start's last stage ``history.tsv``, ``volume.mrc`` and ``poses.npz``, in
        the order of ``seeds``.
    source_particles : path
        The particles the run started from (STAR or ``.cs``); their table is written back with
        the new poses, and a ``.cs`` source is kept field for field (uids included).
    info : path or dict
        Preprocessing's ``info.json`` (or its content): the input ``box`` and ``pixel_size``.
    volume_out, star_out, cs_out, choice_out : path
        The final map (input box and pixel size), the particles STAR (image names relative to
        its folder), the particles ``.cs`` (``alignments3D/pose``, ``shift``) and
        ``seed_choice.json`` (``chosen_seed``, ``heldout_nll`` per seed). Written atomically.
        With K > 1 classes (a ``class_posterior`` in the poses) the STAR and ``.cs`` also carry
        each particle's class and its posterior (module docstring).
    seeds : sequence of int
        The random starts, in the config's order.

    Returns
    -------
    chosen_seed : int
    heldout_nll : dict
        ``{seed: final held-out nll}`` (:func:`cryoday.validation.choose_seed`).
    """
    seeds = [int(s) for s in seeds]
    if not isinstance(info, Mapping):
        info = json.loads(Path(info).read_text())
    best, scores = validation.choose_seed(dict(zip(seeds, seed_histories)))
    index = seeds.index(best)
    log.info("held-out nll per seed: %s; final map from seed %d", scores, best)

    box, pixel_size = int(info["box"]), float(info["pixel_size"])
    io.write_map(volume_out, final_map(seed_volumes[index], box, pixel_size), pixel_size)

    source = io.read_particles(source_particles, pixel_size=pixel_size, check_stacks=False)
    poses = records.read_poses(seed_poses[index])
    table = posed_table(source, poses, Path(star_out).parent)
    io.write_particles(star_out, source.original_table(table), source.optics)
    source_cs = source_particles if str(source_particles).endswith(".cs") else None
    # Only a run of classes has its own class posteriors (a source's from RELION are not ours).
    posterior = (table["rlnMaxValueProbDistribution"].to_numpy(np.float32)
                 if class_results.n_classes(poses) > 1 else None)
    cryosparc.write_cs(cs_out, table, source_cs=source_cs, pixel_size=pixel_size, box=box,
                       class_posterior=posterior)

    with io.atomic_path(choice_out) as tmp:
        Path(tmp).write_text(json.dumps({"chosen_seed": best, "heldout_nll": scores}, indent=2))
    return best, scores


def class_outputs(k: int, seed_classes: Sequence, choice, final_star, info, volume_out,
                  star_out, seeds: Sequence[int]) -> int:
    """Write class ``k``'s (1-based) map and particles (``final/class{k}/``).

    Parameters
    ----------
    k : int
        The class, from 1.
    seed_classes : sequence of path
        Each random start's last ``classes.npz``, in the order of ``seeds``.
    choice : path
        ``seed_choice.json`` (:func:`finalize`): whose classes they are.
    final_star : path
        ``final/particles.star`` (with ``rlnClassNumber``).
    info : path or dict
        Preprocessing's ``info.json``: the input ``box`` and ``pixel_size``.
    volume_out, star_out : path
        The class's map at the input box and pixel size (as :func:`final_map`) and the final
        particles whose most probable class is ``k``, image names valid from its folder.
    seeds : sequence of int
        The random starts, in the config's order.

    Returns
    -------
    int
        The class's number of particles.
    """
    seeds = [int(s) for s in seeds]
    if not isinstance(info, Mapping):
        info = json.loads(Path(info).read_text())
    chosen = int(json.loads(Path(choice).read_text())["chosen_seed"])
    classes = records.read_classes(seed_classes[seeds.index(chosen)])
    if not 1 <= int(k) <= len(classes["volumes"]):
        raise ValueError(f"class {k}: the run has {len(classes['volumes'])} classes")
    box, pixel_size = int(info["box"]), float(info["pixel_size"])
    volume = to_input_box(classes["volumes"][int(k) - 1], classes["pixel_size"], box, pixel_size)
    io.write_map(volume_out, volume, pixel_size)
    count = class_results.class_particles(final_star, int(k), star_out)
    log.info("class %d of seed %d: %d particles", int(k), chosen, count)
    return count
