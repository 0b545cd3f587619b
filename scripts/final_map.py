"""Rule `final_map`: the full-box map at the limit of the data, its half maps, FSC and sharpened map."""

import json
from pathlib import Path

if "snakemake" not in globals():
    from _common import mock_snakemake

    snakemake = mock_snakemake("final_map", dataset="demo")

from _common import setup_logging

from cryoday import final_map, records

log = setup_logging(snakemake)
seeds = [int(s) for s in snakemake.params.seeds]
chosen = int(json.loads(Path(snakemake.input.choice).read_text())["chosen_seed"])
# The chosen start's last pose posteriors (common.smk lists every seed's, in config order).
state = snakemake.input.states[seeds.index(chosen)] if snakemake.input.states else None
# With K > 1 classes (common.smk lists these only then): the main class's posterior weights.
class_weights = main_class = None
if getattr(snakemake.input, "class_maps", None):
    main = records.read_classes(snakemake.input.class_maps[seeds.index(chosen)])["main"]
    poses = records.read_poses(snakemake.input.class_poses[seeds.index(chosen)])
    class_weights, main_class = records.class_posterior(poses)[:, main], main + 1
figures = final_map.run(
    preprocessed_star=snakemake.input.particles,
    final_star=snakemake.input.star,
    state=state,
    outputs={key: snakemake.output[key] for key in
             ("full", "half1", "half2", "sharpened", "figures", "fsc_table")},
    symmetry=snakemake.params.symmetry,
    class_weights=class_weights,
    main_class=main_class,
    log=log.info,
)
log.info("final map of seed %d: %s", chosen, json.dumps(figures))
