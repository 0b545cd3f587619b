"""Rule `reconstruct_stage`: one coarse-to-fine stage of ab initio reconstruction by SAGD."""

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from _common import setup_logging

if TYPE_CHECKING:
    from snakemake.script import snakemake

from cryoday import abinitio, initial, io

log = setup_logging(snakemake)
opts = dict(snakemake.params.options)
stage = int(snakemake.wildcards.stage)
seed = int(snakemake.wildcards.seed)
info = json.loads(Path(snakemake.input.info).read_text())
box, pixel_size, resolution = info["box"], info["pixel_size"], info["resolution_A"]

particles = io.read_particles(snakemake.input.particles)
table = particles.table
heldout = table["cryodayHeldOut"].to_numpy().astype(bool)
ctf = io.ctf_params(particles)
images = io.open_stack(snakemake.input.stack)

if stage == 1:
    if opts.get("initial_model"):
        volume, voxel_size = io.read_map(opts["initial_model"])
        volume0 = initial.resample_to(volume, voxel_size or info["full_pixel_size"], box, pixel_size)
        log.info("stage 1 starts from the initial model %s", opts["initial_model"])
    else:
        volume0 = initial.random_blobs(box, pixel_size, seed=seed,
                                       diameter_A=opts.get("particle_diameter_A"))
        log.info("stage 1 starts from a random density (seed %d)", seed)
    sagd_state = None
else:
    previous_volume, previous_state = snakemake.input.previous
    volume, _ = io.read_map(previous_volume)
    volume0 = initial.resample_for_stage(volume, box)
    sagd_state = previous_state
    log.info("stage %d starts from stage %d's volume, resampled %d -> %d px",
             stage, stage - 1, volume.shape[0], box)

io.write_map(snakemake.output.initial, volume0, pixel_size)
eps = max(opts["learning_rate_min"], opts["learning_rate"] * 0.5 ** (stage - 1))
undersampling = opts["undersampling"]
if undersampling == "auto":
    undersampling = [1.5, 1.5, 1.25, 1.25]
stage_options = {
    **opts,
    "learning_rate": eps,
    "undersampling": undersampling[stage - 1] if stage - 1 < len(undersampling) else 1.0,
    "seed": seed * 1000 + stage,
}
log.info("stage %d: %.1f A, %d px at %.3f A/px, eps %.4g, undersampling %.2f",
         stage, resolution, box, pixel_size, eps, stage_options["undersampling"])

result = abinitio.run_stage(
    volume0,
    images,
    ctf,
    sigma=info["noise_sigma"],
    pixel_size=pixel_size,
    resolution_A=resolution,
    train_rows=np.flatnonzero(~heldout),
    heldout_rows=np.flatnonzero(heldout),
    config=stage_options,
    sagd_state=sagd_state,
    log=log.info,
    checkpoint_path=snakemake.params.checkpoint,
    scale_start=(stage == 1 and not opts.get("initial_model")),
)

io.write_map(snakemake.output.volume, result.volume, pixel_size)
result.save_state(snakemake.output.state)
result.save_history(snakemake.output.history)
result.save_poses(snakemake.output.poses, pixel_size=pixel_size)
Path(snakemake.params.checkpoint).unlink(missing_ok=True)
log.info("stage %d done: %d iterations, held-out nll %.4f",
         stage, len(result.history), result.history[-1]["heldout_nll"])
