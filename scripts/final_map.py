"""Rule `final_map`: the full-box map at the limit of the data, its half maps, FSC and sharpened map."""

import json

if "snakemake" not in globals():
    from _common import argv_wildcards, mock_snakemake

    snakemake = mock_snakemake("final_map", **argv_wildcards())

from _common import final_map_inputs, setup_logging

from cryoday import final_map

log = setup_logging(snakemake)
state, class_weights, main_class, chosen = final_map_inputs(snakemake)
figures = final_map.run(
    preprocessed_star=snakemake.input.particles,
    final_star=snakemake.input.star,
    state=state,
    outputs={key: snakemake.output[key] for key in
             ("full", "half1", "half2", "sharpened", "figures", "fsc_table")},
    symmetry=snakemake.params.symmetry,
    class_weights=class_weights,
    main_class=main_class,
    # shards > 1: the final_map_shard jobs' sums (none with one shard: inserted here).
    shard_sums=list(getattr(snakemake.input, "shards", [])),
    log=log.info,
)
log.info("final map of seed %d: %s", chosen, json.dumps(figures))
