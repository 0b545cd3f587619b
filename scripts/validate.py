"""Rule `validate`: resolution and consistency figures of the run and its verdict (metrics.json)."""

import json
from pathlib import Path

if "snakemake" not in globals():
    from _common import argv_wildcards, mock_snakemake

    snakemake = mock_snakemake("validate", **argv_wildcards())

from _common import setup_logging

from cryoday import io, validation

log = setup_logging(snakemake)
seeds = snakemake.params.seeds
# common.smk lists every seed's stages seed-major; regrouped into one record list per seed.
histories = validation.by_seed(snakemake.input.histories, seeds)
volumes = validation.by_seed(snakemake.input.volumes, seeds)
# Listed only with K > 1 classes: each seed's classes.npz per stage.
class_stages = getattr(snakemake.input, "class_stages", None)
class_stages = validation.by_seed(class_stages, seeds) if class_stages else None
metrics, fsc_table = validation.run_metrics(
    dataset=snakemake.wildcards.dataset,
    final_volume=snakemake.input.volume,
    final_star=snakemake.input.star,
    seed_choice=snakemake.input.choice,
    preprocess_info=snakemake.input.info,
    preprocessed_star=snakemake.input.particles,
    seed_stages={seed: list(zip(histories[seed], volumes[seed])) for seed in histories},
    seed_poses=dict(zip(histories, snakemake.input.poses)),
    stages_A=list(snakemake.params.stages_A),
    reference=snakemake.input.reference[0] if snakemake.input.reference else None,
    truth_star=snakemake.input.truth[0] if snakemake.input.truth else None,
    final_map={"half1": snakemake.input.half1, "half2": snakemake.input.half2,
               "full": snakemake.input.final_map, "figures": snakemake.input.final_figures},
    noise_spectrum=snakemake.input.noise,
    symmetry=snakemake.params.symmetry,
    symmetry_search=snakemake.params.symmetry_search,
    truth_symmetry=snakemake.params.truth_symmetry,
    class_stages=class_stages,
    log=log.info,
)
validation.write_fsc_table(snakemake.output.fsc, fsc_table)

with io.atomic_path(snakemake.output.metrics) as tmp:
    Path(tmp).write_text(json.dumps(metrics, indent=2))
log.info("metrics: %s", json.dumps({k: v for k, v in metrics.items() if k != "stages"}))
