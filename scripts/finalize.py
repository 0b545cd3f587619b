"""Rule `finalize`: the final map at the input box and the particles with their estimated poses."""

from typing import TYPE_CHECKING

from _common import setup_logging

from cryoday.finalize import finalize

if TYPE_CHECKING:
    from snakemake.script import snakemake
elif "snakemake" not in globals():  # run by hand: python scripts/finalize.py dataset=demo
    from _common import argv_wildcards, mock_snakemake

    snakemake = mock_snakemake("finalize", **argv_wildcards())

setup_logging(snakemake)
finalize(
    seed_histories=snakemake.input.histories,
    seed_volumes=snakemake.input.volumes,
    seed_poses=snakemake.input.poses,
    source_particles=snakemake.input.source,
    info=snakemake.input.info,
    volume_out=snakemake.output.volume,
    star_out=snakemake.output.star,
    cs_out=snakemake.output.cs,
    choice_out=snakemake.output.choice,
    seeds=snakemake.params.seeds,
)
