"""Rule `reconstruct_stage`: one coarse-to-fine stage of ab initio reconstruction by SAGD."""

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from _common import setup_logging

from cryoday import classes, initial, io, noise, records
from cryoday.stage import run_stage
from cryoday.stage_config import StageConfig

if TYPE_CHECKING:
    from snakemake.script import snakemake
elif "snakemake" not in globals():  # by hand: python scripts/reconstruct_stage.py dataset=demo ...
    from _common import argv_wildcards, mock_snakemake

    snakemake = mock_snakemake("reconstruct_stage", **argv_wildcards())

log = setup_logging(snakemake)
section = snakemake.params.options
stage, seed = int(snakemake.wildcards.stage), int(snakemake.wildcards.seed)
config = StageConfig.from_config(section, stage, seed)
info = json.loads(Path(snakemake.input.info).read_text())
box, pixel_size, resolution = info["box"], info["pixel_size"], info["resolution_A"]
particles = io.read_particles(snakemake.input.particles)
heldout = particles.table["cryodayHeldOut"].to_numpy().astype(bool)
input_spectrum = noise.NoiseSpectrum.load(snakemake.input.noise)
spectrum = input_spectrum
noise_group = (particles.table["cryodayNoiseGroup"].to_numpy().astype(np.int64)
               if "cryodayNoiseGroup" in particles.table else None)
if not np.any(spectrum.power != 1.0):
    spectrum = None  # white noise: the white likelihood exactly

n_classes = config.classes
# null in the config: the diameter preprocessing estimated from the images (older stage files
# without one: random_blobs' 0.6 x box).
diameter = section["particle_diameter_A"] or info.get("particle_diameter_A")
sagd_state = None
reseeded = []
if stage > 1:
    previous_volume, sagd_state, *previous_classes = snakemake.input.previous
    if n_classes > 1:
        previous = records.read_classes(previous_classes[0])
        volume0 = np.stack([initial.resample_for_stage(v, box) for v in previous["volumes"]])
        if previous["resolution_A"] is not None:
            reseeded = classes.find_duplicates(previous["volumes"], previous["pixel_size"],
                                               previous["resolution_A"], diameter,
                                               previous["proportions"])
        for duplicate, twin in reseeded:
            fresh = initial.random_blobs(box, pixel_size, diameter_A=diameter,
                                         seed=classes.class_start_seed(seed, duplicate) + stage)
            volume0[duplicate] = classes.weak_start(volume0[twin], fresh)
            log.info("class %d is class %d's molecule again (FSC 0.5 between them finer than "
                     "%g x %g A): it starts afresh from a weak random density, its "
                     "particles pass to class %d", duplicate + 1, twin + 1,
                     classes.DUPLICATE_FACTOR, previous["resolution_A"], twin + 1)
    else:
        volume0 = initial.resample_for_stage(io.read_map(previous_volume)[0], box)
    log.info("stage %d starts from stage %d's %s, resampled to %d px", stage, stage - 1,
             f"{n_classes} class maps" if n_classes > 1 else "volume", box)
elif section["initial_model"]:
    volume, voxel_size = io.read_map(section["initial_model"])
    volume0 = initial.resample_to(volume, voxel_size or info["full_pixel_size"], box, pixel_size)
    if n_classes > 1:
        # Every class from the one model, each but the first with a fifth of a random density
        # of its own mixed in: identical starts would get identical gradients and never part.
        volume0 = np.stack([volume0] + [
            classes.perturbed_start(volume0, initial.random_blobs(
                box, pixel_size, seed=classes.class_start_seed(seed, c), diameter_A=diameter))
            for c in range(1, n_classes)])
    log.info("stage 1 starts from the initial model %s", section["initial_model"])
else:
    starts = [initial.random_blobs(box, pixel_size, seed=classes.class_start_seed(seed, c),
                                   diameter_A=diameter) for c in range(n_classes)]
    volume0 = np.stack(starts) if n_classes > 1 else starts[0]
    log.info("stage 1 starts from %s (seed %d) of diameter %s",
             f"{n_classes} random densities" if n_classes > 1 else "a random density", seed,
             f"{diameter:.1f} A ({'config' if section['particle_diameter_A'] else 'estimated'})"
             if diameter else "0.6 x box")
io.write_map(snakemake.output.initial, volume0[0] if n_classes > 1 else volume0, pixel_size)
log.info("stage %d: %.1f A, %d px at %.3f A/px, eps %.4g, undersampling %.2f",
         stage, resolution, box, pixel_size, config.learning_rate, config.undersampling)

result = run_stage(
    volume0, io.open_stack(snakemake.input.stack), io.ctf_params(particles),
    sigma=info["noise_sigma"], pixel_size=pixel_size, resolution_A=resolution,
    train_rows=np.flatnonzero(~heldout), heldout_rows=np.flatnonzero(heldout), config=config,
    sagd_state=sagd_state, log=log.info, checkpoint_path=snakemake.params.checkpoint,
    scale_start=(stage == 1 and not section["initial_model"]), noise=spectrum,
    noise_group=noise_group, full_box=info["full_box"], reseeded=tuple(reseeded),
    last_stage=bool(snakemake.params.last_stage),
    refine_rounds=int(snakemake.params.refine_rounds),
)
io.write_map(snakemake.output.volume, result.volume, pixel_size)
result.save_state(snakemake.output.state)
result.save_history(snakemake.output.history)
result.save_poses(snakemake.output.poses, pixel_size=pixel_size)
result.save_classes(snakemake.output.classes, pixel_size=pixel_size, resolution_A=resolution)
# White noise (a flat spectrum) is the user's choice: it is passed on unrefined.
(result.noise or input_spectrum).save(snakemake.output.noise)
Path(snakemake.params.checkpoint).unlink(missing_ok=True)
log.info("stage %d done: %d iterations, held-out nll %.4f",
         stage, len(result.history), result.history[-1]["heldout_nll"])
