"""Rule `downsample`: Fourier-crop the normalised particles to the box a stage needs."""

import json
from pathlib import Path
from typing import TYPE_CHECKING

from _common import setup_logging

from cryoday import io, preprocess

if TYPE_CHECKING:
    from snakemake.script import snakemake
elif "snakemake" not in globals():  # run by hand: python scripts/downsample.py dataset=demo stage=1
    from _common import argv_wildcards, mock_snakemake

    snakemake = mock_snakemake("downsample", **argv_wildcards())

log = setup_logging(snakemake)
info = json.loads(Path(snakemake.input.info).read_text())
resolution = float(snakemake.params.resolution)
box, pixel_size = info["box"], info["pixel_size"]
new_box, new_pixel_size = preprocess.stage_box(box, pixel_size, resolution)
stack = io.open_stack(snakemake.input.stack)
n = len(stack)
with io.StackWriter(snakemake.output.stack, n, new_box, new_pixel_size) as writer:
    preprocess.downsample_stream(
        lambda rows: io.read_rows(stack, rows),
        n,
        writer.data,
        new_box,
        chunk_size=snakemake.params.chunk_size,
    )
stage_info = {
    "resolution_A": resolution,
    "box": new_box,
    "pixel_size": new_pixel_size,
    # Images were normalised to unit noise at the full box; mean-preserving cropping scales the
    # per-pixel noise by new_box / box.
    "noise_sigma": new_box / box,
    "full_box": box,
    "full_pixel_size": pixel_size,
    "particle_diameter_A": info.get("particle_diameter_A"),  # for the random start
}
with io.atomic_path(snakemake.output.info) as tmp:
    Path(tmp).write_text(json.dumps(stage_info, indent=2))
log.info("stage at %.1f A: %d -> %d px, %.3f A/px", resolution, box, new_box, new_pixel_size)
