"""Rule `final_map_shard`: one shard's particles inserted into the final map's half sums."""

from typing import TYPE_CHECKING

from _common import final_map_inputs, setup_logging

from cryoday import final_map

if TYPE_CHECKING:
    from snakemake.script import snakemake
elif "snakemake" not in globals():  # by hand: python scripts/final_map_shard.py dataset=demo ...
    from _common import argv_wildcards, mock_snakemake

    snakemake = mock_snakemake("final_map_shard", **argv_wildcards())

log = setup_logging(snakemake)
state, class_weights, main_class, _ = final_map_inputs(snakemake)
halves = final_map.run_shard(
    preprocessed_star=snakemake.input.particles,
    final_star=snakemake.input.star,
    shard=int(snakemake.wildcards.shard) - 1,
    n_shards=int(snakemake.wildcards.n_shards),
    out=snakemake.output[0],
    state=state,
    symmetry=snakemake.params.symmetry,
    class_weights=class_weights,
    main_class=main_class,
    log=log.info,
)
log.info("shard %s of %s: %d poses inserted", snakemake.wildcards.shard,
         snakemake.wildcards.n_shards, halves.n_insertions)
