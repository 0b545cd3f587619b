"""Rule `finalize`: the final map at the input box and the particles with their estimated poses."""

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from _common import setup_logging

if TYPE_CHECKING:
    from snakemake.script import snakemake

from cryoday import io, validation
from cryoday.fourier import rescale_volume
from cryoday.geometry import matrix_to_euler

log = setup_logging(snakemake)
seeds = [int(s) for s in snakemake.params.seeds]
info = json.loads(Path(snakemake.input.info).read_text())

def final_heldout_nll(seed: int) -> float:
    """Held-out error at the end of a seed's last stage: lower means the model explains unseen
    images better, so it chooses between random starts without a reference."""
    history = validation.histories_of(snakemake.input.histories, seed)[-1]
    with open(history) as f:
        rows = [r for r in csv.DictReader(f, delimiter="\t") if r["heldout_nll"] not in ("", "nan")]
    return float(rows[-1]["heldout_nll"]) if rows else float("inf")

scores = {seed: final_heldout_nll(seed) for seed in seeds}
best = min(seeds, key=lambda s: scores[s])
index = seeds.index(best)
log.info("held-out nll per seed: %s; final map from seed %d", scores, best)

volume, stage_pixel_size = io.read_map(snakemake.input.volumes[index])
# Scaled as a stage map is between stages, so its projections match the input images.
final = rescale_volume(volume, stage_pixel_size, info["box"], info["pixel_size"])
final *= volume.shape[0] / info["box"]
io.write_map(snakemake.output.volume, final, info["pixel_size"])

poses = np.load(snakemake.input.poses[index])
rot, tilt, psi = matrix_to_euler(poses["rotations"])
source = io.read_particles(snakemake.params.input_particles, pixel_size=info["pixel_size"],
                           check_stacks=False)
table = source.table.copy()
table["rlnAngleRot"], table["rlnAngleTilt"], table["rlnAnglePsi"] = rot, tilt, psi
table["rlnOriginXAngst"] = poses["shifts_A"][:, 0]
table["rlnOriginYAngst"] = poses["shifts_A"][:, 1]
table = table.drop(columns=[c for c in ("rlnOriginX", "rlnOriginY") if c in table])
table["rlnImageName"] = source.image_names_from(Path(snakemake.output.star).parent)
io.write_particles(snakemake.output.star, source.original_table(table), source.optics)

with io.atomic_path(snakemake.output.choice) as tmp:
    Path(tmp).write_text(json.dumps({"chosen_seed": best, "heldout_nll": scores}, indent=2))
