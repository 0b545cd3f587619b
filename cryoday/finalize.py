"""The run's result: the chosen random start's map at the input box, and the particles with its
poses as RELION STAR and cryoSPARC ``.cs`` files."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from cryoday import cryosparc, io, records, validation
from cryoday.fourier import rescale_volume
from cryoday.geometry import matrix_to_euler

log = logging.getLogger(__name__)


def final_map(volume_path, box: int, pixel_size: float):
    """A stage's map resampled to the input's ``box`` and ``pixel_size``.

    Scaled as a stage map is between stages (by the box ratio), so its projections match the
    input images in amplitude as they matched the stage's downsampled ones.
    """
    volume, stage_pixel_size = io.read_map(volume_path)
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
    table = posed_table(source, records.read_poses(seed_poses[index]), Path(star_out).parent)
    io.write_particles(star_out, source.original_table(table), source.optics)
    source_cs = source_particles if str(source_particles).endswith(".cs") else None
    cryosparc.write_cs(cs_out, table, source_cs=source_cs, pixel_size=pixel_size, box=box)

    with io.atomic_path(choice_out) as tmp:
        Path(tmp).write_text(json.dumps({"chosen_seed": best, "heldout_nll": scores}, indent=2))
    return best, scores
