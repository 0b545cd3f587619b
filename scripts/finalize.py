"""Rule `finalize`: the final map at the input box and the particles with their estimated poses."""

import json
from pathlib import Path

if "snakemake" not in globals():
    from _common import mock_snakemake

    snakemake = mock_snakemake("finalize", dataset="demo")

from _common import setup_logging

from cryoday import cryosparc, io, records, validation
from cryoday.fourier import rescale_volume
from cryoday.geometry import matrix_to_euler

log = setup_logging(snakemake)
seeds = [int(s) for s in snakemake.params.seeds]
info = json.loads(Path(snakemake.input.info).read_text())

# One history, volume and poses file per seed (its last stage), in the order of `seeds`.
best, scores = validation.choose_seed(dict(zip(seeds, snakemake.input.histories)))
index = seeds.index(best)
log.info("held-out nll per seed: %s; final map from seed %d", scores, best)

volume, stage_pixel_size = io.read_map(snakemake.input.volumes[index])
# Scaled as a stage map is between stages, so its projections match the input images.
final = rescale_volume(volume, stage_pixel_size, info["box"], info["pixel_size"])
final *= volume.shape[0] / info["box"]
io.write_map(snakemake.output.volume, final, info["pixel_size"])

poses = records.read_poses(snakemake.input.poses[index])
rot, tilt, psi = matrix_to_euler(poses["rotations"])
source = io.read_particles(snakemake.input.source, pixel_size=info["pixel_size"],
                           check_stacks=False)
table = source.table.copy()
table["rlnAngleRot"], table["rlnAngleTilt"], table["rlnAnglePsi"] = rot, tilt, psi
table["rlnOriginXAngst"] = poses["shifts_A"][:, 0]
table["rlnOriginYAngst"] = poses["shifts_A"][:, 1]
table = table.drop(columns=[c for c in ("rlnOriginX", "rlnOriginY") if c in table])
table["rlnImageName"] = source.image_names_from(Path(snakemake.output.star).parent)
io.write_particles(snakemake.output.star, source.original_table(table), source.optics)
# The same poses for cryoSPARC; a .cs input is kept field for field (uids included).
source_cs = snakemake.input.source if str(snakemake.input.source).endswith(".cs") else None
cryosparc.write_cs(snakemake.output.cs, table, source_cs=source_cs,
                   pixel_size=info["pixel_size"], box=info["box"])

with io.atomic_path(snakemake.output.choice) as tmp:
    Path(tmp).write_text(json.dumps({"chosen_seed": best, "heldout_nll": scores}, indent=2))
